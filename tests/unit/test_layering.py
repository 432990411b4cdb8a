"""Imports of `gmflow_jax` point one way, down a fixed stack of layers (no JAX: files are parsed with
`ast`, never imported).

The layers, bottom to top (a module may import any module of its own layer or of a layer below it,
never one above; within a layer the import graph must have no cycle):

    foundation      the package root, atomic_file, config_variant, paths
    math            gm, cpu_kernels, flow, transport, guidance, losses, constants
    models          networks, the model builder, the denoiser wrapper
    solvers         sampler grammar and scan loops
    infrastructure  parallel, data, checkpoint, workdir_lock, run_config, config_validation
    sampling        the sampling driver and its random streams
    workflows       train, eval, pipeline, interop
    tasks           data + evaluators of a run
    entry           run, main, aot

`LAYER_OF` below places every module by its dotted name under the package (longest matching prefix
wins); a module it does not cover fails `test_every_module_has_a_layer`, so a new module has to be
placed on purpose. The graph counts every form of import: `import gmflow_jax.a.b`,
`from gmflow_jax.a import b` (an edge to the submodule `a.b` when `b` is one, else to `a`),
`from gmflow_jax import a`, relative imports, and `importlib.import_module("gmflow_jax...")`.
Imports under `if TYPE_CHECKING:` count too (a type from a higher layer is still a dependency on it).
Importing a submodule also initializes its parent packages; that is not counted as an edge (a
package `__init__` is a module of its own and is checked like any other).

An import of `gmflow_jax` inside a function body fails: it is how a cycle gets dodged instead of
resolved. Third-party imports inside functions are allowed for the optional heavy dependencies in
`LAZY_THIRD_PARTY`; any other is reported as a warning, not a failure.

The checker is tested on synthetic packages written to `tmp_path` (a cycle, an upward import, a
function-level import, an unplaced module), so that a clean result on the real tree means something.
"""

from __future__ import annotations

import ast
import dataclasses
import textwrap
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "gmflow_jax"
PACKAGE_DIR = REPO / PACKAGE

LAYERS = (
    "foundation",
    "math",
    "models",
    "solvers",
    "infrastructure",
    "sampling",
    "workflows",
    "tasks",
    "entry",
)
"""Bottom to top: a module may import its own layer and the layers listed before it."""

# Module prefix (dotted, relative to the package; "" is the package root) -> layer.
LAYER_OF = {
    "": "foundation",  # gmflow_jax/__init__.py: the version string; importing it must cost nothing
    "atomic_file": "foundation",  # stdlib + numpy file writes, used from data up to tasks
    "config_variant": "foundation",  # config-file variant parsing, used by configs/*.py
    "paths": "foundation",  # the path layer (local or gs://): atomic_file itself names files with it
    "constants": "math",  # the epsilons of the math; imported by every math module
    "gm": "math",
    "cpu_kernels": "math",  # native CPU kernels of the GM math (XLA FFI); imported by gm only
    "flow": "math",
    "transport": "math",
    "guidance": "math",
    "losses": "math",
    "models": "models",
    "solvers": "solvers",
    # Infrastructure sits right below sampling: it is used from sampling upward (the driver shards
    # over a mesh; train, eval, pipeline and tasks read data and checkpoints), never by the pure
    # math, networks or sampler scans. It may import them (config_validation parses sampler rows);
    # the rest of it imports only the foundation today.
    "parallel": "infrastructure",
    "data": "infrastructure",
    "checkpoint": "infrastructure",
    "workdir_lock": "infrastructure",  # one run per workdir, taken by the run before training
    "run_config": "infrastructure",  # the workdir's config record, checked before step 0
    "config_validation": "infrastructure",  # checks sampler rows with the solvers' grammar
    "sampling": "sampling",
    "train": "workflows",
    "eval": "workflows",
    "pipeline": "workflows",
    "interop": "workflows",  # official checkpoint -> models; the pipeline loads through it
    "tasks": "tasks",
    "run": "entry",
    "main": "entry",
    "aot": "entry",  # `python -m gmflow_jax.aot`: builds a run's train step and sampler, like run
}

