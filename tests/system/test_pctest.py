"""The PC test kernel (tests/guest/pctest.c) on vmk, twice, and on QEMU.

pctest drives the PIT, the PIC pair, the LAPIC timer, the IO-APIC and COM1
interrupts and prints only facts that hold on any correct PC, so its serial
output and exit status must be the same on vmk and on
`qemu-system-x86_64 -accel tcg -kernel ...` (the reference PC).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmk.machine.pc import Why
from vmk.testing import Harness

EXPECTED = Path(__file__).resolve().parent.parent / "guest" / "pctest.expected"
PASS_STATUS = (0x10 << 1) | 1


@pytest.fixture(scope="module")
def pctest_runs(guest_dir: Path) -> list[dict]:
    runs = []
    for _ in range(2):
        h = Harness.boot(str(guest_dir / "pctest.elf"), mem=128 << 20)
        result = h.run_to_end(limit=2_000_000_000)
        runs.append({"why": result.why, "status": result.exit_status, "output": h.serial(0).output,
                     "times": h.serial(0).times, "instructions": h.instructions, "now": h.now,
                     "irqs": h.irq_counts})
    return runs


def test_pctest_passes_on_vmk(pctest_runs: list[dict]) -> None:
    run = pctest_runs[0]
    assert run["why"] == Why.EXIT
    assert run["output"].decode() == EXPECTED.read_text()
    assert run["status"] == PASS_STATUS


def test_two_runs_are_identical(pctest_runs: list[dict]) -> None:
    a, b = pctest_runs
    assert a["output"] == b["output"]
    assert a["times"] == b["times"]                 # every byte at the same virtual ns
    assert a["instructions"] == b["instructions"]
    assert a["now"] == b["now"]
    assert a["irqs"] == b["irqs"]


def test_same_bytes_and_status_as_qemu(guest_dir: Path, pctest_runs: list[dict]) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86); vmk side ran above")
    proc = subprocess.run([qemu, "-accel", "tcg", "-kernel", str(guest_dir / "pctest.elf"), "-serial", "stdio",
                           "-display", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                           "-no-reboot", "-m", "128"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert proc.stdout == pctest_runs[0]["output"]
    assert proc.returncode == pctest_runs[0]["status"]
