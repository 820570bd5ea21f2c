"""gpu_check's rows, each in a child process of its own under a time limit, on the CPU with
test-only rows (no torch, no GPU in the children): a row that hangs is killed with its
process group and recorded in the phase it hung in, a row that raises is recorded with
its error, a row that dies is recorded as such, and the next row runs every time."""
import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
import isolate  # noqa: E402


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # killed; only its reaping is left to init


def _gone(pid: int, wait_s: float = 5.0) -> bool:
    """Dead, or dead within ``wait_s`` (a SIGKILL is delivered asynchronously)."""
    deadline = time.time() + wait_s
    while not _dead(pid) and time.time() < deadline:
        time.sleep(0.05)
    return _dead(pid)


def _run(tmp_path, items, budget_s=60.0, limits=(("fake/hangs", 2.0), ("fake/*", 30.0)), **kw):
    report = gpu_check.new_report({"device": "cpu"})
    saved, lines = [], []
    start = time.time()
    gpu_check.run_rows(items, report, lambda: saved.append(json.loads(json.dumps(report, default=str))),
                       budget_s=budget_s, start=start, limits=list(limits), cache_root=tmp_path / "cache",
                       events_dir=tmp_path, out=tmp_path, print_fn=lambda *a, **k: lines.append(" ".join(a)), **kw)
    return report, saved, lines, time.time() - start


def test_a_hanging_row_is_killed_in_its_phase_a_failing_one_recorded_and_the_next_rows_run(tmp_path, monkeypatch):
    monkeypatch.setenv(isolate.PLANT_ENV,
                       "fake/hangs:compiling:sleep,fake/raises:building:raise,fake/dies:recording:exit")
    items = [("fake", "hangs", {"workers": 1, "escaped": 1}), ("fake", "raises"), ("fake", "dies"),
             ("fake", "ok", {"workers": 1})]
    report, saved, lines, took = _run(tmp_path, items)
    rows = {r["id"]: r for r in report["rows"]}
    assert list(rows) == ["fake/hangs", "fake/raises", "fake/dies", "fake/ok"]

    hang = rows["fake/hangs"]
    assert hang["status"] == "timeout" and hang["phase"] == "compiling", hang
    assert 2.0 <= hang["seconds"] < 8 and hang["limit_s"] == 2.0
    assert set(hang["phases"]) == {"starting", "building", "compiling"} and hang["phases"]["compiling"] > 1.0
    # its "compile workers" went with it, in its process group or not
    notes = json.loads((tmp_path / "000.jsonl").read_text().splitlines()[0])["note"]
    assert len(notes["worker_pids"]) == 2 and all(map(_gone, notes["worker_pids"]))

    raises = rows["fake/raises"]
    assert raises["status"] == "error" and raises["phase"] == "building"
    assert "RuntimeError: planted failure" in raises["error"]
    dies = rows["fake/dies"]
    assert dies["status"] == "crashed" and dies["phase"] == "recording"

    ok = rows["fake/ok"]
    assert ok["status"] == "ok" and ok["phase"] == "measuring"
    assert set(ok["phases"]) == {"starting", "building", "compiling", "recording", "measuring"}
    (measured,) = report["results"]
    assert measured["workload"] == "fake-ok" and measured["id"] == "fake/ok" and measured["phases"] == ok["phases"]
    # what a finished row leaves behind goes too
    notes = json.loads((tmp_path / "003.jsonl").read_text().splitlines()[0])["note"]
    assert all(map(_gone, notes["worker_pids"]))

    reasons = {s["id"]: s for s in report["skipped"]}
    assert set(reasons) == {"fake/hangs", "fake/raises", "fake/dies"}
    assert reasons["fake/hangs"]["reason"].startswith("timed out in compiling after ")
    assert reasons["fake/hangs"]["reason"].endswith("(limit 2 s)")
    assert "planted failure" in reasons["fake/raises"]["reason"]
    assert "exit status 3" in reasons["fake/dies"]["reason"]
    # the JSON was written after every row, the last write holding all of them
    assert len(saved) == 4 and [len(s["rows"]) for s in saved] == [1, 2, 3, 4] and saved[-1]["rows"] == report["rows"]
    assert any("fake/hangs: compiling" in line for line in lines)
    assert took < 15


