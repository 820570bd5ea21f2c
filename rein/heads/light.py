"""``LightHead``: a light FPN-style decode head. Each level is projected by a 1x1 conv,
resampled to stride 4 and summed; one 3x3 conv and a per-pixel classifier follow. It is
trained with per-pixel cross-entropy; its scores are the logits at stride 4."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255


def _conv_gn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: per-sample statistics keep data-parallel training exact
    # without SyncBatchNorm (which needs CUDA).
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(8, cout),
                         nn.ReLU(inplace=True))


def pixel_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy at label resolution, averaged over the valid (non-255) pixels of the
    whole global batch: under DDP (which averages gradients over the processes) the
    gradient equals the single-process one."""
    out = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(out, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    n_valid = (labels != IGNORE_INDEX).sum().float()
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        dist.all_reduce(n_valid)
    return total * world / n_valid.clamp_min(1)


class LightHead(nn.Module):
    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 128):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = _conv_gn_relu(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[Tensor], queries: Tensor | None = None) -> Tensor:
        size = features[0].shape[-2:]
        x = sum(
            F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False)
            for lat, f in zip(self.lateral, features)
        )
        return self.classifier(self.fuse(x))

    def loss(self, out: Tensor, labels: Tensor) -> Tensor:
        return pixel_cross_entropy(out, labels)

    def captured_loss(self, **compile_kw):
        """``loss`` torch.compiled (``mode="reduce-overhead"``: one CUDA graph)."""
        return torch.compile(self.loss, **compile_kw)

    def scores(self, out: Tensor, size=None) -> Tensor:
        return out
