"""Local APIC: registers, priorities, the CPU side and the timer, on virtual time."""
from __future__ import annotations

import pytest

from vmk.machine.clock import Clock
from vmk.machine.devices.lapic import APIC_VERSION, LocalAPIC, Reg

SVR_ON = 0x1FF                  # software enabled, spurious vector 0xFF
MASKED = 1 << 16
PERIODIC = 1 << 17
TSC_DEADLINE = 2 << 17
LEVEL = 1 << 15
EXTINT = 7 << 8
NMI = 4 << 8
DIV_1 = 0b1011
ESR_RECV_ILLEGAL = 1 << 6
ESR_SEND_ILLEGAL = 1 << 5
ESR_ILLEGAL_REGISTER = 1 << 7
LVT_REGS = (Reg.LVT_TIMER, Reg.LVT_THERMAL, Reg.LVT_PERF, Reg.LVT_LINT0,
            Reg.LVT_LINT1, Reg.LVT_ERROR)


def run_until(clock: Clock, t: int) -> None:
    """Fire every deadline up to ``t`` at its own time, then stop at ``t``."""
    while (d := clock.next_deadline()) is not None and d <= t:
        clock.advance_to(d)
        clock.run_due()
    clock.advance_to(t)
    clock.run_due()


def rd(apic: LocalAPIC, reg: int) -> int:
    return apic.read(reg, 4)


def wr(apic: LocalAPIC, reg: int, value: int) -> None:
    apic.write(reg, 4, value)


def make(svr: int | None = SVR_ON) -> tuple[Clock, LocalAPIC, list[str]]:
    clock = Clock()
    logs: list[str] = []
    apic = LocalAPIC(clock, log=logs.append)
    if svr is not None:
        wr(apic, Reg.SVR, svr)
    return clock, apic, logs


def spy(clock: Clock, apic: LocalAPIC) -> list[tuple[int, int, bool]]:
    """Record (time, vector, level) of every message the APIC accepts."""
    seen: list[tuple[int, int, bool]] = []
    real = apic.accept

    def accept(vector: int, level_triggered: bool) -> None:
        seen.append((clock.now, vector, level_triggered))
        real(vector, level_triggered)

    apic.accept = accept  # type: ignore[method-assign]
    return seen


