"""IDE/ATA channel with PIO disks (the PIIX legacy ports: 0x1F0-0x1F7 + 0x3F6, IRQ 14; 0x170-0x177 + 0x376, IRQ 15).

Register set and protocol follow ATA/ATAPI-6 (T13 1410D): section 7 (the
register block), 8 (commands), 9 (the PIO data-in / data-out / non-data
protocols and the software reset protocol).  Where the spec leaves a choice,
or where what a guest sees also depends on the BIOS, vmk does what QEMU 7.2
(``hw/ide/core.c``) + SeaBIOS show; tests/guest/idetest.c checks the shared
facts against QEMU.

How it works
------------

One :class:`IDEChannel` is the command block (eight ports, offsets 0..7) and,
through :attr:`IDEChannel.control`, the control block port (alternate status /
device control).  It holds two device positions, ``drives[0]`` (master,
device 0) and ``drives[1]`` (slave, device 1); a position without a
:class:`~vmk.machine.blockdev.DiskImage` is absent.  Each position keeps its
own task file, as two real devices do:

* writes to the features, sector count, LBA low/mid/high registers go to both
  devices (ATA-6 7.1); each keeps the previous value too (the "HOB" half of
  the 48-bit registers, read back with device control HOB=1);
* the device register selects the device (DEV, bit 4); both store it (bits 7
  and 5 read as one, as QEMU);
* status, error and the data port are those of the selected device.

Commands complete **at once** (QEMU completes PIO commands without a delay a
guest can rely on; vmk picks zero virtual time, so runs are deterministic):
after the command write the status register already shows the outcome.

* PIO data-in (IDENTIFY DEVICE, READ SECTORS (EXT)): each 512-byte block is
  loaded with status DRDY|DSC|DRQ (0x58) and an interrupt; the task file
  then already addresses the next sector and the count is decremented (as
  QEMU).  When the host has read the last word of the last block, DRQ
  clears (0x50) with no further interrupt.
* PIO data-out (WRITE SECTORS (EXT)): DRQ at once, no interrupt; after each
  block the sector reaches the image and an interrupt follows, with DRQ for
  the next block or, after the last, status 0x50.
* Non-data commands: status DRDY (|DSC for the commands QEMU marks so) and an
  interrupt.
* A rejected command: status DRDY|ERR (0x41), error ABRT (0x04), interrupt.
  An address outside the disk (or a CHS address outside the geometry):
  DRDY|ERR, error IDNF (0x10), interrupt.  A host I/O error: ERR, UNC
  (reads) or ABRT (writes), logged.

The interrupt (ATA-6 5.2.9 INTRQ): a device has an interrupt *pending* from
the end of a block or command until the host reads its status register (not
the alternate status) or writes a command.  The line is driven only by the
selected device and only while device control nIEN is 0: it is
``drives[sel].pending and not nIEN`` (:meth:`IDEChannel._update_irq`).  QEMU
instead drops the raise when nIEN is set at that moment; a guest that
acknowledges with a status read, as every driver does, sees no difference.

Software reset (ATA-6 9.2): SRST=1 makes both devices BSY; the 1->0 edge
resets them: task files to the signature (count 1, LBA low 1, LBA mid/high
0/0 for a disk, FF/FF for an absent position), error 01 (diagnostics passed),
status DRDY|DSC.  No interrupt.  The power-on state is the same, as SeaBIOS
leaves it after probing.

Absent devices, as QEMU shows them (checked by idetest on QEMU):

* a channel with no device reads 0 from every register (the data port
  included, when read bytewise: 0xFF, as an ISA bus);
* an absent device 1 reads status, alternate status and error as 0 (the
  host's pull-down on DD7, ATA-6 5.2.13), its other registers as stored,
  and ignores commands: a probe that selects it and waits for a non-zero
  status stops at once (xv6);
* an absent device 0 next to a present device 1 answers for itself: status
  DRDY|DSC (0x50), and every command except EXECUTE DEVICE DIAGNOSTIC is
  aborted (0x41, ABRT), as a device 1 must emulate for a missing device 0.

Commands: IDENTIFY DEVICE (EC), READ SECTORS (20/21), READ SECTORS EXT (24),
WRITE SECTORS (30/31), WRITE SECTORS EXT (34), READ VERIFY SECTORS (40/41/42),
SEEK (7x), RECALIBRATE (1x), EXECUTE DEVICE DIAGNOSTIC (90), INITIALIZE DEVICE
PARAMETERS (91), READ NATIVE MAX ADDRESS (F8/27), SET FEATURES (EF: 02/82
write cache, 03 transfer mode, 55/AA read look-ahead, 66/CC defaults), FLUSH
CACHE (E7/EA), CHECK POWER MODE (E5/98), the idle/standby/sleep commands
(E0-E3, E6, 94-97, 99: accepted, no effect).  Everything else is aborted.

The data port: 16-bit and 32-bit reads and writes (``rep insw/insl``,
``rep outsw/outsl``; a 32-bit access is two words, low first).  Outside a
transfer a read returns 0 and a write is ignored; a byte access reads 0xFF.
Command block writes (registers 1..6) while the selected device is BSY or
has DRQ set are ignored, and so is a command (ATA-6 7.15.6; QEMU).

Geometry: cylinders = sectors / (16 * 63) (at least 2, at most 16383), 16
heads, 63 sectors per track (QEMU's guess for an image with no partition
table); INITIALIZE DEVICE PARAMETERS changes the current heads/sectors
(IDENTIFY words 54-58) that CHS addresses use.

Not modelled: DMA (no PIIX bus master, no PCI function: IDENTIFY reports no
DMA modes), ATAPI (no CD-ROM: QEMU's default empty CD-ROM on the secondary
master does not exist here), READ/WRITE MULTIPLE and SET MULTIPLE MODE
(aborted; word 47 reports 0), SMART, security, power states (the commands
only succeed), a write-protected medium, media change.
"""
from __future__ import annotations

