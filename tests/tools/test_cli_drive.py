"""`vmk boot --drive/-hdX/--snapshot`: QEMU's spellings, one-line errors, writes reaching the image (or not)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

VMK = [sys.executable, "-m", "vmk.tools.cli"]
PASS_STATUS = (0x10 << 1) | 1
DISKS = (("A", 4096, 7), ("B", 2048, 13))       # as tests/system/test_idetest.py builds them for idetest.c


def make_image(path: Path, letter: str, sectors: int, mul: int) -> None:
    out = bytearray()
    for s in range(sectors):
        sec = bytearray((s * mul + i) & 0xFF for i in range(512))
        sec[0] = ord(letter)
        sec[1:5] = s.to_bytes(4, "little")
        out += sec
    path.write_bytes(bytes(out))


def vmk(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VMK, *args], capture_output=True, text=True, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vmk: "), proc.stderr
    return lines[0]


@pytest.fixture
def disks(tmp_path: Path) -> tuple[Path, Path]:
    paths = []
    for letter, n, mul in DISKS:
        p = tmp_path / f"{letter}.img"
        make_image(p, letter, n, mul)
        paths.append(p)
    return paths[0], paths[1]


@pytest.mark.parametrize("opts, needle", [
    (["--drive", "file=/nonexistent/fs.img,index=1"], "cannot open /nonexistent/fs.img"),
    (["--drive", "file=X,index=7"], "index must be 0..3"),
    (["--drive", "file=X,format=qcow2"], "format=qcow2 is not supported"),
    (["--drive", "file=X,media=cdrom"], "media=cdrom is not supported"),
    (["--drive", "file=X,bogus=1"], "unknown option 'bogus'"),
    (["--drive", "index=1"], "no file=IMAGE"),
    (["-drive", "file=X,index=1", "-hdb", "Y"], "index 1 is already used"),
])
def test_bad_drive_options(guest_dir: Path, opts: list[str], needle: str) -> None:
    proc = vmk("boot", str(guest_dir / "idetest.elf"), *opts)
    assert proc.returncode == 2
    assert needle in one_line_error(proc)


def test_bad_vga_file(guest_dir: Path) -> None:
    proc = vmk("boot", str(guest_dir / "vgatest.elf"), "--vga", "/nonexistent/dir/screen.txt")
    assert proc.returncode == 2
    assert "--vga" in one_line_error(proc)


def test_idetest_through_the_cli_writes_the_images(guest_dir: Path, disks: tuple[Path, Path]) -> None:
    a, b = disks
    before = a.read_bytes()
    proc = vmk("boot", str(guest_dir / "idetest.elf"), "--serial-timing", "instant", "--idle", "skip",
               "-drive", f"file={a},index=1,media=disk,format=raw", "--drive", f"file={b},index=2")
    assert proc.returncode == PASS_STATUS, proc.stdout[-2000:] + proc.stderr
    after = a.read_bytes()
    assert after != before and after[8 * 512:9 * 512] == bytes((0x11 + i * 3) & 0xFF for i in range(512))


@pytest.mark.parametrize("how", ["--snapshot", "-snapshot", "snapshot=on"])
def test_snapshot_keeps_the_image(guest_dir: Path, disks: tuple[Path, Path], how: str) -> None:
    a, b = disks
    before = a.read_bytes()
    disk_a = ["--drive", f"file={a},index=1,snapshot=on"] if how == "snapshot=on" else ["-hdb", str(a), how]
    proc = vmk("boot", str(guest_dir / "idetest.elf"), "--serial-timing", "instant", "--idle", "skip",
               *disk_a, "--drive", f"file={b},index=2")
    assert proc.returncode == PASS_STATUS, proc.stdout[-2000:] + proc.stderr
    assert a.read_bytes() == before
