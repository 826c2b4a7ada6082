"""16550A UART: registers, FIFOs, interrupts and virtual-time transmission.

Everything runs on a virtual clock without Unicorn; times are exact ns.
"""
from __future__ import annotations

import json

import pytest
from vmk.machine.chardev import MemoryChar
from vmk.machine.clock import Clock
from vmk.machine.devices.uart16550 import (
    FIFO_SIZE,
    LSR,
    MCR,
    MSR,
    UART16550,
    Reg,
    character_time_ns,
)
from vmk.machine.irq import IrqLine

C115200 = 86_806          # 10 bits at divisor 1: 10 * 16 / 1843200 s = 86805.55.. ns, rounded up
C9600 = 1_041_667         # 10 bits at divisor 12: 1041666.66.. ns, rounded up

IER_RX, IER_THR, IER_LS, IER_MS = 0x01, 0x02, 0x04, 0x08
IIR_NONE, IIR_MS, IIR_THR, IIR_RX, IIR_LS, IIR_TIMEOUT = 0x01, 0x00, 0x02, 0x04, 0x06, 0x0C
FIFO_BITS = 0xC0
LCR_8N1 = 0x03
LCR_DLAB = 0x80
FCR_ON = 0x01


class Rig:
    """A UART on a virtual clock with a recorded IRQ line and an in-memory back end."""

    def __init__(self, out2_gates_irq: bool = True) -> None:
        self.clock = Clock()
        self.irq = IrqLine("irq4")
        self.edges: list[tuple[int, bool]] = []
        self.irq.connect(lambda level: self.edges.append((self.clock.now, level)))
        self.chr = MemoryChar()
        self.logs: list[str] = []
        self.uart = UART16550(self.clock, self.irq, self.chr, self.logs.append,
                              out2_gates_irq=out2_gates_irq)

    def rd(self, reg: int) -> int:
        return self.uart.read(reg, 1)

    def wr(self, reg: int, value: int) -> None:
        self.uart.write(reg, 1, value)

    def baud(self, divisor: int, lcr: int = LCR_8N1) -> None:
        self.wr(Reg.LCR, LCR_DLAB | lcr)
        self.wr(Reg.RBR_THR, divisor & 0xFF)
        self.wr(Reg.IER, divisor >> 8)
        self.wr(Reg.LCR, lcr)

    def run_to(self, t: int) -> None:
        """Fire every timer due up to ``t`` in deadline order and leave the clock at ``t``."""
        while (d := self.clock.next_deadline()) is not None and d <= t:
            self.clock.advance_to(d)
            self.clock.run_due()
        self.clock.advance_to(t)
        self.clock.run_due()

    def lsr(self) -> int:
        return self.rd(Reg.LSR)


@pytest.fixture
def rig() -> Rig:
    return Rig()


# -- line timing ----------------------------------------------------------------

def test_character_time_is_exact_and_rounded_up() -> None:
    assert character_time_ns(LCR_8N1, 1) == C115200
    assert character_time_ns(LCR_8N1, 12) == C9600
    assert character_time_ns(0x0F, 3) == 312_500          # 8 data, 2 stop, parity: 12 bits, exact
    assert character_time_ns(0x04, 1) == 65_105           # 5 data, 1.5 stop: 7.5 bits = 65104.1..
    assert character_time_ns(0x00, 1) == 60_764           # 5N1: 7 bits = 60763.8..


def test_dlab_gives_divisor_latch_access(rig: Rig) -> None:
    rig.wr(Reg.IER, IER_RX | IER_LS)
    rig.wr(Reg.LCR, LCR_DLAB | LCR_8N1)
    assert (rig.rd(Reg.RBR_THR), rig.rd(Reg.IER)) == (12, 0)     # reset divisor: 9600 baud
    rig.wr(Reg.RBR_THR, 0x34)
    rig.wr(Reg.IER, 0x12)
    assert (rig.rd(Reg.RBR_THR), rig.rd(Reg.IER)) == (0x34, 0x12)
    assert rig.chr.output == b""                                  # DLL write is not a THR write
    assert rig.lsr() == LSR.THRE | LSR.TEMT
    rig.wr(Reg.LCR, LCR_8N1)
    assert rig.rd(Reg.IER) == IER_RX | IER_LS                     # the real IER was untouched
    rig.baud(3)
    t0 = 500
    rig.run_to(t0)
    rig.wr(Reg.RBR_THR, ord("x"))
    rig.run_to(10**7)
    assert rig.chr.timeline == [(t0 + 260_417, ord("x"))]        # 3 * 86805.55.. rounded up


