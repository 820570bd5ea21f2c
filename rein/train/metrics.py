"""Mean IoU over the 19 Cityscapes train classes, as the DGSS literature reports it."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .data import CLASSES, IGNORE


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
        """{"mIoU": percent, "per_class": {name: percent or None}} (mean over classes present)."""
        iou = self.iou()
        present = ~torch.isnan(iou)
        miou = float(iou[present].mean() * 100) if present.any() else float("nan")
        per = {n: (None if math.isnan(v) else round(v * 100, 2)) for n, v in zip(names, iou.tolist())}
        return {"mIoU": round(miou, 2), "per_class": per}
