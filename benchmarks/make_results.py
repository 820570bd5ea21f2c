"""Regenerate benchmarks/RESULTS.md and benchmarks/speedup.png from results/*.json.

    python benchmarks/make_results.py

Never edit RESULTS.md by hand: its numbers come only from JSON files that
``gpu_check.py`` wrote on a GPU. JSON schema: {device, driver, torch, triton, date,
ceilings: {bf16_tflops, tf32_tflops, fp32_tflops, copy_gbps} (null if that row failed),
parity: {summary, ...}, results: [{workload, dtype, pass, provider, median_ms,
median_ms_repeat, floor_ms, peak_mem_mb, saved_bytes, saved_bytes_no_params}],
skipped: [{item, reason}], e2e: [...]}. Since 2026-12-04 (every row in a child process of its
own, benchmarks/README.md) also: every measured row's ``id``, ``phases`` ({phase: seconds})
and ``seconds``; ``skipped`` entries' ``id``, ``status`` (timeout, error, crashed, stopped,
budget), ``phase``, ``phases``, ``seconds``, ``limit_s``; ``rows`` (every row in order:
id, status, phase, phases, seconds, limit_s, error); ``ttfs`` ([{id, head, provider,
cache: cold | warm, status, build_s, first_step_s, record_s, ttfs_s, cache_files_before,
cache_counters}], or the phase and seconds of a row that did not finish); budget_s,
cache_dir, limits. Older files lack these and read as before.
``results/profile/<date>-<gpu>-<workload>.json`` (``profile_layer.py``) adds, per call,
the CUDA-event time, the host time and the device-only time of a CUDA-graph replay.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["vits-512", "vitb-512", "vitl-512", "vitl-1024", "vitg-512", "vitl-512-b16", "vit7b-512"]


def load_runs(results_dir: Path) -> list[dict]:
    runs = []
    for path in sorted(results_dir.glob("*.json")):
        run = json.loads(path.read_text())
        run["_file"] = path.name
        runs.append(run)
    return sorted(runs, key=lambda r: r["date"], reverse=True)


def _fmt(v, spec=".3f"):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def device_table(run: dict) -> list[str]:
    """Runs that recorded graph replays (2026-11-30 on): device time per layer, by mode. The
    run's newest kernels (``fused-v4``, or ``fused`` in runs before v4) are held against the
    floor, the previous kernels, compile(reference) and eager."""
    by = {(r["workload"], r["dtype"], r["pass"], r.get("mode", "call"), r["provider"]): r for r in run["results"]}
    present = {k[4] for k in by}
    new, old = ("fused-v4", "fused-v3") if "fused-v4" in present else ("fused", "fused-v2")
    providers = ("eager", "compile", old, new)
    names = {"fused": "kernels v3", "fused-v2": "kernels v2", "fused-v3": "kernels v3", "fused-v4": "kernels v4"}
    lines = [
        "Device time per layer, ms (one CUDA-graph replay; `stack`: all L layers chained inside "
        f"`prepared()` as a backbone runs them, divided by L; `call`: one layer called alone, its "
        f"parameter operands formed per call). `{new}` is {names[new]}, `{old}` {names[old]}.", "",
        f"| workload | dtype | pass | mode | eager | compile | {old} | {new} | floor | {new}/floor | x {old} "
        f"| x compile | x eager | host ms per call ({new}) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in ORDER + sorted({k[0] for k in by} - set(ORDER)):
        for dtype in ("bf16", "bf16x", "fp32"):
            for pass_ in ("fwd+bwd", "fwd"):
                for mode in ("stack", "call"):
                    rows = {p: by.get((w, dtype, pass_, mode, p)) for p in providers}
                    if not any(rows.values()):
                        continue
                    t = {p: (r or {}).get("graph_ms") for p, r in rows.items()}
                    f = rows[new] or next(r for r in rows.values() if r)
                    ratio = (lambda a, b: f"{a / b:.2f}" if a and b else "-")
                    lines.append(
                        f"| {w} | {dtype} | {pass_} | {mode} | " + " | ".join(_fmt(t[p]) for p in providers)
                        + f" | {_fmt(f.get('floor_ms'))} | {ratio(t[new], f.get('floor_ms'))} "
                        f"| {ratio(t[old], t[new])} | {ratio(t['compile'], t[new])} "
                        f"| {ratio(t['eager'], t[new])} | {_fmt((rows[new] or {}).get('host_ms'))} |")
    return lines


def probe_table(run: dict) -> list[str]:
    """Runs with the kernel probe (benchmarks/probe.py): each launch of one v4 layer, device
    time beside its bound (bytes at the copy rate, or FLOPs at the bf16 peak)."""
    lines = []
    for pr in run.get("probe", []):
        lines += [f"Kernels v4 launch by launch, {pr['workload']} ({pr['rows']} rows, C {pr['C']}, m {pr['m']}, "
                  f"x {pr['x_dtype']}), device time from CUDA-graph replays:", "",
                  "| launch | us | bound us | x bound |", "|---|---|---|---|"]
        for name, v in pr.items():
            if isinstance(v, dict) and "us" in v:
                bound = v.get("bandwidth_bound_us") or v.get("flop_bound_us")
                lines.append(f"| {name} | {_fmt(v['us'], '.1f')} | {_fmt(bound, '.1f')} "
                             f"| {_fmt(v['us'] / bound if bound else None, '.2f')} |")
        lines.append("")
    return lines


def run_table(run: dict) -> list[str]:
    if not run["results"]:
        return []
    if any("graph_ms" in r for r in run["results"]):
        return device_table(run)
    by = {(r["workload"], r["dtype"], r["pass"], r["provider"]): r for r in run["results"]}
    lines = [
        "| workload | dtype | pass | eager ms | compile ms | fused ms | floor ms | fused/floor "
        "| x eager | x compile | fused peak MB | saved bytes eager / fused |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in ORDER:
        for dtype in ("fp32", "bf16"):
            for pass_ in ("fwd", "fwd+bwd"):
                rows = {p: by.get((w, dtype, pass_, p)) for p in ("eager", "compile", "fused")}
                if not any(rows.values()):
                    continue
                t = {p: (r or {}).get("median_ms") for p, r in rows.items()}
                f = rows["fused"] or {}
                ratio = (lambda a, b: f"{a / b:.2f}" if a and b else "-")
                saved = " / ".join(_fmt((rows[p] or {}).get("saved_bytes"), ",") for p in ("eager", "fused"))
                lines.append(
                    f"| {w} | {dtype} | {pass_} | {_fmt(t['eager'])} | {_fmt(t['compile'])} | {_fmt(t['fused'])} "
                    f"| {_fmt(f.get('floor_ms'))} | {ratio(t['fused'], f.get('floor_ms'))} "
                    f"| {ratio(t['eager'], t['fused'])} | {ratio(t['compile'], t['fused'])} "
                    f"| {_fmt(f.get('peak_mem_mb'), '.0f')} | {saved} |")
    return lines


def profile_tables(results_dir: Path) -> list[str]:
    """One table per profile file: where a layer call's time goes (host vs device)."""
    out = []
    for path in sorted((results_dir / "profile").glob("*.json"), reverse=True):
        rows = json.loads(path.read_text())
        out += [f"### Host vs device, one layer call: `results/profile/{path.name}`", "",
                "`events`: CUDA-event median per call (what the table above records); `host`: wall time "
                "per call of 200 unsynchronised calls; `graph`: the call replayed from a CUDA graph, "
                "device time alone. When `events` ~ `host`, the call is bound by host overhead.", "",
                "| workload | dtype | pass | provider | events ms | host ms | graph (device) ms |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['workload']} | {r['dtype']} | {r['pass']} | {r['provider']} | {_fmt(r.get('events_ms'))} "
                f"| {_fmt(r.get('host_ms'))} | {_fmt(r.get('graph_ms'))} |" for r in rows]
        out += [""]
    return out


