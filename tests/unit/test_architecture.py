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