def test_rows_get_what_is_left_of_the_budget_and_none_starts_without_enough(tmp_path, monkeypatch):
    monkeypatch.setenv(isolate.PLANT_ENV, "fake/hangs:measuring:sleep")
    items = [("fake", "hangs"), ("fake", "late")]
    report, _, _, took = _run(tmp_path, items, budget_s=3.0, limits=(("*", 60.0),), min_row_s=1.0)
    hang, late = report["rows"]
    assert hang["status"] == "timeout" and hang["phase"] == "measuring" and hang["limit_s"] <= 3.0
    assert late["status"] == "budget" and "time budget spent" in late["error"]
    assert report["skipped"][-1]["status"] == "budget" and took < 8


def test_a_child_whose_parent_dies_kills_its_group(tmp_path):
    """A call killed from outside leaves nothing running: the row's child notices its parent
    gone and kills its own process group (its workers with it)."""
    import subprocess

    events = tmp_path / "events.jsonl"
    spec = dict(id="fake/orphan", item=["fake", "orphan", {"workers": 1, "sleep_s": 30}], events=str(events))
    # a parent that starts the row as run_rows does (its own session) and dies at once
    code = ("import json, os, subprocess, sys; spec = dict(json.loads(sys.argv[2]), parent=os.getpid()); "
            "subprocess.Popen([sys.executable, sys.argv[1], '--child', json.dumps(spec)], start_new_session=True)")
    subprocess.run([sys.executable, "-c", code, str(BENCH / "gpu_check.py"), json.dumps(spec)], check=True)
    deadline = time.time() + 10
    while time.time() < deadline and not (events.exists() and events.read_text().strip()):
        time.sleep(0.1)
    pids = json.loads(events.read_text().splitlines()[0])["note"]["worker_pids"]
    assert all(_gone(pid, wait_s=10) for pid in pids)


def test_phase_seconds_and_planted_patterns(monkeypatch):
    events = [{"phase": "building", "t": 1.0}, {"phase": "compiling", "t": 3.0}, {"phase": "measuring", "t": 4.0},
              {"phase": "recording", "t": 5.0}, {"phase": "measuring", "t": 6.0}]
    phase, seconds = isolate.phase_seconds(events, 0.5, 7.5, "starting")
    assert phase == "measuring"
    assert seconds == {"starting": 0.5, "building": 2.0, "compiling": 1.0, "measuring": 2.5, "recording": 1.0}
    monkeypatch.setenv(isolate.PLANT_ENV, "e2e/mask2former/*:compiling:sleep")
    assert isolate.planted("e2e/mask2former/library", "compiling") == "sleep"
    assert isolate.planted("e2e/light/library", "compiling") is None


def test_plan_mask2former_first_then_light_then_layers_and_limits():
    items = gpu_check.plan(["vitl-512", "vitg-512"], ["mask2former", "light"], layers=True, e2e=True)
    ids = [gpu_check.row_id(i) for i in items]
    assert len(set(ids)) == len(ids)
    kinds = [i[0] for i in items]
    heads = [i[1] for i in items if i[0] not in ("layer", "probe")]
    first_light, first_layer = heads.index("light"), kinds.index("probe")
    assert set(heads[:first_light]) == {"mask2former"} and set(heads[first_light:]) == {"light"}
    # then each workload's kernel probe, then the layer rows
    assert set(kinds[first_layer:]) == {"probe", "layer"} and kinds[first_layer:first_layer + 2] == ["probe"] * 2
    # each head: the library's step (cold) first, then its warm start
    assert ids[:2] == ["e2e/mask2former/library", "ttfs/mask2former/library/warm"]
    assert ids[first_light:first_light + 2] == ["e2e/light/library", "ttfs/light/library/warm"]
    assert "layer/vitl-512/bf16/fwd+bwd/stack/fused-v4" in ids and "layer/vitg-512/bf16/fwd+bwd/call/compile" in ids
    limits = gpu_check.parse_limits(["e2e/mask2former/*=330,layer/*=45"]) + gpu_check.DEFAULT_LIMITS
    assert gpu_check.limit_for("e2e/mask2former/library", limits) == 330
    assert gpu_check.limit_for("e2e/light/library", limits) == 240
    assert gpu_check.limit_for("layer/vitl-512/bf16/fwd/call/compile", limits) == 45
    assert gpu_check.limit_for("ttfs/light/library/warm", limits) == 180
    # the layer rows' providers are data: a new kernel version is one more name in the tuple
    assert {i[4] for i in items if i[0] == "layer" and i[5] == "stack"} == set(gpu_check.STACK_PROVIDERS)


