"""mIoU as mmseg computes it, and the evaluation that training and ``rein.evaluate``
write: ``metrics.json`` and sample pictures.

``ConfusionMatrix`` accumulates (label, prediction) counts over the 19 Cityscapes train
classes (ignore 255) and reports IoU per class and their mean, as the DGSS literature.
``evaluate`` scores a model on every image of a dataset by the official test protocol
(``rein.inference``), labels at full resolution.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .data import CLASSES, IGNORE, PALETTE, DataError, colorize, to_uint8
from .inference import eval_scale, predict


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


def evaluate(model: nn.Module, dataset, crop: int, device, autocast=None, stride: int | None = None,
             scale: tuple[int, int] | None = None, samples: list | None = None, keep: int = 3,
             cuda_graphs: bool = True) -> dict:
    """mIoU and per-class IoU of ``model`` on every image of ``dataset``, labels at full
    resolution; ``scale``: the test resize (default: the official one for the dataset's
    kind at this crop, ``eval_scale``; synthetic domains are used as they are); ``autocast``: a
    context-manager factory for the forward passes. With a ``samples`` list, the first
    ``keep`` (image uint8 [H, W, 3], label, prediction) are appended to it. On CUDA the
    sliding windows replay one recorded graph (``cuda_graphs=False``: not)."""
    if scale is None:
        scale = eval_scale(getattr(dataset, "kind", None), crop)
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix()
    for i in range(len(dataset)):
        img, lbl = dataset[i]
        with autocast() if autocast else contextlib.nullcontext():
            pred = predict(model, img, crop, scale, stride, device, cuda_graphs)
        cm.update(pred, lbl.to(device))
        if samples is not None and i < keep:
            samples.append((to_uint8(img), lbl.numpy(), pred.cpu().numpy()))
    model.train(was_training)
    return cm.summary()


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


def evaluate_targets(model: nn.Module, datasets, crop: int, device, out: Path, autocast=None,
                     cuda_graphs: bool = True) -> list[str]:
    """Evaluate on every dataset; write ``out/metrics.json`` (``{domain: {"mIoU": ...,
    "per_class": {...}}}``, strict JSON) and ``out/samples/<domain>.png``. A file that
    cannot be read stops that domain only (its entry becomes ``{"mIoU": null, "error":
    ...}``); returns those errors."""
    metrics, failed = {}, []
    for ds in datasets:
        try:
            samples = []
            metrics[ds.name] = evaluate(model, ds, crop, device, autocast=autocast, samples=samples,
                                        cuda_graphs=cuda_graphs)
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
