"""Hardware interrupts on the whole machine, at exact virtual times.

Small assembly guests (``Harness.from_asm`` + the bare-metal runtime) program
the PIT, the local APIC timer and the 16550 UART; the runtime's handler logs
the TSC of every delivery.  Every expected time is derived from the program
and the device rules, never read from a run:

* the guest starts at t = 0 and every instruction costs 1 ns, so the k-th
  instruction of straight-line code ends at t = k (:class:`Asm` counts them);
  a register write or read happens at the end of its instruction;
* an interrupt that becomes deliverable at time D while the CPU is halted, or
  running with IF=1, is delivered at D, and the runtime's ``rdtsc`` executes
  :data:`RUNTIME_TSC` instructions later (counted from the runtime's source);
* PIT: 1 193 182 Hz, clock edge T at ceil(T * 1e9 / 1193182) ns; a count
  written at tick t0 (floor of the write time in ticks) gives mode-2 rising
  edges at t0 + kN and the mode-0 rising edge at t0 + N;
* LAPIC timer: initial count N, divide D: expiry N * D ns after the write;
  current count N - floor(elapsed / D) (periodic: modulo N);
* UART: one character = 10 bits (8N1) of divisor * 16 clocks of 1.8432 MHz,
  rounded up to the ns; received bytes complete one character time apart.

A register write that arms a timer earlier than the end of the running slice
ends the slice right after that instruction (CPU.request_stop cuts Unicorn's
count budget); the tests at the end of each section check that this changes
neither the instruction count nor the outcome.
"""
from __future__ import annotations

import struct

import pytest
from vmk.testing import Harness, assemble
from vmk.testing import baremetal
from vmk.testing.baremetal import EOI_LAPIC, EOI_PIC, events, install_runtime

# -- machine facts (machine_api.md) -------------------------------------------------------------------

LAPIC_SVR = 0xF0
LAPIC_LVT_TIMER, LAPIC_INITIAL, LAPIC_CURRENT, LAPIC_DIVIDE = 0x320, 0x380, 0x390, 0x3E0
SVR_ENABLED = 0x1FF
LVT_PERIODIC = 1 << 17
DIVIDE_CONFIG = {1: 0b1011, 2: 0b0000, 16: 0b0011, 128: 0b1010}     # SDM Figure 11-10

PIT_HZ = 1_193_182
PIT_CH0, PIT_CONTROL = 0x40, 0x43
PIT_CH0_LOHI_MODE0 = 0x30
PIT_CH0_LOHI_MODE2 = 0x34

COM1 = 0x3F8
UART_THR, UART_IER, UART_IIR, UART_LCR, UART_MCR, UART_LSR = 0, 1, 2, 3, 4, 5
LCR_DLAB, LCR_8N1 = 0x80, 0x03
FCR_ENABLE = 0x01
FCR_TRIGGER = {1: 0x00, 4: 0x40, 8: 0x80, 14: 0xC0}
IER_RX, IER_THRE = 0x01, 0x02
MCR_OUT2, MCR_LOOP = 0x08, 0x10
IIR_FIFO = 0xC0
IIR_THRE, IIR_RX_DATA, IIR_TIMEOUT = 0x02, 0x04, 0x0C
BAUD_CLOCK = 1_843_200
FRAME_BITS_8N1 = 10
TIMEOUT_CHARS = 4

QUANTUM = 1_000_000            # MachineConfig.quantum: instructions (= ns) per slice at most


# -- counting instructions ---------------------------------------------------------------------------

from irqkit import HOOKS, IOAPIC, LAPIC, REC, RUNTIME_TSC, Asm, count_insns, ioapic_write, lapic_write, outb  # noqa: E402,F401


def ioapic_route(pin: int, low: int, dest: int = 0) -> str:
    return ioapic_write(0x11 + 2 * pin, dest << 24) + "\n" + ioapic_write(0x10 + 2 * pin, low)


