"""Machine reset (tests/guest/resettest.c): 0xCF9, the i8042's 0xFE, port 0x92 and a triple fault.

``vmk boot`` behaves as QEMU: a reset reboots the same image (CMOS RAM kept, so
the kernel's second boot says so and exits through isa-debug-exit, status 33);
with ``--no-reboot`` (or QEMU's ``-no-reboot``) the first reset ends vmk with
status 0.  The same kernel runs on QEMU with the same bytes and statuses.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmk.machine.pc import Why
from vmk.testing import Harness

METHODS = ("cf9", "kbd", "p92", "triple")
VMK = [sys.executable, "-m", "vmk.tools.cli"]


def _vmk(guest_dir: Path, method: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VMK, "boot", str(guest_dir / "resettest.elf"), "--append", method, "--idle", "skip",
                           "--serial-timing", "instant", "--max-time", "5s", *flags],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)


def _qemu(qemu: str, guest_dir: Path, method: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([qemu, "-accel", "tcg", "-kernel", str(guest_dir / "resettest.elf"), "-append", method,
                           "-serial", "stdio", "-display", "none", "-m", "128",
                           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", *flags],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)


@pytest.mark.parametrize("method", METHODS[:3])
def test_reset_ends_the_run(guest_dir: Path, method: str) -> None:
    h = Harness.boot(str(guest_dir / "resettest.elf"), cmdline=method, serial_timing="instant")
    r = h.run_to_end()
    assert r.why == Why.RESET
    assert h.serial(0).text == f"boot 1: resetting via {method}\n"
    assert h.machine.rtc.nvram()[0x40] == 0xA5          # the mark survives in CMOS for the next boot


@pytest.mark.parametrize("method", METHODS)
def test_vmk_boot_no_reboot_exits_0(guest_dir: Path, method: str) -> None:
    for flag in ("--no-reboot", "-no-reboot"):
        proc = _vmk(guest_dir, method, flag)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == f"boot 1: resetting via {method}\n".encode()
        err = proc.stderr.decode()
        assert len(err.splitlines()) == 1
        assert ("triple fault" if method == "triple" else "machine reset by") in err


@pytest.mark.parametrize("method", METHODS)
def test_vmk_boot_reboots(guest_dir: Path, method: str) -> None:
    proc = _vmk(guest_dir, method)
    assert proc.returncode == 33, proc.stderr
    assert proc.stdout == f"boot 1: resetting via {method}\nboot 2: after the reset via {method}\n".encode()


@pytest.mark.parametrize("method", METHODS)
def test_same_as_qemu(guest_dir: Path, method: str) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86); vmk side ran above")
    for flags in ((), ("-no-reboot",)):
        q = _qemu(qemu, guest_dir, method, *flags)
        v = _vmk(guest_dir, method, *flags)
        assert (q.stdout, q.returncode) == (v.stdout, v.returncode)

