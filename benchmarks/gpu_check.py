"""The one-shot GPU check: versions, ceilings, the parity suite natively, the benchmarks.

    OUT=/some/dir python benchmarks/gpu_check.py [--budget-s 450] [--parity-timeout-s 240] [--skip-parity]
        [--workloads vitl-512,vitg-512] [--heads mask2former,light] [--tests tests/test_parity.py ...]
        [--skip-layers] [--skip-e2e] [--only 'e2e/*/library,ttfs/*'] [--limit 'e2e/mask2former/*=330,layer/*=45']
        [--min-row-s 20] [--cache-dir /tmp/rein-gpu-check-cache] [--list]

Every row (the ceilings, the parity suite, each layer, training-step, time-to-first-step
and evaluation row) runs in a child process of its own, in its own process group, under
its own time limit (``DEFAULT_LIMITS``, overridden by ``--limit PATTERN=SECONDS``, the
first matching pattern winning; patterns match the row ids ``--list`` prints). A row
starts only while at least ``--min-row-s`` of the budget is left, and gets its limit or
what is left of the budget, whichever is less. The child reports each phase as it enters
it (building, compiling, recording, measuring; ``isolate.py``); a row past its limit is
killed with its whole process group (Inductor's compile workers included) and recorded
with the phase it was in and the seconds each phase took, and the call goes on with the
next row. The JSON (schema: make_results.py) is written after every row, so a call stopped
from outside still leaves what it measured; ``$OUT/parity.log`` keeps the suite's output,
and a short table comes last. Everything it imports is already on the device image
(torch, triton, timm, transformers, scipy, pytest); it installs nothing.

torch.compile's on-disk caches (Inductor's FX graph cache, AOTAutograd's, Triton's) live
under ``--cache-dir``: for each head, the library setting's ``e2e`` row starts with a folder
of its own emptied (a cold start, in a fresh process) and its ``ttfs`` row finds it as that
row left it (a warm start, in another fresh process); every other row shares one folder.
"""
from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import isolate  # noqa: E402  (standard library only: the parent imports torch in main(), children as they need)

PRIORITY = ["vitl-512", "vitl-1024", "vitg-512", "vits-512", "vitb-512", "vitl-512-b16"]
# The layer rows' providers, data: a new kernel version is one more name here ("fused-v4"
# runs kernels v4: bench.Case takes the version from the name).
STACK_PROVIDERS = ("fused-v4", "fused-v3", "eager")
CALL_PROVIDERS = STACK_PROVIDERS + ("compile",)
BF16X_CALL_PROVIDERS = ("fused-v4", "fused-v3", "compile")
# the training-step settings whose warm start (``ttfs`` row) follows their cold one (``e2e`` row)
TTFS_SETTINGS = ("library",)

# Seconds per row on an H200, first matching pattern first (--limit's patterns go before
# these). A Mask2Former step compiled cold has taken more than 240 s (benchmarks/NOTES.md).
DEFAULT_LIMITS = [
    ("ceilings", 90),
    ("probe/*", 90),
    ("layer/*/compile", 120),
    ("layer/*", 60),
    ("eval/*", 120),
    ("e2e/mask2former/*", 360),
    ("ttfs/mask2former/*", 240),
    ("e2e/*", 240),
    ("step/*", 240),
    ("ttfs/*", 180),
    ("*", 120),
]
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "rein-gpu-check-cache"


def row_id(item) -> str:
    """The row's name in the JSON, the log and the patterns of --only and --limit."""
    kind = item[0]
    if kind == "eval":
        _, head, dtype, graphs = item
        return f"eval/{head}/{dtype}/{'window-graph' if graphs else 'uncaptured'}"
    if kind == "layer":  # layer/workload/dtype/pass/mode/provider
        _, name, dtype, pass_, provider, mode = item
        return f"layer/{name}/{dtype}/{pass_}/{mode}/{provider}"
    return "/".join(str(x) for x in item if not isinstance(x, dict))


