"""``python -m rein.predict``: segment images with a trained Rein checkpoint.

    python -m rein.predict --checkpoint runs/gtav2city/checkpoint.pth --images DIR_OR_FILES --out DIR

For every image it writes ``labelIds/<name>.png`` (Cityscapes label ids: the folder the
Cityscapes scripts and benchmark server take, one file per image), ``color/<name>.png``
(Cityscapes palette) and ``overlay/<name>.png`` (the colours over the image); ``<name>``
keeps an input folder's subfolders (``aachen/aachen_000000_000019_leftImg8bit``). The
model is rebuilt from the checkpoint's own configuration (``rein.model``);
the frozen backbone's weights come from ``--backbone-checkpoint`` (default: the file the
run was trained with). Sliding-window inference, fused kernels and, on a GPU, bf16
autocast by default (``--precision``).
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np

from .cli import (FLAG_NAMES, PRECISION_MEANS, USER_ERRORS, add_model_flags, autocast, check_out_folder,
                  device_from_flag, ignored_flags, official_flags, parser, report, resolve_precision, use_precision)
from .data import LABEL_IDS, DataError, colorize, overlay, read_image, to_uint8
from .errors import UsageError
from .inference import predict, run_test_scale
from .model import load_model

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _images(spec: list[str], out: Path) -> list[tuple[Path, str]]:
    """(image file, output name) for every image named or found (recursively) in a folder,
    skipping the output folder. Names keep a folder's relative path without the suffix
    (a/b.png -> a/b), and the extension where two files would otherwise share one
    (a_png, a_jpg), so no output overwrites another."""
    files = []
    out = out.resolve()
    for s in spec:
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                           and out not in f.resolve().parents)
            files += [(f, f.relative_to(p).with_suffix("").as_posix()) for f in found]
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"--images {s}: not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))})")
            files.append((p, p.stem))
        else:
            raise DataError(f"--images {s}: no such file or folder")
    if not files:
        raise DataError(f"--images {' '.join(spec)}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    counts = Counter(name for _, name in files)
    named = [(f, f"{name}_{f.suffix[1:].lower()}" if counts[name] > 1 else name) for f, name in files]
    if len({n for _, n in named}) < len(named):
        raise DataError("--images: two inputs would write the same output name; name them apart")
    return named


def _scale_flag(flag: str | None) -> tuple[int, int] | str | None:
    """--scale: (long, short), "native", or None (not given)."""
    if flag is None:
        return None
    if flag.lower() == "native":
        return "native"
    try:
        scale = tuple(int(v) for v in flag.lower().split("x"))
        assert len(scale) == 2 and min(scale) > 0
    except (ValueError, AssertionError):
        raise UsageError(f"--scale {flag!r}: expected LONGxSHORT, e.g. 1024x512, or native") from None
    return scale


def _scale(flag: tuple[int, int] | str | None, config) -> tuple[tuple[int, int] | None, str]:
    """The test resize and the line that says which: --scale's, or by default the one the
    checkpoint's run was evaluated at (recorded in it; for older and official checkpoints,
    worked out from its configuration the same way)."""
    if flag == "native":
        return None, "each image at its own size (--scale native)"
    if flag is not None:
        return flag, f"each image resized keeping its ratio to fit {flag[0]}x{flag[1]} (--scale)"
    test = getattr(config, "test_scale", None) or run_test_scale(vars(config))
    if test["scale"] is None:
        return None, (f"each image at its own size, as {test['domain']} was evaluated (--scale LONGxSHORT "
                      "resizes)")
    long_, short = test["scale"]
    return (long_, short), (f"each image resized keeping its ratio to fit {long_}x{short}, the test scale "
                            f"of {test['domain']} at crop {config.crop} (--scale native keeps each image's size)")


def main(argv=None) -> int:
    ap = parser("rein-predict", __doc__)
    add_model_flags(ap)
    ap.add_argument("--images", nargs="+", required=True, help="image files and/or folders (searched recursively)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--scale", help="resize each image keeping its ratio to fit LONGxSHORT first, e.g. 1024x512, "
                                    "or 'native' for its own size (default: the test scale of the domain the "
                                    "checkpoint was evaluated on first)")
    args = ap.parse_args(argv)

    from PIL import Image
    from tqdm import tqdm

    try:
        device = device_from_flag(args.device)
        scale_flag = _scale_flag(args.scale)
        out = Path(args.out)
        check_out_folder(out, "the predicted PNGs")
        files = _images(args.images, out)
        model, config = load_model(args.checkpoint, args.backbone_checkpoint, device, args.fused,
                                   official=official_flags(args), names=FLAG_NAMES)
    except USER_ERRORS as e:
        return report("rein-predict", e)
    for line in ignored_flags(args, config, args.checkpoint):
        print(f"rein-predict: WARNING: {line}", file=sys.stderr)
    scale, says = _scale(scale_flag, config)
    print(f"rein-predict: {says}")
    precision, why = resolve_precision(args.precision, device)
    print(f"rein-predict: precision {precision}, {PRECISION_MEANS[precision]}; {why}")
    use_precision(precision, device)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for f, name in tqdm(files, desc="predict", file=sys.stderr, dynamic_ncols=True):
        try:
            img = read_image(f, uint8=True)
        except DataError as e:
            failed.append(str(e))
            continue
        with autocast(precision, device):
            labels = predict(model, img, config.crop, scale, device=device,
                             cuda_graphs=args.cuda_graphs).cpu().numpy()
        rgb = to_uint8(img)
        for kind, picture in (("labelIds", Image.fromarray(LABEL_IDS[labels.astype(np.int64)], mode="L")),
                              ("color", Image.fromarray(colorize(labels))),
                              ("overlay", Image.fromarray(overlay(rgb, labels)))):
            path = out / kind / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            picture.save(path)
    print(f"rein-predict: {len(files) - len(failed)} image(s) -> {out}")
    for msg in failed:
        print(f"rein-predict: skipped {msg}", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
