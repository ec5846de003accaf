"""The import rule of docs/architecture.md: every module of nl_detectron imports only from its own
component or from components below it, so that nothing imports upward."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from training_runs import REPO

PACKAGE = REPO / "nl_detectron"
# Component -> layer; a component may import from lower layers and from itself.
LAYERS = {
    "errors": 0,
    "third_party_warnings": 0,
    "atomic_files": 0,
    "compat": 1,
    "device": 1,
    "analysis": 1,
    "layers": 1,
    "config": 2,
    "data": 3,
    "modeling": 3,
    "evaluation": 4,
    "checkpoint": 4,
    "engine": 5,
    "visualization": 5,
    "preflight": 5,
    "export": 5,
    "cli": 6,
}
# The tools that train; every other tool stays off the trainer.
TRAINING_TOOLS = {"train_net.py", "lazyconfig_train_net.py"}


def _component(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "nl_detectron" and len(parts) > 1 else None


def _imports(path: Path) -> list[str]:
    """The nl_detectron modules ``path`` imports (absolute names)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(module)
            found += [f"{module}.{alias.name}" for alias in node.names]
    return [m for m in found if m.startswith("nl_detectron.")]


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_component_has_a_layer():
    components = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _modules()}
    assert components == set(LAYERS), "add new components to LAYERS and docs/architecture.md"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_upward(path: Path):
    source = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    upward = []
    for module in _imports(path):
        target = _component(module)
        if target is None or target == source or target not in LAYERS:
            continue  # the package root's names, or its own component
        if LAYERS[target] >= LAYERS[source]:
            upward.append(module)
    assert not upward, f"{source} (layer {LAYERS[source]}) imports {sorted(set(upward))}"


@pytest.mark.parametrize("path", sorted((REPO / "tools").glob("*.py")), ids=lambda p: p.name)
def test_only_the_training_tools_import_the_trainer(path: Path):
    if path.name in TRAINING_TOOLS:
        return
    assert not [m for m in _imports(path) if _component(m) == "engine"]
