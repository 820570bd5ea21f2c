"""``python -m rein.predict``: segment images with a trained Rein checkpoint, and the
pictures of predictions that training writes.

    python -m rein.predict --checkpoint runs/gtav2city/checkpoint.pth --images DIR_OR_FILES --out DIR

For every image it writes ``labelIds/<name>.png`` (Cityscapes label ids: the folder the
Cityscapes scripts and benchmark server take, one file per image), ``color/<name>.png``
(Cityscapes palette) and ``overlay/<name>.png`` (the colours over the image); ``<name>``
keeps an input folder's subfolders (``aachen/aachen_000000_000019_leftImg8bit``). The model is rebuilt from the checkpoint's own configuration;
the frozen backbone's weights come from ``--backbone-checkpoint`` (default: the file the
run was trained with). Sliding-window inference, fused kernels and bf16 on a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .train.data import _CITYSCAPES_IDS, CLASSES, IGNORE, DataError, normalize, read_image, to_uint8

# Cityscapes colours of the 19 train classes (cityscapesscripts' labels.py); ignore is black.
PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)
# train id -> Cityscapes label id (the inverse of the loaders' label-id map); ignore -> 0 (unlabeled)
LABEL_IDS = np.zeros(256, dtype=np.uint8)
for _label_id, _train_id in _CITYSCAPES_IDS.items():
    LABEL_IDS[_train_id] = _label_id
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def colorize(labels: np.ndarray) -> np.ndarray:
    """Train ids [H, W] -> RGB [H, W, 3] in the Cityscapes palette (ignore black)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:19] = PALETTE
    return lut[np.asarray(labels, dtype=np.int64).clip(0, 255)]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The prediction's colours blended over a uint8 RGB image."""
    return (image * (1 - alpha) + colorize(labels) * alpha).round().astype(np.uint8)


