"""``vmk debug`` (tools/debugshell.py): commands against a real stub, the keystone
round trip, and the gdb scenario again as a ``--batch`` script."""
from __future__ import annotations

import io
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_gdb_real import VmkBoot  # same directory (pytest rootdir imports)
from vmk.machine.pc import IO_COST_PC_NS
from vmk.testing import Harness
from vmk.tools.debugshell import (
    CommandError,
    Remote,
    Target,
    assemble_checked,
    parse_x_format,
    run_line,
)
from vmk.tools.gdbstub import GdbStub
from vmk.tools.kernelview import NO_KERNEL

TIMEOUT = 10.0
ORG = 0x100000
DATA = 0x200000
VMK = [sys.executable, "-m", "vmk.tools.cli"]


# ====================================================================== pure parts
@pytest.mark.parametrize("spec, expected", [
    ("/16xb", (16, "x", 1)), ("/4i", (4, "i", 4)), ("/2g", (2, "x", 8)), ("/xw", (1, "x", 4)),
    ("/3dh", (3, "d", 2)), ("/8c", (8, "c", 1)), ("/uo", None), ("/0x", None), ("16xb", None), ("/4q", None),
])
def test_x_format(spec, expected) -> None:
    if expected is None:
        with pytest.raises(CommandError):
            parse_x_format(spec)
    else:
        assert parse_x_format(spec) == expected


@pytest.mark.parametrize("source", [
    "mov rcx, [0x1234]",                    # keystone 0.9.2: RIP-relative with the displacement unadjusted
    "mov ebx, dword ptr [0x2000]",
    "mov rdx, qword ptr fs:[0x10]",
    "add rcx, [0x10]",
])
def test_asm_refuses_keystone_misencodings(source: str) -> None:
    with pytest.raises(CommandError, match="refusing"):
        assemble_checked(source, ORG, 64)


@pytest.mark.parametrize("source", [
    "mov rbx, 0x1234; mov rax, [rbx]",
    "mov eax, dword ptr [rbx+rcx*4+8]",
    "add rax, -1",
    "lea rsi, [rip + 0x10]",
    "jmp 0x100020",
    "je 0x100000",
    "movabs rax, 0x1122334455667788",
    "mov rax, 0x1122334455667788",
    "mov rax, [0x1234]",                    # keystone gets this one right (movabs)
    "rep stosb",
    "lock xadd qword ptr [rdi], rax",
    "nop; int3; hlt",
    "mov byte ptr [rbx-2], 0xf4",
    "shl rax, 3",
    "ret",
])
def test_asm_accepts_good_encodings(source: str) -> None:
    code = assemble_checked(source, ORG, 64)
    assert code


def test_asm_32_bit_mode() -> None:
    assert assemble_checked("mov eax, 5; inc eax", 0x100000, 32) == bytes.fromhex("b80500000040")


class _FakeRemote:
    registers: list = []

    def read_registers(self) -> dict[str, int]:
        return {"rip": 0x100010, "rsp": 0x8000, "efer": 0x500}

    def monitor(self, text: str) -> str:
        assert text == "symbols"
        return "0x0000000000100000 _start\n0x0000000000100400 kmain\n"


def test_address_expressions_and_symbols() -> None:
    t = Target(_FakeRemote())                 # type: ignore[arg-type]
    assert t.eval("0x10") == 16 and t.eval("42") == 42
    assert t.eval("$pc") == 0x100010 and t.eval("$sp - 8") == 0x7FF8
    assert t.eval("kmain+0x10") == 0x100410 and t.eval("kmain - _start") == 0x400
    assert t.eval("-1") == 0xFFFF_FFFF_FFFF_FFFF
    assert t.symbolize(0x100404) == "<kmain+0x4>" and t.symbolize(0x100000) == "<_start>"
    assert t.symbolize(0x1000) == ""
    for bad in ("", "nosuch", "$nosuch", "1 +", "+", "1 2"):
        with pytest.raises(CommandError):
            t.eval(bad)
    assert t.bits() == 64


# ====================================================================== commands against a stub in a thread
class Session:
    def __init__(self, h: Harness, symbols: dict[str, int] | None = None) -> None:
        self.h = h
        self.stub = GdbStub(h.machine, wait=True, symbols=symbols or {}, log=lambda m: None)
        self.stub.listen()
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.out = io.StringIO()
        self.target = Target(Remote("127.0.0.1", self.stub.port, console=self.out.write, timeout=TIMEOUT))

    def _run(self) -> None:
        self.result = self.stub.run()

    def run(self, line: str) -> str:
        start = self.out.tell()
        run_line(self.target, self.out, line)
        return self.out.getvalue()[start:]

    def close(self) -> None:
        if self.thread.is_alive():
            try:
                run_line(self.target, self.out, "kill")
            except Exception:             # noqa: BLE001 - quit raises its own marker
                pass
            self.thread.join(TIMEOUT)


