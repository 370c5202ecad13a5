"""The import graph of the installed ``fqt_compiler`` package, read from source with ``ast``.

Every ``import`` counts, module-level or inside a function: an import moved into a function
still couples the two modules, it only hides the cycle from the interpreter.
"""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
from pathlib import Path

import networkx as nx

ROOT = "fqt_compiler"
# The repository folders pyproject.toml maps into the namespace (``package-dir``); an editable
# install keeps them outside fqt_compiler/, where walking its ``__path__`` cannot see them.
MAPPED = ("passes", "codegen", "tools")


def package_modules(root: str = ROOT) -> dict[str, Path]:
    """Every module of the installed package ``root``: dotted name -> source file."""
    modules: dict[str, Path] = {}
    for name in (root, *(f"{root}.{sub}" for sub in MAPPED)):
        package = importlib.import_module(name)
        modules[name] = Path(package.__file__)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
            spec = info.module_finder.find_spec(info.name, None)
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                modules[info.name] = Path(spec.origin)
    return modules


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` (source file ``path``) imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, is_package, node)
            for alias in node.names:
                child = f"{target}.{alias.name}"
                # ``from pkg import submodule`` depends on the submodule, not on pkg/__init__.
                found.add(child if child in known else target)
    return {name for name in found if name in known and name != module}


@functools.lru_cache(maxsize=None)
def import_graph(root: str = ROOT) -> nx.DiGraph:
    """Edges ``a -> b`` for every import of module ``b`` by module ``a`` inside ``root`` (built
    once per process: the sources do not change under a test run; do not mutate it)."""
    modules = package_modules(root)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        graph.add_edges_from((name, dep) for dep in imports_of(name, path, set(modules)))
    return graph
