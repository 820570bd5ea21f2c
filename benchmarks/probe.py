"""The kernel-level probe: each launch of one fused layer (kernels v4) beside what the card
does at the same shape, device time from CUDA-graph replays.

For a workload, one layer as ``rein.train`` runs it (bf16 autocast over an fp32 residual
stream, or over a bf16 one: ``x_dtype``), its operands formed as ``ReinBackbone`` forms them:

  * ``rows_fwd``, ``rows_bwd``: the two Triton row kernels, each beside its bandwidth bound
    (the bytes it must move at the measured copy rate), as autotuned and in each layout
    (``rows_fwd_fused``, ``rows_fwd_streamed``, ...: ``rein_layer_v4.row_layout``);
  * ``gemm_fwd`` (OUT += A Bt^T), ``gemm_dx`` (DX += [G | GZ] Bb) and ``gemm_weights``
    (every weight gradient: [G | GZ]^T [XC | P1a]), each beside
    ``cublas_ref``, a plain bf16 [R, C] x [C, C] product at the layer's shape, and the
    FLOP bound at the measured peak;
  * the whole op, forward and forward + backward.

    python benchmarks/probe.py [vitl-512 ...]     (on a GPU; prints JSON)
"""
from __future__ import annotations

import json
import sys

import torch

import rein
import rein_kernels
from bench import WORKLOADS, Workload, warm_up_on_side_stream


def _graph_us(fn, warmup: int = 3) -> float:
    """Device time of fn in microseconds: replays of a CUDA graph that holds 20 calls."""
    import triton.testing

    warm_up_on_side_stream(fn, warmup)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            fn()
    return 1e3 * triton.testing.do_bench(g.replay, warmup=50, rep=300, return_mode="median") / 20


def probe(w: Workload, ceilings: dict | None = None, x_dtype: torch.dtype = torch.float32) -> dict:
    """Device time (us) of each launch of one v4 layer at workload w, and its bounds."""
    import rein_kernels.rein_layer_v4 as op

    dev, cd = "cuda", torch.bfloat16
    torch.manual_seed(0)
    saved, rein_kernels.KERNELS = rein_kernels.KERNELS, "v4"
    try:
        layer = rein.ReinLayer(w.L, w.C, w.patch, token_length=w.m, lora_dim=w.r, scale_init=0.1).to(dev)
        with torch.autocast(dev, dtype=cd):
            T, U, W, b, Tc, Uc = (t.detach() for t in layer.layer_operands(cd)[0])
    finally:
        rein_kernels.KERNELS = saved
    N = w.tokens_per_image + 1
    x = torch.randn(w.batch, N, w.C, device=dev, dtype=x_dtype)
    g = torch.randn(w.batch, N, w.C, device=dev, dtype=torch.promote_types(x_dtype, cd))
    x2, g2 = x.view(-1, w.C), g.view(-1, w.C)
    R, C, M = x2.shape[0], w.C, w.m
    out_dtype = torch.promote_types(x_dtype, cd)
    out, A, Bt, lse = op._fwd_rows(x2, N, 1, Tc, Uc, W, b, cd, 1, True, out_dtype)
    dx, W1, Bb = op._bwd_rows(x2, g2, N, 1, Tc, Uc, W, lse, cd, 1, True)
    Cp, Mp = op._pad16(C), op._pad16(M)
    GGZ, XCP = W1[:, :Cp + Mp], W1[:, Cp + Mp:]
    XC = XCP[:, :C]
    xb, Wb = x2.to(cd), W.to(cd)
    bw = (ceilings or {}).get("copy_gbps")
    peak = (ceilings or {}).get("bf16_tflops")
    xe, oe, ce = x.element_size(), out.element_size(), 2

    def bytes_us(n):
        return None if not bw else 1e6 * n / (bw * 1e9)

    def flops_us(f):
        return None if not peak else 1e6 * f / (peak * 1e12)

    rows = {
        "rows_fwd": (lambda: op._fwd_rows(x2, N, 1, Tc, Uc, W, b, cd, 1, True, out_dtype),
                     bytes_us(R * C * (xe + oe) + R * (Cp + Mp) * ce), None),
        "rows_bwd": (lambda: op._bwd_rows(x2, g2, N, 1, Tc, Uc, W, lse, cd, 1, True),
                     bytes_us(R * C * (xe + 2 * oe) + R * 2 * (Mp + Cp) * ce), None),
        "gemm_fwd": (lambda: op._addmm_(out, A, Bt.t()), None, flops_us(2.0 * R * C * (Cp + Mp))),
        "gemm_dx": (lambda: op._addmm_(dx, GGZ, Bb), None, flops_us(2.0 * R * C * (Cp + Mp))),
        "gemm_weights": (lambda: op._mm(GGZ.t(), XCP, W.dtype), None, flops_us(2.0 * R * (Cp + Mp) ** 2)),
        "cublas_ref": (lambda: torch.mm(xb, Wb), None, flops_us(2.0 * R * C * C)),
        # what the alternatives would cost: the weight-gradient GEMM written in bf16, the logits
        # as a cuBLAS GEMM (x T^T, N = m), and a plain stream of x to an fp32 copy and a
        # bf16 cast (torch's own kernels), the floor of a row kernel without dots
        "alt_gemm_weights_bf16_out": (lambda: torch.mm(GGZ.t(), XCP), None, flops_us(2.0 * R * (Cp + Mp) ** 2)),
        "alt_gemm_logits": (lambda: torch.mm(XC, Tc.t()), None, flops_us(2.0 * R * C * M)),
        "alt_copy_and_cast": (lambda: (x2.clone(), x2.to(cd)), bytes_us(R * C * (2 * xe + ce)), None),
    }
    result = {"workload": w.name, "x_dtype": str(x_dtype).removeprefix("torch."), "rows": R, "C": C, "m": M}
    for name, (fn, bound_bytes, bound_flops) in rows.items():
        result[name] = dict(us=_graph_us(fn), bandwidth_bound_us=bound_bytes, flop_bound_us=bound_flops)
    # each layout of the row kernels alone (the autotuner picks among both for the rows above)
    for layout in ("fused", "streamed"):
        with op.row_layout(streamed=layout == "streamed"):
            for name in ("rows_fwd", "rows_bwd"):
                fn, bound_bytes, _ = rows[name]
                result[f"{name}_{layout}"] = dict(us=_graph_us(fn), bandwidth_bound_us=bound_bytes, flop_bound_us=None)
    xg = x.detach().requires_grad_(True)
    args = (T, U, W, b, Tc, Uc, cd, 1, 1, True)

    def fwd():
        op.rein_layer_fwd(x, *args)

    def fwd_bwd():
        o, _ = op.rein_layer_fwd(xg, *args)
        torch.autograd.grad(o, [xg], g)

    result["op_fwd"] = dict(us=_graph_us(fwd))
    result["op_fwd_bwd"] = dict(us=_graph_us(fwd_bwd))
    return result


def main(names: list[str]) -> None:
    from ceilings import measure_ceilings

    ceilings = measure_ceilings()
    for name in names or ["vitl-512"]:
        print(json.dumps(probe(WORKLOADS[name], ceilings), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
