"""The package's layout rules (issue 16): no import circle, every module states `__all__`.

The import graph is read from the source (every `import` of a package module, at module level
or inside a function: an import put inside a function to dodge a circle is still a circle)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "keras_aevb"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))


def _imports(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "keras_aevb":  # from keras_aevb import data
                found.update(a.name for a in node.names if a.name in MODULES)
            elif node.module.startswith("keras_aevb."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(
                a.name.split(".")[1] for a in node.names if a.name.startswith("keras_aevb.")
            )
    return found - {module}


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_circle():
    graph = {module: _imports(module) for module in MODULES}
    assert _cycles(graph) == []


@pytest.mark.parametrize("module", MODULES)
def test_every_module_states_its_public_names(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    assert "__all__" in names, f"keras_aevb/{module}.py has no __all__"


@pytest.mark.parametrize("module", MODULES)
def test_every_public_name_exists(module):
    import importlib

    imported = importlib.import_module(f"keras_aevb.{module}")
    missing = [name for name in imported.__all__ if not hasattr(imported, name)]
    assert missing == []


def test_only_the_cache_module_writes_into_a_models_dict():
    # Caches of compiled functions live in one place (keras_aevb._cache.model_cache), not in
    # keys that each module plants in `model.__dict__`.
    import re

    planted = re.compile(r"\b(model|self)\.__dict__")
    writers = [m for m in MODULES if planted.search((PACKAGE / f"{m}.py").read_text())]
    assert writers == ["_cache"]