def pic_init(base1: int, base2: int, imr1: int, imr2: int) -> str:
    """ICW1-4 for both chips (edge, cascade, 8086 mode), then the masks."""
    return "\n".join([outb(0x20, 0x11), outb(0x21, base1), outb(0x21, 0x04), outb(0x21, 0x01),
                      outb(0xA0, 0x11), outb(0xA1, base2), outb(0xA1, 0x02), outb(0xA1, 0x01),
                      outb(0x21, imr1), outb(0xA1, imr2)])


def pic_mask_all() -> str:
    """The PIC at reset has IRQ0 (the PIT's OUT is high) latched and unmasked: mask it away."""
    return outb(0x21, 0xFF) + "\n" + outb(0xA1, 0xFF)


def uart_setup(divisor: int, fcr: int, ier: int, mcr: int = MCR_OUT2) -> str:
    return "\n".join([outb(COM1 + UART_LCR, LCR_DLAB), outb(COM1 + UART_THR, divisor & 0xFF),
                      outb(COM1 + UART_IER, divisor >> 8), outb(COM1 + UART_LCR, LCR_8N1),
                      outb(COM1 + UART_IIR, fcr), outb(COM1 + UART_MCR, mcr), outb(COM1 + UART_IER, ier)])


def set_gate(h: Harness, vector: int, addr: int) -> None:
    """A ring-0 interrupt gate for ``vector`` to ``addr`` (same shape as the runtime's)."""
    gate = struct.pack("<HHBBHII", addr & 0xFFFF, baremetal.SEL.KCODE, 0, 0x8E, (addr >> 16) & 0xFFFF,
                       addr >> 32, 0)
    h.machine.write_physical(baremetal.IDT_BASE + 16 * vector, gate)


def install_prehook(h: Harness, vector: int, body: str, addr: int = HOOKS) -> int:
    """Run straight-line ``body`` on ``vector`` first, then the runtime's stub (log, EOI, iretq).
    Returns the hook's instruction count: the runtime logs tsc = delivery + it + RUNTIME_TSC."""
    src = body + f"\njmp {baremetal.STUBS + 16 * vector:#x}"
    h.machine.write_physical(addr, assemble(src, addr))
    set_gate(h, vector, addr)
    return count_insns(src)


def record_port_hook(*ports: int) -> str:
    """Hook body: append one byte read from each of ``ports`` to the REC byte log (qword count first)."""
    lines = ["push rax", "push rbx", "push rcx", "push rdx", f"mov rbx, {REC:#x}", "mov rcx, [rbx]"]
    for i, port in enumerate(ports):
        lines += [f"mov dx, {port:#x}", "in al, dx", f"mov [rbx+rcx+{8 + i}], al"]
    lines += [f"add rcx, {len(ports)}", "mov [rbx], rcx", "pop rdx", "pop rcx", "pop rbx", "pop rax"]
    return "\n".join(lines)


def recorded_bytes(h: Harness) -> bytes:
    n = struct.unpack("<Q", h.machine.read_physical(REC, 8))[0]
    return h.machine.read_physical(REC + 8, n)


def u32_at(h: Harness, addr: int) -> int:
    return struct.unpack("<I", h.machine.read_physical(addr, 4))[0]


def tscs(h: Harness, vector: int | None = None) -> list[int]:
    return [e.tsc for e in events(h) if vector is None or e.vector == vector]


def pit_tick(ns: int) -> int:
    """PIT clock edges in (0, ns]."""
    return ns * PIT_HZ // 1_000_000_000


