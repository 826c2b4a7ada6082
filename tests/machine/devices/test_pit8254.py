"""Tests for the 8254 PIT and port 0x61, on a virtual clock (no Unicorn).

PIT clock edge T happens at ns ceil(T * 1e9 / 1193182); ``edge_ns`` below is
that formula written out again, and a few times are also spelled as literals.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from vmk.machine.clock import Clock
from vmk.machine.devices.pit8254 import PIT8254, SystemControlPortB
from vmk.machine.irq import IrqLine

F = 1_193_182

# Port offsets and control words used below (82C54 control word: SC RW M BCD).
CH0, CH1, CH2, CTRL = 0, 1, 2, 3
CW_CH0_LSB_MODE0 = 0x10
CW_CH0_LOHI_MODE0 = 0x30
CW_CH0_LOHI_MODE2 = 0x34
CW_CH0_LOHI_MODE3 = 0x36
CW_CH0_LOHI_MODE4 = 0x38
CW_CH0_LOHI_MODE2_BCD = 0x35
CW_CH0_LATCH = 0x00
CW_CH1_LSB_MODE0 = 0x50
CW_CH1_MSB_MODE2 = 0x64
CW_CH1_LOHI_MODE2 = 0x74
CW_CH1_LOHI_MODE3 = 0x76
CW_CH1_LOHI_MODE0_BCD = 0x71
CW_CH1_LOHI_MODE6 = 0x7C        # mode 6 == mode 2, status shows 110
CW_CH1_LATCH = 0x40
CW_CH2_LOHI_MODE0 = 0xB0
CW_CH2_LOHI_MODE1 = 0xB2
CW_CH2_LOHI_MODE2 = 0xB4
CW_CH2_LOHI_MODE5 = 0xBA
READ_BACK = 0xC0
RB_NO_STATUS = 0x10
RB_NO_COUNT = 0x20
RB_CNT0, RB_CNT1, RB_CNT2 = 0x02, 0x04, 0x08

PORTB_GATE2 = 0x01
PORTB_SPEAKER = 0x02
PORTB_REFRESH = 0x10
PORTB_OUT2 = 0x20


def ticks(ns: int) -> int:
    return ns * F // 1_000_000_000


def edge_ns(tick: int) -> int:
    """First ns at which the PIT clock has made ``tick`` edges."""
    return -(-tick * 1_000_000_000 // F)


@dataclass
class Rig:
    clock: Clock
    irq: IrqLine
    pit: PIT8254
    portb: SystemControlPortB
    edges: list[tuple[int, bool]] = field(default_factory=list)

    def run_until(self, t: int) -> None:
        """Advance virtual time to ``t``, firing every timer at its own deadline."""
        while (d := self.clock.next_deadline()) is not None and d <= t:
            self.clock.advance_to(d)
            self.clock.run_due()
        self.clock.advance_to(t)
        self.clock.run_due()

    def at_tick(self, tick: int) -> None:
        self.run_until(edge_ns(tick))

    def tick(self) -> int:
        return ticks(self.clock.now)

    def out(self, ctrl: int, *data: int, ch: int = CH0) -> None:
        self.pit.write(CTRL, 1, ctrl)
        for byte in data:
            self.pit.write(ch, 1, byte)

    def count(self, ch: int) -> int:
        """Read a LOHI counter: LSB then MSB."""
        lo = self.pit.read(ch, 1)
        hi = self.pit.read(ch, 1)
        return lo | hi << 8

    def port61(self) -> int:
        return self.portb.read(0, 1)


def make_rig(start_ns: int = 0) -> Rig:
    clock = Clock()
    clock.advance_to(start_ns)
    irq = IrqLine("irq0")
    pit = PIT8254(clock, irq)
    rig = Rig(clock, irq, pit, SystemControlPortB(pit))
    irq.connect(lambda level: rig.edges.append((clock.now, level)))
    return rig


def rising(edges: list[tuple[int, bool]]) -> list[int]:
    return [t for t, level in edges if level]


def falling(edges: list[tuple[int, bool]]) -> list[int]:
    return [t for t, level in edges if not level]


# -- tick conversion ------------------------------------------------------------------------------

def test_edge_time_literals() -> None:
    # 1193 clocks = 999847.46 ns: the edge is at the next whole ns, never before.
    assert edge_ns(1193) == 999_848
    assert ticks(999_848) == 1193 and ticks(999_847) == 1192


# -- mode 2: rate generator --------------------------------------------------------------------

def test_mode2_irq_edges_at_exact_times() -> None:
    rig = make_rig(start_ns=1000)            # tick 1: the counter is loaded at tick 1
    rig.out(CW_CH0_LOHI_MODE2, 1193 & 0xFF, 1193 >> 8)
    assert rig.irq.level is True             # mode 2: OUT high while counting
    rig.edges.clear()
    rig.run_until(5_500_000)
    load = 1
    assert rising(rig.edges) == [edge_ns(load + k * 1193) for k in range(1, 6)]
    assert rising(rig.edges)[:2] == [1_000_686, 2_000_534]
    # OUT is low for exactly one clock: while the count is 1.
    assert falling(rig.edges) == [edge_ns(load + k * 1193 - 1) for k in range(1, 6)]
    assert falling(rig.edges)[0] == 999_848
    # The timer is armed for the next change only (the next falling edge).
    assert rig.clock.next_deadline() == edge_ns(load + 6 * 1193 - 1)


def test_mode2_count_sequence_and_timer_only_when_out_changes() -> None:
    rig = make_rig()
    rig.out(CW_CH0_LOHI_MODE2, 4, 0)
    assert rig.count(CH0) == 4
    seen = []
    for tick in range(1, 9):
        rig.at_tick(tick)
        seen.append((rig.count(CH0), rig.irq.level))
    assert seen == [(3, True), (2, True), (1, False), (4, True),
                    (3, True), (2, True), (1, False), (4, True)]


def test_mode2_new_count_loads_at_end_of_period() -> None:
    rig = make_rig()
    rig.out(CW_CH0_LOHI_MODE2, 100, 0)
    rig.at_tick(30)
    rig.edges.clear()
    rig.pit.write(CH0, 1, 50)
    rig.pit.write(CH0, 1, 0)
    # The running period is not disturbed: count continues from 70.
    assert rig.count(CH0) == 70
    rig.at_tick(260)
    assert rising(rig.edges) == [edge_ns(100), edge_ns(150), edge_ns(200), edge_ns(250)]
    assert falling(rig.edges) == [edge_ns(99), edge_ns(149), edge_ns(199), edge_ns(249)]


def test_mode2_gate_low_holds_count_and_forces_out_high() -> None:
    rig = make_rig()
    rig.portb.write(0, 1, PORTB_GATE2)
    rig.out(CW_CH2_LOHI_MODE2, 100, 0, ch=CH2)
    rig.at_tick(99)
    assert not rig.port61() & PORTB_OUT2            # count 1: OUT low
    rig.portb.write(0, 1, 0)                        # GATE low: OUT high at once, count held
    assert rig.port61() & PORTB_OUT2
    rig.at_tick(500)
    assert rig.count(CH2) == 1
    assert rig.port61() & PORTB_OUT2
    rig.portb.write(0, 1, PORTB_GATE2)              # rising edge reloads the count
    assert rig.count(CH2) == 100
    rig.at_tick(500 + 98)
    assert rig.port61() & PORTB_OUT2
    rig.at_tick(500 + 99)
    assert not rig.port61() & PORTB_OUT2


# -- mode 3: square wave ---------------------------------------------------------------------

def test_mode3_even_square_wave() -> None:
    rig = make_rig()
    rig.out(CW_CH0_LOHI_MODE3, 1000 & 0xFF, 1000 >> 8)
    rig.edges.clear()
    rig.at_tick(3000)
    assert falling(rig.edges) == [edge_ns(500), edge_ns(1500), edge_ns(2500)]
    assert rising(rig.edges) == [edge_ns(1000), edge_ns(2000), edge_ns(3000)]


def test_mode3_odd_count_high_half_is_longer() -> None:
    rig = make_rig()
    rig.out(CW_CH0_LOHI_MODE3, 5, 0)
    rig.edges.clear()
    rig.at_tick(10)
    assert rig.edges == [(edge_ns(3), False), (edge_ns(5), True), (edge_ns(8), False), (edge_ns(10), True)]


def test_mode3_counts_down_by_two_per_datasheet() -> None:
    rig = make_rig()
    rig.out(CW_CH1_LOHI_MODE3, 6, 0, ch=CH1)
    even = []
    for tick in range(7):
        rig.at_tick(tick)
        even.append(rig.count(CH1))
    assert even == [6, 4, 2, 6, 4, 2, 6]
    start = rig.tick()
    rig.out(CW_CH1_LOHI_MODE3, 5, 0, ch=CH1)
    odd = []
    for tick in range(start, start + 6):
        rig.at_tick(tick)
        rig.pit.write(CTRL, 1, READ_BACK | RB_NO_COUNT | RB_CNT1)
        out = bool(rig.pit.read(CH1, 1) & 0x80)
        odd.append((rig.count(CH1), out))
    # High half: 5, 4, 2; low half: 5, 2; then again.
    assert odd == [(5, True), (4, True), (2, True), (5, False), (2, False), (5, True)]


def test_mode3_new_count_loads_at_end_of_half_cycle() -> None:
    rig = make_rig()
    rig.out(CW_CH0_LOHI_MODE3, 100, 0)
    rig.at_tick(10)
    rig.edges.clear()
    rig.pit.write(CH0, 1, 40)
    rig.pit.write(CH0, 1, 0)
    rig.at_tick(200)
    # The high half of the old count ends at 50; then the new count's low half (20),
    # then its periods of 40.
    assert rig.edges == [(edge_ns(50), False), (edge_ns(70), True), (edge_ns(90), False),
                         (edge_ns(110), True), (edge_ns(130), False), (edge_ns(150), True),
                         (edge_ns(170), False), (edge_ns(190), True)]


# -- mode 0: interrupt on terminal count ------------------------------------------------------

def test_mode0_one_shot() -> None:
    rig = make_rig(start_ns=10_000)          # tick 11
    rig.edges.clear()
    rig.pit.write(CTRL, 1, CW_CH0_LOHI_MODE0)
    assert rig.edges == [(10_000, False)]    # control word: OUT low at once
    rig.pit.write(CH0, 1, 100)
    rig.pit.write(CH0, 1, 0)
    rig.run_until(1_000_000)
    assert rig.edges == [(10_000, False), (edge_ns(11 + 100), True)]
    assert rig.clock.next_deadline() is None        # OUT stays high: nothing armed
    assert rig.irq.level is True
    rig.run_until(100_000_000)
    assert len(rig.edges) == 2
    # The counter wraps and keeps counting after the terminal count.
    assert rig.count(CH0) == (100 - (ticks(100_000_000) - 11)) % 65536


def test_mode0_first_byte_stops_counting_and_drops_out() -> None:
    rig = make_rig()
    rig.out(CW_CH0_LOHI_MODE0, 10, 0)
    rig.at_tick(20)
    assert rig.irq.level is True
    rig.edges.clear()
    rig.pit.write(CH0, 1, 5)                        # LSB only
    assert rig.edges == [(rig.clock.now, False)]
    assert rig.clock.next_deadline() is None
    frozen = rig.count(CH0)
    rig.at_tick(40)
    assert rig.count(CH0) == frozen
    rig.pit.write(CH0, 1, 0)                        # MSB: count 5 starts now
    rig.at_tick(50)
    assert rig.edges[1:] == [(edge_ns(45), True)]


def test_mode0_gate_low_suspends_counting() -> None:
    rig = make_rig()
    rig.out(CW_CH2_LOHI_MODE0, 100, 0, ch=CH2)   # GATE 2 is low after reset
    rig.at_tick(50)
    assert rig.count(CH2) == 100
    rig.portb.write(0, 1, PORTB_GATE2)
    rig.at_tick(80)
    assert rig.count(CH2) == 70
    rig.portb.write(0, 1, 0)
    rig.at_tick(500)
    assert rig.count(CH2) == 70
    assert not rig.port61() & PORTB_OUT2
    rig.portb.write(0, 1, PORTB_GATE2)
    rig.at_tick(569)
    assert not rig.port61() & PORTB_OUT2
    rig.at_tick(570)
    assert rig.port61() & PORTB_OUT2


# -- modes 1 and 5: triggered by GATE 2 through port 0x61 -------------------------------------

def test_mode1_one_shot_triggered_by_gate2() -> None:
    rig = make_rig()
    rig.out(CW_CH2_LOHI_MODE1, 50, 0, ch=CH2)
    assert rig.port61() & PORTB_OUT2
    rig.at_tick(100)
    assert rig.port61() & PORTB_OUT2                # no trigger yet
    rig.portb.write(0, 1, PORTB_GATE2)              # trigger at tick 100
    assert not rig.port61() & PORTB_OUT2
    rig.run_until(edge_ns(150) - 1)
    assert not rig.port61() & PORTB_OUT2
    rig.at_tick(150)
    assert rig.port61() & PORTB_OUT2
    # Retrigger in the middle of a pulse restarts the full count.
    rig.portb.write(0, 1, 0)
    rig.at_tick(200)
    rig.portb.write(0, 1, PORTB_GATE2)
    rig.at_tick(230)
    rig.portb.write(0, 1, 0)
    rig.portb.write(0, 1, PORTB_GATE2)              # retrigger at 230: high at 280, not 250
    rig.at_tick(279)
    assert not rig.port61() & PORTB_OUT2
    rig.at_tick(280)
    assert rig.port61() & PORTB_OUT2


def test_mode1_new_count_waits_for_next_trigger() -> None:
    rig = make_rig()
    rig.out(CW_CH2_LOHI_MODE1, 50, 0, ch=CH2)
    rig.portb.write(0, 1, PORTB_GATE2)
    rig.at_tick(10)
    rig.pit.write(CH2, 1, 5)
    rig.pit.write(CH2, 1, 0)
    assert rig.count(CH2) == 40
    rig.at_tick(49)
    assert not rig.port61() & PORTB_OUT2
    rig.at_tick(50)
    assert rig.port61() & PORTB_OUT2
    rig.portb.write(0, 1, 0)
    rig.portb.write(0, 1, PORTB_GATE2)
    assert rig.count(CH2) == 5


def test_mode5_strobe_triggered_by_gate2() -> None:
    rig = make_rig()
    rig.out(CW_CH2_LOHI_MODE5, 10, 0, ch=CH2)
    rig.at_tick(30)
    assert rig.port61() & PORTB_OUT2
    rig.portb.write(0, 1, PORTB_GATE2)
    levels = []
    for tick in range(30, 45):
        rig.at_tick(tick)
        levels.append(bool(rig.port61() & PORTB_OUT2))
    assert levels == [True] * 10 + [False] + [True] * 4


# -- mode 4: software triggered strobe --------------------------------------------------------

def test_mode4_strobe_on_irq0() -> None:
    rig = make_rig()
    rig.out(CW_CH0_LOHI_MODE4, 20, 0)
    rig.edges.clear()
    rig.run_until(10_000_000)
    assert rig.edges == [(edge_ns(20), False), (edge_ns(21), True)]
    assert rig.clock.next_deadline() is None


# -- access modes and latches -----------------------------------------------------------------

def test_lsb_only_and_msb_only_access() -> None:
    rig = make_rig()
    rig.out(CW_CH1_LSB_MODE0, 0x40, ch=CH1)
    assert rig.pit.read(CH1, 1) == 0x40
    assert rig.pit.read(CH1, 1) == 0x40              # no flip-flop: always the LSB
    rig.at_tick(0x10)
    assert rig.pit.read(CH1, 1) == 0x30
    rig.out(CW_CH1_MSB_MODE2, 0x12, ch=CH1)          # count 0x1200
    rig.at_tick(0x10 + 0x100)
    assert rig.pit.read(CH1, 1) == 0x11
    assert rig.pit.read(CH1, 1) == 0x11


def test_lohi_flip_flops() -> None:
    rig = make_rig()
    rig.out(CW_CH1_LOHI_MODE2, 0x34, 0x12, ch=CH1)
    assert rig.pit.read(CH1, 1) == 0x34
    # Reads and writes have separate flip-flops (datasheet): interleaving is allowed.
    rig.pit.write(CH1, 1, 0x78)
    assert rig.pit.read(CH1, 1) == 0x12
    rig.pit.write(CH1, 1, 0x56)
    rig.at_tick(0x1234)                              # the old period ends: 0x5678 loads
    assert rig.count(CH1) == 0x5678
    rig.at_tick(0x1234 + 0x100)
    assert rig.count(CH1) == 0x5578
    # A control word resets both flip-flops.
    rig.pit.read(CH1, 1)
    rig.out(CW_CH1_LOHI_MODE2, 0x00, 0x20, ch=CH1)
    assert rig.count(CH1) == 0x2000


def test_counter_latch_freezes_value() -> None:
    rig = make_rig()
    rig.out(CW_CH0_LOHI_MODE2, 1000 & 0xFF, 1000 >> 8)
    rig.at_tick(100)
    rig.pit.write(CTRL, 1, CW_CH0_LATCH)
    rig.at_tick(400)
    rig.pit.write(CTRL, 1, CW_CH0_LATCH)             # ignored: the first latch is unread
    assert rig.pit.read(CH0, 1) == 900 & 0xFF
    rig.at_tick(500)
    assert rig.pit.read(CH0, 1) == 900 >> 8
    assert rig.count(CH0) == 500                     # latch released: live count again


def test_wide_access_is_split_into_consecutive_ports() -> None:
    rig = make_rig()
    rig.pit.write(CTRL, 1, CW_CH1_LSB_MODE0)
    rig.pit.write(CTRL, 1, CW_CH0_LSB_MODE0)
    rig.pit.write(CH0, 2, 0x50 << 8 | 0x40)          # outw 0x40: 0x40 -> counter 0, 0x41 -> counter 1
    assert rig.pit.read(CH0, 2) == 0x5040
    assert rig.pit.read(CTRL, 2) == 0xFFFF           # write-only control port, then not ours


# -- read-back ---------------------------------------------------------------------------------

def test_read_back_status_and_count() -> None:
    rig = make_rig()
    rig.out(CW_CH0_LOHI_MODE2, 0x00, 0x10)          # 4096
    rig.pit.write(CTRL, 1, CW_CH2_LOHI_MODE0)        # no count yet: NULL COUNT set
    rig.at_tick(96)
    rig.pit.write(CTRL, 1, READ_BACK | RB_CNT0 | RB_CNT2)
    rig.at_tick(200)
    # OUT=1, NULL=0, RW=11, M=010, BCD=0; then the count latched at tick 96.
    assert rig.pit.read(CH0, 1) == 0b1_0_11_010_0
    assert rig.count(CH0) == 4000
    # OUT=0 (mode 0 after the control word), NULL=1, RW=11, M=000.
    assert rig.pit.read(CH2, 1) == 0b0_1_11_000_0
    # Its count was latched too: the value frozen by the control word (reset's 65536, held by GATE low).
    assert rig.count(CH2) == 0


def test_read_back_status_only_first_latch_counts() -> None:
    rig = make_rig()
    rig.out(CW_CH1_LOHI_MODE6, 10, 0, ch=CH1)
    # The CR reaches the CE on the next clock: NULL COUNT until then.
    rig.pit.write(CTRL, 1, READ_BACK | RB_NO_COUNT | RB_CNT1)
    rig.at_tick(1)
    rig.pit.write(CTRL, 1, READ_BACK | RB_NO_COUNT | RB_CNT1)   # ignored until read
    assert rig.pit.read(CH1, 1) == 0b1_1_11_110_0                # mode exactly as written
    rig.pit.write(CTRL, 1, READ_BACK | RB_NO_COUNT | RB_CNT1)
    assert rig.pit.read(CH1, 1) == 0b1_0_11_110_0
    rig.at_tick(9)                                   # count 1: OUT low
    rig.pit.write(CTRL, 1, READ_BACK | RB_NO_COUNT | RB_CNT1)
    assert rig.pit.read(CH1, 1) == 0b0_0_11_110_0
    assert rig.count(CH1) == 1                       # no count was latched


def test_read_back_count_only_several_channels() -> None:
    rig = make_rig()
    rig.out(CW_CH0_LOHI_MODE2, 0x00, 0x02)           # 512
    rig.out(CW_CH1_LOHI_MODE2, 0x00, 0x03, ch=CH1)   # 768
    rig.at_tick(12)
    rig.pit.write(CTRL, 1, READ_BACK | RB_NO_STATUS | RB_CNT0 | RB_CNT1)
    rig.at_tick(112)
    assert (rig.count(CH0), rig.count(CH1)) == (500, 756)
    assert (rig.count(CH0), rig.count(CH1)) == (400, 656)


# -- BCD and the maximum count -----------------------------------------------------------------

def test_bcd_counting() -> None:
    rig = make_rig()
    rig.out(CW_CH1_LOHI_MODE0_BCD, 0x00, 0x10, ch=CH1)     # BCD 1000
    assert rig.count(CH1) == 0x1000
    rig.at_tick(1)
    assert rig.count(CH1) == 0x0999
    rig.at_tick(1001)
    assert rig.count(CH1) == 0x9999                        # wraps modulo 10000
    rig.pit.write(CTRL, 1, READ_BACK | RB_NO_COUNT | RB_CNT1)
    assert rig.pit.read(CH1, 1) & 0x01


def test_bcd_reload_zero_is_10000() -> None:
    rig = make_rig()
    rig.out(CW_CH0_LOHI_MODE2_BCD, 0, 0)
    rig.edges.clear()
    rig.at_tick(30_000)
    assert rising(rig.edges) == [edge_ns(10_000), edge_ns(20_000), edge_ns(30_000)]


def test_reload_zero_is_65536() -> None:
    rig = make_rig()
    rig.out(CW_CH0_LOHI_MODE2, 0, 0)
    assert rig.count(CH0) == 0
    rig.at_tick(1)
    assert rig.count(CH0) == 0xFFFF
    rig.edges.clear()
    rig.at_tick(2 * 65536)
    assert rising(rig.edges) == [edge_ns(65536), edge_ns(2 * 65536)]


def test_reset_state_is_mode3_65536_on_channel0() -> None:
    rig = make_rig()
    rig.edges.clear()
    rig.at_tick(65536)
    assert rig.edges == [(edge_ns(32768), False), (edge_ns(65536), True)]


# -- port 0x61 ---------------------------------------------------------------------------------

def test_port61_out2_gate_and_speaker_bits() -> None:
    rig = make_rig()
    rig.portb.write(0, 1, PORTB_GATE2 | PORTB_SPEAKER)
    rig.out(CW_CH2_LOHI_MODE0, 50, 0, ch=CH2)
    assert rig.port61() & 0x2F == PORTB_GATE2 | PORTB_SPEAKER
    assert rig.portb.speaker_enabled
    rig.at_tick(50)
    assert rig.port61() & 0x2F == PORTB_OUT2 | PORTB_GATE2 | PORTB_SPEAKER
    assert rig.pit.gate(CH2)


def test_port61_stored_and_read_only_bits() -> None:
    rig = make_rig()
    rig.portb.write(0, 1, 0xFC)                  # bits 2, 3 stick; 4-7 are read-only
    assert rig.port61() & 0xCF == 0x0C
    assert not rig.pit.gate(CH2)
    assert not rig.portb.speaker_enabled


def test_port61_refresh_toggle_every_15085_ns() -> None:
    rig = make_rig()
    samples = []
    for t in (0, 15_084, 15_085, 30_169, 30_170, 45_255):
        rig.run_until(t)
        samples.append(bool(rig.port61() & PORTB_REFRESH))
    assert samples == [False, False, True, True, False, True]


# -- guest errors ------------------------------------------------------------------------------

def test_illegal_count_1_is_logged_and_a_new_count_recovers() -> None:
    log: list[str] = []
    clock = Clock()
    irq = IrqLine("irq0")
    pit = PIT8254(clock, irq, log=log.append)
    rig = Rig(clock, irq, pit, SystemControlPortB(pit))
    irq.connect(lambda level: rig.edges.append((clock.now, level)))
    rig.out(CW_CH0_LOHI_MODE3, 1, 0)
    assert log == ["pit: counter 0: count 1 is illegal in mode 3"]
    assert irq.level is True and clock.next_deadline() is None     # OUT stuck high: no timer
    rig.at_tick(100)
    rig.edges.clear()
    rig.pit.write(CH0, 1, 10)
    rig.pit.write(CH0, 1, 0)
    # The one-clock "period" ends at tick 101; the new count enters its low half there.
    rig.at_tick(121)
    assert rig.edges == [(edge_ns(101), False), (edge_ns(106), True), (edge_ns(111), False),
                         (edge_ns(116), True), (edge_ns(121), False)]
    rig.pit.write(CTRL, 1, CW_CH0_LOHI_MODE2_BCD)
    rig.pit.write(CH0, 1, 0x1A)
    rig.pit.write(CH0, 1, 0x00)
    assert log[1:] == ["pit: counter 0: invalid BCD count 0x001a"]


# -- robustness --------------------------------------------------------------------------------

def test_late_clock_still_sees_every_edge_in_order() -> None:
    rig = make_rig()
    rig.out(CW_CH0_LOHI_MODE2, 100, 0)
    rig.edges.clear()
    rig.clock.advance_to(edge_ns(1000))          # jump over ten periods without running timers
    assert rig.count(CH0) == 100                 # the access catches up on OUT0's edges
    assert rig.irq.raised >= 10
    assert [level for _, level in rig.edges] == [False, True] * 10
    rig.clock.run_due()
    assert len(rig.edges) == 20


def test_overdue_timer_fires_every_edge_in_run_due() -> None:
    rig = make_rig()
    rig.out(CW_CH0_LOHI_MODE2, 100, 0)
    rig.edges.clear()
    rig.clock.advance_to(edge_ns(1000) + 5)
    rig.clock.run_due()                          # the timer evaluates each armed tick, not "now"
    assert [level for _, level in rig.edges] == [False, True] * 10
    assert rig.clock.next_deadline() == edge_ns(1099)


# -- snapshots ---------------------------------------------------------------------------------

def _program_busy(rig: Rig) -> None:
    rig.out(CW_CH0_LOHI_MODE3, 1001 & 0xFF, 1001 >> 8)
    rig.portb.write(0, 1, PORTB_GATE2 | PORTB_SPEAKER)
    rig.out(CW_CH2_LOHI_MODE2, 77, 0, ch=CH2)
    rig.run_until(3_333_333)
    rig.pit.write(CH0, 1, 0x2C)                  # new count 300: pending until the half-cycle ends
    rig.pit.write(CH0, 1, 0x01)
    rig.pit.write(CTRL, 1, CW_CH1_LATCH)
    rig.pit.write(CTRL, 1, READ_BACK | RB_CNT2 | RB_NO_COUNT)


@pytest.mark.parametrize("snap_ns, overdue", [(3_333_333, False), (3_500_000, False),
                                              (edge_ns(4000), False), (3_700_000, True)])
def test_snapshot_restore_continues_identically(snap_ns: int, overdue: bool) -> None:
    original = make_rig()
    _program_busy(original)
    if overdue:
        # Snapshot with the channel-0 timer past due and not yet run: it must fire late, exactly.
        original.clock.advance_to(snap_ns)
        deadline = original.clock.next_deadline()
        assert deadline is not None and deadline < snap_ns - 300_000
    else:
        original.run_until(snap_ns)
    state, clock_state = original.pit.snapshot(), original.clock.snapshot()
    portb_state = original.portb.snapshot()

    clock = Clock()
    irq = IrqLine("irq0")
    pit = PIT8254(clock, irq)
    portb = SystemControlPortB(pit)
    copy = Rig(clock, irq, pit, portb)
    clock.restore(clock_state)
    pit.restore(state)
    portb.restore(portb_state)
    irq.connect(lambda level: copy.edges.append((clock.now, level)))
    assert irq.level == original.irq.level
    assert clock.next_deadline() == original.clock.next_deadline()

    original.edges.clear()
    for rig in (original, copy):
        rig.run_until(20_000_000)
    assert copy.edges == original.edges
    assert len(original.edges) > 20
    reads = [[rig.pit.read(ch, 1) for ch in (CH2, CH1, CH1, CH2, CH2)] + [rig.port61()]
             for rig in (original, copy)]
    assert reads[0] == reads[1]


def test_snapshot_is_plain_data() -> None:
    rig = make_rig()
    _program_busy(rig)

    def plain(value: object) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or type(value) in (int, bool, str, bytes)

    assert plain(rig.pit.snapshot())
    assert plain(rig.portb.snapshot())
