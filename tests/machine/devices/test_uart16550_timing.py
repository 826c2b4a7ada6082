"""16550A UART transmit timing: ``SerialTiming.BAUD`` (the data sheet) against
``SerialTiming.INSTANT`` (QEMU's serial.c: the byte leaves during the THR write,
THRE never falls, the IRQ line is not gated by MCR.OUT2).

Register level, on a virtual clock without Unicorn; times are exact ns.
"""
from __future__ import annotations

import pytest
from vmk.machine.chardev import MemoryChar
from vmk.machine.clock import Clock
from vmk.machine.devices.uart16550 import LSR, MCR, UART16550, Reg, SerialTiming
from vmk.machine.irq import IrqLine

C9600 = 1_041_667         # 10 bits at divisor 12 (the reset divisor), rounded up
IER_RX, IER_THR = 0x01, 0x02
IIR_NONE, IIR_THR, IIR_RX = 0x01, 0x02, 0x04
FCR_ON = 0x01
FIFO_BITS = 0xC0
LSR_IDLE = LSR.THRE | LSR.TEMT


class Rig:
    def __init__(self, timing: SerialTiming | str, **kw) -> None:
        self.clock = Clock()
        self.irq = IrqLine("irq4")
        self.edges: list[tuple[int, bool]] = []
        self.irq.connect(lambda level: self.edges.append((self.clock.now, level)))
        self.chr = MemoryChar()
        self.logs: list[str] = []
        self.uart = UART16550(self.clock, self.irq, self.chr, self.logs.append, timing=timing, **kw)

    def rd(self, reg: int) -> int:
        return self.uart.read(reg, 1)

    def wr(self, reg: int, value: int) -> None:
        self.uart.write(reg, 1, value)

    def at(self, t: int) -> None:
        while (d := self.clock.next_deadline()) is not None and d <= t:
            self.clock.advance_to(d)
            self.clock.run_due()
        self.clock.advance_to(t)
        self.clock.run_due()


def test_timing_names() -> None:
    assert Rig("instant").uart.timing is SerialTiming.INSTANT
    assert Rig("baud").uart.timing is SerialTiming.BAUD
    with pytest.raises(ValueError):
        Rig("fast")


@pytest.mark.parametrize("fcr", [0, FCR_ON])
def test_instant_thr_write_leaves_at_once(fcr: int) -> None:
    rig = Rig(SerialTiming.INSTANT)
    rig.wr(Reg.IIR_FCR, fcr)
    rig.at(1000)
    rig.wr(Reg.RBR_THR, ord("h"))
    assert rig.rd(Reg.LSR) == LSR_IDLE              # THRE and TEMT never fall
    rig.at(1005)
    rig.wr(Reg.RBR_THR, ord("i"))
    assert rig.rd(Reg.LSR) == LSR_IDLE
    assert rig.chr.timeline == [(1000, ord("h")), (1005, ord("i"))]
    assert rig.clock.next_deadline() is None         # no timer: nothing is in flight


def test_baud_thr_write_takes_a_character_time() -> None:
    """The contrast: the same writes at 9600 baud clear THRE/TEMT and leave one character time apart."""
    rig = Rig(SerialTiming.BAUD)
    rig.wr(Reg.IIR_FCR, FCR_ON)
    rig.wr(Reg.RBR_THR, ord("h"))
    assert rig.rd(Reg.LSR) == LSR.THRE               # in the shift register: THRE, not TEMT
    rig.wr(Reg.RBR_THR, ord("i"))
    assert rig.rd(Reg.LSR) == 0                      # one byte waits in the FIFO
    rig.at(2 * C9600)
    assert rig.rd(Reg.LSR) == LSR_IDLE
    assert rig.chr.timeline == [(C9600, ord("h")), (2 * C9600, ord("i"))]


def test_instant_every_thr_write_raises_the_thre_interrupt() -> None:
    """QEMU: serial_xmit sets thr_ipending after the byte went out, so each write re-raises it."""
    rig = Rig(SerialTiming.INSTANT)
    rig.wr(Reg.IIR_FCR, FCR_ON)
    rig.wr(Reg.IER, IER_THR)
    assert rig.irq.level
    assert rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_THR     # the IIR read clears it
    assert not rig.irq.level
    assert rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_NONE
    rig.at(500)
    rig.wr(Reg.RBR_THR, ord("x"))
    assert rig.irq.level
    rig.at(600)
    rig.wr(Reg.RBR_THR, ord("y"))                    # not acknowledged: the line pulses low, then high
    assert rig.irq.level and rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_THR
    assert rig.edges == [(0, True), (0, False), (500, True), (600, False), (600, True), (600, False)]