from enum import IntEnum, IntFlag

from vmk.machine.blockdev import SECTOR, DiskImage
from vmk.machine.devices import Log, nolog
from vmk.machine.irq import IrqLine

__all__ = ["IDEChannel", "Status", "Error", "Ctl", "Reg", "Cmd", "PRIMARY", "SECONDARY", "chs_geometry",
           "identify_data"]

PRIMARY = (0x1F0, 0x3F6, 14)        # command block, control block, ISA IRQ
SECONDARY = (0x170, 0x376, 15)


class Reg(IntEnum):
    """Command block register offsets (ATA-6 7.1, Table 17)."""
    DATA = 0
    ERROR_FEATURES = 1
    COUNT = 2
    LBA_LOW = 3          # sector number (CHS)
    LBA_MID = 4          # cylinder low
    LBA_HIGH = 5         # cylinder high
    DEVICE = 6           # device/head
    STATUS_COMMAND = 7


class Status(IntFlag):
    """Status register (ATA-6 7.15)."""
    ERR = 0x01
    DRQ = 0x08
    DSC = 0x10           # device seek complete (obsolete in ATA-6; QEMU sets it)
    DF = 0x20
    DRDY = 0x40
    BSY = 0x80


class Error(IntFlag):
    """Error register (ATA-6 7.9)."""
    AMNF = 0x01          # also: diagnostic code 01 = device 0 passed
    ABRT = 0x04
    IDNF = 0x10
    UNC = 0x40


class Ctl(IntFlag):
    """Device control register (ATA-6 7.8)."""
    NIEN = 0x02
    SRST = 0x04
    HOB = 0x80


class Cmd(IntEnum):
    RECALIBRATE = 0x10
    READ_SECTORS = 0x20
    READ_SECTORS_NR = 0x21
    READ_SECTORS_EXT = 0x24
    READ_NATIVE_MAX_EXT = 0x27
    WRITE_SECTORS = 0x30
    WRITE_SECTORS_NR = 0x31
    WRITE_SECTORS_EXT = 0x34
    READ_VERIFY = 0x40
    READ_VERIFY_NR = 0x41
    READ_VERIFY_EXT = 0x42
    SEEK = 0x70
    EXECUTE_DIAGNOSTIC = 0x90
    INITIALIZE_PARAMS = 0x91
    CHECK_POWER_MODE_OLD = 0x98
    CHECK_POWER_MODE = 0xE5
    FLUSH_CACHE = 0xE7
    FLUSH_CACHE_EXT = 0xEA
    IDENTIFY = 0xEC
    SET_FEATURES = 0xEF
    READ_NATIVE_MAX = 0xF8


