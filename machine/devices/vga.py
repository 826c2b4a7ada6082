"""VGA registers for text mode (ports 0x3B4-0x3BA, 0x3C0-0x3CF, 0x3D4-0x3DA) and the text screen at 0xB8000.

Register set from the IBM VGA Technical Reference (the "Registers" chapter:
general registers, sequencer, CRT controller, graphics controller, attribute
controller, DAC); reset values are BIOS mode 3 (80x25 colour text), the state
SeaBIOS leaves a QEMU guest in.

How it works
------------

vmk does not draw: the text buffer 0xB8000-0xBFFFF is ordinary guest RAM
(machine/memory.py maps RAM from physical 0 up, and nothing claims
0xA0000-0xBFFFF), so guest stores to it cost nothing.  The device keeps the
registers and reads the buffer only when asked: :meth:`VGA.text_rows` renders
the 80x25 screen from the CRTC start address (0x0C/0x0D), :meth:`VGA.cursor`
gives the cursor (0x0E/0x0F) relative to it.  A write to CRTC 0x0F (cursor
location low, the byte xv6, Linux's vgacon and the BIOS write last) calls
``on_cursor``: :class:`ScreenLog` uses that to print each line of the screen
once, when the cursor has left it (``vmk boot --vga FILE|-``).

* CRT controller: index at 0x3x4, data at 0x3x5; 256 data registers kept as
  written (the VGA has 0x00-0x18; QEMU keeps the others too), except that
  CR11 bit 7 write-protects CR00-CR07 (all but CR07 bit 4).  The index reads
  back as written.
* Miscellaneous output: written at 0x3C2, read at 0x3CC.  Bit 0 (I/O address
  select) chooses 0x3Dx (1, colour) or 0x3Bx (0, mono) for the CRTC, input
  status 1 and feature control; the other range reads 0xFF and ignores
  writes, as QEMU decodes it.
* Input status 1 (0x3xA): bit 3 vertical retrace, bit 0 display disabled
  (retrace or blanking), a function of virtual time with the fixed mode 3
  timing (28.322 MHz dot clock, 900 dots x 449 lines, 70.1 Hz; retrace on
  lines 412-413), not of the CRTC timing registers.  Reading it puts the
  attribute controller's flip-flop in the index state.
* Attribute controller (0x3C0 write: index, then data, alternately; 0x3C1
  read: data): 21 registers; reading 0x3C0 returns the index with PAS (bit 5)
  in either state (QEMU returns 0 in the data state).
* Sequencer (0x3C4/0x3C5, 8 index values), graphics controller
  (0x3CE/0x3CF, 16), DAC (0x3C6 mask, 0x3C7 read index / state, 0x3C8 write
  index, 0x3C9 data, three 6-bit components per entry): stored and read
  back; feature control (0x3xA write, 0x3CA read) stored.

Not modelled: graphics modes and the planar memory at 0xA0000 (it is plain
RAM), a display, fonts, the cursor shape and blinking (CR0A/CR0B are only
stored), timing from the CRTC registers, the VESA/Bochs extensions (0x1CE),
the PCI function.
"""
from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Callable

from vmk.machine.clock import NS_PER_SEC, Clock
from vmk.machine.devices import Log, nolog

__all__ = ["VGA", "ScreenLog", "Port", "Crtc", "Isr1", "VGA_PORT_BASE", "VGA_PORT_COUNT", "TEXT_BASE", "TEXT_WINDOW",
           "COLS", "ROWS"]

VGA_PORT_BASE = 0x3B0
VGA_PORT_COUNT = 0x30             # 0x3B0-0x3DF
TEXT_BASE = 0xB8000               # colour text buffer (32 KiB window)
TEXT_WINDOW = 0x8000
COLS, ROWS = 80, 25


