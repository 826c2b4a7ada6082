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
* **real gdb against QEMU** (:func:`bench_gdb_vs_qemu`, ``vmk bench debug-gdb``):
  a stock ``gdb -batch -nx`` connects to ``vmk boot benchloop.elf --gdb PORT
  --wait-gdb`` and to ``qemu-system-x86_64 -kernel benchloop.elf -S -gdb
  tcp:...``, breaks at ``bench_loop`` and runs a script of N ``stepi``; the
  rate is 3N over the difference of the gdb process's wall times at N and 4N
  steps (connecting, loading symbols and reaching the loop cancel).  Target:
  vmk's steps/s at least QEMU's.
"""
from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from vmk.machine.debug import Debug
from vmk.testing import Harness

__all__ = ["bench_debug", "bench_gdb_vs_qemu"]

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


ROOT = Path(__file__).resolve().parent.parent
GDB = "/usr/bin/gdb"
QEMU = "/usr/bin/qemu-system-x86_64"


def _which(default: str, name: str) -> str | None:
    return default if os.path.exists(default) else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vmk_target(kernel: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "vmk.tools.cli", "boot", str(kernel), "--serial", "null", "--serial-timing", "instant",
                             "--append", "iters=1000000000", "--gdb", "127.0.0.1:0", "--wait-gdb"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "listening on 127.0.0.1:" not in seen:
        line = proc.stderr.readline()
        if not line:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"vmk boot --gdb did not start: {seen}")
        seen += line
    return proc, int(seen.split("listening on 127.0.0.1:")[1].split()[0])


def _qemu_target(qemu: str, kernel: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen([qemu, "-accel", "tcg", "-kernel", str(kernel), "-append", "iters=1000000000",
                             "-serial", "null", "-display", "none", "-no-reboot",
                             "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-S", "-gdb", f"tcp:127.0.0.1:{port}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:                                         # wait until QEMU listens
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError("QEMU's gdbstub did not start") from None
            time.sleep(0.05)
    return proc, port


def _gdb_seconds(gdb: str, start: Callable[[], tuple[subprocess.Popen, int]], symbols: Path, steps: int) -> float:
    """Wall time of one ``gdb -batch`` session: connect, break at bench_loop, ``steps`` stepi, kill."""
    proc, port = start()
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".gdb", delete=False) as script:
            script.write("stepi\n" * steps)
        t = time.perf_counter()
        out = subprocess.run([gdb, "-batch", "-nx", "-ex", "set pagination off", "-ex", "set confirm off",
                              "-ex", f"target remote 127.0.0.1:{port}", "-ex", "break *bench_loop",
                              "-ex", "continue", "-x", script.name, "-ex", "info registers rip", "-ex", "kill",
                              str(symbols)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        dt = time.perf_counter() - t
        if "bench_loop" not in out.stdout.split("rip")[-1]:
            raise RuntimeError(f"gdb did not end in bench_loop: {out.stdout[-300:]} {out.stderr[-300:]}")
        return dt
    finally:
        os.unlink(script.name)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_gdb_vs_qemu(quick: bool) -> list[tuple[str, str, str, str]]:
    """Real gdb's stepi rate on vmk and on QEMU, same kernel, same run (tools/bench.py row format)."""
    from .bench import _verdict

    name = "debug-gdb: real gdb stepi/s, benchloop.elf, from gdb wall times at N and 4N steps"
    kernel, symbols = ROOT / "out" / "guest" / "benchloop.elf", ROOT / "out" / "guest" / "benchloop.elf64"
    gdb, qemu = _which(GDB, "gdb"), _which(QEMU, "qemu-system-x86_64")
    if not kernel.exists():
        return [(name, "skipped", "", "build with 'make guest'")]
    if gdb is None:
        return [(name, "skipped", "gdb not installed", "")]
    n = 200 if quick else 1000
    repeats = 2 if quick else 3

    def rate(start) -> float:
        best = {n: float("inf"), 4 * n: float("inf")}
        for _ in range(repeats):
            for steps in best:
                best[steps] = min(best[steps], _gdb_seconds(gdb, start, symbols, steps))
        dt = best[4 * n] - best[n]
        return 3 * n / dt if dt > 0 else float("inf")

    try:
        ours = rate(lambda: _vmk_target(kernel))
        if qemu is None:
            return [(name, f"vmk {ours:,.0f} steps/s (N={n})", "QEMU not installed", "")]
        theirs = rate(lambda: _qemu_target(qemu, kernel))
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return [(name, "FAILED", "", str(e))]
    return [(name, f"vmk {ours:,.0f} steps/s (N={n})", f"QEMU gdbstub {theirs:,.0f} steps/s",
             _verdict(ours >= theirs, f"ratio {ours / theirs:.2f}, target >= 1"))]


if __name__ == "__main__":
    import sys
    for name, value, text in bench_debug("--quick" in sys.argv):
        print(f"{name:<40} {value:>12,.2f}  {text}")