def test_divisor_zero_keeps_previous_character_time(rig: Rig) -> None:
    rig.baud(1)
    rig.baud(0)
    assert any("divisor 0" in m for m in rig.logs)
    rig.wr(Reg.RBR_THR, 0x41)
    rig.run_to(10**7)
    assert rig.chr.timeline == [(C115200, 0x41)]


# -- transmitter ------------------------------------------------------------------

def test_thre_interrupt_timing_9600_without_fifo(rig: Rig) -> None:
    rig.baud(12)
    rig.wr(Reg.IER, IER_THR)                       # THRE already set: interrupt at once
    assert rig.irq.level and rig.rd(Reg.IIR_FCR) == IIR_THR
    assert not rig.irq.level and rig.rd(Reg.IIR_FCR) == IIR_NONE   # the IIR read cleared it
    t0 = 1_000
    rig.run_to(t0)
    rig.edges.clear()
    rig.wr(Reg.RBR_THR, ord("A"))                  # goes straight into the shift register
    assert rig.lsr() == LSR.THRE                   # holding register empty, transmitter busy
    rig.wr(Reg.RBR_THR, ord("B"))                  # waits in THR
    assert rig.lsr() == 0
    assert not rig.irq.level
    rig.run_to(t0 + C9600 - 1)
    assert rig.lsr() == 0 and rig.chr.output == b""
    rig.run_to(t0 + C9600)
    assert rig.chr.timeline == [(t0 + C9600, ord("A"))]
    assert rig.lsr() == LSR.THRE                   # B moved into the TSR
    assert rig.irq.level and rig.rd(Reg.IIR_FCR) == IIR_THR
    rig.run_to(t0 + 2 * C9600 - 1)
    assert not rig.lsr() & LSR.TEMT
    rig.run_to(t0 + 2 * C9600)
    assert rig.lsr() == LSR.THRE | LSR.TEMT
    assert rig.chr.timeline[1] == (t0 + 2 * C9600, ord("B"))
    # A rises with the write of A (TSR takes it at once), B's write lowers it,
    # it rises again when B enters the TSR; the IIR read lowered it.
    assert rig.edges == [(t0, True), (t0, False), (t0 + C9600, True), (t0 + C9600, False)]


def test_thre_and_temt_with_fifo_at_115200(rig: Rig) -> None:
    rig.baud(1)
    rig.wr(Reg.IIR_FCR, FCR_ON)
    rig.wr(Reg.IER, IER_THR)
    rig.rd(Reg.IIR_FCR)                            # acknowledge the initial THRE interrupt
    t0 = 7
    rig.run_to(t0)
    data = bytes(range(0x41, 0x41 + FIFO_SIZE))
    for b in data:
        rig.wr(Reg.RBR_THR, b)
    assert not rig.irq.level
    # The first byte is in the TSR, 15 wait in the FIFO: THRE when the last one
    # moves into the TSR, TEMT when it has left the line.
    rig.run_to(t0 + 15 * C115200 - 1)
    assert rig.lsr() == 0 and not rig.irq.level
    rig.run_to(t0 + 15 * C115200)
    assert rig.lsr() == LSR.THRE and rig.irq.level
    assert rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_THR
    rig.run_to(t0 + 16 * C115200 - 1)
    assert rig.lsr() == LSR.THRE
    rig.run_to(t0 + 16 * C115200)
    assert rig.lsr() == LSR.THRE | LSR.TEMT
    assert rig.chr.timeline == [(t0 + (i + 1) * C115200, b) for i, b in enumerate(data)]


def test_registers_are_exact_even_before_the_timer_fires(rig: Rig) -> None:
    rig.baud(1)
    rig.wr(Reg.RBR_THR, 0x55)
    rig.clock.advance_to(C115200)                  # no run_due: the read catches up by itself
    assert rig.lsr() == LSR.THRE | LSR.TEMT
    assert rig.chr.timeline == [(C115200, 0x55)]