def pit_edge_ns(tick: int) -> int:
    """Virtual time of PIT clock edge ``tick``: never early."""
    return -(-tick * 1_000_000_000 // PIT_HZ)


def char_ns(divisor: int) -> int:
    """One 8N1 character at this divisor, rounded up to the ns."""
    return -(-FRAME_BITS_8N1 * divisor * 16 * 1_000_000_000 // BAUD_CLOCK)


def test_derived_constants_are_what_the_rules_say() -> None:
    assert RUNTIME_TSC == 32                      # 3 stub + 28 common + rdtsc
    assert char_ns(1) == 86_806                   # 115200 baud: 86805.55.. ns rounded up
    assert char_ns(12) == 1_041_667               # 9600 baud
    assert pit_edge_ns(1) == 839 and pit_tick(838) == 0 and pit_tick(839) == 1


def test_instruction_counting_matches_rdtsc() -> None:
    """The counting rule the other tests rely on: the k-th instruction ends at t = k."""
    a = Asm()
    a(pic_mask_all())
    a.spin(10)
    t = a("rdtsc")
    a("cli\nhlt")
    h = Harness.from_asm(a.source)
    h.run_for(1000)
    assert h.regs.rax == t == 4 + 21 + 1


# -- PIT -------------------------------------------------------------------------------------------------


def _pit_guest(route: str, mode_cw: int, reload: int) -> tuple[Harness, int, int]:
    """Program the PIT and the chosen path; returns (harness, time of the count's MSB write, vector)."""
    a = Asm()
    if route == "pic":
        vector = 0x20
        a(pic_init(0x20, 0x28, imr1=0xFE, imr2=0xFF))          # LAPIC left at reset: LINT0 ExtINT
    else:
        vector = 0x30
        a(pic_mask_all())
        a(lapic_write(LAPIC_SVR, SVR_ENABLED))
        a(ioapic_route(2, vector))                              # IRQ0 is IO-APIC pin 2
    a(outb(PIT_CONTROL, mode_cw))
    a(outb(PIT_CH0, reload & 0xFF))
    t_load = a(outb(PIT_CH0, reload >> 8))
    a.idle()
    h = Harness.from_asm(a.source)
    install_runtime(h, eoi=EOI_PIC if route == "pic" else EOI_LAPIC)
    return h, t_load, vector


@pytest.mark.parametrize("route", ["pic", "ioapic"])
@pytest.mark.parametrize("reload", [100, 2000])
def test_pit_mode2_interrupts_at_pit_edges(route: str, reload: int) -> None:
    h, t_load, vector = _pit_guest(route, PIT_CH0_LOHI_MODE2, reload)
    t0 = pit_tick(t_load)
    edges = [pit_edge_ns(t0 + k * reload) for k in range(1, 9)]
    h.run(until=edges[-1] + 2000)
    assert h.machine.log_lines == []
    evs = events(h)
    assert [e.vector for e in evs] == [vector] * len(edges)
    assert [e.tsc for e in evs] == [d + RUNTIME_TSC for d in edges]
    # Every period is N ticks; edge times are rounded up each on its own, so a period
    # in ns is floor or ceil of N * 1e9 / 1193182.
    periods = {b.tsc - a.tsc for a, b in zip(evs, evs[1:])}
    assert periods <= {reload * 10**9 // PIT_HZ, reload * 10**9 // PIT_HZ + 1}


def test_pit_mode0_one_shot_interrupts_once() -> None:
    reload = 3000
    h, t_load, vector = _pit_guest("pic", PIT_CH0_LOHI_MODE0, reload)
    terminal = pit_edge_ns(pit_tick(t_load) + reload)
    h.run(until=terminal + 10 * reload * 10**9 // PIT_HZ)
    assert [(e.vector, e.tsc) for e in events(h)] == [(vector, terminal + RUNTIME_TSC)]


@pytest.mark.parametrize("reload", [1193, 11932])
def test_pit_rate_follows_the_reload_value(reload: int) -> None:
    """About 1000 Hz and 100 Hz over 55.5 ms: the count is exactly the number of edges before the end."""
    end = 55_500_000
    h, t_load, vector = _pit_guest("ioapic", PIT_CH0_LOHI_MODE2, reload)
    t0 = pit_tick(t_load)
    edges = [pit_edge_ns(t0 + k * reload) for k in range(1, 200)]
    assert all(abs(d - end) > 10_000 for d in edges)            # no edge near the cut
    expected = [d + RUNTIME_TSC for d in edges if d < end]
    h.run(until=end)
    assert tscs(h, vector) == expected
    assert len(expected) == end * PIT_HZ // (reload * 10**9)    # 55 and 5


# -- LAPIC timer ---------------------------------------------------------------------------------------

# Counts whose expiry N*D is beyond one slice quantum (see the module docstring).
LONG_COUNTS = {1: 1_234_567, 2: 654_321, 16: 76_543, 128: 9_999}


def _lapic_timer_guest(divide: int, count: int, lvt: int) -> tuple[Asm, int]:
    """Program the timer; returns the code so far and the time of the initial-count write."""
    a = Asm()
    a(pic_mask_all())
    a(lapic_write(LAPIC_SVR, SVR_ENABLED))
    a(lapic_write(LAPIC_DIVIDE, DIVIDE_CONFIG[divide]))
    a(lapic_write(LAPIC_LVT_TIMER, lvt))
    t_load = a(lapic_write(LAPIC_INITIAL, count))
    return a, t_load


@pytest.mark.parametrize("divide", sorted(LONG_COUNTS))
def test_lapic_timer_periodic_interval_is_count_times_divide(divide: int) -> None:
    n = LONG_COUNTS[divide]
    assert n * divide > QUANTUM
    a, t_load = _lapic_timer_guest(divide, n, LVT_PERIODIC | 0x40)
    a.idle()
    h = Harness.from_asm(a.source)
    install_runtime(h)
    h.run(until=t_load + 5 * n * divide + 1000)
    assert tscs(h) == [t_load + k * n * divide + RUNTIME_TSC for k in range(1, 6)]
    assert {e.vector for e in events(h)} == {0x40}


@pytest.mark.parametrize("divide", sorted(LONG_COUNTS))
def test_lapic_timer_one_shot_fires_once(divide: int) -> None:
    n = LONG_COUNTS[divide]
    a, t_load = _lapic_timer_guest(divide, n, 0x41)
    a.idle()
    h = Harness.from_asm(a.source)
    install_runtime(h)
    h.run(until=t_load + 6 * n * divide)
    assert [(e.vector, e.tsc) for e in events(h)] == [(0x41, t_load + n * divide + RUNTIME_TSC)]


@pytest.mark.parametrize("divide", sorted(LONG_COUNTS))
@pytest.mark.parametrize("periodic", [False, True], ids=["one-shot", "periodic"])
def test_lapic_timer_current_count_read_by_the_guest(divide: int, periodic: bool) -> None:
    """Read the current count mid-way (in the second period when periodic), and in
    one-shot mode again after expiry (0).  IF stays 0: only the reads matter."""
    n = LONG_COUNTS[divide]
    span = n * divide
    a, t_load = _lapic_timer_guest(divide, n, (LVT_PERIODIC if periodic else 0) | 0x40)
    a.spin(3 * span // 4 if periodic else span // 4)              # 1.5 or 0.5 periods in
    a(f"mov rsi, {LAPIC + LAPIC_CURRENT:#x}")
    t_read1 = a("mov eax, dword ptr [rsi]")
    a(f"mov rdi, {REC:#x}\nmov dword ptr [rdi], eax")
    a.spin(span // 2)                                               # one more period
    t_read2 = a("mov eax, dword ptr [rsi]")
    a("mov dword ptr [rdi+4], eax\ncli\nhlt")
    h = Harness.from_asm(a.source)
    install_runtime(h)
    h.run(until=t_read2 + 1000)
    ticks1, ticks2 = (t_read1 - t_load) // divide, (t_read2 - t_load) // divide
    if periodic:
        assert n < ticks1 < 2 * n
        expected = (n - ticks1 % n, n - ticks2 % n)
    else:
        assert 0 < ticks1 < n <= ticks2
        expected = (n - ticks1, 0)
    assert (u32_at(h, REC), u32_at(h, REC + 4)) == expected


@pytest.mark.parametrize("divide", [1, 16])
def test_lapic_timer_short_count_fires_n_times_d_after_the_write(divide: int) -> None:
    n = 1000
    a, t_load = _lapic_timer_guest(divide, n, 0x40)
    t_after = a("rdtsc")
    a(f"mov rdi, {REC:#x}\nmov [rdi], rax")
    a.idle()
    h = Harness.from_asm(a.source)
    install_runtime(h)
    h.run(until=t_load + 3 * n * divide)
    assert struct.unpack("<Q", h.machine.read_physical(REC, 8))[0] == t_after
    assert tscs(h) == [t_load + n * divide + RUNTIME_TSC]


# -- idle --------------------------------------------------------------------------------------------------


def test_hlt_idle_costs_no_instructions() -> None:
    """sti; hlt with a 1 ms periodic timer: 100 ms of virtual time for a few thousand
    instructions (a busy CPU would retire 10^8)."""
    a, t_load = _lapic_timer_guest(1, 1_000_000, LVT_PERIODIC | 0x40)
    a.idle()
    h = Harness.from_asm(a.source)
    install_runtime(h)
    end = t_load + 100_000_000 + 500
    r = h.run(until=end)
    assert r.why.value == "time-limit" and h.now == end
    assert tscs(h) == [t_load + k * 1_000_000 + RUNTIME_TSC for k in range(1, 101)]
    # Each wakeup runs the runtime handler (56 instructions) plus jmp and hlt: nothing
    # is spent between the wakeups.
    assert h.instructions - t_load < 100 * 64


# -- UART ------------------------------------------------------------------------------------------------

UART_VECTOR = 0x24


def _uart_guest(a: Asm, hook_ports: tuple[int, ...] = (COM1 + UART_IIR,)) -> tuple[Harness, int]:
    a.idle()
    h = Harness.from_asm(a.source)
    install_runtime(h)
    hook = install_prehook(h, UART_VECTOR, record_port_hook(*hook_ports))
    return h, hook


def _uart_prologue(divisor: int, fcr: int, ier: int, mcr: int = MCR_OUT2) -> Asm:
    a = Asm()
    a(pic_mask_all())
    a(lapic_write(LAPIC_SVR, SVR_ENABLED))
    a(ioapic_route(4, UART_VECTOR))
    a(uart_setup(divisor, fcr, ier, mcr))
    return a


@pytest.mark.parametrize("trigger,divisor", [(4, 1), (8, 1), (4, 12)])
def test_uart_rx_interrupt_at_fifo_trigger_level(trigger: int, divisor: int) -> None:
    a = _uart_prologue(divisor, FCR_ENABLE | FCR_TRIGGER[trigger], IER_RX)
    h, hook = _uart_guest(a)
    c = char_ns(divisor)
    t_in = 50_000
    assert a.t < t_in
    h.serial(0).write(b"0123456789", at=t_in)
    h.run(until=t_in + 10 * c + TIMEOUT_CHARS * c + 10_000)
    # One edge: the line rises when the trigger-th byte completes and stays up (nothing reads).
    assert tscs(h) == [t_in + trigger * c + hook + RUNTIME_TSC]
    assert recorded_bytes(h) == bytes([IIR_FIFO | IIR_RX_DATA])
    assert h.machine.uarts[0].read(UART_LSR, 1) & 0x01


@pytest.mark.parametrize("nbytes", [1, 3])
def test_uart_character_timeout_below_trigger_level(nbytes: int) -> None:
    c = char_ns(1)
    a = _uart_prologue(1, FCR_ENABLE | FCR_TRIGGER[4], IER_RX)
    h, hook = _uart_guest(a)
    t_in = 20_000
    h.serial(0).write(b"xyz"[:nbytes], at=t_in)
    h.run(until=t_in + (nbytes + TIMEOUT_CHARS + 2) * c)
    assert tscs(h) == [t_in + (nbytes + TIMEOUT_CHARS) * c + hook + RUNTIME_TSC]
    assert recorded_bytes(h) == bytes([IIR_FIFO | IIR_TIMEOUT])


def test_uart_thre_interrupt_when_the_fifo_drains() -> None:
    """Three bytes: the first goes straight to the shift register, THRE rises when the
    third leaves the FIFO (two character times later); the IIR read clears it."""
    c = char_ns(1)
    a = _uart_prologue(1, FCR_ENABLE, 0)
    a(f"mov dx, {COM1:#x}")
    w1 = a("mov al, 0x61\nout dx, al")
    a("mov al, 0x62\nout dx, al\nmov al, 0x63\nout dx, al")
    a(outb(COM1 + UART_IER, IER_THRE))            # THRE is clear now: no interrupt yet
    h, hook = _uart_guest(a)
    h.run(until=w1 + 5 * c)
    assert tscs(h) == [w1 + 2 * c + hook + RUNTIME_TSC]
    assert recorded_bytes(h) == bytes([IIR_FIFO | IIR_THRE])
    assert h.serial(0).output == b"abc"
    assert h.serial(0).times == [w1 + c, w1 + 2 * c, w1 + 3 * c]


def test_uart_loopback_echo_raises_rx_interrupts() -> None:
    """MCR loop: each transmitted byte arrives in the RX FIFO one character time after
    it started; trigger 1, and the hook reads IIR and the byte, so every byte interrupts."""
    c = char_ns(1)
    a = _uart_prologue(1, FCR_ENABLE | FCR_TRIGGER[1], IER_RX, MCR_OUT2 | MCR_LOOP)
    a(f"mov dx, {COM1:#x}")
    w1 = a("mov al, 0x78\nout dx, al")
    a("mov al, 0x79\nout dx, al\nmov al, 0x7a\nout dx, al")
    h, hook = _uart_guest(a, hook_ports=(COM1 + UART_IIR, COM1 + UART_THR))
    h.run(until=w1 + 6 * c)
    assert tscs(h) == [w1 + k * c + hook + RUNTIME_TSC for k in (1, 2, 3)]
    rx = IIR_FIFO | IIR_RX_DATA
    assert recorded_bytes(h) == bytes([rx, 0x78, rx, 0x79, rx, 0x7A])
    assert h.serial(0).output == b""                 # loopback: nothing on the wire


# -- determinism and snapshots -------------------------------------------------------------------------

BUSY_END = 6_000_000
BUSY_INPUT = b"The quick brown fox jumps over the lazy dog"
BUSY_PIT_RELOAD = 120
BUSY_LAPIC_COUNT = 1_100_000


def _busy_guest() -> tuple[Harness, int, int]:
    """PIT at ~10 kHz and a 1.1 ms LAPIC timer through the IO-APIC/LAPIC, COM1 echoing
    its input from the interrupt handler, and a main loop that computes with IF=1 so
    interrupts land on arbitrary instructions.  Returns (harness, PIT load, LAPIC load)."""
    a = Asm()
    a(pic_mask_all())
    a(lapic_write(LAPIC_SVR, SVR_ENABLED))
    a(ioapic_route(2, 0x30))
    a(ioapic_route(4, UART_VECTOR))
    a(uart_setup(1, FCR_ENABLE, IER_RX))
    a(outb(PIT_CONTROL, PIT_CH0_LOHI_MODE2) + "\n" + outb(PIT_CH0, BUSY_PIT_RELOAD))
    t_pit = a(outb(PIT_CH0, 0))
    a(lapic_write(LAPIC_DIVIDE, DIVIDE_CONFIG[1]))
    a(lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | 0x40))
    t_lapic = a(lapic_write(LAPIC_INITIAL, BUSY_LAPIC_COUNT))
    a("xor r8, r8\nxor r9, r9\nsti\nmain: inc r8\nadd r9, r8\nrol r9, 3\njmp main")
    h = Harness.from_asm(a.source)
    install_runtime(h)
    echo = "push rax\npush rdx\nmov dx, 0x3f8\nin al, dx\nout dx, al\npop rdx\npop rax"
    install_prehook(h, UART_VECTOR, echo)
    h.serial(0).write(BUSY_INPUT, at=1_000_000)
    return h, t_pit, t_lapic


def _outcome(h: Harness, out_from: int = 0) -> dict:
    return {
        "events": events(h),
        "serial": h.serial(0).output[out_from:],
        "serial_times": h.serial(0).times[out_from:],
        "instructions": h.instructions,
        "now": h.now,
        "r8": h.regs.r8,
        "r9": h.regs.r9,
        "rip": h.regs.rip,
    }


def test_busy_guest_does_what_it_should() -> None:
    """Interrupts may wait for another handler here, so counts, not times."""
    h, t_pit, t_lapic = _busy_guest()
    h.run(until=BUSY_END)
    evs = events(h)
    assert h.machine.log_lines == []
    assert h.serial(0).output == BUSY_INPUT
    assert sum(e.vector == UART_VECTOR for e in evs) == len(BUSY_INPUT)
    t0 = pit_tick(t_pit)
    pit_edges = [d for d in (pit_edge_ns(t0 + k * BUSY_PIT_RELOAD) for k in range(1, 100)) if d < BUSY_END]
    assert BUSY_END - pit_edges[-1] > 10_000
    assert sum(e.vector == 0x30 for e in evs) == len(pit_edges)
    assert sum(e.vector == 0x40 for e in evs) == (BUSY_END - t_lapic) // BUSY_LAPIC_COUNT == 5
    assert h.regs.r8 > BUSY_END // 8                # the main loop got most of the CPU


def test_same_guest_twice_is_identical() -> None:
    first, _, _ = _busy_guest()
    first.run(until=BUSY_END)
    second, _, _ = _busy_guest()
    second.run(until=BUSY_END)
    assert _outcome(second) == _outcome(first)
    assert second.irq_counts == first.irq_counts


def test_run_boundaries_do_not_change_the_outcome() -> None:
    whole, _, _ = _busy_guest()
    whole.run(until=BUSY_END)
    pieces, _, _ = _busy_guest()
    for t in (1, 333_333, 1_000_000, 1_000_001, 2_222_222, 3_000_017, 4_999_999, BUSY_END):
        pieces.run(until=t)
    assert _outcome(pieces) == _outcome(whole)


def test_snapshot_round_trip_same_and_fresh_machine() -> None:
    mid = 2_500_000
    h, _, _ = _busy_guest()
    h.run(until=mid)
    snap = h.machine.snapshot()
    at_snap = len(h.serial(0).output)
    h.run(until=BUSY_END)
    first = _outcome(h, at_snap)
    assert len(first["serial"]) > 10 and len(first["events"]) > 40

    after_first = len(h.serial(0).output)
    h.machine.restore(snap)
    assert h.now == mid
    h.run(until=BUSY_END)
    again = _outcome(h, after_first)
    assert again == first

    fresh = Harness()
    fresh.machine.restore(snap)
    fresh.run(until=BUSY_END)
    assert _outcome(fresh) == first


# -- the stop-from-a-hook bug -------------------------------------------------------------------------


def test_instruction_time_does_not_depend_on_the_run_limit() -> None:
    """The same guest read rdtsc after programming the PIT; the first PIT edge is 83.8 us
    after the write.  A run limited to 5 us and one limited to 1 ms must agree."""
    a = Asm()
    a(pic_mask_all())
    a(outb(PIT_CONTROL, PIT_CH0_LOHI_MODE2) + "\n" + outb(PIT_CH0, 100) + "\n" + outb(PIT_CH0, 0))
    t = a("nop\nnop\nrdtsc")
    a("cli\nhlt")
    seen = []
    for limit in (5_000, 1_000_000):
        h = Harness.from_asm(a.source)
        h.run(until=limit)
        seen.append((h.regs.rax, h.instructions))
    assert seen == [(t, t + 2)] * 2


def test_run_boundary_at_a_preempting_write_does_not_change_the_outcome() -> None:
    whole, _, _ = _busy_guest()
    whole.run(until=BUSY_END)
    pieces, t_pit, _ = _busy_guest()
    pieces.run(until=t_pit)
    pieces.run(until=BUSY_END)
    assert _outcome(pieces) == _outcome(whole)