def test_cache_dirs_cold_for_e2e_warm_for_ttfs(tmp_path):
    """The library setting's e2e row starts with its cache folder emptied (cold); the ttfs row
    after it finds that folder as the e2e row left it (warm); others share one folder."""
    root = tmp_path
    e2e, ttfs = ("e2e", "light", "library"), ("ttfs", "light", "library", "warm")
    assert gpu_check.cache_dir_for(e2e, root) == gpu_check.cache_dir_for(ttfs, root)
    assert gpu_check.cache_dir_for(("e2e", "mask2former", "library"), root) != gpu_check.cache_dir_for(e2e, root)
    assert gpu_check.cache_dir_for(("eval", "light", "bf16", True), root) == root / "shared"
    assert gpu_check.cache_dir_for(("e2e", "light", "library-v2"), root) == root / "shared"
    assert gpu_check.cold_start(e2e) and not gpu_check.cold_start(ttfs)
    assert not gpu_check.cold_start(("e2e", "light", "library-v2"))
    env = gpu_check.child_env(root / "x")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(root / "x") and env["TRITON_CACHE_DIR"] == str(root / "x" / "triton")


def test_results_md_reads_the_new_fields_and_every_older_file(tmp_path):
    """make_results reads a file of the new schema (a row timed out in its phase, the times to
    the first step cold and warm, a fused-v4 column, no ceilings) and every file already in
    benchmarks/results/ as before."""
    import make_results

    layer = dict(workload="vitl-512", dtype="bf16", mode="stack", provider="fused-v4", graph_ms=0.2, floor_ms=0.05,
                 id="layer/vitl-512/bf16/fwd+bwd/stack/fused-v4", phases={"starting": 3.0}, **{"pass": "fwd+bwd"})
    run = dict(device="Synthetic", torch="x", triton="y", date="2000-01-01T00:00:00", ceilings=None,
               results=[layer, dict(layer, provider="fused-v3", graph_ms=0.25)], e2e=[],
               ttfs=[dict(head="mask2former", provider="library", cache="cold", status="timeout", phase="compiling",
                          seconds=330.2, phases={"starting": 4.0, "building": 9.0, "compiling": 317.2}),
                     dict(head="light", provider="library", cache="warm", status="ok", build_s=8.0, first_step_s=30.5,
                          record_s=2.5, ttfs_s=33.0, cache_files_before=412)],
               skipped=[dict(id="e2e/mask2former/library", status="timeout", phase="compiling", seconds=330.2,
                             limit_s=330, phases={"compiling": 317.2}, reason="timed out in compiling after 330 s"),
                        dict(id="eval/light/fp32/uncaptured", status="budget", reason="time budget spent")])
    table = "\n".join(make_results.run_table(run))
    # the newest kernels held against the previous ones (x fused-v3: 1.25)
    assert "| fused-v3 | fused-v4 |" in table
    assert "| vitl-512 | bf16 | fwd+bwd | stack | - | - | 0.250 | 0.200 | 0.050 | 4.00 | 1.25 |" in table
    ttfs = "\n".join(make_results.ttfs_table(run))
    assert "| mask2former | library | cold | 9.0 | timeout in compiling after 330 s | - | - | - |" in ttfs
    assert "| light | library | warm | 8.0 | 30.5 | 2.5 | 33.0 | 412 |" in ttfs
    unfinished = "\n".join(make_results.unfinished_rows(run))
    assert "| e2e/mask2former/library | timeout | compiling | 330 | 330 | compiling 317 |" in unfinished
    assert "1 row(s) not started" in unfinished
    for path in sorted((BENCH / "results").glob("*.json")):
        run = json.loads(path.read_text())
        if "rows" in run:  # written by this gpu_check: every row it ran is somewhere in the page
            page = "\n".join(make_results.run_table(run) + make_results.probe_table(run) + make_results.ttfs_table(run)
                              + make_results.unfinished_rows(run))
            assert all(r["status"] == "budget" or r["id"].split("/")[0] in ("ceilings", "parity", "e2e", "eval", "step")
                       or r["id"] in page or r["id"].split("/")[1] in page for r in run["rows"]), path.name
        else:  # older files read as before
            assert bool(make_results.run_table(run)) == bool(run["results"])
            assert make_results.ttfs_table(run) == make_results.unfinished_rows(run) == []