def test_full_tx_fifo_drops_the_oldest_byte(rig: Rig) -> None:
    rig.baud(1)
    rig.wr(Reg.IIR_FCR, FCR_ON)
    data = bytes(range(18))                        # 1 in the TSR, 16 in the FIFO, one too many
    for b in data:
        rig.wr(Reg.RBR_THR, b)
    rig.run_to(10**8)
    assert bytes(rig.chr.output) == bytes([0]) + data[2:]
    assert rig.uart.tx_dropped == 1
    assert sum("full" in m for m in rig.logs) == 1
    rig.wr(Reg.IIR_FCR, 0)                         # without FIFOs the THR holds one byte
    for b in b"xyz":
        rig.wr(Reg.RBR_THR, b)
    rig.run_to(2 * 10**8)
    assert bytes(rig.chr.output[-2:]) == b"xz" and rig.uart.tx_dropped == 2
    assert sum("full" in m for m in rig.logs) == 1   # logged once, counted always


def test_tx_fifo_reset_keeps_the_shift_register(rig: Rig) -> None:
    rig.baud(1)
    rig.wr(Reg.IIR_FCR, FCR_ON)
    rig.wr(Reg.IER, IER_THR)
    for b in b"abc":
        rig.wr(Reg.RBR_THR, b)
    assert not rig.irq.level
    rig.wr(Reg.IIR_FCR, FCR_ON | 0x04)             # XMIT FIFO reset
    assert rig.lsr() == LSR.THRE and rig.irq.level
    rig.run_to(10**8)
    assert rig.chr.timeline == [(C115200, ord("a"))]


def test_enabling_etbei_while_thre_raises_at_once(rig: Rig) -> None:
    rig.wr(Reg.IER, IER_THR)
    assert rig.irq.level
    assert rig.rd(Reg.IIR_FCR) == IIR_THR
    assert not rig.irq.level
    rig.wr(Reg.IER, IER_THR)                       # no change: stays acknowledged
    assert not rig.irq.level
    rig.wr(Reg.IER, 0)
    rig.wr(Reg.IER, IER_THR)                       # a rising ETBEI re-raises it (QEMU, Bochs)
    assert rig.irq.level and rig.rd(Reg.IIR_FCR) == IIR_THR


def test_flush_tx_hands_pending_bytes_to_the_back_end(rig: Rig) -> None:
    rig.baud(1)
    rig.wr(Reg.IIR_FCR, FCR_ON)
    for b in b"bye":
        rig.wr(Reg.RBR_THR, b)
    rig.uart.flush_tx()
    assert rig.chr.timeline == [(C115200, ord("b")), (2 * C115200, ord("y")), (3 * C115200, ord("e"))]
    assert rig.lsr() == LSR.THRE | LSR.TEMT
    assert rig.clock.next_deadline() is None


# -- receiver -----------------------------------------------------------------------

@pytest.mark.parametrize(("fcr", "trigger"), [(0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)])
def test_rx_interrupt_at_trigger_level(rig: Rig, fcr: int, trigger: int) -> None:
    rig.baud(1)
    rig.wr(Reg.IIR_FCR, fcr)
    rig.wr(Reg.IER, IER_RX)
    t0 = 12_345
    rig.run_to(t0)
    rig.uart.receive(bytes(range(0x30, 0x30 + 16)))
    assert rig.uart.rx_pending == 16
    rig.run_to(t0 + C115200 - 1)
    assert not rig.lsr() & LSR.DR
    rig.run_to(t0 + trigger * C115200 - 1)
    assert not rig.irq.level
    assert bool(rig.lsr() & LSR.DR) == (trigger > 1)
    rig.run_to(t0 + trigger * C115200)
    assert rig.irq.level
    assert rig.edges == [(t0 + trigger * C115200, True)]
    assert rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_RX
    assert rig.uart.rx_pending == 16 - trigger
    got = bytes(rig.rd(Reg.RBR_THR) for _ in range(trigger))
    assert got == bytes(range(0x30, 0x30 + trigger))
    assert not rig.irq.level


