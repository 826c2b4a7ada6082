"""The CPU-instruction test kernel (tests/guest/cpuemu.c) on vmk, in both run modes, and on QEMU.

cpuemu reads IA32_APIC_BASE, checks what CPUID says of RDRAND/RDSEED against what
the instructions do, and enters ring 3 with IRETQ under FS/GS bases set through
their MSRs; it prints only facts that hold on QEMU 7.2 TCG (-cpu qemu64), the
reference PC, so the bytes must be the same.  Before the fix (Unicorn 2.1.4
alone): IA32_APIC_BASE read 0, CPUID advertised RDRAND (host randomness), and
ring 3 read address 0 instead of the FS/GS bases after IRETQ nulled FS/GS.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmk.machine.pc import Why
from vmk.testing import Harness

EXPECTED = Path(__file__).resolve().parent.parent / "guest" / "cpuemu.expected"
PASS_STATUS = (0x10 << 1) | 1


def _run(guest_dir: Path, block_mode: bool) -> dict:
    h = Harness.boot(str(guest_dir / "cpuemu.elf"), mem=128 << 20, serial_timing="instant")
    h.machine.cpu.block_mode = block_mode
    result = h.run_to_end(limit=5_000_000_000)
    return {"why": result.why, "status": result.exit_status, "output": h.serial(0).output,
            "instructions": h.instructions, "now": h.now}


@pytest.fixture(scope="module")
def cpuemu_runs(guest_dir: Path) -> dict[str, dict]:
    return {"block": _run(guest_dir, True), "block2": _run(guest_dir, True), "count": _run(guest_dir, False)}


@pytest.mark.parametrize("mode", ["block", "count"])
def test_cpuemu_passes_on_vmk(cpuemu_runs: dict[str, dict], mode: str) -> None:
    run = cpuemu_runs[mode]
    assert run["why"] == Why.EXIT
    assert run["output"].decode() == EXPECTED.read_text()
    assert run["status"] == PASS_STATUS


def test_two_runs_are_identical(cpuemu_runs: dict[str, dict]) -> None:
    assert cpuemu_runs["block"] == cpuemu_runs["block2"]


def test_block_mode_counts_32_bit_code_as_count_mode(cpuemu_runs: dict[str, dict]) -> None:
    """The multiboot entry runs 32-bit code before long mode: block mode must
    decode it as 32-bit (it once decoded every block as 64-bit, where 0x41 is a
    REX prefix, and counted 84,134 instructions where count mode retired 86,189)."""
    assert cpuemu_runs["block"] == cpuemu_runs["count"]


def test_same_bytes_and_status_as_qemu(guest_dir: Path, cpuemu_runs: dict[str, dict]) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86); vmk side ran above")
    proc = subprocess.run([qemu, "-accel", "tcg", "-kernel", str(guest_dir / "cpuemu.elf"), "-serial", "stdio",
                           "-display", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                           "-no-reboot", "-m", "128"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert proc.stdout == cpuemu_runs["block"]["output"]
    assert proc.returncode == cpuemu_runs["block"]["status"]
