"""Data for domain-generalised semantic segmentation.

* ``SyntheticDomain``: procedurally generated street-scene-like images (sky, buildings,
  road, sidewalk, terrain, vegetation, poles, signs, cars, people) rendered in one of
  several styles. ``source`` is a flat, saturated "game engine" look; the targets shift
  colours, textures, lighting, fog and noise. The data is synthetic and made by this
  package; it needs no download.
* Loaders for the directory layouts the DGSS literature uses: GTAV, Cityscapes,
  BDD100K, Mapillary Vistas v1.2 and ACDC (fog, night, rain, snow), all mapped to the 19
  Cityscapes train classes with ignore index 255.
* ``augment_official``: the official Rein training pipeline (random short-edge resize,
  crop with cat_max_ratio, flip, mmseg's PhotoMetricDistortion), driven by a seed drawn
  from a torch.Generator so that a resumed run sees exactly the same batches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = 255
CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class DataError(ValueError):
    """Bad dataset on disk: raised before training starts, naming the file or folder."""


def _lut(pairs: dict[int, int], known: range | list[int]) -> np.ndarray:
    """A 256-entry lookup: known ids map to train ids (or 255); unknown ids map to -1."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[list(known)] = IGNORE
    for k, v in pairs.items():
        lut[k] = v
    lut[IGNORE] = IGNORE
    return lut


# Cityscapes label ids -> train ids; GTAV uses the same label ids.
_CITYSCAPES_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                   26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# Mapillary Vistas v1.2 (66 classes) -> Cityscapes train ids, exactly as the official Rein
# code's tools/convert_datasets/mapillary2cityscape.py derives it from the v1.2 class names:
# road <- bike lane, crosswalk (plain), parking, road, service lane, lane markings (crosswalk,
# general); sidewalk <- curb, curb cut, pedestrian area, sidewalk; pole <- street light, pole,
# utility pole; traffic sign <- frame, back, front; rider <- bicyclist, motorcyclist, other
# rider; train <- on rails; the other 19 names as themselves; everything else ignored.
_MAPILLARY_IDS = {2: 1, 3: 4, 6: 3, 7: 0, 8: 0, 9: 1, 10: 0, 11: 1, 13: 0, 14: 0, 15: 1, 17: 2, 19: 11, 20: 12,
                  21: 12, 22: 12, 23: 0, 24: 0, 27: 10, 29: 9, 30: 8, 44: 5, 45: 5, 46: 7, 47: 5, 48: 6, 49: 7,
                  50: 7, 52: 18, 54: 15, 55: 13, 57: 17, 58: 16, 61: 14}
_TRAIN_IDS = _lut({i: i for i in range(19)}, range(19))  # files that hold train ids already
LUTS = {
    "gtav": _lut(_CITYSCAPES_IDS, range(34)),
    "train_ids": _TRAIN_IDS,  # GTAV's *_labelTrainIds.png, from the official converter
    "cityscapes": _lut(_CITYSCAPES_IDS, range(34)),
    "bdd100k": _TRAIN_IDS,  # its masks hold train ids
    "mapillary": _lut(_MAPILLARY_IDS, range(66)),
    **{k: _lut(_CITYSCAPES_IDS, range(34)) for k in ("acdc-fog", "acdc-night", "acdc-rain", "acdc-snow")},
}


# ---------------------------------------------------------------------------- real datasets

ACDC_KINDS = ("acdc-fog", "acdc-night", "acdc-rain", "acdc-snow")
KINDS = ("gtav", "cityscapes", "bdd100k", "mapillary", *ACDC_KINDS)


def _prefer_train_ids(label_ids: Path) -> Path:
    """The ``*_labelTrainIds.png`` next to a ``*_labelIds.png`` when it exists (its ids are
    train ids: ``FolderDataset`` reads each file by its suffix)."""
    train_ids = label_ids.with_name(label_ids.name.replace("_labelIds.png", "_labelTrainIds.png"))
    return train_ids if train_ids.is_file() else label_ids


