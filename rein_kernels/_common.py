"""What both kernel versions share: the test poison, autotuning switches, the row view of
[S0, S1, C] inputs and the refined-row mask, the fp32 dot precision, small launch helpers."""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Triton 3.8 deprecates block pointers in favour of tensor descriptors, which need the
# TMA's 16-byte aligned row strides: no use for odd C (or m) that the layer must take.
# Block pointers work on every Triton the library supports, so the warning is silenced
# here (and this note kept) rather than printed at every compile.
warnings.filterwarnings("ignore", message=r"tl\.make_block_ptr is deprecated", category=UserWarning)

# Tests set this: every buffer a kernel must fill starts as NaN (integers: their least
# value), so unwritten elements show, and is followed by a guard region of the same
# (kept in GUARDS) that must stay so, so that a write past the end fails a test instead
# of corrupting the heap.
POISON = False
GUARDS: list[Tensor] = []


def poison_value(dtype: torch.dtype):
    """What a poisoned buffer holds: NaN, or for an integer output its dtype's least value."""
    return float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min


def new(t: Tensor) -> Tensor:
    """``t`` (freshly allocated, dense) as is, or under POISON a poisoned copy of its
    layout at the front of a buffer twice its size plus 4096 elements (its guard region
    is kept in GUARDS until the test that set POISON clears it)."""
    if not POISON:
        return t
    n = t.numel()
    buf = torch.full((2 * n + 4096,), poison_value(t.dtype), dtype=t.dtype, device=t.device)
    GUARDS.append(buf[n:])
    return buf.as_strided(t.shape, t.stride())


# REIN_AUTOTUNE=0 pins each kernel to its first GPU config: the parity suite runs many
# shapes, and autotuning each would cost more than the checks themselves.
AUTOTUNE = os.environ.get("REIN_AUTOTUNE", "1") != "0"


def configs(gpu_configs, interp_config):
    # Several configs fail in the interpreter, and autotuning there only costs time.
    if INTERPRET:
        return [interp_config]
    return gpu_configs if AUTOTUNE else gpu_configs[:1]


@triton.jit
def refined_rows(r0, R, S1, num_prefix, SEQ_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows r0 .. r0 + BLOCK_R of the [R, C] row view of [S0, S1, C]: (in range, refined),
    refined = in range and not one of the first ``num_prefix`` positions of the sequence."""
    rows = r0 + tl.arange(0, BLOCK_R)
    seq = rows % S1 if SEQ_DIM == 1 else rows // S1
    in_range = rows < R
    return in_range, in_range & (seq >= num_prefix)


def row_view(t: Tensor, seq_dim: int, swap: bool | None = None) -> tuple[Tensor, int, bool]:
    """View t [S0, S1, C] with the outer-strided dimension first, so rows follow memory
    order; returns (view, its seq_dim, swapped). ``swap`` forces the choice made for x."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if swap is None:
        swap = t.stride(0) < t.stride(1)
    if swap:
        return t.transpose(0, 1), 1 - seq_dim, True
    return t, seq_dim, False


def rows(t: Tensor) -> Tensor:
    """[S0, S1, C] row view -> [S0 * S1, C] with one row stride: free when the rows are
    evenly spaced in memory (contiguous, or channels sliced out of wider rows), one copy
    for the rare layouts where they are not (sequences sliced out of a larger batch)."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


def precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's tf32 switch; other dtypes take Triton's default ("tf32",
    which only affects fp32 operands)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; the same tensor without a dispatcher call when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def aligned16(*ts: Tensor) -> bool:
    """Whether [rows, C] operands are aligned as the published shapes are (row strides and
    addresses multiples of 16 elements and bytes): the large-tile configs then compile
    without spills; other shapes take smaller tiles. The storage offset, not the address:
    allocations are aligned, and under torch.compile's tracing (the triton_op) a fake tensor
    has no address."""
    return all(t.stride(0) % 16 == 0 and t.storage_offset() * t.element_size() % 16 == 0 for t in ts)
