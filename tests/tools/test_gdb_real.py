"""A stock gdb (Debian's gdb 13) drives ``vmk boot --gdb --wait-gdb`` through a normal session.

The guest is tests/guest/gdbtarget.c: gdb breaks at ``checkpoint``, steps,
reads and changes the byte that the guest prints next, watches a variable
and detaches; the guest then finishes.  Its serial output must be the output
of a run without a debugger, with the changed byte: including the timer
tick count and the TSC (virtual time), which a debugger must not disturb.
"""
from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vmk.machine.pc import IO_COST_PC_NS
from vmk.testing import Harness
from vmk.tools.kernelview import NO_KERNEL

GDB = shutil.which("gdb") or "/usr/bin/gdb"
TIMEOUT = 120.0

pytestmark = pytest.mark.skipif(not os.path.exists(GDB),
                                reason="gdb is not installed (Debian: apt-get install gdb)")


class VmkBoot:
    """``vmk boot IMAGE --gdb 127.0.0.1:0 ...`` as a subprocess; the port comes from its stderr."""

    def __init__(self, image: Path, serial: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmk.tools.cli", "boot", str(image), "--serial", f"file:{serial}",
             "--gdb", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr = ""
        deadline = time.monotonic() + TIMEOUT
        while "listening on" not in self.stderr:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stderr], [], [], max(0.0, left))
            if not ready or self.proc.poll() is not None and not ready:
                self.kill()
                raise AssertionError(f"vmk boot did not start its stub: {self.stderr}")
            line = self.proc.stderr.readline()
            if not line:
                self.kill()
                raise AssertionError(f"vmk boot exited: {self.stderr}")
            self.stderr += line
        self.port = int(self.stderr.split("listening on 127.0.0.1:")[1].split()[0])

    def wait(self) -> int:
        try:
            _, err = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.stderr += err
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=TIMEOUT)


@pytest.fixture
def boot():
    made: list[VmkBoot] = []

    def make(*args, **kw) -> VmkBoot:
        b = VmkBoot(*args, **kw)
        made.append(b)
        return b
    yield make
    for b in made:
        b.kill()


@pytest.fixture(scope="module")
def reference(guest_dir: Path) -> str:
    """gdbtarget's serial output without a debugger."""
    h = Harness.boot(str(guest_dir / "gdbtarget.elf"), io_cost_ns=IO_COST_PC_NS)      # as vmk boot
    r = h.run_to_end(limit=5_000_000_000)
    assert r.exit_status == 1
    text = h.serial(0).text
    assert "key=A" in text and "done" in text
    return text


