"""Reading images, and the pixel normalisation every model input gets."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

# ImageNet statistics in [0, 1] units: mmseg's data preprocessor's mean (123.675, 116.28,
# 103.53) and std (58.395, 57.12, 57.375) over 255
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


# How Mapillary's validation images are halved (``FolderDataset``'s ``mapillary_half``):
# "jpeg" as the official converter writes them, "plain" the halving alone.
HALVINGS = ("jpeg", "plain")


def official_half_jpeg(path: Path) -> bytes:
    """The file the official ``tools/convert_datasets/mapillary_resize.py`` writes for the
    image at ``path``, byte for byte: the image as PIL opens it (no conversion), resized
    to (W // 2, H // 2) with ``Image.BICUBIC`` and saved as ``.jpg`` with PIL's defaults
    (JPEG quality 75, 4:2:0 chroma). The official evaluation reads those files."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        im = im.resize((w // 2, h // 2), resample=Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG")  # what its im.save(dst_im_file) writes to a .jpg
    return buf.getvalue()


def read_image(path: Path, kind: str = "image", half: str | None = None, uint8: bool = False) -> Tensor:
    """An RGB image file as a float tensor [3, H, W] in [0, 1] (``uint8``: its pixels as
    decoded, [3, H, W] uint8); a file that cannot be decoded
    (truncated, corrupt, not an image) raises DataError naming it. ``half``: halved as
    the official Mapillary converter does, "jpeg" (re-encoded as the JPEG it writes, the
    pixels its evaluation reads) or "plain" (PIL bicubic to (W // 2, H // 2), no
    re-encode). Decoded by PIL (the same pixels as OpenCV, which mmseg decodes with):
    torchvision.io was 15% faster on a 1914x1052 GTAV-sized PNG (29 vs 34 ms, the same
    pixels) but is deprecated since torchvision 0.29; the loader's worker processes hide
    the difference."""
    from PIL import Image

    if half not in (None, *HALVINGS):
        raise ValueError(f"half must be None or one of {HALVINGS}, got {half!r}")
    try:
        if half == "jpeg":
            with Image.open(io.BytesIO(official_half_jpeg(path))) as im:
                arr = np.array(im.convert("RGB"))
        else:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if half == "plain":  # as mapillary_resize.py, without its JPEG re-encode
                    im = im.resize((im.width // 2, im.height // 2), Image.BICUBIC)
                arr = np.array(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{kind}: cannot read image {path} ({e}); replace or remove the file") from None
    pixels = torch.from_numpy(arr).permute(2, 0, 1)
    return pixels if uint8 else pixels.float() / 255


def to_uint8(img: Tensor) -> np.ndarray:
    """[3, H, W] uint8, or float in [0, 1] -> uint8 [H, W, 3]; exact for decoded images
    (multiples of 1/255)."""
    if img.dtype == torch.uint8:
        return img.permute(1, 2, 0).numpy()
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def normalize(img: Tensor) -> Tensor:
    """Float pixels in [0, 1] -> the model's input: (img - MEAN) / STD per channel."""
    return (img - MEAN.to(img.device)) / STD.to(img.device)