@pytest.fixture
def session():
    made: list[Session] = []

    def make(src: str, **kw) -> Session:
        s = Session(Harness.from_asm(src), **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


PROGRAM = f"""
    mov rbx, {DATA:#x}
    mov rax, 0x4142434445464748
    mov [rbx], rax
    call helper
    mov ecx, 7
    hlt
helper:
    mov edx, 5
    ret
"""


def test_step_n_stops_at_ctrl_c(session, monkeypatch) -> None:
    """Ctrl-C during 'step 1000000' (here: SIGINT while the 5th step's reply is awaited)
    ends the command after that step, with the machine stopped and the session usable."""
    s = session("loop: inc rax\n jmp loop")
    remote = s.target.remote
    calls = 0
    real = remote._next_packet

    def next_packet(timeout):
        nonlocal calls
        calls += 1
        if calls == 5:
            signal.raise_signal(signal.SIGINT)          # the KeyboardInterrupt a Ctrl-C raises here
        return real(timeout)
    monkeypatch.setattr(remote, "_next_packet", next_packet)
    text = s.run("step 1000000")
    assert "interrupted after 5 of 1000000 steps" in text, text
    assert s.h.machine.instructions == 5
    monkeypatch.setattr(remote, "_next_packet", real)
    assert s.run("regs rax") == "rax       0x2badb005 (732803077)\n"   # the boot magic + 3 (5 steps)


def test_regs_x_and_disas(session) -> None:
    s = session(PROGRAM)
    regs = s.run("regs")
    assert "RIP=0000000000100000" in regs and "RFL=00000002" in regs and "EFER=d00" not in regs
    assert "CR0=" in regs and "FS_BASE=" in regs
    assert "XMM15=" in s.run("regs all")
    assert s.run("regs rip") == "rip       0x100000 (1048576)\n"
    s.run("set $rax 0x1122334455667788")
    s.run("set $r9 0xfedcba9876543210")
    # 32/16/8-bit names are views of the 64-bit registers
    assert s.run("regs eax ax al ah $r9d r9w r9b eip") == (
        "eax       0x55667788 (1432778632)\nax        0x7788 (30600)\nal        0x88 (136)\n"
        "ah        0x77 (119)\nr9d       0x76543210 (1985229328)\nr9w       0x3210 (12816)\n"
        "r9b       0x10 (16)\neip       0x100000 (1048576)\n")
    assert s.run("x/1xb $eax - 0x55567788") == "0000000000100000: 0x48\n"    # in expressions too
    with pytest.raises(CommandError, match="no register 'exx'"):
        s.run("regs exx")
    assert "mov rbx, 0x200000" in s.run("x/2i $pc")
    s.run("step 3")
    assert s.run(f"x/8xb {DATA:#x}") == "0000000000200000: 0x48 0x47 0x46 0x45 0x44 0x43 0x42 0x41\n"
    assert s.run(f"x/2xw {DATA:#x}") == "0000000000200000: 0x45464748 0x41424344\n"
    assert s.run(f"x/1xg {DATA:#x}") == "0000000000200000: 0x4142434445464748\n"
    assert s.run(f"x/4c {DATA:#x}") == "0000000000200000: 'H' 'G' 'F' 'E'\n"
    assert s.run(f"x/1dh {DATA + 6:#x}").split(":")[1].strip() == str(0x4142)
    disas = s.run("disas")
    assert disas.startswith("=> 0x0000000000100014") and "call" in disas
    with pytest.raises(CommandError, match="cannot access memory"):
        s.run("x/4xb 0x7fff00000000")
    with pytest.raises(CommandError):
        s.run("x/4q 0")
    with pytest.raises(CommandError, match="unknown command"):
        s.run("frobnicate")


def test_break_watch_next_continue_and_set(session) -> None:
    s = session(PROGRAM)
    h = s.h
    out = s.run(f"break {ORG:#x}+0x14")                       # the call
    assert out.startswith("breakpoint 1 at 0x100014")
    assert "stopped: breakpoint 1 at 0x100014" in s.run("continue")
    out = s.run("next")                                      # steps over the call
    assert "0x100019" in out and h.regs.rdx == 5 and h.instructions == 6
    out = s.run("set $rcx 0x99")
    assert h.regs.rcx == 0x99 and "rcx = 0x99" in out
    s.run(f"set/w {DATA:#x} 0x01020304")
    assert h.read(DATA, 8) == bytes.fromhex("0403020144434241")
    s.run(f"set {DATA + 7:#x} 0x7a")
    assert h.read(DATA + 7, 1) == b"z"
    assert "watchpoint 2" in s.run(f"watch {DATA:#x} 8")
    assert "1   break" in s.run("breakpoints") and "2   watch" in s.run("breakpoints")
    assert "deleted 2" in s.run("delete")
    assert "the guest" not in s.run("step")
    with pytest.raises(CommandError, match="no breakpoint number"):
        s.run("delete 9")


def test_asm_patches_code_after_the_round_trip(session) -> None:
    s = session(f"mov eax, 1\nmov rbx, {DATA:#x}\nmov [rbx], eax\nhlt")
    before = s.h.read(ORG, 16)
    with pytest.raises(CommandError, match="refusing"):
        s.run(f'asm {ORG:#x} "mov rcx, [0x1234]"')
    assert s.h.read(ORG, 16) == before                      # nothing written
    out = s.run(f'asm {ORG:#x} "mov eax, 42"')
    assert "wrote 5 bytes" in out and "mov eax, 0x2a" in out
    s.run("continue")                                        # runs to the hlt: a dead machine
    assert s.h.read(DATA, 4) == (42).to_bytes(4, "little")


def test_kernel_and_machine_commands(session) -> None:
    s = session(PROGRAM)
    for cmd in ("fibers", "channels", "containers"):
        assert NO_KERNEL in s.run(cmd)
    assert "virtual time" in s.run("time")
    assert "IDT deliveries" in s.run("irq")
    assert "lapic" in s.run("devices")
    assert "ran 3 ns" in s.run("run-for 3ns")
    assert s.h.instructions == 3
    with pytest.raises(CommandError, match="bad duration"):
        s.run("run-for soon")
    assert "step-irq off" in s.run("monitor step-irq off")
    assert "break ADDR" in s.run("help break")
    text = s.run("help")
    for name in ("regs", "x/", "disas", "asm", "break", "watch", "delete", "step", "next",
                 "continue", "run-for", "fibers", "channels", "containers", "irq", "devices", "time"):
        assert name in text


# ====================================================================== vmk debug as a program
def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


SCENARIO = """\
# the gdb scenario, vmk debug style
regs
x/4i $pc
break checkpoint
continue
step
x/16xb message_key
set/b message_key 0x5a
watch watched_counter 4
continue
fibers
time
delete all
detach
"""


def test_batch_scenario_on_a_bare_metal_kernel(guest_dir: Path, tmp_path: Path) -> None:
    from vmk.tools.kernelview import NO_KERNEL as no_kernel
    h = Harness.boot(str(guest_dir / "gdbtarget.elf"), io_cost_ns=IO_COST_PC_NS)      # as vmk boot
    h.run_to_end(limit=5_000_000_000)
    reference = h.serial(0).text
    serial = tmp_path / "com1.txt"
    vm = VmkBoot(guest_dir / "gdbtarget.elf", serial, "--wait-gdb")
    try:
        script = _write(tmp_path, "s.txt", SCENARIO)
        proc = subprocess.run([*VMK, "debug", f":{vm.port}", "--batch", str(script)],
                              capture_output=True, text=True, timeout=120)
        status = vm.wait()
    finally:
        vm.kill()
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RIP=000000000010000c <_start>" in out
    assert "=> 0x000000000010000c <_start>" in out and "cli" in out
    assert "stopped: breakpoint 1 at 0x" in out and "<checkpoint>" in out
    assert "<checkpoint+0x1>" in out                                  # the step
    assert ": 0x41 0x00" in out                                       # x/16xb message_key
    assert "stopped: watchpoint 2" in out and "<watched_counter>" in out
    assert no_kernel in out and "instructions retired" in out
    assert out.rstrip().endswith("detached")
    assert status == 1
    assert serial.read_bytes().decode("latin-1") == reference.replace("key=A", "key=Z")


def test_batch_stops_at_the_first_failing_command(guest_dir: Path, tmp_path: Path) -> None:
    serial = tmp_path / "com1.txt"
    vm = VmkBoot(guest_dir / "gdbtarget.elf", serial, "--wait-gdb")
    script = _write(tmp_path, "bad.txt", "regs\nx/4xb 0xfffff000\nregs\n")  # above RAM
    try:
        proc = subprocess.run([*VMK, "debug", f"127.0.0.1:{vm.port}", "--batch", str(script)],
                              capture_output=True, text=True, timeout=120)
        status = vm.wait()                    # the failed script killed the machine: vmk boot ended
    finally:
        vm.kill()
    assert proc.returncode == 1
    assert proc.stdout.count("(vmk) regs") == 1
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("vmk: line 2: x/4xb") and "cannot access memory" in err[0]
    assert status == 0 and "killed by the debugger" in vm.stderr, vm.stderr
    assert b"done" not in serial.read_bytes()


def test_commands_from_a_pipe_without_a_terminal(guest_dir: Path, tmp_path: Path) -> None:
    vm = VmkBoot(guest_dir / "gdbtarget.elf", tmp_path / "com1.txt", "--wait-gdb")
    try:
        proc = subprocess.run([*VMK, "debug", f":{vm.port}"], input="regs rip\nfrobnicate\nquit\n",
                              capture_output=True, text=True, timeout=120)
        # quit detached before anything continued the machine: under --wait-gdb
        # it stays stopped, waiting for the next debugger (QEMU's -S)
        again = subprocess.run([*VMK, "debug", f":{vm.port}"], input="regs rip\nkill\n",
                               capture_output=True, text=True, timeout=120)
        assert vm.wait() == 0
    finally:
        vm.kill()
    assert proc.returncode == 0, proc.stderr
    assert "rip       0x10000c" in proc.stdout and "error: unknown command 'frobnicate'" in proc.stdout
    assert "rip       0x10000c" in again.stdout and "killed" in again.stdout


def test_connecting_where_no_stub_answers_fails_in_one_line(monkeypatch) -> None:
    """A port that accepts connections but never answers (not a stub, or a stub serving
    another debugger): the shell gives up after HANDSHAKE_TIMEOUT with a one-line error."""
    from vmk.tools import debugshell
    monkeypatch.setattr(debugshell, "HANDSHAKE_TIMEOUT", 0.2)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)                                        # the kernel accepts; nobody answers
    port = silent.getsockname()[1]
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    try:
        assert debugshell.main(f":{port}", out=io.StringIO()) == 1
    finally:
        silent.close()
    text = err.getvalue()
    assert text.count("\n") == 1 and text.startswith(f"vmk: no GDB stub answers at 127.0.0.1:{port}"), text


