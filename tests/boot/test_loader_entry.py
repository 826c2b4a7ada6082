"""The multiboot ELF entry of a higher-half kernel linked with AT() (xv6's layout).

The image is built here: one executable PT_LOAD segment with p_vaddr 0x80100000
and p_paddr 0x100000, e_entry 0x8010000c (12 bytes in, after the multiboot
header).  Paging is off at the entry, so the CPU must start at the physical
address 0x10000c, as QEMU's ELF loader computes it.  The code exits through
isa-debug-exit with a status that only that start produces; the same file runs
on QEMU where it is installed.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from vmk.machine.pc import Why
from vmk.testing import Harness, assemble

VADDR, PADDR, OFFSET = 0x8010_0000, 0x10_0000, 0x1000
ENTRY = VADDR + 12
PT_LOAD, PF_R, PF_X = 1, 4, 1
MB_MAGIC = 0x1BADB002


def higher_half_elf(code_src: str) -> bytes:
    mb = struct.pack("<III", MB_MAGIC, 0, (-MB_MAGIC) & 0xFFFF_FFFF)
    body = mb + assemble(code_src, PADDR + 12, bits=32)
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)            # ELFCLASS32, little endian, version 1
    ehdr = ident + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, ENTRY, 52, 0, 0, 52, 32, 1, 40, 0, 0)
    phdr = struct.pack("<8I", PT_LOAD, OFFSET, VADDR, PADDR, len(body), len(body), PF_R | PF_X, 0x1000)
    head = ehdr + phdr
    return head + bytes(OFFSET - len(head)) + body


# Started at the physical entry: the call pushes 0x10000c + 10; the
# status is 0x2a (exit 85).  Started at the virtual 0x8010000c (before the fix):
# nothing is there, the CPU runs off into unmapped or zeroed memory.
EXIT_CODE = """
    mov esp, 0x90000
    call next
next:
    pop eax
    cmp eax, 0x100016
    jne bad
    mov al, 0x2a
    jmp out
bad:
    mov al, 0x55
out:
    mov dx, 0xf4
    out dx, al
    hlt
"""
STATUS = (0x2A << 1) | 1


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    p = tmp_path / "higher-half.elf"
    p.write_bytes(higher_half_elf(EXIT_CODE))
    return p


def test_higher_half_entry_starts_at_its_physical_address(kernel: Path) -> None:
    h = Harness.boot(str(kernel))
    assert h.boot_info.entry == PADDR + 12
    r = h.run_to_end(limit=1_000_000)
    assert r.why == Why.EXIT and r.exit_status == STATUS


def test_same_status_as_qemu(kernel: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed")
    proc = subprocess.run([qemu, "-accel", "tcg", "-kernel", str(kernel), "-display", "none", "-serial", "null",
                           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-no-reboot", "-m", "128"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert proc.returncode == STATUS