def test_character_timeout_after_exactly_four_character_times(rig: Rig) -> None:
    rig.baud(1)
    rig.wr(Reg.IIR_FCR, 0xC1)                      # trigger level 14
    rig.wr(Reg.IER, IER_RX)
    t0 = 1_000
    rig.run_to(t0)
    rig.uart.receive(b"abc")                       # arrive at t0 + C, + 2C, + 3C
    last = t0 + 3 * C115200
    rig.run_to(last + 4 * C115200 - 1)
    assert not rig.irq.level and rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_NONE
    rig.run_to(last + 4 * C115200)
    assert rig.irq.level and rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_TIMEOUT
    t1 = last + 5 * C115200
    rig.run_to(t1)
    assert rig.rd(Reg.RBR_THR) == ord("a")         # a read clears it and restarts the count
    assert not rig.irq.level
    rig.run_to(t1 + 4 * C115200 - 1)
    assert not rig.irq.level
    rig.run_to(t1 + 4 * C115200)
    assert rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_TIMEOUT
    assert rig.rd(Reg.RBR_THR) == ord("b")
    assert rig.rd(Reg.RBR_THR) == ord("c")
    rig.run_to(t1 + 100 * C115200)
    assert not rig.irq.level and rig.edges[-1][1] is False


def test_character_timeout_masked_by_erbfi_and_absent_without_fifo(rig: Rig) -> None:
    rig.baud(1)
    rig.wr(Reg.IIR_FCR, 0xC1)
    rig.uart.receive(b"a")
    rig.run_to(10 * C115200)
    assert rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_NONE
    rig.wr(Reg.IER, IER_RX)                        # the pending timeout shows once unmasked
    assert rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_TIMEOUT
    rig.wr(Reg.IIR_FCR, 0)                         # FIFOs off: no timeouts, RBR semantics
    rig.uart.receive(b"b")
    rig.run_to(30 * C115200)
    assert rig.rd(Reg.IIR_FCR) == IIR_RX


def test_non_fifo_receive_is_flow_controlled(rig: Rig) -> None:
    rig.baud(1)
    rig.wr(Reg.IER, IER_RX)
    rig.uart.receive(b"ab")
    rig.run_to(C115200)
    assert rig.irq.level and rig.rd(Reg.IIR_FCR) == IIR_RX
    rig.run_to(10 * C115200)                       # "b" waits: RBR is full
    assert rig.lsr() == LSR.DR | LSR.THRE | LSR.TEMT
    assert rig.uart.rx_pending == 1
    t1 = 10 * C115200 + 3
    rig.run_to(t1)
    assert rig.rd(Reg.RBR_THR) == ord("a")
    assert not rig.irq.level
    rig.run_to(t1 + C115200 - 1)
    assert not rig.lsr() & LSR.DR
    rig.run_to(t1 + C115200)
    assert rig.rd(Reg.RBR_THR) == ord("b")
    assert rig.uart.rx_pending == 0


def test_fifo_receive_never_loses_host_input(rig: Rig) -> None:
    rig.baud(1)
    rig.wr(Reg.IIR_FCR, FCR_ON)
    data = bytes(range(20))
    rig.uart.receive(data)
    rig.run_to(40 * C115200)
    assert rig.uart.rx_pending == 4                # the FIFO took 16, the line stopped
    assert rig.lsr() == LSR.DR | LSR.THRE | LSR.TEMT    # no overrun
    t1 = 40 * C115200
    assert rig.rd(Reg.RBR_THR) == 0
    rig.run_to(t1 + C115200 - 1)
    assert rig.uart.rx_pending == 4
    rig.run_to(t1 + C115200)
    assert rig.uart.rx_pending == 3
    got = bytearray([0])
    for _ in range(19):
        rig.run_to(rig.clock.now + C115200)
        got.append(rig.rd(Reg.RBR_THR))
    assert bytes(got) == data


def test_fifo_enable_discards_the_byte_in_rbr(rig: Rig) -> None:
    rig.baud(1)
    rig.uart.receive(b"z")
    rig.run_to(C115200)
    assert rig.lsr() & LSR.DR
    rig.wr(Reg.IIR_FCR, FCR_ON)
    assert not rig.lsr() & LSR.DR
    assert rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_NONE
    assert rig.rd(Reg.RBR_THR) == 0                # an empty RCVR FIFO reads 0, as QEMU
    rig.uart.receive(b"q")
    rig.run_to(3 * C115200)
    rig.wr(Reg.IIR_FCR, 0)                         # and switching them off flushes too
    assert not rig.lsr() & LSR.DR
    assert rig.rd(Reg.IIR_FCR) == IIR_NONE


