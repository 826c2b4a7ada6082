"""The firmware tables test kernel (tests/guest/fwtest.c) on vmk, twice, and on QEMU.

fwtest reads what the firmware leaves in memory as an OS does (BIOS data area,
multiboot memory map, MP tables, ACPI RSDP/RSDT/XSDT/FADT/DSDT/MADT/HPET),
checks every checksum, prints the facts SeaBIOS on QEMU and vmk share, reads
the PM timer and powers off through PM1a_CNT with \\_S5's SLP_TYP.  QEMU exits
0 on that ACPI power-off; vmk must too, with the same serial bytes.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmk.machine.pc import Why
from vmk.testing import Harness

EXPECTED = Path(__file__).resolve().parent.parent / "guest" / "fwtest.expected"
MEM = 128 << 20


@pytest.fixture(scope="module")
def fwtest_runs(guest_dir: Path) -> list[dict]:
    runs = []
    for _ in range(2):
        h = Harness.boot(str(guest_dir / "fwtest.elf"), mem=MEM)
        result = h.run_to_end(limit=2_000_000_000)
        runs.append({"why": result.why, "status": result.exit_status, "output": h.serial(0).output,
                     "times": h.serial(0).times, "instructions": h.instructions, "now": h.now,
                     "log": list(h.machine.log_lines)})
    return runs


def test_fwtest_passes_and_powers_off_on_vmk(fwtest_runs: list[dict]) -> None:
    run = fwtest_runs[0]
    assert run["output"].decode() == EXPECTED.read_text()
    assert run["why"] == Why.EXIT
    assert run["status"] == 0                       # ACPI S5, not isa-debug-exit (always odd)
    assert "acpi: ACPI power-off (S5)" in run["log"]


def test_two_runs_are_identical(fwtest_runs: list[dict]) -> None:
    a, b = fwtest_runs
    assert a["output"] == b["output"]
    assert a["times"] == b["times"]
    assert a["instructions"] == b["instructions"]
    assert a["now"] == b["now"]


def test_same_bytes_and_status_as_qemu(guest_dir: Path, fwtest_runs: list[dict]) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86); vmk side ran above")
    proc = subprocess.run([qemu, "-accel", "tcg", "-kernel", str(guest_dir / "fwtest.elf"), "-serial", "stdio",
                           "-display", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                           "-no-reboot", "-m", str(MEM >> 20)],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert proc.stdout == fwtest_runs[0]["output"]
    assert proc.returncode == fwtest_runs[0]["status"] == 0
