"""The `vmk` command line: user mistakes get one line and a status, never a traceback."""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("args, needle", [
    (("boot",), "required"),
    (("boot", "x.elf", "--mem", "lots"), "bad size 'lots'"),
    (("boot", "x.elf", "--max-time", "5 parsecs"), "bad duration"),
    (("boot", "x.elf", "--serial", "carrier-pigeon"), "carrier-pigeon"),
    (("boot", "x.elf", "--icount", "0"), "--icount"),
    (("frobnicate",), "invalid choice"),
])
def test_bad_arguments(args, needle) -> None:
    proc = vmk(*args)
    assert proc.returncode == 2
    assert needle in one_line_error(proc)


def _elf32_header(entry: int = 0x100000, phoff: int = 52, phnum: int = 1) -> bytes:
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    return ident + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, entry, phoff, 0, 0, 52, 32, phnum, 40, 0, 0)


def _multiboot_header(flags: int = 0) -> bytes:
    return struct.pack("<III", 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF)


@pytest.mark.parametrize("name, content, needle", [
    ("empty.elf", b"", "too short"),
    ("random.bin", bytes(range(256)) * 40, "not a kernel image"),
    ("noboot.elf", _elf32_header(phnum=0) + bytes(100), "without a multiboot header"),
    # a multiboot ELF32 whose only segment points past the end of the file
    ("trunc.elf", _elf32_header() + struct.pack("<8I", 1, 0x1000, 0x100000, 0x100000, 0x4000, 0x4000, 5, 0x1000)
     + _multiboot_header(), "runs past the end of the file"),
    ("aout.bin", _multiboot_header(1 << 16) + struct.pack("<5I", 0x100000, 0x100000, 0x900000, 0, 0x100000),
     "past the end of the file"),
])
def test_malformed_images_are_refused(tmp_path: Path, name: str, content: bytes, needle: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    proc = vmk("boot", str(path), "--serial", "null")
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert str(path) in line and needle in line


def test_missing_image(tmp_path: Path) -> None:
    proc = vmk("boot", str(tmp_path / "nope.elf"))
    assert proc.returncode == 2
    assert "cannot read" in one_line_error(proc)


def test_elf64_multiboot_is_refused_like_qemu(guest_dir: Path) -> None:
    proc = vmk("boot", str(guest_dir / "pctest.elf64"), "--serial", "null")
    assert proc.returncode == 2
    assert "ELF64 multiboot" in one_line_error(proc)


def test_kernel_too_big_for_ram(guest_dir: Path) -> None:
    proc = vmk("boot", str(guest_dir / "pctest.elf"), "--mem", "1M", "--serial", "null")
    assert proc.returncode == 2
    assert "does not fit" in one_line_error(proc)


def test_max_time_ends_with_124(guest_dir: Path) -> None:
    proc = vmk("boot", str(guest_dir / "demo.elf"), "--max-time", "5ms", "--serial", "null")
    assert proc.returncode == 124
    assert "virtual time limit" in one_line_error(proc)


def test_serial_to_file(guest_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "com1.txt"
    proc = vmk("boot", str(guest_dir / "demo.elf"), "--max-time", "20ms", "--serial", f"file:{out}")
    assert proc.returncode == 124
    assert b"vmk bare-metal demo" in out.read_bytes()


def test_asm_and_disasm_round_trip() -> None:
    proc = vmk("asm", "mov eax, 1; ret")
    assert proc.returncode == 0 and proc.stdout.strip() == b"b801000000c3"
    proc = vmk("disasm", "b801000000c3")
    assert proc.returncode == 0
    assert b"mov eax, 1" in proc.stdout and b"ret" in proc.stdout
    proc = vmk("disasm", "zz")
    assert proc.returncode == 2 and "bad hex" in one_line_error(proc)


def test_piped_stdin_feeds_com1(guest_dir: Path) -> None:
    """The demo echoes what it receives on COM1 and exits through isa-debug-exit on 'q'."""
    proc = vmk("boot", str(guest_dir / "demo.elf"), "--idle", "skip", "--max-time", "30s", stdin=b"hello q")
    out = proc.stdout.decode("latin-1")
    assert "hello" in out.split("type something", 1)[1]
    assert "bye" in out
    assert proc.returncode == 1            # (0 << 1) | 1, as QEMU's isa-debug-exit


def test_vm_image_that_does_not_fit_in_ram(tmp_path: Path) -> None:
    from vmk.tools.build import build
    (tmp_path / "p.s").write_text("l: jmp l\n")
    (tmp_path / "m.toml").write_text('[kernel]\nchannels = 4\n[[program]]\nname = "p"\nsource = "p.s"\n'
                                     '[[container]]\nname = "p"\nprogram = "p"\nmemory = "64M"\n')
    build(tmp_path / "m.toml", tmp_path / "m.img")
    proc = vmk("boot", str(tmp_path / "m.img"), "--mem", "32M", "--serial", "null")
    assert proc.returncode == 2
    assert "needs 65536 KiB" in one_line_error(proc)


def test_serial_timing_option(guest_dir: Path, tmp_path: Path) -> None:
    """The demo polls LSR.THRE: in 3 ms of virtual time it gets 48 bytes out at
    115200 baud and its whole banner (347 bytes) in instant timing (measured)."""
    proc = vmk("boot", str(guest_dir / "demo.elf"), "--serial-timing", "warp")
    assert proc.returncode == 2
    assert "--serial-timing" in one_line_error(proc)
    got = {}
    for timing in ("baud", "instant"):
        out = tmp_path / f"com1-{timing}.txt"
        proc = vmk("boot", str(guest_dir / "demo.elf"), "--serial-timing", timing, "--max-time", "3ms",
                   "--serial", f"file:{out}")
        assert proc.returncode == 124
        got[timing] = out.read_bytes()
        assert b"vmk bare-metal demo" in got[timing]
    assert len(got["baud"]) < 100 < len(got["instant"])
    assert got["instant"].startswith(got["baud"])
