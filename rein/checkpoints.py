"""Reading checkpoint files, telling what a checkpoint holds, and saying why one does not
fit a model: shared by the backbone loader (``rein.backbones``), official Rein
checkpoints (``rein.official``) and the commands that rebuild a model from a file."""
from __future__ import annotations

import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

# What a backbone's own weights start with: timm's names and the release formats it reads
# (DINOv2, EVA02: patch_embed, blocks, ...; OpenAI CLIP: visual.*; ConvNeXt: stem, stages).
_BACKBONE_KEYS = ("patch_embed.", "blocks.", "pos_embed", "cls_token", "mask_token", "visual.", "stem.", "stages.")
# The first bytes of the files torch.save writes: a zip archive, or (before torch 1.6) a
# pickle of its magic number.
_ZIP_MAGIC, _LEGACY_MAGIC = b"PK\x03\x04", b"\x80\x02\x8a\n"


class CheckpointError(ValueError):
    """A file that cannot serve as the checkpoint it was given as. The message names the
    file first (``X is not a PyTorch checkpoint file``): a command prefixes its flag."""


class _Inert:
    """Stands in for an object of another library (mmengine's message hub, numpy scalars
    in the metadata) while a checkpoint is read: built from anything, does nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


def load_tensors(path: str | os.PathLike):
    """``torch.load`` of a checkpoint file without running any of its code
    (``weights_only=True``). mmengine checkpoints also pickle the training's metadata,
    message hub and schedulers, which weights_only refuses: their classes are read as
    inert placeholders instead (the tensors are all this library uses). A file torch
    cannot read raises CheckpointError saying why: not a PyTorch checkpoint file,
    truncated or corrupt, or a TorchScript archive."""
    try:
        with warnings.catch_warnings():  # a TorchScript archive is refused below, and said so once
            warnings.filterwarnings("ignore", message="'torch.load' received a zip file that looks like a TorchScript")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception:  # not a zip/pickle torch wrote: text, truncated, TorchScript
        raise CheckpointError(unreadable(path)) from None
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        with torch.serialization.safe_globals([(_Inert, name) for name in foreign]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise CheckpointError(unreadable(path)) from None


def unreadable(path: str | os.PathLike) -> str:
    """Why torch could not read ``path``, in one line naming it, from what the file is."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return f"{path} is empty, not a PyTorch checkpoint file"
    if head == _ZIP_MAGIC:
        try:
            names = zipfile.ZipFile(path).namelist()
        except (zipfile.BadZipFile, OSError):  # the archive's index, at its end, is missing
            return f"{path} is truncated or corrupt (download or save it again)"
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            return (f"{path} is a TorchScript archive, which is not read (loading it runs its code): save "
                    "torch.jit.load(it, map_location='cpu').state_dict() with torch.save and pass that")
        if not any(n.endswith("/data.pkl") for n in names):
            return f"{path} is a zip archive, not a PyTorch checkpoint file"
        return f"{path} is truncated or corrupt (download or save it again)"
    if head == _LEGACY_MAGIC:
        return f"{path} is truncated or corrupt (download or save it again)"
    return f"{path} is not a PyTorch checkpoint file"


def flat_state(ck) -> dict[str, Tensor]:
    """The tensors of a loaded checkpoint as one flat state dict: the wrappers training
    frameworks put around it (``state_dict``, ``model``, ``module``) removed, DDP's
    ``module.`` prefix dropped. Empty when it holds no such mapping."""
    while isinstance(ck, Mapping):
        inner = next((ck[w] for w in ("state_dict", "model", "module") if isinstance(ck.get(w), Mapping)), None)
        if inner is None:
            break
        ck = inner
    if not isinstance(ck, Mapping):
        return {}
    return {k.removeprefix("module."): v for k, v in ck.items() if isinstance(v, Tensor)}


def checkpoint_kind(ck) -> str | None:
    """What a loaded checkpoint holds, as its keys tell: ``"rein.train"`` (a checkpoint
    ``rein.train`` wrote: its configuration, Rein and the head), ``"official"`` (an
    official Rein checkpoint: ``backbone.reins.*``, ``decode_head.*``), ``"backbone"``
    (a backbone's own weights, in timm's or a release's names), or None."""
    if isinstance(ck, Mapping) and {"config", "rein", "head"} <= set(ck):
        return "rein.train"
    state = flat_state(ck)
    if any(k.startswith(("backbone.reins.", "decode_head.")) for k in state):
        return "official"
    if any(k.startswith(_BACKBONE_KEYS) for k in state):
        return "backbone"
    return None


def listing(keys: Sequence[str], n: int) -> str:
    """The first ``n`` keys, and how many more there are."""
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def misfit(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], n: int = 3) -> str:
    """What keeps ``state`` from loading strictly where ``expected`` is the model's state
    dict, in one line: the missing keys, the unexpected keys and the keys of another
    shape, each kind with its count and its first ``n`` (the shapes with both sizes); when a list is cut
    short, all of them are written to a file in the temporary folder that the line
    names. Empty when it fits."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    kinds = [(label, keys) for label, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("keys of another shape", wrong)) if keys]
    line = "; ".join(f"{label} ({len(keys)}): {listing(keys, n)}" for label, keys in kinds)
    if any(len(keys) > n for _, keys in kinds):
        with tempfile.NamedTemporaryFile("w", prefix="rein-misfit-", suffix=".txt", delete=False) as f:
            f.writelines(f"# {label} ({len(keys)})\n" + "".join(f"{k}\n" for k in keys) for label, keys in kinds)
        line += f"; all listed in {f.name}"
    return line
