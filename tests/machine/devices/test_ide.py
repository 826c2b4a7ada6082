"""IDE/ATA channel: the register protocol of ATA/ATAPI-6 against the model, without a CPU."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmk.machine.blockdev import DiskImage
from vmk.machine.devices.ide import Cmd, Ctl, Error, IDEChannel, Reg, Status, chs_geometry, identify_data
from vmk.machine.irq import IrqLine

SECTORS = 2048


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(b"".join(struct.pack("<I", n) * 128 for n in range(SECTORS)))
    return p


def channel(master: DiskImage | None = None, slave: DiskImage | None = None) -> tuple[IDEChannel, IrqLine, list]:
    irq = IrqLine("irq14")
    logs: list[str] = []
    return IDEChannel(irq, (master, slave), log=logs.append), irq, logs


def status(ch: IDEChannel) -> int:
    return ch.read(Reg.STATUS_COMMAND, 1)


def lba28(ch: IDEChannel, dev: int, lba: int, count: int) -> None:
    ch.write(Reg.DEVICE, 1, 0xE0 | (dev << 4) | (lba >> 24))
    ch.write(Reg.COUNT, 1, count)
    ch.write(Reg.LBA_LOW, 1, lba & 0xFF)
    ch.write(Reg.LBA_MID, 1, (lba >> 8) & 0xFF)
    ch.write(Reg.LBA_HIGH, 1, (lba >> 16) & 0xFF)


def read_block(ch: IDEChannel, width: int = 2) -> bytes:
    return b"".join(ch.read(Reg.DATA, width).to_bytes(width, "little") for _ in range(512 // width))


def test_empty_channel_reads_zero_and_ignores_everything() -> None:
    ch, irq, _ = channel()
    for reg in range(1, 8):
        assert ch.read(reg, 1) == 0
    assert ch.control.read(0, 1) == 0
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.IDENTIFY)
    assert status(ch) == 0 and not irq.level


def test_absent_slave_reads_status_zero_and_ignores_commands(image: Path) -> None:
    ch, irq, _ = channel(DiskImage(str(image)))
    ch.write(Reg.DEVICE, 1, 0xB0)
    assert status(ch) == 0 and ch.control.read(0, 1) == 0 and ch.read(Reg.ERROR_FEATURES, 1) == 0
    assert ch.read(Reg.DEVICE, 1) == 0xB0
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.IDENTIFY)
    assert status(ch) == 0 and not irq.level
    ch.write(Reg.DEVICE, 1, 0xA0)
    assert status(ch) == Status.DRDY | Status.DSC


def test_absent_master_next_to_a_slave_reports_0x50_and_aborts(image: Path) -> None:
    ch, irq, _ = channel(None, DiskImage(str(image)))
    ch.write(Reg.DEVICE, 1, 0xA0)
    assert status(ch) == 0x50
    assert (ch.read(Reg.LBA_MID, 1), ch.read(Reg.LBA_HIGH, 1)) == (0xFF, 0xFF)     # no-device signature
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.IDENTIFY)
    assert irq.level
    assert status(ch) == Status.DRDY | Status.ERR and not irq.level
    assert ch.read(Reg.ERROR_FEATURES, 1) == Error.ABRT


def test_identify_words_and_checksum(image: Path) -> None:
    ch, irq, _ = channel(DiskImage(str(image)))
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.IDENTIFY)
    assert irq.level and ch.control.read(0, 1) == 0x58 and irq.level      # alt status does not acknowledge
    assert status(ch) == 0x58 and not irq.level
    data = read_block(ch)
    assert status(ch) == 0x50
    w = struct.unpack("<256H", data)
    assert (w[1], w[3], w[6]) == chs_geometry(SECTORS) == (2, 16, 63)
    assert w[60] | w[61] << 16 == SECTORS and w[100] == SECTORS and w[83] & (1 << 10)
    model = b"".join(struct.pack(">H", x) for x in w[27:47]).decode().strip()
    assert model == "VMK HARDDISK"
    assert w[255] & 0xFF == 0xA5 and sum(data) % 256 == 0                  # ATA-6 8.15.61 integrity word


def test_read_sectors_protocol(image: Path) -> None:
    ch, irq, _ = channel(DiskImage(str(image)))
    ch.control.write(0, 1, Ctl.NIEN)
    lba28(ch, 0, 10, 2)
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.READ_SECTORS)
    assert not irq.level                                   # nIEN: the line stays low
    assert status(ch) == 0x58
    assert read_block(ch, 4) == struct.pack("<I", 10) * 128   # 32-bit data reads
    assert status(ch) == 0x58 and ch.read(Reg.COUNT, 1) == 0
    assert read_block(ch) == struct.pack("<I", 11) * 128
    assert status(ch) == 0x50
    assert ch.read(Reg.LBA_LOW, 1) == 12                    # the task file addresses the next sector
    assert ch.read(Reg.DATA, 2) == 0                        # no transfer: reads 0
    assert ch.read(Reg.DATA, 1) == 0xFF


def test_interrupt_pending_until_status_read_and_gated_by_nien(image: Path) -> None:
    ch, irq, _ = channel(DiskImage(str(image)))
    ch.control.write(0, 1, Ctl.NIEN)
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.FLUSH_CACHE)
    assert not irq.level
    ch.control.write(0, 1, 0)                              # ATA-6 5.2.9: the pending interrupt shows now
    assert irq.level
    assert status(ch) == 0x50 and not irq.level


def test_write_sectors_protocol(image: Path) -> None:
    disk = DiskImage(str(image))
    ch, irq, _ = channel(disk)
    lba28(ch, 0, 5, 2)
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.WRITE_SECTORS)
    assert status(ch) == 0x58 and not irq.level             # data-out: no interrupt before the first block
    for _ in range(256):
        ch.write(Reg.DATA, 2, 0x1111)
    assert irq.level and status(ch) == 0x58
    for _ in range(128):
        ch.write(Reg.DATA, 4, 0x22222222)
    assert irq.level and status(ch) == 0x50
    data = image.read_bytes()
    assert data[5 * 512:6 * 512] == b"\x11" * 512 and data[6 * 512:7 * 512] == b"\x22" * 512
    assert data[7 * 512:7 * 512 + 4] == struct.pack("<I", 7)


def test_snapshot_keeps_the_file(image: Path) -> None:
    before = image.read_bytes()
    disk = DiskImage(str(image), snapshot=True)
    ch, _, _ = channel(disk)
    lba28(ch, 0, 0, 1)
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.WRITE_SECTORS)
    for _ in range(256):
        ch.write(Reg.DATA, 2, 0xABCD)
    lba28(ch, 0, 0, 1)
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.READ_SECTORS)
    assert read_block(ch) == b"\xcd\xab" * 256
    assert image.read_bytes() == before


def test_lba48_and_hob_readback(image: Path) -> None:
    ch, _, _ = channel(DiskImage(str(image)))
    ch.write(Reg.DEVICE, 1, 0x40)
    for reg, (hi, lo) in ((Reg.COUNT, (0, 1)), (Reg.LBA_LOW, (0, 0xFF)), (Reg.LBA_MID, (0, 0x03)),
                          (Reg.LBA_HIGH, (0, 0))):
        ch.write(reg, 1, hi)
        ch.write(reg, 1, lo)
    ch.control.write(0, 1, Ctl.HOB | Ctl.NIEN)
    assert ch.read(Reg.LBA_LOW, 1) == 0 and ch.read(Reg.COUNT, 1) == 0
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.READ_SECTORS_EXT)
    assert ch.control.read(0, 1) == 0x58
    assert read_block(ch) == struct.pack("<I", 0x3FF) * 128


def test_chs_and_out_of_range(image: Path) -> None:
    ch, _, _ = channel(DiskImage(str(image)))
    ch.write(Reg.DEVICE, 1, 0xA0 | 1)                      # CHS, head 1
    ch.write(Reg.COUNT, 1, 1)
    ch.write(Reg.LBA_LOW, 1, 2)                            # sector 2
    ch.write(Reg.LBA_MID, 1, 1)                            # cylinder 1
    ch.write(Reg.LBA_HIGH, 1, 0)
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.READ_SECTORS)
    assert read_block(ch) == struct.pack("<I", (1 * 16 + 1) * 63 + 1) * 128
    ch.write(Reg.LBA_LOW, 1, 0)                            # sector 0 does not exist
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.READ_SECTORS)
    assert status(ch) == Status.DRDY | Status.ERR and ch.read(Reg.ERROR_FEATURES, 1) == Error.IDNF
    lba28(ch, 0, SECTORS - 1, 2)                           # runs past the end
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.READ_SECTORS)
    assert status(ch) & Status.ERR and ch.read(Reg.ERROR_FEATURES, 1) == Error.IDNF


def test_srst_resets_to_the_signature(image: Path) -> None:
    ch, irq, _ = channel(DiskImage(str(image)))
    lba28(ch, 0, 0x123, 7)
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.IDENTIFY)
    ch.control.write(0, 1, Ctl.SRST | Ctl.NIEN)
    assert ch.control.read(0, 1) & Status.BSY
    ch.control.write(0, 1, Ctl.NIEN)
    assert [ch.read(r, 1) for r in range(1, 8)] == [1, 1, 1, 0, 0, 0xA0, 0x50]
    assert ch.read(Reg.DATA, 2) == 0 and not irq.level


def test_register_writes_during_drq_are_ignored(image: Path) -> None:
    ch, _, logs = channel(DiskImage(str(image)))
    lba28(ch, 0, 3, 1)
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.READ_SECTORS)
    ch.write(Reg.LBA_LOW, 1, 0x77)
    ch.write(Reg.STATUS_COMMAND, 1, Cmd.IDENTIFY)
    assert ch.read(Reg.LBA_LOW, 1) == 4
    assert read_block(ch) == struct.pack("<I", 3) * 128
    assert any("ignored" in m for m in logs)


@pytest.mark.parametrize("cmd", [0x00, 0xC4, 0xC8, 0xA1, 0xFF])
def test_unsupported_commands_abort(image: Path, cmd: int) -> None:
    ch, irq, logs = channel(DiskImage(str(image)))
    ch.write(Reg.STATUS_COMMAND, 1, cmd)
    assert irq.level and status(ch) == 0x41 and ch.read(Reg.ERROR_FEATURES, 1) == Error.ABRT
    assert logs


def test_any_register_value_is_safe(image: Path) -> None:
    """Every byte to every register and every command with random task files: never an exception."""
    import random
    rng = random.Random(12)
    ch, _, _ = channel(DiskImage(str(image), snapshot=True), DiskImage(str(image), snapshot=True))
    for _ in range(20000):
        port = rng.randrange(9)
        size = rng.choice((1, 2, 4))
        if port == 8:
            ch.control.write(0, 1, rng.randrange(256) & ~Ctl.SRST if rng.random() < 0.9 else Ctl.SRST)
        elif rng.random() < 0.5:
            ch.write(port, size, rng.getrandbits(8 * size))
        else:
            ch.read(port, size)
    snap = ch.snapshot()
    ch.restore(snap)
    assert ch.snapshot() == snap


def test_identify_capacity_fields_for_a_large_disk() -> None:
    w = struct.unpack("<256H", identify_data(1 << 30, chs_geometry(1 << 30), "S", False, True, True))
    assert (w[1], w[3], w[6]) == (16383, 16, 63)
    assert w[60] | w[61] << 16 == (1 << 28) - 1            # LBA28 saturates
    assert w[100] | w[101] << 16 | w[102] << 32 == 1 << 30