DEV_BIT = 0x10           # device register: DEV
LBA_BIT = 0x40           # device register: LBA addressing
DEV_ALWAYS_ON = 0xA0     # obsolete bits 7 and 5: read as one
HEAD_MASK = 0x0F
LBA28_LIMIT = 1 << 28
DIAG_PASSED = 0x01
SIGNATURE_ABSENT = 0xFF
POWER_ACTIVE = 0xFF      # CHECK POWER MODE count: active or idle

_READ = frozenset((Cmd.READ_SECTORS, Cmd.READ_SECTORS_NR, Cmd.READ_SECTORS_EXT))
_WRITE = frozenset((Cmd.WRITE_SECTORS, Cmd.WRITE_SECTORS_NR, Cmd.WRITE_SECTORS_EXT))
_EXT = frozenset((Cmd.READ_SECTORS_EXT, Cmd.WRITE_SECTORS_EXT, Cmd.READ_VERIFY_EXT, Cmd.READ_NATIVE_MAX_EXT))
# Non-data commands that succeed with no effect; True: DSC is set on completion (as QEMU).
_NOOP = {0x94: False, 0x95: False, 0x96: False, 0x97: False, 0x99: False,
         0xE0: False, 0xE1: False, 0xE2: False, 0xE3: False, 0xE6: False}
# SET FEATURES subcommands accepted (ATA-6 8.37, Table 33).
_FEATURES_OK = frozenset((0x02, 0x82, 0x03, 0x55, 0xAA, 0x66, 0xCC))

MODEL = "VMK HARDDISK"
FIRMWARE = "1.0"