def plan(names: list[str], heads: list[str], layers: bool, e2e: bool) -> list[tuple]:
    """What to measure, most important first (a short call measures the head of it). Per
    head, in the order given (Mask2Former first by default): the library's training step
    (a cold start), its warm start (``ttfs``), compile of the reference and the official
    setting; the sliding-window evaluation replayed and called; the previous default,
    transformers' loss and the matching on the host (Mask2Former), the whole step as one
    graph, then the like-for-like uncaptured rows and v3 captured. Then the recipe's layer (vitl-512 bf16)
    as a backbone runs it (stack) and called alone (call), a bf16 residual stream, the
    other workloads and fp32."""
    items = []
    if e2e:
        for head in heads:
            for s in ("library", "compile-reference", "official"):
                items.append(("e2e", head, s))
                items += [("ttfs", head, s, "warm")] if s in TTFS_SETTINGS else []
            # the sliding-window evaluation of one Cityscapes image, replayed against called
            items += [("eval", head, dtype, graphs) for dtype in ("fp32", "bf16") for graphs in (True, False)]
            # the model compiled whole rather than regionally
            items.append(("e2e", head, "library-whole"))
            # the previous default (only the forward and backward captured) and transformers' loss
            items.append(("e2e", head, "library-forward-graphs"))
            items += [("e2e", head, "library-transformers-loss")] if head == "mask2former" else []
            # the matching on the host, between two graphs of the loss (before 2026-12-06)
            items += [("e2e", head, "library-host-matching")] if head == "mask2former" else []
            # the whole step as one CUDA graph (Mask2Former: its matching on the GPU)
            items += [("e2e", head, s) for s in ("library-graph", "library-compile-graph")]
            items += [("e2e", head, "library-triton-op")] if head == heads[0] else []
            items += [("e2e", head, s) for s in ("library-v3", "fused-bf16", "eager-bf16")]
    if e2e and "vit7b-512" in names:  # ViT-7B on one GPU: bf16 weights, activation checkpointing
        items += [("step", "vit7b-512", head, "fused-bf16") for head in heads]
    if layers:
        first, rest = names[0], names[1:]
        # each launch of the layer beside cuBLAS and the bandwidth bound at the shape
        items += [("probe", name) for name in names]
        for pass_ in ("fwd+bwd", "fwd"):
            items += [("layer", first, "bf16", pass_, p, "stack") for p in STACK_PROVIDERS]
            items += [("layer", first, "bf16", pass_, p, "call") for p in CALL_PROVIDERS]
        # a bf16 residual stream, as the library's training defaults run the layer
        items += [("layer", first, "bf16x", "fwd+bwd", p, "stack") for p in STACK_PROVIDERS]
        items += [("layer", first, "bf16x", "fwd+bwd", p, "call") for p in BF16X_CALL_PROVIDERS]
        for name in rest:
            items += [("layer", name, "bf16", "fwd+bwd", p, "stack") for p in STACK_PROVIDERS]
        items += [("layer", first, "fp32", "fwd+bwd", p, "stack") for p in STACK_PROVIDERS]
        for name in rest:
            items += [("layer", name, "bf16", "fwd+bwd", "compile", "call")]
    return items


def parse_limits(texts: list[str]) -> list[tuple[str, float]]:
    """``--limit`` values (``PATTERN=SECONDS``, comma-separated, repeatable), in order."""
    out = []
    for text in texts:
        for entry in filter(None, text.split(",")):
            pattern, _, seconds = entry.rpartition("=")
            if not pattern:
                raise ValueError(f"--limit {entry!r}: give PATTERN=SECONDS")
            out.append((pattern.strip(), float(seconds)))
    return out


def limit_for(rid: str, limits: list[tuple[str, float]]) -> float:
    return next(s for p, s in limits if fnmatch.fnmatchcase(rid, p))


def cache_dir_for(item, root: Path) -> Path:
    """torch.compile's on-disk caches of a row: a folder of its own for each (head, setting)
    timed to its first step (``TTFS_SETTINGS``: the e2e row starts it empty, the ttfs row
    after it finds it as the e2e row left it), one shared by every other row (so that the
    other settings reuse the Triton kernels they have in common, as one process did)."""
    if item[0] == "ttfs" or (item[0] == "e2e" and item[2] in TTFS_SETTINGS):
        return root / f"step-{item[1]}-{item[2]}"
    return root / "shared"


def cold_start(item) -> bool:
    """Rows whose cache folder is emptied first: the e2e row of a setting timed to its
    first step, and a ttfs row asked to start cold."""
    return (item[0] == "e2e" and item[2] in TTFS_SETTINGS) or (item[0] == "ttfs" and item[3] == "cold")


