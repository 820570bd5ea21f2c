"""The one-shot GPU check: versions, ceilings, the parity suite natively, the benchmarks.

    OUT=/some/dir python benchmarks/gpu_check.py [--budget-s 450] [--parity-timeout-s 240] [--skip-parity]
        [--workloads vitl-512,vitg-512] [--heads light,mask2former] [--tests tests/test_parity.py ...]
        [--skip-layers] [--skip-e2e]

Writes ``$OUT/<date>-<HHMM>-<gpu>.json`` (schema: see make_results.py) after every
measurement, so a run stopped by its time limit still leaves what it measured,
``$OUT/parity.log``, and prints a short table last. Everything it imports is already on
the device image (torch, triton, timm, transformers, scipy, pytest); it installs nothing.
Work runs in the order of ``plan()``; once the time budget is spent the remaining cases
are recorded as skipped, not guessed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import torch  # noqa: E402
import triton  # noqa: E402

from bench import WORKLOADS, measure, workload_dict  # noqa: E402
from ceilings import measure_ceilings  # noqa: E402

PRIORITY = ["vitl-512", "vitl-1024", "vitg-512", "vits-512", "vitb-512", "vitl-512-b16"]


def device_info() -> dict:
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        driver = None
    return {
        "device": torch.cuda.get_device_name(),
        "driver": driver,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "fp32_matmul": "tf32 allowed (torch.backends.cuda.matmul.allow_tf32=True)",
    }


def run_parity(out: Path, timeout_s: float, tests: list[str]) -> dict:
    """The test suite, natively, in parallel workers when pytest-xdist is there (each new
    kernel specialisation is a compile); autotuning pinned to one config. Verbose, so
    that a run stopped by its time limit still names every test that failed."""
    import importlib.util

    env = dict(os.environ, REIN_AUTOTUNE="0", PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "pytest", *tests, "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider", "--durations=15"]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "8"]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        log = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log, rc = log + f"\nparity suite stopped after {timeout_s:.0f} s", -1
    (out / "parity.log").write_text(log)
    summary = log.strip().splitlines()[-1] if log.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", summary)}
    if rc == -1:  # stopped: count the verbose lines, so the summary still says what passed and failed
        counts = {k.lower(): len(re.findall(rf"\b{k}\b", log)) for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
        summary = f"stopped after {timeout_s:.0f} s: " + ", ".join(f"{v} {k}" for k, v in counts.items())
    return {"returncode": rc, "summary": summary, "counts": counts, "seconds": round(time.time() - t0, 1)}


def plan(names: list[str], heads: list[str], layers: bool, e2e: bool) -> list[tuple]:
    """What to measure, most important first (a short lease measures the head of it):
    the recipe's layer (vitl-512 bf16) per layer as a backbone runs it (stack: v3, v2,
    eager) and called alone (v3, v2, eager, compile); the training step with each head
    (library defaults, compile of the reference, the official setting); the sliding-window
    evaluation replayed and called; the previous default and transformers' loss, the whole
    step as one graph, then the like-for-like uncaptured rows and v2 captured; then the
    other workloads and fp32."""
    items = []
    first, rest = names[0], names[1:]
    if layers:
        for pass_ in ("fwd+bwd", "fwd"):
            items += [("layer", first, "bf16", pass_, p, "stack") for p in ("fused", "fused-v2", "eager")]
            items += [("layer", first, "bf16", pass_, p, "call") for p in ("fused", "fused-v2", "eager", "compile")]
        # a bf16 residual stream, as the library's training defaults run the layer
        items += [("layer", first, "bf16x", "fwd+bwd", p, "stack") for p in ("fused", "fused-v2", "eager")]
        items += [("layer", first, "bf16x", "fwd+bwd", p, "call") for p in ("fused", "compile")]
    if e2e:
        for head in heads:
            items += [("e2e", head, s) for s in ("library", "compile-reference", "official")]
        # the sliding-window evaluation of one Cityscapes image, replayed against called
        items += [("eval", head, dtype, graphs) for head in heads for dtype in ("fp32", "bf16")
                  for graphs in (True, False)]
        # the previous default (only the forward and backward captured) and transformers' loss
        items += [("e2e", head, "library-forward-graphs") for head in heads]
        items += [("e2e", "mask2former", "library-transformers-loss")] if "mask2former" in heads else []
        items += [("e2e", heads[0], s) for s in ("library-graph", "library-compile-graph", "library-triton-op")]
        for head in heads:
            items += [("e2e", head, s) for s in ("fused-bf16", "eager-bf16", "library-v2")]
    if layers:
        for name in rest:
            items += [("layer", name, "bf16", "fwd+bwd", p, "stack") for p in ("fused", "fused-v2", "eager")]
        items += [("layer", first, "fp32", "fwd+bwd", p, "stack") for p in ("fused", "fused-v2", "eager")]
        for name in rest:
            items += [("layer", name, "bf16", "fwd+bwd", "compile", "call")]
    return items


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="start no new measurement after this many seconds (the rest is recorded as skipped)")
    ap.add_argument("--parity-timeout-s", type=float, default=240.0)
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--heads", default="light,mask2former", help="the training step's heads, in this order")
    ap.add_argument("--workloads", default=",".join(PRIORITY),
                    help="comma-separated workload names, the first one measured most")
    ap.add_argument("--tests", nargs="+", default=["tests"], help="what the native test run covers")
    args = ap.parse_args()
    names = args.workloads.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        print(f"gpu_check: unknown workload(s) {unknown}; choose from {sorted(WORKLOADS)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing to measure", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT", ROOT / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    info = device_info()
    print(json.dumps(info, indent=1), flush=True)

    ceilings = measure_ceilings()
    print("ceilings:", json.dumps({k: round(v, 1) for k, v in ceilings.items()}), flush=True)

    gpu = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()
    path = out / f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d-%H%M}-{gpu}.json"
    results, skipped, e2e = [], [], []
    report = dict(info, ceilings=ceilings, parity=None, workloads=[workload_dict(WORKLOADS[n]) for n in names],
                  results=results, skipped=skipped, e2e=e2e, seconds=None)

    def save():
        report["seconds"] = round(time.time() - start, 1)
        path.write_text(json.dumps(report, indent=1, default=str))

    save()
    parity = None if args.skip_parity else run_parity(out, args.parity_timeout_s, args.tests)
    report["parity"] = parity
    save()
    if parity:
        print("parity:", parity["summary"], f"({parity['seconds']} s)", flush=True)

    torch.backends.cuda.matmul.allow_tf32 = True
    for item in plan(names, args.heads.split(","), not args.skip_layers, not args.skip_e2e):
        if time.time() - start > args.budget_s:
            skipped.append(dict(item=item, reason="time budget spent"))
            continue
        try:
            if item[0] == "layer":
                _, name, dtype, pass_, provider, mode = item
                row = measure(WORKLOADS[name], provider, dtype, pass_, "cuda", ceilings, mode=mode)
                results.append(row)
                print(f"{name:10s} {dtype} {pass_:7s} {mode:5s} {provider:9s} events {row['median_ms']:7.3f} "
                      f"graph {row.get('graph_ms') or float('nan'):7.3f} host {row.get('host_ms') or 0:7.3f} ms "
                      f"(floor {row['floor_ms']:.3f}) {row.get('graph_error', '')}", flush=True)
            elif item[0] == "eval":
                from e2e import measure_evaluation

                _, head, dtype, graphs = item
                row = measure_evaluation(head, dtype, "cuda", graphs)
                e2e.append(row)
                print("eval", row, flush=True)
            else:
                _, head, setting = item
                row = run_e2e(head, setting)
                e2e.append(row)
                print("e2e", row, flush=True)
        except Exception as e:  # record and go on: one failure must not cost the run
            skipped.append(dict(item=item, reason=f"{type(e).__name__}: {e}"[:500]))
            print("failed:", item, skipped[-1]["reason"][:300], flush=True)
            torch.cuda.empty_cache()
        save()

    report["kernels"] = compiled_kernels()
    save()
    print_table(report, names)
    print(f"wrote {path}")
    return 0 if (parity is None or parity["returncode"] == 0) else 1


def run_e2e(head: str, setting: str) -> dict:
    """One training-step row: ``e2e.SETTINGS[setting]`` with ``head`` (vitl-512)."""
    from e2e import SETTINGS, measure as measure_e2e

    kw = {k: v for k, v in SETTINGS[setting].items() if k not in ("fused", "dtype")}
    s = SETTINGS[setting]
    return dict(workload="vitl-512", **measure_e2e(s["fused"], s["dtype"], "cuda", provider=setting, head=head, **kw))


def compiled_kernels() -> dict:
    """What the GPU actually ran: each autotuned kernel's chosen config per key, and each
    compiled variant's registers and spill bytes as the driver loaded it (issue 13 predicts
    these from an ahead-of-time ptxas; this is the native count)."""
    import rein_kernels.rein_layer as op

    found = {}
    for name, tuners in (("gemm", op._GEMM), ("logits", op._LOGITS)):
        entry = {"best": {f"{path} {k}": str(c) for path, tuner in tuners.items()
                          for k, c in getattr(tuner, "cache", {}).items()}, "variants": []}
        jit = next(iter(tuners.values())).fn  # one jit function behind every path's autotuner
        try:
            for caches in jit.device_caches.values():
                for k in caches[0].values():
                    md, src = k.metadata, getattr(k, "src", None)
                    consts = {src.fn.arg_names[i[0]]: v for i, v in getattr(src, "constants", {}).items()
                              if isinstance(i, tuple) and len(i) == 1} if src is not None else {}
                    entry["variants"].append(dict(
                        constexprs={n: v for n, v in consts.items() if n.isupper()},
                        dtypes={n: t for n, t in getattr(src, "signature", {}).items()
                                if n in ("A", "A2", "X", "T") and isinstance(t, str)},
                        n_regs=getattr(k, "n_regs", None),
                        # the driver's local memory per thread / 4 (spilled 32-bit words)
                        n_spills=getattr(k, "n_spills", None),
                        num_warps=getattr(md, "num_warps", None), num_stages=getattr(md, "num_stages", None),
                        shared=getattr(md, "shared", None)))
        except Exception as e:  # a triton version with another cache layout: say so, keep the run
            entry["error"] = f"{type(e).__name__}: {e}"[:300]
        found[name] = entry
    return found


def print_table(report: dict, names: list[str]) -> None:
    """Device time per layer (graph replay, ms) by provider, then the training steps."""
    by = {(r["workload"], r["dtype"], r["pass"], r.get("mode", "call"), r["provider"]): r for r in report["results"]}
    providers = ("eager", "compile", "fused-v2", "fused")
    print(f"\n{'workload':10s} {'dtype':5s} {'pass':7s} {'mode':5s} " + " ".join(f"{p:>9s}" for p in providers)
          + f" {'floor':>7s} {'/floor':>6s} {'v2/v3':>6s} {'comp/v3':>7s}")
    for name in names:
        for dtype in ("bf16", "bf16x", "fp32"):
            for pass_ in ("fwd+bwd", "fwd"):
                for mode in ("stack", "call"):
                    t = {p: by.get((name, dtype, pass_, mode, p), {}).get("graph_ms") for p in providers}
                    if not any(t.values()):
                        continue
                    fl = next((r["floor_ms"] for k, r in by.items() if k[:4] == (name, dtype, pass_, mode)), None)

                    def ratio(a, b):
                        return f"{a / b:6.2f}" if a and b else f"{'-':>6s}"

                    print(f"{name:10s} {dtype:5s} {pass_:7s} {mode:5s} "
                          + " ".join(f"{v:9.3f}" if v else f"{'-':>9s}" for v in t.values())
                          + f" {fl or 0:7.3f} {ratio(t['fused'], fl)} {ratio(t['fused-v2'], t['fused'])} "
                          f"{ratio(t['compile'], t['fused']):>7s}")
    for row in report["e2e"]:
        print(f"{row.get('workload', 'vitl-512'):16s} {row.get('head', 'light'):11s} {row.get('provider'):17s} "
              f"{row.get('dtype')} "
              f"{row.get('median_ms') or 0:7.1f} ms, host {row.get('host_ms') or 0:6.1f} ms, peak "
              f"{row.get('peak_mem_mb') or 0:7.0f} MB {row.get('error', '')}")
    if report["parity"]:
        print("parity:", report["parity"]["summary"])


if __name__ == "__main__":
    sys.exit(main())
