"""docs/abi.md is generated from kernel/syscall_table.py and must be fresh."""
from __future__ import annotations

from vmk.kernel.syscall_table import ERRORS, SYSCALLS, EventKind, Errno
from vmk.tools.abidoc import ABI_DOC, generate, main


def test_the_committed_abi_reference_is_fresh() -> None:
    assert ABI_DOC.read_text() == generate(), "run 'python -m vmk.tools.abidoc'"
    assert main(["--check"]) == 0


def test_it_names_every_call_kind_and_errno() -> None:
    text = generate()
    for s in SYSCALLS:
        assert f"### {s.number} `{s.name}`" in text
        for e, _ in ERRORS.get(s.name, ()):
            assert f"`-{e.name}`" in text
    for k in EventKind:
        assert f"`EV_{k.name}`" in text
    for e in Errno:
        assert f"| `{e.name}` | {int(e)} |" in text


def test_check_names_a_stale_file(tmp_path, capsys) -> None:
    stale = tmp_path / "abi.md"
    stale.write_text("old\n")
    assert main(["--check", "-o", str(stale)]) == 1
    assert str(stale) in capsys.readouterr().err
    assert main(["-o", str(stale)]) == 0 and stale.read_text() == generate()