def _files_in(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder)) if folder.is_dir() else 0


# ----------------------------------------------------------------------------- the parent


def device_info() -> dict:
    """Versions and the device, without a CUDA context in this process (the ceilings row's
    child names the device as torch sees it)."""
    import torch
    import triton

    def smi(field):
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
            return out.splitlines()[0].strip() if out else None
        except (OSError, subprocess.TimeoutExpired):
            return None

    return {
        "device": smi("name"),
        "driver": smi("driver_version"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "fp32_matmul": "tf32 allowed (torch.backends.cuda.matmul.allow_tf32=True)",
    }


def new_report(info: dict, workloads: list | None = None) -> dict:
    return dict(info, ceilings=None, parity=None, workloads=workloads or [], results=[], skipped=[], e2e=[],
                ttfs=[], rows=[], probe=[], kernels={}, seconds=None)


def child_env(cache: Path, extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}",
               TORCHINDUCTOR_CACHE_DIR=str(cache), TRITON_CACHE_DIR=str(cache / "triton"),
               # on in torch 2.11 and 2.14 by default; forced, so that warm means warm
               TORCHINDUCTOR_FX_GRAPH_CACHE="1", TORCHINDUCTOR_AUTOGRAD_CACHE="1")
    env.update(extra or {})
    return env


def run_rows(items, report: dict, save, *, budget_s: float, start: float, limits, cache_root: Path,
             events_dir: Path, min_row_s: float = 20.0, out: Path | None = None, pytest_args=None,
             print_fn=print) -> None:
    """Each item in a child process of its own (``isolate.run_child``), in order, filed into
    ``report`` as it ends and ``save()``d after every row. A row starts only while
    ``min_row_s`` of the budget is left, and runs at most min(its limit, what is left)."""
    for n, item in enumerate(items):
        rid = row_id(item)
        left = budget_s - (time.time() - start)
        if left < min_row_s:
            rec = dict(status="budget", phase=None, phases={}, seconds=0.0, limit_s=None,
                       error=f"time budget spent ({max(left, 0):.0f} s left; a row starts with at least "
                             f"{min_row_s:.0f} s)")
            _file(report, item, rid, rec, out=out)
            save()
            continue
        limit = min(limit_for(rid, limits), left)
        cache = cache_dir_for(item, cache_root)
        if cold_start(item):
            shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        files_before = _files_in(cache)
        events = events_dir / f"{n:03d}.jsonl"
        spec = dict(id=rid, item=item, events=str(events), parent=os.getpid(), ceilings=report.get("ceilings"),
                    cache_dir=str(cache), cache_files_before=files_before, pytest=pytest_args)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
        env = child_env(cache, {"REIN_AUTOTUNE": "0"} if item[0] == "parity" else None)
        print_fn(f"[{time.time() - start:5.0f} s] {rid}: starting (limit {limit:.0f} s)", flush=True)

        def on_phase(phase, seconds, rid=rid):
            if phase != "starting":
                print_fn(f"[{time.time() - start:5.0f} s] {rid}: {phase} ({seconds:.0f} s in)", flush=True)

        log = open(out / "parity.log", "w") if item[0] == "parity" else None
        try:
            rec = isolate.run_child(cmd, limit, events, env=env, cwd=ROOT, stdout=log, on_phase=on_phase)
        except isolate.RowStopped as stop:
            _file(report, item, rid, stop.record, files_before, out)
            save()
            raise stop.cause from None
        finally:
            if log is not None:
                log.close()
        _file(report, item, rid, rec, files_before, out)
        save()
        _print_row(print_fn, rid, rec, time.time() - start)


