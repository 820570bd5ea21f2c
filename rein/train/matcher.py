"""Where ``rein.train``'s Mask2Former loss solves its Hungarian matching (``--matcher``):
on the device (``rein_kernels.assign``, one launch, no wait for the GPU) or on the host
(scipy, as the official code)."""
from __future__ import annotations

import torch
import torch.nn as nn

import rein_kernels

from ..errors import UsageError
from ..heads.mask2former_loss import StaticMask2FormerLoss


def _queries(model) -> int:
    """The Mask2Former head's queries: Rein's tokens (ConvNeXt: one Rein per stage, alike)."""
    rein = model.backbone.rein
    return (rein[0] if isinstance(rein, nn.ModuleList) else rein).token_length


def set_matcher(model, matcher: str, device) -> None:
    """Where the Mask2Former loss matches (``--matcher``); "device" where it cannot run
    there is a usage error, not a failure at the first step."""
    criterion = getattr(model.head, "criterion", None)
    if not isinstance(criterion, StaticMask2FormerLoss):
        return
    if matcher == "device":
        queries = _queries(model)
        if not rein_kernels.is_available(torch.empty(0, device=device)):
            raise UsageError(f"--matcher device: the matching kernel needs a CUDA GPU (this run is on "
                             f"{device.type}); use --matcher host or auto")
        if criterion.num_classes >= queries:
            raise UsageError(f"--matcher device needs fewer classes than queries, got {criterion.num_classes} "
                             f"classes and {queries} queries (Rein's tokens); use --matcher host or auto")
    criterion.matcher = matcher


def matches_on_device(model, device) -> bool:
    """Whether the run's Mask2Former loss matches on the device (for the first lines)."""
    criterion = getattr(model.head, "criterion", None)
    if not isinstance(criterion, StaticMask2FormerLoss):
        return False
    queries = _queries(model)
    return criterion.matches_on_device(torch.empty(0, queries, criterion.num_classes + 1, device=device))
