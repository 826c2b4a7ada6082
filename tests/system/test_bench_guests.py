"""The benchmark kernels of ``vmk bench`` (guest/baremetal/benchloop.S, benchpoll.S) on vmk and on QEMU.

``vmk bench`` times these kernels on vmk and on ``qemu-system-x86_64``, so they
must do the same work on both: the same serial bytes and the same
isa-debug-exit status.  The vmk half always runs; the QEMU half is skipped when
QEMU is not installed.  The polling kernel also checks determinism: the run is
the same, instruction for instruction, whether a halted CPU follows the host
clock (``vmk boot``'s default) or skips to the next timer (``--idle skip``).

The runs use instant serial timing: at baud timing the polled bytes cost
about a minute of host time today (benchpoll's 300 bytes: 26 ms of virtual
time spent reading LSR); the benchmark measures that, the tests need not.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmk.machine.pc import Why
from vmk.testing import Harness, assemble
from vmk.tools.bench import BENCH_LOOP, PASS_STATUS, POLL_OUTPUT, loop_output

ITERS = 1_000_000                    # 5 ms of virtual time: 5 ticks of the 1 kHz timer
ITERS_QEMU = 20_000_000              # QEMU TCG without icount runs on host time: >= 20 ms below 5 G insn/s
POLL_TEXT = POLL_OUTPUT.splitlines(keepends=True)[:5]
PIT_PERIOD_NS = 11932 * 1_000_000_000 // 1193182           # 100 Hz


def boot(kernel: Path, cmdline: str = "", **config) -> tuple[Harness, dict]:
    h = Harness.boot(str(kernel), cmdline, mem=128 << 20, serial_timing="instant", **config)
    r = h.run_to_end(limit=2_000_000_000)
    return h, {"why": r.why, "status": r.exit_status, "output": h.serial(0).output, "times": h.serial(0).times,
               "instructions": h.instructions, "now": h.now, "irqs": h.irq_counts}


@pytest.fixture(scope="module")
def poll_runs(guest_dir: Path) -> list[dict]:
    return [boot(guest_dir / "benchpoll.elf", realtime_idle=realtime)[1] for realtime in (False, True)]


def test_benchloop_on_vmk(guest_dir: Path) -> None:
    h, run = boot(guest_dir / "benchloop.elf", f"iters={ITERS}")
    assert run["why"] == Why.EXIT and run["status"] == PASS_STATUS
    assert run["output"] == loop_output(ITERS) == b"benchloop: 1000000 iterations\nbenchloop: done, timer ok\n"
    ticks = run["irqs"].get(0x40, 0)
    assert 4 <= ticks <= 6                                   # 5M loop instructions at 1 GHz, 1 ms period
    assert h.debugcon.data == b"%d\n" % ticks                # the guest counted each one


def test_bench_ceiling_runs_benchloops_own_bytes(guest_dir: Path) -> None:
    # tools/bench.py runs raw Unicorn on BENCH_LOOP as the ceiling: it must be the kernel's loop.
    code = assemble(BENCH_LOOP, 0x100000)
    assert len(code) == 15 and code in (guest_dir / "benchloop.elf").read_bytes()


def test_benchpoll_on_vmk(poll_runs: list[dict]) -> None:
    run = poll_runs[0]
    assert run["why"] == Why.EXIT and run["status"] == PASS_STATUS
    assert len(b"".join(POLL_TEXT)) == 300 and run["output"].startswith(b"".join(POLL_TEXT))
    assert run["output"] == POLL_OUTPUT
    assert run["irqs"].get(0x20) == 10
    # 10 PIT periods after the PIT was programmed (the 300 bytes take microseconds at instant timing)
    assert 10 * PIT_PERIOD_NS <= run["now"] < 10 * PIT_PERIOD_NS + 1_000_000


def test_benchpoll_is_the_same_run_with_idle_skip_and_realtime(poll_runs: list[dict]) -> None:
    skip, realtime = poll_runs
    assert skip["output"] == realtime["output"]
    assert skip["times"] == realtime["times"]               # every byte at the same virtual ns
    assert skip["instructions"] == realtime["instructions"]
    assert skip["now"] == realtime["now"]
    assert skip["irqs"] == realtime["irqs"]


def test_vmk_boot_exit_status_and_output(guest_dir: Path) -> None:
    """The benchmark's path: ``vmk boot`` in a subprocess, status from isa-debug-exit."""
    proc = subprocess.run([sys.executable, "-m", "vmk.tools.cli", "boot", str(guest_dir / "benchpoll.elf"),
                           "--idle", "skip", "--serial-timing", "instant"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (PASS_STATUS, POLL_OUTPUT), proc.stderr


@pytest.mark.parametrize("kernel, append, expected", [
    ("benchloop.elf", f"iters={ITERS_QEMU}", loop_output(ITERS_QEMU)),
    ("benchpoll.elf", "", POLL_OUTPUT),
])
def test_same_bytes_and_status_on_qemu(guest_dir: Path, kernel: str, append: str, expected: bytes) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86); vmk side ran above")
    for accel in (["-accel", "tcg"], ["-accel", "tcg", "-icount", "shift=0,sleep=off"]):
        proc = subprocess.run([qemu, *accel, "-kernel", str(guest_dir / kernel), "-append", append,
                               "-serial", "stdio", "-display", "none", "-no-reboot", "-m", "128",
                               "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        assert (proc.returncode, proc.stdout) == (PASS_STATUS, expected), (accel, proc.stderr)
