"""Synthetic street scenes: procedurally generated images (sky, buildings, road, sidewalk,
terrain, vegetation, poles, signs, cars, people) with their labels, rendered in one of
several styles. ``source`` is a flat, saturated "game engine" look; the targets shift
colours, textures, lighting, fog and noise. Made by this package: no download."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

# A base colour per class (RGB in [0, 1]) for the source style.
_PALETTE = {0: (0.45, 0.42, 0.48), 1: (0.75, 0.62, 0.70), 2: (0.55, 0.35, 0.25), 5: (0.85, 0.85, 0.2),
            7: (0.95, 0.75, 0.1), 8: (0.15, 0.65, 0.15), 9: (0.55, 0.75, 0.35), 10: (0.35, 0.65, 0.95),
            11: (0.9, 0.15, 0.3), 13: (0.1, 0.1, 0.85)}


@dataclass(frozen=True)
class Style:
    hue_shift: float = 0.0     # rotates the palette (radians in the RGB colour circle)
    saturation: float = 1.0
    brightness: float = 1.0
    texture: float = 0.02      # amplitude of per-pixel texture
    noise: float = 0.0         # sensor noise
    fog: float = 0.0           # blend towards grey with distance
    tint: tuple = (1.0, 1.0, 1.0)


STYLES = {
    "source": Style(),
    "overcast": Style(hue_shift=0.5, saturation=0.55, brightness=0.9, texture=0.08, noise=0.02),
    "night": Style(hue_shift=-0.3, saturation=0.7, brightness=0.35, texture=0.05, noise=0.08,
                   tint=(0.7, 0.8, 1.3)),
    "fog": Style(hue_shift=0.2, saturation=0.8, brightness=1.05, texture=0.05, noise=0.03, fog=0.6),
}


def _rotate_hue(rgb: np.ndarray, angle: float) -> np.ndarray:
    # rotation about the grey axis
    c, s = np.cos(angle), np.sin(angle)
    k = np.ones(3) / np.sqrt(3)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    R = np.eye(3) * c + s * K + (1 - c) * np.outer(k, k)
    return rgb @ R.T


def render_scene(size: int, style: Style, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: (image [H, W, 3] float32 in [0, 1], label [H, W] int64 train ids)."""
    H = W = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    lbl = np.full((H, W), 10, dtype=np.int64)  # sky
    horizon = int(H * rng.uniform(0.35, 0.55))
    ground = yy >= horizon
    lbl[ground] = 9  # terrain
    # road: a trapezoid towards a vanishing point
    vx = W * rng.uniform(0.35, 0.65)
    t = np.clip((yy - horizon) / max(H - horizon, 1), 0, 1)
    half = (0.04 + t * rng.uniform(0.45, 0.7)) * W
    road = ground & (np.abs(xx - vx) < half)
    side = ground & ~road & (np.abs(xx - vx) < half * rng.uniform(1.25, 1.6))
    lbl[side] = 1
    lbl[road] = 0
    # buildings along the horizon
    x = 0.0
    while x < W:
        w = W * rng.uniform(0.08, 0.25)
        h = H * rng.uniform(0.1, 0.35)
        if rng.random() < 0.75:
            lbl[(xx >= x) & (xx < x + w) & (yy >= horizon - h) & (yy < horizon)] = 2
        x += w
    # trees
    for _ in range(rng.integers(1, 4)):
        cx, cy, r = W * rng.random(), horizon - H * rng.uniform(0.0, 0.15), W * rng.uniform(0.05, 0.12)
        lbl[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = 8
    # poles with a sign
    for _ in range(rng.integers(1, 3)):
        px = vx + rng.choice([-1, 1]) * half.max() * rng.uniform(0.9, 1.3)
        top = horizon - H * rng.uniform(0.1, 0.3)
        base = horizon + H * rng.uniform(0.05, 0.3)
        lbl[(np.abs(xx - px) < max(1.0, W * 0.008)) & (yy > top) & (yy < base)] = 5
        lbl[(np.abs(xx - px) < W * 0.03) & (yy > top) & (yy < top + H * 0.04)] = 7
    # cars on the road, people on the sidewalk
    for _ in range(rng.integers(1, 4)):
        cy = horizon + (H - horizon) * rng.uniform(0.2, 0.9)
        scale = (cy - horizon) / max(H - horizon, 1)
        cw, ch = W * (0.06 + 0.2 * scale), H * (0.04 + 0.12 * scale)
        cx = vx + rng.uniform(-0.6, 0.6) * (0.04 + scale * 0.5) * W
        lbl[(np.abs(xx - cx) < cw / 2) & (yy > cy - ch) & (yy < cy)] = 13
    for _ in range(rng.integers(0, 3)):
        cy = horizon + (H - horizon) * rng.uniform(0.2, 0.9)
        scale = (cy - horizon) / max(H - horizon, 1)
        ph, pw = H * (0.05 + 0.2 * scale), W * (0.01 + 0.03 * scale)
        px = vx + rng.choice([-1, 1]) * (0.04 + scale * 0.6) * W * rng.uniform(1.0, 1.3)
        lbl[(np.abs(xx - px) < pw) & (yy > cy - ph) & (yy < cy)] = 11

    palette = np.zeros((19, 3), dtype=np.float32)
    for k, c in _PALETTE.items():
        palette[k] = c
    palette = _rotate_hue(palette, style.hue_shift)
    grey = palette.mean(1, keepdims=True)
    palette = grey + style.saturation * (palette - grey)
    palette = palette * (1 + rng.uniform(-0.08, 0.08, size=(19, 3)))  # per-image colour jitter
    img = palette[lbl]
    freq = rng.uniform(0.2, 0.6)
    img += style.texture * np.sin(freq * xx + 3 * np.sin(freq * yy))[..., None]
    img += style.texture * rng.standard_normal((H, W, 1))
    if style.fog:
        depth = np.clip(1 - np.abs(yy - horizon) / (0.6 * H), 0, 1)[..., None]
        img = img * (1 - style.fog * depth) + style.fog * depth * 0.75
    img = img * style.brightness * np.asarray(style.tint, dtype=np.float32)
    img += style.noise * rng.standard_normal((H, W, 3))
    return np.clip(img, 0, 1).astype(np.float32), lbl


class SyntheticDomain:
    """``n`` synthetic scenes of ``size`` pixels in one style; item i is a pure function of
    (seed, i), so every process and every resumed run sees the same data."""

    def __init__(self, style: str, n: int, size: int, seed: int):
        if style not in STYLES:
            raise DataError(f"unknown synthetic style {style!r}: choose from {sorted(STYLES)}")
        self.name = f"synthetic-{style}"
        self.style, self.n, self.size, self.seed = STYLES[style], n, size, seed

    def __len__(self) -> int:
        return self.n

    def check(self, sample: int = 0) -> None:
        return None

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, i])
        img, lbl = render_scene(self.size, self.style, rng)
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.from_numpy(lbl)


# The synthetic default run's sets: 400 training scenes in the source style and 12 per
# validation domain. rein.train trains and evaluates on them; rein.evaluate --target
# synthetic evaluates a checkpoint on the same validation scenes.
TRAIN_SIZE, VAL_SIZE = 400, 12


def synthetic_train(size: int) -> SyntheticDomain:
    return SyntheticDomain("source", TRAIN_SIZE, size, seed=1)


def synthetic_validation(size: int) -> list[SyntheticDomain]:
    """The source style and the overcast, night and fog target styles, at ``size`` pixels."""
    return [SyntheticDomain("source", VAL_SIZE, size, seed=2)] + [
        SyntheticDomain(s, VAL_SIZE, size, seed=3 + i) for i, s in enumerate(["overcast", "night", "fog"])]