def test_lsr_errors_clear_on_read(rig: Rig) -> None:
    rig.baud(1)
    rig.wr(Reg.MCR, MCR.LOOP)
    rig.wr(Reg.RBR_THR, 1)
    rig.wr(Reg.RBR_THR, 2)                         # arrives while RBR still holds 1
    rig.run_to(2 * C115200)
    assert rig.lsr() == LSR.DR | LSR.OE | LSR.THRE | LSR.TEMT
    assert rig.lsr() == LSR.DR | LSR.THRE | LSR.TEMT
    assert rig.rd(Reg.RBR_THR) == 2


def test_break_shows_bi_when_it_reaches_the_top_of_the_fifo(rig: Rig) -> None:
    rig.baud(1)
    rig.wr(Reg.IIR_FCR, FCR_ON)
    rig.wr(Reg.IER, IER_LS)
    rig.uart.receive(b"a")
    rig.uart.receive_break()
    rig.uart.receive(b"b")
    rig.run_to(3 * C115200)
    assert rig.lsr() == LSR.DR | LSR.FIFO_ERROR | LSR.THRE | LSR.TEMT
    assert not rig.irq.level
    assert rig.rd(Reg.RBR_THR) == ord("a")
    assert rig.irq.level and rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_LS
    assert rig.lsr() == LSR.DR | LSR.BI | LSR.FIFO_ERROR | LSR.THRE | LSR.TEMT
    assert not rig.irq.level
    assert rig.rd(Reg.RBR_THR) == 0                # the break character
    # LSR7 stays until an LSR read finds no errored character left in the FIFO.
    assert rig.lsr() == LSR.DR | LSR.FIFO_ERROR | LSR.THRE | LSR.TEMT
    assert rig.lsr() == LSR.DR | LSR.THRE | LSR.TEMT
    assert rig.rd(Reg.RBR_THR) == ord("b")


# -- loopback, modem status ---------------------------------------------------------

def test_loopback_echo_and_msr(rig: Rig) -> None:
    rig.baud(1)
    assert rig.rd(Reg.MSR) == MSR.CTS | MSR.DSR | MSR.DCD
    rig.wr(Reg.MCR, MCR.LOOP | MCR.RTS | MCR.OUT1)
    # DSR and DCD dropped, RI rose (no TERI on a rising RI).
    assert rig.rd(Reg.MSR) == MSR.CTS | MSR.RI | MSR.DDSR | MSR.DDCD
    assert rig.rd(Reg.MSR) == MSR.CTS | MSR.RI
    rig.wr(Reg.MCR, MCR.LOOP | MCR.DTR | MCR.OUT2)
    assert rig.rd(Reg.MSR) == MSR.DSR | MSR.DCD | MSR.DCTS | MSR.DDSR | MSR.TERI | MSR.DDCD
    rig.wr(Reg.MCR, MCR.LOOP | MCR.RTS | MCR.OUT2)      # Linux's 8250 probe expects 0x90
    assert rig.rd(Reg.MSR) & 0xF0 == 0x90
    t0 = 100
    rig.run_to(t0)
    rig.wr(Reg.RBR_THR, 0xAE)
    rig.run_to(t0 + C115200 - 1)
    assert not rig.lsr() & LSR.DR
    rig.run_to(t0 + C115200)
    assert rig.lsr() & LSR.DR
    assert rig.rd(Reg.RBR_THR) == 0xAE
    assert rig.chr.output == b""                   # looped back, not sent
    rig.wr(Reg.MCR, MCR.OUT2)
    assert rig.rd(Reg.MSR) & 0xF0 == MSR.CTS | MSR.DSR | MSR.DCD


def test_host_input_waits_while_in_loopback(rig: Rig) -> None:
    rig.baud(1)
    rig.wr(Reg.MCR, MCR.LOOP)
    rig.uart.receive(b"h")
    rig.run_to(10 * C115200)
    assert not rig.lsr() & LSR.DR and rig.uart.rx_pending == 1
    t1 = 10 * C115200
    rig.wr(Reg.MCR, MCR.OUT2)
    rig.run_to(t1 + C115200)
    assert rig.rd(Reg.RBR_THR) == ord("h")


