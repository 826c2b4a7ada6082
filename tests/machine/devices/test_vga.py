"""VGA text mode: register read-back, address select, attribute flip-flop, retrace, the screen log."""
from __future__ import annotations

from vmk.machine.clock import Clock
from vmk.machine.devices.vga import COLS, TEXT_WINDOW, VGA, VGA_PORT_BASE, Port, ScreenLog


def make() -> tuple[VGA, bytearray, Clock]:
    mem = bytearray(TEXT_WINDOW)
    clock = Clock()
    vga = VGA(clock, lambda off, n: bytes(mem[off:off + n]))
    return vga, mem, clock


def outb(vga: VGA, port: int, v: int) -> None:
    vga.write(port - VGA_PORT_BASE, 1, v)


def inb(vga: VGA, port: int) -> int:
    return vga.read(port - VGA_PORT_BASE, 1)


def put(mem: bytearray, row: int, text: str) -> None:
    for i, c in enumerate(text):
        mem[2 * (row * COLS + i)] = ord(c)
        mem[2 * (row * COLS + i) + 1] = 0x07


def cursor(vga: VGA, pos: int) -> None:
    vga.write(Port.CRTC_INDEX - VGA_PORT_BASE, 2, 0x0E | (pos >> 8) << 8)     # outw: index, then data
    vga.write(Port.CRTC_INDEX - VGA_PORT_BASE, 2, 0x0F | (pos & 0xFF) << 8)


def test_crtc_reads_back_and_cr11_protects_cr0_to_cr7() -> None:
    vga, _, _ = make()
    for reg, val in ((0x0A, 0x0D), (0x0B, 0x0E), (0x0C, 0x12), (0x0D, 0x34), (0x0E, 0x01), (0x0F, 0x23)):
        outb(vga, Port.CRTC_INDEX, reg)
        outb(vga, Port.CRTC_DATA, val)
        assert inb(vga, Port.CRTC_DATA) == val and inb(vga, Port.CRTC_INDEX) == reg
    assert vga.crtc[0x11] & 0x80                           # mode 3 leaves CR0-7 protected
    outb(vga, Port.CRTC_INDEX, 0x01)
    outb(vga, Port.CRTC_DATA, 0x99)
    assert inb(vga, Port.CRTC_DATA) == 0x4F
    outb(vga, Port.CRTC_INDEX, 0x07)
    outb(vga, Port.CRTC_DATA, 0x00)
    assert inb(vga, Port.CRTC_DATA) == 0x1F & ~0x10       # only bit 4 is writable


def test_misc_output_selects_the_mono_or_colour_ports() -> None:
    vga, _, _ = make()
    assert inb(vga, Port.MISC_READ) == 0x67
    assert inb(vga, Port.CRTC_DATA_MONO) == 0xFF
    outb(vga, Port.CRTC_INDEX_MONO, 0x0F)                  # ignored while colour
    outb(vga, Port.MISC_WRITE, 0x66)
    outb(vga, Port.CRTC_INDEX_MONO, 0x0F)
    outb(vga, Port.CRTC_DATA_MONO, 0x45)
    assert inb(vga, Port.CRTC_DATA) == 0xFF and inb(vga, Port.ISR1) == 0xFF
    outb(vga, Port.MISC_WRITE, 0x67)
    outb(vga, Port.CRTC_INDEX, 0x0F)
    assert inb(vga, Port.CRTC_DATA) == 0x45


def test_attribute_flip_flop_is_reset_by_input_status_1() -> None:
    vga, _, _ = make()
    inb(vga, Port.ISR1)
    outb(vga, Port.ATTR_INDEX, 0x32)
    outb(vga, Port.ATTR_INDEX, 0x0A)                       # data
    outb(vga, Port.ATTR_INDEX, 0x31)                       # index again
    assert inb(vga, Port.ATTR_INDEX) == 0x31
    inb(vga, Port.ISR1)
    outb(vga, Port.ATTR_INDEX, 0x32)
    assert inb(vga, Port.ATTR_DATA) == 0x0A
    outb(vga, Port.ATTR_INDEX, 0x0B)                       # the flip-flop is in the data state
    inb(vga, Port.ISR1)
    outb(vga, Port.ATTR_INDEX, 0x32)
    assert inb(vga, Port.ATTR_DATA) == 0x0B


def test_vertical_retrace_follows_virtual_time() -> None:
    vga, _, clock = make()
    assert not inb(vga, Port.ISR1) & 0x08                   # t=0: first visible line
    clock.advance_to(412 * 900 * 10**9 // 28_322_000 + 100)
    assert inb(vga, Port.ISR1) & 0x09 == 0x09               # line 412: retrace, display disabled
    clock.advance_to(415 * 900 * 10**9 // 28_322_000)
    assert inb(vga, Port.ISR1) & 0x09 == 0x01


def test_text_rows_use_the_start_address() -> None:
    vga, mem, _ = make()
    put(mem, 0, "top")
    put(mem, 1, "second")
    assert vga.text_rows()[:2] == ["top", "second"]
    outb(vga, Port.CRTC_INDEX, 0x0D)
    outb(vga, Port.CRTC_DATA, COLS)                        # start one row down
    assert vga.text_rows()[0] == "second"


def test_screen_log_lines_once_across_scrolls_and_clears() -> None:
    vga, mem, _ = make()
    out: list[str] = []
    log = ScreenLog(vga, out.append)
    vga.on_cursor = log.update
    cursor(vga, 5 * COLS)                                  # a blank screen: nothing
    assert out == []
    put(mem, 0, "one")
    cursor(vga, 3)
    put(mem, 1, "two")
    cursor(vga, COLS + 3)
    cursor(vga, 2 * COLS)
    assert "".join(out) == "one\ntwo\n"
    # scroll up by one row, as xv6's console does
    mem[:] = mem[2 * COLS:] + bytes(2 * COLS)
    put(mem, 1, "three")
    cursor(vga, 2 * COLS)
    assert "".join(out) == "one\ntwo\nthree\n"
    # clear the screen, write again at the top
    mem[:] = bytes(len(mem))
    put(mem, 0, "$ ")
    cursor(vga, 2)
    log.finish()
    assert "".join(out) == "one\ntwo\nthree\n$\n"


def test_screen_log_without_cursor_moves_shows_the_last_screen() -> None:
    vga, mem, _ = make()
    out: list[str] = []
    log = ScreenLog(vga, out.append)
    vga.on_cursor = log.update
    put(mem, 0, "hello")
    put(mem, 2, "world")
    log.finish()
    assert "".join(out) == "hello\n\nworld\n"
