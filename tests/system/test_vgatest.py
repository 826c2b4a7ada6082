"""The VGA test kernel (tests/guest/vgatest.c): registers as on QEMU, and the screen `vmk boot --vga` shows.

vgatest prints VGA register facts (CRTC read-back, the mono/colour address
select, the attribute flip-flop, vertical retrace) over COM1, which must be
the same bytes on QEMU, then writes 30 lines and a prompt to the text buffer
at 0xB8000 the way xv6's console does (scrolling 5 of them off the top).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmk.machine.devices.vga import ScreenLog
from vmk.machine.pc import Why
from vmk.testing import Harness

PASS_STATUS = (0x10 << 1) | 1
ROOT = Path(__file__).resolve().parent.parent.parent
SCREEN = "".join(f"line {i:02d} of the vga test{' (with a longer tail)' if i == 7 else ''}\n"
                 for i in range(30)) + "$\n"


@pytest.fixture(scope="module")
def vgatest_run(guest_dir: Path) -> dict:
    h = Harness.boot(str(guest_dir / "vgatest.elf"), mem=128 << 20, serial_timing="instant")
    lines: list[str] = []
    log = ScreenLog(h.machine.vga, lines.append)
    h.machine.vga.on_cursor = log.update
    result = h.run_to_end(limit=2_000_000_000)
    log.finish()
    return {"why": result.why, "status": result.exit_status, "output": h.serial(0).output,
            "screen": "".join(lines), "rows": h.machine.vga.text_rows()}


def test_vgatest_passes_on_vmk(vgatest_run: dict) -> None:
    assert vgatest_run["why"] == Why.EXIT
    assert vgatest_run["status"] == PASS_STATUS, vgatest_run["output"].decode()
    assert vgatest_run["output"].decode().endswith("cursor at 1922\nvgatest: PASS\n")


def test_screen_log_prints_each_line_once(vgatest_run: dict) -> None:
    assert vgatest_run["screen"] == SCREEN
    rows = vgatest_run["rows"]
    assert rows[0] == "line 06 of the vga test" and rows[23] == "line 29 of the vga test" and rows[24] == "$"


def test_vmk_boot_vga_file(guest_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "screen.txt"
    proc = subprocess.run([sys.executable, "-m", "vmk.tools.cli", "boot", str(guest_dir / "vgatest.elf"),
                           "--serial", "null", "--serial-timing", "instant", "--idle", "skip",
                           "--vga", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == PASS_STATUS, proc.stderr
    assert out.read_text() == SCREEN


def test_vmk_boot_vga_stdout(guest_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "vmk.tools.cli", "boot", str(guest_dir / "vgatest.elf"),
                           "--serial", "null", "--serial-timing", "instant", "--idle", "skip", "--vga", "-"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == PASS_STATUS, proc.stderr
    assert proc.stdout == SCREEN


def test_same_bytes_and_status_as_qemu(guest_dir: Path, vgatest_run: dict) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86); vmk side ran above")
    proc = subprocess.run([qemu, "-accel", "tcg", "-kernel", str(guest_dir / "vgatest.elf"), "-serial", "stdio",
                           "-display", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                           "-no-reboot", "-m", "128"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert proc.stdout == vgatest_run["output"]
    assert proc.returncode == vgatest_run["status"]
