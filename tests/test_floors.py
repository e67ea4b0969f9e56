"""The three floors (CONTRIBUTING): kernels -> the public API -> distributed and integrations.
No module imports a module of a floor above its own, at its top or inside a function (a lazy
import is an import too); the package's ``__init__`` files, which gather the floors' public
names, are the only modules that may."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (folder, its package's name, its floor)
FOLDERS = [
    (ROOT / "kernels", "fused_losses.kernels", 0),
    (ROOT / "fused_losses", "fused_losses", 1),
    (ROOT / "fused_losses" / "distributed", "fused_losses.distributed", 2),
    (ROOT / "fused_losses" / "integrations", "fused_losses.integrations", 2),
]


def floor_of(module: str) -> int | None:
    """The floor of a module of the package (None for another package's)."""
    if module != "fused_losses" and not module.startswith("fused_losses."):
        return None
    for prefix, floor in (("fused_losses.kernels", 0), ("fused_losses.distributed", 2),
                          ("fused_losses.integrations", 2)):
        if module == prefix or module.startswith(prefix + "."):
            return floor
    return 1


def imported(tree: ast.AST, package: str):
    """(line, module) of every import in ``tree``, relative ones resolved from ``package``
    (``from . import x`` names the module ``package.x``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            yield node.lineno, module
            for alias in node.names:  # ``from pkg import submodule``
                yield node.lineno, f"{module}.{alias.name}"


def modules():
    for folder, package, floor in FOLDERS:
        for path in sorted(folder.glob("*.py")):
            if path.name != "__init__.py":
                yield pytest.param(path, package, floor, id=str(path.relative_to(ROOT)))


@pytest.mark.parametrize(("path", "package", "floor"), list(modules()))
def test_no_import_reaches_up(path, package, floor):
    tree = ast.parse(path.read_text(), filename=str(path))
    above = sorted({f"line {line}: {module}" for line, module in imported(tree, package)
                    if (floor_of(module) or 0) > floor})
    assert not above, f"{path.name} (floor {floor}) imports a floor above it: {above}"


def test_the_check_sees_a_lazy_import():
    """The check itself: a function's relative import of the floor above is found."""
    tree = ast.parse("def f():\n    from .distributed.lm_head import ShardedChunks\n")
    found = {module for _, module in imported(tree, "fused_losses")}
    assert "fused_losses.distributed.lm_head" in found
    assert floor_of("fused_losses.distributed.lm_head") == 2
    tree = ast.parse("from .. import _dispatch\n")
    assert {m for _, m in imported(tree, "fused_losses.kernels")} == {
        "fused_losses", "fused_losses._dispatch"}
    assert floor_of("fused_losses._dispatch") == 1
