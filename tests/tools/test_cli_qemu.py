"""`vmk boot` as QEMU users type it (-kernel, -m, -serial, -s/-S/-gdb, -icount, -nographic, -d,
-monitor, -device isa-debug-exit), and the statuses and messages of issue 13: a deadlock is not
success, --max-time needs a unit, a port in use says what to do."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vmk.tools.cli import EXIT_DEADLOCK, _qemu_spellings, _smp_count

VMK = [sys.executable, "-m", "vmk.tools.cli"]


def vmk(*args: str, stdin: bytes = b"", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*VMK, *args], input=stdin, capture_output=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("vmk: "), err
    return lines[0]


@pytest.mark.parametrize("qemu, ours", [
    ("-kernel k.elf", "boot k.elf"),                                       # no command: boot
    ("boot -kernel k.elf -m 256", "boot k.elf --mem 256"),
    ("boot -kernel k.elf -m size=1G", "boot k.elf --mem 1G"),
    ("boot k.elf -serial stdio -serial file:x.txt", "boot k.elf --serial stdio --serial2 file:x.txt"),
    ("boot k.elf -serial mon:stdio", "boot k.elf --serial stdio"),
    ("boot k.elf -serial none", "boot k.elf --serial null"),
    ("boot k.elf -serial tcp::4444,server,nowait", "boot k.elf --serial tcp::4444"),
    ("boot k.elf -s -S", "boot k.elf --gdb :1234 --wait-gdb"),
    ("boot k.elf -gdb tcp::5555", "boot k.elf --gdb :5555"),
    ("boot k.elf -gdb tcp:0.0.0.0:5555", "boot k.elf --gdb 0.0.0.0:5555"),
    ("boot k.elf -icount shift=0", "boot k.elf --icount 1"),
    ("boot k.elf -icount shift=0,sleep=on", "boot k.elf --icount 1 --idle realtime"),
    ("boot k.elf -icount shift=3,sleep=off,align=off", "boot k.elf --icount 8 --idle skip"),
    ("boot k.elf -icount 2", "boot k.elf --icount 4"),
    ("boot k.elf -nographic -display none -monitor none", "boot k.elf"),
    ("boot k.elf -d guest_errors,unimp", "boot k.elf -d"),
    ("boot -d k.elf", "boot -d k.elf"),                                    # vmk's own -d flag
    ("boot k.elf -device isa-debug-exit,iobase=0xf4,iosize=0x04", "boot k.elf"),
    ("boot k.elf -no-reboot -rtc base=utc", "boot k.elf -no-reboot -rtc base=utc"),   # the parser's
    ("boot k.elf -- -m", "boot k.elf -- -m"),
    ("asm -s", "asm -s"),                                                  # other commands: untouched
    ("asm -kernel", "asm -kernel"),
])
def test_translation(qemu: str, ours: str) -> None:
    assert _qemu_spellings(qemu.split()) == ours.split()


@pytest.mark.parametrize("spec, n", [("2", 2), ("cpus=3", 3), ("4,sockets=4", 4), ("sockets=2", 2),
                                     ("2,sockets=2,cores=1,threads=1,maxcpus=2", 2)])
def test_smp_as_qemu_spells_it(spec: str, n: int) -> None:
    """QEMU's -smp with the topology vmk has (one CPU per socket) is the CPU count."""
    assert _smp_count(spec) == n


@pytest.mark.parametrize("args, needle", [
    (("-d", "int,cpu"), "cannot log int, cpu"),
    (("-monitor", "stdio"), "no QEMU monitor"),
    (("-icount", "shift=auto"), "shift=auto"),
    (("-icount", "shift=1,sleep=maybe"), "sleep must be on or off"),
    (("-icount", "shift=1,speed=9"), "speed not supported"),
    (("-gdb", "unix:/tmp/s"), "TCP only"),
    (("-serial", "null", "-serial", "null", "-serial", "null"), "two UARTs"),
    (("-serial", "tcp::4444,server,wait"), "'wait' is not supported"),
    (("-display", "gtk"), "no screen"),
    (("-device", "e1000"), "fixed"),
    (("-device", "isa-debug-exit,iobase=0x501"), "fixed"),
    (("-m",), "-m needs a value"),
    (("--max-time", "10"), "give a unit"),
    (("--max-time", "2.5"), "give a unit"),
    (("-smp", "2,cores=2"), "one per package (QEMU's sockets=N)"),
    (("-smp", "4,sockets=2,threads=2"), "threads=2"),
    (("-smp", "2,sockets=1"), "sockets must be the CPU count"),
    (("-smp", "2,maxcpus=4"), "no CPU hot-plug"),
    (("-smp", "2,mem=4"), "expected N, cpus=N, sockets=N or maxcpus=N"),
    (("-smp", "two"), "'two' is not a CPU count"),
    (("-smp", "0"), "1 to 255"),
])
def test_what_vmk_cannot_do_is_one_line(guest_dir: Path, args: tuple[str, ...], needle: str) -> None:
    proc = vmk("boot", "-kernel", str(guest_dir / "demo.elf"), *args)
    assert proc.returncode == 2
    assert needle in one_line_error(proc)