class Port(IntEnum):
    """I/O ports (IBM VGA Technical Reference, "Register summary")."""
    CRTC_INDEX_MONO = 0x3B4
    CRTC_DATA_MONO = 0x3B5
    ISR1_MONO = 0x3BA             # read: input status 1; write: feature control
    ATTR_INDEX = 0x3C0            # write: index / data (flip-flop); read: index
    ATTR_DATA = 0x3C1             # read: data
    MISC_WRITE = 0x3C2            # write: misc output; read: input status 0
    VIDEO_ENABLE = 0x3C3
    SEQ_INDEX = 0x3C4
    SEQ_DATA = 0x3C5
    DAC_MASK = 0x3C6
    DAC_READ_INDEX = 0x3C7        # write: read index; read: DAC state
    DAC_WRITE_INDEX = 0x3C8
    DAC_DATA = 0x3C9
    FEATURE_READ = 0x3CA
    MISC_READ = 0x3CC
    GC_INDEX = 0x3CE
    GC_DATA = 0x3CF
    CRTC_INDEX = 0x3D4
    CRTC_DATA = 0x3D5
    ISR1 = 0x3DA


class Crtc(IntEnum):
    """CRT controller registers used here."""
    OVERFLOW = 0x07
    CURSOR_START = 0x0A
    CURSOR_END = 0x0B
    START_HIGH = 0x0C
    START_LOW = 0x0D
    CURSOR_HIGH = 0x0E
    CURSOR_LOW = 0x0F
    VRETRACE_END = 0x11


class Isr1(IntFlag):
    """Input status register 1."""
    DISPLAY_DISABLED = 0x01
    VRETRACE = 0x08


MISC_IOAS = 0x01                 # misc output bit 0: I/O address select (1 = 0x3Dx)
CR11_PROTECT = 0x80              # CR11 bit 7: CR00-CR07 write protect
CR07_LINE_COMPARE8 = 0x10        # CR07 bit 4 stays writable
AR_PAS = 0x20                    # attribute index bit 5: palette address source
AR_COUNT = 0x15
FLOATING = 0xFF

# BIOS mode 3 (80x25 text, 720x400) register values (IBM VGA Technical Reference, BIOS mode tables).
MODE3_MISC = 0x67
MODE3_SEQ = (0x03, 0x00, 0x03, 0x00, 0x02)
MODE3_CRTC = (0x5F, 0x4F, 0x50, 0x82, 0x55, 0x81, 0xBF, 0x1F, 0x00, 0x4F, 0x0D, 0x0E, 0x00, 0x00, 0x00, 0x00,
              0x9C, 0x8E, 0x8F, 0x28, 0x1F, 0x96, 0xB9, 0xA3, 0xFF)
MODE3_GC = (0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x0E, 0x00, 0xFF)
MODE3_ATTR = (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x14, 0x07, 0x38, 0x39, 0x3A, 0x3B, 0x3C, 0x3D, 0x3E, 0x3F,
              0x0C, 0x00, 0x0F, 0x08, 0x00)

# Mode 3 timing: 28.322 MHz dot clock, 900 dots per line (720 shown), 449 lines (400 shown).
DOT_HZ = 28_322_000
LINE_DOTS, SHOWN_DOTS = 900, 720
FRAME_LINES, SHOWN_LINES = 449, 400
VRETRACE_LINES = (412, 414)


