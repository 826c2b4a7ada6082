"""Interrupt routing and priorities on the whole machine: IO-APIC, 8259 pair, local APIC.

Small assembly guests (``Harness.from_asm`` + the bare-metal runtime) program
the controllers; the test drives ISA IRQ lines from clock timers at exact
virtual times (``h.machine.isa_irq[n]``), and the runtime's handler logs each
delivery.  Expected times follow from counting instructions (1 instruction =
1 ns, the k-th instruction of straight-line code from t = 0 ends at t = k):

* a request raised at time T while the CPU is halted, or running with IF=1
  outside a handler, is delivered at T; the runtime's ``rdtsc`` runs
  :data:`RUNTIME_TSC` instructions later (counted from its source);
* a request that becomes deliverable while IF=0 is delivered after ``sti``
  and the one instruction of its shadow.

``test_interrupt_made_deliverable_by_a_write_with_if_set`` checks the IF=1
case: the interrupt is taken right after the write that made it deliverable.
"""
from __future__ import annotations

import struct

import pytest
from vmk.testing import Harness, assemble
from vmk.testing.harness import ASM_ORG
from vmk.testing import baremetal
from vmk.testing.baremetal import EOI_LAPIC, EOI_PIC, EOI_PIC_SLAVE, events, install_runtime

LAPIC_TPR, LAPIC_PPR, LAPIC_EOI, LAPIC_SVR = 0x80, 0xA0, 0xB0, 0xF0
LAPIC_ISR0, LAPIC_TMR0, LAPIC_IRR0, LAPIC_ICR_LO = 0x100, 0x180, 0x200, 0x300
SVR_ENABLED = 0x1FF
ICR_SELF_FIXED = 1 << 18                      # destination shorthand "self", fixed, edge

RTE_LEVEL = 1 << 15
RTE_REMOTE_IRR = 1 << 14
RTE_MASKED = 1 << 16

PIC1_CMD, PIC1_DATA, PIC2_CMD, PIC2_DATA = 0x20, 0x21, 0xA0, 0xA1
ELCR1, ELCR2 = 0x4D0, 0x4D1
OCW2_EOI = 0x20
OCW2_SPECIFIC_EOI = 0x60
OCW3_READ_ISR = 0x0B
PIC_BASE1, PIC_BASE2 = 0x20, 0x28

COM1 = 0x3F8
UART_RBR, UART_IER, UART_FCR, UART_LCR = 0, 1, 2, 3
IER_RX, IER_THRE = 0x01, 0x02
BAUD_CLOCK = 1_843_200


# -- counting instructions ---------------------------------------------------------------------------

from irqkit import HOOKS, IOAPIC, LAPIC, REC, RUNTIME_TSC, Asm, count_insns, ioapic_write, lapic_write, outb  # noqa: E402,F401


def lapic_record(reg: int, slot: int) -> str:
    """Store the LAPIC register as a dword at REC + slot."""
    return (f"mov rsi, {LAPIC + reg:#x}\nmov eax, dword ptr [rsi]\n"
            f"mov rdi, {REC + slot:#x}\nmov dword ptr [rdi], eax")


def ioapic_route(pin: int, low: int, dest: int = 0) -> str:
    return ioapic_write(0x11 + 2 * pin, dest << 24) + "\n" + ioapic_write(0x10 + 2 * pin, low)


def pic_init(imr1: int, imr2: int) -> str:
    """ICW1-4 for both chips (edge, cascade on IR2, 8086 mode, bases 0x20/0x28), then the masks."""
    return "\n".join([outb(PIC1_CMD, 0x11), outb(PIC1_DATA, PIC_BASE1), outb(PIC1_DATA, 0x04),
                      outb(PIC1_DATA, 0x01), outb(PIC2_CMD, 0x11), outb(PIC2_DATA, PIC_BASE2),
                      outb(PIC2_DATA, 0x02), outb(PIC2_DATA, 0x01), outb(PIC1_DATA, imr1),
                      outb(PIC2_DATA, imr2)])


def pic_mask_all() -> str:
    return outb(PIC1_DATA, 0xFF) + "\n" + outb(PIC2_DATA, 0xFF)