def run_gdb(port: int, elf: Path, commands: list[str]) -> str:
    args = [GDB, "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off",
            "-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        args += ["-ex", c]
    proc = subprocess.run(args + [str(elf)], capture_output=True, text=True, timeout=TIMEOUT)
    return proc.stdout + proc.stderr


def test_gdb_session_on_a_bare_metal_kernel(guest_dir: Path, tmp_path: Path, boot, reference: str) -> None:
    serial = tmp_path / "com1.txt"
    vm = boot(guest_dir / "gdbtarget.elf", serial, "--wait-gdb")
    out = run_gdb(vm.port, guest_dir / "gdbtarget.elf64", [
        "info registers",
        "x/4i $pc",
        "break checkpoint",
        "continue",
        "stepi",
        "x/16xb &message_key",
        "set var message_key = 'Z'",
        "x/1cb &message_key",
        "watch watched_counter",
        "continue",
        "info threads",
        "monitor fibers",
        "monitor time",
        "delete",
        "detach",
    ])
    status = vm.wait()
    # info registers: the QEMU x86-64 register set
    for reg in ("rax", "r15", "rip", "eflags", "cs", "fs_base", "gs_base", "cr0", "cr3", "efer"):
        assert f"\n{reg} " in out, (reg, out)
    assert "0x10000c <_start>" in out                         # --wait-gdb: stopped at the entry
    assert "=> 0x10000c <_start>:\tcli" in out                # x/4i $pc
    assert "Breakpoint 1, checkpoint ()" in out
    assert "gdbtarget.c:52" in out                            # stepi stays in checkpoint
    assert "<message_key>:\t0x41" in out                      # x/16xb
    assert "90 'Z'" in out                                    # the byte was changed
    assert "Hardware watchpoint 2: watched_counter" in out
    assert "Old value = 3" in out and "New value = 42" in out
    assert "Thread 1.1 \"CPU0\" (bare metal" in out        # info threads: name and extra text from qXfer:threads
    assert NO_KERNEL in out                                   # monitor fibers
    assert "instructions retired" in out                      # monitor time
    assert "[Inferior 1 (process 1) detached]" in out
    assert "error" not in out.lower() and "warning: " not in out, out
    # the guest finished, printed the changed byte, and nothing else moved
    assert status == 1, vm.stderr
    assert serial.read_bytes().decode("latin-1") == reference.replace("key=A", "key=Z")


def test_gdb_attaches_to_a_running_machine_and_kills_it(guest_dir: Path, tmp_path: Path, boot) -> None:
    vm = boot(guest_dir / "demo.elf", tmp_path / "com1.txt")       # runs until 'q' arrives
    out = run_gdb(vm.port, guest_dir / "demo.elf64", ["info registers rip", "stepi", "kill"])
    assert "rip" in out and "[Inferior 1 (process 1) killed]" in out, out
    assert vm.wait() == 0
    assert "killed by the debugger" in vm.stderr


def test_info_threads_lists_the_fibers_of_a_vm_image(tmp_path: Path, boot) -> None:
    """The pipeline demo (three containers) under gdb: fibers as threads, monitor commands,
    a breakpoint and a step in a container; after detach it finishes exactly as it would alone."""
    if shutil.which("gcc") is None:
        pytest.skip("the pipeline demo's programs are C (gcc needed)")
    from vmk.tools.build import build
    image = tmp_path / "pipeline.img"
    build(Path(__file__).resolve().parents[2] / "demo" / "pipeline" / "pipeline.toml", image)
    serial = tmp_path / "com1.txt"
    vm = boot(image, serial, "--wait-gdb", "--idle", "skip", "--max-time", "10s")
    args = [GDB, "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off",
            "-ex", "set architecture i386:x86-64", "-ex", f"target remote 127.0.0.1:{vm.port}"]
    for c in ["break *0x400000", "continue", "info threads", "info registers rip", "stepi",
              "monitor fibers", "monitor containers", "monitor channels", "delete", "detach"]:
        args += ["-ex", c]
    out = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)
    text = out.stdout + out.stderr
    assert "hit Breakpoint 1, 0x0000000000400000" in text, text
    assert '"mixer.main" (pid 2 (mixer), running)' in text           # priority 2: it runs first
    assert 'Thread 4 "mixer.main" hit Breakpoint 1' in text          # names from qXfer:threads
    assert '"printer.main" (pid 1 (printer)' in text and '"ticker.main" (pid 3 (ticker)' in text
    assert '"uart-rx" (pid 0 (kernel)' in text and '"uart-tx" (pid 0 (kernel)' in text
    assert "0x0000000000400002 in ?? ()" in text                    # stepi: one instruction
    assert "   3  ticker" in text and "numbers" in text and "lines" in text
    assert "[Inferior 1 (process 1) detached]" in text
    assert vm.wait() == 0                                           # every container ended
    assert serial.read_bytes().decode().splitlines() == [
        "[20 ms] tick 1", "[40 ms] tick 2", "[60 ms] tick 3", "[80 ms] tick 4", "[100 ms] tick 5",
        "[100 ms] done"]


def test_stepi_costs_no_register_packet(guest_dir: Path, tmp_path: Path, boot) -> None:
    """The stop reply carries pc, sp and fp (expedited registers), so gdb's stepi reads
    no register file ('g', 1 KiB of hex per step): one round trip less per step."""
    vm = boot(guest_dir / "benchloop.elf", tmp_path / "com1.txt", "--wait-gdb", "--append", "iters=1000000")
    out = run_gdb(vm.port, guest_dir / "benchloop.elf64", [
        "break *bench_loop", "continue", "set debug remote 1", "stepi", "stepi", "stepi", "stepi",
        "stepi", "stepi", "set debug remote 0", "info registers rip", "kill"])
    stepping = out[out.index("[remote]"):]
    assert stepping.count("Sending packet: $vCont;s") == 6, stepping
    assert "Sending packet: $g#" not in stepping and "Sending packet: $p" not in stepping, stepping
    assert "bench_loop" in out.split("rip")[-1], out                 # and it stepped round the loop
    assert vm.wait() == 0


