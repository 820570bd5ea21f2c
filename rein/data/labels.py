"""The 19 Cityscapes train classes and the maps from every dataset's label ids to them
(ignore index 255), their inverse to Cityscapes label ids, and the Cityscapes palette."""
from __future__ import annotations

import numpy as np

IGNORE = 255
CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)


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

# train id -> Cityscapes label id (the inverse of the Cityscapes map); ignore -> 0 (unlabeled)
LABEL_IDS = np.zeros(256, dtype=np.uint8)
for _label_id, _train_id in _CITYSCAPES_IDS.items():
    LABEL_IDS[_train_id] = _label_id

# Cityscapes colours of the 19 train classes (cityscapesscripts' labels.py); ignore is black.
PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)


def colorize(labels: np.ndarray) -> np.ndarray:
    """Train ids [H, W] -> RGB [H, W, 3] in the Cityscapes palette (ignore black)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:19] = PALETTE
    return lut[np.asarray(labels, dtype=np.int64).clip(0, 255)]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The prediction's colours blended over a uint8 RGB image."""
    return (image * (1 - alpha) + colorize(labels) * alpha).round().astype(np.uint8)
