"""The machine's side of tracing (machine/trace.py): IRQ lines, deliveries, EOIs and
timer deadlines, at exact virtual times, and a traced run that is the same run."""
from __future__ import annotations

from irqkit import RUNTIME_TSC, Asm, lapic_write, outb
from vmk.machine.trace import Tracer
from vmk.testing import Harness
from vmk.testing.baremetal import events, install_runtime
from vmk.tools.trace import vcd_text

LAPIC_SVR, LAPIC_LVT_TIMER, LAPIC_INITIAL, LAPIC_DIVIDE = 0xF0, 0x320, 0x380, 0x3E0
SVR_ENABLED = 0x1FF
LVT_PERIODIC = 1 << 17
DIVIDE_BY_1 = 0b1011
COUNT = 50_000                  # ns between timer interrupts (divide by 1)
VECTOR = 0x40


def _timer_guest() -> tuple[str, int]:
    a = Asm()
    a(outb(0x21, 0xFF) + "\n" + outb(0xA1, 0xFF))          # PIC masked: the LAPIC timer only
    a(lapic_write(LAPIC_SVR, SVR_ENABLED))
    a(lapic_write(LAPIC_DIVIDE, DIVIDE_BY_1))
    a(lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | VECTOR))
    t_load = a(lapic_write(LAPIC_INITIAL, COUNT))
    a.idle()
    return a.source, t_load


def _run(trace: bool) -> tuple[Harness, int]:
    source, t_load = _timer_guest()
    h = Harness.from_asm(source, trace=trace)
    install_runtime(h)
    h.run(until=t_load + 3 * COUNT + 1_000)
    return h, t_load


def test_deliveries_eois_and_deadlines_at_their_virtual_times() -> None:
    h, t_load = _run(trace=True)
    assert h.trace is not None
    due = [t_load + k * COUNT for k in (1, 2, 3)]
    delivered = h.trace.events(kind="irq", event="delivered", vector=VECTOR)
    assert [e.ts for e in delivered] == due
    assert all(e.track == ("cpu", 0, "interrupts") for e in delivered)
    # The runtime's handler EOIs after logging the TSC; the EOI follows each delivery.
    eois = [e.ts for e in h.trace.events(kind="irq", event="eoi", vector=VECTOR)]
    assert len(eois) == 3 and all(d < e < d + COUNT for d, e in zip(due, eois))
    assert [e.tsc for e in events(h)] == [d + RUNTIME_TSC for d in due]
    # The timer's deadline is armed at the initial-count write, then at each expiry.
    armed = h.trace.events(kind="timer", timer="lapic timer")
    assert [(e.ts, e.args["at"]) for e in armed if e.args["at"] is not None][:4] == \
        [(t_load, due[0]), (due[0], due[1]), (due[1], due[2]), (due[2], due[2] + COUNT)]


def test_a_traced_run_is_the_same_run() -> None:
    traced, _ = _run(trace=True)
    plain, _ = _run(trace=False)
    assert plain.trace is None and plain.machine.tracer is None
    assert (traced.instructions, traced.now, [e.tsc for e in events(traced)]) == \
        (plain.instructions, plain.now, [e.tsc for e in events(plain)])


def test_irq_lines_are_counters_and_vcd_wires() -> None:
    h = Harness.from_asm("hlt", trace=True)
    line = h.machine.isa_irq[5]
    clock = h.machine.clock
    clock.timer(line.raise_).arm(1_000)
    clock.timer(line.lower).arm(3_500)
    clock.timer(line.pulse).arm(7_000)
    h.run(until=10_000)
    assert h.trace.line("irq5") == [(0, 0), (1_000, 1), (3_500, 0), (7_000, 1), (7_000, 0)]
    vcd = vcd_text(h.machine.tracer)
    head, _, body = vcd.partition("$enddefinitions $end")
    ids = dict(reversed(ln.split()[3:5]) for ln in head.splitlines() if ln.startswith("$var"))
    assert "$timescale 1ns $end" in head and set(ids) >= {"irq0", "irq5", "pit", "rtc"}
    wire = ids["irq5"]
    changes, now = [], 0
    for ln in body.split():
        if ln.startswith("#"):
            now = int(ln[1:])
        elif ln[1:] == wire:
            changes.append((now, ln[0]))
    # The zero-width pulse at 7000 ns is drawn 1 ns wide.
    assert changes == [(0, "0"), (1_000, "1"), (3_500, "0"), (7_000, "1"), (7_001, "0")]


def test_a_tracer_goes_on_across_machines() -> None:
    """vmk boot reboots into a new machine: the second machine's times follow the first's."""
    t = Tracer()
    ends = []
    for _ in range(2):
        h = Harness.from_asm("hlt", tracer=t)
        clock = h.machine.clock
        clock.timer(h.machine.isa_irq[3].pulse).arm(2_000)
        h.run(until=5_000)
        ends.append(h.now)
    assert ends[0] >= 2_000
    assert [ts for ts, level in _view(t).line("irq3") if level] == [2_000, ends[0] + 2_000]


def _view(t: Tracer):
    from vmk.testing import TraceView
    return TraceView(t)
