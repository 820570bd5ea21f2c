"""Counting the host's work: dispatcher calls, and of those the ones that do device work."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# The autotuned Triton kernels of each kernel version's module, and their launches per
# layer (forward and backward together).
LAUNCHES = {"rein_kernels.rein_layer_v4": {"_ROWS_FWD": 1, "_ROWS_BWD": 1},
            "rein_kernels.rein_layer": {"_LOGITS": 2, "_GEMM": 2}}

ALLOCATIONS = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}


class Count(TorchDispatchMode):
    """Counts dispatcher calls (``calls``) and, of those, the ones that do device work
    (``device``: an in-place op, one that writes an ``out=`` tensor, or one whose result
    is neither an allocation nor a view of its inputs: a cast that changes nothing,
    ``contiguous`` on a contiguous tensor, a transpose or a slice launch nothing)."""

    def __init__(self, calls, device, on):
        super().__init__()
        self.calls, self.device, self.on = calls, device, on

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.on["on"]:
            name = str(func.overloadpacket).split(".")[-1]
            self.calls[name] += 1
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            fresh = any(t.numel() and t.untyped_storage().data_ptr() not in inputs
                        for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            writes = name.endswith("_") or "out" in (kwargs or {})
            if name not in ALLOCATIONS and not name.startswith("layer_") and (writes or fresh):
                self.device[name] += 1
        return out
