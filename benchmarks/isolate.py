"""One measurement in a child process with a time limit, and the phase it was in when it
ended (standard library only: the CPU tests drive it without a GPU).

The parent starts the child in a new session, so that the child and everything it starts
(Inductor's compile workers, pytest-xdist's workers, DataLoader workers) form one process
group, and gives it the path of an events file. The child appends one JSON line to that
file when it enters a phase (``Reporter.phase``), and one with its result or its error
when it ends, flushing each. The parent polls the file; at the row's limit it kills the
whole group (and any descendant that left it), and still knows the phase the row was in
and the seconds each phase took. A child whose parent dies kills its own group, so that a
call stopped from outside leaves nothing running on the device.

Planted faults (tests; a dry run on a device): ``GPU_CHECK_PLANT="ROW:PHASE:ACTION,..."``,
ROW and PHASE fnmatch patterns, ACTION ``sleep`` (hang), ``raise`` or ``exit`` (the process
dies without a word), applied when a matching row enters a matching phase.
"""
from __future__ import annotations

import fnmatch
import json
import os
import signal
import subprocess
import threading
import time
import traceback
from pathlib import Path

PLANT_ENV = "GPU_CHECK_PLANT"


def planted(row_id: str, phase: str) -> str | None:
    for entry in filter(None, os.environ.get(PLANT_ENV, "").split(",")):
        row, ph, action = entry.rsplit(":", 2)
        if fnmatch.fnmatchcase(row_id, row) and fnmatch.fnmatchcase(phase, ph):
            return action
    return None


class Reporter:
    """The child's side: phases as they start, then the result or the error."""

    def __init__(self, row_id: str, path: str | os.PathLike):
        self.row_id = row_id
        self._file = open(path, "a", encoding="utf-8")

    def _write(self, **event) -> None:
        event["t"] = time.time()
        self._file.write(json.dumps(event, default=str) + "\n")
        self._file.flush()

    def phase(self, name: str) -> None:
        self._write(phase=name)
        action = planted(self.row_id, name)
        if action == "sleep":
            while True:
                time.sleep(3600)
        if action == "raise":
            raise RuntimeError(f"planted failure ({PLANT_ENV}) in {name}")
        if action == "exit":
            os._exit(3)

    def note(self, **values) -> None:
        self._write(note=values)

    def result(self, row, extra=None) -> None:
        self._write(result=row, extra=extra)

    def error(self, exc: BaseException) -> None:
        self._write(error=f"{type(exc).__name__}: {exc}"[:2000], traceback=traceback.format_exc()[-4000:])


def watch_parent(parent_pid: int, every_s: float = 1.0) -> None:
    """Kill this process's group (this process, its compile workers) once its parent is
    gone: a parent killed from outside must not leave a row running on the device."""
    if os.getpgrp() != os.getpid():  # not a group of its own (run by hand): only this process
        def stop():
            os._exit(1)
    else:
        def stop():
            os.killpg(os.getpgrp(), signal.SIGKILL)

    def loop():
        while True:
            time.sleep(every_s)
            if os.getppid() != parent_pid:
                stop()

    threading.Thread(target=loop, name="watch-parent", daemon=True).start()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), whatever its process group."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to the child's process group and to every descendant of the child (found
    before the kill: an orphan's parent is init afterwards), then reap the child."""
    try:
        below = descendants(proc.pid)
    except OSError:
        below = []
    kill_group(proc.pid)
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait()


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:  # no such group any more
        pass


def read_events(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            pass
    return events


def phase_seconds(events: list[dict], t0: float, t1: float, first: str) -> tuple[str, dict]:
    """(the phase the child was in at t1, seconds spent in each phase, summed where a phase
    recurs); ``first`` is the phase before the child's first event (its start-up)."""
    marks = [(first, t0)] + [(e["phase"], e["t"]) for e in events if "phase" in e]
    seconds: dict[str, float] = {}
    for (name, start), (_, end) in zip(marks, marks[1:] + [(None, t1)]):
        seconds[name] = seconds.get(name, 0.0) + max(0.0, end - start)
    return marks[-1][0], {k: round(v, 2) for k, v in seconds.items()}


class Stopped(BaseException):
    """The parent was asked to stop (SIGTERM, SIGINT, SIGHUP): the running row is killed,
    recorded as stopped, and the call ends."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class RowStopped(BaseException):
    def __init__(self, record: dict, cause: BaseException):
        super().__init__(str(cause))
        self.record, self.cause = record, cause


def run_child(cmd: list[str], limit_s: float, events: Path, *, env: dict | None = None, cwd=None, stdout=None,
              first_phase: str = "starting", on_phase=None, poll_s: float = 0.25) -> dict:
    """Run ``cmd`` (which reports to ``events``) for at most ``limit_s`` seconds. Returns
    {status: ok | error | crashed | timeout, phase, phases, seconds, limit_s, returncode,
    error, traceback, result, extra, notes}. ``on_phase(name, seconds)`` is called as the
    child enters each phase. Raises RowStopped (carrying the record) when the parent is
    stopped meanwhile; the child is killed first."""
    events = Path(events)
    events.write_text("")
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT if stdout else None,
                            start_new_session=True)
    status, shown = None, None
    try:
        while True:
            try:
                proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            if on_phase is not None:
                now, _ = phase_seconds(read_events(events), t0, time.time(), first_phase)
                if now != shown:
                    on_phase(now, time.time() - t0)
                    shown = now
            if time.time() - t0 >= limit_s:
                status = "timeout"
                kill_tree(proc)
                break
    except BaseException as e:  # the parent is stopping: take the row down with it
        kill_tree(proc)
        record = _record(read_events(events), t0, time.time(), first_phase, proc.returncode, "stopped", limit_s)
        record["error"] = str(e)
        raise RowStopped(record, e) from e
    finally:
        kill_group(proc.pid)  # what a finished row left behind (compile workers, pool processes)
    return _record(read_events(events), t0, time.time(), first_phase, proc.returncode, status, limit_s)


def _record(events, t0, t1, first_phase, returncode, status, limit_s) -> dict:
    phase, phases = phase_seconds(events, t0, t1, first_phase)
    result = next((e for e in reversed(events) if "result" in e), None)
    error = next((e for e in reversed(events) if "error" in e), None)
    if status is None:  # a result counts even if the process then died on its way out
        status = "ok" if result is not None else "error" if error is not None else "crashed"
    rec = dict(status=status, phase=phase, phases=phases, seconds=round(t1 - t0, 1), limit_s=round(limit_s, 1),
               returncode=returncode, result=(result or {}).get("result"), extra=(result or {}).get("extra"),
               notes=[e["note"] for e in events if "note" in e])
    if error is not None:
        rec.update(error=error["error"], traceback=error.get("traceback"))
    return rec


def reason(rec: dict) -> str:
    """One line for a row that did not finish: what happened, in which phase, after how long."""
    where = f"in {rec['phase']} after {rec['seconds']:.0f} s"
    if rec["status"] == "timeout":
        return f"timed out {where} (limit {rec['limit_s']:.0f} s)"
    if rec["status"] == "crashed":
        rc = rec["returncode"]
        how = f"exit status {rc}"
        if rc is not None and rc < 0:
            try:
                how = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"killed by signal {-rc}"
        return f"the process died ({how}) {where}"
    return f"{rec.get('error') or rec['status']} ({where})"