def _pairs(kind: str, root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) paths in the dataset's standard layout."""
    if kind == "gtav":
        # labels/NNNNN.png (Cityscapes label ids), or the official converter's
        # labels/NNNNN_labelTrainIds.png (train ids) where it has been run
        img_dir, lbl_dir = root / "images", root / "labels"
        need = [img_dir, lbl_dir]

        def find():
            pairs = []
            for p in sorted(img_dir.glob("*.png")):
                converted = lbl_dir / f"{p.stem}_labelTrainIds.png"
                pairs.append((p, converted if converted.is_file() else lbl_dir / p.name))
            return pairs
    elif kind == "cityscapes":
        # gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (the official configs read these,
        # made by cityscapesscripts) where present, else *_gtFine_labelIds.png
        img_dir, lbl_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        need = [img_dir, lbl_dir]
        find = lambda: [  # noqa: E731
            (p, _prefer_train_ids(lbl_dir / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")))
            for p in sorted(img_dir.glob("*/*_leftImg8bit.png"))]
    elif kind in ACDC_KINDS:
        # rgb_anon/<condition>/<split>/<sequence>/*_rgb_anon.png and gt/<condition>/<split>/
        # <sequence>/*_gt_labelTrainIds.png (what the official configs read) or *_gt_labelIds.png
        cond = kind.removeprefix("acdc-")
        img_dir, lbl_dir = root / "rgb_anon" / cond / split, root / "gt" / cond / split
        need = [img_dir, lbl_dir]
        find = lambda: [  # noqa: E731
            (p, _prefer_train_ids(lbl_dir / p.parent.name / p.name.replace("_rgb_anon.png", "_gt_labelIds.png")))
            for p in sorted(img_dir.glob("*/*_rgb_anon.png"))]
    elif kind == "bdd100k":
        img_dir, lbl_dir = root / "images" / "10k" / split, root / "labels" / "sem_seg" / "masks" / split
        need = [img_dir, lbl_dir]
        find = lambda: [(p, lbl_dir / (p.stem + ".png")) for p in sorted(img_dir.glob("*.jpg"))]  # noqa: E731
    elif kind == "mapillary":
        sub = {"train": "training", "val": "validation"}[split]
        img_dir, lbl_dir = root / sub / "images", root / sub / "labels"
        need = [img_dir, lbl_dir]
        find = lambda: [(p, lbl_dir / (p.stem + ".png")) for p in sorted(img_dir.glob("*.jpg"))]  # noqa: E731
    else:
        raise DataError(f"unknown dataset kind {kind!r}: choose one of {', '.join(KINDS)}")
    for d in need:
        if not d.is_dir():
            raise DataError(f"{kind}: missing folder {d} (expected the standard {kind} layout under {root})")
    pairs = find()
    if not pairs:
        raise DataError(f"{kind}: no images found under {img_dir}")
    missing = [str(lbl) for _, lbl in pairs if not lbl.is_file()]
    if missing:
        raise DataError(f"{kind}: {len(missing)} images have no label file, e.g. {missing[0]}")
    return pairs


def read_image(path: Path, kind: str = "image", half: bool = False, uint8: bool = False) -> Tensor:
    """An RGB image file as a float tensor [3, H, W] in [0, 1] (``uint8``: its pixels as
    decoded, [3, H, W] uint8); a file that cannot be decoded
    (truncated, corrupt, not an image) raises DataError naming it. Decoded by PIL:
    torchvision.io was 15% faster on a 1914x1052 GTAV-sized PNG (29 vs 34 ms, the same
    pixels) but is deprecated since torchvision 0.29; the loader's worker processes hide
    the difference."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if half:  # as the official mapillary_resize.py: PIL bicubic to (W // 2, H // 2)
                im = im.resize((im.width // 2, im.height // 2), Image.BICUBIC)
            arr = np.array(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{kind}: cannot read image {path} ({e}); replace or remove the file") from None
    pixels = torch.from_numpy(arr).permute(2, 0, 1)
    return pixels if uint8 else pixels.float() / 255


class FolderDataset:
    """A real dataset on disk; items are (image [3, H, W] float in [0, 1], label [H, W] long),
    or with ``uint8`` the image's pixels as decoded ([3, H, W] uint8: what the training
    pipeline works on, without a round trip through floats)."""

    def __init__(self, kind: str, root: str | os.PathLike, split: str, uint8: bool = False):
        from PIL import Image  # noqa: F401  (pillow is needed; fail here, not mid-training)

        self.kind, self.root, self.split, self.uint8 = kind, Path(root), split, uint8
        self.pairs = _pairs(kind, self.root, split)
        self.lut = LUTS[kind]
        self.name = kind
        # The official protocol evaluates Mapillary on half-resolution validation images
        # and labels (its tools/convert_datasets/mapillary_resize.py): done here on load.
        self.half = kind == "mapillary" and split == "val"

    def __len__(self) -> int:
        return len(self.pairs)

    def check(self, sample: int = 32) -> None:
        """Before training: every image/label size (headers only), and the label ids of up
        to ``sample`` files spread over the set. Every label is checked again when loaded."""
        from PIL import Image

        for img, lbl in self.pairs:
            try:
                with Image.open(img) as a, Image.open(lbl) as b:
                    sizes = a.size, b.size
            except (OSError, ValueError, SyntaxError) as e:
                raise DataError(f"{self.kind}: cannot read {img} or {lbl} ({e}); replace or remove the file") from None
            if sizes[0] != sizes[1]:
                raise DataError(f"{self.kind}: image {img} is {sizes[0]} but its label {lbl} is {sizes[1]}")
        step = max(1, len(self.pairs) // sample)
        for i in range(0, len(self.pairs), step):
            self._label(self.pairs[i][1])

    def _lut_for(self, path: Path) -> np.ndarray:
        return LUTS["train_ids"] if path.name.endswith("_labelTrainIds.png") else self.lut

    def _label(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as im:
                if self.half:
                    im = im.resize((im.width // 2, im.height // 2), Image.NEAREST)
                raw = np.asarray(im)
        except (OSError, ValueError, SyntaxError) as e:  # truncated, corrupt, not an image
            raise DataError(f"{self.kind}: cannot read label {path} ({e}); replace or remove the file") from None
        if raw.ndim != 2:
            raise DataError(f"{self.kind}: label {path} has shape {raw.shape}; expected one id per pixel")
        mapped = self._lut_for(path)[raw]
        if (mapped < 0).any():
            bad = sorted(set(np.unique(raw[mapped < 0]).tolist()))
            raise DataError(f"{self.kind}: label {path} holds unknown ids {bad[:10]}")
        return mapped.astype(np.int64)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img_path, lbl_path = self.pairs[i]
        img = read_image(img_path, self.kind, self.half, self.uint8)
        lbl = torch.from_numpy(self._label(lbl_path))
        if img.shape[-2:] != lbl.shape:
            raise DataError(f"{self.kind}: image {img_path} and label {lbl_path} differ in size")
        return img, lbl


# ---------------------------------------------------------------------------- synthetic domains

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


# ---------------------------------------------------------------------------- augmentation


def to_uint8(img: Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> uint8 [H, W, 3]; exact for decoded images (multiples of 1/255)."""
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


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
    im = img.permute(1, 2, 0).numpy() if img.dtype == torch.uint8 else to_uint8(img)
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


def normalize(img: Tensor) -> Tensor:
    return (img - MEAN.to(img.device)) / STD.to(img.device)


# ---------------------------------------------------------------------------- training batches


class TrainBatches(torch.utils.data.Dataset):
    """Item ``it``: this process's share of the global batch of iteration ``it`` (normalised
    images [b, 3, crop, crop], labels [b, crop, crop]), a pure function of (seed, it, rank).
    Any DataLoader worker, any process under torchrun and a resumed run build exactly the
    same batch. A file that cannot be read gives ``{"error": message}`` instead of raising,
    so the training loop can save its state and name the file."""

    def __init__(self, dataset, batch_size: int, crop: int, seed: int, rank: int = 0, world: int = 1):
        self.dataset, self.batch_size, self.crop, self.seed = dataset, batch_size, crop, seed
        self.rank, self.per = rank, batch_size // world

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, it: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + it)
        idx = torch.randint(0, len(self.dataset), (self.batch_size,), generator=gen).tolist()
        seeds = torch.randint(0, 2**62, (self.batch_size,), generator=gen).tolist()
        lo, hi = self.rank * self.per, (self.rank + 1) * self.per
        imgs, lbls = [], []
        try:
            for i, s in zip(idx[lo:hi], seeds[lo:hi]):
                img, lbl = self.dataset[i]
                img, lbl = augment_official(img, lbl, self.crop, torch.Generator().manual_seed(s))
                imgs.append(normalize(img))
                lbls.append(lbl)
        except DataError as e:
            return {"error": str(e)}
        return torch.stack(imgs), torch.stack(lbls)


def train_loader(batches: TrainBatches, start: int, stop: int, workers: int, pin_memory: bool):
    """Batches of iterations start..stop-1 in order, built by ``workers`` processes (0: in
    this one), pinned for an asynchronous copy to the GPU, prefetched ahead."""
    return torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(start, stop), num_workers=workers, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if workers else None)