def test_debug_usage_errors(tmp_path: Path) -> None:
    proc = subprocess.run([*VMK, "debug", "nowhere"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("vmk: bad address")
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    proc = subprocess.run([*VMK, "debug", f":{port}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "cannot connect" in proc.stderr and proc.stderr.count("\n") == 1
    proc = subprocess.run([*VMK, "debug", f":{port}", "--batch", str(tmp_path / "missing.txt")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--batch" in proc.stderr


def test_batch_on_a_vm_image_lists_fibers_and_containers(tmp_path: Path) -> None:
    import shutil as _shutil
    if _shutil.which("gcc") is None:
        pytest.skip("the console demo's programs are C (gcc needed)")
    from vmk.tools.build import build
    image = tmp_path / "console.img"
    build(Path(__file__).resolve().parents[2] / "demo" / "console" / "console.toml", image)
    serial = tmp_path / "com1.txt"
    vm = VmkBoot(image, serial, "--wait-gdb", "--idle", "skip", "--max-time", "50ms")
    try:
        script = _write(tmp_path, "s.txt", "break 0x400000\ncontinue\nfibers\ncontainers\nchannels\n"
                                           "step\nregs\ndetach\n")
        proc = subprocess.run([*VMK, "debug", f":{vm.port}", "--batch", str(script)],
                              capture_output=True, text=True, timeout=120)
        status = vm.wait()
    finally:
        vm.kill()
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stopped: breakpoint 1 at 0x400000" in out
    assert "shell.main" in out and "uart-rx" in out and "pid 1 (shell)" in out     # fibers
    assert "   1  shell" in out                                                    # containers
    assert "console.rx" in out and "console.tx" in out                             # channels
    assert "RIP=0000000000400002" in out                                           # one step
    assert status == 124
    assert serial.read_bytes().startswith(b"vmk console: type help")
