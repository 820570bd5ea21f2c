"""How far apart two floating-point evaluations of the same sums may be.

Two evaluations that differ only in rounding (another summation order, the fused kernels
against torch, one batched GEMM against several, or the same GEMM on another BLAS code
path: a CPU's AVX-512 or AVX2 kernels against its default ones, as ``ATEN_CPU_CAPABILITY``
picks) differ by up to ``n * eps`` times the sum of the absolute values of the ``n`` terms
summed (each partial sum is rounded by at most eps / 2, in either evaluation). A bound
relative to each element fails on sums that cancel to a small element: which element,
and by how much, depends on the CPU. So every such comparison in the suite is bounded by
the size of what is summed, here the largest result (standing for the size of its terms)
unless a test gives the sum of the absolute terms itself.
"""
from __future__ import annotations

import torch

EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_sums_close(got: torch.Tensor, want: torch.Tensor, *, terms: int, dtype: torch.dtype = torch.float32,
                      size: float | None = None, name: str | None = None) -> None:
    """``|got - want| <= terms * eps(dtype) * size`` elementwise: ``terms``, the number of
    terms summed (along the whole chain of sums a result goes through) in ``dtype``, the
    precision they are rounded in; ``size``, the sum of their absolute values, by default
    the largest ``|want|``. A failure keeps torch's report (the greatest absolute and
    relative differences and where), prefixed by ``name``."""
    if size is None:
        size = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=0, atol=terms * EPS[dtype] * size,
                               msg=None if name is None else (lambda report: f"{name}: {report}"))