def plot(run: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # device time (graph replays) where the run has it, else the event times of older runs
    key = "graph_ms" if any("graph_ms" in r for r in run["results"]) else "median_ms"
    by = {(r["workload"], r["dtype"], r["pass"], r["provider"]): r.get(key) for r in run["results"]
          if r.get("mode", "call") == "call"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    drew = False
    for ax, dtype in zip(axes, ("fp32", "bf16")):
        ws = [w for w in ORDER if by.get((w, dtype, "fwd+bwd", "fused"))]
        for k, base in enumerate(("eager", "compile")):
            sp = [(by.get((w, dtype, "fwd+bwd", base)) or float("nan")) / by[(w, dtype, "fwd+bwd", "fused")]
                  for w in ws]
            ax.bar([i + 0.4 * k for i in range(len(ws))], sp, width=0.4, label=f"vs {base}")
            drew = drew or bool(ws)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + 0.2 for i in range(len(ws))], ws, rotation=30)
        ax.set_title(f"{dtype}, forward+backward, one layer called alone ({'device' if key == 'graph_ms' else 'event'} time)")
    axes[0].set_ylabel("fused speed-up (x)")
    axes[0].legend()
    fig.suptitle(f"{run['device']}, torch {run['torch']}, triton {run['triton']}, {run['date'][:10]}")
    fig.tight_layout()
    if drew:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drew


def ttfs_table(run: dict) -> list[str]:
    """Runs from 2026-12-04 on: seconds from the start of the first training step to the end
    of the step that first replays, in a fresh process, torch.compile's on-disk caches
    empty (cold: the e2e row) or as the cold row left them (warm: the ttfs row)."""
    if not run.get("ttfs"):
        return []
    lines = ["Time to the first replayed training step, s (a fresh process; `cold`: torch.compile's and "
             "Triton's on-disk caches empty, `warm`: as the cold row left them; first step = compile and "
             "the first run, record = the steps until the first replay):", "",
             "| head | provider | cache | build s | first step s | record s | to first replay s | cache files before |",
             "|---|---|---|---|---|---|---|---|"]
    for t in run["ttfs"]:
        if t.get("ttfs_s") is None:
            what = f"{t.get('status')} in {t.get('phase')} after {_fmt(t.get('seconds'), '.0f')} s"
            cells = [_fmt((t.get("phases") or {}).get("building"), ".1f"), what, "-", "-"]
        else:
            cells = [_fmt(t.get("build_s"), ".1f"), _fmt(t.get("first_step_s"), ".1f"), _fmt(t.get("record_s"), ".1f"),
                     _fmt(t.get("ttfs_s"), ".1f")]
        lines.append(f"| {t.get('head')} | {t.get('provider')} | {t.get('cache')} | " + " | ".join(cells)
                     + f" | {_fmt(t.get('cache_files_before'), 'd')} |")
    return lines + [""]