def test_loopback_overrun_with_full_fifo(rig: Rig) -> None:
    rig.baud(1)
    rig.wr(Reg.IIR_FCR, FCR_ON)
    rig.wr(Reg.MCR, MCR.LOOP | MCR.OUT2)
    rig.wr(Reg.IER, IER_LS)
    data = bytes(range(0x60, 0x60 + 17))          # TSR + 16 in the XMIT FIFO
    for b in data:
        rig.wr(Reg.RBR_THR, b)
    rig.run_to(16 * C115200)
    assert rig.lsr() == LSR.DR | LSR.THRE
    rig.run_to(17 * C115200)
    assert rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_LS
    assert rig.irq.level                           # loopback keeps the IRQ (MCR.OUT2 set), as QEMU
    assert rig.lsr() == LSR.DR | LSR.OE | LSR.THRE | LSR.TEMT
    assert rig.lsr() == LSR.DR | LSR.THRE | LSR.TEMT
    assert bytes(rig.rd(Reg.RBR_THR) for _ in range(16)) == data[:16]
    assert not rig.lsr() & LSR.DR
    assert rig.chr.output == b""


def test_external_modem_lines_raise_modem_status_interrupt(rig: Rig) -> None:
    rig.wr(Reg.IER, IER_MS)
    assert not rig.irq.level
    rig.uart.set_modem_lines(ri=True)              # a rising RI is no event (8.9: TERI is the trailing edge)
    assert not rig.irq.level
    assert rig.rd(Reg.MSR) == MSR.CTS | MSR.DSR | MSR.DCD | MSR.RI
    rig.uart.set_modem_lines(ri=False, dcd=False)
    assert rig.irq.level and rig.rd(Reg.IIR_FCR) == IIR_MS
    assert rig.rd(Reg.MSR) == MSR.CTS | MSR.DSR | MSR.TERI | MSR.DDCD
    assert not rig.irq.level                       # the read cleared the deltas
    rig.uart.set_modem_lines(cts=False, dsr=False)
    assert rig.rd(Reg.MSR) == MSR.DCTS | MSR.DDSR


# -- interrupts ------------------------------------------------------------------------

def test_iir_priority_order(rig: Rig) -> None:
    rig.baud(1)
    rig.wr(Reg.MCR, MCR.LOOP | MCR.RTS)           # DSR, DCD drop: modem status pending
    rig.wr(Reg.RBR_THR, 1)
    rig.wr(Reg.RBR_THR, 2)                         # overrun: line status pending
    rig.run_to(2 * C115200)
    rig.wr(Reg.IER, IER_RX | IER_THR | IER_LS | IER_MS)
    assert rig.rd(Reg.IIR_FCR) == IIR_LS
    rig.lsr()
    assert rig.rd(Reg.IIR_FCR) == IIR_RX
    rig.rd(Reg.RBR_THR)
    assert rig.rd(Reg.IIR_FCR) == IIR_THR          # this read acknowledges it
    assert rig.rd(Reg.IIR_FCR) == IIR_MS
    rig.rd(Reg.MSR)
    assert rig.rd(Reg.IIR_FCR) == IIR_NONE


def test_timeout_outranks_thre(rig: Rig) -> None:
    rig.baud(1)
    rig.wr(Reg.IIR_FCR, 0xC1)
    rig.wr(Reg.IER, IER_RX | IER_THR)
    rig.uart.receive(b"x")
    rig.run_to(5 * C115200)
    assert rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_TIMEOUT
    rig.rd(Reg.RBR_THR)
    assert rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_THR