def _file(report: dict, item, rid: str, rec: dict, files_before: int | None = None,
          out: Path | None = None) -> None:
    """One finished row into the report: its entry in ``rows`` (every row, in order), its
    measurement where it belongs (``results``: layers, ``e2e``: training steps and
    evaluation, ``ttfs``: times to the first replayed step; a row that did not finish in
    ``skipped`` with the reason, the phase it was in and the seconds of each phase)."""
    kind = item[0]
    summary = {k: rec.get(k) for k in ("status", "phase", "phases", "seconds", "limit_s")}
    report["rows"].append(dict(id=rid, **summary, **({"error": rec["error"]} if rec.get("error") else {})))
    if kind == "parity":
        report["parity"] = _parity_summary(rec, out)
        return
    ok = rec["status"] == "ok"
    if not ok:
        report["skipped"].append(dict(item=item, id=rid, reason=isolate.reason(rec) if rec["status"] != "budget"
                                      else rec["error"], **summary))
    if (kind == "ttfs" or cold_start(item)) and rec["status"] != "budget":  # the time to the first replay
        _, head, setting, *cache = item
        entry = dict(id=rid, head=head, provider=setting, cache=cache[0] if cache else "cold",
                     status=rec["status"], cache_files_before=files_before)
        if ok:
            r = rec["result"]
            entry.update({k: r.get(k) for k in ("dtype", "build_s", "first_step_s", "record_s", "ttfs_s",
                                                  "cache_counters")})
        else:
            entry.update(phase=rec["phase"], phases=rec["phases"], seconds=rec["seconds"])
        report["ttfs"].append(entry)
    if not ok:
        return
    row = dict(rec["result"], id=rid, phases=rec["phases"], seconds=rec["seconds"])
    if kind == "ceilings":
        report["ceilings"] = row["ceilings"]
        report["device"] = row.get("device") or report.get("device")
    elif kind in ("layer", "fake"):
        report["results"].append(row)
    elif kind in ("e2e", "eval", "step"):
        report["e2e"].append(row)
    elif kind == "probe":
        report.setdefault("probe", []).append(row)
    for name, entry in ((rec.get("extra") or {}).get("kernels") or {}).items():
        into = report["kernels"].setdefault(name, {"best": {}, "variants": []})
        into["best"].update(entry.get("best", {}))
        into["variants"] += [v for v in entry.get("variants", []) if v not in into["variants"]]
        if "error" in entry:
            into["error"] = entry["error"]


