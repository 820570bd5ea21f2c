"""Real datasets on disk in the layouts the DGSS literature uses: GTAV, Cityscapes,
BDD100K, Mapillary Vistas v1.2 and ACDC (fog, night, rain, snow), every label mapped to
the 19 Cityscapes train classes (``labels``), checked before anything runs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .images import HALVINGS, read_image
from .labels import IGNORE, LUTS

ACDC_KINDS = ("acdc-fog", "acdc-night", "acdc-rain", "acdc-snow")
KINDS = ("gtav", "cityscapes", "bdd100k", "mapillary", *ACDC_KINDS)


def _train_ids_twin(label_ids: Path) -> Path:
    """Where the official converters put the train-id file of a label-id file:
    ``X_labelIds.png`` -> ``X_labelTrainIds.png`` (Cityscapes, ACDC), ``X.png`` ->
    ``X_labelTrainIds.png`` (GTAV)."""
    name = label_ids.name
    if name.endswith("_labelIds.png"):
        return label_ids.with_name(name.replace("_labelIds.png", "_labelTrainIds.png"))
    return label_ids.with_name(f"{label_ids.stem}_labelTrainIds.png")


def _layout(kind: str, root: Path, split: str):
    """(image folder, label folder, glob of the images, an image's label-id file, globs of
    the label files, whether train-id twins may stand beside the label-id files)."""
    if kind == "gtav":
        # images/NNNNN.png; labels/NNNNN.png (Cityscapes label ids), or the official
        # converter's labels/NNNNN_labelTrainIds.png (train ids) where it has been run
        img_dir, lbl_dir = root / "images", root / "labels"
        return img_dir, lbl_dir, "*.png", lambda p: lbl_dir / p.name, ("*.png",), True
    if kind == "cityscapes":
        # gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (the official configs read these,
        # made by cityscapesscripts) where present, else *_gtFine_labelIds.png
        img_dir, lbl_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        return (img_dir, lbl_dir, "*/*_leftImg8bit.png",
                lambda p: lbl_dir / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"),
                ("*/*_gtFine_labelIds.png", "*/*_gtFine_labelTrainIds.png"), True)
    if kind in ACDC_KINDS:
        # rgb_anon/<condition>/<split>/<sequence>/*_rgb_anon.png and gt/<condition>/<split>/
        # <sequence>/*_gt_labelTrainIds.png (what the official configs read) or *_gt_labelIds.png
        cond = kind.removeprefix("acdc-")
        img_dir, lbl_dir = root / "rgb_anon" / cond / split, root / "gt" / cond / split
        return (img_dir, lbl_dir, "*/*_rgb_anon.png",
                lambda p: lbl_dir / p.parent.name / p.name.replace("_rgb_anon.png", "_gt_labelIds.png"),
                ("*/*_gt_labelIds.png", "*/*_gt_labelTrainIds.png"), True)
    if kind == "bdd100k":
        img_dir, lbl_dir = root / "images" / "10k" / split, root / "labels" / "sem_seg" / "masks" / split
        return img_dir, lbl_dir, "*.jpg", lambda p: lbl_dir / (p.stem + ".png"), ("*.png",), False
    if kind == "mapillary":
        sub = {"train": "training", "val": "validation"}[split]
        img_dir, lbl_dir = root / sub / "images", root / sub / "labels"
        return img_dir, lbl_dir, "*.jpg", lambda p: lbl_dir / (p.stem + ".png"), ("*.png",), False
    if kind == "mapillary-converted":  # root: the official mapillary_resize.py's output (train ids)
        img_dir, lbl_dir = root / "val_img", root / "val_label"
        return img_dir, lbl_dir, "*.jpg", lambda p: lbl_dir / (p.stem + ".png"), ("*.png",), False
    raise DataError(f"unknown dataset kind {kind!r}: choose one of {', '.join(KINDS)}")


def official_mapillary_half(root: Path) -> Path | None:
    """Where the official ``mapillary_resize.py`` wrote its half-size validation set under
    ``root`` (``val_img/*.jpg``, ``val_label/*.png`` in train ids: the official README's
    ``half/``, or ``root`` itself), if it did."""
    for d in (root / "half", root):
        if (d / "val_img").is_dir() and (d / "val_label").is_dir():
            return d
    return None


def _pairs(kind: str, root: Path, split: str, layout: str | None = None) -> list[tuple[Path, Path]]:
    """(image, label) paths in the dataset's standard layout (``layout``: another layout
    of that kind); images without a label file and label files without an image are errors."""
    img_dir, lbl_dir, images, label_of, labels, twins = _layout(layout or kind, root, split)
    for d in (img_dir, lbl_dir):
        if not d.is_dir():
            raise DataError(f"{kind}: missing folder {d} (expected the standard {kind} layout under {root})")
    pairs = [(p, label_of(p)) for p in sorted(img_dir.glob(images))]
    if not pairs:
        raise DataError(f"{kind}: no images found under {img_dir}")
    if twins:  # the train-id file where the official converter wrote one (read by its suffix)
        pairs = [(p, t if (t := _train_ids_twin(lbl)).is_file() else lbl) for p, lbl in pairs]
    missing = [str(lbl) for _, lbl in pairs if not lbl.is_file()]
    if missing:
        raise DataError(f"{kind}: {len(missing)} images have no label file, e.g. {missing[0]}")
    known = {label_of(p) for p, _ in pairs}
    known |= {_train_ids_twin(lbl) for lbl in known} if twins else set()
    orphans = sorted(str(f) for g in labels for f in lbl_dir.glob(g) if f not in known)
    if orphans:
        raise DataError(f"{kind}: {len(orphans)} label files have no image, e.g. {orphans[0]}")
    return pairs


class FolderDataset:
    """A real dataset on disk; items are (image [3, H, W] float in [0, 1], label [H, W] long),
    or with ``uint8`` the image's pixels as decoded ([3, H, W] uint8: what the training
    pipeline works on, without a round trip through floats).

    Mapillary's validation set is evaluated at half size, as the official protocol reads
    it: the files its ``tools/convert_datasets/mapillary_resize.py`` writes.
    ``mapillary_half="jpeg"`` (default) halves the original images as that converter
    does, re-encoded as the JPEG it writes (the same bytes, decoded), and the labels with
    PIL's nearest; ``"plain"`` halves without the re-encode. A folder holding the
    converter's own output (``half/val_img``, ``half/val_label``: official layout, train-id
    labels) is read as it is, not halved again."""

    def __init__(self, kind: str, root: str | os.PathLike, split: str, uint8: bool = False,
                 mapillary_half: str = "jpeg"):
        from PIL import Image  # noqa: F401  (pillow is needed; fail here, not mid-training)

        if mapillary_half not in HALVINGS:
            raise ValueError(f"mapillary_half must be one of {HALVINGS}, got {mapillary_half!r}")
        self.kind, self.root, self.split, self.uint8 = kind, Path(root), split, uint8
        self.lut = LUTS[kind]
        self.name = kind
        self.half, layout, layout_root = None, None, self.root
        if kind == "mapillary" and split == "val":
            converted = official_mapillary_half(self.root)
            if converted is not None and (mapillary_half == "jpeg" or not (self.root / "validation").is_dir()):
                if mapillary_half == "plain":
                    raise DataError(f"mapillary: {self.root} holds the official converter's half-size validation set "
                                    f"({converted / 'val_img'}), not the original validation/ that --mapillary-half "
                                    "plain halves; drop --mapillary-half plain to read those files as they are")
                layout, layout_root, self.lut = "mapillary-converted", converted, LUTS["train_ids"]
            else:
                self.half = mapillary_half
        self.pairs = _pairs(kind, layout_root, split, layout)

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
                halved = sizes[0] == (sizes[1][0] // 2, sizes[1][1] // 2)
                hint = " (half its label's size: halved already, e.g. by the official mapillary_resize.py?)"
                raise DataError(f"{self.kind}: image {img} is {sizes[0]} but its label {lbl} is {sizes[1]}"
                                f"{hint if halved else ''}")
        step = max(1, len(self.pairs) // sample)
        for i in range(0, len(self.pairs), step):
            self._label(self.pairs[i][1])

    def _lut_for(self, path: Path) -> np.ndarray:
        return LUTS["train_ids"] if path.name.endswith("_labelTrainIds.png") else self.lut

    def _not_train_ids(self, path: Path, raw: np.ndarray) -> None:
        """A Mapillary v1.2 label (ids 0-65) never holds 255; the official converters' train-id
        files (mapillary2cityscape.py, mapillary_resize.py) do, and would map to wrong classes."""
        if self.kind == "mapillary" and self.lut is LUTS["mapillary"] and (raw == IGNORE).any():
            raise DataError(f"mapillary: label {path} holds 255, which no Mapillary v1.2 label does: it holds train "
                            "ids, as the official converters write them; give the root whose half/val_img and "
                            "half/val_label hold mapillary_resize.py's output (read as it is), or the original "
                            "v1.2 labels")

    def _label(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as im:
                if self.half:  # as mapillary_resize.py: PIL nearest to (W // 2, H // 2)
                    im = im.resize((im.width // 2, im.height // 2), resample=Image.NEAREST)
                raw = np.asarray(im)
        except (OSError, ValueError, SyntaxError) as e:  # truncated, corrupt, not an image
            raise DataError(f"{self.kind}: cannot read label {path} ({e}); replace or remove the file") from None
        if raw.ndim != 2:
            raise DataError(f"{self.kind}: label {path} has shape {raw.shape}; expected one id per pixel")
        self._not_train_ids(path, raw)
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


def _kind_and_path(spec: str, flag: str) -> tuple[str, str]:
    """``KIND=PATH`` split and checked; a spec that names no dataset is a DataError naming
    the flag."""
    if "=" not in spec:
        raise DataError(f"{flag} {spec}: expected KIND=PATH, e.g. cityscapes=/data/cityscapes")
    kind, path = spec.split("=", 1)
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise DataError(f"{flag} {spec}: unknown dataset kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind, path


def datasets_from(specs: list[tuple[str, str, str]], mapillary_half: str = "jpeg") -> list[FolderDataset]:
    """Datasets from (``KIND=PATH``, split, flag) triples, checked on disk: every spec is
    parsed before any folder is looked at. Training splits give uint8 pixels (what the
    training pipeline works on), the others float images; ``mapillary_half``: how
    Mapillary's validation images are halved (``FolderDataset``)."""
    parsed = [(*_kind_and_path(spec, flag), split) for spec, split, flag in specs]
    datasets = [FolderDataset(*p, uint8=p[-1] == "train", mapillary_half=mapillary_half) for p in parsed]
    for d in datasets:
        d.check()
    return datasets
