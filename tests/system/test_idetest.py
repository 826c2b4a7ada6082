"""The IDE test kernel (tests/guest/idetest.c) on vmk, twice, and on QEMU with the same disk images.

idetest probes both IDE channels, IDENTIFYs, reads and writes sectors with
PIO (polled and on IRQ 14/15) and prints only facts any correct PC shows with
these images: disk A at index 1 (primary slave, as xv6's fs.img), disk B at
index 2 (secondary master).  Its serial output, its exit status and the
images it leaves behind must be the same on vmk and on
`qemu-system-x86_64 -accel tcg -kernel idetest.elf -drive file=...,index=N`.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmk.machine.blockdev import DiskImage
from vmk.machine.pc import Why
from vmk.testing import Harness

PASS_STATUS = (0x10 << 1) | 1
DISKS = (("A", 4096, 7), ("B", 2048, 13))       # letter, sectors, multiplier: see idetest.c


def make_image(path: Path, letter: str, sectors: int, mul: int) -> None:
    out = bytearray()
    for s in range(sectors):
        sec = bytearray((s * mul + i) & 0xFF for i in range(512))
        sec[0] = ord(letter)
        sec[1:5] = struct.pack("<I", s)
        out += sec
    path.write_bytes(bytes(out))


def images(where: Path) -> list[Path]:
    paths = []
    for letter, n, mul in DISKS:
        p = where / f"disk{letter}.img"
        make_image(p, letter, n, mul)
        paths.append(p)
    return paths


def run_vmk(elf: Path, where: Path) -> dict:
    where.mkdir()
    a, b = images(where)
    disks = [DiskImage(str(a)), DiskImage(str(b))]
    try:
        h = Harness.boot(str(elf), mem=128 << 20, serial_timing="instant", drives=[None, disks[0], disks[1]])
        result = h.run_to_end(limit=5_000_000_000)
    finally:
        for d in disks:
            d.close()
    return {"why": result.why, "status": result.exit_status, "output": h.serial(0).output,
            "instructions": h.instructions, "now": h.now, "images": [a.read_bytes(), b.read_bytes()]}


@pytest.fixture(scope="module")
def idetest_runs(guest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    base = tmp_path_factory.mktemp("idetest")
    return [run_vmk(guest_dir / "idetest.elf", base / f"run{i}") for i in range(2)]


def test_idetest_passes_on_vmk(idetest_runs: list[dict]) -> None:
    run = idetest_runs[0]
    text = run["output"].decode()
    assert run["why"] == Why.EXIT, text
    assert run["status"] == PASS_STATUS, text
    assert "idetest: PASS" in text
    # The facts the issue names, as QEMU shows them.
    assert "ch0 dev0 after reset: status 50 alt 50 error 01 count 01 lba 01 ff ff dev a0" in text
    assert "ch1 dev1 after reset: status 00 alt 00 error 00" in text
    assert "ch0 dev0 IDENTIFY: status 41 error 04 (no data)" in text


def test_idetest_writes_reach_the_image(idetest_runs: list[dict]) -> None:
    a = idetest_runs[0]["images"][0]
    sector = lambda n: a[n * 512:(n + 1) * 512]       # noqa: E731
    assert sector(8) == bytes((0x11 + i * 3) & 0xFF for i in range(512))
    assert sector(9) == bytes((0x22 + i * 3) & 0xFF for i in range(512))
    for k in range(3):
        assert sector(200 + k) == bytes((0x40 + k + i * 3) & 0xFF for i in range(512))
    assert sector(10)[0:1] == b"A"                    # untouched around them


def test_two_runs_are_identical(idetest_runs: list[dict]) -> None:
    a, b = idetest_runs
    assert a["output"] == b["output"]
    assert a["instructions"] == b["instructions"]
    assert a["now"] == b["now"]
    assert a["images"] == b["images"]


def test_same_bytes_status_and_images_as_qemu(guest_dir: Path, idetest_runs: list[dict], tmp_path: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86); vmk side ran above")
    a, b = images(tmp_path)
    proc = subprocess.run([qemu, "-accel", "tcg", "-kernel", str(guest_dir / "idetest.elf"), "-serial", "stdio",
                           "-display", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                           "-no-reboot", "-m", "128",
                           "-drive", f"file={a},index=1,media=disk,format=raw",
                           "-drive", f"file={b},index=2,media=disk,format=raw"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert proc.stdout == idetest_runs[0]["output"]
    assert proc.returncode == idetest_runs[0]["status"]
    assert [a.read_bytes(), b.read_bytes()] == idetest_runs[0]["images"]
