"""Reading checkpoint files, and saying why one does not fit a model: shared by the
backbone loader (``rein.backbones``), official Rein checkpoints (``rein.official``) and
the commands that rebuild a model from a file."""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


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
    inert placeholders instead (the tensors are all this library uses). Raises
    ValueError, without the file's name, for a file that is not a torch checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as e:  # not a zip/pickle torch wrote: text, truncated, TorchScript
        raise ValueError(_unreadable(e)) from None
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        with torch.serialization.safe_globals([(_Inert, name) for name in foreign]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(_unreadable(e)) from None


def _unreadable(e: Exception) -> str:
    """Why a file is not a checkpoint, in one line (the caller names the file)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (KeyError, EOFError, pickle.UnpicklingError)) or not first:
        return "not a checkpoint torch.load can read (not a file torch.save wrote, or truncated)"
    return f"not a checkpoint torch.load can read ({type(e).__name__}: {first[:160]})"


def listing(keys: Sequence[str], n: int) -> str:
    """The first ``n`` keys, and how many more there are."""
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def misfit(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], labels: tuple[str, str, str],
           n: int) -> list[str]:
    """What keeps ``state`` from loading strictly where ``expected`` is the model's state
    dict: ``"<label>: keys"`` for the missing, the unexpected and the mis-shaped keys (the
    three ``labels``, in that order), each listing at most ``n``; empty when it fits."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    return [f"{label}: {listing(keys, n)}" for label, keys in zip(labels, (missing, unexpected, wrong)) if keys]
