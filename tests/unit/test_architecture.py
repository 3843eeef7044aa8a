"""docs/diagrams/layers.dot draws the layers the import contract enforces: every layer of the contract in
pyproject.toml is a box of the picture, so a new layer cannot be added without drawing it."""

from __future__ import annotations

import re
import tomllib

from tests.support.paths import REPO_ROOT


def test_every_layer_of_the_import_contract_is_in_the_picture() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = config["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    modules = [m.strip() for layer in layers for m in re.split(r"[|:]", layer)]
    picture = (REPO_ROOT / "docs" / "diagrams" / "layers.dot").read_text(encoding="utf-8")
    drawn = set(re.findall(r'label="([a-z_]+)(?:/|\.py)', picture))
    missing = [m for m in modules if m.removeprefix("unbroken.") not in drawn]
    assert not missing, f"layers of the import contract not drawn in docs/diagrams/layers.dot: {missing}"
    svg = (REPO_ROOT / "docs" / "diagrams" / "layers.svg").read_text(encoding="utf-8")
    assert all(f"{m.removeprefix('unbroken.')}" in svg for m in modules), "layers.svg is stale: run make docs"


def test_imports_inside_functions_are_lazy_loads_with_a_reason() -> None:
    """An import of the package inside a function hides a dependency from the import contract: allowed only to load
    a module lazily for cold start, and then with a comment saying why (on the line, or above it in the same block of
    imports)."""
    import ast

    unexplained = []
    for path in sorted((REPO_ROOT / "layers" / "unbroken").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("unbroken"):
                    if not _explained(lines, inner.lineno - 1):
                        unexplained.append(f"{path.relative_to(REPO_ROOT)}:{inner.lineno}")
    assert not unexplained, f"function-level imports of unbroken without a reason: {unexplained}"


def _explained(lines: list[str], index: int) -> bool:
    if "#" in lines[index]:
        return True
    for line in reversed(lines[:index]):
        stripped = line.strip()
        if stripped.startswith("#"):
            return True
        if stripped and not stripped.startswith(("import ", "from ")):
            return False
    return False