def test_measurements_report_their_phases_on_cpu():
    """The layer and training-step measurements tell gpu_check's child each phase as it
    starts; the first steps are timed to their end (the time to the first replayed step)."""
    import bench
    import e2e

    seen = []
    ceil = {"bf16_tflops": 1.0, "tf32_tflops": 1.0, "copy_gbps": 1.0}
    bench.measure(bench.CPU_WORKLOAD, "eager", "fp32", "fwd", "cpu", ceil, phase=seen.append)
    assert seen == ["building", "compiling", "measuring"]
    seen.clear()
    row = e2e.time_to_first_step(False, "fp32", "cpu", provider="official", phase=seen.append, head="light",
                                 backbone="vit_small_patch14_dinov2", img=32, batch=1, depth=1)
    assert seen == ["building", "compiling", "recording"]
    assert row["provider"] == "official" and row["build_s"] > 0 and row["first_step_s"] > 0 and row["record_s"] > 0
    assert abs(row["ttfs_s"] - row["first_step_s"] - row["record_s"]) < 1e-6


def test_a_call_stopped_from_outside_keeps_what_it_measured(tmp_path, monkeypatch):
    """SIGTERM to the parent mid-row: the row is killed with its workers and recorded as
    stopped in its phase, after the rows measured before it, and the call exits 128 + 15."""
    import signal
    import subprocess

    monkeypatch.setenv(isolate.PLANT_ENV, "fake/hangs:compiling:sleep")
    script = f"""
import json, sys, time
sys.path.insert(0, {str(BENCH)!r})
import gpu_check, isolate
from pathlib import Path
out = Path({str(tmp_path)!r})
report = gpu_check.new_report({{"device": "cpu"}})
gpu_check.install_stop_handlers()
save = lambda: (out / "run.json").write_text(json.dumps(report, default=str))
try:
    gpu_check.run_rows([("fake", "first"), ("fake", "hangs", {{"workers": 1}}), ("fake", "never")], report, save,
                       budget_s=60, start=time.time(), limits=[("*", 30)], cache_root=out / "cache", events_dir=out,
                       out=out, print_fn=lambda *a, **k: None)
except isolate.Stopped as e:
    save()
    sys.exit(128 + e.signum)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 20
    events = tmp_path / "001.jsonl"
    while time.time() < deadline and '"compiling"' not in (events.read_text() if events.exists() else ""):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    report = json.loads((tmp_path / "run.json").read_text())
    assert [(r["id"], r["status"]) for r in report["rows"]] == [("fake/first", "ok"), ("fake/hangs", "stopped")]
    assert report["rows"][1]["phase"] == "compiling" and report["results"][0]["id"] == "fake/first"
    pids = json.loads(events.read_text().splitlines()[0])["note"]["worker_pids"]
    assert all(map(_gone, pids))
