"""The house rules of the source tree (docs/PIPELINE.md, "The map"), checked on every run.

- no import circle among the project's modules, counting imports inside functions (a lazy import
  hides a circle from Python, not from a reader);
- `models/` never imports Ray or `pipeline/`; `pipeline/` reaches `models/` only through
  `models/interface.py`, except training and evaluation, which may also use `models.training`
  and `models.shapes`;
- no module over 600 lines, at most 8 modules in `pipeline/`'s root;
- nothing tracked points at the workspace's shared folder beside the repository, and no file
  holds a merge conflict's markers.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "models", "jobs")
MAX_LINES = 600
MAX_PIPELINE_ROOT_MODULES = 8
# pipeline/ modules allowed past the seam, and the models packages they may use
PAST_THE_SEAM = {"pipeline.train": ("models.training", "models.shapes"),
                 "pipeline.evaluate": ("models.training", "models.shapes")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, at any depth (functions included).

    `from a.b import c` names the module `a.b.c` when that is a module, else `a.b`; relative
    imports are resolved against the importing module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if full in modules else base, node.lineno))
    return found


def _graph() -> tuple[dict[str, Path], dict[str, set[str]]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m, _ in imports_of(name, path, modules) if m in modules and m != name}
    return modules, graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_checker_finds_a_circle_hidden_in_a_function():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_reads_imports_inside_functions(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("import os\n\ndef f():\n    from pipeline.errors import one_line\n    return one_line\n")
    got = imports_of("pipeline.mod", src, {"pipeline.errors": src})
    assert ("pipeline.errors", 4) in got and ("os", 1) in got


def test_no_import_circle():
    _, graph = _graph()
    assert find_cycles(graph) == []


def test_models_never_import_ray_or_pipeline():
    modules = project_modules()
    bad = [f"{name}:{line} imports {m}" for name, path in modules.items() if name.startswith("models")
           for m, line in imports_of(name, path, modules) if m.split(".")[0] in ("ray", "pipeline")]
    assert bad == []


def test_pipeline_reaches_models_through_the_interface():
    modules = project_modules()
    bad = []
    for name, path in modules.items():
        if not name.startswith(("pipeline", "jobs")):
            continue
        allowed = ("models.interface", *PAST_THE_SEAM.get(name, ()))
        bad += [f"{name}:{line} imports {m}" for m, line in imports_of(name, path, modules)
                if m.split(".")[0] == "models" and not m.startswith(allowed)]
    assert bad == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_over_600_lines(package):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_pipeline_root_holds_few_modules():
    root = sorted(p.name for p in (ROOT / "pipeline").glob("*.py"))
    assert len(root) <= MAX_PIPELINE_ROOT_MODULES, root


# built from parts so that this file does not name them itself
OUTSIDE = ["../" + "shared", *("shared/" + doc for doc in ("SHAPES_WORLD", "STACK", "DESIGN"))]
CONFLICT_MARKERS = tuple(c * 7 + " " for c in "<>")  # "<<<<<<< HEAD", ">>>>>>> branch"


def test_nothing_tracked_points_outside_the_repository_or_holds_a_conflict():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for f in files:
        path = ROOT / f
        if path.suffix in {".safetensors", ".jpg", ".png", ".parquet"} or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        hits += [f"{f}: {word}" for word in OUTSIDE if word in text]
        hits += [f"{f}:{i}: merge conflict marker" for i, line in enumerate(text.splitlines(), 1)
                 if line.startswith(CONFLICT_MARKERS)]
    assert hits == []
