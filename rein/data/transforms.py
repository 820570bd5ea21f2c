"""mmseg's transforms as the official Rein configs use them, on uint8 pixels as there:
the training pipeline (``augment_official``) and the test resize (``rescale``)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .images import MEAN, to_uint8
from .labels import IGNORE


def official_scales(crop: int) -> list[int]:
    """Short-edge choices of the official RandomChoiceResize: int(crop * 0.1 * k), k = 5..20
    (256, 307, ..., 1024 for 512 crops)."""
    return [int(crop * x * 0.1) for x in range(5, 21)]


def _short_edge_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """mmcv's ResizeShortestEdge: short edge to ``short``, the ratio kept, the long edge
    capped at ``max_size``; rounded with int(x + 0.5). Returns (new_h, new_w)."""
    scale = short / min(h, w)
    new_h, new_w = (short, scale * w) if h < w else (scale * h, short)
    if max(new_h, new_w) > max_size:
        f = max_size / max(new_h, new_w)
        new_h, new_w = new_h * f, new_w * f
    return int(new_h + 0.5), int(new_w + 0.5)


def fit_scale(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with the image's ratio whose long edge is
    at most scale[0] and short edge at most scale[1] (factor = min(long/long, short/short)),
    rounded as mmcv does (int(x * factor + 0.5))."""
    long_, short = max(scale), min(scale)
    factor = min(long_ / max(h, w), short / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def rescale(img: Tensor, scale: tuple[int, int]) -> Tensor:
    """mmseg's test ``Resize(scale, keep_ratio=True)``: mmcv's ``imrescale`` with its cv2
    backend, i.e. OpenCV's bilinear resize of the uint8 pixels (rounded to uint8 by
    OpenCV) to ``fit_scale``. ``img``: [3, H, W], uint8 or float in [0, 1] (decoded
    pixels over 255); returns [3, h, w] uint8, the pixels as they are when the size
    does not change."""
    import cv2

    h, w = fit_scale(*img.shape[-2:], scale)
    pixels = to_uint8(img)
    if (h, w) != pixels.shape[:2]:
        pixels = cv2.resize(pixels, (w, h), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)


def _crop_box(lbl: np.ndarray, crop: int, rng: np.random.Generator, cat_max_ratio: float = 0.75):
    """mmseg's RandomCrop: a random crop box, checked up to 10 times and redrawn after each
    failed check (no class may cover ``cat_max_ratio`` or more of the crop's labelled
    pixels, and there must be two classes); after 10 failures the 11th draw stands."""
    h, w = lbl.shape

    def draw():
        return int(rng.integers(0, max(h - crop, 0) + 1)), int(rng.integers(0, max(w - crop, 0) + 1))

    y, x = draw()
    for _ in range(10):
        ids, counts = np.unique(lbl[y:y + crop, x:x + crop], return_counts=True)
        counts = counts[ids != IGNORE]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        y, x = draw()
    return y, x


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on a uint8 RGB image, its defaults and its numpy
    draws: each step with probability 1/2: brightness +-32, contrast x[0.5, 1.5] (before
    or after the colour steps, at random), saturation x[0.5, 1.5] and hue by an integer
    in [-18, 18) (numpy's randint excludes the top; OpenCV's uint8 HSV, H in [0, 180));
    every step rounds back to uint8 as mmseg does."""
    import cv2

    def convert(a, alpha=1.0, beta=0.0):
        return np.clip(a.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-32, 32))
    contrast_first = rng.integers(2) == 1
    if contrast_first and rng.integers(2):
        img = convert(img, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + int(rng.integers(-18, 18))) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and rng.integers(2):
        img = convert(img, alpha=rng.uniform(0.5, 1.5))
    return img


def augment_official(img: Tensor, lbl: Tensor, crop: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The official Rein training pipeline (configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py,
    mmseg transforms): the short edge resized to a random choice of ``official_scales(crop)``
    with the long edge at most 4 x crop (2048 for 512; bilinear image, nearest label), a
    crop x crop random crop with cat_max_ratio 0.75, horizontal flip with probability 1/2,
    PhotoMetricDistortion; then padded to crop x crop (image: the mean colour, 0 once
    normalised; label 255), as the data preprocessor does. Works on uint8 pixels, as mmseg:
    ``img`` is [3, H, W], uint8 or float in [0, 1]."""
    import cv2

    rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=gen)))
    im = to_uint8(img)
    lb = lbl.numpy().astype(np.uint8)
    scales = official_scales(crop)
    h, w = lb.shape
    new_h, new_w = _short_edge_size(h, w, scales[int(rng.integers(len(scales)))], 4 * crop)
    im = cv2.resize(im, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    lb = cv2.resize(lb, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    y, x = _crop_box(lb, crop, rng)
    im, lb = im[y:y + crop, x:x + crop], lb[y:y + crop, x:x + crop]
    if rng.random() < 0.5:
        im, lb = im[:, ::-1], lb[:, ::-1]
    im = _photometric(np.ascontiguousarray(im), rng)
    out_img = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float() / 255
    out_lbl = torch.from_numpy(np.ascontiguousarray(lb)).long()
    ph, pw = crop - out_lbl.shape[0], crop - out_lbl.shape[1]
    if ph or pw:  # the mean colour: 0 once normalised, what the preprocessor pads with
        h, w = out_lbl.shape
        out_img = F.pad(out_img, (0, pw, 0, ph))
        out_img[:, h:, :] = MEAN
        out_img[:, :, w:] = MEAN
        out_lbl = F.pad(out_lbl, (0, pw, 0, ph), value=IGNORE)
    return out_img, out_lbl
