"""The documentation says what the code does (issue 13): README tables are whole, its links lead
somewhere, docs/manifest.md names every manifest key, every exit status of `vmk boot` is in the
README, and the test kit's public API has docstrings."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from vmk.testing import Harness, SerialPort
from vmk.tools import cli
from vmk.tools.build import _TABLES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _tables(text: str) -> list[list[str]]:
    """Runs of consecutive lines starting with '|' (outside code blocks)."""
    runs: list[list[str]] = []
    in_code, cur = False, []
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if line.startswith("|") and not in_code:
            cur.append(line)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("doc", ["README.md", "docs/manifest.md"])
def test_tables_are_whole(doc: str) -> None:
    """A blank line inside a table cuts it in two: the second part has no header row and separator."""
    for rows in _tables((ROOT / doc).read_text()):
        assert len(rows) >= 3 and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", rows[1]), rows[:2]
        width = rows[0].count("|") - rows[0].count("\\|")
        for row in rows:
            assert row.count("|") - row.count("\\|") == width, row


@pytest.mark.parametrize("doc", ["README.md", "docs/manifest.md", "docs/design.md"])
def test_relative_links_exist(doc: str) -> None:
    text = (ROOT / doc).read_text()
    base = (ROOT / doc).parent
    links = re.findall(r"\]\(([^)#:]+)\)", text)
    for link in links:
        assert (base / link).exists(), f"{doc}: dead link {link}"
    assert "../shared" not in text


def test_manifest_reference_names_every_key() -> None:
    text = (ROOT / "docs" / "manifest.md").read_text()
    for table, keys in _TABLES.items():
        heading = f"## `[{table}]`" if table == "kernel" else f"## `[[{table}]]`"
        assert heading in text
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        for key in keys:
            assert f"| `{key}` |" in section, (table, key)


def test_every_exit_status_is_in_the_readme() -> None:
    rows = {row.split("|")[1].strip() for rows in _tables(README) for row in rows}
    for name in ("EXIT_USAGE", "EXIT_FAULT", "EXIT_DEADLOCK", "EXIT_BUG", "EXIT_TIME_LIMIT", "EXIT_INTERRUPTED"):
        assert str(getattr(cli, name)) in rows, name


def test_the_readme_says_how_to_build_the_example_kernels() -> None:
    assert "make guest" in README.split("out/guest/demo.elf", 1)[0]
    assert "make guest" in README.split('Harness.boot("out/guest/demo.elf")', 1)[1].split("\n", 1)[0]


@pytest.mark.parametrize("cls", [Harness, SerialPort])
def test_the_test_kit_is_documented(cls) -> None:
    missing = []
    for name, obj in vars(cls).items():
        if name.startswith("_"):
            continue
        f = obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)
        if callable(f) and not inspect.getdoc(f):
            missing.append(name)
    assert not missing and inspect.getdoc(cls)


def test_the_fixture_has_the_harness_names() -> None:
    from vmk.testing.plugin import _Factory
    assert "vmk.from_asm(source)" in README and "vmk.boot(path)" in README
    assert _Factory.from_asm and _Factory.boot and _Factory.asm is _Factory.from_asm
