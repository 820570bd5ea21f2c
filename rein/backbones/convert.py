"""Weight conversion as the official Rein code does it (``tools/convert_models/`` of
w1oves/Rein for DINOv2 and EVA02 release-format checkpoints; the loading code of its
``rein/models/backbones/clip.py`` for OpenAI CLIP weights).

The released Rein models were trained on backbone weights converted by plain bicubic
interpolation (``F.interpolate(mode="bicubic", align_corners=False)``, no antialias, no
gain correction):

* the patch-embedding kernel, 14x14 -> 16x16, on the weights as they are (so its sum
  grows by about (16/14)^2);
* the position grid, e.g. 37x37 -> 32x32 for 512 crops or 64x64 for 1024, with the
  cls position (the first row) kept as it is.

timm's own conversion (``checkpoint_filter_fn``) resamples the kernel by a pseudo-
inverse and the grid with antialiasing, which changes a ViT-L's features by 23-47%
(relative norm) against the official conversion: Rein tokens trained on one see other
features under the other. ``official_resize`` applies the official rules to a
release-format state dict; timm's filter then only renames keys (the shapes already fit,
so it resamples nothing).

OpenAI CLIP weights (``visual.*`` keys) have no official converter; the official CLIP
backbone resamples them when it loads them: the ``conv1`` kernel bicubic, the position
grid *bilinear* (both without antialias, the class position kept). ``official_resize_clip``
does the same.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

CONVERSIONS = ("official", "timm")


def _resize_kernel(w: Tensor, patch: tuple[int, int]) -> Tensor:
    """A patch-embedding kernel resampled to ``patch`` as the official code does: bicubic
    on the weights as they are (align_corners=False, no antialias, no gain correction)."""
    return F.interpolate(w.float(), size=tuple(patch), mode="bicubic", align_corners=False)


def _resize_grid(key: str, pos: Tensor, prefix: int, grid: tuple[int, int], mode: str, expected: str) -> Tensor:
    """Positions [N, C] (the state dict's ``key``): the first ``prefix`` kept, the square
    grid after them resampled to ``grid`` by ``mode`` (align_corners=False, no antialias);
    ``pos`` itself when the grid already has that size. ``expected`` says what the layout
    should have been."""
    n, C = pos.shape
    side = math.isqrt(n - prefix)
    if side * side != n - prefix:
        raise ValueError(f"{key} has {n} positions: expected {expected}")
    if (side, side) == tuple(grid):
        return pos
    g = pos[prefix:].reshape(1, side, side, C).permute(0, 3, 1, 2)
    g = F.interpolate(g.float(), size=tuple(grid), mode=mode, align_corners=False)
    return torch.cat([pos[:prefix].float(), g.permute(0, 2, 3, 1).reshape(-1, C)])


def official_resize(state: dict[str, Tensor], patch: tuple[int, int], grid: tuple[int, int]) -> dict[str, Tensor]:
    """The official converter's two resizes on a release-format state dict: the patch
    kernel to ``patch`` and the position grid (after its one cls position) to ``grid``,
    each by bicubic interpolation without antialias. Returns a new dict; tensors already
    of the target size are left as they are."""
    out = dict(state)
    w = out.get("patch_embed.proj.weight")
    if w is not None and tuple(w.shape[-2:]) != tuple(patch):
        out["patch_embed.proj.weight"] = _resize_kernel(w, patch)
    pos = out.get("pos_embed")
    if pos is not None:
        # release files (and timm's own, for models with a cls position) carry one cls
        # position before the grid; timm's files for register models carry none
        n = pos.shape[1]
        prefix = 0 if math.isqrt(n) ** 2 == n else 1
        out["pos_embed"] = _resize_grid("pos_embed", pos[0], prefix, grid, "bicubic",
                                        "a square grid after at most one cls position")[None]
    return out


def official_resize_clip(state: dict[str, Tensor], patch: tuple[int, int], grid: tuple[int, int]) -> dict[str, Tensor]:
    """The official CLIP backbone's resizes (``CLIPVisionTransformer.init_weights``) on an
    OpenAI-format state dict: ``visual.conv1.weight`` bicubic to ``patch``,
    ``visual.positional_embedding`` [1 + n*n, C]: its class position kept, the n x n grid
    resampled bilinearly to ``grid`` (align_corners=False, no antialias)."""
    out = dict(state)
    w = out.get("visual.conv1.weight")
    if w is not None and tuple(w.shape[-2:]) != tuple(patch):
        out["visual.conv1.weight"] = _resize_kernel(w, patch)
    pos = out.get("visual.positional_embedding")
    if pos is not None:
        out["visual.positional_embedding"] = _resize_grid("visual.positional_embedding", pos, 1, grid, "bilinear",
                                                          "1 + a square grid")
    return out
