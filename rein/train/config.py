"""The training command's flags: parsing, defaults (synthetic or the published recipe) and
every check that can be made before anything is written."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from ..cli import PRECISION_MEANS as EVAL_PRECISION_MEANS
from ..cli import add_mapillary_flag, add_precision_flags, check_out_folder, device_from_flag, parser
from ..errors import UsageError
from ..heads.mask2former_loss import MATCHERS
from ..model import OFFICIAL_PATCH_SIZE, check_backbone

# The published GTAV config: no warm-up (PolyLR from the first iteration).
RECIPE = dict(crop=512, batch_size=4, max_iters=40000, backbone="vit_large_patch14_dinov2",
              patch_size=OFFICIAL_PATCH_SIZE, warmup_iters=0, head="mask2former", head_kwargs={})
# The synthetic default: small enough for a 2-core CPU in minutes, the same pipeline.
SYNTHETIC = dict(crop=128, batch_size=4, max_iters=300, backbone="vit_small_patch14_dinov2", patch_size=8,
                 warmup_iters=20, depth=4, head="light", head_kwargs={})
# Mask2Former scaled down for a CPU (the synthetic data with --head mask2former, and the tests)
SMALL_MASK2FORMER = dict(query_dims=64, num_heads=4, encoder_layers=2, decoder_layers=3, encoder_ffn_dims=256,
                         decoder_ffn_dims=256, num_points=1024)
# What each --precision means in training: bf16 also keeps the frozen weights in bf16
PRECISION_MEANS = {**EVAL_PRECISION_MEANS, "bf16": "bf16 autocast, the frozen backbone's weights cast to bf16 "
                                                   "once, fp32 master weights for Rein and the head"}
# Flags that change the model or the schedule: a resumed run must keep them. (Not
# --precision: like --device, it changes the rounding only, and its default differs
# between a CPU and a GPU, which a run may move between.)
RESUME_KEYS = ("source", "backbone", "checkpoint", "conversion", "head", "head_kwargs", "crop", "batch_size", "max_iters", "lr",
               "weight_decay", "warmup_iters", "seed", "patch_size")


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    r, syn = RECIPE, SYNTHETIC
    ap = parser("rein-train", description)
    ap.add_argument("--source", metavar="KIND=PATH",
                    help="source domain, e.g. gtav=/data/gtav, with the published recipe's defaults (default: "
                         "none: the synthetic data, with the synthetic defaults below)")
    ap.add_argument("--target", metavar="KIND=PATH", action="append", default=[],
                    help="target domain to evaluate on (repeat): cityscapes=..., bdd100k=..., mapillary=..., "
                         "acdc-fog=...; needs --source (default: none)")
    add_mapillary_flag(ap)
    ap.add_argument("--out", default="runs/rein",
                    help="output folder: checkpoint.pth, metrics.json, loss.png, samples/ (default: runs/rein)")
    ap.add_argument("--max-iters", type=int,
                    help=f"training iterations (default: {r['max_iters']} with --source, {syn['max_iters']} "
                         "on the synthetic data)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    add_precision_flags(ap, PRECISION_MEANS["bf16"])
    ap.add_argument("--backbone",
                    help=f"timm model name (default: {r['backbone']} with --source, a random-weight "
                         f"{syn['depth']}-block {syn['backbone']} on the synthetic data)")
    ap.add_argument("--checkpoint", "--backbone-checkpoint", dest="checkpoint",
                    help="local backbone weights, timm or the DINOv2/EVA02/DINOv3 release format; "
                         "--backbone-checkpoint, as rein.evaluate and rein.predict call it, is the same flag "
                         "(default: none, the backbone keeps its random initialisation)")
    ap.add_argument("--conversion", choices=["official", "timm"], default="official",
                    help="how a release checkpoint's 14-pixel patch kernel and position grid are resampled: "
                         "as the official Rein converter (default; what released Rein weights were trained on) "
                         "or as timm does")
    ap.add_argument("--head", choices=["mask2former", "light"],
                    help="mask2former: the published head, Rein's tokens linked to its queries (default with "
                         "--source); light: a small per-pixel head (default on the synthetic data)")
    ap.add_argument("--init-from-official", metavar="FILE",
                    help="start Rein and the Mask2Former head from an official Rein checkpoint, mmseg format "
                         "(default: their own initialisation)")
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                    help="Rein's Triton kernels (default, where they can run: CUDA) or the PyTorch reference")
    ap.add_argument("--compile", action="store_true",
                    help="where the step is not captured (a CPU, torchrun, --no-cuda-graphs): torch.compile the "
                         "model, backbone, Rein's custom op and head in one graph (default: off)")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="on CUDA (the default there): the training step's forward and backward "
                         "and the loss (with --matcher host, all but Mask2Former's matching, which then runs on the "
                         "host between two graphs), compiled and replayed as CUDA graphs (torch.compile's "
                         "reduce-overhead mode), and evaluation's sliding window replayed from one graph, so that "
                         "the GPU, not Python, sets the pace")
    ap.add_argument("--matcher", choices=MATCHERS, default="auto",
                    help="where the Mask2Former loss's Hungarian matching runs: device (scipy's algorithm and "
                         "answer, to the bit, in one Triton launch: the loss needs no wait for the GPU and is one "
                         "CUDA graph), host (scipy itself, as the official code) or auto (default: device on CUDA "
                         "when there are fewer classes than queries, else host)")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="recompute each (backbone block + Rein) in the backward pass: less memory, more time "
                         "(default: off)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from OUT/checkpoint.pth (default: start afresh, replacing it)")
    ap.add_argument("--force-resume", action="store_true",
                    help="with --resume: continue even though flags that change the model or schedule differ "
                         "from the checkpoint's (the run then is not the one the checkpoint started; default: "
                         "refuse)")
    ap.add_argument("--crop", type=int,
                    help=f"training crop and sliding window, in pixels (default: {r['crop']} with --source, "
                         f"{syn['crop']} on the synthetic data)")
    ap.add_argument("--batch-size", type=int,
                    help=f"global batch, split over torchrun's processes (default: {r['batch_size']}), at most "
                         "the training set's size")
    ap.add_argument("--workers", type=int,
                    help="data loading processes; 0 loads in the training process (default: one per CPU core "
                         "but one, up to 8)")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW's peak learning rate (default: 1e-4)")
    ap.add_argument("--weight-decay", type=float, default=0.05,
                    help="AdamW's weight decay, none on Rein's tokens and scale, norms and the decoder's level "
                         "embedding (default: 0.05)")
    ap.add_argument("--warmup-iters", type=int,
                    help="linear warm-up iterations before the poly decay (default: 0 with --source, as the "
                         f"published config; min({syn['warmup_iters']}, max-iters / 10) on the synthetic data)")
    ap.add_argument("--ckpt-interval", type=int,
                    help="iterations between checkpoints (default: max-iters / 10); one is also written at the "
                         "end and when a run stops early")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the initialisation, the batches and the loss's point sampling (default: 0)")
    ap.add_argument("--stop-at", type=int, help=argparse.SUPPRESS)  # tests: stop as if interrupted
    args = ap.parse_args(argv)
    args.synthetic = args.source is None
    if args.synthetic and args.target:
        ap.error("--target needs --source (without data flags the synthetic domains are used)")
    defaults = SYNTHETIC if args.synthetic else RECIPE
    for k in ("crop", "batch_size", "max_iters", "backbone", "head"):
        if getattr(args, k) is None:
            setattr(args, k, defaults[k])
    args.head_kwargs = dict(SMALL_MASK2FORMER if args.synthetic and args.head == "mask2former" else {})
    user_backbone = args.backbone != defaults["backbone"]
    args.patch_size = RECIPE["patch_size"] if user_backbone else defaults["patch_size"]
    args.timm_kwargs = {} if (user_backbone or not args.synthetic) else {"depth": SYNTHETIC["depth"]}
    if args.warmup_iters is None:
        args.warmup_iters = min(defaults["warmup_iters"], max(1, args.max_iters // 10))
    if args.ckpt_interval is None:
        args.ckpt_interval = max(1, args.max_iters // 10)
    if args.workers is None:
        args.workers = min(8, max(0, (os.cpu_count() or 1) - 1))
    for wrong, message in _out_of_range(args):
        if wrong:
            ap.error(message)
    return args


def _out_of_range(args) -> list[tuple[bool, str]]:
    """(whether a flag is out of its range, the line that says so), flag by flag."""
    return [
        (args.max_iters < 1, f"--max-iters {args.max_iters}: give 1 or more"),
        (args.batch_size < 1, f"--batch-size {args.batch_size}: give 1 or more"),
        (args.crop < args.patch_size, f"--crop {args.crop}: give at least one {args.patch_size}-pixel patch"),
        (args.workers < 0, f"--workers {args.workers}: give 0 (load in this process) or more"),
        (not (math.isfinite(args.lr) and args.lr > 0), f"--lr {args.lr}: give a learning rate above 0"),
        (not (math.isfinite(args.weight_decay) and args.weight_decay >= 0),
         f"--weight-decay {args.weight_decay}: give 0 or more"),
        (not 0 <= args.warmup_iters <= args.max_iters,
         f"--warmup-iters {args.warmup_iters}: give 0 to --max-iters ({args.max_iters})"),
        (args.ckpt_interval < 1, f"--ckpt-interval {args.ckpt_interval}: give 1 or more iterations"),
        # the batch and step seeds, (seed * 1000003 + iteration) * 4096 + rank, fit in 64 bits
        (not 0 <= args.seed < 2**32, f"--seed {args.seed}: give 0 to {2**32 - 1}"),
    ]


def validate(args) -> None:
    """Every check of the flags alone; raises UsageError naming the flag and the fix."""
    check_out_folder(Path(args.out), "checkpoint.pth, metrics.json, loss.png, samples/")
    device_from_flag(args.device)
    check_backbone(args.backbone, args.patch_size, args.crop)
    if args.init_from_official is not None:
        if args.head != "mask2former":
            raise UsageError(f"--init-from-official loads a Mask2Former head; it needs --head mask2former, "
                             f"not {args.head}")
        if not Path(args.init_from_official).is_file():
            raise UsageError(f"--init-from-official {args.init_from_official} does not exist (or is not a file)")
    if args.matcher != "auto" and args.head != "mask2former":
        raise UsageError(f"--matcher {args.matcher} chooses where the Mask2Former loss matches; "
                         f"--head {args.head} has no matching (leave --matcher out, or use --head mask2former)")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint} does not exist (or is not a file)")
    try:
        import matplotlib  # noqa: F401  (loss.png is written after training: fail now, not then)
    except ImportError:
        raise UsageError("matplotlib is needed to write loss.png: pip install matplotlib "
                         "(or pip install -e '.[train]')") from None


def warnings_for(args) -> list[str]:
    """Legal but probably unintended: the command prints these loudly at the start."""
    notes = []
    if not args.synthetic and args.checkpoint is None:
        notes.append(f"no --checkpoint: the {args.backbone} backbone keeps its RANDOM initialisation, so the "
                     "features Rein adapts mean nothing and the mIoU will be near chance; pass the pretrained "
                     "weights (e.g. --checkpoint dinov2_vitl14_pretrain.pth)")
    if not args.synthetic and not args.target:
        notes.append("no --target: nothing will be evaluated and metrics.json will be empty")
    return notes


def resume_mismatches(saved: dict, args) -> list[str]:
    """Flags that change the model or the schedule and differ from the checkpoint's."""
    now = vars(args)
    name = {"head_kwargs": "the head's sizes (set by --head and the data)"}
    if saved.get("max_iters") != now.get("max_iters"):  # the warm-up's default follows --max-iters
        name["warmup_iters"] = "--warmup-iters (by default from --max-iters)"
    return [f"{name.get(k, '--' + k.replace('_', '-'))} {saved.get(k)!r} -> {now.get(k)!r}" for k in RESUME_KEYS
            if k in saved and saved.get(k) != now.get(k)]