def save_samples(path: Path, samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], title: str) -> None:
    """One figure: a row per sample, image | ground truth | prediction, and a class legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = len(samples)
    fig, axes = plt.subplots(n, 3, figsize=(9, 2.6 * n + 0.9), squeeze=False)
    for row, (img, gt, pred) in zip(axes, samples):
        for ax, pic, name in zip(row, (img, colorize(gt), colorize(pred)), ("image", "ground truth", "prediction")):
            ax.imshow(pic)
            ax.set_axis_off()
            ax.set_title(name, fontsize=9)
    present = sorted({int(c) for _, gt, pred in samples for c in np.unique(np.concatenate([gt.ravel(), pred.ravel()]))
                      if c != IGNORE})
    fig.legend(handles=[Patch(color=PALETTE[c] / 255, label=CLASSES[c]) for c in present], loc="lower center",
               ncol=min(len(present), 7), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _images(spec: list[str], out: Path) -> list[tuple[Path, str]]:
    """(image file, output name) for every image named or found (recursively) in a folder,
    skipping the output folder. Names keep a folder's relative path without the suffix
    (a/b.png -> a/b), and the extension where two files would otherwise share one
    (a_png, a_jpg), so no output overwrites another."""
    files = []
    out = out.resolve()
    for s in spec:
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                           and out not in f.resolve().parents)
            files += [(f, f.relative_to(p).with_suffix("").as_posix()) for f in found]
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"--images {s}: not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))})")
            files.append((p, p.stem))
        else:
            raise DataError(f"--images {s}: no such file or folder")
    if not files:
        raise DataError(f"--images {' '.join(spec)}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    counts = Counter(name for _, name in files)
    named = [(f, f"{name}_{f.suffix[1:].lower()}" if counts[name] > 1 else name) for f, name in files]
    if len({n for _, n in named}) < len(named):
        raise DataError("--images: two inputs would write the same output name; name them apart")
    return named


def add_model_flags(ap: argparse.ArgumentParser) -> None:
    """The flags that name a trained model (``load_model``'s arguments), for the commands
    that use one."""
    ap.add_argument("--checkpoint", required=True,
                    help="OUT/checkpoint.pth of a rein.train run, or an official Rein checkpoint (mmseg format)")
    ap.add_argument("--backbone-checkpoint",
                    help="the frozen backbone's weights (release or timm format; default: those of the run; "
                         "needed for an official checkpoint unless it carries them)")
    ap.add_argument("--backbone", default="vit_large_patch14_dinov2",
                    help="official checkpoints: the timm backbone they were trained on (default DINOv2-L)")
    ap.add_argument("--crop", type=int, default=512,
                    help="official checkpoints: the training crop, 512 or 1024 (a rein.train run knows its own)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                    help="Rein's Triton kernels where they can run (default) or the PyTorch reference")


# How load_model's errors name its inputs: the flags of rein.predict / rein.evaluate.
FLAG_NAMES = {"checkpoint": "--checkpoint", "backbone_checkpoint": "--backbone-checkpoint",
              "backbone": "--backbone", "crop": "--crop"}


def load_model(checkpoint: str, backbone_checkpoint: str | None, device: torch.device, fused: bool,
               official: dict | None = None, names: dict | None = None):
    """The trained model (backbone + Rein + head) and its configuration, from a checkpoint
    ``rein.train`` wrote or, when ``official`` is given (``{"backbone": timm name, "crop":
    ...}``), also from an official Rein checkpoint: the recipe's model (Mask2Former head,
    official weight conversion) with that backbone. ``fused``: Rein's kernels where they
    can run on ``device``. Errors (UsageError) name the inputs as ``names`` does (default
    ``FLAG_NAMES``; the Python API passes its argument names)."""
    import rein_kernels

    from .checkpoints import load_tensors
    from .official import convert_official_state_dict, load_official_checkpoint, official_state
    from .train.config import RECIPE, UsageError, backfill, check_backbone
    from .train.loop import build_model

    n = {**FLAG_NAMES, **(names or {})}
    path = Path(checkpoint)
    if path.is_dir():
        hint = f"; did you mean {path / 'checkpoint.pth'}?" if (path / "checkpoint.pth").is_file() else ""
        raise UsageError(f"{n['checkpoint']} {path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise UsageError(f"{n['checkpoint']} {path} does not exist")
    try:
        ck = load_tensors(path)
    except ValueError as e:
        raise UsageError(f"{n['checkpoint']} {path}: {e}") from None
    is_ours = isinstance(ck, dict) and {"config", "rein", "head"} <= set(ck)
    if is_ours:
        config = backfill(ck["config"])
    elif official is not None:
        try:
            state = official_state(ck)
            has_backbone = bool(convert_official_state_dict(state)["backbone"])
        except ValueError as e:
            raise UsageError(f"{n['checkpoint']} {path}: neither a rein.train checkpoint nor an official Rein one ({e})") \
                from None
        if backbone_checkpoint is None and not has_backbone:
            raise UsageError(f"{n['checkpoint']} {path} is an official Rein checkpoint without the frozen backbone: "
                             f"pass its weights with {n['backbone_checkpoint']} (e.g. dinov2_vitl14_pretrain.pth)")
        check_backbone(official["backbone"], RECIPE["patch_size"], official["crop"], n)
        # the frozen backbone from backbone_checkpoint, or from the file already read
        config = dict(backbone=official["backbone"], crop=official["crop"], patch_size=RECIPE["patch_size"],
                      head="mask2former", head_kwargs={}, timm_kwargs={}, conversion="official", seed=0,
                      checkpoint=None)
    else:
        raise UsageError(f"{n['checkpoint']} {path} is not a checkpoint rein.train wrote")
    if backbone_checkpoint is not None:
        if not Path(backbone_checkpoint).is_file():
            raise UsageError(f"{n['backbone_checkpoint']} {backbone_checkpoint} does not exist (or is not a file)")
        config["checkpoint"] = backbone_checkpoint
    if config.get("checkpoint") and not Path(config["checkpoint"]).is_file():
        raise UsageError(f"the run's backbone weights {config['checkpoint']} are missing: pass them with "
                         f"{n['backbone_checkpoint']}")
    config["fused"] = fused and rein_kernels.is_available(torch.empty(0, device=device))
    config["init_from_official"] = None  # Rein and the head come from the checkpoint itself
    args = argparse.Namespace(**config)
    try:
        model = build_model(args, device, checkpoint_flag=n["backbone_checkpoint"] if backbone_checkpoint else
                            "the run's backbone --checkpoint", backbone_flag=n["backbone"])
    except UsageError as e:
        raise UsageError(f"{e}{'' if is_ours else _other_backbone_hint(state, official['backbone'], n)}") from None
    try:
        if is_ours:
            model.backbone.load_rein_state_dict({k: v.to(device) for k, v in ck["rein"].items()})
            model.head.load_state_dict(ck["head"])
        else:
            load_official_checkpoint(state, model.backbone, model.head, load_backbone=backbone_checkpoint is None)
    except (ValueError, RuntimeError) as e:
        hint = "" if is_ours else _other_backbone_hint(state, official["backbone"], n)
        raise UsageError(f"{n['checkpoint']} {path} does not fit the model it describes: {e}{hint}") from None
    return model.eval(), args


def _other_backbone_hint(state: dict, backbone: str, n: dict) -> str:
    """For an official checkpoint that does not fit: the size of the ViT its Rein was
    trained on (from its tokens), so that the user can pick the backbone."""
    b = state.get("backbone.reins.learnable_tokens_b", state.get("backbone.reins.learnable_tokens"))
    if b is None or b.dim() != 3:
        return ""
    return (f". Its Rein refines a {b.shape[0]}-block, {b.shape[-1]}-wide backbone: if {backbone} is not that, "
            f"pass the right one with {n['backbone']}")


def main(argv=None) -> int:
    from .train.config import OneLineParser

    ap = OneLineParser(prog="rein-predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(ap)
    ap.add_argument("--images", nargs="+", required=True, help="image files and/or folders (searched recursively)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--scale", help="resize each image keeping its ratio to fit LONGxSHORT first, e.g. 1024x512 "
                                    "(default: its own resolution)")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from .evaluate import predict
    from .train.config import UsageError, check_out_folder, device_from_flag

    try:
        device = device_from_flag(args.device)
        scale = None
        if args.scale:
            try:
                scale = tuple(int(v) for v in args.scale.lower().split("x"))
                assert len(scale) == 2 and min(scale) > 0
            except (ValueError, AssertionError):
                raise UsageError(f"--scale {args.scale!r}: expected LONGxSHORT, e.g. 1024x512") from None
        out = Path(args.out)
        check_out_folder(out, "the predicted PNGs")
        files = _images(args.images, out)
        model, config = load_model(args.checkpoint, args.backbone_checkpoint, device, args.fused,
                                   official=dict(backbone=args.backbone, crop=args.crop))
    except (UsageError, DataError) as e:
        print(f"rein-predict: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    from PIL import Image

    failed = []
    for f, name in tqdm(files, desc="predict", file=sys.stderr, dynamic_ncols=True):
        try:
            img = read_image(f)
        except DataError as e:
            failed.append(str(e))
            continue
        with amp:
            labels = predict(model, normalize(img)[None].to(device), config.crop, scale)[0].cpu().numpy()
        rgb = to_uint8(img)
        for kind, picture in (("labelIds", Image.fromarray(LABEL_IDS[labels.astype(np.int64)], mode="L")),
                              ("color", Image.fromarray(colorize(labels))),
                              ("overlay", Image.fromarray(overlay(rgb, labels)))):
            path = out / kind / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            picture.save(path)
    print(f"rein-predict: {len(files) - len(failed)} image(s) -> {out}")
    for msg in failed:
        print(f"rein-predict: skipped {msg}", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
