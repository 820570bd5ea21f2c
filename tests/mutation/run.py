"""Mutation testing: plant each bug of ``mutants.py`` in turn, run the CPU kernel tests,
revert, and report which bugs the suite caught and how.

    python tests/mutation/run.py                 # every mutant (~2.5 h on 2 cores)
    python tests/mutation/run.py --kernels v4    # the default kernels' and the shared code's
    python tests/mutation/run.py --group assign  # the matching kernel's (~5 min)
    python tests/mutation/run.py --only lse-no-max gemm-no-bias
    python tests/mutation/run.py --list

Mutants of the v3 kernels (kept selectable) run with REIN_KERNELS=v3, the others with v4;
a mutant that names its own tests (the matching kernel's: group "assign") runs those.
A mutant counts as caught when a test fails; "assert" when every failure is an
AssertionError (the goal), "error" when a test raised something else, "crash" when
pytest itself died (a segfault: a bug caught only by luck). Exits non-zero when the
share caught by an assertion is under --goal (0.95), or when a file could not be
restored. It refuses to start on files with uncommitted changes, so that reverting by
text can never lose work. Hypothesis runs with CI's derandomised draws (unless
HYPOTHESIS_PROFILE says otherwise): with fresh draws, an example one mutant's run
found would be replayed from hypothesis' database in the next runs, and a rare
marginal fp16 draw could then be credited with catching mutants it has nothing to do with.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import MUTANTS  # noqa: E402

TESTS = ["tests/test_parity.py", "tests/test_math.py", "tests/test_layer.py", "tests/test_autocast.py",
         "tests/test_addressing.py", "tests/test_compile.py", "tests/test_bad_input.py", "tests/test_prepared.py"]


def validate(mutants) -> None:
    ids = [mu["id"] for mu in mutants]
    assert len(ids) == len(set(ids)), "duplicate mutant ids"
    for mu in mutants:
        for file, old, new in mu["edits"]:
            n = (ROOT / file).read_text().count(old)
            if n != 1 or old == new:
                raise SystemExit(f"mutant {mu['id']}: its text occurs {n} times in {file} (must be once)")


def classify(rc: int, junit: Path) -> tuple[str, str]:
    if rc == 0:
        return "survived", ""
    if rc not in (1, 2) or not junit.exists():
        return "crash", f"pytest exit code {rc}"
    failures = []
    for case in ET.parse(junit).iter("testcase"):
        for tag in ("failure", "error"):
            for el in case.iter(tag):
                failures.append((tag, case.get("name"), el.get("message") or ""))
    if not failures:
        return "crash", f"pytest exit code {rc}, no failing test recorded"
    first = f"{failures[0][1]}: {failures[0][2][:120]}"
    # pytest's own checks (pytest.raises / pytest.warns: "Failed: DID NOT ...") are assertions too
    asserts = ("AssertionError", "assert", "Tensor-likes", "The values", "Failed:")
    if all(tag == "failure" and msg.lstrip().startswith(asserts) for tag, _, msg in failures):
        return "assert", first
    return "error", first


def run_one(mu, tests, timeout) -> dict:
    tests = mu.get("tests", tests)
    originals = {file: (ROOT / file).read_text() for file, _, _ in mu["edits"]}
    try:
        for file, old, new in mu["edits"]:
            path = ROOT / file
            path.write_text(path.read_text().replace(old, new, 1))
        with tempfile.TemporaryDirectory() as tmp:
            junit = Path(tmp) / "junit.xml"
            t0 = time.time()
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                     f"--junitxml={junit}", *tests],
                    cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                    env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1", REIN_KERNELS=mu["kernels"],
                             HYPOTHESIS_PROFILE=os.environ.get("HYPOTHESIS_PROFILE", "ci")))
                outcome, detail = classify(proc.returncode, junit)
                if outcome == "crash":
                    detail += ": " + (proc.stdout + proc.stderr).strip()[-300:].replace("\n", " | ")
            except subprocess.TimeoutExpired:
                outcome, detail = "crash", f"timed out after {timeout} s"
            return dict(id=mu["id"], why=mu["why"], outcome=outcome, detail=detail, seconds=round(time.time() - t0, 1))
    finally:
        for file, text in originals.items():
            (ROOT / file).write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", help="mutant ids to run (default: all)")
    ap.add_argument("--kernels", choices=["v4", "v3"], help="only the layer's mutants run with these kernels")
    ap.add_argument("--group", choices=["layer", "assign"], help="only the layer's or the matching kernel's mutants")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--tests", nargs="+", default=TESTS)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--goal", type=float, default=0.95, help="required share caught by an assertion")
    ap.add_argument("--json", type=Path, help="write the per-mutant results here")
    args = ap.parse_args()

    mutants = [mu for mu in MUTANTS if (not args.only or mu["id"] in args.only)
               and (not args.kernels or (mu["kernels"] == args.kernels and "group" not in mu))
               and (not args.group or mu.get("group", "layer") == args.group)]
    unknown = set(args.only or []) - {mu["id"] for mu in MUTANTS}
    if unknown:
        print(f"unknown mutant id(s): {sorted(unknown)}", file=sys.stderr)
        return 2
    if args.list:
        for mu in mutants:
            print(f"{mu['id']:28s} {mu['why']}")
        return 0
    validate(mutants)
    files = sorted({f for mu in mutants for f, _, _ in mu["edits"]})
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *files], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        print(f"refusing to run: uncommitted changes in\n{dirty}\ncommit or stash them first", file=sys.stderr)
        return 2

    results = []
    for k, mu in enumerate(mutants, 1):
        r = run_one(mu, args.tests, args.timeout)
        results.append(r)
        print(f"[{k:2d}/{len(mutants)}] {r['outcome']:8s} {r['id']:28s} {r['seconds']:6.1f} s  {r['detail']}", flush=True)
    still_dirty = subprocess.run(["git", "status", "--porcelain", "--", *files], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip()
    counts = {o: sum(r["outcome"] == o for r in results) for o in ("assert", "error", "crash", "survived")}
    share = counts["assert"] / len(results)
    print(f"\n{len(results)} mutants: {counts['assert']} caught by an assertion, {counts['error']} by another "
          f"error, {counts['crash']} by a crash, {counts['survived']} survived; assertion score {share:.1%}")
    for r in results:
        if r["outcome"] != "assert":
            print(f"  {r['outcome']:8s} {r['id']}: {r['why']}")
    if args.json:
        args.json.write_text(json.dumps(dict(counts=counts, score=share, results=results), indent=1))
    if still_dirty:
        print(f"FILES NOT RESTORED:\n{still_dirty}", file=sys.stderr)
        return 3
    return 0 if share >= args.goal else 1


if __name__ == "__main__":
    sys.exit(main())
