"""A run cut into pieces is the same run: on several CPUs the round-robin resumes
in the middle of the turn it was cut in (a debugger stop, Harness.run_for in
steps, the CLI's own pauses)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vmk.machine.debug import Debug
from vmk.testing import Harness

GUEST = Path(__file__).resolve().parents[2] / "out" / "guest" / "smptest.elf"


def _ap_main() -> int:
    out = subprocess.run(["nm", str(GUEST) + "64"], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[0], 16) for line in out.splitlines() if line.endswith(" ap_main"))


def _run(chunk_ns: int | None, breakpoint: bool = False) -> tuple:
    h = Harness.boot(str(GUEST), cpus=2)
    if breakpoint:                          # stop where an AP enters ap_main, then go on without it
        debug = Debug(h.machine)
        debug.add_breakpoint(_ap_main())
        stop = debug.cont(until=50_000_000)
        assert stop.why.name == "BREAKPOINT" and debug.stop_cpu == 1, stop
        debug.remove_breakpoint(_ap_main())
        r = debug.cont(until=50_000_000)
    elif chunk_ns is None:
        r = h.run(until=50_000_000)
    else:
        while True:
            r = h.run(until=min(h.now + chunk_ns, 50_000_000))
            if r.why.name != "TIME_LIMIT" or h.now >= 50_000_000:
                break
    m = h.machine
    return (r.why, h.now, [p.instructions for p in m.processors], h.serial(0).output, h.serial(0).times)


@pytest.mark.parametrize("chunk_ns", [3_333, 70_001])
def test_a_run_in_pieces_is_the_same_run(chunk_ns: int) -> None:
    if not GUEST.exists():
        pytest.fail("out/guest/smptest.elf: build it with 'make guest'")
    whole = _run(None)
    assert whole[3]                        # it printed
    assert _run(chunk_ns) == whole


def test_a_breakpoint_on_an_ap_does_not_change_the_run() -> None:
    """README: "a debugged run is the same run, instruction for instruction" - on --smp too."""
    assert _run(None, breakpoint=True) == _run(None)
