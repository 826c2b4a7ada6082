"""The port I/O cost model (MachineConfig.io_cost_ns, Clock.charge) seen from
bare-metal guests, on virtual time only.

Every expected number is derived from the model: an instruction costs 1 ns,
an IN or OUT costs 1 ns plus the port cost; the device answers at the start
of the bus cycle (at the end of the instruction's own ns) and the CPU waits
the cost out; an interrupt that becomes due during the cycle is taken at
the end of the instruction.  One 8N1 character at 115200 baud is 86,806 ns
(PC16550D: 10 bits of 16 x divisor 1 clocks of 1.8432 MHz).
"""
from __future__ import annotations

import pytest
from vmk.machine.pc import IO_COST_PC_NS, Machine, MachineConfig
from vmk.testing import Harness
from vmk.testing.baremetal import events, install_runtime

from irqkit import LAPIC, REC, RUNTIME_TSC, lapic_write, outb  # noqa: E402

COM1, LSR = 0x3F8, 0x3FD
C115200 = 86_806
LSR_THRE = 0x20
POLL_INSNS = 3                  # in al, dx / test al, 0x20 / jz wait
LAPIC_SVR, LAPIC_LVT_TIMER, LAPIC_INITIAL, LAPIC_DIVIDE = 0xF0, 0x320, 0x380, 0x3E0


def _polling_print(n: int) -> str:
    """115200 baud 8N1, FIFOs off; ``n`` bytes, each after polling LSR.THRE; exit."""
    return f"""
        mov dx, {COM1 + 3:#x}
        mov al, 0x83
        out dx, al
        mov dx, {COM1:#x}
        mov al, 1
        out dx, al
        mov dx, {COM1 + 1:#x}
        xor eax, eax
        out dx, al
        mov dx, {COM1 + 3:#x}
        mov al, 3
        out dx, al
        mov ecx, {n}
        mov bl, 0x41
    next:
        mov dx, {LSR:#x}
    wait:
        in al, dx
        test al, {LSR_THRE:#x}
        jz wait
        mov dx, {COM1:#x}
        mov al, bl
        out dx, al
        inc bl
        dec ecx
        jnz next
        mov dx, 0xf4
        xor eax, eax
        out dx, al
    """


class _Accesses:
    """Counts the CPU's port accesses (the ones the machine charges) and LSR reads per THR write."""

    def __init__(self, h: Harness) -> None:
        cpu = h.machine.cpu
        self.count = 0
        self.lsr_reads: list[int] = [0]
        port_in, port_out = cpu.port_in, cpu.port_out

        def counting_in(port: int, size: int) -> int:
            self.count += 1
            if port == LSR:
                self.lsr_reads[-1] += 1
            return port_in(port, size)

        def counting_out(port: int, size: int, value: int) -> None:
            self.count += 1
            if port == COM1:
                self.lsr_reads.append(0)
            port_out(port, size, value)

        cpu.port_in, cpu.port_out = counting_in, counting_out


def _run_polling(n: int, cost: int) -> tuple[Harness, _Accesses]:
    h = Harness.from_asm(_polling_print(n), io_cost_ns=cost)
    acc = _Accesses(h)
    r = h.run_to_end(10_000_000_000)
    assert r.exit_status == 1          # isa-debug-exit: (0 << 1) | 1, r.message
    assert h.serial(0).output == bytes(range(0x41, 0x41 + n))
    return h, acc


def test_the_pc_default_is_one_microsecond() -> None:
    assert IO_COST_PC_NS == 1_000
    assert Machine(MachineConfig()).config.io_cost_ns == 0         # the library stays icount-exact


def test_thre_polling_reads_per_byte_follow_the_cost() -> None:
    """At 1 us per access one poll takes 3 ns + 1000 ns, so a guest waiting one
    character time (86,806 ns) reads LSR 85 or 86 times (the write path takes
    another microsecond), as on a PC; at 0 cost it spun ~28,900 times per byte."""
    n = 8
    h, acc = _run_polling(n, IO_COST_PC_NS)
    period = POLL_INSNS + IO_COST_PC_NS
    # From one THR write to the next: k polls (the last one sees THRE) and the
    # rest of the write path (test, jz, mov, mov, out, inc, dec, jnz, mov: 9
    # instructions, one of them an OUT), which lasts one character time when
    # the transmitter never idles: k * period + WRITE_PATH ~ C115200.
    write_path = 9 + IO_COST_PC_NS - POLL_INSNS + 1
    lo = (C115200 - write_path) // period
    # lsr_reads[0] precedes the divisor write to offset 0, [1] and [2] the first
    # two bytes (they go straight into the shift register and THR); every later
    # byte waits for the one before it to leave the line.
    per_byte = acc.lsr_reads[3:-1]
    assert len(per_byte) == n - 2 and acc.lsr_reads[-1] == 0          # [-1]: after the last byte
    assert acc.lsr_reads[1:3] == [1, 1]
    assert all(k in (lo, lo + 1) for k in per_byte), per_byte
    assert lo == 85
    # The transmitter never idles: bytes leave exactly one character time apart.
    times = h.serial(0).times
    assert [b - a for a, b in zip(times, times[1:])] == [C115200] * (n - 1)


