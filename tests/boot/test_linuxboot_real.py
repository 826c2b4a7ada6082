"""A real Linux kernel on vmk, only when one is given (no Linux code is in the repository).

    VMK_LINUX_BZIMAGE=/path/vmlinuz VMK_LINUX_INITRD=/path/initrd.cpio.gz pytest tests/boot/test_linuxboot_real.py

The initrd's /init should print a line and run ``poweroff -f``.  The kernel
boots through the 64-bit entry with ``console=ttyS0 panic=-1``; the test
checks that it reaches ``Run /init as init process`` (issue 12) and, when
VMK_LINUX_EXPECT names the line /init prints, that the line appears and the
machine powers off through ACPI S5; then that a second run prints the same
bytes.  VMK_LINUX_TIME bounds the virtual time (default 30 s); VMK_LINUX_CPUS=N boots
with N CPUs (``--smp N``; Linux brings the APs up through the MADT and INIT-SIPI-SIPI).
"""
from __future__ import annotations

import os

import pytest
from vmk.machine.pc import Why
from vmk.testing import Harness
from vmk.tools.units import parse_duration

BZIMAGE = os.environ.get("VMK_LINUX_BZIMAGE")
INITRD = os.environ.get("VMK_LINUX_INITRD")
EXPECT = os.environ.get("VMK_LINUX_EXPECT")
LIMIT = parse_duration(os.environ.get("VMK_LINUX_TIME", "30s"))
CPUS = int(os.environ.get("VMK_LINUX_CPUS", "1"))

pytestmark = pytest.mark.skipif(not BZIMAGE, reason="set VMK_LINUX_BZIMAGE (and VMK_LINUX_INITRD) to boot a real kernel")


def boot() -> tuple[bytes, Why]:
    h = Harness.boot(BZIMAGE, "console=ttyS0 panic=-1", [INITRD] if INITRD else [], mem=128 << 20,
                     serial_timing="instant", io_cost_ns=1000, cpus=CPUS)
    r = h.run(until=LIMIT)
    return h.serial(0).output, r.why


def test_linux_reaches_init_and_repeats() -> None:
    out, why = boot()
    assert b"Run /init as init process" in out, out[-2000:].decode(errors="replace")
    if CPUS > 1:
        assert f"smp: Brought up 1 node, {CPUS} CPUs".encode() in out
    if EXPECT:
        assert EXPECT.encode() in out
        assert why == Why.EXIT
    assert boot() == (out, why)
