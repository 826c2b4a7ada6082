"""The PC chipset test kernel (tests/guest/pcdevs.c) on vmk, twice, and on QEMU.

pcdevs drives the RTC/CMOS, PCI configuration mechanism #1, the i8042 and the
HPET and prints only facts that hold on any correct PC, so its serial output
and exit status must be the same on vmk and on
`qemu-system-x86_64 -accel tcg -kernel ... -rtc base=2000-01-01T00:00:00`.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmk.machine.pc import Why
from vmk.testing import Harness

EXPECTED = Path(__file__).resolve().parent.parent / "guest" / "pcdevs.expected"
PASS_STATUS = (0x10 << 1) | 1


def _run(guest_dir: Path) -> dict:
    # Instant serial timing: the kernel polls THRE, and 2.5 KB at 115200 baud would be 200 M instructions.
    h = Harness.boot(str(guest_dir / "pcdevs.elf"), mem=128 << 20, serial_timing="instant")
    result = h.run_to_end(limit=30_000_000_000)
    return {"why": result.why, "status": result.exit_status, "output": h.serial(0).output,
            "instructions": h.instructions, "now": h.now, "irqs": h.irq_counts}


@pytest.fixture(scope="module")
def pcdevs_runs(guest_dir: Path) -> list[dict]:
    return [_run(guest_dir), _run(guest_dir)]


def test_pcdevs_passes_on_vmk(pcdevs_runs: list[dict]) -> None:
    run = pcdevs_runs[0]
    assert run["why"] == Why.EXIT
    assert run["output"].decode() == EXPECTED.read_text()
    assert run["status"] == PASS_STATUS
    # The waits slept on the PIT, RTC and HPET interrupts: about 8 s of virtual time.
    assert 7_000_000_000 < run["now"] < 10_000_000_000


def test_two_runs_are_identical(pcdevs_runs: list[dict]) -> None:
    a, b = pcdevs_runs
    assert a == b


def test_same_bytes_and_status_as_qemu(guest_dir: Path, pcdevs_runs: list[dict]) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86); vmk side ran above")
    proc = subprocess.run([qemu, "-accel", "tcg", "-kernel", str(guest_dir / "pcdevs.elf"), "-serial", "stdio",
                           "-display", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                           "-no-reboot", "-m", "128", "-rtc", "base=2000-01-01T00:00:00"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert proc.stdout == pcdevs_runs[0]["output"]
    assert proc.returncode == pcdevs_runs[0]["status"]
