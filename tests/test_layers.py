"""Dependencies run one way: every robustlab module imports only its own layer and the ones below.

The layers, bottom to top (ARCHITECTURE.md's layout):

    errors.py, io.py, version.py  <-  core  <-  models  <-  attacks  <-  (train, evaluate)
        <-  (analysis, monitor)  <-  report  <-  (cli/, demo.py, the package root)

- errors.py, io.py and version.py may be imported by every module;
- data/ depends only on core, errors and io, and may be imported by train, evaluate and above;
- store.py may be imported by report and the top layer only;
- two packages on the same step (train and evaluate; analysis and monitor) do not import
  each other.

Imports inside functions count like any other (and so do imports under ``TYPE_CHECKING``). An
import inside a function that closes a cycle (the imported module leads back, through any
imports, to the importer) fails on its own: a cycle is a concept in the wrong room.

The check reads the source with :mod:`ast` only; it imports nothing it checks.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "robustlab"

#: Each top-level part of the package, and the layer it sits in.
GROUPS = {
    "errors": "base",
    "io": "base",
    "version": "base",
    "core": "core",
    "data": "data",
    "models": "models",
    "attacks": "attacks",
    "train": "train",
    "evaluate": "evaluate",
    "analysis": "analysis",
    "monitor": "monitor",
    "store": "store",
    "report": "report",
    "history": "report",  # like the report, it reads stored results
    "cli": "top",
    "demo": "top",
    "__main__": "top",
}

#: Height of each layer: a module may import layers strictly below its own.
RANK = {
    "base": 0.0,
    "core": 1.0,
    "data": 1.5,
    "models": 2.0,
    "attacks": 3.0,
    "train": 4.0,
    "evaluate": 4.0,
    "analysis": 5.0,
    "monitor": 5.0,
    "store": 5.5,
    "report": 6.0,
    "top": 7.0,
}

#: Layers some others may not import although they sit below: who may.
ONLY_FOR = {
    "data": {"train", "evaluate", "analysis", "monitor", "store", "report", "top"},
    "store": {"report", "top"},
}

#: Layers whose modules may import only the listed ones (besides their own).
ONLY_FROM = {"data": {"base", "core"}, "base": {"base"}}


@dataclass(frozen=True)
class Import:
    """One import statement's robustlab target, where it is and whether a function holds it."""

    importer: str
    target: str
    line: int
    in_function: bool


