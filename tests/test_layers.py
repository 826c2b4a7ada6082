"""Layers import downward only: machine <- boot <- hal <- kernel <- tools (STYLE.md rule 1).

`testing` (the test kit) sits beside tools: it may use every layer below tools.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["machine", "boot", "hal", "kernel", "tools"]
RANK = {name: i for i, name in enumerate(ORDER)}
RANK["testing"] = RANK["tools"]


def _layer_of_module(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "vmk" and len(parts) > 1:
        return parts[1] if parts[1] in RANK else None
    return None


def _imports(path: Path, rel: Path | None = None) -> list[tuple[int, str]]:
    """Imports of ``path``, relative ones resolved as if the file were at ``rel`` in the repo."""
    rel = rel or path.relative_to(ROOT)
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:          # relative: `from .. import x` climbs level-1 packages
                pkg = ["vmk", *rel.parent.parts]
                base = ".".join(pkg[:len(pkg) - (node.level - 1)])
                out.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            elif node.module:
                out.append((node.lineno, node.module))
    return out


def _sources() -> list[Path]:
    return [p for name in RANK for p in sorted((ROOT / name).rglob("*.py"))]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_downward(path: Path) -> None:
    layer = path.relative_to(ROOT).parts[0]
    bad = []
    for lineno, module in _imports(path):
        target = _layer_of_module(module)
        if target is not None and RANK[target] > RANK[layer]:
            bad.append(f"{path.relative_to(ROOT)}:{lineno} imports {module} ({layer} must not import {target})")
    assert not bad, "\n".join(bad)


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    fake = tmp_path / "probe.py"
    fake.write_text("from vmk.kernel import something\nfrom ..tools import cli\n")
    found = [m for _, m in _imports(fake, Path("machine/probe.py"))]
    assert "vmk.kernel" in found and _layer_of_module("vmk.kernel") == "kernel"
    assert any(_layer_of_module(m) == "tools" for m in found)
