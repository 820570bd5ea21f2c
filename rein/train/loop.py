"""``python -m rein.train`` / ``rein-train``: train Rein + a head on a source domain, report
mIoU on every target domain.

With no data flags it trains on the package's procedurally generated street scenes
(source style -> overcast, night and fog styles) with a small random-weight ViT, so it
runs anywhere in minutes; those numbers show the pipeline working, not Rein's accuracy.
With ``--source gtav=PATH --target cityscapes=PATH ...`` it follows the published recipe:
DINOv2-L/16, 512 crops, batch 4, 40k iterations, AdamW (lr 1e-4, weight decay 0.05, none
on tokens, scale and norms), linear warm-up then poly decay (power 0.9), sliding-window
evaluation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import rein_kernels

from ..evaluate import evaluate
from ..heads import build_head, segmentation_loss
from .data import CLASSES, DataError, FolderDataset, SyntheticDomain, augment, normalize

RECIPE = dict(crop=512, batch_size=4, max_iters=40000, backbone="vit_large_patch14_dinov2", patch_size=16,
              warmup_iters=1500)
SYNTHETIC = dict(crop=128, batch_size=4, max_iters=300, backbone="vit_small_patch14_dinov2", patch_size=8,
                 warmup_iters=20, depth=4, train_size=400, val_size=12)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="rein-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", metavar="KIND=PATH", help="source domain, e.g. gtav=/data/gtav")
    ap.add_argument("--target", metavar="KIND=PATH", action="append", default=[],
                    help="target domain (repeat): cityscapes=..., bdd100k=..., mapillary=...")
    ap.add_argument("--out", default="runs/rein", help="output folder (checkpoint, metrics.json, loss.png)")
    ap.add_argument("--max-iters", type=int, help="iterations (recipe 40000; synthetic 300)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    ap.add_argument("--backbone", help="timm model name (recipe vit_large_patch14_dinov2)")
    ap.add_argument("--checkpoint", help="local backbone weights (timm or DINOv2 release format)")
    ap.add_argument("--head", choices=["light", "query"], default="light")
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                    help="Rein's Triton kernels (default) or the PyTorch reference")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pth")
    ap.add_argument("--crop", type=int)
    ap.add_argument("--batch-size", type=int, help="global batch")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-iters", type=int, help="linear warm-up (default: 1500, at most max_iters / 10)")
    ap.add_argument("--ckpt-interval", type=int, help="iterations between checkpoints (default: max_iters / 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-at", type=int, help=argparse.SUPPRESS)  # tests: stop as if interrupted
    args = ap.parse_args(argv)
    args.synthetic = args.source is None
    if args.synthetic and args.target:
        ap.error("--target needs --source (without data flags the synthetic domains are used)")
    defaults = SYNTHETIC if args.synthetic else RECIPE
    for k in ("crop", "batch_size", "max_iters", "backbone"):
        if getattr(args, k) is None:
            setattr(args, k, defaults[k])
    user_backbone = args.backbone != defaults["backbone"]
    args.patch_size = RECIPE["patch_size"] if user_backbone else defaults["patch_size"]
    args.timm_kwargs = {} if (user_backbone or not args.synthetic) else {"depth": SYNTHETIC["depth"]}
    if args.warmup_iters is None:
        args.warmup_iters = min(defaults["warmup_iters"], max(1, args.max_iters // 10))
    args.ckpt_interval = args.ckpt_interval or max(1, args.max_iters // 10)
    if args.max_iters < 1 or args.batch_size < 1 or args.crop < args.patch_size:
        ap.error("--max-iters and --batch-size must be positive and --crop at least one patch")
    return args


def _parse_domain(spec: str, split: str):
    if "=" not in spec:
        raise DataError(f"expected KIND=PATH, got {spec!r}")
    kind, path = spec.split("=", 1)
    return FolderDataset(kind.strip().lower(), path, split)


def build_data(args):
    if args.synthetic:
        n, size = SYNTHETIC["train_size"], args.crop
        train = SyntheticDomain("source", n, size, seed=1)
        vals = [SyntheticDomain("source", SYNTHETIC["val_size"], size, seed=2)] + [
            SyntheticDomain(s, SYNTHETIC["val_size"], size, seed=3 + i) for i, s in
            enumerate(["overcast", "night", "fog"])]
        return train, vals
    train = _parse_domain(args.source, "train")
    vals = [_parse_domain(t, "val") for t in args.target]
    for d in [train, *vals]:
        d.check()
    return train, vals


def _features_and_queries(out):
    """ReinBackbone returns (features, queries), or features alone without queries."""
    return out if isinstance(out, tuple) else (out, None)


class Segmentor(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images):
        return self.head(*_features_and_queries(self.backbone(images)))


def build_model(args, device) -> Segmentor:
    from ..backbones import ReinBackbone

    torch.manual_seed(args.seed)
    bb = ReinBackbone.from_timm(args.backbone, checkpoint=args.checkpoint, img_size=args.crop,
                                patch_size=args.patch_size, fused=args.fused,
                                link_token_to_query=args.head == "query", **args.timm_kwargs)
    with torch.no_grad():
        feats, _ = _features_and_queries(bb(torch.zeros(1, 3, args.crop, args.crop)))
    head = build_head(args.head, [f.shape[1] for f in feats], len(CLASSES))
    return Segmentor(bb, head).to(device)


def param_groups(model: nn.Module, weight_decay: float):
    """AdamW groups as the recipe: no decay on Rein's tokens and scale, nor on normalisation
    layers; everything else (weights and biases) decays."""
    norm_types = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)
    plain = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in plain or "learnable_tokens" in name or name.rsplit(".", 1)[-1] == "scale":
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(it: int, args) -> float:
    """Linear warm-up over ``warmup_iters``, then poly decay to 0 with power 0.9 (the
    published config's PolyLR; it has no warm-up: ``--warmup-iters 0`` reproduces that)."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    progress = (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    return args.lr * (1 - progress) ** 0.9


def make_batch(dataset, it: int, rank: int, world: int, args, device):
    """The global batch of iteration ``it`` is a pure function of (seed, it): a resumed or
    distributed run sees exactly the same samples and augmentations."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + it)
    idx = torch.randint(0, len(dataset), (args.batch_size,), generator=gen).tolist()
    seeds = torch.randint(0, 2**62, (args.batch_size,), generator=gen).tolist()
    per = args.batch_size // world
    imgs, lbls = [], []
    for i, s in zip(idx[rank * per:(rank + 1) * per], seeds[rank * per:(rank + 1) * per]):
        img, lbl = dataset[i]
        img, lbl = augment(img, lbl, args.crop, torch.Generator().manual_seed(s))
        imgs.append(normalize(img))
        lbls.append(lbl)
    return torch.stack(imgs).to(device), torch.stack(lbls).to(device)


def _autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)


def _save(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: an interruption never leaves half a checkpoint


def _plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.set_title("Rein training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _setup_distributed(args):
    dev_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(dev_type)
    rank = int(os.environ["RANK"])
    if dev_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    return rank, world, dev


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = _setup_distributed(args)
    out = Path(args.out)
    main_proc = rank == 0
    try:
        train_set, val_sets = build_data(args)
    except DataError as e:
        print(f"rein-train: {e}", file=sys.stderr)
        return 2
    if args.resume and not (out / "checkpoint.pth").is_file():
        print(f"rein-train: --resume but no checkpoint at {out / 'checkpoint.pth'}", file=sys.stderr)
        return 2
    if args.fused and not rein_kernels.is_available(torch.empty(0, device=device)):
        if main_proc:
            print(f"rein-train: Rein's fused kernels need a CUDA GPU; on {device.type} this run uses the "
                  "PyTorch reference path (same numbers, slower)")
        args.fused = False
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        if args.synthetic:
            print("rein-train: SYNTHETIC data (procedurally generated by this package, no downloads) and a "
                  f"random-weight {args.backbone} (depth {SYNTHETIC['depth']}, patch {args.patch_size}): the "
                  "numbers show the pipeline working, not Rein's accuracy.")
        print(f"rein-train: {train_set.name} -> {', '.join(v.name for v in val_sets)}; {args.max_iters} iters, "
              f"batch {args.batch_size}, crop {args.crop}, {args.backbone}, head {args.head}, "
              f"{'fused' if args.fused else 'reference'} Rein, device {device}, {world} process(es)")

    model = build_model(args, device)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    start, losses = 0, []
    if args.resume:
        ck = torch.load(out / "checkpoint.pth", map_location=device, weights_only=False)
        model.backbone.load_rein_state_dict(ck["rein"])
        model.head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["optimizer"])
        start, losses = ck["iteration"], list(ck["losses"])
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp = model

    def checkpoint(it):
        if main_proc:
            _save(out / "checkpoint.pth", {
                "rein": model.backbone.rein_state_dict(), "head": model.head.state_dict(),
                "optimizer": opt.state_dict(), "iteration": it, "losses": losses,
                "config": {k: v for k, v in vars(args).items() if k not in ("resume", "stop_at")}})

    from tqdm import tqdm

    bar = tqdm(range(start, args.max_iters), initial=start, total=args.max_iters, disable=not main_proc,
               desc="train", dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
    t0 = time.time()
    for it in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(it, args)
        images, labels = make_batch(train_set, it, rank, world, args, device)
        with _autocast(args, device):
            head_out = ddp(images)
        # Mean over the valid pixels of the whole global batch, so that DDP (which averages
        # gradients over ranks) gives exactly the single-process gradient.
        loss_sum = segmentation_loss(head_out.float(), labels, model.head.kind, reduction="sum")
        n_valid = (labels != 255).sum().float()
        if world > 1:
            dist.all_reduce(n_valid)
        loss = loss_sum * world / n_valid.clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.detach() / world
        if world > 1:
            dist.all_reduce(value)
        losses.append(float(value))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"loss became {losses[-1]} at iteration {it}")
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_at(it, args):.2e}")
        done = it + 1
        if done % args.ckpt_interval == 0 or done == args.max_iters:
            checkpoint(done)
        if args.stop_at is not None and done >= args.stop_at:
            bar.close()
            if world > 1:
                dist.destroy_process_group()
            return 0
    bar.close()

    if main_proc:
        metrics = {}
        for ds in val_sets:
            metrics[ds.name] = evaluate(model, ds, args.crop, device, autocast=lambda: _autocast(args, device))
            print(f"  {ds.name:28s} mIoU {metrics[ds.name]['mIoU']:6.2f}")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        _plot_losses(losses, out / "loss.png")
        print(f"rein-train: {args.max_iters - start} iterations in {time.time() - t0:.0f} s; wrote "
              f"{out / 'checkpoint.pth'} (Rein + head only), {out / 'metrics.json'}, {out / 'loss.png'}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0