def test_monitor_info_mem_tlb_and_memory_map(guest_dir: Path, tmp_path: Path, boot) -> None:
    """'monitor info mem' / 'info tlb' in QEMU's text (what GEF and pwndbg parse), and
    gdb's own memory regions from qXfer:memory-map (RAM)."""
    vm = boot(guest_dir / "gdbtarget.elf", tmp_path / "com1.txt", "--wait-gdb")
    out = run_gdb(vm.port, guest_dir / "gdbtarget.elf64", [
        "monitor info mem", "info mem", "break checkpoint", "continue", "monitor info mem",
        "monitor info tlb", "x/1xb &message_key", "kill"])
    assert "PG disabled" in out                                 # at the multiboot entry
    assert "Using memory regions provided by the target." in out    # gdb's 'info mem': the RAM
    assert "0x0000000000000000 0x0000000008000000 rw nocache" in out, out
    assert "0000000000000000-0000000100000000 0000000100000000 -rw" in out, out
    assert "0000000000200000: 0000000000200000 --P" in out, out
    assert "<message_key>:\t0x41" in out
    assert vm.wait() == 0


@pytest.mark.parametrize("kind", ["rwatch", "awatch"])
def test_read_watchpoint_sees_reads_by_an_interrupt_handler(guest_dir: Path, tmp_path: Path, boot,
                                                            kind: str) -> None:
    """timer_ticks is read only by the LAPIC timer's handler (until the end): a read or
    access watchpoint on it stops in h_timer, right after the reading instruction."""
    vm = boot(guest_dir / "gdbtarget.elf", tmp_path / "com1.txt", "--wait-gdb")
    out = run_gdb(vm.port, guest_dir / "gdbtarget.elf64", [
        "break checkpoint", "continue", "delete", f"{kind} timer_ticks", "continue", "bt 1", "continue",
        "bt 1", "kill"])
    assert out.count("in h_timer (") + out.count("#0  h_timer (") >= 2, out
    assert ("Hardware read watchpoint 2: timer_ticks" if kind == "rwatch"
            else "Hardware access (read/write) watchpoint 2: timer_ticks") in out, out
    assert vm.wait() == 0


def test_qemu_packets_that_pwndbg_and_gef_send(guest_dir: Path, tmp_path: Path, boot, reference: str) -> None:
    """What pwndbg and GEF's forks send to find out they talk to QEMU in system mode
    ('Qqemu.sstepbits' answers ENABLE=, qOffsets nothing), then the step mask and
    QEMU's physical memory mode: a byte changed through it is the one the guest prints."""
    serial = tmp_path / "com1.txt"
    vm = boot(guest_dir / "gdbtarget.elf", serial, "--wait-gdb")
    out = run_gdb(vm.port, guest_dir / "gdbtarget.elf64", [
        "maintenance packet Qqemu.sstepbits", "maintenance packet qOffsets", "maintenance packet qqemu.Supported",
        "maintenance packet Qqemu.sstep=0x3", "maintenance packet qqemu.sstep",
        "break checkpoint", "continue", "delete", "monitor info registers",
        "maintenance packet Qqemu.PhyMemMode:1", "maintenance packet qqemu.PhyMemMode",
        "x/1cb &message_key", "set var message_key = 'P'",
        "maintenance packet Qqemu.PhyMemMode:0", "x/1cb &message_key", "detach"])
    assert 'received: "ENABLE=1,NOIRQ=2,NOTIMER=4"' in out, out
    assert 'sending: qOffsets\nreceived: ""' in out
    assert 'received: "sstepbits;sstep;PhyMemMode"' in out
    assert 'sending: qqemu.sstep\nreceived: "0x3"' in out
    assert 'sending: qqemu.PhyMemMode\nreceived: "1"' in out
    # monitor info registers: these lines are QEMU 7.2's, word for word, at the same breakpoint
    for line in ("ES =0010 0000000000000000 ffffffff 00cf9300 DPL=0 DS   [-WA]",
                 "CS =0008 0000000000000000 ffffffff 00af9a00 DPL=0 CS64 [-R-]",
                 "CR0=80000011 CR2=0000000000000000 CR3=0000000000103000 CR4=00000020",
                 "DR6=00000000ffff0ff0 DR7=0000000000000400", "EFER=0000000000000500",
                 "FCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80"):
        assert "\n" + line + "\n" in out, (line, out)
    assert " RFL=00000206 [-----P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\n" in out
    assert "65 'A'" in out and "80 'P'" in out                  # identity-mapped: the same byte
    assert vm.wait() == 1, vm.stderr
    assert serial.read_bytes().decode("latin-1") == reference.replace("key=A", "key=P")
