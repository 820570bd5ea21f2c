"""The package's rooms import one way. Every module of ``rein`` and ``rein_kernels`` sits
in a room on a floor (below, lowest first); a module imports its own room and rooms on
lower floors only, never a higher floor nor another room of its own floor, and the
imports, lazy ones inside functions included, form no cycle. No module of ``rein`` is
longer than about 400 lines."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = [
    ["rein_kernels"],                                  # the kernels and their reference
    ["rein.errors"],                                   # the errors a user can fix
    ["rein.data"],                                     # datasets, label maps, transforms: no models
    ["rein.checkpoints", "rein.layer"],                # reading checkpoint files; the Rein layer
    ["rein.backbones", "rein.distributed"],            # timm backbones refined by Rein; FSDP2
    ["rein.heads"],                                    # light and Mask2Former heads
    ["rein.official"],                                 # official checkpoints' keys, converted
    ["rein.model", "rein.inference"],                  # the segmentor, built and loaded; the test protocol
    ["rein.metrics"],                                  # mIoU, and evaluation over datasets
    ["rein.cli"],                                      # what the commands share
    ["rein.train", "rein.evaluate", "rein.predict"],   # the commands
    ["rein"],                                          # the package's own names (rein/__init__.py)
]
MAX_LINES = 400


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every .py file of rein/ and rein_kernels/."""
    out = {}
    for pkg in ("rein", "rein_kernels"):
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` imports anywhere in its file (at the top or
    inside functions); ``from pkg import sub`` counts as importing the module pkg.sub."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # "import a.b.c" of a module not listed: its nearest listed parent
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def room(name: str) -> tuple[int, str] | None:
    """(floor, room) of a module: the longest room name it equals or lies under."""
    best = None
    for floor, rooms in enumerate(FLOORS):
        for r in rooms:
            if (name == r or name.startswith(r + ".")) and (best is None or len(r) > len(best[1])):
                best = (floor, r)
    return best


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every module without a room, every import up a floor or across to another room of
    the same floor, and every cycle, in words."""
    problems = [f"{m}: in no room of FLOORS" for m in graph if room(m) is None]
    for m, targets in graph.items():
        for t in sorted(targets):
            (fm, rm), (ft, rt) = room(m) or (-1, m), room(t) or (-1, t)
            if ft > fm or (ft == fm and rt != rm):
                problems.append(f"{m} (floor {fm}, {rm}) imports {t} (floor {ft}, {rt})")
    state, stack = {}, []

    def visit(m):  # depth-first; a module met again while on the stack closes a cycle
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                problems.append("cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return problems


def test_imports_go_down_the_floors_without_cycles():
    mods = modules()
    graph = {m: imports(m, f, set(mods)) for m, f in mods.items()}
    assert {"rein.data", "rein.model", "rein.inference", "rein.metrics", "rein.cli"} <= set(graph)
    assert violations(graph) == []


def test_the_walk_sees_lazy_relative_imports_and_the_checks_bite(tmp_path):
    """The walk finds an import inside a function, relative to a subpackage; an upward
    import, an import across one floor and a cycle are each reported."""
    pkg = tmp_path / "rein"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("def f():\n    from ..model import Segmentor\n")
    (pkg / "model.py").write_text("from .data import f\nfrom . import inference\n")
    (pkg / "inference.py").write_text("")
    (tmp_path / "rein_kernels").mkdir()
    mods = modules(tmp_path)
    graph = {m: imports(m, f, set(mods)) for m, f in mods.items()}
    assert graph["rein.data"] == {"rein.model"} and graph["rein.model"] == {"rein.data", "rein.inference"}
    assert violations(graph) == [
        "rein.data (floor 2, rein.data) imports rein.model (floor 7, rein.model)",
        "rein.model (floor 7, rein.model) imports rein.inference (floor 7, rein.inference)",
        "cycle: rein.data -> rein.model -> rein.data",
    ]


def test_no_module_is_long():
    long = {m: n for m, f in modules().items() if m.split(".")[0] == "rein"
            and (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}