def module_name(path: Path) -> tuple[str, bool]:
    """The dotted module name of a source file, and whether it is a package's ``__init__``."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def read_sources() -> dict[str, tuple[str, bool, str]]:
    """Every module of the package: name -> (file, is package, source)."""
    sources = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        name, is_package = module_name(path)
        sources[name] = (str(path.relative_to(SRC.parent)), is_package, path.read_text())
    return sources


def group_of(module: str) -> str | None:
    """The layer of a robustlab module (the package root is on top), None when unplaced."""
    parts = module.split(".")
    if parts == [PACKAGE]:
        return "top"
    return GROUPS.get(parts[1])


def allowed(importer: str, target: str) -> bool:
    """Whether a module of layer ``importer`` may import one of layer ``target``."""
    if importer == target:
        return True
    if importer in ONLY_FROM:
        return target in ONLY_FROM[importer]
    if target == "base":
        return True
    if target in ONLY_FOR and importer not in ONLY_FOR[target]:
        return False
    return RANK[target] < RANK[importer]


class _Collector(ast.NodeVisitor):
    """Every import of a module, with whether it sits inside a function."""

    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.module = module
        self.known = known
        self.depth = 0
        self.found: list[Import] = []

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function
    visit_Lambda = _function

    def _add(self, target: str, line: int) -> None:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            self.found.append(Import(self.module, target, line, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            base_parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join([*base_parts, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.known else base, node.lineno)


def collect(sources: dict[str, tuple[str, bool, str]]) -> list[Import]:
    """Every robustlab import of every module (target: the module itself, never a name in it)."""
    known = set(sources)
    found: list[Import] = []
    for name, (_, is_package, text) in sources.items():
        collector = _Collector(name, is_package, known)
        collector.visit(ast.parse(text))
        found += collector.found
    return found


def layer_violations(sources: dict[str, tuple[str, bool, str]]) -> list[str]:
    """Every import that goes up or sideways, as 'file:line: ...'."""
    out = []
    for imp in collect(sources):
        have, want = group_of(imp.importer), group_of(imp.target)
        if have is None or want is None or not allowed(have, want):
            where = " inside a function" if imp.in_function else ""
            out.append(
                f"{sources[imp.importer][0]}:{imp.line}: {have} module {imp.importer} "
                f"imports {want} module {imp.target}{where}"
            )
    return out


def hidden_cycles(sources: dict[str, tuple[str, bool, str]]) -> list[str]:
    """Every import inside a function whose target leads back to the importer."""
    imports = collect(sources)
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.target)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = {start}, [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            for nxt in graph.get(node, ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    return [
        f"{sources[imp.importer][0]}:{imp.line}: {imp.importer} imports {imp.target} inside a "
        f"function, and {imp.target} leads back to {imp.importer}"
        for imp in imports
        if imp.in_function and imp.target != imp.importer and reaches(imp.target, imp.importer)
    ]


# ---- the checks -----------------------------------------------------------------------------


def test_every_module_sits_in_a_layer() -> None:
    unplaced = [name for name in read_sources() if group_of(name) is None]
    assert not unplaced, f"modules in no layer (add them to GROUPS): {unplaced}"


def test_layers_only_import_downward() -> None:
    violations = layer_violations(read_sources())
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_no_import_inside_a_function_hides_a_cycle() -> None:
    cycles = hidden_cycles(read_sources())
    assert not cycles, "imports inside functions that close a cycle:\n" + "\n".join(cycles)


# ---- the checker itself can fail ----------------------------------------------------------


def test_the_checker_finds_upward_sideways_and_hidden_imports() -> None:
    sources = {
        "robustlab": ("robustlab/__init__.py", True, ""),
        "robustlab.errors": ("errors.py", False, ""),
        "robustlab.models": ("models/__init__.py", True, "from .multiexit import X\n"),
        "robustlab.models.multiexit": (
            "models/multiexit.py",
            False,
            "from ..errors import E\ndef f():\n    from ..analysis.efficiency import calibrate\n",
        ),
        "robustlab.analysis": ("analysis/__init__.py", True, ""),
        "robustlab.analysis.efficiency": (
            "analysis/efficiency.py",
            False,
            "from ..models.multiexit import X\nfrom robustlab.monitor import watch\n",
        ),
        "robustlab.monitor": ("monitor/__init__.py", True, "import robustlab.errors\n"),
        "robustlab.data": ("data/__init__.py", True, "from .. import models\n"),
        "robustlab.train": ("train/__init__.py", True, "from ..data import load\n"),
        "robustlab.attacks": ("attacks/__init__.py", True, "from ..data import load\n"),
    }
    violations = layer_violations(sources)
    assert [v.split(":")[0] + ":" + v.split(":")[1] for v in violations] == [
        "models/multiexit.py:3",  # models -> analysis, inside a function
        "analysis/efficiency.py:2",  # analysis -> monitor: sideways
        "data/__init__.py:1",  # data -> the models package
        "attacks/__init__.py:1",  # attacks may not use data
    ]
    assert "inside a function" in violations[0]
    cycles = hidden_cycles(sources)
    assert len(cycles) == 1 and cycles[0].startswith("models/multiexit.py:3:")
    # the same import at module level, without the way back, is no hidden cycle
    sources["robustlab.analysis.efficiency"] = ("analysis/efficiency.py", False, "")
    assert hidden_cycles(sources) == []
    assert allowed("report", "store") and not allowed("analysis", "store")
    assert allowed("evaluate", "data") and allowed("top", "report") and allowed("core", "base")
    assert not allowed("base", "core") and not allowed("train", "evaluate")