LAZY_THIRD_PARTY = frozenset(
    {"torch", "tensorflow", "tensorflow_datasets", "huggingface_hub", "sklearn"}
)
"""Optional or slow-to-import dependencies that a function may import lazily (a top-level name
each): sklearn is a hard dependency, but only the digits task needs it and it takes ~0.6 s."""


@dataclasses.dataclass(frozen=True)
class Import:
    """One import statement (or `importlib.import_module` call) of a module of the package."""

    importer: str  # dotted module name, e.g. "gmflow_jax.models.gm_dit"
    target: str  # a module of the package, or the top-level name of an outside module
    internal: bool  # whether `target` is a module of the package
    file: Path
    line: int
    in_function: bool

    def where(self, root: Path) -> str:
        return f"{self.file.relative_to(root)}:{self.line}"


def package_modules(package_dir: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every `.py` file and every package directory under it.

    A directory without `__init__.py` (an implicit namespace package) still names a module that
    `from package import directory` can reach; it maps to the directory itself.
    """
    modules: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = (package, *path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    for directory in sorted(p for p in package_dir.rglob("*") if p.is_dir()):
        if directory.name == "__pycache__" or not any(directory.rglob("*.py")):
            continue
        name = ".".join((package, *directory.relative_to(package_dir).parts))
        modules.setdefault(name, directory)
    return modules


def _existing(name: str, modules: Mapping[str, Path]) -> str:
    """The longest dotted prefix of `name` that is a module (a name past it is an attribute)."""
    parts = name.split(".")
    while len(parts) > 1 and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def _from_targets(base: str, names: Iterable[str], modules: Mapping[str, Path]) -> list[str]:
    """Targets of `from base import n1, n2`: `base.n` where that is a module, else `base`."""
    targets = []
    for name in names:
        sub = f"{base}.{name}"
        targets.append(sub if sub in modules else _existing(base, modules))
    return targets


class _ImportCollector(ast.NodeVisitor):
    """Every import of one module, with its line and whether it sits inside a function body."""

    def __init__(self, module: str, is_package: bool, file: Path, package: str, modules):
        self.module, self.is_package, self.file = module, is_package, file
        self.package, self.modules = package, modules
        self.depth = 0
        self.imports: list[Import] = []

    def _add(self, target: str, line: int) -> None:
        internal = target == self.package or target.startswith(self.package + ".")
        if not internal:
            target = target.split(".")[0]
        self.imports.append(
            Import(self.module, target, internal, self.file, line, in_function=self.depth > 0)
        )

    def _function(self, node: ast.AST) -> None:
        # Decorators and default values run at definition time, in the enclosing scope.
        for expr in (*node.decorator_list, *node.args.defaults, *node.args.kw_defaults):
            if expr is not None:
                self.visit(expr)
        self.depth += 1
        for stmt in node.body:
            self.visit(stmt)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            target = alias.name
            if target == self.package or target.startswith(self.package + "."):
                target = _existing(target, self.modules)
            self._add(target, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            # The package a relative import starts from: the module itself when it is a package.
            anchor = self.module.split(".")
            if not self.is_package:
                anchor = anchor[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        if base == self.package or base.startswith(self.package + "."):
            for target in _from_targets(base, (a.name for a in node.names), self.modules):
                self._add(target, node.lineno)
        elif base != "__future__":
            self._add(base, node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("gmflow_jax.x") / __import__("gmflow_jax.x"): an import all the same.
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            target = node.args[0].value
            if target == self.package or target.startswith(self.package + "."):
                self._add(_existing(target, self.modules), node.lineno)
        self.generic_visit(node)


def collect_imports(package_dir: Path, package: str) -> tuple[dict[str, Path], list[Import]]:
    """All modules of the package and all their imports (internal and third-party)."""
    modules = package_modules(package_dir, package)
    imports: list[Import] = []
    for module, path in modules.items():
        if path.is_dir():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        collector = _ImportCollector(module, path.name == "__init__.py", path, package, modules)
        collector.visit(tree)
        imports.extend(collector.imports)
    return modules, imports


def find_cycles(imports: Sequence[Import]) -> list[list[Import]]:
    """Import cycles of the internal import graph: a shortest one through every module on a cycle.

    A cycle is the list of imports (edges) from a module back to itself. Tarjan's algorithm finds
    the strongly connected components; within each, a breadth-first search from every member finds
    a shortest cycle through it; a cycle found from several members is listed once.
    """
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.internal:
            edges.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    nodes = sorted(set(edges) | {t for out in edges.values() for t in out})

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(root: str) -> None:
        # Iterative Tarjan (a deep package would overflow the recursion limit).
        work = [(root, iter(sorted(edges.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(edges.get(succ, {})))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))

    for node in nodes:
        if node not in index:
            strongconnect(node)

    def shortest_cycle(start: str, members: set[str]) -> list[Import]:
        # Breadth-first search from `start` back to `start` inside its component.
        previous: dict[str, str] = {}
        frontier, last = [start], None
        while last is None:
            next_frontier = []
            for node in frontier:
                successors = [s for s in sorted(edges.get(node, {})) if s in members]
                if start in successors:
                    last = node
                    break
                for succ in successors:
                    if succ not in previous:
                        previous[succ] = node
                        next_frontier.append(succ)
            frontier = next_frontier
        path = [last]
        while path[-1] != start:
            path.append(previous[path[-1]])
        path.reverse()  # start ... last
        return [edges[a][b] for a, b in zip(path, [*path[1:], start], strict=True)]

    cycles, seen = [], set()
    for component in sorted(components):
        members = set(component)
        if len(component) == 1 and component[0] not in edges.get(component[0], {}):
            continue
        # A shortest cycle through every module of the component, each cycle once: fixing the
        # first one reported must not hide the others.
        for start in component:
            cycle = shortest_cycle(start, members)
            key = frozenset((imp.importer, imp.target) for imp in cycle)
            if key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return cycles


def layer_of(module: str, package: str, table: Mapping[str, str]) -> str | None:
    """The layer of a dotted module name: the entry of its longest prefix in `table`, or None."""
    relative = "" if module == package else module.removeprefix(package + ".")
    best = None
    for prefix, layer in table.items():
        if relative == prefix or (prefix and relative.startswith(prefix + ".")):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def unplaced_modules(modules: Iterable[str], package: str, table: Mapping[str, str]) -> list[str]:
    return sorted(m for m in modules if layer_of(m, package, table) is None)


def stale_prefixes(modules: Iterable[str], package: str, table: Mapping[str, str]) -> list[str]:
    """Entries of `table` that no module matches (a module was renamed or removed)."""
    modules = list(modules)
    stale = []
    for prefix in table:
        full = package if not prefix else f"{package}.{prefix}"
        if not any(m == full or m.startswith(full + ".") for m in modules):
            stale.append(prefix)
    return stale


def upward_imports(
    imports: Iterable[Import], package: str, table: Mapping[str, str], layers: Sequence[str]
) -> list[tuple[Import, str, str]]:
    """(import, importer's layer, target's layer) for every internal import that points up."""
    rank = {layer: i for i, layer in enumerate(layers)}
    found = []
    for imp in imports:
        if not imp.internal:
            continue
        low, high = layer_of(imp.importer, package, table), layer_of(imp.target, package, table)
        if low is None or high is None:
            continue  # reported by unplaced_modules
        if rank[high] > rank[low]:
            found.append((imp, low, high))
    return found


def function_level_imports(
    imports: Iterable[Import], allowed_third_party: frozenset[str]
) -> tuple[list[Import], list[Import]]:
    """(imports of the package inside functions, other function-level imports not allowed)."""
    internal, other = [], []
    for imp in imports:
        if not imp.in_function:
            continue
        if imp.internal:
            internal.append(imp)
        elif imp.target not in allowed_third_party:
            other.append(imp)
    return internal, other


def directories_without_init(modules: Mapping[str, Path]) -> list[Path]:
    return sorted(path for path in modules.values() if path.is_dir())


def _describe_cycle(cycle: Sequence[Import], root: Path) -> str:
    hops = " -> ".join([cycle[0].importer, *(imp.target for imp in cycle)])
    lines = ", ".join(f"{imp.where(root)}" for imp in cycle)
    return f"{hops}  ({lines})"


def _describe_upward(found: Iterable[tuple[Import, str, str]], root: Path) -> list[str]:
    return [
        f"{imp.where(root)}: {imp.importer} ({low}) imports {imp.target} ({high}), a higher layer"
        for imp, low, high in found
    ]


# ------------------------------------------------------------------------------------------------
# The real package.


@pytest.fixture(scope="module")
def real_tree() -> tuple[dict[str, Path], list[Import]]:
    return collect_imports(PACKAGE_DIR, PACKAGE)


def test_every_module_has_a_layer(real_tree):
    modules, _ = real_tree
    unplaced = unplaced_modules(modules, PACKAGE, LAYER_OF)
    assert not unplaced, f"modules without a layer (add them to LAYER_OF): {unplaced}"


def test_every_layer_table_entry_names_a_module(real_tree):
    modules, _ = real_tree
    stale = stale_prefixes(modules, PACKAGE, LAYER_OF)
    assert not stale, f"LAYER_OF entries that match no module (remove or rename them): {stale}"


def test_layer_table_names_only_known_layers():
    assert set(LAYER_OF.values()) <= set(LAYERS), set(LAYER_OF.values()) - set(LAYERS)


def test_no_import_cycles(real_tree):
    _, imports = real_tree
    cycles = [_describe_cycle(c, REPO) for c in find_cycles(imports)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_point_down_the_layers(real_tree):
    _, imports = real_tree
    found = _describe_upward(upward_imports(imports, PACKAGE, LAYER_OF, LAYERS), REPO)
    assert not found, "imports pointing up the layers:\n" + "\n".join(found)


def test_no_package_import_inside_a_function(real_tree):
    _, imports = real_tree
    internal, other = function_level_imports(imports, LAZY_THIRD_PARTY)
    if other:
        # Not a failure: a lazy import of a light dependency is a style question, not a layering one.
        warnings.warn(
            "third-party imports inside functions (not in LAZY_THIRD_PARTY): "
            + "; ".join(f"{imp.where(REPO)} {imp.target}" for imp in other),
            stacklevel=1,
        )
    found = [f"{imp.where(REPO)}: {imp.importer} imports {imp.target}" for imp in internal]
    assert not found, "imports of the package inside a function (resolve the cycle instead):\n" + (
        "\n".join(found)
    )


def test_every_package_directory_has_an_init(real_tree):
    # setuptools' find_packages (pyproject.toml) skips a directory without __init__.py: an installed
    # (non-editable) wheel would lack those modules.
    modules, _ = real_tree
    missing = [str(p.relative_to(REPO)) for p in directories_without_init(modules)]
    assert not missing, f"package directories without __init__.py: {missing}"


# ------------------------------------------------------------------------------------------------
# The checker on synthetic packages: it must find what is there, and only that.

TOY_LAYERS = ("base", "low", "high")
TOY_LAYER_OF = {"": "base", "base": "base", "low": "low", "high": "high"}


def _write_package(root: Path, files: Mapping[str, str]) -> Path:
    package_dir = root / "toy"
    for relative, text in files.items():
        path = package_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return package_dir


CLEAN_TOY = {
    "__init__.py": '"""Root."""\n',
    "base.py": "import os\n",
    "low/__init__.py": "from toy.low.alpha import A\n",
    "low/alpha.py": "from toy import base\nA = 1\n",
    "low/beta.py": "from . import alpha\nfrom .alpha import A\nfrom ..base import os\n",
    "high/__init__.py": "",
    "high/gamma.py": """\
        import toy.low.beta
        from toy.low import alpha, A
        import numpy as np

        def f():
            import torch
            return torch
        """,
}


def _edges(imports: Iterable[Import]) -> set[tuple[str, str]]:
    return {(i.importer, i.target) for i in imports if i.internal}


def test_checker_resolves_every_import_form(tmp_path):
    modules, imports = collect_imports(_write_package(tmp_path, CLEAN_TOY), "toy")
    assert _edges(imports) == {
        ("toy.low", "toy.low.alpha"),  # a name of a submodule: edge to the submodule
        ("toy.low.alpha", "toy.base"),  # `from toy import base`: base is a submodule
        ("toy.low.beta", "toy.low.alpha"),  # relative, both forms
        ("toy.low.beta", "toy.base"),  # `from ..base import os`: os is an attribute
        ("toy.high.gamma", "toy.low.beta"),
        ("toy.high.gamma", "toy.low.alpha"),
        ("toy.high.gamma", "toy.low"),  # `from toy.low import A`: A is an attribute of the package
    }
    third_party = {(i.importer, i.target, i.in_function) for i in imports if not i.internal}
    assert third_party == {
        ("toy.base", "os", False),
        ("toy.high.gamma", "numpy", False),
        ("toy.high.gamma", "torch", True),
    }
    assert find_cycles(imports) == []
    assert upward_imports(imports, "toy", TOY_LAYER_OF, TOY_LAYERS) == []
    assert unplaced_modules(modules, "toy", TOY_LAYER_OF) == []
    assert stale_prefixes(modules, "toy", TOY_LAYER_OF) == []
    assert function_level_imports(imports, frozenset({"torch"})) == ([], [])
    assert directories_without_init(modules) == []


def test_checker_finds_a_cycle_and_names_its_lines(tmp_path):
    files = dict(CLEAN_TOY)
    files["low/beta.py"] = "import os\n\nfrom toy.low import gamma_low\n"  # line 3
    files["low/gamma_low.py"] = "from .delta import D\n"  # line 1
    files["low/delta.py"] = "import toy.low.beta\n\nD = 1\n"  # line 1
    _, imports = collect_imports(_write_package(tmp_path, files), "toy")
    cycles = find_cycles(imports)
    assert len(cycles) == 1
    (cycle,) = cycles
    hops = [(imp.importer, imp.target, imp.line) for imp in cycle]
    # The search starts at the component's first module (sorted) and follows the imports round.
    assert hops == [
        ("toy.low.beta", "toy.low.gamma_low", 3),
        ("toy.low.gamma_low", "toy.low.delta", 1),
        ("toy.low.delta", "toy.low.beta", 1),
    ]
    # The hops chain: each target is the next importer, the last target the first importer.
    for first, second in zip(cycle, [*cycle[1:], cycle[0]], strict=True):
        assert first.target == second.importer
    text = _describe_cycle(cycle, tmp_path)
    assert "toy/low/beta.py:3" in text and "toy/low/delta.py:1" in text


def test_checker_lists_every_cycle_of_one_component(tmp_path):
    # a <-> b and b <-> c share b: one component, two cycles; both must be reported.
    files = dict(CLEAN_TOY)
    files["low/a.py"] = "from toy.low import b\n"
    files["low/b.py"] = "from toy.low import a, c\n"
    files["low/c.py"] = "from .b import X\n"
    _, imports = collect_imports(_write_package(tmp_path, files), "toy")
    cycles = {frozenset((i.importer, i.target) for i in cycle) for cycle in find_cycles(imports)}
    assert cycles == {
        frozenset({("toy.low.a", "toy.low.b"), ("toy.low.b", "toy.low.a")}),
        frozenset({("toy.low.b", "toy.low.c"), ("toy.low.c", "toy.low.b")}),
    }


def test_checker_finds_a_self_import_and_a_package_init_cycle(tmp_path):
    files = dict(CLEAN_TOY)
    files["low/alpha.py"] = "from toy import base\nfrom toy.low import beta\nA = 1\n"
    files["low/beta.py"] = (
        "import toy.low\n"  # toy.low's __init__ imports alpha, alpha imports beta
    )
    files["high/gamma.py"] = "from toy.high import gamma\n"  # a module importing itself
    _, imports = collect_imports(_write_package(tmp_path, files), "toy")
    cycles = {frozenset(imp.importer for imp in cycle) for cycle in find_cycles(imports)}
    assert cycles == {
        frozenset({"toy.low", "toy.low.alpha", "toy.low.beta"}),
        frozenset({"toy.high.gamma"}),
    }


def test_checker_finds_an_upward_import(tmp_path):
    files = dict(CLEAN_TOY)
    files["low/beta.py"] = "from . import alpha\nfrom toy.high.gamma import f\n"
    files["base.py"] = "import toy.high\n"
    files["low/alpha.py"] = """\
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            from toy.high import gamma
        A = 1
        """
    _, imports = collect_imports(_write_package(tmp_path, files), "toy")
    found = {
        (imp.importer, imp.target, imp.line, low, high)
        for imp, low, high in upward_imports(imports, "toy", TOY_LAYER_OF, TOY_LAYERS)
    }
    assert found == {
        ("toy.low.beta", "toy.high.gamma", 2, "low", "high"),
        ("toy.base", "toy.high", 1, "base", "high"),
        ("toy.low.alpha", "toy.high.gamma", 4, "low", "high"),
    }
    text = _describe_upward(upward_imports(imports, "toy", TOY_LAYER_OF, TOY_LAYERS), tmp_path)
    assert any(line.startswith("toy/low/beta.py:2: toy.low.beta (low)") for line in text)


def test_checker_finds_function_level_imports(tmp_path):
    files = dict(CLEAN_TOY)
    files["high/gamma.py"] = """\
        import numpy as np


        def f(x=np.zeros(1)):
            from toy.low import alpha
            import torch
            import scipy.linalg
            return alpha, torch, scipy


        class C:
            import json

            def method(self):
                import importlib
                return importlib.import_module("toy.low.beta")
        """
    _, imports = collect_imports(_write_package(tmp_path, files), "toy")
    internal, other = function_level_imports(imports, frozenset({"torch"}))
    assert {(i.target, i.line) for i in internal} == {("toy.low.alpha", 5), ("toy.low.beta", 16)}
    # torch is allowed; scipy and importlib are reported; json in a class body is module level.
    assert {(i.target, i.line) for i in other} == {("scipy", 7), ("importlib", 15)}
    assert ("numpy", False) in {(i.target, i.in_function) for i in imports}
    assert ("json", False) in {(i.target, i.in_function) for i in imports}


def test_checker_finds_unplaced_modules_stale_entries_and_missing_inits(tmp_path):
    files = dict(CLEAN_TOY)
    files["extra/new.py"] = "X = 1\n"  # a new subpackage with no layer and no __init__.py
    files["lowly.py"] = "Y = 1\n"  # shares a prefix with "low" but is not under it
    table = {**TOY_LAYER_OF, "gone": "low"}
    modules, _ = collect_imports(_write_package(tmp_path, files), "toy")
    assert unplaced_modules(modules, "toy", table) == ["toy.extra", "toy.extra.new", "toy.lowly"]
    assert stale_prefixes(modules, "toy", table) == ["gone"]
    assert [p.name for p in directories_without_init(modules)] == ["extra"]


def test_layer_of_takes_the_longest_prefix():
    table = {"": "foundation", "eval": "workflows", "eval.metrics": "math"}
    assert layer_of("gmflow_jax", "gmflow_jax", table) == "foundation"
    assert layer_of("gmflow_jax.eval", "gmflow_jax", table) == "workflows"
    assert layer_of("gmflow_jax.eval.sweep", "gmflow_jax", table) == "workflows"
    assert layer_of("gmflow_jax.eval.metrics.tv", "gmflow_jax", table) == "math"
    assert layer_of("gmflow_jax.evaluation", "gmflow_jax", table) is None
