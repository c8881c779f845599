"""The house's layout: every import between the package's modules (lazy ones inside functions
included) points down a layer or stays in its own, no two modules import each other, and the
scheduler never needs torch. docs/architecture.md draws the same layers."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import multilora_plugin

PACKAGE = pathlib.Path(multilora_plugin.__file__).parent

LAYERS = [  # a module may import modules of its own layer and of the layers above it in this list
    {"version", "errors", "config"},
    {"mapping", "scheduler", "adapters", "kernels"},  # adapters/ and kernels/ import nothing above this
    {"dora", "layers", "experts", "router", "embedding", "saved", "slot_memory", "model", "peft_model", "wrapping", "transformers_cb", "toy"},
    {"batch", "sampling", "intake", "detokenize", "outputs", "sequence", "hooks"},
    {"engine", "llm", "async_engine"},
    {"integrations"},  # the hosts: imported by nothing below them
    {"cli", "demo", ""},  # "" is the package itself
]


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module {module!r} has no layer in LAYERS: place it")


def modules() -> dict:
    """{dotted name relative to the package: path}."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        found[name] = path
    return found


def imports_of(name: str, path: pathlib.Path) -> set:
    """The package's modules that `name` imports anywhere in its file (TYPE_CHECKING blocks aside)."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".") if name else []
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("multilora_plugin"):
                target = node.module[len("multilora_plugin"):].lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import toy` names a module
                candidate = f"{target}.{alias.name}" if target else alias.name
                found.add(candidate if candidate in MODULES else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("multilora_plugin"):
                    found.add(alias.name[len("multilora_plugin"):].lstrip("."))
    found.discard(name)
    return {m for m in found if m in MODULES or m == ""}


MODULES = modules()
GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    up = sorted(m for m in GRAPH[name] if layer_of(m) > layer_of(name))
    assert not up, f"{name} (layer {layer_of(name)}) imports {up} from above it"


def test_no_two_modules_import_each_other():
    pairs = sorted((a, b) for a, deps in GRAPH.items() for b in deps if a < b and a in GRAPH.get(b, ()))
    assert not pairs, pairs


def test_the_scheduler_and_the_command_line_need_no_torch():
    code = ("import sys; import multilora_plugin.scheduler, multilora_plugin.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_no_module_of_the_package_is_too_long():
    """About 450 lines at most (one concern a file); adapters/cache.py, the one owner of residency, is
    the longest at about 480."""
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 490}
    assert not long, long