def test_baud_thre_interrupt_waits_for_the_fifo_to_drain() -> None:
    rig = Rig(SerialTiming.BAUD)
    rig.wr(Reg.IIR_FCR, FCR_ON)
    rig.wr(Reg.IER, IER_THR)
    assert rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_THR
    rig.wr(Reg.RBR_THR, ord("a"))
    rig.wr(Reg.RBR_THR, ord("b"))
    assert not rig.irq.level
    rig.at(C9600)                                     # "b" moves into the shift register: THRE rises
    assert rig.irq.level


@pytest.mark.parametrize(("timing", "gated"), [("instant", False), ("baud", True)])
def test_out2_gates_the_irq_in_baud_timing_only(timing: str, gated: bool) -> None:
    rig = Rig(timing)
    rig.wr(Reg.MCR, 0)                                # OUT2 off
    rig.wr(Reg.IER, IER_THR)
    assert rig.irq.level is (not gated)
    assert rig.rd(Reg.IIR_FCR) & 0x0F == IIR_THR      # pending either way
    rig.wr(Reg.MCR, MCR.OUT2)
    rig.wr(Reg.IER, 0)
    rig.wr(Reg.IER, IER_THR)
    assert rig.irq.level


def test_instant_can_still_ask_for_out2_gating() -> None:
    rig = Rig(SerialTiming.INSTANT, out2_gates_irq=True)
    rig.wr(Reg.MCR, 0)
    rig.wr(Reg.IER, IER_THR)
    assert not rig.irq.level


def test_instant_loopback_byte_is_received_at_once() -> None:
    rig = Rig(SerialTiming.INSTANT)
    rig.wr(Reg.IIR_FCR, FCR_ON)
    rig.wr(Reg.MCR, MCR.OUT2 | MCR.LOOP)
    rig.wr(Reg.IER, IER_RX)
    rig.at(700)
    rig.wr(Reg.RBR_THR, 0x5A)
    assert rig.rd(Reg.LSR) == LSR_IDLE | LSR.DR
    assert rig.irq.level and rig.rd(Reg.IIR_FCR) == FIFO_BITS | IIR_RX
    assert rig.rd(Reg.RBR_THR) == 0x5A
    assert rig.chr.timeline == []                     # loopback: nothing on the wire


def test_instant_never_overruns_the_fifo() -> None:
    rig = Rig(SerialTiming.INSTANT)
    rig.wr(Reg.IIR_FCR, FCR_ON)
    data = bytes(range(40))
    for b in data:
        rig.wr(Reg.RBR_THR, b)                        # no THRE polling at all
    assert bytes(rig.chr.output) == data
    assert rig.uart.tx_dropped == 0 and not rig.logs


def test_instant_receiver_keeps_line_timing() -> None:
    """Only the transmitter is instant: host input still takes a character time per byte."""
    rig = Rig(SerialTiming.INSTANT)
    rig.uart.receive(b"ok")
    assert not rig.rd(Reg.LSR) & LSR.DR
    rig.at(C9600)
    assert rig.rd(Reg.LSR) & LSR.DR and rig.rd(Reg.RBR_THR) == ord("o")


@pytest.mark.parametrize("timing", ["instant", "baud"])
def test_both_timings_are_deterministic(timing: str) -> None:
    def trace() -> list:
        rig = Rig(timing)
        rig.wr(Reg.IIR_FCR, FCR_ON)
        rig.wr(Reg.IER, IER_THR)
        for k, b in enumerate(b"deterministic"):
            rig.at(k * 300_000)
            if rig.rd(Reg.LSR) & LSR.THRE:
                rig.wr(Reg.RBR_THR, b)
        rig.at(20 * C9600)
        return [rig.chr.timeline, rig.edges]
    assert trace() == trace()


@pytest.mark.parametrize("timing", ["instant", "baud"])
def test_flush_tx_is_harmless_when_idle(timing: str) -> None:
    rig = Rig(timing)
    rig.wr(Reg.RBR_THR, ord("z"))
    rig.uart.flush_tx()
    rig.uart.flush_tx()
    assert bytes(rig.chr.output) == b"z"
    assert rig.rd(Reg.LSR) == LSR_IDLE
