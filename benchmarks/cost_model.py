"""A static cost model of one fused Rein layer: for each device launch of its forward and
backward, the bytes it must move through device memory and the FLOPs it must do, from the
shapes alone; summed per layer and printed beside the floor.

    python benchmarks/cost_model.py [--workload vitl-512] [--x-dtype fp32] [--kernels v4 v4-streamed v3]

A layer as training runs it: inside ``ReinLayer.prepared()`` (the parameter operands are
formed once per step for all layers, so they are left out), under bf16 autocast with the
residual stream x in ``--x-dtype`` (fp32 when the frozen backbone runs in fp32 under
autocast, as the per-layer benchmark rows do; bf16 when its weights are cast to bf16, as the
library's training defaults do). Each launch counts every operand it reads and every result
it writes once per pass over it (a GEMM's epilogue re-reading its residual counts as a
pass); re-reads of a tile from L2 are not counted. The minimum (``bench.min_bytes``) is
x and out forward, g, x and dx backward, the two [C, C] weights and their fp32 gradients.

Bound per launch = max(FLOPs / peak, bytes / bandwidth) with the H200's measured ceilings
(benchmarks/results): a lower bound, as the floor is for the layer. For v4 the model also
predicts each launch at the rate the kernel probe measured it at (``V4_EFFICIENCY``, the
bound over the measured time at vitl-512), for the other workloads and dtypes; and
"v4-streamed", v4 with its row kernels' streamed layout at an assumed rate (below).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import WORKLOADS, Workload, flops as floor_flops, min_bytes  # noqa: E402

ELT = {"fp32": 4, "bf16": 2}
# Measured on the H200 of 2026-12-04 (results/2026-12-04-1804-nvidia-h200.json): bf16 GEMM
# TFLOP/s and device-to-device copy GB/s.
H200 = {"bf16_tflops": 687.1, "copy_gbps": 4266.5}
# What each v4 launch achieved of its bound at vitl-512 in that run's kernel probe (x fp32):
# the bound over the measured time. A prediction for another shape divides that shape's
# bound by these; they are the model's measured rates, re-measured by every probe row.
# The weight gradients were two GEMMs then, [dW ; dT] (13.88 / 25.68) and [dU ; db]
# (1.222 / 9.538); they are one now, [G | GZ]^T [XC | P1a], not yet measured: ASSUMED at
# [dW ; dT]'s rate (the same waves of output tiles, m columns wider).
V4_EFFICIENCY = {"rows fwd": 10.06 / 25.72, "gemm fwd (addmm in place)": 13.88 / 18.48,
                 "rows bwd": 16.18 / 71.35, "gemm dx (addmm in place)": 13.88 / 18.49,
                 "weight gradients (cuBLAS, fp32 out)": 13.88 / 25.68}
# The row kernels' streamed layout (``rein_layer_v4.row_layout``: stream programs beside
# each block's row program) has not run on a GPU yet. ASSUMED, not measured: it streams at
# 0.6 of the copy bandwidth (torch's own copy kernels reach 0.8-0.9 of it; the second read
# of x and g, from L2, and the row programs' latency cost the rest). The probe's
# rows_*_streamed rows measure it; replace this with their rate.
V4_STREAMED_ROWS_EFFICIENCY = 0.6


@dataclass
class Launch:
    name: str
    bytes: float
    flops: float
    efficiency: float = 1.0  # measured fraction of the bound (1: the bound itself)

    def ms(self, ceilings=H200) -> float:
        """The launch's bound: max(FLOPs / peak, bytes / bandwidth)."""
        return 1e3 * max(self.flops / (ceilings["bf16_tflops"] * 1e12), self.bytes / (ceilings["copy_gbps"] * 1e9))

    def predicted_ms(self, ceilings=H200) -> float:
        """The bound at the rate the launch was measured at."""
        return self.ms(ceilings) / self.efficiency


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


