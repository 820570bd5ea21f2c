"""rein_kernels: fused Triton kernels for the Rein layer, and its pure-PyTorch reference.

    rein_layer_fused(x, T, W_t, b_t, W_d, b_d, scale, batch_first=..., num_prefix_tokens=..., use_softmax=...)
        the fused layer (a custom op with autograd); same signature and result as
        ``rein_layer_reference``.
    is_available(x)       whether the kernels can run on x's device.
    check_inputs(...)     the argument checks both paths share.
    prepare(T, ..., scale, cdtype), apply_fused(x, operands, ...)
                          the two halves of rein_layer_fused: the parameter operands (for
                          one layer or all at once), then the op on them.
    KERNELS               which kernels the op runs: "v4" (rein_layer_v4.py: cuBLAS for the
                          GEMMs, Triton for the row-wise work; the default) or "v3"
                          (rein_layer.py: Triton GEMMs), from REIN_KERNELS. v4 is the default
                          since the H200 run of 2026-12-04 measured it 1.27x v3 per layer as a
                          backbone runs them (benchmarks/NOTES.md); v3 stays selectable until
                          every named workload has been measured with both.
    REGISTRATION          which registration of the op the layer calls: "custom_op" (the
                          default; opaque to torch.compile) or "triton_op" (torch >= 2.6:
                          torch.compile traces it and Inductor launches the kernels itself),
                          from REIN_REGISTRATION.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import rein_layer_reference, rein_queries_reference

__all__ = [
    "rein_layer_fused",
    "rein_layer_reference",
    "rein_queries_reference",
    "is_available",
    "check_inputs",
    "compute_dtype",
    "prepare",
    "apply_fused",
]


KERNEL_VERSIONS = ("v4", "v3")
KERNELS = os.environ.get("REIN_KERNELS", "v4")
if KERNELS not in KERNEL_VERSIONS:
    raise ValueError(f"REIN_KERNELS={KERNELS!r}: choose one of {', '.join(KERNEL_VERSIONS)}")
REGISTRATIONS = ("custom_op", "triton_op")
REGISTRATION = os.environ.get("REIN_REGISTRATION", "custom_op")
if REGISTRATION not in REGISTRATIONS:
    raise ValueError(f"REIN_REGISTRATION={REGISTRATION!r}: choose one of {', '.join(REGISTRATIONS)}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available(x: Tensor, compute_dtype: torch.dtype | None = None) -> bool:
    """True when the Triton kernels can run on ``x``: a CUDA tensor, or a CPU tensor
    with ``TRITON_INTERPRET=1`` set before triton was imported (not in bf16, which the
    interpreter computes wrongly)."""
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and _interpreting() and compute_dtype != torch.bfloat16


def check_inputs(x: Tensor, T: Tensor, num_prefix_tokens: int, batch_first: bool) -> None:
    """Raise a clear error for input the layer cannot take."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    layout = "[B, N, C]" if batch_first else "[N, B, C]"
    if x.dim() != 3:
        raise ValueError(
            f"x must have rank 3 ({layout} with batch_first={batch_first}), got shape {tuple(x.shape)}"
        )
    C = T.shape[-1]
    if x.shape[-1] != C:
        raise ValueError(f"x has {x.shape[-1]} channels in its last dim, expected embed_dims={C}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.device != T.device:
        raise RuntimeError(
            f"x is on {x.device} but the Rein parameters are on {T.device}; move one of them"
        )
    N = x.shape[1] if batch_first else x.shape[0]
    if not 0 <= num_prefix_tokens <= N:
        raise ValueError(
            f"num_prefix_tokens={num_prefix_tokens} must be in [0, {N}] (sequence length {N})"
        )


def compute_dtype(x: Tensor, params: list[Tensor]) -> torch.dtype:
    """The dtype the layer's GEMMs run in: autocast's, else the one x and params share."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or x.dtype not in dtypes:
        raise TypeError(
            f"x is {x.dtype} but the Rein parameters are {sorted(map(str, dtypes))}; "
            "convert the module (e.g. layer.to(x.dtype)) or run under torch.autocast"
        )
    return x.dtype


def rein_layer_fused(
    x: Tensor,
    T: Tensor,
    W_t: Tensor,
    b_t: Tensor,
    W_d: Tensor,
    b_d: Tensor,
    scale: Tensor | float,
    *,
    batch_first: bool = False,
    num_prefix_tokens: int = 1,
    use_softmax: bool = True,
) -> Tensor:
    """The fused Rein layer; the same function as :func:`rein_layer_reference`.

    ``scale`` is a 0-dim tensor (a parameter) or a number (a constant). Under
    ``torch.autocast`` the GEMMs run in the autocast dtype with fp32 accumulation and the
    result has the dtype the reference's type promotion gives, promote(x, autocast dtype)
    (x's own without autocast).
    """
    check_inputs(x, T, num_prefix_tokens, batch_first)
    cdtype = compute_dtype(x, [T, W_t, b_t, W_d, b_d])
    if not isinstance(scale, Tensor):
        scale = None if scale == 1 else torch.tensor(float(scale), device=x.device, dtype=W_d.dtype)
    return apply_fused(x, prepare(T, W_t, b_t, W_d, b_d, scale, cdtype), cdtype, batch_first,
                       num_prefix_tokens, use_softmax)


def prepare(T: Tensor, W_t: Tensor, b_t: Tensor, W_d: Tensor, b_d: Tensor, scale: Tensor | None,
            cdtype: torch.dtype) -> tuple[Tensor, ...]:
    """The parameter operands the kernels of ``KERNELS`` read; ``scale`` None is the constant 1.

    T is one layer's tokens [m, C] (U is then [m-1, C]) or all L layers' [L, m, C] (U
    [L, m-1, C]): one batched GEMM for a whole forward pass (``rein.ReinLayer.prepared``).

    v4: (T, U, W, b, Tc, Uc) with the scale folded in: W = s W_d, b = s b_d,
    U = s (T[1:] W_t^T + b_t) W_d^T, in promote(W_d, scale)'s dtype (fp32 for an fp32 scale:
    the kernels cast W and b to ``cdtype`` as they read them, and dscale, which autograd
    makes of these three products, adds fp32 gradients); Tc and Uc are T and U in
    ``cdtype`` (detached: the op returns their gradients as T's and U's).
    v3: (T, U, W_d, b_d, scale) in ``cdtype``, U = (T[1:] W_t^T + b_t) W_d^T."""
    T_c, W_t, b_t, W_c = (t.to(cdtype) for t in (T, W_t, b_t, W_d))
    # Formed for all m tokens and then sliced: the rows of one contiguous product, so that
    # every layer's U is contiguous and no copy of the sliced tokens (a [L, m-1, C] matmul
    # operand) is made and saved; the null token's row costs 1/m more GEMM work.
    U = F.linear(F.linear(T_c, W_t, b_t), W_c)[..., 1:, :]
    if KERNELS == "v3":
        return T_c, U, W_c, b_d.to(cdtype), scale if scale is not None else torch.ones((), device=T.device)
    dtype = W_d.dtype if scale is None else torch.promote_types(W_d.dtype, scale.dtype)
    T, U, W, b = (t.to(dtype) for t in (T, U, W_d, b_d))
    if scale is not None:
        U, W, b = U * scale, W * scale, b * scale
    return T, U, W, b, T_c.detach(), U.detach().to(cdtype)


def apply_fused(x: Tensor, operands: tuple[Tensor, ...], cdtype: torch.dtype, batch_first: bool,
                num_prefix_tokens: int, use_softmax: bool) -> Tensor:
    """The fused layer on checked input and one layer's :func:`prepare`'d operands, computed
    in ``cdtype`` (the one they were prepared for)."""
    # triton loads here, after TRITON_INTERPRET is set
    if KERNELS == "v3":
        from . import rein_layer as op

        extra = ()
    else:
        from . import rein_layer_v4 as op

        extra = (cdtype,)
    traced = REGISTRATION == "triton_op" and op.HAS_TRITON_OP
    fwd = op.rein_layer_fwd_t if traced else op.rein_layer_fwd
    out, _ = fwd(x, *operands, *extra, num_prefix_tokens, 1 if batch_first else 0, use_softmax)
    return out

