"""Debugger benchmarks for ``vmk bench`` (``tools/bench.py`` calls :func:`bench_debug`).

* **single steps through the stub**: ``vCont;s`` round trips per host second
  over TCP on 127.0.0.1, the stub's server loop in a thread of this process
  and the shell's RSP client in another; and the same with a ``g`` (all
  registers) after each step, which is what gdb's ``stepi`` costs.
* **debugger attached**: the same with the debugger attached and nothing
  armed, as a ratio to no debugger at all (what ``--gdb`` costs while no
  breakpoint is set).
* **armed breakpoint never hit**: guest instructions per host second with a
  breakpoint armed at an address the guest never reaches, as a ratio to the
  same run with no breakpoint (target >= 0.95: breakpoints are Unicorn exits,
  decided at translation time, so this should be 1.0 within noise).  The
  debugger is attached in both runs; the runs alternate in pairs, each timed
  in process CPU time, and the figure is the median of the pairs' ratios (on
  a loaded host one pair can be off by 15% either way; the median is not).
"""
from __future__ import annotations

import statistics
import threading
import time

from vmk.machine.debug import Debug
from vmk.testing import Harness

__all__ = ["bench_debug"]

Row = tuple[str, float, str]

LOOP = """
loop:
    add rax, rbx
    imul rcx, rax
    xor rdx, rcx
    inc rbx
    jmp loop
"""
NEVER = 0x1F0000            # an address the loop never reaches


def _steps_per_second(steps: int, with_regs: bool) -> float:
    from .debugshell import Remote
    from .gdbstub import GdbStub

    h = Harness.from_asm(LOOP)
    stub = GdbStub(h.machine, wait=True, log=lambda msg: None)
    stub.listen()
    thread = threading.Thread(target=stub.run, daemon=True)
    thread.start()
    remote = Remote("127.0.0.1", stub.port, console=lambda text: None)
    try:
        for _ in range(50):                         # warm up (translation, caches)
            remote.request(b"vCont;s")
        t0 = time.perf_counter()
        for _ in range(steps):
            reply = remote.request(b"vCont;s")
            if with_regs:
                remote.request(b"g")
        dt = time.perf_counter() - t0
        assert reply.startswith(b"T05"), reply
    finally:
        remote.kill()
        thread.join(10)
    return steps / dt


def _insn_rate(armed: bool, n: int, attached: bool = True) -> float:
    h = Harness.from_asm(LOOP)
    if attached:
        d = Debug(h.machine)
        if armed:
            d.add_breakpoint(NEVER)
        run = d.cont
    else:
        run = h.machine.run
    run(max_instructions=200_000)                    # warm up: translate the loop
    start = h.instructions
    t0 = time.process_time()
    r = run(max_instructions=n)
    dt = time.process_time() - t0
    assert h.instructions - start == n, r
    return n / dt


def bench_debug(quick: bool) -> list[Row]:
    """(name, value, unit or ratio text) rows."""
    steps = 500 if quick else 3000
    rows: list[Row] = []
    rate = _steps_per_second(steps, with_regs=False)
    rows.append(("debug: single steps through the stub", rate, "steps/s (vCont;s round trips over TCP)"))
    rate_g = _steps_per_second(steps, with_regs=True)
    rows.append(("debug: single steps + register read", rate_g, "steps/s (vCont;s + g, as gdb's stepi)"))

    n = 2_000_000 if quick else 5_000_000
    pairs = 5 if quick else 15
    bare, attached = [], []
    for _ in range(pairs):
        bare.append(_insn_rate(False, n, attached=False))
        attached.append(_insn_rate(False, n))
    rows.append(("debug: debugger attached, nothing armed",
                 statistics.median(a / b for a, b in zip(attached, bare)),
                 f"x the speed without a debugger (median of {pairs} pairs)"))
    plain, armed = [], []
    for _ in range(pairs):
        plain.append(_insn_rate(False, n))
        armed.append(_insn_rate(True, n))
    ratio = statistics.median(a / p for a, p in zip(armed, plain))
    rows.append(("debug: armed breakpoint never hit", ratio,
                 f"x the speed with no breakpoint (median of {pairs} pairs; "
                 f"{statistics.median(armed) / 1e6:.1f} vs {statistics.median(plain) / 1e6:.1f} M insn/s; "
                 "target >= 0.95)"))
    return rows


if __name__ == "__main__":
    import sys
    for name, value, text in bench_debug("--quick" in sys.argv):
        print(f"{name:<40} {value:>12,.2f}  {text}")
