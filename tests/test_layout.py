"""The layout rules of ARCHITECTURE.md, checked: imports point down the stages, no import circle
inside a folder, the training library (engine/, data/, config.py) knows nothing of Optuna, Optuna's private API stays in one
adapter module, registries and their name lists agree, and modules stay short."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import catdog_hpo
from catdog_hpo import config

PACKAGE = Path(catdog_hpo.__file__).parent
# Stage of each top-level part: a module may import its own part or a lower stage only.
# ship/ and view/ share a stage and do not import each other.
STAGE = {"catdog_hpo": 0, "errors": 0, "files": 0, "config": 1, "data": 2, "engine": 3,
         "search": 4, "ship": 5, "view": 5, "cli": 6, "__main__": 7}
# Modules allowed past MAX_LINES, each with a ceiling (so it cannot keep growing unnoticed) and why.
MAX_LINES = 350
LONG_MODULES = {
    "config.py": (400, "every config dataclass with its boundary check, in the one module that needs no "
                       "torch: the shape a trial, a training run and an export share"),
}
# Import circles inside a folder still being broken: name -> the circle's modules (without
# "catdog_hpo."): a circle within those modules passes. Delete the entry when its circle is gone.
KNOWN_CIRCLES: dict[str, tuple[str, ...]] = {}
# Optuna's private API: only search/optuna_compat.py may use it (pinned in pyproject).
PRIVATE_OPTUNA = re.compile(r"optuna\.[\w.]*\._\w|from optuna[\w.]*\._\w+ import|\._study_id\b|\._trial_id\b")


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def part(module: str) -> str:
    """``catdog_hpo.search.study`` -> ``search``; ``catdog_hpo.config`` -> ``config``."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else pieces[0]


def imported(path: Path) -> set[str]:
    """Every catdog_hpo module ``path`` imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "catdog_hpo")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "catdog_hpo":  # from catdog_hpo import config, __version__
                out.update(f"catdog_hpo.{a.name}" if a.name in STAGE else "catdog_hpo" for a in node.names)
            elif node.module.split(".")[0] == "catdog_hpo":
                out.add(node.module)
    return out


def _type_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``: they never run, so they make no circle."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def runtime_imports(path: Path, known: set[str]) -> set[str]:
    """The ``known`` modules ``path`` imports when it runs (in functions too, not under
    TYPE_CHECKING); ``from catdog_hpo.x import y`` counts as module ``x.y`` when that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_only(tree)
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known:
            out.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                       for a in node.names)
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while component[-1:] != [v]:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycle_path(graph: dict[str, set[str]], members: list[str]) -> list[str]:
    """One shortest import cycle through ``members[0]`` inside the component: what to break."""
    start, inside = members[0], set(members)
    parent = {start: start}
    frontier = [start]
    while frontier:  # breadth first: the first edge back to start closes a shortest cycle
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & inside):
                if w == start:
                    back = [v]
                    while back[-1] != start:
                        back.append(parent[back[-1]])
                    return [*reversed(back), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def imports_optuna(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "optuna" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "optuna":
            return True
    return False


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def module_name(path: Path) -> str:
    parts = ["catdog_hpo", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_imports_point_down_the_stages() -> None:
    wrong = []
    for path in modules():
        here = part(module_name(path))
        for target in imported(path):
            there = part(target)
            assert there in STAGE, f"{rel(path)} imports {target}: add its part to STAGE (and ARCHITECTURE.md)"
            if there != here and STAGE[there] >= STAGE[here]:
                wrong.append(f"{rel(path)} ({here}) imports {target} ({there})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_no_import_circle_inside_a_folder() -> None:
    paths = {module_name(p): p for p in modules()}
    known = set(paths)
    # Edges inside one folder only; across folders the stages above already forbid a way back.
    graph = {m: {t for t in runtime_imports(p, known) if t != m and part(t) == part(m)} for m, p in paths.items()}
    short = {tuple(m.removeprefix("catdog_hpo.") for m in c): c for c in circles(graph)}
    allowed = [set(mods) for mods in KNOWN_CIRCLES.values()]
    wrong = [" -> ".join(m.removeprefix("catdog_hpo.") for m in cycle_path(graph, c))
             + f"  (the circle: {', '.join(s)})"
             for s, c in short.items() if not any(set(s) <= mods for mods in allowed)]
    assert not wrong, ("import circles inside a folder (move what both sides need below both, or import a "
                       "type under TYPE_CHECKING):\n" + "\n".join(wrong))


def test_the_training_library_never_imports_optuna() -> None:
    library = [p for p in modules() if part(module_name(p)) in ("config", "errors", "files", "data", "engine")]
    assert len(library) > 10  # the scan found the folders
    offenders = [rel(p) for p in library if imports_optuna(p)]
    assert not offenders, f"engine/, data/ and config.py must not import optuna: {offenders}"
    # And at run time: importing all of them pulls in no Optuna through some other module.
    names = [module_name(p) for p in library]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m == 'optuna' or m.startswith('optuna.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_optuna_private_api_is_used_in_one_module_only() -> None:
    users = [rel(p) for p in modules() if PRIVATE_OPTUNA.search(p.read_text(encoding="utf-8"))]
    assert users == ["search/optuna_compat.py"]


def test_modules_stay_short() -> None:
    long = {}
    for path in modules():
        n = len(path.read_text(encoding="utf-8").splitlines())
        limit = LONG_MODULES.get(rel(path), (MAX_LINES, ""))[0]
        if n > limit:
            long[rel(path)] = n
    assert not long, f"modules over {MAX_LINES} lines (split them, or whitelist one with a reason): {long}"
    for name, (_limit, why) in LONG_MODULES.items():
        assert (PACKAGE / name).is_file() and why, name


def test_every_registry_matches_its_list_of_names() -> None:
    from catdog_hpo.cli import run as cli_run
    from catdog_hpo.engine import layers, mix, models, optim
    from catdog_hpo.search import choices, pruners, samplers

    pairs = [(optim.OPTIMIZERS, config.OPTIMIZERS), (optim.SCHEDULERS, config.SCHEDULERS),
             (models.ACTIVATIONS, config.ACTIVATIONS), (models.POOLS, config.POOLS),
             (models.HEADS, config.HEADS), (models.FAMILIES, config.FAMILIES),
             (layers.INITS, config.INITS), (models.PADDINGS, config.PADDINGS), (mix.MIXES, config.MIXES),
             (samplers.SAMPLERS, choices.SAMPLERS), (pruners.PRUNERS, choices.PRUNERS)]
    for registry, names in pairs:
        assert set(registry) == set(names)
    # The CLI's choices are the declared names themselves, not a copy.
    assert cli_run.SAMPLER_CHOICES is choices.SAMPLERS and cli_run.PRUNER_CHOICES is choices.PRUNERS
    with pytest.raises(AssertionError, match="'lion'"):
        config.check_registry("optimizers", {**optim.OPTIMIZERS, "lion": None}, config.OPTIMIZERS)