def test_qemu_spellings_boot_the_same_run(guest_dir: Path) -> None:
    """The demo kernel for 20 ms of virtual time, booted with QEMU's options and with vmk's: the same
    bytes, the same status; -icount shift=1 is --icount 2 (half the instructions in the same time)."""
    kernel = str(guest_dir / "demo.elf")
    ours = vmk("boot", kernel, "--serial", "stdio", "--mem", "64M", "--idle", "skip", "--max-time", "20ms", "-d")
    qemu = vmk("-kernel", kernel, "-nographic", "-serial", "mon:stdio", "-m", "64", "-icount", "shift=0,sleep=off",
               "-monitor", "none", "-d", "guest_errors", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
               "--max-time", "20ms")
    assert ours.returncode == qemu.returncode == 124
    assert b"vmk bare-metal demo" in ours.stdout
    assert qemu.stdout == ours.stdout and qemu.stderr == ours.stderr
    slow_ours = vmk("boot", kernel, "--icount", "2", "--idle", "skip", "--max-time", "20ms")
    slow_qemu = vmk("boot", "-kernel", kernel, "-icount", "shift=1,sleep=off", "--max-time", "20ms")
    assert slow_qemu.returncode == slow_ours.returncode == 124
    assert slow_qemu.stdout == slow_ours.stdout and slow_qemu.stderr == slow_ours.stderr
    assert slow_qemu.stderr != qemu.stderr        # "... N instructions": fewer at 2 ns each


def test_a_deadlock_is_not_success(tmp_path: Path) -> None:
    """Two containers each waiting to receive on the one channel they share: nothing can wake either."""
    (tmp_path / "wait.c").write_text('#include "vmk.h"\nint main(void) { char b[8]; '
                                     'return (int)vmk_recv(0, b, sizeof b); }\n')
    (tmp_path / "m.toml").write_text(
        '[[program]]\nname = "wait"\nsource = "wait.c"\n[[channel]]\nname = "c"\n'
        '[[container]]\nname = "a"\nprogram = "wait"\nmemory = "256K"\nhandles = ["c"]\n'
        '[[container]]\nname = "b"\nprogram = "wait"\nmemory = "256K"\nhandles = ["c"]\n')
    proc = vmk("build", str(tmp_path / "m.toml"), "-o", str(tmp_path / "m.img"))
    assert proc.returncode == 0, proc.stderr
    proc = vmk("boot", str(tmp_path / "m.img"), "--idle", "skip", "--serial", "null")
    assert proc.returncode == EXIT_DEADLOCK == 4
    assert "every fiber is blocked" in one_line_error(proc)


@pytest.mark.parametrize("body, status", [("return 7;", 7), ("*(volatile long *)8 = 1; return 0;", 114)])
def test_vm_image_status_is_pid_1s_exit_code(tmp_path: Path, body: str, status: int) -> None:
    """As the README's table says: pid 1's code modulo 256; a page fault ends it with -128 - 14."""
    (tmp_path / "p.c").write_text('#include "vmk.h"\nint main(void) { ' + body + ' }\n')
    (tmp_path / "m.toml").write_text('[[program]]\nname = "p"\nsource = "p.c"\n'
                                     '[[container]]\nname = "p"\nprogram = "p"\nmemory = "256K"\n')
    assert vmk("build", str(tmp_path / "m.toml"), "-o", str(tmp_path / "m.img")).returncode == 0
    proc = vmk("boot", str(tmp_path / "m.img"), "--idle", "skip", "--serial", "null")
    assert proc.returncode == status, proc.stderr


@pytest.mark.parametrize("option", ["--serial", "--gdb"])
def test_a_port_in_use_says_what_to_do(guest_dir: Path, option: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        spec = f"tcp:127.0.0.1:{port}" if option == "--serial" else f"127.0.0.1:{port}"
        proc = vmk("boot", str(guest_dir / "demo.elf"), option, spec, "--max-time", "1ms")
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "Errno" not in line and "Address already in use" in line and "pick another port" in line


def test_version() -> None:
    proc = vmk("--version")
    assert proc.returncode == 0 and proc.stdout.decode().startswith("vmk ")
