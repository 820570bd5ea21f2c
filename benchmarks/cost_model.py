"""A static cost model of one fused Rein layer: for each device launch of its forward and
backward, the bytes it must move through device memory and the FLOPs it must do, from the
shapes alone; summed per layer and printed beside the floor.

    python benchmarks/cost_model.py [--workload vitl-512] [--x-dtype fp32] [--kernels v3 v2]

A layer as training runs it: inside ``ReinLayer.prepared()`` (the parameter operands are
formed once per step for all layers, so they are left out), under bf16 autocast with the
residual stream x in ``--x-dtype`` (fp32 when the frozen backbone runs in fp32 under
autocast, as the per-layer benchmark rows do; bf16 when its weights are cast to bf16, as the
library's training defaults do). Each launch counts every operand it reads and every result
it writes once per pass over it (a GEMM's epilogue re-reading its residual counts as a
pass); re-reads of a tile from L2 are not counted. The minimum (``bench.min_bytes``) is
x and out forward, g, x and dx backward, the two [C, C] weights and their fp32 gradients.

Predicted time per launch = max(FLOPs / peak, bytes / bandwidth) with the H200's measured
ceilings (benchmarks/results): a lower bound per launch, as the floor is for the layer.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import WORKLOADS, Workload, flops as floor_flops, min_bytes  # noqa: E402

ELT = {"fp32": 4, "bf16": 2}
# Measured on the H200 of 2026-11-30 (results/2026-11-30-nvidia-h200.json): bf16 GEMM
# TFLOP/s and device-to-device copy GB/s.
H200 = {"bf16_tflops": 672.3, "copy_gbps": 4266.6}


@dataclass
class Launch:
    name: str
    bytes: float
    flops: float

    def ms(self, ceilings=H200) -> float:
        return 1e3 * max(self.flops / (ceilings["bf16_tflops"] * 1e12), self.bytes / (ceilings["copy_gbps"] * 1e9))


def layer_launches(w: Workload, kernels: str = "v3", x_dtype: str = "fp32") -> list[Launch]:
    """The device launches of one layer's forward + backward, bf16 compute, in order."""
    R, C, m = w.rows, w.C, w.m
    ex, ec = ELT[x_dtype], 2
    act_x, act_c = R * C * ex, R * C * ec  # one pass over a [rows, C] tensor in x's / bf16
    weights = C * C * ec
    if kernels == "v3":
        cast = x_dtype != "bf16"
        return [
            Launch("logits fwd", act_x + R * 4 + R * (m - 1) * ec, 2 * R * C * m),
            Launch("gemm fwd", 2 * act_x + R * (m - 1) * ec + weights + act_x, 2 * R * C * (C + m - 1)),
            Launch("logits bwd", 2 * act_x + (act_c if cast else 0) + act_c + 2 * R * m * ec, 4 * R * C * m),
            Launch("gemm bwd", 2 * act_x + R * m * ec + weights + act_c + act_x, 2 * R * C * (C + m)),
            Launch("dT = gz^T x (cuBLAS)", R * m * ec + act_c, 2 * R * m * C),
            Launch("[dU; db_d] = P1a^T Gs (cuBLAS)", R * m * ec + act_c, 2 * R * m * C),
            Launch("dW_d = Gs^T x (cuBLAS)", 2 * act_c + weights, 2 * R * C * C),
            Launch("dscale = sum(shares)", 0, 0),
            Launch("dW_d accumulation (add)", 3 * weights, 0),
        ]
    if kernels == "v2":  # as profiled on the H200 (2026-11-28/30), inside prepared()
        cast = [Launch("cast x", act_x + act_c, 0), Launch("cast g", act_x + act_c, 0)] if x_dtype != "bf16" else []
        return [
            Launch("logits fwd", act_x + R * 4 + R * (m - 1) * ec, 2 * R * C * m),
            Launch("gemm fwd", 2 * act_x + R * (m - 1) * ec + weights + act_x, 2 * R * C * (C + m - 1)),
            Launch("zeros (partials)", 0, 0),
            Launch("logits bwd", 2 * act_x + 2 * R * m * ec, 4 * R * C * m),
            Launch("gemm bwd", 3 * act_x + R * m * ec + weights + act_x, 2 * R * C * (C + m)),
            *cast,
            Launch("sum_rows(g)", act_x, R * C),
            Launch("XtG (cuBLAS)", 2 * act_c + weights, 2 * R * C * C),
            Launch("PtG (cuBLAS)", R * m * ec + act_c, 2 * R * m * C),
            Launch("dT (cuBLAS)", R * m * ec + act_c, 2 * R * m * C),
            *[Launch(f"scale/cast {k}", 3 * weights if k == "dW_d" else 0, 0)
              for k in ("dT", "dU", "dW_d", "db_d", "dscale")],
            Launch("partials.sum + dot", 0, 0),
            *[Launch(f"accumulate {k}", 3 * weights if k == "dW_d" else 0, 0) for k in ("dW_d", "db_d", "scale")],
        ]
    raise ValueError(f"unknown kernels {kernels!r}")


def summary(w: Workload, kernels: str = "v3", x_dtype: str = "fp32") -> dict:
    launches = layer_launches(w, kernels, x_dtype)
    moved = sum(lc.bytes for lc in launches)
    least = min_bytes(w, "fwd+bwd", ELT[x_dtype])
    floor = 1e3 * max(floor_flops(w, "fwd+bwd") / (H200["bf16_tflops"] * 1e12), least / (H200["copy_gbps"] * 1e9))
    return dict(launches=len(launches), bytes=moved, min_bytes=least, bytes_ratio=moved / least,
                flops=sum(lc.flops for lc in launches), sum_of_bounds_ms=sum(lc.ms() for lc in launches),
                floor_ms=floor, rows=launches)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="vitl-512", choices=sorted(WORKLOADS))
    ap.add_argument("--x-dtype", default="fp32", choices=sorted(ELT))
    ap.add_argument("--kernels", nargs="+", default=["v3", "v2"])
    args = ap.parse_args()
    w = WORKLOADS[args.workload]
    for k in args.kernels:
        s = summary(w, k, args.x_dtype)
        print(f"\n{w.name}, kernels {k}, x {args.x_dtype}, bf16 compute: {s['launches']} launches per layer")
        print(f"  {'launch':34s} {'MB':>8s} {'GFLOP':>8s} {'bound us':>9s}")
        for lc in s["rows"]:
            print(f"  {lc.name:34s} {lc.bytes / 1e6:8.2f} {lc.flops / 1e9:8.2f} {lc.ms() * 1e3:9.1f}")
        print(f"  moved {s['bytes'] / 1e6:.1f} MB = {s['bytes_ratio']:.2f} x the minimum {s['min_bytes'] / 1e6:.1f} MB; "
              f"{s['flops'] / 1e9:.1f} GFLOP; sum of per-launch bounds {s['sum_of_bounds_ms'] * 1e3:.1f} us "
              f"against the floor {s['floor_ms'] * 1e3:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
