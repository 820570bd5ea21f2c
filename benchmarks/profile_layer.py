"""Where one Rein layer call spends its time on a GPU: host, device, and per kernel.

    OUT=/some/dir python benchmarks/profile_layer.py [--workload vitl-512] [--dtypes bf16 fp32]

For each provider (eager, compile, fused) and pass it reports three times per call:
``events`` (do_bench's CUDA-event median, what gpu_check records), ``graph`` (the same
call captured once in a CUDA graph and replayed: device time alone, no host work) and
``host`` (wall time of 200 back-to-back calls without synchronising, per call: when it
is close to ``events`` the call is bound by its Python/launch overhead, not the GPU).
Then the top device kernels and host ops of the fused call from torch.profiler.
Writes ``$OUT/profile-<workload>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
import triton.testing  # noqa: E402

from bench import PASSES, PROVIDERS, WORKLOADS, Case, graph_ms, host_ms  # noqa: E402


def top_ops(case: Case, n: int = 12) -> dict:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        case()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            case()
        torch.cuda.synchronize()
    avg = prof.key_averages()

    def dev(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    by_dev = sorted(avg, key=dev, reverse=True)[:n]
    by_cpu = sorted(avg, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return {
        "device_us_per_call": [(e.key[:80], round(dev(e) / 20, 1), e.count // 20) for e in by_dev if dev(e) > 0],
        "host_self_us_per_call": [(e.key[:80], round(e.self_cpu_time_total / 20, 1), e.count // 20) for e in by_cpu],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="vitl-512", choices=sorted(WORKLOADS))
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp32"])
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_layer: no CUDA GPU here", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(os.environ.get("OUT", HERE / "results"))
    out.mkdir(parents=True, exist_ok=True)
    w = WORKLOADS[args.workload]
    rows = []
    for dtype in args.dtypes:
        for pass_ in PASSES:
            for provider in args.providers:
                row = dict(workload=w.name, dtype=dtype, provider=provider, **{"pass": pass_})
                try:
                    case = Case(w, provider, dtype, pass_, "cuda")
                    case.run_synced()
                    row["events_ms"] = triton.testing.do_bench(case, warmup=50, rep=300, return_mode="median")
                    row["host_ms"] = host_ms(case, n=200)
                    row["graph_ms"] = graph_ms(case) if provider != "compile" else None
                    if provider == "fused":
                        row["profile"] = top_ops(case)
                except Exception as e:  # one failure must not cost the others
                    row["error"] = f"{type(e).__name__}: {e}"[:400]
                rows.append(row)
                (out / f"profile-{w.name}.json").write_text(json.dumps(rows, indent=1, default=str))
                print(f"{w.name} {dtype} {pass_:7s} {provider:8s} events {row.get('events_ms', 0):7.3f} "
                      f"host {row.get('host_ms', 0):7.3f} graph {row.get('graph_ms') or 0:7.3f} ms "
                      f"{row.get('error', '')}", flush=True)
    for row in rows:
        if "profile" in row:
            print(f"\n-- fused {row['dtype']} {row['pass']}: device us/call (kernel, us, launches)")
            for k in row["profile"]["device_us_per_call"]:
                print("  ", k)
            print("   host self us/call")
            for k in row["profile"]["host_self_us_per_call"]:
                print("  ", k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