class VGA:
    """The VGA register file in text mode; the port window is 0x3B0-0x3DF (offset = port - 0x3B0)."""

    def __init__(self, clock: Clock, vram: Callable[[int, int], bytes] | None, log: Log = nolog) -> None:
        """``vram(offset, n)``: ``n`` bytes of guest RAM at 0xB8000 + ``offset`` (within the 32 KiB
        window), or None when RAM ends below 0xC0000."""
        self.clock = clock
        self.vram = vram
        self.log = log
        self.on_cursor: Callable[[], None] | None = None
        self.reset()

    def reset(self) -> None:
        self.misc = MODE3_MISC
        self.feature = 0
        self.video_enable = 1
        self.crtc_index = 0
        self.crtc = bytearray(256)
        self.crtc[:len(MODE3_CRTC)] = bytes(MODE3_CRTC)
        self.seq_index = 0
        self.seq = bytearray(8)
        self.seq[:len(MODE3_SEQ)] = bytes(MODE3_SEQ)
        self.gc_index = 0
        self.gc = bytearray(16)
        self.gc[:len(MODE3_GC)] = bytes(MODE3_GC)
        self.attr_index = AR_PAS
        self.attr_data_next = False          # the flip-flop: False = next 0x3C0 write is an index
        self.attr = bytearray(MODE3_ATTR)
        self.dac_mask = 0xFF
        self.dac_read = 0                    # entry * 3 + component
        self.dac_write = 0
        self.dac_reading = False
        self.dac = bytearray(256 * 3)

    # ------------------------------------------------------------ decoding
    def _port(self, offset: int) -> int | None:
        """The canonical (colour) port for ``offset``, or None if the address select disables it."""
        port = VGA_PORT_BASE + offset
        colour = bool(self.misc & MISC_IOAS)
        if 0x3B0 <= port <= 0x3BF:
            return None if colour else port + 0x20
        if 0x3D0 <= port <= 0x3DF:
            return port if colour else None
        return port

    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):                 # outw 0x3D4: index then data, as a 16-bit ISA write does
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, offset: int) -> int:
        port = self._port(offset)
        if port == Port.CRTC_INDEX:
            return self.crtc_index
        if port == Port.CRTC_DATA:
            return self.crtc[self.crtc_index]
        if port == Port.ISR1:
            self.attr_data_next = False
            return self.input_status1()
        if port == Port.ATTR_INDEX:
            return self.attr_index
        if port == Port.ATTR_DATA:
            i = self.attr_index & 0x1F
            return self.attr[i] if i < AR_COUNT else 0
        if port == Port.MISC_WRITE:
            return 0                          # input status 0
        if port == Port.VIDEO_ENABLE:
            return self.video_enable
        if port == Port.SEQ_INDEX:
            return self.seq_index
        if port == Port.SEQ_DATA:
            return self.seq[self.seq_index]
        if port == Port.DAC_MASK:
            return self.dac_mask
        if port == Port.DAC_READ_INDEX:
            return 0x03 if self.dac_reading else 0x00
        if port == Port.DAC_WRITE_INDEX:
            return self.dac_write // 3
        if port == Port.DAC_DATA:
            v = self.dac[self.dac_read]
            self.dac_read = (self.dac_read + 1) % len(self.dac)
            return v
        if port == Port.FEATURE_READ:
            return self.feature
        if port == Port.MISC_READ:
            return self.misc
        if port == Port.GC_INDEX:
            return self.gc_index
        if port == Port.GC_DATA:
            return self.gc[self.gc_index]
        return FLOATING

    def _write_byte(self, offset: int, val: int) -> None:
        port = self._port(offset)
        if port == Port.CRTC_INDEX:
            self.crtc_index = val
        elif port == Port.CRTC_DATA:
            self._crtc_write(val)
        elif port == Port.ISR1:
            self.feature = val
        elif port == Port.ATTR_INDEX:
            if self.attr_data_next:
                i = self.attr_index & 0x1F
                if i < AR_COUNT:
                    self.attr[i] = val
            else:
                self.attr_index = val & 0x3F
            self.attr_data_next = not self.attr_data_next
        elif port == Port.MISC_WRITE:
            self.misc = val
        elif port == Port.VIDEO_ENABLE:
            self.video_enable = val & 1
        elif port == Port.SEQ_INDEX:
            self.seq_index = val & 0x07
        elif port == Port.SEQ_DATA:
            self.seq[self.seq_index] = val
        elif port == Port.DAC_MASK:
            self.dac_mask = val
        elif port == Port.DAC_READ_INDEX:
            self.dac_read = val * 3
            self.dac_reading = True
        elif port == Port.DAC_WRITE_INDEX:
            self.dac_write = val * 3
            self.dac_reading = False
        elif port == Port.DAC_DATA:
            self.dac[self.dac_write] = val & 0x3F
            self.dac_write = (self.dac_write + 1) % len(self.dac)
        elif port == Port.GC_INDEX:
            self.gc_index = val & 0x0F
        elif port == Port.GC_DATA:
            self.gc[self.gc_index] = val

    def _crtc_write(self, val: int) -> None:
        i = self.crtc_index
        if i <= Crtc.OVERFLOW and self.crtc[Crtc.VRETRACE_END] & CR11_PROTECT:
            if i == Crtc.OVERFLOW:
                self.crtc[i] = (self.crtc[i] & ~CR07_LINE_COMPARE8) | (val & CR07_LINE_COMPARE8)
            return
        self.crtc[i] = val
        if i == Crtc.CURSOR_LOW and self.on_cursor is not None:
            self.on_cursor()

    def input_status1(self) -> int:
        dot = self.clock.now * DOT_HZ // NS_PER_SEC % (LINE_DOTS * FRAME_LINES)
        line, col = divmod(dot, LINE_DOTS)
        v = 0
        if line >= SHOWN_LINES or col >= SHOWN_DOTS:
            v |= Isr1.DISPLAY_DISABLED
        if VRETRACE_LINES[0] <= line < VRETRACE_LINES[1]:
            v |= Isr1.VRETRACE
        return int(v)

    # ------------------------------------------------------------ the text screen
    @property
    def start(self) -> int:
        return (self.crtc[Crtc.START_HIGH] << 8) | self.crtc[Crtc.START_LOW]

    def cursor(self) -> tuple[int, int]:
        """(row, column) of the cursor on the screen (may be off screen)."""
        pos = ((self.crtc[Crtc.CURSOR_HIGH] << 8) | self.crtc[Crtc.CURSOR_LOW]) - self.start
        return divmod(pos, COLS)

    def text_rows(self) -> list[str]:
        """The 25 rows of the text screen, characters only (code page 437), trailing blanks removed."""
        if self.vram is None:
            return [""] * ROWS
        off = (self.start * 2) % TEXT_WINDOW
        n = COLS * ROWS * 2
        first = min(n, TEXT_WINDOW - off)
        raw = self.vram(off, first)
        if first < n:
            raw += self.vram(0, n - first)                  # the 32 KiB window wraps
        chars = raw[0::2].replace(b"\0", b" ")
        text = chars.decode("cp437")
        return [text[r * COLS:(r + 1) * COLS].rstrip() for r in range(ROWS)]

    # ------------------------------------------------------------ snapshots
    def snapshot(self) -> dict:
        return {k: (bytes(v) if isinstance(v, bytearray) else v) for k, v in vars(self).items()
                if k not in ("clock", "vram", "log", "on_cursor")}

    def restore(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, bytearray(v) if isinstance(v, bytes) else v)


