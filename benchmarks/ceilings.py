"""The device's measured ceilings, taken in the same run as the timings they bound."""
from __future__ import annotations

import torch


def _tflops(dtype: torch.dtype, n: int = 8192, tf32: bool = False) -> float:
    import triton.testing

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _copy_gbps(nbytes: int = 2**31) -> float:
    """Device-to-device copy, counting bytes read plus bytes written."""
    import triton.testing

    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_ceilings() -> dict:
    return {
        "bf16_tflops": _tflops(torch.bfloat16),
        "tf32_tflops": _tflops(torch.float32, tf32=True),
        "fp32_tflops": _tflops(torch.float32, n=4096),
        "copy_gbps": _copy_gbps(),
    }