def unfinished_rows(run: dict) -> list[str]:
    """Runs from 2026-12-04 on: the rows that did not finish (timed out, failed, died, stopped)
    with the phase they were in and the seconds each phase took; rows the budget did not
    reach are counted."""
    bad = [s for s in run.get("skipped", []) if s.get("status") in ("timeout", "error", "crashed", "stopped")]
    budget = sum(s.get("status") == "budget" for s in run.get("skipped", []))
    if not bad and not budget:
        return []
    lines = ["Rows that did not finish (phases: seconds in each, `starting` = the process's start and imports):", "",
             "| row | status | phase | seconds | limit s | phases | reason |", "|---|---|---|---|---|---|---|"]
    for s in bad:
        phases = ", ".join(f"{k} {v:.0f}" for k, v in (s.get("phases") or {}).items())
        why = str(s.get("reason", "")).replace("|", "/")[:200]
        lines.append(f"| {s.get('id')} | {s['status']} | {s.get('phase')} | {_fmt(s.get('seconds'), '.0f')} "
                     f"| {_fmt(s.get('limit_s'), '.0f')} | {phases} | {why} |")
    if budget:
        lines.append(f"\n{budget} row(s) not started: the call's time budget was spent.")
    return lines + [""]


def main() -> None:
    runs = load_runs(HERE / "results")
    out = ["# Rein layer benchmarks", "",
           "Generated by `benchmarks/make_results.py` from `benchmarks/results/*.json`; do not edit by hand.", ""]
    if not runs:
        out += ["**No GPU run is recorded yet.** Run `benchmarks/gpu_check.sh` on an H100/H200 "
                "(it writes `<date>-<gpu>.json`), commit the JSON under `benchmarks/results/`, "
                "and regenerate this file.", ""]
    for i, run in enumerate(runs):
        out += [f"## {run['device']} — torch {run['torch']}, triton {run['triton']}, {run['date']}"
                + (" (latest)" if i == 0 else ""), ""]
        c = run.get("ceilings")
        out += [(f"Measured ceilings: bf16 {c['bf16_tflops']:.0f} TFLOP/s, tf32 {c['tf32_tflops']:.0f} TFLOP/s, "
                 f"copy {c['copy_gbps']:.0f} GB/s. " if c else "Ceilings not measured (no floors). ")
                + f"Parity suite natively: "
                f"{(run.get('parity') or {}).get('summary', 'not run')}. File: `results/{run['_file']}`.", ""]
        out += run_table(run) + [""] + probe_table(run)
        if run.get("e2e"):
            out += ["End-to-end training step (DINOv2 ViT-L/16, 512², batch 4, AdamW; settings in "
                    "`benchmarks/e2e.py`: `library` = `rein.train`'s captured step (fused Rein, bf16 weights, "
                    "compiled in reduce-overhead mode: regionally from 2026-12-04, the model whole before); "
                    "`compile-reference` = the same with the reference Rein; `official` = fp32, eager reference, "
                    "nothing captured; host ms = wall time per unsynchronised step; a captured step's allocated "
                    "peak misses its graph pools, reserved bounds it):", "",
                    "| head | dtype | provider | step ms | host ms | peak MB | reserved MB | held after forward MB |",
                    "|---|---|---|---|---|---|---|---|"]
            out += [f"| {r.get('head', 'light')} | {r.get('dtype')} | {r.get('provider')} | {_fmt(r.get('median_ms'))} "
                    f"| {_fmt(r.get('host_ms'), '.1f')} | {_fmt(r.get('peak_mem_mb'), '.0f')} "
                    f"| {_fmt(r.get('reserved_mb'), '.0f')} | {_fmt(r.get('held_after_forward_mb'), '.0f')} |"
                    for r in run["e2e"]]
            out += [""]
        out += ttfs_table(run) + unfinished_rows(run)
        if i == 0 and plot(run, HERE / "speedup.png"):
            out += ["![fused speed-up per workload](speedup.png)", ""]
        if i == 0:
            out += profile_tables(HERE / "results")
    notes = HERE / "NOTES.md"
    if notes.exists():
        out += [notes.read_text().strip(), ""]
    (HERE / "RESULTS.md").write_text("\n".join(out))
    print(f"wrote {HERE / 'RESULTS.md'} from {len(runs)} run(s)")


if __name__ == "__main__":
    main()