class ScreenLog:
    """Prints the text screen as a stream of lines, each once, as a serial console would show them.

    A line is complete when the cursor has moved below it; :meth:`update`
    (called on cursor moves) writes the rows that became complete since the
    last call, recognising a scroll by matching the rows already written
    against the new screen shifted up by k rows (the smallest k that fits;
    a cleared screen matches with every old row gone).  :meth:`finish` also
    writes the cursor's own row if it holds text (a prompt), and every row
    down to the last one with text (a guest that never moves the cursor).  Blank rows
    before the first text are not written (a blank screen with the cursor
    somewhere is not output)."""

    def __init__(self, vga: VGA, out: Callable[[str], None]) -> None:
        self.vga = vga
        self.out = out
        self._done: list[str] = []          # the complete rows already written, top to bottom
        self._started = False               # blank rows before the first text are not written

    def update(self) -> None:
        rows = self.vga.text_rows()
        row, _ = self.vga.cursor()
        row = max(0, min(row, ROWS))
        self._emit(rows, row)

    def finish(self) -> None:
        rows = self.vga.text_rows()
        row, _ = self.vga.cursor()
        row = max(0, min(row, ROWS - 1))
        last = max((i + 1 for i, r in enumerate(rows) if r), default=0)   # text below the cursor too
        self._emit(rows, max(row + 1 if rows[row] else row, last))

    def _emit(self, rows: list[str], complete: int) -> None:
        done = self._done
        n = len(done)
        shift = n
        for k in range(n + 1):              # smallest scroll that keeps the written rows in place
            if rows[:n - k] == done[k:]:
                shift = k
                break
        kept = n - shift
        new = rows[kept:complete]
        if not self._started:
            while new and not new[0]:
                new = new[1:]
            self._started = bool(new)
        if new:
            self.out("".join(r + "\n" for r in new))
        self._done = rows[:max(complete, kept)]
