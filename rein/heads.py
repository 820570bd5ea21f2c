"""Segmentation heads over ReinBackbone's outputs ((features, queries)).

* ``LightHead``: a light FPN-style decode head: each level projected by a 1x1 conv,
  resampled to stride 4, summed, one 3x3 conv, a per-pixel classifier.
* ``QueryHead``: mask classification driven by Rein's queries, as the recipe links
  Rein's tokens to Mask2Former's queries: the queries [m, Q] attend to the stride-16/32
  features through a few transformer decoder layers, then give class scores (with a
  "no object" class) and mask embeddings; masks are their dot products with stride-4
  pixel embeddings, and the semantic map is sum_q softmax(class_q) * sigmoid(mask_q).
  It is trained per pixel on that semantic map (no Hungarian matching): a light
  stand-in for Mask2Former, not a reimplementation of it.

Both return logits-like maps [B, K, H/4, W/4]; ``segmentation_loss`` and ``predict``
take care of the difference.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255


def _conv_gn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: per-sample statistics keep data-parallel training exact
    # without SyncBatchNorm (which needs CUDA).
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(8, cout),
                         nn.ReLU(inplace=True))


class LightHead(nn.Module):
    kind = "logits"

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


class QueryHead(nn.Module):
    kind = "probs"

    def __init__(self, in_channels: list[int], num_classes: int, query_dims: int = 256, num_layers: int = 2,
                 num_heads: int = 8):
        super().__init__()
        Q = query_dims
        self.pixel = nn.Sequential(nn.Conv2d(in_channels[0], Q, 1), nn.GroupNorm(8, Q), nn.ReLU(inplace=True),
                                   nn.Conv2d(Q, Q, 1))
        self.memory_proj = nn.ModuleList(nn.Conv2d(c, Q, 1) for c in in_channels[2:])
        layer = nn.TransformerDecoderLayer(Q, num_heads, dim_feedforward=4 * Q, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers)
        self.class_embed = nn.Linear(Q, num_classes + 1)  # + "no object"
        self.mask_embed = nn.Sequential(nn.Linear(Q, Q), nn.ReLU(inplace=True), nn.Linear(Q, Q))

    def forward(self, features: list[Tensor], queries: Tensor | None = None) -> Tensor:
        if queries is None:
            raise ValueError("QueryHead needs Rein's queries: build the backbone with link_token_to_query=True")
        B = features[0].shape[0]
        memory = torch.cat([p(f).flatten(2).transpose(1, 2) for p, f in zip(self.memory_proj, features[2:])], 1)
        q = self.decoder(queries.unsqueeze(0).expand(B, -1, -1), memory)  # [B, m, Q]
        cls = self.class_embed(q).softmax(-1)[..., :-1]  # [B, m, K]
        masks = torch.einsum("bmq,bqhw->bmhw", self.mask_embed(q), self.pixel(features[0])).sigmoid()
        return torch.einsum("bmk,bmhw->bkhw", cls, masks)


def segmentation_loss(head_out: Tensor, labels: Tensor, kind: str, reduction: str = "mean") -> Tensor:
    """Per-pixel cross-entropy at label resolution, ignoring IGNORE_INDEX."""
    out = F.interpolate(head_out, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if kind == "probs":
        return F.nll_loss(torch.log(out.clamp_min(1e-6)), labels, ignore_index=IGNORE_INDEX, reduction=reduction)
    return F.cross_entropy(out, labels, ignore_index=IGNORE_INDEX, reduction=reduction)


def build_head(name: str, in_channels: list[int], num_classes: int, query_dims: int = 256) -> nn.Module:
    if name == "light":
        return LightHead(in_channels, num_classes)
    if name == "query":
        return QueryHead(in_channels, num_classes, query_dims)
    raise ValueError(f"unknown head {name!r}: choose 'light' or 'query'")