def _parity_summary(rec: dict, out: Path | None) -> dict:
    if rec["status"] == "budget":
        return dict(returncode=None, summary=f"not run: {rec['error']}", counts={}, seconds=0.0, status="budget")
    log_path = Path(out or ".") / "parity.log"
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    rc = (rec.get("result") or {}).get("returncode", -1) if rec["status"] == "ok" else -1
    summary = log.strip().splitlines()[-1] if log.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", summary)}
    if rc == -1:  # stopped: count the verbose lines, so the summary still says what passed and failed
        counts = {k.lower(): len(re.findall(rf"\b{k}\b", log)) for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
        summary = f"{isolate.reason(rec) if rec['status'] != 'ok' else 'no result'}: " + ", ".join(
            f"{v} {k}" for k, v in counts.items())
    return dict(returncode=rc, summary=summary, counts=counts, seconds=rec["seconds"], status=rec["status"],
                phase=rec["phase"], limit_s=rec["limit_s"])


def _print_row(print_fn, rid: str, rec: dict, at: float) -> None:
    phases = ", ".join(f"{k} {v:.1f}" for k, v in rec["phases"].items())
    head = f"[{at:5.0f} s] {rid}: {rec['status']} in {rec['seconds']:.0f} s ({phases})"
    if rec["status"] != "ok":
        print_fn(f"{head}: {isolate.reason(rec)}", flush=True)
        return
    row = rec["result"] or {}
    if rid.startswith("layer/"):
        print_fn(f"{head}: events {row['median_ms']:.3f} graph {row.get('graph_ms') or float('nan'):.3f} "
                 f"host {row.get('host_ms') or 0:.3f} ms (floor {row.get('floor_ms') or float('nan'):.3f}) "
                 f"{row.get('graph_error', '')}", flush=True)
    else:
        print_fn(f"{head}: {json.dumps({k: v for k, v in row.items() if k != 'cache_counters'}, default=str)}",
                 flush=True)


def install_stop_handlers() -> None:
    """SIGTERM, SIGINT and SIGHUP raise isolate.Stopped: the running row is killed and
    recorded as stopped, the JSON written, and the call ends."""
    def stop(signum, frame):
        raise isolate.Stopped(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, stop)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="seconds for the whole call; no row starts with less than --min-row-s of it left, and "
                         "none runs past it (the rest is recorded as skipped)")
    ap.add_argument("--min-row-s", type=float, default=20.0, help="start no row with less of the budget left")
    ap.add_argument("--parity-timeout-s", type=float, default=240.0, help="the parity suite's limit")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--heads", default="mask2former,light", help="the training step's heads, in this order")
    ap.add_argument("--workloads", default=",".join(PRIORITY),
                    help="comma-separated workload names, the first one measured most")
    ap.add_argument("--only", default=None,
                    help="comma-separated patterns (fnmatch) of the row ids to run, e.g. 'e2e/*/library,ttfs/*'")
    ap.add_argument("--limit", action="append", default=[],
                    help="PATTERN=SECONDS[,...]: a row's limit, before the defaults (first match wins)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                    help="torch.compile's on-disk caches (kept between rows and calls on one machine)")
    ap.add_argument("--list", action="store_true", help="print the rows and their limits, run nothing")
    ap.add_argument("--tests", nargs="+", default=["tests"], help="what the native test run covers")
    args = ap.parse_args()
    from bench import WORKLOADS, workload_dict

    names = args.workloads.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        print(f"gpu_check: unknown workload(s) {unknown}; choose from {sorted(WORKLOADS)}", file=sys.stderr)
        return 2
    limits = parse_limits(args.limit) + [("parity", args.parity_timeout_s)] + DEFAULT_LIMITS
    items = [("ceilings",)] + ([] if args.skip_parity else [("parity",)])
    items += plan(names, args.heads.split(","), not args.skip_layers, not args.skip_e2e)
    if args.only:
        patterns = args.only.split(",")
        items = [i for i in items if i[0] == "ceilings" or any(fnmatch.fnmatchcase(row_id(i), p) for p in patterns)]
    if args.list:
        for item in items:
            print(f"{limit_for(row_id(item), limits):6.0f} s  {row_id(item)}")
        print(f"{len(items)} rows; limits sum to {sum(limit_for(row_id(i), limits) for i in items):.0f} s, "
              f"budget {args.budget_s:.0f} s")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing to measure", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT", ROOT / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    info = device_info()
    print(json.dumps(info, indent=1), flush=True)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", info["device"] or "gpu").strip("-").lower()
    path = out / f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d-%H%M}-{gpu}.json"
    report = new_report(info, workloads=[workload_dict(WORKLOADS[n]) for n in names])
    report.update(budget_s=args.budget_s, cache_dir=str(args.cache_dir), limits=[list(x) for x in limits])

    def save():
        report["seconds"] = round(time.time() - start, 1)
        path.write_text(json.dumps(report, indent=1, default=str))

    install_stop_handlers()
    save()
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-events-") as events_dir:
            pytest_args = ["-m", "pytest", *args.tests, "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider",
                           "--durations=15"]
            run_rows(items, report, save, budget_s=args.budget_s, start=start, limits=limits,
                     cache_root=args.cache_dir, events_dir=Path(events_dir), min_row_s=args.min_row_s, out=out,
                     pytest_args=pytest_args)
    except isolate.Stopped as e:
        save()
        print(f"gpu_check: {e}; wrote {path}", flush=True)
        return 128 + e.signum
    save()
    print_table(report, names)
    print(f"wrote {path}")
    parity = report["parity"]
    return 1 if parity is not None and parity["returncode"] not in (0, None) else 0


# ----------------------------------------------------------------------------- the child


def _torch():
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    return torch


def _cache_counters() -> dict:
    """torch.compile's cache hits and misses in this process (FX graph cache, AOTAutograd)."""
    try:
        from torch._dynamo.utils import counters

        return {f"{group}.{k}": v for group in ("inductor", "aot_autograd") for k, v in counters[group].items()
                if "cache" in k}
    except Exception as e:  # another torch's layout: say so, keep the row
        return {"error": f"{type(e).__name__}: {e}"[:200]}


def _row_ceilings(item, spec, rep):
    torch = _torch()
    from ceilings import measure_ceilings

    rep.phase("measuring")
    return {"device": torch.cuda.get_device_name(), "ceilings": measure_ceilings()}, None


def _row_parity(item, spec, rep):
    """The test suite, natively, in parallel workers when pytest-xdist is there (each new
    kernel specialisation is a compile); autotuning pinned to one config (the parent sets
    REIN_AUTOTUNE=0). Verbose, so that a run stopped by its time limit still names every
    test that failed. pytest and its workers run in this row's process group."""
    import importlib.util

    cmd = [sys.executable, *spec["pytest"]]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "8"]
    rep.phase("testing")
    return {"returncode": subprocess.call(cmd, cwd=ROOT)}, None


