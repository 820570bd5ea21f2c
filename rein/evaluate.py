"""Evaluation: sliding-window inference over whole images and mIoU, as mmseg computes it.

``ConfusionMatrix`` accumulates (label, prediction) counts over the 19 Cityscapes train
classes (ignore 255) and reports IoU per class and their mean, as the DGSS literature.

``slide_scores`` places windows the way mmseg's ``slide_inference`` does: a start every
``stride`` pixels, the last window clamped to the border, scores of overlapping windows
averaged, so that every pixel is predicted by at least one window. ``evaluate`` follows
the official test pipelines: each image resized keeping its ratio to fit (1024, 512)
(Cityscapes, Mapillary), (1280, 720) (GTAV, BDD100K) or (960, 540) (ACDC), slide 512 /
stride 341 there (twice the sizes, 1024 / 683, at crop 1024), scores resized back to
the label's full resolution. ``evaluate_targets`` writes what training writes after its
last iteration: ``metrics.json`` and sample pictures.

``python -m rein.evaluate --checkpoint FILE --target cityscapes=PATH ... --out DIR``
evaluates a checkpoint that ``rein.train`` wrote or an official Rein checkpoint (mmseg
format; with ``--backbone-checkpoint`` for the frozen DINOv2 weights) by that protocol.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .train.data import CLASSES, IGNORE, DataError, normalize, to_uint8


class ConfusionMatrix:
    def __init__(self, num_classes: int = len(CLASSES)):
        self.k = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: Tensor, label: Tensor) -> None:
        keep = label != IGNORE
        idx = label[keep].cpu() * self.k + pred[keep].cpu()
        self.mat += torch.bincount(idx, minlength=self.k * self.k).view(self.k, self.k)

    def iou(self) -> Tensor:
        """Per-class IoU; NaN where a class is in neither the labels nor the predictions."""
        inter = self.mat.diag().double()
        union = self.mat.sum(0).double() + self.mat.sum(1).double() - inter
        return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))

    def summary(self, names=CLASSES) -> dict:
        """{"mIoU": percent or None, "per_class": {name: percent or None}}: the mean over
        the classes present; None (JSON null, never NaN) where there is nothing to score."""
        iou = self.iou()
        present = ~torch.isnan(iou)
        miou = round(float(iou[present].mean() * 100), 2) if present.any() else None
        per = {n: (None if math.isnan(v) else round(v * 100, 2)) for n, v in zip(names, iou.tolist())}
        return {"mIoU": miou, "per_class": per}


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start of every window along one axis of length ``size`` (>= crop): mmseg's grid,
    ceil((size - crop) / stride) + 1 windows, the last one ending at the border."""
    if size < crop or not 0 < stride <= crop:
        raise ValueError(f"need size >= crop and 0 < stride <= crop, got {size}, {crop}, {stride}")
    n = (size - crop + stride - 1) // stride + 1
    return [min(i * stride, size - crop) for i in range(n)]


# The official test pipelines of the 512-crop configs resize each image, keeping its
# ratio, to fit this (long, short) scale before the sliding window; labels stay at full
# resolution. The 1024-crop configs (Cityscapes -> ACDC) use twice these scales.
EVAL_SCALE = {"cityscapes": (1024, 512), "mapillary": (1024, 512), "gtav": (1280, 720), "bdd100k": (1280, 720),
              **{f"acdc-{c}": (960, 540) for c in ("fog", "night", "rain", "snow")}}
# The official sliding-window strides (test_cfg) by crop; other crops use 2/3 of the crop.
SLIDE_STRIDE = {512: 341, 1024: 683}


def eval_scale(kind: str | None, crop: int) -> tuple[int, int] | None:
    """The official test resize for a dataset kind at a training crop (None: keep the
    image as it is, e.g. the synthetic domains). Scaled with the crop: (2048, 1024) for
    Cityscapes and (1920, 1080) for ACDC at 1024, as the official 1024 configs; for the
    kinds no official 1024 config evaluates, the same rule."""
    base = EVAL_SCALE.get(kind)
    return None if base is None else (round(base[0] * crop / 512), round(base[1] * crop / 512))


