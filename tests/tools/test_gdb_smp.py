"""The debugger on a machine with several CPUs (``vmk boot --smp N``), issues 12 and 13.

The guest is tests/guest/smptest.c: the BSP starts each AP with INIT-SIPI-SIPI;
only APs run ``ap_main``, and only APs write ``counter`` (``lock xadd``).  Every
CPU is a gdb thread (ids 1..N, as QEMU numbers its vCPUs); a breakpoint or a
watchpoint hit on any CPU stops the whole machine and names that CPU; ``Hg``
selects the CPU registers and memory are read through; a step steps the named
CPU alone.  Stub-level tests drive the stub over TCP with the shell's RSP
client; the rest drive a stock gdb against ``vmk boot``, and against QEMU where
it is installed.
"""
from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from test_gdb_real import GDB, VmkBoot, run_gdb  # same directory (pytest rootdir imports)
from vmk.machine.cpu import Reg
from vmk.machine.debug import REG_INDEX
from vmk.testing import Harness
from vmk.tools import rsp
from vmk.tools.debugshell import Remote, RemoteError
from vmk.tools.gdbstub import GdbStub, Resume

TIMEOUT = 60.0
QEMU = shutil.which("qemu-system-x86_64")


def symbols(elf64: Path) -> dict[str, int]:
    out = subprocess.run(["nm", str(elf64)], capture_output=True, text=True, check=True).stdout
    return {f[2]: int(f[0], 16) for f in (line.split() for line in out.splitlines()) if len(f) == 3}


@pytest.fixture(scope="module")
def syms(guest_dir: Path) -> dict[str, int]:
    return symbols(guest_dir / "smptest.elf64")


def smp_harness(guest_dir: Path, cpus: int) -> Harness:
    return Harness.boot(str(guest_dir / "smptest.elf"), mem=128 << 20, cpus=cpus)


class Served:
    """The stub's server loop in a thread (--wait-gdb), and a client for it."""

    def __init__(self, h: Harness) -> None:
        self.stub = GdbStub(h.machine, wait=True, log=lambda msg: None)
        self.stub.listen()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.remote = Remote("127.0.0.1", self.stub.port, console=lambda text: None, timeout=TIMEOUT)

    def _run(self) -> None:
        try:
            self.stub.run()
        except BaseException as e:             # noqa: BLE001 - reported by the test
            self.error = e

    def shutdown(self) -> None:
        if self.thread.is_alive():
            try:
                self.remote.kill()
            except RemoteError:
                pass
            self.thread.join(TIMEOUT)
        assert self.error is None, repr(self.error)


@pytest.fixture
def served():
    made: list[Served] = []

    def make(h: Harness) -> Served:
        s = Served(h)
        made.append(s)
        return s
    yield make
    for s in made:
        s.shutdown()


# ====================================================================== the stub, no gdb
@pytest.mark.parametrize("cpus", [2, 4])
def test_every_cpu_is_a_thread(guest_dir: Path, cpus: int) -> None:
    h = smp_harness(guest_dir, cpus)
    stub = GdbStub(h.machine, log=lambda msg: None)
    ids = ",".join(f"{k:x}" for k in range(1, cpus + 1))
    assert stub.handle(b"qfThreadInfo") == b"m" + ids.encode()
    assert stub.handle(b"qsThreadInfo") == b"l"
    assert stub.handle(b"qC") == b"QC1"
    xml = stub.handle(b"qXfer:threads:read::0,fff")
    assert b'<thread id="1" name="CPU0">bare metal, executing, protected mode, CPL 0</thread>' in xml
    for k in range(1, cpus):
        assert f'<thread id="{k + 1:x}" name="CPU{k}">bare metal, waiting for SIPI</thread>'.encode() in xml
    assert rsp.unhexlify(stub.handle(f"qThreadExtraInfo,{cpus:x}".encode())).startswith(
        f"CPU{cpus - 1}: bare metal, waiting for SIPI".encode())
    assert stub.handle(f"T{cpus:x}".encode()) == b"OK"
    assert stub.handle(f"T{cpus + 1:x}".encode()) == b"E01"
    assert stub.handle(f"Hg{cpus + 1:x}".encode()) == b"E01"
    assert stub.handle(b"vCont;s:p1.2;c") == Resume(step=True)
    assert stub.handle(b"vCont;s:p1.2;c").thread == 2
    stub.close()