def _row_layer(item, spec, rep):
    _, name, dtype, pass_, provider, mode = item
    _torch()
    from bench import WORKLOADS, measure

    row = measure(WORKLOADS[name], provider, dtype, pass_, "cuda", spec.get("ceilings"), mode=mode, phase=rep.phase)
    return row, ({"kernels": compiled_kernels()} if provider.startswith("fused") else None)


def _row_probe(item, spec, rep):
    _torch()
    from bench import WORKLOADS
    from probe import probe

    rep.phase("measuring")
    return probe(WORKLOADS[item[1]], spec.get("ceilings")), None


def _row_eval(item, spec, rep):
    from e2e import measure_evaluation

    _, head, dtype, graphs = item
    _torch()
    return measure_evaluation(head, dtype, "cuda", graphs, phase=rep.phase), None


def _row_e2e(item, spec, rep, first_steps_only=False):
    """One training-step row: ``e2e.SETTINGS[setting]`` with ``head`` (vitl-512); a ttfs
    row: its first steps only."""
    _torch()
    from e2e import SETTINGS, measure, time_to_first_step

    head, setting = item[1], item[2]
    s = SETTINGS[setting]
    kw = {k: v for k, v in s.items() if k not in ("fused", "dtype")}
    fn = time_to_first_step if first_steps_only else measure
    row = dict(workload="vitl-512", **fn(s["fused"], s["dtype"], "cuda", provider=setting, head=head,
                                         phase=rep.phase, **kw))
    row.update(cache_counters=_cache_counters(), cache_files_before=spec.get("cache_files_before"))
    return row, None


def _row_ttfs(item, spec, rep):
    return _row_e2e(item, spec, rep, first_steps_only=True)


def _row_step(item, spec, rep):
    """A training step of another workload (``e2e.STEP_WORKLOADS``, e.g. vit7b-512: bf16
    frozen weights, activation checkpointing): step time and peak memory."""
    _torch()
    from e2e import measure_workload

    _, name, head, setting = item
    return measure_workload(name, setting, head, phase=rep.phase), None


def _row_fake(item, spec, rep):
    """Test-only (no torch, no GPU): the phases of a row, a few sleeping "compile workers"
    started first (``workers`` in the row's group, ``escaped`` in sessions of their own),
    their pids noted; GPU_CHECK_PLANT makes it hang, raise or die in a phase."""
    opts = item[2] if len(item) > 2 else {}
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    pids = [subprocess.Popen(sleeper).pid for _ in range(opts.get("workers", 0))]
    pids += [subprocess.Popen(sleeper, start_new_session=True).pid for _ in range(opts.get("escaped", 0))]
    rep.note(worker_pids=pids)
    for phase in ("building", "compiling", "recording", "measuring"):
        rep.phase(phase)
        time.sleep(opts.get("sleep_s", 0.05))
    return {"workload": f"fake-{item[1]}", "value": 1.0}, None


ROW_KINDS = {"ceilings": _row_ceilings, "parity": _row_parity, "layer": _row_layer, "probe": _row_probe,
             "eval": _row_eval,
             "e2e": _row_e2e, "ttfs": _row_ttfs, "step": _row_step, "fake": _row_fake}


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    rep = isolate.Reporter(spec["id"], spec["events"])
    isolate.watch_parent(spec["parent"])
    item = spec["item"]
    try:
        row, extra = ROW_KINDS[item[0]](item, spec, rep)
    except BaseException as e:  # the row's error, for the parent to record; the call goes on
        rep.error(e)
        return 1
    rep.result(row, extra)
    # no interpreter teardown (compile worker pools, CUDA): the parent kills what is left
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def compiled_kernels() -> dict:
    """What the GPU actually ran: each autotuned kernel's chosen config per key, and each
    compiled variant's registers and spill bytes as the driver loaded it (tests/compile_sm90.py
    predicts these from an ahead-of-time ptxas; this is the native count)."""
    try:
        import rein_kernels.rein_layer as op
        import rein_kernels.rein_layer_v4 as op4

        tables = (("gemm", op._GEMM), ("logits", op._LOGITS), ("v4 rows fwd", op4._ROWS_FWD),
                  ("v4 rows bwd", op4._ROWS_BWD))
    except Exception as e:  # kernels laid out otherwise: say so, keep the row
        return {"error": {"best": {}, "variants": [], "error": f"{type(e).__name__}: {e}"[:300]}}
    found = {}
    for name, tuners in tables:
        entry = {"best": {}, "variants": []}
        try:
            entry["best"] = {f"{path} {k}": str(c) for path, tuner in tuners.items()
                             for k, c in getattr(tuner, "cache", {}).items()}
            jit = next(iter(tuners.values())).fn  # one jit function behind every path's autotuner
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
        found[name] = json.loads(json.dumps(entry, default=str))
    return found