def fit_scale(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with the image's ratio whose long edge is
    at most scale[0] and short edge at most scale[1] (factor = min(long/long, short/short)),
    rounded as mmcv does (int(x * factor + 0.5))."""
    long_, short = max(scale), min(scale)
    factor = min(long_ / max(h, w), short / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


@torch.no_grad()
def slide_scores(model: nn.Module, img: torch.Tensor, crop: int, stride: int | None = None) -> torch.Tensor:
    """Class scores [B, K, H, W] for normalised images [B, 3, H, W]: windows of ``crop``
    every ``stride`` (default: the official test_cfg, 341 for 512 and 683 for 1024), scores of
    overlapping windows averaged. Images smaller than one window are padded at the
    bottom and right and the padding is cut off again."""
    stride = stride or SLIDE_STRIDE.get(crop, max(1, crop * 2 // 3))
    _, _, H, W = img.shape
    x = F.pad(img, (0, max(0, crop - W), 0, max(0, crop - H)))
    Hp, Wp = x.shape[-2:]
    scores = count = None
    for y in window_starts(Hp, crop, stride):
        for x0 in window_starts(Wp, crop, stride):
            out = model(x[:, :, y:y + crop, x0:x0 + crop])
            out = F.interpolate(out.float(), size=(crop, crop), mode="bilinear", align_corners=False)
            if scores is None:
                scores = torch.zeros(out.shape[0], out.shape[1], Hp, Wp, device=out.device)
                count = torch.zeros(1, 1, Hp, Wp, device=out.device)
            scores[:, :, y:y + crop, x0:x0 + crop] += out
            count[:, :, y:y + crop, x0:x0 + crop] += 1
    assert count.min() > 0, "a pixel no window covered"
    return (scores / count)[:, :, :H, :W]


@torch.no_grad()
def predict(model: nn.Module, img: torch.Tensor, crop: int, scale: tuple[int, int] | None = None,
            stride: int | None = None) -> torch.Tensor:
    """Labels [B, H, W] at the image's own resolution, by the official test protocol: the
    image (normalised, [B, 3, H, W]) resized keeping its ratio to fit ``scale`` (bilinear;
    None: as it is), slide-window scores there, resized back bilinearly, argmax."""
    H, W = img.shape[-2:]
    if scale is not None:
        size = fit_scale(H, W, scale)
        if size != (H, W):
            img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
    scores = slide_scores(model, img, crop, stride)
    if scores.shape[-2:] != (H, W):
        scores = F.interpolate(scores, size=(H, W), mode="bilinear", align_corners=False)
    return scores.argmax(1)


def evaluate(model: nn.Module, dataset, crop: int, device, autocast=None, stride: int | None = None,
             scale: tuple[int, int] | None = None, samples: list | None = None, keep: int = 3) -> dict:
    """mIoU and per-class IoU of ``model`` on every image of ``dataset``, labels at full
    resolution; ``scale``: the test resize (default: the official one for the dataset's
    kind at this crop, ``eval_scale``; synthetic domains are used as they are); ``autocast``: a
    context-manager factory for the forward passes. With a ``samples`` list, the first
    ``keep`` (image uint8 [H, W, 3], label, prediction) are appended to it."""
    if scale is None:
        scale = eval_scale(getattr(dataset, "kind", None), crop)
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix()
    for i in range(len(dataset)):
        img, lbl = dataset[i]
        with autocast() if autocast else contextlib.nullcontext():
            pred = predict(model, normalize(img)[None].to(device), crop, scale, stride)
        cm.update(pred[0], lbl.to(device))
        if samples is not None and i < keep:
            samples.append((to_uint8(img), lbl.numpy(), pred[0].cpu().numpy()))
    model.train(was_training)
    return cm.summary()


def evaluate_targets(model: nn.Module, datasets, crop: int, device, out: Path, autocast=None) -> list[str]:
    """Evaluate on every dataset; write ``out/metrics.json`` (``{domain: {"mIoU": ...,
    "per_class": {...}}}``, strict JSON) and ``out/samples/<domain>.png``. A file that
    cannot be read stops that domain only (its entry becomes ``{"mIoU": null, "error":
    ...}``); returns those errors."""
    from .predict import save_samples

    metrics, failed = {}, []
    for ds in datasets:
        try:
            samples = []
            metrics[ds.name] = evaluate(model, ds, crop, device, autocast=autocast, samples=samples)
            save_samples(out / "samples" / f"{ds.name}.png", samples,
                         f"{ds.name}: mIoU {metrics[ds.name]['mIoU']} (image | ground truth | prediction)")
            miou = metrics[ds.name]["mIoU"]
            print(f"  {ds.name:28s} mIoU {'n/a' if miou is None else f'{miou:6.2f}'}")
        except DataError as e:  # keep every other domain's numbers
            metrics[ds.name] = {"mIoU": None, "error": str(e)}
            failed.append(str(e))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    return failed


def main(argv=None) -> int:
    from .predict import add_model_flags, load_model
    from .train.config import OneLineParser

    ap = OneLineParser(prog="rein-evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(ap)
    ap.add_argument("--target", metavar="KIND=PATH", action="append", required=True,
                    help="dataset to evaluate (repeat): cityscapes=..., bdd100k=..., mapillary=..., acdc-fog=...")
    ap.add_argument("--out", required=True, help="output folder (metrics.json, samples/)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for the forward passes")
    args = ap.parse_args(argv)

    from .train.config import UsageError, check_out_folder, device_from_flag
    from .train.loop import datasets_from

    try:
        device = device_from_flag(args.device)
        out = Path(args.out)
        check_out_folder(out, "metrics.json and samples/")
        datasets = datasets_from([(t, "val", "--target") for t in args.target])
        model, config = load_model(args.checkpoint, args.backbone_checkpoint, device, args.fused,
                                   official=dict(backbone=args.backbone, crop=args.crop))
    except (UsageError, DataError) as e:
        print(f"rein-evaluate: {e}", file=sys.stderr)
        return 2
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)  # noqa: E731
    failed = evaluate_targets(model, datasets, config.crop, device, out, amp)
    print(f"rein-evaluate: wrote {out / 'metrics.json'} and {out / 'samples'}/")
    for msg in failed:
        print(f"rein-evaluate: evaluation stopped on a bad file: {msg}", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