def layer_launches(w: Workload, kernels: str = "v4", x_dtype: str = "fp32") -> list[Launch]:
    """The device launches of one layer's forward + backward, bf16 compute, in order."""
    R, C, m = w.rows, w.C, w.m
    ex, ec = ELT[x_dtype], 2
    act_x, act_c = R * C * ex, R * C * ec  # one pass over a [rows, C] tensor in x's / bf16
    weights = C * C * ec
    if kernels in ("v4", "v4-streamed"):
        K = _pad16(C) + _pad16(m)
        A, W1 = R * K * ec, 2 * R * K * ec  # the forward's GEMM operand, the backward's four
        eff = dict(V4_EFFICIENCY)
        if kernels == "v4-streamed":
            eff["rows fwd"] = eff["rows bwd"] = V4_STREAMED_ROWS_EFFICIENCY
        return [
            Launch("rows fwd", act_x + act_x + A + C * K * ec, 2 * R * C * m, eff["rows fwd"]),
            Launch("gemm fwd (addmm in place)", A + C * K * ec + 2 * act_x, 2 * R * C * K,
                   eff["gemm fwd (addmm in place)"]),
            Launch("rows bwd", 3 * act_x + W1 + K * C * ec, 4 * R * C * m, eff["rows bwd"]),
            Launch("gemm dx (addmm in place)", W1 / 2 + K * C * ec + 2 * act_x, 2 * R * C * K,
                   eff["gemm dx (addmm in place)"]),
            Launch("weight gradients (cuBLAS, fp32 out)", W1 + K * K * 4, 2 * R * K * K,
                   eff["weight gradients (cuBLAS, fp32 out)"]),
            Launch("dW stack and sum (per layer's share)", 2 * C * C * 4, 0),
        ]
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
    raise ValueError(f"unknown kernels {kernels!r}")


def summary(w: Workload, kernels: str = "v4", x_dtype: str = "fp32") -> dict:
    launches = layer_launches(w, kernels, x_dtype)
    moved = sum(lc.bytes for lc in launches)
    least = min_bytes(w, "fwd+bwd", ELT[x_dtype])
    floor = 1e3 * max(floor_flops(w, "fwd+bwd") / (H200["bf16_tflops"] * 1e12), least / (H200["copy_gbps"] * 1e9))
    return dict(launches=len(launches), bytes=moved, min_bytes=least, bytes_ratio=moved / least,
                flops=sum(lc.flops for lc in launches), sum_of_bounds_ms=sum(lc.ms() for lc in launches),
                predicted_ms=sum(lc.predicted_ms() for lc in launches), floor_ms=floor, rows=launches)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="vitl-512", choices=sorted(WORKLOADS))
    ap.add_argument("--x-dtype", default="fp32", choices=sorted(ELT))
    ap.add_argument("--kernels", nargs="+", default=["v4", "v4-streamed", "v3"])
    args = ap.parse_args()
    w = WORKLOADS[args.workload]
    for k in args.kernels:
        s = summary(w, k, args.x_dtype)
        print(f"\n{w.name}, kernels {k}, x {args.x_dtype}, bf16 compute: {s['launches']} launches per layer")
        print(f"  {'launch':38s} {'MB':>8s} {'GFLOP':>8s} {'bound us':>9s} {'at measured rate':>17s}")
        for lc in s["rows"]:
            print(f"  {lc.name:38s} {lc.bytes / 1e6:8.2f} {lc.flops / 1e9:8.2f} {lc.ms() * 1e3:9.1f} "
                  f"{lc.predicted_ms() * 1e3:17.1f}")
        print(f"  moved {s['bytes'] / 1e6:.1f} MB = {s['bytes_ratio']:.2f} x the minimum {s['min_bytes'] / 1e6:.1f} MB; "
              f"{s['flops'] / 1e9:.1f} GFLOP; sum of per-launch bounds {s['sum_of_bounds_ms'] * 1e3:.1f} us, at the "
              f"measured rates {s['predicted_ms'] * 1e3:.1f} us, against the floor {s['floor_ms'] * 1e3:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