# ----------------------------------------------------------------------------- the table


def print_table(report: dict, names: list[str]) -> None:
    """Device time per layer (graph replay, ms) by provider, then the training steps, the
    times to the first step, and the rows that did not finish."""
    by = {(r["workload"], r["dtype"], r["pass"], r.get("mode", "call"), r["provider"]): r for r in report["results"]
          if "pass" in r}
    known = ["eager", "compile", "fused-v3", "fused-v4"]
    providers = known + sorted({k[4] for k in by} - set(known))
    print(f"\n{'workload':10s} {'dtype':5s} {'pass':7s} {'mode':5s} " + " ".join(f"{p:>9s}" for p in providers)
          + f" {'floor':>7s} {'/floor':>6s} {'v3/v4':>6s} {'comp/v4':>7s}")

    def ratio(a, b):
        return f"{a / b:6.2f}" if a and b else f"{'-':>6s}"

    for name in names:
        for dtype in ("bf16", "bf16x", "fp32"):
            for pass_ in ("fwd+bwd", "fwd"):
                for mode in ("stack", "call"):
                    t = {p: by.get((name, dtype, pass_, mode, p), {}).get("graph_ms") for p in providers}
                    if not any(t.values()):
                        continue
                    fl = next((r.get("floor_ms") for k, r in by.items() if k[:4] == (name, dtype, pass_, mode)), None)
                    print(f"{name:10s} {dtype:5s} {pass_:7s} {mode:5s} "
                          + " ".join(f"{v:9.3f}" if v else f"{'-':>9s}" for v in t.values())
                          + f" {fl or 0:7.3f} {ratio(t['fused-v4'], fl)} {ratio(t['fused-v3'], t['fused-v4'])} "
                          f"{ratio(t['compile'], t['fused-v4']):>7s}")
    for pr in report.get("probe", []):
        print(f"probe {pr['workload']} (x {pr['x_dtype']}, rows {pr['rows']}): " + ", ".join(
            f"{k} {v['us']:.1f} us" + (f" (bound {v['bandwidth_bound_us']:.1f})" if v.get("bandwidth_bound_us") else "")
            for k, v in pr.items() if isinstance(v, dict) and "us" in v))
    for row in report["e2e"]:
        print(f"{row.get('workload', 'vitl-512'):16s} {row.get('head', 'light'):11s} {row.get('provider'):17s} "
              f"{row.get('dtype')} "
              f"{row.get('median_ms') or 0:7.1f} ms, host {row.get('host_ms') or 0:6.1f} ms, peak "
              f"{row.get('peak_mem_mb') or 0:7.0f} MB {row.get('error', '')}")
    for t in report.get("ttfs", []):
        if t.get("ttfs_s") is not None:
            what = (f"first step {t['first_step_s']:6.1f} s + record {t['record_s']:5.1f} s = {t['ttfs_s']:6.1f} s "
                    f"(build {t.get('build_s') or 0:.1f} s)")
        else:
            what = f"{t['status']}" + (f" in {t['phase']} after {t['seconds']:.0f} s" if t.get("phase") else "")
        print(f"time to first step {t['head']:11s} {t['provider']:17s} {t['cache']:4s}: {what}")
    for s in report["skipped"]:
        if s.get("status") not in (None, "budget"):
            print(f"not finished: {s.get('id', s.get('item'))}: {s['reason']}")
    budget = [s for s in report["skipped"] if s.get("status") == "budget"]
    if budget:
        print(f"not started (budget): {len(budget)} rows")
    if report["parity"]:
        print("parity:", report["parity"]["summary"])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child_main(sys.argv[2]))
    sys.exit(main())
