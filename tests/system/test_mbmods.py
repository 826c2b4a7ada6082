"""The multiboot command line and modules (tests/guest/mbmods.c) on vmk and on QEMU.

QEMU's -kernel gives a multiboot kernel the command line "KERNEL-PATH ARGS" (-append is
ARGS) and loads each -initrd item ("FILE ARGS", comma-separated, ",," for a comma) as a
module whose string is the whole item.  mbmods prints the command line and each module's
string, size and FNV-1a checksum, and checks page alignment and placement after the
kernel: the same bytes and exit status on vmk and on QEMU.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmk.boot.loader import MBI_ADDR, ImageError, split_initrd
from vmk.machine.pc import Why
from vmk.testing import Harness

PASS_STATUS = (0x10 << 1) | 1


def _fnv1a(data: bytes) -> int:
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFF_FFFF
    return h


@pytest.fixture(scope="module")
def modules(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("mods")
    contents = {"one.txt": b"hello module\n", "two.bin": bytes((i * 7 + 3) & 0xFF for i in range(5000)),
                "empty": b"", "three.bin": b"\x00\xff" * 2049}
    out = {}
    for name, data in contents.items():
        (d / name).write_bytes(data)
        out[name] = (d / name, data)
    return out


def _cases(m) -> list[tuple[str, list[str]]]:
    p = {k: str(v[0]) for k, v in m.items()}
    return [
        ("", []),
        ("a  b c ", [f"{p['one.txt']} arg one", p["two.bin"], f"{p['empty']}  x", p["three.bin"]]),
    ]


def _expected(kernel: str, cmdline: str, initrd: list[str], m) -> bytes:
    data = {str(path): blob for path, blob in m.values()}
    lines = [f"cmdline: [{kernel} {cmdline}]", f"modules: {len(initrd)}"]
    for i, item in enumerate(initrd):
        blob = data[item.split(" ", 1)[0]]
        lines.append(f"module {i}: [{item}] size {len(blob)} fnv1a {_fnv1a(blob):08x}")
    lines.append("mbmods: done")
    return ("\n".join(lines) + "\n").encode()


def _vmk(kernel: str, cmdline: str, initrd: list[str]) -> tuple[bytes, int | None, Harness]:
    h = Harness.boot(kernel, cmdline, initrd, mem=128 << 20)
    result = h.run_to_end(limit=500_000_000)
    assert result.why == Why.EXIT
    return h.serial(0).output, result.exit_status, h


@pytest.mark.parametrize("case", [0, 1])
def test_cmdline_and_modules_on_vmk(guest_dir: Path, modules, case: int) -> None:
    kernel = str(guest_dir / "mbmods.elf")
    cmdline, initrd = _cases(modules)[case]
    output, status, _ = _vmk(kernel, cmdline, initrd)
    assert output == _expected(kernel, cmdline, initrd, modules)
    assert status == PASS_STATUS


def test_info_layout_as_qemu(guest_dir: Path, modules) -> None:
    """Flags, boot device and the placement QEMU 7.2 uses (measured with mbmods): the module
    list on the first page after the kernel, then the strings; modules on the next pages."""
    kernel = str(guest_dir / "mbmods.elf")
    cmdline, initrd = _cases(modules)[1]
    h = Harness.boot(kernel, cmdline, initrd, mem=128 << 20)
    m = h.machine
    flags, _, _, bootdev, cmd, count, mods = (int.from_bytes(m.read_physical(MBI_ADDR + 4 * i, 4), "little")
                                              for i in range(7))
    assert flags == 0x24F and bootdev == 0x8000FFFF and count == 4
    info_page = (h.boot_info.load_end + 0xFFF) & ~0xFFF
    assert mods == info_page
    entries = [[int.from_bytes(m.read_physical(mods + 16 * i + 4 * j, 4), "little") for j in range(4)]
               for i in range(4)]
    assert entries[0][2] == mods + 64                               # strings right after the list
    sizes = [13, 5000, 0, 4098]
    assert entries[0][0] == info_page + 0x1000
    for (start, end, _, reserved), size in zip(entries, sizes):
        assert end - start == size and reserved == 0 and start % 0x1000 == 0
    assert entries[2][0] == entries[3][0]                           # an empty module takes no page
    assert cmd == entries[3][2] + len(initrd[3]) + 1


def test_split_initrd_as_qemu() -> None:
    assert split_initrd("a arg,b") == ["a arg", "b"]
    assert split_initrd("a x,,y,b,") == ["a x,y", "b"]
    assert split_initrd("") == []
    assert split_initrd(",a") == ["", "a"]


def test_missing_module_is_an_image_error(guest_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="nonexistent.*cannot read multiboot module"):
        Harness.boot(str(guest_dir / "mbmods.elf"), "", [str(tmp_path / "nonexistent") + " arg"])


def test_modules_past_ram_are_an_image_error(guest_dir: Path, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(bytes(9 << 20))
    with pytest.raises(ImageError, match="past the 7 MiB of RAM"):
        Harness.boot(str(guest_dir / "mbmods.elf"), "", [str(big)], mem=8 << 20)


@pytest.mark.parametrize("case", [0, 1])
def test_same_bytes_and_status_as_qemu(guest_dir: Path, modules, case: int) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86); vmk side ran above")
    kernel = str(guest_dir / "mbmods.elf")
    cmdline, initrd = _cases(modules)[case]
    extra = ["-append", cmdline] if cmdline else []
    if initrd:
        extra += ["-initrd", ",".join(item.replace(",", ",,") for item in initrd)]
    proc = subprocess.run([qemu, "-accel", "tcg", "-kernel", kernel, *extra, "-serial", "stdio",
                           "-display", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                           "-no-reboot", "-m", "128"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    output, status, _ = _vmk(kernel, cmdline, initrd)
    assert proc.stdout == output
    assert proc.returncode == status