def irr_has(apic: LocalAPIC, vector: int) -> bool:
    return bool(rd(apic, Reg.IRR0 + (vector // 32) * 0x10) & (1 << (vector % 32)))


def isr_has(apic: LocalAPIC, vector: int) -> bool:
    return bool(rd(apic, Reg.ISR0 + (vector // 32) * 0x10) & (1 << (vector % 32)))


def eoi(apic: LocalAPIC) -> None:
    wr(apic, Reg.EOI, 0)


# -- reset and register access ------------------------------------------------------

def test_reset_state_is_qemus_bsp_reset() -> None:
    clock, apic, _ = make(svr=None)
    assert rd(apic, Reg.VERSION) == APIC_VERSION == 0x00050014
    assert rd(apic, Reg.SVR) == 0xFF
    assert rd(apic, Reg.LVT_LINT0) == 0x700
    for reg in LVT_REGS:
        if reg != Reg.LVT_LINT0:
            assert rd(apic, reg) == MASKED
    assert rd(apic, Reg.DFR) == 0xFFFFFFFF
    assert rd(apic, Reg.ID) == 0
    assert rd(apic, Reg.TPR) == rd(apic, Reg.PPR) == 0
    assert rd(apic, Reg.TIMER_DIVIDE) == 0
    assert LocalAPIC(clock, apic_id=3).read(Reg.ID, 4) == 3 << 24


def test_bad_size_or_alignment_reads_zero_and_is_logged() -> None:
    _, apic, logs = make()
    wr(apic, Reg.TPR, 0x20)
    assert apic.read(Reg.TPR, 1) == 0
    assert apic.read(Reg.TPR + 4, 4) == 0
    apic.write(Reg.TPR, 2, 0x70)
    assert rd(apic, Reg.TPR) == 0x20
    assert len(logs) == 3


def test_reserved_register_sets_illegal_register_address() -> None:
    _, apic, _ = make()
    assert rd(apic, 0x2F0) == 0          # no CMCI: max LVT index is 5
    wr(apic, Reg.ESR, 0)
    assert rd(apic, Reg.ESR) == ESR_ILLEGAL_REGISTER


def test_lvt_reserved_bits_read_zero_and_ldr_dfr_round_trip() -> None:
    _, apic, _ = make()
    wr(apic, Reg.LVT_ERROR, 0xFFFFFFFF)
    assert rd(apic, Reg.LVT_ERROR) == MASKED | 0xFF
    wr(apic, Reg.LDR, 0x01000000)
    wr(apic, Reg.DFR, 0x0FFFFFFF)
    assert rd(apic, Reg.LDR) == 0x01000000
    assert rd(apic, Reg.DFR) == 0x0FFFFFFF


# -- timer ---------------------------------------------------------------------------

def test_one_shot_divide_1_expires_exactly_and_counts_down() -> None:
    clock, apic, _ = make()
    seen = spy(clock, apic)
    wr(apic, Reg.TIMER_DIVIDE, DIV_1)
    wr(apic, Reg.LVT_TIMER, 0x40)
    run_until(clock, 100)
    wr(apic, Reg.TIMER_INITIAL, 1000)
    run_until(clock, 600)
    assert rd(apic, Reg.TIMER_CURRENT) == 500
    run_until(clock, 1099)
    assert seen == []
    assert rd(apic, Reg.TIMER_CURRENT) == 1
    run_until(clock, 1100)
    assert seen == [(1100, 0x40, False)]
    assert rd(apic, Reg.TIMER_CURRENT) == 0
    run_until(clock, 10_000)
    assert len(seen) == 1
    assert clock.next_deadline() is None


@pytest.mark.parametrize("dcr, divisor", [
    (0b1011, 1), (0b0000, 2), (0b0001, 4), (0b0010, 8),
    (0b0011, 16), (0b1000, 32), (0b1001, 64), (0b1010, 128),
])
def test_one_shot_with_each_divider(dcr: int, divisor: int) -> None:
    clock, apic, _ = make()
    seen = spy(clock, apic)
    wr(apic, Reg.TIMER_DIVIDE, dcr)
    wr(apic, Reg.LVT_TIMER, 0x41)
    run_until(clock, 7)
    wr(apic, Reg.TIMER_INITIAL, 10)
    run_until(clock, 7 + 4 * divisor - 1)   # just before the 4th tick
    assert rd(apic, Reg.TIMER_CURRENT) == 7
    run_until(clock, 7 + 4 * divisor)
    assert rd(apic, Reg.TIMER_CURRENT) == 6
    run_until(clock, 10_000)
    assert seen == [(7 + 10 * divisor, 0x41, False)]


def test_periodic_fires_every_period_and_reloads() -> None:
    clock, apic, _ = make()
    seen = spy(clock, apic)
    wr(apic, Reg.TIMER_DIVIDE, 0b0011)           # divide by 16
    wr(apic, Reg.LVT_TIMER, PERIODIC | 0x42)
    wr(apic, Reg.TIMER_INITIAL, 100)             # period 1600 ns
    run_until(clock, 2400)
    assert rd(apic, Reg.TIMER_CURRENT) == 50
    run_until(clock, 3200)
    assert rd(apic, Reg.TIMER_CURRENT) == 100
    run_until(clock, 4900)
    assert [t for t, _, _ in seen] == [1600, 3200, 4800]
    wr(apic, Reg.TIMER_INITIAL, 0)               # stops it
    assert rd(apic, Reg.TIMER_CURRENT) == 0
    run_until(clock, 100_000)
    assert len(seen) == 3


def test_periodic_restart_by_initial_count_write() -> None:
    clock, apic, _ = make()
    seen = spy(clock, apic)
    wr(apic, Reg.TIMER_DIVIDE, 0b0000)           # by 2
    wr(apic, Reg.LVT_TIMER, PERIODIC | 0x42)
    wr(apic, Reg.TIMER_INITIAL, 50)              # period 100
    run_until(clock, 150)
    wr(apic, Reg.TIMER_INITIAL, 30)              # period 60 from t=150
    run_until(clock, 300)
    assert [t for t, _, _ in seen] == [100, 210, 270]


def test_masked_timer_counts_but_does_not_interrupt() -> None:
    clock, apic, _ = make()
    seen = spy(clock, apic)
    wr(apic, Reg.TIMER_DIVIDE, DIV_1)
    wr(apic, Reg.LVT_TIMER, MASKED | PERIODIC | 0x43)
    wr(apic, Reg.TIMER_INITIAL, 100)
    run_until(clock, 250)
    assert seen == []
    assert rd(apic, Reg.TIMER_CURRENT) == 50
    wr(apic, Reg.LVT_TIMER, PERIODIC | 0x43)     # unmask: next period boundary
    run_until(clock, 450)
    assert [t for t, _, _ in seen] == [300, 400]


def test_one_shot_that_expired_while_masked_is_lost() -> None:
    clock, apic, _ = make()
    seen = spy(clock, apic)
    wr(apic, Reg.TIMER_DIVIDE, DIV_1)
    wr(apic, Reg.LVT_TIMER, MASKED | 0x43)
    wr(apic, Reg.TIMER_INITIAL, 100)
    run_until(clock, 150)
    wr(apic, Reg.LVT_TIMER, 0x43)
    run_until(clock, 1000)
    assert seen == []


def test_divider_change_mid_count_behaves_like_qemu() -> None:
    clock, apic, _ = make()
    seen = spy(clock, apic)
    wr(apic, Reg.TIMER_DIVIDE, DIV_1)
    wr(apic, Reg.LVT_TIMER, 0x44)
    wr(apic, Reg.TIMER_INITIAL, 1000)
    run_until(clock, 500)
    wr(apic, Reg.TIMER_DIVIDE, 0b0000)           # by 2, load time not moved
    assert rd(apic, Reg.TIMER_CURRENT) == 1000 - 500 // 2
    run_until(clock, 5000)
    # The armed expiry stays at 1000; from there the new divider gives 2000.
    assert [t for t, _, _ in seen] == [1000, 2000]


def test_tsc_deadline_mode_is_not_supported() -> None:
    clock, apic, logs = make()
    seen = spy(clock, apic)
    wr(apic, Reg.LVT_TIMER, TSC_DEADLINE | 0x45)
    wr(apic, Reg.TIMER_INITIAL, 10)
    run_until(clock, 1000)
    assert seen == [] and rd(apic, Reg.TIMER_CURRENT) == 0
    assert any("TSC" in m for m in logs)


def test_timer_snapshot_restore_continues_exactly() -> None:
    clock, apic, _ = make()
    seen = spy(clock, apic)
    wr(apic, Reg.TIMER_DIVIDE, 0b0001)           # by 4
    wr(apic, Reg.LVT_TIMER, PERIODIC | 0x46)
    wr(apic, Reg.TIMER_INITIAL, 25)              # period 100
    run_until(clock, 150)
    cs, s = clock.snapshot(), apic.snapshot()
    run_until(clock, 420)
    first = list(seen)
    clock.restore(cs)
    apic.restore(s)
    del seen[:]
    assert rd(apic, Reg.TIMER_CURRENT) == 13
    run_until(clock, 420)
    assert [t for t, _, _ in seen] == [200, 300, 400] == [t for t, _, _ in first[1:]]


# -- priorities, acknowledge, EOI ------------------------------------------------------------

def test_tpr_blocks_same_and_lower_class_until_lowered() -> None:
    _, apic, _ = make()
    changes: list[int] = []
    apic.on_change = lambda: changes.append(1)
    wr(apic, Reg.TPR, 0x50)
    apic.accept(0x45, False)
    assert not apic.pending() and changes == []
    wr(apic, Reg.TPR, 0x40)                      # same class 4: still blocked
    assert not apic.pending()
    assert rd(apic, Reg.PPR) == 0x40
    wr(apic, Reg.TPR, 0x3F)
    assert apic.pending() and changes == [1]
    assert apic.acknowledge() == 0x45


def test_ppr_follows_isr_class() -> None:
    _, apic, _ = make()
    wr(apic, Reg.TPR, 0x23)
    apic.accept(0x61, False)
    assert apic.acknowledge() == 0x61
    assert rd(apic, Reg.PPR) == 0x60
    eoi(apic)
    assert rd(apic, Reg.PPR) == 0x23
    apic.accept(0x25, False)                     # same class as TPR: PPR keeps TPR[3:0]
    wr(apic, Reg.TPR, 0x13)
    assert apic.acknowledge() == 0x25
    wr(apic, Reg.TPR, 0x23)
    assert rd(apic, Reg.PPR) == 0x23


def test_isr_nesting_higher_class_preempts_same_class_waits() -> None:
    _, apic, _ = make()
    apic.accept(0x40, False)
    assert apic.acknowledge() == 0x40
    apic.accept(0x45, False)                     # same class: waits
    assert not apic.pending()
    apic.accept(0x80, False)                     # higher class: preempts
    assert apic.pending()
    assert apic.acknowledge() == 0x80
    assert isr_has(apic, 0x40) and isr_has(apic, 0x80)
    eoi(apic)                                    # clears the highest: 0x80
    assert not isr_has(apic, 0x80) and isr_has(apic, 0x40)
    assert not apic.pending()                    # 0x45 still behind 0x40
    eoi(apic)
    assert apic.pending()
    assert apic.acknowledge() == 0x45
    assert not irr_has(apic, 0x45) and isr_has(apic, 0x45)


def test_acknowledge_with_nothing_deliverable_returns_spurious() -> None:
    _, apic, _ = make(svr=0x1F7)
    assert apic.acknowledge() == 0xF7
    assert rd(apic, Reg.ISR0 + 0x70) == 0
    wr(apic, Reg.TPR, 0x90)
    apic.accept(0x81, False)                     # below TPR: vanished for the CPU
    assert apic.acknowledge() == 0xF7
    assert irr_has(apic, 0x81) and not isr_has(apic, 0x81)


def test_eoi_with_empty_isr_is_harmless() -> None:
    _, apic, _ = make()
    eoi(apic)
    assert rd(apic, Reg.PPR) == 0


def test_eoi_broadcast_only_for_level_triggered_vectors() -> None:
    _, apic, _ = make()
    broadcast: list[int] = []
    apic.eoi_broadcast = broadcast.append
    apic.accept(0x30, False)
    apic.accept(0x50, True)
    assert rd(apic, Reg.TMR0 + 0x20) == 1 << (0x50 - 64)
    assert apic.acknowledge() == 0x50
    eoi(apic)
    assert apic.acknowledge() == 0x30
    eoi(apic)
    assert broadcast == [0x50]


# -- software enable -----------------------------------------------------------------

def test_software_disable_masks_lvts_and_holds_irr() -> None:
    clock, apic, _ = make()
    seen = spy(clock, apic)
    wr(apic, Reg.TIMER_DIVIDE, DIV_1)
    wr(apic, Reg.LVT_TIMER, PERIODIC | 0x40)
    wr(apic, Reg.LVT_LINT1, NMI)
    wr(apic, Reg.TIMER_INITIAL, 100)
    wr(apic, Reg.SVR, 0x0FF)                     # software disable
    for reg in LVT_REGS:
        assert rd(apic, reg) & MASKED
    wr(apic, Reg.LVT_TIMER, PERIODIC | 0x40)     # cannot unmask while disabled
    assert rd(apic, Reg.LVT_TIMER) & MASKED
    run_until(clock, 1000)
    assert seen == []
    apic.accept(0x60, False)                     # accepted, held
    assert not apic.pending()
    wr(apic, Reg.SVR, SVR_ON)
    assert apic.pending() and apic.acknowledge() == 0x60
    assert rd(apic, Reg.LVT_TIMER) & MASKED      # stays masked until unmasked


# -- ICR, errors -------------------------------------------------------------------------------

def test_self_ipi_by_shorthand_and_by_physical_id() -> None:
    _, apic, logs = make()
    wr(apic, Reg.ICR_LO, (1 << 18) | 0x51)       # shorthand self, fixed
    assert irr_has(apic, 0x51)
    assert rd(apic, Reg.ICR_LO) == (1 << 18) | 0x51    # delivery status reads 0
    assert not rd(apic, Reg.TMR0 + 0x20)          # IPIs are edge
    wr(apic, Reg.ICR_HI, 0 << 24)
    wr(apic, Reg.ICR_LO, 0x52)                   # physical destination 0
    assert irr_has(apic, 0x52)
    wr(apic, Reg.ICR_HI, 1 << 24)
    wr(apic, Reg.ICR_LO, 0x53)                   # APIC 1 does not exist
    assert not irr_has(apic, 0x53)
    assert any("single CPU" in m for m in logs)


def test_logical_self_ipi_and_init_sipi_are_logged() -> None:
    _, apic, logs = make()
    wr(apic, Reg.LDR, 0x02 << 24)
    wr(apic, Reg.ICR_HI, 0x02 << 24)
    wr(apic, Reg.ICR_LO, (1 << 11) | 0x54)       # logical, flat, bit 1
    assert irr_has(apic, 0x54)
    del logs[:]
    wr(apic, Reg.ICR_LO, (3 << 18) | (5 << 8) | (1 << 14))   # INIT all-but-self
    wr(apic, Reg.ICR_LO, (3 << 18) | (6 << 8) | 0x08)        # SIPI
    assert len(logs) == 2 and all("not modelled (single CPU)" in m for m in logs)


def test_illegal_vector_sets_esr_with_write_then_read_latch() -> None:
    _, apic, _ = make()
    apic.accept(5, False)
    assert rd(apic, Reg.IRR0) == 0
    assert rd(apic, Reg.ESR) == 0                # not latched yet
    wr(apic, Reg.ESR, 0)
    assert rd(apic, Reg.ESR) == ESR_RECV_ILLEGAL
    wr(apic, Reg.ESR, 0)
    assert rd(apic, Reg.ESR) == 0


def test_illegal_ipi_vector_and_error_interrupt() -> None:
    _, apic, _ = make()
    wr(apic, Reg.LVT_ERROR, 0xFE)
    wr(apic, Reg.ICR_LO, (1 << 18) | 0x03)
    assert irr_has(apic, 0xFE) and rd(apic, Reg.IRR0) == 0
    wr(apic, Reg.ESR, 0)
    assert rd(apic, Reg.ESR) == ESR_SEND_ILLEGAL


def test_illegal_error_vector_does_not_loop() -> None:
    _, apic, _ = make()
    wr(apic, Reg.LVT_ERROR, 0x02)
    apic.accept(1, False)
    wr(apic, Reg.ESR, 0)
    assert rd(apic, Reg.ESR) == ESR_RECV_ILLEGAL
    assert rd(apic, Reg.IRR0) == 0


# -- LINT pins ---------------------------------------------------------------------------------

def test_extint_via_lint0_asks_the_pic() -> None:
    _, apic, _ = make(svr=None)                  # reset: disabled, LINT0 ExtINT
    changes: list[int] = []
    apic.on_change = lambda: changes.append(1)
    acks: list[int] = []

    def pic_ack() -> int:
        acks.append(1)
        return 0x28

    apic.extint_ack = pic_ack
    assert not apic.pending()
    apic.set_lint0(True)
    assert apic.pending() and changes == [1]
    assert apic.acknowledge() == 0x28 and acks == [1]
    assert rd(apic, Reg.ISR0 + 0x10) == 0 and rd(apic, Reg.IRR0 + 0x10) == 0
    apic.set_lint0(False)
    assert not apic.pending()


def test_extint_ignores_priority_and_stops_when_disabled() -> None:
    _, apic, _ = make()
    apic.extint_ack = lambda: 0x21
    wr(apic, Reg.LVT_LINT0, EXTINT)
    wr(apic, Reg.TPR, 0xF0)
    apic.accept(0x90, False)
    apic.set_lint0(True)
    assert apic.pending() and apic.acknowledge() == 0x21
    assert irr_has(apic, 0x90)
    wr(apic, Reg.SVR, 0x0FF)                     # disabling masks LINT0
    assert not apic.pending()


def test_lint0_fixed_edge_and_lint1_nmi() -> None:
    _, apic, _ = make()
    wr(apic, Reg.LVT_LINT0, 0x66)                # fixed, edge
    apic.set_lint0(True)
    assert irr_has(apic, 0x66)
    assert apic.acknowledge() == 0x66
    apic.set_lint0(True)                         # no new edge
    assert not irr_has(apic, 0x66)
    wr(apic, Reg.LVT_LINT1, NMI)
    apic.set_lint1(True)
    assert apic.nmi_pending
    apic.nmi_pending = False
    apic.set_lint1(False)
    apic.set_lint1(True)
    assert apic.nmi_pending


def test_lint0_level_fixed_redelivers_after_eoi_while_high() -> None:
    _, apic, _ = make()
    wr(apic, Reg.LVT_LINT0, LEVEL | 0x67)
    apic.set_lint0(True)
    assert rd(apic, Reg.LVT_LINT0) & (1 << 14)   # remote IRR
    assert apic.acknowledge() == 0x67
    eoi(apic)
    assert irr_has(apic, 0x67)                   # still high: again
    assert apic.acknowledge() == 0x67
    apic.set_lint0(False)
    eoi(apic)
    assert not irr_has(apic, 0x67)
    assert not rd(apic, Reg.LVT_LINT0) & (1 << 14)


def test_apic_snapshot_is_plain_data_and_round_trips() -> None:
    clock, apic, _ = make()
    wr(apic, Reg.TPR, 0x20)
    apic.accept(0x70, True)
    apic.acknowledge()
    apic.accept(0x31, False)
    s = apic.snapshot()
    assert all(type(v) in (int, bool, list, type(None)) for v in s.values())
    other = LocalAPIC(clock)
    other.restore(s)
    assert other.snapshot() == s
    assert rd(other, Reg.PPR) == 0x70 and isr_has(other, 0x70)
