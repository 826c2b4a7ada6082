"""xv6 (MIT's x86 xv6-public, unpatched) reaches its shell and runs `ls`, on vmk and on QEMU.

Runs only when VMK_XV6_DIR names a directory holding xv6's `kernel` and `fs.img` as its
Makefile builds them (`make kernel fs.img`); xv6's code never enters this repository.
The kernel boots through the multiboot header xv6 carries (an ELF32 linked at 0x80100000
and loaded at its p_paddr 0x100000), the file system is the IDE disk at index 1 (primary
slave), the shell's input and output go over COM1.  Both emulators boot the same files
with 512 MiB, once with one CPU and once with two (`-smp 2,sockets=2`: xv6's own `make qemu`
runs 2 CPUs; vmk's CPUs are one per package, and with QEMU 7.2's plain `-smp 2` (two cores of
one package) SeaBIOS's MP table lists only the first, so xv6 would run on one); the serial transcript
from power-on to the prompt after `ls` and a few more commands (a file written and read
back, a pipe, a failed exec) must be the same bytes.  The UART runs with instant timing:
xv6's uartputc polls LSR only 128 times (its microdelay is empty) before it writes THR, so
at the 9600 baud it programs a PC16550D without FIFO would lose characters (vmk's default
baud timing does that); QEMU sends at once.
"""
from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vmk.machine.blockdev import DiskImage
from vmk.testing import Harness

XV6_DIR = os.environ.get("VMK_XV6_DIR")
pytestmark = pytest.mark.skipif(not XV6_DIR, reason="VMK_XV6_DIR (a built xv6-public: kernel, fs.img) not set")

PROMPT = b"$ "
# After `ls`: a file written through the log and the IDE disk, read back, a pipe, and failures.
COMMANDS = ["ls", "echo hello world > f", "cat f", "ls | cat", "mkdir d", "cat README"]
BOOT_NS = 30_000_000_000                # virtual time allowed for boot to the prompt, and for `ls`


def _files() -> tuple[Path, Path]:
    d = Path(XV6_DIR or ".")
    kernel, fs = d / "kernel", d / "fs.img"
    if not kernel.is_file() or not fs.is_file():
        pytest.fail(f"VMK_XV6_DIR={d}: expected xv6's kernel and fs.img there (make kernel fs.img)")
    return kernel, fs


@pytest.fixture(scope="module", params=[1, 2], ids=["smp1", "smp2"])
def cpus(request) -> int:
    return request.param


@pytest.fixture(scope="module")
def vmk_transcript(cpus: int) -> bytes:
    kernel, fs = _files()
    disk = DiskImage(str(fs), snapshot=True)
    try:
        h = Harness.boot(str(kernel), mem=512 << 20, serial_timing="instant", drives=[None, disk], cpus=cpus)
        com1 = h.serial(0)
        com1.wait_for(PROMPT, BOOT_NS)
        for command in COMMANDS:
            com1.write(command + "\n")
            com1.wait_for(PROMPT, BOOT_NS)
        return com1.output
    finally:
        disk.close()


def test_xv6_runs_ls_on_vmk(vmk_transcript: bytes, cpus: int) -> None:
    text = vmk_transcript.decode("latin-1")
    assert "init: starting sh" in text
    assert cpus == 1 or "cpu1: starting 1" in text            # the AP ran xv6's mpenter
    listing = text.split("$ ls\n", 1)[1].split("$ ", 1)[0]
    # xv6's ls prints "name type inum size" per entry; the root directory is inode 1.
    names = [line.split()[0] for line in listing.splitlines() if len(line.split()) == 4]
    assert names[:2] == [".", ".."]
    for name in ("README", "cat", "ls", "sh", "init"):
        assert name in names
    assert "$ cat f\nhello world\n$ " in text


def test_same_transcript_as_qemu(vmk_transcript: bytes, cpus: int, tmp_path: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed")
    kernel, fs = _files()
    proc = subprocess.Popen([qemu, "-accel", "tcg", "-kernel", str(kernel), "-drive",
                             f"file={fs},index=1,media=disk,format=raw,snapshot=on", "-serial", "stdio",
                             "-display", "none", "-m", "512", "-smp", f"{cpus},sockets={cpus}", "-no-reboot"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = b""
    try:
        out = _read_until(proc, out, PROMPT, 0)
        for command in COMMANDS:
            proc.stdin.write(command.encode() + b"\n")
            proc.stdin.flush()
            out = _read_until(proc, out, PROMPT, out.rindex(PROMPT) + len(PROMPT))
    finally:
        proc.kill()
        proc.wait()
    assert out == vmk_transcript


def _read_until(proc: subprocess.Popen, out: bytes, text: bytes, start: int, timeout: float = 120.0) -> bytes:
    """Read QEMU's serial output (host time: TCG is not virtual-timed) until ``text`` after ``start``."""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while out.find(text, start) < 0:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"QEMU: {text!r} not seen in {timeout} s; output so far: {out[-300:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                pytest.fail(f"QEMU exited; output: {out[-300:]!r}")
            out += chunk
    return out