def test_irq_gated_by_out2() -> None:
    rig = Rig()
    rig.wr(Reg.MCR, 0)
    rig.wr(Reg.IER, IER_THR)
    assert rig.rd(Reg.IIR_FCR) == IIR_THR and not rig.irq.level
    rig.wr(Reg.IER, 0)
    rig.wr(Reg.IER, IER_THR)
    rig.wr(Reg.MCR, MCR.OUT2)
    assert rig.irq.level
    rig.wr(Reg.MCR, MCR.OUT2 | MCR.LOOP)           # loopback: still gated by the MCR bit, as QEMU
    assert rig.irq.level
    rig.wr(Reg.MCR, MCR.LOOP)
    assert not rig.irq.level
    rig.wr(Reg.MCR, MCR.OUT2)
    assert rig.irq.level
    qemu = Rig(out2_gates_irq=False)               # QEMU does not gate the line at all
    qemu.wr(Reg.MCR, 0)
    qemu.wr(Reg.IER, IER_THR)
    assert qemu.irq.level


# -- reset, registers, snapshots ----------------------------------------------------------

def test_reset_values_and_scratch(rig: Rig) -> None:
    assert [rig.rd(r) for r in Reg] == [0, 0, IIR_NONE, 0, MCR.OUT2, 0x60, 0xB0, 0]
    rig.wr(Reg.SCR, 0x5A)
    rig.wr(Reg.LSR, 0)
    assert rig.rd(Reg.SCR) == 0x5A and rig.lsr() == 0x60
    assert any("read-only LSR" in m for m in rig.logs)
    rig.wr(Reg.IER, 0xFF)
    rig.wr(Reg.MCR, 0xFF)
    assert (rig.rd(Reg.IER), rig.rd(Reg.MCR)) == (0x0F, 0x1F)
    rig.wr(Reg.IIR_FCR, FCR_ON)
    rig.wr(Reg.RBR_THR, 1)
    rig.uart.reset()
    assert [rig.rd(r) for r in Reg] == [0, 0, IIR_NONE, 0, MCR.OUT2, 0x60, 0xB0, 0]
    assert not rig.irq.level and rig.clock.next_deadline() is None


def _busy_rig() -> Rig:
    rig = Rig()
    rig.baud(1)
    rig.wr(Reg.IIR_FCR, 0x41)
    rig.wr(Reg.IER, IER_RX | IER_THR | IER_LS)
    rig.wr(Reg.SCR, 0x77)
    rig.run_to(1_000)
    for b in b"snapshot":
        rig.wr(Reg.RBR_THR, b)
    rig.uart.receive(b"0123456789")
    rig.run_to(1_000 + 3 * C115200 + 17)           # mid-character on both lines
    return rig


def _trace(rig: Rig, until: int) -> list:
    out = []
    while (d := rig.clock.next_deadline()) is not None and d <= until:
        rig.run_to(d)
        out.append((d, rig.irq.level, rig.lsr(), rig.rd(Reg.IIR_FCR)))
        if rig.lsr() & LSR.DR and d % 2:
            out.append(("rx", rig.rd(Reg.RBR_THR)))
    return out


def test_snapshot_restore_round_trip() -> None:
    rig = _busy_rig()
    clock_state = rig.clock.snapshot()
    state = json.loads(json.dumps(rig.uart.snapshot()))    # plain data
    deadline = rig.clock.next_deadline()
    rig.clock.restore(clock_state)                 # empties the clock's queue...
    rig.uart.restore(state)
    assert rig.clock.next_deadline() == deadline   # ...and restore() re-arms the timer
    until = 40 * C115200
    expected = _trace(rig, until)
    expected_out = list(rig.chr.timeline)

    other = Rig()
    other.clock.restore(clock_state)
    other.uart.restore(state)
    assert other.rd(Reg.SCR) == 0x77
    assert _trace(other, until) == expected
    assert other.chr.timeline == expected_out[-len(other.chr.timeline):]
    assert [t for t, _ in other.chr.timeline] == [t for t, _ in expected_out if t > clock_state["now"]]

    # Rewinding the same device works too (its timer is re-armed after Clock.restore).
    rig.clock.restore(clock_state)
    rig.uart.restore(state)
    rig.chr.clear()
    assert _trace(rig, until) == expected
    assert rig.chr.timeline == other.chr.timeline


def test_memory_chardev_pump_feeds_the_uart(rig: Rig) -> None:
    rig.baud(1)
    rig.chr.feed(b"hi")
    assert rig.chr.pump() == 2
    assert rig.uart.rx_pending == 2
    rig.run_to(C115200)
    assert rig.rd(Reg.RBR_THR) == ord("h")