def apic_mode() -> str:
    """PIC masked, LAPIC software-enabled: the IO-APIC / self-IPI path."""
    return pic_mask_all() + "\n" + lapic_write(LAPIC_SVR, SVR_ENABLED)


def set_gate(h: Harness, vector: int, addr: int) -> None:
    gate = struct.pack("<HHBBHII", addr & 0xFFFF, baremetal.SEL.KCODE, 0, 0x8E, (addr >> 16) & 0xFFFF,
                       addr >> 32, 0)
    h.machine.write_physical(baremetal.IDT_BASE + 16 * vector, gate)


def install_handler(h: Harness, vector: int, src: str, addr: int = HOOKS) -> None:
    """Guest code at ``addr`` handles ``vector`` (it must end with iretq or jump to a stub)."""
    h.machine.write_physical(addr, assemble(src, addr))
    set_gate(h, vector, addr)


def install_prehook(h: Harness, vector: int, body: str, addr: int = HOOKS) -> int:
    """``body`` then the runtime's stub; returns the hook's instruction count (straight-line body)."""
    src = body + f"\njmp {baremetal.STUBS + 16 * vector:#x}"
    install_handler(h, vector, src, addr)
    return count_insns(src)


def address_after(prefix: str, base: int = HOOKS) -> int:
    """Where the code that follows ``prefix`` starts, when assembled at ``base``."""
    return base + len(assemble(prefix, base))


def at(h: Harness, t: int, action) -> None:
    h.machine.clock.timer(action, name="test").arm(t)


def pulse_at(h: Harness, irq: int, t: int) -> None:
    at(h, t, h.machine.isa_irq[irq].pulse)


def level_at(h: Harness, irq: int, t: int, level: bool) -> None:
    at(h, t, lambda: h.machine.isa_irq[irq].set(level))


def rec_bytes(h: Harness, n: int, slot: int = 0) -> bytes:
    return h.machine.read_physical(REC + slot, n)


def rec_u32(h: Harness, slot: int) -> int:
    return struct.unpack("<I", h.machine.read_physical(REC + slot, 4))[0]


def vt(h: Harness) -> list[tuple[int, int]]:
    """(vector, tsc) of every logged delivery."""
    return [(e.vector, e.tsc) for e in events(h)]


