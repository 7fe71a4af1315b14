"""The package's layering: imports only go down the layer list, and nothing imports vlm_jax modules inside
functions (a cycle means a piece sits in the wrong layer) except the CLI, which loads commands lazily."""
import ast
import importlib
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vlm_jax")
# Lowest first. A module may import its own layer or a lower one.
LAYERS = [
    ("errors", "registry", "hardware", "paths", "host_memory"),
    ("config",),
    ("models", "sharding", "topology", "distributed"),
    ("data",),
    ("families",),
    ("convert",),  # below train: `train.init_from` converts a Hugging Face directory on the fly
    ("objectives", "train"),
    ("infer", "plan", "curate", "recipe"),
    ("cli", "demo"),
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
LAZY_IMPORTS_ALLOWED = {"vlm_jax.cli"}


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), os.path.join(root, f)


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2:
        return -1  # the package root itself
    assert parts[1] in LAYER_OF, f"{module} is in no layer; add it to LAYERS"
    return LAYER_OF[parts[1]]


def _vlm_jax_imports(tree):
    """(imported module, inside a function?) for every import of a vlm_jax module."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                yield from ((a.name, nested) for a in child.names if a.name.startswith("vlm_jax"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("vlm_jax"):
                if child.module == "vlm_jax":  # `from vlm_jax import sharding`: each name is a module
                    yield from ((f"vlm_jax.{a.name}", nested) for a in child.names)
                else:
                    yield child.module, nested
            yield from visit(child, nested)
    yield from visit(tree, False)


MODULES = sorted(_modules())


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_only_go_down(module, path):
    tree = ast.parse(open(path).read(), path)
    for imported, in_function in _vlm_jax_imports(tree):
        assert _layer(imported) <= _layer(module), f"{module} (layer {_layer(module)}) imports the higher " \
                                                   f"{imported} (layer {_layer(imported)})"
        assert not in_function or module in LAZY_IMPORTS_ALLOWED, f"{module} imports {imported} inside a function"


def test_every_module_imports_in_layer_order():
    for module, _ in sorted(MODULES, key=lambda m: (_layer(m[0]), m[0])):
        importlib.import_module(module)