def test_breakpoint_registers_step_and_watchpoint_per_cpu(guest_dir: Path, served, syms) -> None:
    h = smp_harness(guest_dir, 2)
    m = h.machine
    bsp, ap = m.cpus
    r = served(h).remote
    assert r.last_stop.thread == 1

    # ap_main runs on APs only: the machine stops there, in thread 2 (CPU1)
    r.set_point(True, 0, syms["ap_main"], 1)
    stop = r.resume(step=False)
    assert (stop.reason, stop.thread) == ("swbreak", 2)
    assert ap.rip == syms["ap_main"] and bsp.rip != syms["ap_main"]
    assert r.request(b"qC") == b"QC2"
    assert r.read_registers()["rip"] == syms["ap_main"]          # the stopped thread's CPU
    r.set_point(False, 0, syms["ap_main"], 1)

    # Hg1: CPU0's registers, and a write that reaches CPU0 only
    r.select_thread(1)
    regs0 = r.read_registers()
    assert regs0["rip"] == bsp.rip and regs0["rsp"] == bsp.reg(Reg.RSP) != ap.reg(Reg.RSP)
    ap_rax = ap.reg(Reg.RAX)
    r.write_register("rax", 0x1234_5678)
    assert bsp.reg(Reg.RAX) == 0x1234_5678 and ap.reg(Reg.RAX) == ap_rax
    r.select_thread(2)
    assert r.read_registers()["rip"] == syms["ap_main"]

    # stepi in thread 2 advances CPU1 by one instruction; CPU0 does not move
    bsp_rip, bsp_done = bsp.rip, m.processors[0].instructions
    stop = r.resume(step=True)
    assert stop.thread == 2 and stop.signal == 5 and not stop.reason
    assert ap.rip == syms["ap_main"] + 1                          # push %rbp
    assert (bsp.rip, m.processors[0].instructions) == (bsp_rip, bsp_done)

    # a watchpoint written by an AP stops the machine in that AP's thread
    r.set_point(True, 2, syms["counter"], 4)
    stop = r.resume(step=False)
    assert (stop.reason, stop.data_addr, stop.thread) == ("watch", syms["counter"], 2)
    assert int.from_bytes(r.read_memory(syms["counter"], 4), "little") == 1

    # monitor commands: per-CPU time, the selected CPU's registers (QEMU's -a: all)
    text = r.monitor("time")
    assert "\nCPU0: " in text and "\nCPU1: " in text and "instructions retired" in text
    assert r.monitor("info registers").startswith("CPU#1\n")       # the stopped thread's
    r.select_thread(1)
    assert r.monitor("info registers").startswith("CPU#0\n")
    every = r.monitor("info registers -a")
    assert every.startswith("CPU#0\n") and "\n\nCPU#1\n" in every


def test_memory_and_page_walk_use_the_selected_cpus_paging(guest_dir: Path, syms) -> None:
    """Hg picks whose CR3 m/M and 'monitor info mem' go through: with CPU1 on empty
    page tables, ap_main cannot be read through it but still through CPU0."""
    h = smp_harness(guest_dir, 2)
    stub = GdbStub(h.machine, log=lambda msg: None)
    d = stub.debug
    d.add_breakpoint(syms["ap_main"])
    d.cont()
    assert d.stop_cpu == 1
    d.remove_breakpoint(syms["ap_main"])
    empty = 64 << 20                                              # a page of RAM the guest never uses
    assert h.machine.ram.read(empty, 4096) == bytes(4096)
    read = f"m{syms['ap_main']:x},4".encode()
    code = stub.handle(read)
    assert stub.handle(b"Hg2") == b"OK"
    assert stub.handle(f"P{REG_INDEX['cr3']:x}=".encode() + rsp.hexlify(empty.to_bytes(8, "little"))) == b"OK"
    assert stub.handle(read) == b"E14"
    assert stub.run_monitor("info mem") == ""                     # nothing mapped
    assert stub.handle(b"Hg1") == b"OK"
    assert stub.handle(read) == code and len(code) == 8
    assert "-rw" in stub.run_monitor("info mem")
    stub.close()


# ====================================================================== stock gdb
pytestmark_gdb = pytest.mark.skipif(not Path(GDB).exists(), reason="gdb is not installed")

SESSION = ["break ap_main", "continue", "info threads", "p $rip", "thread 1", "p $rip",
           "info registers rip", "thread 2", "stepi", "p $pc", "delete", "watch counter", "continue",
           "monitor time", "kill"]


