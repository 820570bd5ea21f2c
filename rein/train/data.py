"""Data for domain-generalised semantic segmentation.

* ``SyntheticDomain``: procedurally generated street-scene-like images (sky, buildings,
  road, sidewalk, terrain, vegetation, poles, signs, cars, people) rendered in one of
  several styles. ``source`` is a flat, saturated "game engine" look; the targets shift
  colours, textures, lighting, fog and noise. The data is synthetic and made by this
  package; it needs no download.
* Loaders for the directory layouts the DGSS literature uses: GTAV, Cityscapes,
  BDD100K and Mapillary Vistas v1.2, all mapped to the 19 Cityscapes train classes with
  ignore index 255.
* ``augment``: random resize, crop, flip and photometric jitter, driven by a
  torch.Generator so that a resumed run sees exactly the same batches.
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
# Mapillary Vistas v1.2 (66 classes) -> Cityscapes train ids, the mapping of the DGSS literature.
_MAPILLARY_IDS = {2: 1, 3: 4, 6: 3, 7: 1, 9: 1, 11: 1, 13: 0, 14: 0, 15: 1, 17: 2, 19: 11, 20: 12, 21: 12, 22: 12,
                  24: 0, 26: 9, 27: 10, 29: 9, 30: 8, 43: 0, 44: 5, 45: 5, 46: 5, 47: 5, 48: 6, 50: 7, 52: 18,
                  54: 15, 55: 13, 57: 17, 58: 16, 61: 14}
LUTS = {
    "gtav": _lut(_CITYSCAPES_IDS, range(34)),
    "cityscapes": _lut(_CITYSCAPES_IDS, range(34)),
    "bdd100k": _lut({i: i for i in range(19)}, range(19)),  # masks hold train ids already
    "mapillary": _lut(_MAPILLARY_IDS, range(66)),
}


# ---------------------------------------------------------------------------- real datasets


def _pairs(kind: str, root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) paths in the dataset's standard layout."""
    if kind == "gtav":
        img_dir, lbl_dir = root / "images", root / "labels"
        need = [img_dir, lbl_dir]
        find = lambda: [(p, lbl_dir / p.name) for p in sorted(img_dir.glob("*.png"))]  # noqa: E731
    elif kind == "cityscapes":
        img_dir, lbl_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        need = [img_dir, lbl_dir]
        find = lambda: [  # noqa: E731
            (p, lbl_dir / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
            for p in sorted(img_dir.glob("*/*_leftImg8bit.png"))]
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
        raise DataError(f"unknown dataset kind {kind!r}: choose gtav, cityscapes, bdd100k or mapillary")
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


def read_image(path: Path, kind: str = "image") -> Tensor:
    """An RGB image file as a float tensor [3, H, W] in [0, 1]; a file that cannot be decoded
    (truncated, corrupt, not an image) raises DataError naming it. Decoded by PIL:
    torchvision.io was 15% faster on a 1914x1052 GTAV-sized PNG (29 vs 34 ms, the same
    pixels) but is deprecated since torchvision 0.29; the loader's worker processes hide
    the difference."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{kind}: cannot read image {path} ({e}); replace or remove the file") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


class FolderDataset:
    """A real dataset on disk; items are (image [3, H, W] float in [0, 1], label [H, W] long)."""

    def __init__(self, kind: str, root: str | os.PathLike, split: str):
        from PIL import Image  # noqa: F401  (pillow is needed; fail here, not mid-training)

        self.kind, self.root, self.split = kind, Path(root), split
        self.pairs = _pairs(kind, self.root, split)
        self.lut = LUTS[kind]
        self.name = kind

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

    def _label(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as im:
                raw = np.asarray(im)
        except (OSError, ValueError, SyntaxError) as e:  # truncated, corrupt, not an image
            raise DataError(f"{self.kind}: cannot read label {path} ({e}); replace or remove the file") from None
        if raw.ndim != 2:
            raise DataError(f"{self.kind}: label {path} has shape {raw.shape}; expected one id per pixel")
        mapped = self.lut[raw]
        if (mapped < 0).any():
            bad = sorted(set(np.unique(raw[mapped < 0]).tolist()))
            raise DataError(f"{self.kind}: label {path} holds unknown ids {bad[:10]}")
        return mapped.astype(np.int64)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img_path, lbl_path = self.pairs[i]
        img = read_image(img_path, self.kind)
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


def _pad_to(img: Tensor, lbl: Tensor, crop: int) -> tuple[Tensor, Tensor]:
    H, W = lbl.shape
    ph, pw = max(0, crop - H), max(0, crop - W)
    if ph or pw:
        img = F.pad(img, (0, pw, 0, ph), value=0.0)
        lbl = F.pad(lbl, (0, pw, 0, ph), value=IGNORE)
    return img, lbl


def augment(img: Tensor, lbl: Tensor, crop: int, gen: torch.Generator,
            scale_range: tuple[float, float] = (0.5, 2.0)) -> tuple[Tensor, Tensor]:
    """Random resize, random crop (padded with ignore), horizontal flip, photometric jitter."""
    s = float(torch.empty(()).uniform_(*scale_range, generator=gen))
    H, W = lbl.shape
    size = (max(1, round(H * s)), max(1, round(W * s)))
    img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
    lbl = F.interpolate(lbl[None, None].float(), size=size, mode="nearest")[0, 0].long()
    img, lbl = _pad_to(img, lbl, crop)
    H, W = lbl.shape
    y = int(torch.randint(0, H - crop + 1, (), generator=gen))
    x = int(torch.randint(0, W - crop + 1, (), generator=gen))
    img, lbl = img[:, y:y + crop, x:x + crop], lbl[y:y + crop, x:x + crop]
    if torch.rand((), generator=gen) < 0.5:
        img, lbl = img.flip(-1), lbl.flip(-1)
    b, c, sat = (torch.empty(()).uniform_(lo, hi, generator=gen) for lo, hi in ((-0.12, 0.12), (0.8, 1.2), (0.8, 1.2)))
    grey = img.mean(0, keepdim=True)
    img = grey + sat * (img - grey)
    img = (img - img.mean()) * c + img.mean() + b
    return img.clamp(0, 1), lbl


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
                img, lbl = augment(img, lbl, self.crop, torch.Generator().manual_seed(s))
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