def char_ns(divisor: int) -> int:
    return -(-10 * divisor * 16 * 1_000_000_000 // BAUD_CLOCK)


def vector_bit(word_value: int, vector: int) -> bool:
    return bool(word_value >> (vector % 32) & 1)


# -- IO-APIC -----------------------------------------------------------------------------------------


def test_ioapic_routes_each_pin_to_its_vector() -> None:
    routes = {1: 0x41, 5: 0x55, 9: 0x69, 12: 0x7C, 15: 0xE3}
    a = Asm()
    a(apic_mode())
    for pin, vector in routes.items():
        a(ioapic_route(pin, vector))
    a.idle()
    h = Harness.from_asm(a.source)
    install_runtime(h)
    times = {}
    for i, pin in enumerate((12, 1, 15, 9, 5)):
        times[pin] = 10_000 + 3_000 * i
        pulse_at(h, pin, times[pin])
    h.run(until=40_000)
    assert vt(h) == [(routes[p], times[p] + RUNTIME_TSC) for p in (12, 1, 15, 9, 5)]
    assert h.machine.log_lines == []


def test_ioapic_masked_edge_is_lost() -> None:
    """Edges while the entry is masked are dropped; unmasking sends nothing, even with the
    line still high; the next edge after the unmask is delivered."""
    a = Asm()
    a(apic_mode())
    a(ioapic_route(5, RTE_MASKED | 0x55))
    a("sti")
    a.spin(10_000)
    t_unmask = a(ioapic_write(0x10 + 2 * 5, 0x55))
    a.idle()
    h = Harness.from_asm(a.source)
    install_runtime(h)
    pulse_at(h, 5, 5_000)                      # masked: lost
    level_at(h, 5, 12_000, True)               # rises while masked ...
    level_at(h, 5, t_unmask + 5_000, False)    # ... and is still high at the unmask
    pulse_at(h, 5, t_unmask + 10_000)          # the only edge while unmasked
    assert 12_000 < t_unmask
    h.run(until=t_unmask + 20_000)
    assert vt(h) == [(0x55, t_unmask + 10_000 + RUNTIME_TSC)]


DELIVERIES = 5


@pytest.mark.parametrize("source", ["thre", "rx"])
def test_ioapic_level_triggered_redelivery_until_the_source_is_cleared(source: str) -> None:
    """COM1 (pin 4) level-triggered.  The handler EOIs without clearing the UART's
    interrupt source, so the EOI re-sends at once and the interrupt comes back after
    every iretq; on its 5th run the handler clears the source and the storm stops.
    Remote IRR reads 1 in the entry while the interrupt is in service, 0 afterwards."""
    vector = 0x44
    a = Asm()
    a(apic_mode())
    a(ioapic_route(4, RTE_LEVEL | vector))
    a("\n".join([outb(COM1 + UART_LCR, 0x80), outb(COM1 + UART_RBR, 1), outb(COM1 + UART_IER, 0),
                 outb(COM1 + UART_LCR, 0x03), outb(COM1 + UART_FCR, 0x01)]))
    t_enable = a(outb(COM1 + UART_IER, IER_THRE if source == "thre" else IER_RX))
    t_shadow = a("sti\nhlt")
    a("idle: hlt\njmp idle")
    h = Harness.from_asm(a.source)
    install_runtime(h)
    clear = (outb(COM1 + UART_IER, 0) if source == "thre"
             else f"mov dx, {COM1 + UART_RBR:#x}\nin al, dx")
    hook = f"""
        push rax
        push rbx
        push rcx
        push rdx
        mov rbx, {REC:#x}
        mov rcx, {IOAPIC:#x}
        mov dword ptr [rcx], {0x10 + 2 * 4:#x}
        mov eax, dword ptr [rcx+0x10]
        mov rdx, [rbx]
        mov [rbx+rdx*4+8], eax
        inc rdx
        mov [rbx], rdx
        cmp rdx, {DELIVERIES}
        jne keep
        {clear}
    keep:
        pop rdx
        pop rcx
        pop rbx
        pop rax
        jmp {baremetal.STUBS + 16 * vector:#x}
    """
    install_handler(h, vector, hook)
    prefix = count_insns(hook) - count_insns(clear)      # the path that keeps the source
    c = char_ns(1)
    if source == "thre":
        first = t_shadow                       # THRE is pending at once; taken after sti's shadow (hlt)
    else:
        h.serial(0).write(b"!", at=20_000)
        first = 20_000 + c                     # the byte completes; nobody reads it
    assert t_enable < 20_000
    h.run(until=first + 100_000)
    evs = events(h)
    assert [e.vector for e in evs] == [vector] * DELIVERIES
    assert evs[0].tsc == first + prefix + RUNTIME_TSC
    # Back to back, right after each iretq: every handler run is as long as the first,
    # and the last delivery's hook also runs the clearing code before the stub logs.
    gaps = [b.tsc - a.tsc for a, b in zip(evs, evs[1:])]
    assert gaps[:-1] == [gaps[0]] * (DELIVERIES - 2) and gaps[0] < 120
    assert gaps[-1] == gaps[0] + count_insns(clear)
    entries = [rec_u32(h, 8 + 4 * i) for i in range(DELIVERIES)]
    assert entries == [RTE_LEVEL | RTE_REMOTE_IRR | vector] * DELIVERIES
    io = h.machine.ioapic
    io.write(0x00, 4, 0x10 + 2 * 4)
    assert io.read(0x10, 4) == RTE_LEVEL | vector          # remote IRR clear, line low
    assert vector_bit(h.machine.lapic.read(LAPIC_TMR0 + 0x10 * (vector // 32), 4), vector)
    h.run(until=first + 5_000_000)
    assert len(events(h)) == DELIVERIES


# -- 8259 PIC ------------------------------------------------------------------------------------------


def _pic_guest(imr1: int, imr2: int) -> Harness:
    """Both chips initialised (bases 0x20/0x28) with these masks; LAPIC at reset (LINT0 ExtINT)."""
    a = Asm()
    a(pic_init(imr1, imr2))
    a.idle()
    return Harness.from_asm(a.source)


def test_pic_cascade_with_both_eois() -> None:
    """IRQ12 -> slave IR4 -> master IR2 -> vector base2 + 4; the handler EOIs the slave and
    the master, so the next IRQ12 is delivered too."""
    h = _pic_guest(imr1=0xFB, imr2=0xEF)
    install_runtime(h, eoi=EOI_PIC_SLAVE)
    pulse_at(h, 12, 10_000)
    pulse_at(h, 12, 20_000)
    h.run(until=30_000)
    assert vt(h) == [(PIC_BASE2 + 4, 10_000 + RUNTIME_TSC), (PIC_BASE2 + 4, 20_000 + RUNTIME_TSC)]
    pic = h.machine.pic
    assert (pic.master.isr, pic.slave.isr) == (0, 0)


def test_pic_cascade_without_slave_eoi_blocks_the_slave() -> None:
    """Only the master is EOI'd: the slave's IR4 stays in service and the second IRQ12
    cannot interrupt (a request of the same level)."""
    h = _pic_guest(imr1=0xFB, imr2=0xEF)
    install_runtime(h, eoi=EOI_PIC)
    pulse_at(h, 12, 10_000)
    pulse_at(h, 12, 20_000)
    h.run(until=30_000)
    assert vt(h) == [(PIC_BASE2 + 4, 10_000 + RUNTIME_TSC)]
    slave = h.machine.pic.slave
    slave.write(0, 1, OCW3_READ_ISR)
    assert slave.read(0, 1) == 0x10
    slave.write(0, 1, 0x0A)                    # OCW3: read IRR
    assert slave.read(0, 1) == 0x10            # the second edge is latched, held behind IR4 in service


def test_pic_imr_masks_but_keeps_the_edge() -> None:
    """IRQ5 pulsed while masked is latched in the IRR (the 8259 masks delivery, not
    requests) and delivered as soon as the guest unmasks it; IRQ3 stays masked."""
    a = Asm()
    a(pic_init(imr1=0xFF, imr2=0xFF))
    a("sti")
    a.spin(5_000)
    a("cli")
    a(outb(PIC1_DATA, 0xDF))
    t_shadow = a("sti\nnop")
    a("idle: hlt\njmp idle")
    h = Harness.from_asm(a.source)
    install_runtime(h, eoi=EOI_PIC)
    pulse_at(h, 5, 3_000)
    pulse_at(h, 3, 4_000)
    assert 4_000 < t_shadow - 10
    h.run(until=t_shadow + 20_000)
    assert vt(h) == [(PIC_BASE1 + 5, t_shadow + RUNTIME_TSC)]
    assert h.machine.pic.master.irr == 0x08     # IRQ3 still requested, still masked


def test_pic_specific_eoi_clears_only_its_level() -> None:
    """The IRQ6 handler reads ISR (OCW3), sends a specific EOI for level 5 (not in
    service: nothing changes), then one for level 6 (ISR clears).  The runtime sends no
    EOI; the second IRQ6 is delivered, so the specific EOI did end the first."""
    h = _pic_guest(imr1=0xBF, imr2=0xFF)
    install_runtime(h, eoi=0)
    hook = install_prehook(h, PIC_BASE1 + 6, f"""
        push rax
        push rbx
        mov rbx, {REC:#x}
        mov al, {OCW3_READ_ISR:#x}
        out 0x20, al
        in al, 0x20
        mov [rbx], al
        mov al, {OCW2_SPECIFIC_EOI | 5:#x}
        out 0x20, al
        in al, 0x20
        mov [rbx+1], al
        mov al, {OCW2_SPECIFIC_EOI | 6:#x}
        out 0x20, al
        in al, 0x20
        mov [rbx+2], al
        pop rbx
        pop rax
    """)
    pulse_at(h, 6, 10_000)
    pulse_at(h, 6, 20_000)
    h.run(until=30_000)
    v = PIC_BASE1 + 6
    assert vt(h) == [(v, 10_000 + hook + RUNTIME_TSC), (v, 20_000 + hook + RUNTIME_TSC)]
    assert rec_bytes(h, 3) == bytes([0x40, 0x40, 0x00])


def test_pic_nesting_by_priority() -> None:
    """IRQ3's handler runs with IF=1: IRQ1 (higher priority) preempts it at once; IRQ5
    (lower) waits until IRQ3's non-specific EOI.  IRQ1's own non-specific EOI ends IR1,
    not IR3 (the highest-priority in-service level)."""
    spin = 2_000
    prefix = f"""
        push rax
        push rbx
        push rcx
        push rdx
        rdtsc
        mov rbx, {REC:#x}
        mov [rbx], eax
        sti
        mov ecx, {spin}"""
    loop = """
    spin:
        dec ecx
        jnz spin"""
    before_eoi = f"""
        mov al, {OCW3_READ_ISR:#x}
        out 0x20, al
        in al, 0x20
        mov [rbx+8], al
        cli
        mov al, {OCW2_EOI:#x}
        out 0x20, al
        in al, 0x20
        mov [rbx+9], al
        rdtsc
        mov [rbx+4], eax
        sti
        nop"""
    tail = """
        nop
        pop rdx
        pop rcx
        pop rbx
        pop rax
        iretq"""
    h = _pic_guest(imr1=0xD5, imr2=0xFF)       # IRQ1, 3, 5 unmasked
    install_runtime(h, eoi=EOI_PIC)
    install_handler(h, PIC_BASE1 + 3, prefix + loop + before_eoi + tail)
    spin_start = address_after(prefix)
    spin_end = address_after(prefix + loop)
    after_shadow = address_after(prefix + loop + before_eoi)
    t3, t5, t1 = 10_000, 10_500, 11_000
    pulse_at(h, 3, t3)
    pulse_at(h, 5, t5)
    pulse_at(h, 1, t1)
    assert t3 + 9 + 2 * spin > t1 + 200       # IRQ1 and IRQ5 arrive during the spin
    h.run(until=30_000)
    evs = events(h)
    assert [e.vector for e in evs] == [PIC_BASE1 + 1, PIC_BASE1 + 5]
    entry = rec_u32(h, 0)
    assert entry == t3 + 5                                    # IRQ3 taken at t3; rdtsc is its 5th insn
    assert evs[0].tsc == t1 + RUNTIME_TSC                     # IRQ1 taken the moment it arrives
    assert spin_start <= evs[0].rip < spin_end                # ... inside IRQ3's handler
    assert rec_bytes(h, 2, slot=8) == bytes([0x08, 0x00])     # ISR: IR3 alone, then nothing
    t_rdtsc = rec_u32(h, 4)
    assert evs[1].tsc == t_rdtsc + 3 + RUNTIME_TSC            # rdtsc, mov, sti, nop: then IRQ5
    assert evs[1].rip == after_shadow
    assert h.machine.pic.master.isr == 0


def test_pic_level_request_that_went_away_while_if0_is_not_delivered() -> None:
    """A level request raised and dropped while IF=0 never reaches INTA: the 8259A's INT
    follows the level IRR, so at STI there is nothing to take (as on QEMU).  The default
    IR7 needs the request to vanish *during* the INTA cycle, which a CPU that acknowledges
    at an instruction boundary cannot show; tests/machine/devices/test_pic8259.py checks
    the PIC's answer (base + 7, no ISR bit) when acknowledge() finds no request."""
    a = Asm()
    a(pic_init(imr1=0xDF, imr2=0xFF))
    a(outb(ELCR1, 0x20))                       # IRQ5 level-triggered (PIIX3 ELCR)
    a.spin(5_000)                              # IF=0: IRQ5 raised and dropped meanwhile
    t_shadow = a("sti\nnop")
    a("idle: hlt\njmp idle")
    h = Harness.from_asm(a.source)
    install_runtime(h, eoi=0)
    level_at(h, 5, 3_000, True)
    level_at(h, 5, 6_000, False)
    assert 6_000 < t_shadow
    h.run(until=4_500)
    assert h.machine.pic.master.irr & 0x20          # the request was there while the line was high
    h.run(until=t_shadow + 20_000)
    assert vt(h) == []
    assert h.machine.pic.master.irr == 0 and h.machine.pic.master.isr == 0


def test_pic_spurious_irq15_from_a_slave_level_request_that_went_away() -> None:
    """The slave's INT drops with its level request, but the master latched the edge on
    IR2: at STI the master acknowledges IR2 (ISR bit 2) and the slave answers its default
    IR7 with no ISR bit: vector base2 + 7.  The guest EOIs the master only."""
    a = Asm()
    a(pic_init(imr1=0xFB, imr2=0xFB))          # cascade and IRQ10 unmasked
    a(outb(ELCR2, 0x04))                       # IRQ10 level-triggered
    a.spin(5_000)
    t_shadow = a("sti\nnop")
    a("idle: hlt\njmp idle")
    h = Harness.from_asm(a.source)
    install_runtime(h, eoi=EOI_PIC)
    hook = install_prehook(h, PIC_BASE2 + 7, f"""
        push rax
        push rbx
        mov rbx, {REC:#x}
        mov al, {OCW3_READ_ISR:#x}
        out 0x20, al
        out 0xa0, al
        in al, 0x20
        mov [rbx], al
        in al, 0xa0
        mov [rbx+1], al
        pop rbx
        pop rax
    """)
    level_at(h, 10, 3_000, True)
    level_at(h, 10, 6_000, False)
    h.run(until=t_shadow + 20_000)
    assert vt(h) == [(PIC_BASE2 + 7, t_shadow + hook + RUNTIME_TSC)]
    assert rec_bytes(h, 2) == bytes([0x04, 0x00])
    assert (h.machine.pic.master.isr, h.machine.pic.slave.isr) == (0, 0)


# -- local APIC priorities -------------------------------------------------------------------------------


def test_lapic_tpr_holds_a_lower_class_in_irr() -> None:
    """TPR 0x50: a self-IPI 0x51 (class 5) stays in IRR while 0x61 (class 6) is taken;
    lowering TPR to 0x40 delivers 0x51."""
    a = Asm()
    a(apic_mode())
    a(lapic_write(LAPIC_TPR, 0x50))
    a(lapic_write(LAPIC_ICR_LO, ICR_SELF_FIXED | 0x51))
    a(lapic_write(LAPIC_ICR_LO, ICR_SELF_FIXED | 0x61))
    t1 = a("sti\nnop")
    a.spin(1_000)                              # IF=1: 0x51 is not taken
    a(lapic_record(LAPIC_IRR0 + 0x20, 0))      # IRR bits 64..95
    a(lapic_record(LAPIC_PPR, 4))
    a("cli")
    a(lapic_write(LAPIC_TPR, 0x40))
    a("rdtsc\nmov r15, rax")                   # 0x61's handler ran in between: time from here
    a("sti\nnop")
    a("idle: hlt\njmp idle")
    h = Harness.from_asm(a.source)
    install_runtime(h)
    h.run(until=20_000)
    t2 = h.regs.r15 + 3                        # mov, sti, nop
    assert vt(h) == [(0x61, t1 + RUNTIME_TSC), (0x51, t2 + RUNTIME_TSC)]
    assert vector_bit(rec_u32(h, 0), 0x51) and rec_u32(h, 0) == 1 << (0x51 - 64)
    assert rec_u32(h, 4) == 0x50


def test_lapic_nesting_by_priority_class() -> None:
    """0x40's handler runs with IF=1: 0x80 (higher class) interrupts it at once; 0x41
    (same class) stays in IRR until 0x40's EOI.  Sources: IO-APIC pins driven at exact
    times."""
    spin = 2_000
    prefix = f"""
        push rax
        push rbx
        push rcx
        push rdx
        push rsi
        rdtsc
        mov rbx, {REC:#x}
        mov [rbx], eax
        sti
        mov ecx, {spin}"""
    loop = """
    spin:
        dec ecx
        jnz spin"""
    before_eoi = f"""
        mov rsi, {LAPIC + LAPIC_ISR0 + 0x20:#x}
        mov eax, dword ptr [rsi]
        mov [rbx+8], eax
        mov rsi, {LAPIC + LAPIC_IRR0 + 0x20:#x}
        mov eax, dword ptr [rsi]
        mov [rbx+12], eax
        mov rsi, {LAPIC + LAPIC_PPR:#x}
        mov eax, dword ptr [rsi]
        mov [rbx+16], eax
        cli
        mov rsi, {LAPIC + LAPIC_EOI:#x}
        mov dword ptr [rsi], 0
        rdtsc
        mov [rbx+4], eax
        sti
        nop"""
    tail = """
        nop
        pop rsi
        pop rdx
        pop rcx
        pop rbx
        pop rax
        iretq"""
    a = Asm()
    a(apic_mode())
    a(ioapic_route(5, 0x40))
    a(ioapic_route(6, 0x41))
    a(ioapic_route(7, 0x80))
    a.idle()
    h = Harness.from_asm(a.source)
    install_runtime(h)
    install_handler(h, 0x40, prefix + loop + before_eoi + tail)
    spin_start = address_after(prefix)
    spin_end = address_after(prefix + loop)
    after_shadow = address_after(prefix + loop + before_eoi)
    t40, t41, t80 = 10_000, 10_500, 11_000
    pulse_at(h, 5, t40)
    pulse_at(h, 6, t41)
    pulse_at(h, 7, t80)
    assert t40 + 10 + 2 * spin > t80 + 200
    h.run(until=30_000)
    evs = events(h)
    assert [e.vector for e in evs] == [0x80, 0x41]
    assert rec_u32(h, 0) == t40 + 6                           # 0x40 taken at t40; rdtsc is its 6th insn
    assert evs[0].tsc == t80 + RUNTIME_TSC
    assert spin_start <= evs[0].rip < spin_end
    assert rec_u32(h, 8) == 1 << 0                            # ISR: 0x40 only (0x80 was EOI'd)
    assert rec_u32(h, 12) == 1 << 1                           # IRR: 0x41 waiting
    assert rec_u32(h, 16) == 0x40                             # PPR = the in-service class
    assert evs[1].tsc == rec_u32(h, 4) + 3 + RUNTIME_TSC      # rdtsc, mov, sti, nop: then 0x41
    assert evs[1].rip == after_shadow
    lapic = h.machine.lapic
    assert [lapic.read(LAPIC_ISR0 + 0x10 * w, 4) for w in range(8)] == [0] * 8


# -- the stop-from-a-hook bug -----------------------------------------------------------------------


def _deliverable_with_if_set(kind: str) -> tuple[Harness, int, int, int]:
    """A guest whose write (at time t, with IF=1) makes vector v deliverable.
    Returns (harness, t, v, rip); the interrupt must be taken at t with the frame
    RIP on the instruction after the write."""
    a = Asm()
    if kind == "pic-unmask":
        a(pic_init(imr1=0xFF, imr2=0xFF))
        a("sti")
        a.spin(2_000)                          # IRQ5 pulsed (masked) meanwhile
        t = a(outb(PIC1_DATA, 0xDF))
        vector, eoi = PIC_BASE1 + 5, EOI_PIC
    else:
        a(apic_mode())
        vector, eoi = 0x51, EOI_LAPIC
        if kind == "self-ipi":
            a("sti\nnop")
            t = a(lapic_write(LAPIC_ICR_LO, ICR_SELF_FIXED | vector))
        else:                                  # "tpr"
            a(lapic_write(LAPIC_TPR, 0x50))
            a(lapic_write(LAPIC_ICR_LO, ICR_SELF_FIXED | vector))
            a("sti\nnop")
            t = a(lapic_write(LAPIC_TPR, 0))
    rip = address_after(a.source, ASM_ORG)
    a("nop\nnop\ncli\nhlt")
    h = Harness.from_asm(a.source)
    install_runtime(h, eoi=eoi)
    if kind == "pic-unmask":
        pulse_at(h, 5, 1_000)
    return h, t, vector, rip


@pytest.mark.parametrize("kind", ["pic-unmask", "self-ipi", "tpr"])
def test_interrupt_made_deliverable_by_a_write_with_if_set(kind: str) -> None:
    h, t, vector, rip = _deliverable_with_if_set(kind)
    h.run(until=t + 20_000)
    evs = events(h)
    assert [(e.vector, e.tsc, e.rip) for e in evs] == [(vector, t + RUNTIME_TSC, rip)]
    assert h.instructions < t + 100
