"""What the three commands (``rein.train``, ``rein.evaluate``, ``rein.predict``) share:
their argument parser, the flags that name a trained model, the checks of --device and
--out, and reporting a user's error as one line with exit code 2."""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch

from .data.images import HALVINGS
from .errors import DataError, UsageError

# The errors a user fixes (a flag, a file): one line each, never a traceback.
USER_ERRORS = (UsageError, DataError)
# What --backbone and --crop mean for an official checkpoint when not given: the published
# DINOv2-L model at 512 crops.
OFFICIAL_FLAGS = {"backbone": "vit_large_patch14_dinov2", "crop": 512}
# --precision: what a run computes in on CUDA (resolve_precision), and what each means
PRECISIONS = ("bf16", "tf32", "fp32")
PRECISION_MEANS = {"bf16": "bf16 autocast", "tf32": "fp32 weights, TF32 tensor-core matmuls and convolutions",
                   "fp32": "fp32 throughout"}
# How rein.model.load_model's errors name its inputs in the commands: their flags.
FLAG_NAMES = {"checkpoint": "--checkpoint", "backbone_checkpoint": "--backbone-checkpoint",
              "backbone": "--backbone", "crop": "--crop"}


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``prog: message (see --help)``, exit 2)
    rather than the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def parser(prog: str, description: str | None) -> OneLineParser:
    """A command's parser; ``description`` (its module docstring) shows under --help as written."""
    return OneLineParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def report(prog: str, error: Exception) -> int:
    """A user's error as the one line ``prog: message`` on stderr; returns the exit code, 2."""
    print(f"{prog}: {error}", file=sys.stderr)
    return 2


def add_model_flags(ap: argparse.ArgumentParser) -> None:
    """The flags that name a trained model (``rein.model.load_model``'s arguments), for the
    commands that use one."""
    ap.add_argument("--checkpoint", required=True,
                    help="OUT/checkpoint.pth of a rein.train run, or an official Rein checkpoint (mmseg format)")
    ap.add_argument("--backbone-checkpoint",
                    help="the frozen backbone's weights (release or timm format; default: those of the run; "
                         "needed for an official checkpoint unless it carries them)")
    ap.add_argument("--backbone",
                    help=f"official checkpoints only: the timm backbone they were trained on (default: "
                         f"{OFFICIAL_FLAGS['backbone']}; a rein.train checkpoint records its own)")
    ap.add_argument("--crop", type=int,
                    help=f"official checkpoints only: the training crop, 512 or 1024 (default: "
                         f"{OFFICIAL_FLAGS['crop']}; a rein.train checkpoint records its own)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                    help="Rein's Triton kernels where they can run (default) or the PyTorch reference")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="on CUDA, record the sliding window's forward once and replay it for every window "
                         "(default: on)")
    add_precision_flags(ap)


def official_flags(args) -> dict:
    """--backbone and --crop as ``rein.model.load_model`` takes them for an official
    checkpoint: their defaults where not given."""
    return {k: v if getattr(args, k) is None else getattr(args, k) for k, v in OFFICIAL_FLAGS.items()}


def ignored_flags(args, config, checkpoint: str) -> list[str]:
    """A line for each flag given that a rein.train checkpoint's own configuration
    overrides (``config``: ``load_model``'s)."""
    if config.checkpoint_kind != "rein.train":
        return []
    return [f"--{k} {getattr(args, k)} is ignored: {checkpoint} is a rein.train checkpoint, built as its run's "
            f"configuration says (--{k} {getattr(config, k)})" for k in OFFICIAL_FLAGS if getattr(args, k) is not None]


def add_precision_flags(ap: argparse.ArgumentParser, bf16: str = PRECISION_MEANS["bf16"]) -> None:
    """--precision, and --amp, its former name; ``bf16``: what bf16 means to the command."""
    ap.add_argument("--precision", choices=PRECISIONS,
                    help=f"on CUDA: bf16 ({bf16}; the default there), tf32 ({PRECISION_MEANS['tf32']}) or fp32 "
                         f"({PRECISION_MEANS['fp32']}: the official setting). On a CPU always fp32")
    ap.add_argument("--amp", dest="precision", action="store_const", const="bf16",
                    help="the same as --precision bf16 (its former name)")


def resolve_precision(flag: str | None, device: torch.device) -> tuple[str, str]:
    """(the precision a run computes in, why) for --precision ``flag`` (None: not given)
    on ``device``: bf16 by default on CUDA, where it is fastest; fp32 on any other device,
    where bf16 autocast is slow and would not be the official setting either."""
    if device.type != "cuda":
        if flag in (None, "fp32"):
            return "fp32", (f"on {device.type} a run stays fp32: bf16 autocast there is slow, and fp32 is the "
                            "official setting; on CUDA the default is bf16")
        return "fp32", (f"--precision {flag} applies on CUDA only: on {device.type} a run stays fp32, as bf16 "
                        "autocast there is slow and fp32 is the official setting")
    if flag is None:
        return "bf16", "the default on CUDA, the fastest; --precision fp32 is the official setting"
    return flag, f"--precision {flag}"


def use_precision(precision: str, device: torch.device) -> None:
    """TF32 tensor-core matmuls and convolutions on CUDA for tf32 only: fp32 means fp32
    arithmetic (and bf16 autocast's GEMMs are bf16 anyway)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"


def autocast(precision: str, device: torch.device):
    """bf16 autocast for bf16; nothing for tf32 and fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def add_mapillary_flag(ap: argparse.ArgumentParser) -> None:
    """How Mapillary's validation set is halved, for the commands that evaluate one."""
    ap.add_argument("--mapillary-half", choices=HALVINGS, default="jpeg",
                    help="Mapillary validation at half size as the official protocol reads it: jpeg (default) "
                         "halves each image as the official mapillary_resize.py does and re-encodes it as the JPEG "
                         "(quality 75) that converter writes; plain halves without the re-encode. A root holding "
                         "that converter's output (half/val_img, half/val_label) is read as it is")


def check_out_folder(out: Path, holds: str) -> None:
    """--out must be a folder, or one that can be made, where this process can write: tried
    by making it (and a file in it), then removing what the try made, so that nothing is
    left behind when a later check fails."""
    made = []  # the folders the try makes, deepest first
    try:
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file; give a folder (it will hold {holds})")
        parent = out
        while not parent.exists() and parent != parent.parent:
            made.append(parent)
            parent = parent.parent
        if not parent.is_dir():
            raise UsageError(f"--out {out}: {parent} is a file, not a folder; give a folder (it will hold {holds})")
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UsageError(f"--out {out} cannot be made or written ({e.strerror or e}); give a folder you can "
                         f"write to (it will hold {holds})") from None
    finally:
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()


def device_from_flag(flag: str | None) -> torch.device:
    """--device as a torch.device (default: cuda if present, else cpu); a device that
    cannot be used here is a UsageError."""
    try:
        device = torch.device(flag or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise UsageError(f"--device {flag!r} is not a device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but this machine has no CUDA GPU torch can use; use --device cpu")
    return device
