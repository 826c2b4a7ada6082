"""The SMP test kernel (tests/guest/smptest.c) on vmk with 4 CPUs, twice, and on QEMU -smp 4.

smptest starts the APs with INIT-SIPI-SIPI through a 16-bit trampoline, each AP
enters long mode, prints its APIC IDs under a ticket lock, adds to a counter
with `lock xadd` and sends a fixed IPI to the BSP: the same bytes and exit
status on vmk and on `qemu-system-x86_64 -accel tcg -smp 4 -kernel ...`.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmk.machine.pc import Why
from vmk.testing import Harness

EXPECTED = Path(__file__).resolve().parent.parent / "guest" / "smptest.expected"
PASS_STATUS = (0x10 << 1) | 1


def _run(guest_dir: Path, cpus: int) -> dict:
    h = Harness.boot(str(guest_dir / "smptest.elf"), mem=128 << 20, cpus=cpus)
    result = h.run_to_end(limit=2_000_000_000)
    m = h.machine
    return {"why": result.why, "status": result.exit_status, "output": h.serial(0).output,
            "times": h.serial(0).times, "instructions": h.instructions, "now": h.now,
            "per_cpu": [p.instructions for p in m.processors], "sipis": [p.sipis for p in m.processors]}


@pytest.fixture(scope="module")
def smp_runs(guest_dir: Path) -> list[dict]:
    return [_run(guest_dir, 4) for _ in range(2)]


def test_smptest_passes_on_vmk(smp_runs: list[dict]) -> None:
    run = smp_runs[0]
    assert run["why"] == Why.EXIT
    assert run["output"].decode() == EXPECTED.read_text()
    assert run["status"] == PASS_STATUS
    assert run["sipis"] == [0, 1, 1, 1]             # the second SIPI of each pair is ignored (SDM §9.4.4.1)
    assert all(n > 0 for n in run["per_cpu"])


def test_two_runs_are_identical(smp_runs: list[dict]) -> None:
    a, b = smp_runs
    assert a["output"] == b["output"]
    assert a["times"] == b["times"]                 # every byte at the same virtual ns
    assert a["instructions"] == b["instructions"]
    assert a["per_cpu"] == b["per_cpu"]             # each CPU retired the same instructions
    assert a["now"] == b["now"]


def test_two_cpus(guest_dir: Path) -> None:
    run = _run(guest_dir, 2)
    assert run["why"] == Why.EXIT and run["status"] == PASS_STATUS
    assert b"MADT: 2 processors, APIC IDs 0 1\n" in run["output"]
    assert run["output"].endswith(b"BSP: counter 1, 1 IPIs from 1 APs\nsmptest: PASS\n")


def test_one_cpu_has_no_aps(guest_dir: Path) -> None:
    run = _run(guest_dir, 1)
    assert run["why"] == Why.EXIT and run["status"] == PASS_STATUS
    assert run["output"].endswith(b"MADT: 1 processors, APIC IDs 0\nBSP: counter 0, 0 IPIs from 0 APs\n"
                                  b"smptest: PASS\n")


def test_same_bytes_and_status_as_qemu(guest_dir: Path, smp_runs: list[dict]) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86); vmk side ran above")
    proc = subprocess.run([qemu, "-accel", "tcg", "-smp", "4", "-kernel", str(guest_dir / "smptest.elf"),
                           "-serial", "stdio", "-display", "none",
                           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-no-reboot", "-m", "128"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert proc.stdout == smp_runs[0]["output"]
    assert proc.returncode == smp_runs[0]["status"]
