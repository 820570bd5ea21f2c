"""Segmentation heads over ReinBackbone's outputs ``(features, queries)``.

Every head has the same three-part interface, used by training, evaluation and
prediction alike:

* ``head(features, queries)``: the raw output (whatever the head's loss needs);
* ``head.loss(out, labels)``: this process's training loss against [B, H, W] train-id
  labels (255 ignored); under DDP each head normalises as its reference implementation
  does, and DDP averages the gradients;
* ``head.scores(out, size)``: per-class scores [B, K, h, w] whose argmax is the
  prediction (``size``: the input's (H, W), for heads that resample to it).

Heads: ``mask2former`` (the published head, ``rein.heads.mask2former``) and ``light``
(a small FPN decode head trained per pixel: fast, for smoke runs and the synthetic
default).
"""
from __future__ import annotations

import torch.nn as nn

from .light import IGNORE_INDEX, LightHead

HEADS = ("mask2former", "light")


def build_head(name: str, in_channels: list[int], num_classes: int, **kwargs) -> nn.Module:
    """``mask2former`` takes the ``Mask2FormerHead`` keyword arguments (``query_dims`` must
    equal the backbone's Rein ``query_dims``)."""
    if name == "light":
        return LightHead(in_channels, num_classes)
    if name == "mask2former":
        from .mask2former import Mask2FormerHead

        return Mask2FormerHead(in_channels, num_classes, **kwargs)
    if name == "query":
        raise ValueError("head 'query' (a per-pixel stand-in for Mask2Former) was replaced by the real "
                         "'mask2former' head; retrain with --head mask2former or --head light")
    raise ValueError(f"unknown head {name!r}: choose one of {', '.join(HEADS)}")


__all__ = ["HEADS", "IGNORE_INDEX", "LightHead", "build_head"]
