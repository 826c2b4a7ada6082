"""Keystone 0.9.2 crashes the process on some input ('.text'): `vmk asm`, the debugger's
`asm` and the test kit's `assemble` run it in a child, so a crash is a one-line error (issue 13)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vmk.testing import assemble
from vmk.tools.build import assemble_snippet
from vmk.tools.debugshell import CommandError, assemble_checked


def test_vmk_asm_survives_a_keystone_crash() -> None:
    proc = subprocess.run([sys.executable, "-m", "vmk.tools.cli", "asm", ".text"], capture_output=True,
                          timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err            # it was -11 (SIGSEGV)
    assert err == "vmk: cannot assemble '.text': keystone crashed (SIGSEGV)\n"
    proc = subprocess.run([sys.executable, "-m", "vmk.tools.cli", "asm", "mov rax, 1; ret", "--addr", "0x1000"],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == b"48c7c001000000c3\n"


def test_debugger_asm_survives_a_keystone_crash() -> None:
    with pytest.raises(CommandError, match=r"cannot assemble '\.text': keystone crashed"):
        assemble_checked("nop; .text", 0x1000)
    assert assemble_checked("nop; ret", 0x1000) == b"\x90\xc3"


def test_test_kit_assemble_survives_a_keystone_crash() -> None:
    with pytest.raises(ValueError, match="keystone crashed"):
        assemble(".text")
    with pytest.raises(ValueError, match="KS_ERR_ASM"):
        assemble("jmp nowhere")
    assert assemble("mov ax, 1", 0, 16) == b"\xb8\x01\x00"
    assert assemble("l: jmp l", 0x100000) == b"\xeb\xfe"


def test_assemble_snippet_checks_bits() -> None:
    with pytest.raises(ValueError, match="bits must be"):
        assemble_snippet("nop", 0, 8)
