"""``vmk_sleep`` takes a signed 64-bit duration: one <= 0 is a time already past
and returns 0 at once, as a timeout in the past is ready in CML and Guile
fibers (it hung for ever when read as a huge unsigned count)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vmk.boot.vmkimage import read_image
from vmk.kernel.pid0 import VMKernel
from vmk.machine.pc import Machine, MachineConfig, Why
from vmk.testing.harness import SerialCapture
from vmk.tools.build import build

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the guest programs are C (gcc needed)")

SLEEPER_C = r"""
#include "vmk.h"
long t[6], r[6];
int main(void)
{
    const long d[5] = {-5, -1, (long)0x8000000000000000UL, 0, 5000000000L};   /* the last: > 2^32 ns */
    t[0] = vmk_time();
    for (int i = 0; i < 5; i++) {
        r[i] = vmk_sleep(d[i]);
        t[i + 1] = vmk_time();
    }
    vmk_console_write("slept\n", 6);
    return 0;
}
"""

MANIFEST = """
[[program]]
name = "sleeper"
source = "sleeper.c"
[[container]]
name = "sleeper"
program = "sleeper"
memory = "128K"
"""


def test_a_sleep_of_zero_or_less_returns_at_once(tmp_path: Path) -> None:
    (tmp_path / "sleeper.c").write_text(SLEEPER_C)
    (tmp_path / "m.toml").write_text(MANIFEST)
    build(tmp_path / "m.toml", tmp_path / "m.img")
    com1 = SerialCapture()
    m = Machine(MachineConfig(serial=[com1]))
    k = VMKernel(m, read_image(tmp_path / "m.img"))
    prog = k.image.program("sleeper")
    seen = {}

    def peek() -> None:          # read the globals just before the container exits
        c = k.containers[1]
        for name in ("t", "r"):
            raw = c.aspace.read(prog.symbols[name], 48)
            seen[name] = [int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, 48, 8)]

    end = k._end_container
    k._end_container = lambda c, *a, **kw: (peek(), end(c, *a, **kw))
    r = k.run(until=10_000_000_000)
    assert r.why is Why.EXIT, (r.why, r.message, k.reports)
    assert b"slept" in com1.data
    t, res = seen["t"], seen["r"]
    assert res[:5] == [0, 0, 0, 0, 0]
    steps = [b - a for a, b in zip(t, t[1:])]
    assert all(s < 1000 for s in steps[:4]), steps        # no wait: a few instructions each
    assert 5_000_000_000 <= steps[4] < 5_000_001_000         # the positive one sleeps, exactly (the LAPIC
    # count is 32 bits: the HAL arms the farthest it can and re-arms when it fires)