@pytestmark_gdb
@pytest.mark.parametrize("cpus", [2, 4])
def test_gdb_on_smptest(guest_dir: Path, tmp_path: Path, cpus: int) -> None:
    vm = VmkBoot(guest_dir / "smptest.elf", tmp_path / "com1.txt", "--smp", str(cpus), "--wait-gdb")
    try:
        out = run_gdb(vm.port, guest_dir / "smptest.elf64", SESSION)
        assert vm.wait() == 0, vm.stderr
    finally:
        vm.kill()
    assert 'Thread 2 "CPU1" hit Breakpoint 1, ap_main ()' in out, out
    listing = out[out.index("  Id   Target Id"):]
    for k in range(cpus):
        assert f'Thread 1.{k + 1} "CPU{k}" (bare metal, ' in listing, out
    assert f"Thread 1.{cpus + 1} " not in listing
    cpu1 = next(line for line in listing.splitlines() if '"CPU1"' in line)
    assert cpu1.startswith("* 2 ") and "(bare metal, executing, long mode, CPL 0)" in cpu1 and "ap_main" in cpu1
    rips = [line for line in out.splitlines() if line.startswith("$")]
    assert "<ap_main>" in rips[0] and "<kmain+" in rips[1], rips          # thread 2, then thread 1
    assert "rip            0x" in out and "<kmain+" in out.split("rip            0x")[1].splitlines()[0]
    assert "<ap_main+1>" in rips[2], rips                                  # stepi in thread 2
    assert "Hardware watchpoint 2: counter" in out
    assert "Old value = 0" in out and "New value = 1" in out
    assert "Thread 1 " not in out.split("Hardware watchpoint 2: counter")[2].splitlines()[0]
    assert "CPU1: " in out and f"CPU{cpus - 1}: " in out                  # monitor time
    assert "[Inferior 1 (process 1) killed]" in out
    assert "error" not in out.lower(), out


@pytestmark_gdb
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_threads_and_the_ap_main_stop_match_qemu(guest_dir: Path, tmp_path: Path) -> None:
    """Same gdb commands against QEMU -smp 4 and vmk --smp 4: the same thread count, the
    same thread stopping at ap_main, the same thread stepping."""
    commands = ["break ap_main", "continue", "info threads", "thread 2", "stepi", "p $pc", "kill"]
    port = _free_port()
    qemu = subprocess.Popen([QEMU, "-accel", "tcg", "-smp", "4", "-kernel", str(guest_dir / "smptest.elf"),
                             "-S", "-gdb", f"tcp:127.0.0.1:{port}", "-display", "none", "-serial", "null"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        q = _retry_gdb(port, guest_dir / "smptest.elf64", commands)
    finally:
        qemu.kill()
        qemu.wait(TIMEOUT)
    vm = VmkBoot(guest_dir / "smptest.elf", tmp_path / "com1.txt", "--smp", "4", "--wait-gdb")
    try:
        v = run_gdb(vm.port, guest_dir / "smptest.elf64", commands)
    finally:
        vm.kill()

    def facts(out: str) -> tuple:
        listing = out[out.index("  Id   Target Id"):]
        threads = sum(1 for line in listing.splitlines() if " Thread 1." in line)
        hit = next(line for line in out.splitlines() if "hit Breakpoint 1, ap_main" in line).split(" hit")[0]
        return threads, hit.split('"')[0].strip(), "<ap_main+1>" in out
    assert facts(v) == facts(q) == (4, "Thread 2", True), (v, q)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _retry_gdb(port: int, elf: Path, commands: list[str]) -> str:
    """QEMU listens a moment after it starts: retry the connection."""
    import time
    for _ in range(50):
        out = run_gdb(port, elf, commands)
        if "Connection refused" not in out:
            return out
        time.sleep(0.1)
    return out


# ====================================================================== vmk debug (the shell)
def test_debug_shell_shows_cpus_as_threads(guest_dir: Path, served, syms) -> None:
    import io

    from vmk.tools.debugshell import Target, run_line
    h = smp_harness(guest_dir, 2)
    t = Target(served(h).remote)

    def run(line: str) -> str:
        out = io.StringIO()
        run_line(t, out, line)
        return out.getvalue()
    assert "in thread 2" in run(f"break {syms['ap_main']:#x}") + run("continue")
    listing = run("threads").splitlines()
    assert listing[0].startswith("    1  CPU0: bare metal, halted") and listing[1].startswith("*   2  CPU1: ")
    assert run("thread") == "thread 2\n"
    assert "thread 1\nstopped at 0x" in run("thread 1") and h.machine.cpus[0].rip != syms["ap_main"]
    assert run("threads").splitlines()[0].startswith("*   1  CPU0")
    bsp_rip = h.machine.cpus[0].rip
    run("delete 1")
    run("thread 2")
    assert "in thread 2" in run("step")
    assert h.machine.cpus[1].rip == syms["ap_main"] + 1 and h.machine.cpus[0].rip == bsp_rip