def chs_geometry(sectors: int) -> tuple[int, int, int]:
    """Default (cylinders, heads, sectors per track) of a disk of ``sectors`` sectors."""
    cyls = min(max(sectors // (16 * 63), 2), 16383)
    return cyls, 16, 63


def _ata_string(text: str, words: int) -> list[int]:
    raw = text.encode("ascii", "replace")[:2 * words].ljust(2 * words, b" ")
    return [(raw[2 * i] << 8) | raw[2 * i + 1] for i in range(words)]    # first character in the high byte


def identify_data(sectors: int, cur: tuple[int, int, int], serial: str, slave: bool,
                  write_cache: bool, look_ahead: bool) -> bytes:
    """The 256 IDENTIFY DEVICE words (ATA-6 8.15, Table 27)."""
    cyls, heads, spt = chs_geometry(sectors)
    ccyl, chead, cspt = cur
    w = [0] * 256
    w[0] = 0x0040                                   # ATA device, fixed
    w[1], w[3], w[6] = cyls, heads, spt
    w[10:20] = _ata_string(serial, 10)
    w[23:27] = _ata_string(FIRMWARE, 4)
    w[27:47] = _ata_string(MODEL, 20)
    w[47] = 0x8000                                  # READ/WRITE MULTIPLE: not supported (0 sectors)
    w[49] = (1 << 11) | (1 << 9)                    # IORDY supported, LBA supported
    w[50] = 0x4000
    w[51] = 0x0200                                  # PIO cycle timing (obsolete)
    w[53] = 0x0003                                  # words 54-58 and 64-70 valid
    cur_cap = min(ccyl * chead * cspt, 0xFFFFFFFF)
    w[54], w[55], w[56] = ccyl, chead, cspt
    w[57], w[58] = cur_cap & 0xFFFF, cur_cap >> 16
    lba28 = min(sectors, LBA28_LIMIT - 1)
    w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
    w[64] = 0x0003                                  # PIO modes 3 and 4
    w[65] = w[66] = w[67] = w[68] = 120             # cycle times, ns
    w[80] = 0x007E                                  # ATA-1 .. ATA-6
    w[82] = (1 << 6) | (1 << 5)                     # look-ahead, write cache
    w[83] = (1 << 14) | (1 << 13) | (1 << 12) | (1 << 10)  # FLUSH CACHE EXT, FLUSH CACHE, 48-bit
    w[84] = 1 << 14
    w[85] = (1 << 6 if look_ahead else 0) | (1 << 5 if write_cache else 0)
    w[86] = (1 << 13) | (1 << 12) | (1 << 10)
    w[87] = 1 << 14
    w[93] = 0x4000 | (0x0100 if slave else 0x0001)  # hardware reset result
    for i in range(4):
        w[100 + i] = (sectors >> (16 * i)) & 0xFFFF
    data = bytearray()
    for v in w[:255]:
        data += v.to_bytes(2, "little")
    data += bytes([0xA5])                            # word 255: integrity signature ...
    data += bytes([(-(sum(data)) & 0xFF)])           # ... and checksum (all 512 bytes sum to 0)
    return bytes(data)


class _Drive:
    """One device position: its task file and transfer state."""

    def __init__(self, disk: DiskImage | None, slave: bool, serial: str) -> None:
        self.disk = disk
        self.slave = slave
        self.serial = serial
        self.sectors = disk.sectors if disk is not None else 0
        self.reset()
        self.write_cache = True
        self.look_ahead = True
        self.pio_mode = 4
        geo = chs_geometry(self.sectors)
        self.cur = geo                                   # current cylinders, heads, sectors per track

    def reset(self) -> None:
        self.feature = self.hob_feature = 0
        self.hob_count = self.hob_lba0 = self.hob_lba1 = self.hob_lba2 = 0
        self.select = DEV_ALWAYS_ON | (DEV_BIT if self.slave else 0)
        self.signature()
        self.status = Status.DRDY | Status.DSC
        self.pending = False
        self.stop_transfer()

    def signature(self) -> None:
        """Task file after a reset or EXECUTE DEVICE DIAGNOSTIC (ATA-6 9.12)."""
        self.select &= ~HEAD_MASK
        self.count = 1
        self.lba0 = 1
        self.lba1 = self.lba2 = 0 if self.disk is not None else SIGNATURE_ABSENT
        self.error = DIAG_PASSED

    def stop_transfer(self) -> None:
        self.buf = b""
        self.out = bytearray()
        self.pos = 0
        self.direction = 0          # 0: none, 1: data-in (device -> host), -1: data-out
        self.remaining = 0          # sectors still to transfer after the current block
        self.lba = 0                # sector of the current block
        self.ext = False
        self.status &= ~Status.DRQ


class IDEChannel:
    """One ATA channel: two device positions, a command block and a control port."""

    def __init__(self, irq: IrqLine, disks: tuple[DiskImage | None, DiskImage | None] = (None, None),
                 log: Log = nolog, name: str = "ide0") -> None:
        self.irq = irq
        self.log = log
        self.name = name
        self.drives = [_Drive(disks[0], False, f"VMK{name.upper()}M"), _Drive(disks[1], True, f"VMK{name.upper()}S")]
        self.control = _ControlPort(self)
        self.reset()

    # ------------------------------------------------------------ state
    def reset(self) -> None:
        self.sel = 0
        self.ctl = 0
        for d in self.drives:
            d.reset()
        self._update_irq()

    @property
    def _any(self) -> bool:
        return self.drives[0].disk is not None or self.drives[1].disk is not None

    def _muted(self) -> bool:
        """Status and error read 0: no device on the channel, or an absent device 1 selected."""
        return not self._any or (self.sel == 1 and self.drives[1].disk is None)

    def _update_irq(self) -> None:
        d = self.drives[self.sel]
        self.irq.set(d.pending and not (self.ctl & Ctl.NIEN) and not self._muted())

    def _interrupt(self, d: _Drive) -> None:
        d.pending = True
        self._update_irq()

    # ------------------------------------------------------------ registers
    def read(self, offset: int, size: int) -> int:
        if offset == Reg.DATA and size > 1:
            return self._data_read(size)
        value = 0
        for i in range(size):                   # wider accesses: one byte register after the other
            value |= self._read_byte((offset + i) & 7) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == Reg.DATA and size > 1:
            self._data_write(size, value)
            return
        for i in range(size):
            self._write_byte((offset + i) & 7, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, reg: int) -> int:
        if reg == Reg.DATA:
            return 0xFF
        if not self._any:
            return 0
        d = self.drives[self.sel]
        hob = bool(self.ctl & Ctl.HOB)
        if reg == Reg.STATUS_COMMAND:
            if self._muted():
                return 0
            d.pending = False
            self._update_irq()
            return int(d.status)
        if reg == Reg.ERROR_FEATURES:
            if self._muted():
                return 0
            return d.hob_feature if hob else int(d.error)
        if reg == Reg.COUNT:
            return d.hob_count if hob else d.count & 0xFF
        if reg == Reg.LBA_LOW:
            return d.hob_lba0 if hob else d.lba0
        if reg == Reg.LBA_MID:
            return d.hob_lba1 if hob else d.lba1
        if reg == Reg.LBA_HIGH:
            return d.hob_lba2 if hob else d.lba2
        return d.select                          # Reg.DEVICE

    def alt_status(self) -> int:
        return 0 if self._muted() else int(self.drives[self.sel].status)

    def _write_byte(self, reg: int, val: int) -> None:
        if reg == Reg.DATA:
            return
        self.ctl &= ~Ctl.HOB                     # a command block write clears HOB (ATA-6 7.8)
        if reg == Reg.STATUS_COMMAND:
            self._command(val)
            return
        if self.drives[self.sel].status & (Status.BSY | Status.DRQ):
            self.log(f"register {reg} written during a transfer (ignored)")
            return
        for d in self.drives:
            if reg == Reg.ERROR_FEATURES:
                d.hob_feature, d.feature = d.feature, val
            elif reg == Reg.COUNT:
                d.hob_count, d.count = d.count & 0xFF, val
            elif reg == Reg.LBA_LOW:
                d.hob_lba0, d.lba0 = d.lba0, val
            elif reg == Reg.LBA_MID:
                d.hob_lba1, d.lba1 = d.lba1, val
            elif reg == Reg.LBA_HIGH:
                d.hob_lba2, d.lba2 = d.lba2, val
            else:
                d.select = val | DEV_ALWAYS_ON
        if reg == Reg.DEVICE:
            self.sel = 1 if val & DEV_BIT else 0
            self._update_irq()

    def write_control(self, val: int) -> None:
        old = self.ctl
        self.ctl = val & (Ctl.NIEN | Ctl.SRST | Ctl.HOB)
        if val & Ctl.SRST and not old & Ctl.SRST:
            for d in self.drives:
                d.stop_transfer()
                d.status = Status.BSY
                d.pending = False
        elif old & Ctl.SRST and not val & Ctl.SRST:
            for d in self.drives:                 # the reset ends: signature and diagnostics (ATA-6 9.2)
                d.reset()
        self._update_irq()

    # ------------------------------------------------------------ data port
    def _data_read(self, size: int) -> int:
        d = self.drives[self.sel]
        if d.direction != 1 or self._muted():
            return 0
        chunk = d.buf[d.pos:d.pos + size]
        d.pos += size
        value = int.from_bytes(chunk, "little")
        if d.pos >= len(d.buf):
            self._data_in_done(d)
        return value

    def _data_write(self, size: int, value: int) -> None:
        d = self.drives[self.sel]
        if d.direction != -1 or self._muted():
            return
        d.out += value.to_bytes(size, "little")
        if len(d.out) >= SECTOR:
            self._data_out_block(d)

    # ------------------------------------------------------------ commands
    def _command(self, cmd: int) -> None:
        d = self.drives[self.sel]
        if self.sel == 1 and d.disk is None:
            return                                  # an absent device 1 ignores commands
        if d.status & (Status.BSY | Status.DRQ):
            self.log(f"command {cmd:#04x} while busy (ignored)")
            return
        d.pending = False
        d.error = 0
        if d.disk is None and cmd != Cmd.EXECUTE_DIAGNOSTIC:
            self._abort(d)                          # device 0 absent, device 1 present
            return
        if cmd in _READ or cmd in _WRITE:
            self._start_rw(d, cmd)
        elif cmd == Cmd.IDENTIFY:
            d.buf = identify_data(d.sectors, d.cur, d.serial, d.slave, d.write_cache, d.look_ahead)
            d.pos = 0
            d.direction = 1
            d.remaining = 0
            d.status = Status.DRDY | Status.DSC | Status.DRQ
            self._interrupt(d)
        elif cmd in (Cmd.READ_VERIFY, Cmd.READ_VERIFY_NR, Cmd.READ_VERIFY_EXT):
            ext = cmd == Cmd.READ_VERIFY_EXT
            lba, count = self._address(d, ext)
            if lba is None or lba + count > d.sectors:
                self._fail(d, Error.IDNF)
                return
            self._set_address(d, lba + count, ext)
            d.count = 0
            self._done(d, dsc=True)
        elif (cmd & 0xF0) in (Cmd.SEEK, Cmd.RECALIBRATE):
            self._done(d, dsc=True)
        elif cmd == Cmd.EXECUTE_DIAGNOSTIC:
            for dr in self.drives:
                dr.stop_transfer()
                dr.signature()
                dr.status = Status.DRDY | Status.DSC
            self._interrupt(d)
        elif cmd == Cmd.INITIALIZE_PARAMS:
            heads, spt = (d.select & HEAD_MASK) + 1, d.count & 0xFF
            if spt == 0:
                self._abort(d)
                return
            d.cur = (min(d.sectors // (heads * spt), 65535), heads, spt)
            self._done(d, dsc=True)
        elif cmd in (Cmd.READ_NATIVE_MAX, Cmd.READ_NATIVE_MAX_EXT):
            ext = cmd == Cmd.READ_NATIVE_MAX_EXT
            if not d.select & LBA_BIT:
                self._abort(d)
                return
            last = max(d.sectors - 1, 0) if ext else max(min(d.sectors, LBA28_LIMIT) - 1, 0)
            self._set_address(d, last, ext)
            self._done(d, dsc=True)
        elif cmd == Cmd.SET_FEATURES:
            self._set_features(d)
        elif cmd in (Cmd.FLUSH_CACHE, Cmd.FLUSH_CACHE_EXT):
            try:
                d.disk.flush()
            except OSError as e:
                self.log(f"flush of {d.disk.path} failed: {e.strerror}")
                self._fail(d, Error.ABRT)
                return
            self._done(d, dsc=True)
        elif cmd in (Cmd.CHECK_POWER_MODE, Cmd.CHECK_POWER_MODE_OLD):
            d.count = POWER_ACTIVE
            self._done(d, dsc=True)
        elif cmd in _NOOP:
            self._done(d, dsc=_NOOP[cmd])
        else:
            self.log(f"command {cmd:#04x} not supported (aborted)")
            self._abort(d)

    def _set_features(self, d: _Drive) -> None:
        sub = d.feature
        if sub not in _FEATURES_OK:
            self.log(f"SET FEATURES {sub:#04x} not supported (aborted)")
            self._abort(d)
            return
        if sub in (0x02, 0x82):
            d.write_cache = sub == 0x02
        elif sub in (0x55, 0xAA):
            d.look_ahead = sub == 0xAA
        elif sub == 0x03:
            mode = d.count & 0xFF
            if mode >> 3 in (0, 1) and (mode & 7) <= 4:     # PIO default / PIO flow control modes 0-4
                d.pio_mode = mode & 7
            else:                                           # DMA modes: no DMA here
                self._abort(d)
                return
        self._done(d, dsc=True)

    def _done(self, d: _Drive, dsc: bool) -> None:
        d.stop_transfer()
        d.status = Status.DRDY | (Status.DSC if dsc else 0)
        self._interrupt(d)

    def _abort(self, d: _Drive) -> None:
        self._fail(d, Error.ABRT)

    def _fail(self, d: _Drive, error: int) -> None:
        d.stop_transfer()
        d.error = error
        d.status = Status.DRDY | Status.ERR
        self._interrupt(d)

    # ------------------------------------------------------------ addressing
    def _address(self, d: _Drive, ext: bool) -> tuple[int | None, int]:
        """(first sector, sector count) of a read/write/verify command; None for a bad CHS address."""
        if ext:
            count = (d.hob_count << 8) | (d.count & 0xFF) or 0x10000
            lba = ((d.hob_lba2 << 40) | (d.hob_lba1 << 32) | (d.hob_lba0 << 24) |
                   (d.lba2 << 16) | (d.lba1 << 8) | d.lba0)
            return lba, count
        count = (d.count & 0xFF) or 0x100
        if d.select & LBA_BIT:
            return ((d.select & HEAD_MASK) << 24) | (d.lba2 << 16) | (d.lba1 << 8) | d.lba0, count
        _, heads, spt = d.cur
        cyl, head, sector = (d.lba2 << 8) | d.lba1, d.select & HEAD_MASK, d.lba0
        if sector == 0 or sector > spt or head >= heads:
            return None, count
        return (cyl * heads + head) * spt + sector - 1, count

    def _set_address(self, d: _Drive, lba: int, ext: bool) -> None:
        """Write ``lba`` back into the task file in the form the command used."""
        if ext:
            d.lba0, d.lba1, d.lba2 = lba & 0xFF, (lba >> 8) & 0xFF, (lba >> 16) & 0xFF
            d.hob_lba0, d.hob_lba1, d.hob_lba2 = (lba >> 24) & 0xFF, (lba >> 32) & 0xFF, (lba >> 40) & 0xFF
        elif d.select & LBA_BIT:
            d.lba0, d.lba1, d.lba2 = lba & 0xFF, (lba >> 8) & 0xFF, (lba >> 16) & 0xFF
            d.select = (d.select & ~HEAD_MASK) | ((lba >> 24) & HEAD_MASK)
        else:
            _, heads, spt = d.cur
            cyl, r = divmod(lba, heads * spt)
            d.lba2, d.lba1 = (cyl >> 8) & 0xFF, cyl & 0xFF
            d.select = (d.select & ~HEAD_MASK) | ((r // spt) & HEAD_MASK)
            d.lba0 = r % spt + 1

    # ------------------------------------------------------------ PIO transfers
    def _start_rw(self, d: _Drive, cmd: int) -> None:
        ext = cmd in _EXT
        lba, count = self._address(d, ext)
        if lba is None or lba + count > d.sectors:
            self._fail(d, Error.IDNF)
            return
        d.lba = lba
        d.remaining = count
        d.ext = ext
        if cmd in _READ:
            self._next_read_block(d)
        else:
            d.direction = -1
            d.out = bytearray()
            d.status = Status.DRDY | Status.DSC | Status.DRQ      # no interrupt before the first block

    def _next_read_block(self, d: _Drive) -> None:
        """Load the next sector for the host: DRQ and an interrupt; the task file moves on."""
        try:
            d.buf = d.disk.read(d.lba, 1)
        except OSError as e:
            self.log(f"read of sector {d.lba} from {d.disk.path} failed: {e.strerror}")
            self._fail(d, Error.UNC)
            return
        d.pos = 0
        d.direction = 1
        d.remaining -= 1
        d.lba += 1
        d.count = d.remaining
        self._set_address(d, d.lba, d.ext)
        d.status = Status.DRDY | Status.DSC | Status.DRQ
        self._interrupt(d)

    def _data_in_done(self, d: _Drive) -> None:
        if d.remaining > 0:
            self._next_read_block(d)
        else:
            d.stop_transfer()                     # DRQ clears; no interrupt (ATA-6 9.7)

    def _data_out_block(self, d: _Drive) -> None:
        data = bytes(d.out[:SECTOR])
        d.out = bytearray()
        try:
            d.disk.write(d.lba, data)
        except OSError as e:
            self.log(f"write of sector {d.lba} to {d.disk.path} failed: {e.strerror}")
            self._fail(d, Error.ABRT)
            return
        d.lba += 1
        d.remaining -= 1
        d.count = d.remaining
        self._set_address(d, d.lba, d.ext)
        if d.remaining > 0:
            d.status = Status.DRDY | Status.DSC | Status.DRQ
        else:
            d.stop_transfer()
            d.status = Status.DRDY | Status.DSC
        self._interrupt(d)

    # ------------------------------------------------------------ snapshots
    def snapshot(self) -> dict:
        drives = []
        for d in self.drives:
            drives.append({k: (bytes(v) if isinstance(v, (bytes, bytearray)) else
                               (list(v) if isinstance(v, tuple) else int(v)))
                           for k, v in vars(d).items() if k not in ("disk", "slave", "serial", "sectors")})
        return {"sel": self.sel, "ctl": int(self.ctl), "drives": drives}

    def restore(self, state: dict) -> None:
        self.sel = state["sel"]
        self.ctl = state["ctl"]
        for d, s in zip(self.drives, state["drives"]):
            for k, v in s.items():
                if k == "cur":
                    v = tuple(v)
                elif k == "out":
                    v = bytearray(v)
                elif k in ("status", "error"):
                    v = Status(v) if k == "status" else v
                setattr(d, k, v)
        self._update_irq()


class _ControlPort:
    """The control block port: alternate status (read), device control (write)."""

    def __init__(self, channel: IDEChannel) -> None:
        self._ch = channel

    def read(self, offset: int, size: int) -> int:
        v = self._ch.alt_status()
        return v | (v << 8) if size == 2 else v

    def write(self, offset: int, size: int, value: int) -> None:
        self._ch.write_control(value & 0xFF)