def test_virtual_time_is_instructions_plus_charged_io() -> None:
    h, acc = _run_polling(5, IO_COST_PC_NS)
    m = h.machine
    assert m.clock.charged == IO_COST_PC_NS * acc.count
    assert h.now == h.instructions * 1 + m.clock.charged


def test_two_runs_are_identical() -> None:
    runs = []
    for _ in range(2):
        h, acc = _run_polling(4, IO_COST_PC_NS)
        runs.append((h.instructions, h.now, h.serial(0).times, acc.lsr_reads))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("cost", [0, 250, IO_COST_PC_NS, 40_000])
def test_a_cost_per_port_is_charged_once_per_access(cost: int) -> None:
    """port 0x80 (POST) read 10 times in straight-line code, then exit."""
    src = "\n".join(["in al, 0x80"] * 10) + "\n" + outb(0xF4, 0)
    h = Harness.from_asm(src, io_cost_ns=cost)
    r = h.run_to_end()
    assert r.exit_status == 1          # isa-debug-exit: (0 << 1) | 1
    # 11 accesses (10 IN, the exit OUT); 10 + 2 instructions.
    assert h.instructions == 12
    assert h.now == 12 + 11 * cost


def test_a_per_port_cost_overrides_the_bus_default() -> None:
    h = Harness.from_asm("in al, 0x80\nin al, 0x80\n" + outb(0xF4, 0), io_cost_ns=1_000)
    for port in (0x80, 0xF4):
        h.machine.ports.cost[port] = 7
    h.run_to_end()
    assert h.now == 4 + 3 * 7


def test_negative_costs_are_refused() -> None:
    with pytest.raises(ValueError):
        Harness(io_cost_ns=-1)
    with pytest.raises(ValueError):
        Harness(mmio_cost_ns={"hpet": 5})
    with pytest.raises(ValueError):
        Harness(mmio_cost_ns={"lapic": -5})


def test_an_mmio_window_cost_is_charged_per_guest_access() -> None:
    src = f"mov rsi, {LAPIC + 0x30:#x}\nmov eax, [rsi]\nmov eax, [rsi]\nmov [rsi+0x50], eax\n" + outb(0xF4, 0)
    h = Harness.from_asm(src, io_cost_ns=0, mmio_cost_ns={"lapic": 100})
    h.run_to_end()
    assert h.now == 6 + 3 * 100                 # 6 instructions, 3 LAPIC accesses, free port I/O
    assert h.machine.clock.charged == 300


def _deadline_guest(count: int, cost: int) -> tuple[Harness, int]:
    """A LAPIC one-shot of ``count`` ns (divide 1, vector 0x41) while the guest
    reads port 0x80 in a loop; returns the harness and the loop's first
    instruction's end time minus the load time (from the program)."""
    src = "\n".join([
        outb(0x21, 0xFF), outb(0xA1, 0xFF),             # the PIC's latched IRQ0 (reset state) masked away
        lapic_write(LAPIC_SVR, 0x1FF),
        lapic_write(LAPIC_DIVIDE, 0b1011),               # divide by 1
        lapic_write(LAPIC_LVT_TIMER, 0x41),
        lapic_write(LAPIC_INITIAL, count),               # loaded at the end of this store: t_load
        "rdtsc",                                         # t_load + 1
        f"mov rdi, {REC:#x}",
        "mov [rdi], eax",
        "sti",
        "spin: in al, 0x80",
        "jmp spin",
    ])
    h = Harness.from_asm(src, io_cost_ns=cost)
    install_runtime(h)
    return h, 0


@pytest.mark.parametrize("cost", [IO_COST_PC_NS, 40_000])
def test_a_deadline_crossed_by_an_io_cycle_fires_after_that_instruction(cost: int) -> None:
    """The timer expires in the middle of an IN's bus cycle: the interrupt is
    taken at the end of that IN, neither earlier nor one more access later.
    The count puts the deadline 10 ns into the 50th IN: a slice sized in
    instructions would run past it by up to the sum of all the charges."""
    # After the store (t_load): rdtsc, mov, mov, sti = 4 ns, then [IN: 1 + cost, JMP: 1] per loop.
    boundaries = []
    t = 4
    for _ in range(60):
        t += 1 + cost
        boundaries.append(t)
        t += 1
        boundaries.append(t)
    in_end = boundaries[2 * 49]
    count = in_end - cost + 10
    h, _ = _deadline_guest(count, cost)
    h.run(until=in_end + 10 * cost)
    t_load = int.from_bytes(h.machine.read_physical(REC, 4), "little") - 1
    evs = events(h)
    assert [e.vector for e in evs] == [0x41]
    assert evs[0].tsc == t_load + in_end + RUNTIME_TSC
    assert in_end > count                                          # the IN did cross the deadline
