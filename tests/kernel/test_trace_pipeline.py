"""Tracing the VM kernel: the pipeline demo traced, checked in the recording
(vmk.testing's TraceView) and in the Perfetto file as Perfetto's own protobuf
classes parse it (tools/trace.py writes it with an encoder of its own)."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from perfetto.protos.perfetto.trace import perfetto_trace_pb2 as pb

from vmk.boot.vmkimage import read_image
from vmk.kernel.pid0 import VMKernel
from vmk.machine.pc import Machine, MachineConfig, Why
from vmk.machine.trace import Tracer
from vmk.testing import TraceView
from vmk.testing.harness import SerialCapture
from vmk.tools.build import build
from vmk.tools.trace import perfetto_bytes

ROOT = Path(__file__).resolve().parents[2]
KEY_AT = 30_000_000

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the demo programs are C (gcc needed)")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = tmp_path_factory.mktemp("pipeline") / "pipeline.img"
    build(ROOT / "demo" / "pipeline" / "pipeline.toml", img)
    return img


def _run(image: Path, tracer: Tracer | None):
    com1 = SerialCapture()
    m = Machine(MachineConfig(serial=[com1], tracer=tracer))
    k = VMKernel(m, read_image(image))
    m.clock.timer(lambda: m.uarts[0].receive(b"k")).arm(KEY_AT)
    r = k.run(until=1_000_000_000)
    return r, k, com1.data.decode(), m


@pytest.fixture(scope="module")
def traced(image: Path):
    t = Tracer()
    r, k, out, m = _run(image, t)
    t.finish()
    return r, k, out, m, t


def test_traced_pipeline_runs_as_untraced(image: Path, traced) -> None:
    r, k, out, m, _t = traced
    r0, k0, out0, m0 = _run(image, None)
    assert k0.door is not None and k.door is None          # tracing turns the C fast path off
    assert (r.why, out, m.now, m.instructions) == (r0.why, out0, m0.now, m0.instructions)
    assert r.why == Why.EXIT and out.splitlines()[-1] == "[100 ms] done"


def test_syscalls_flows_and_fiber_states(traced) -> None:
    _r, k, _out, _m, t = traced
    view = TraceView(t)
    ticker = next(e.args["fid"] for e in view.events(kind="fiber", name="ticker.main"))
    mixer = next(e.args["fid"] for e in view.events(kind="fiber", name="mixer.main"))
    printer = next(e.args["fid"] for e in view.events(kind="fiber", name="printer.main"))
    assert len({ticker, mixer, printer}) == 3
    # The ticker sleeps 20 ms, five times; each sleep is a syscall on its own track.
    sleeps = view.syscalls("sleep", fid=ticker)
    assert len(sleeps) >= 5 and all(e.args["args"][0] == 20_000_000 and e.args["result"] is None for e in sleeps)
    # Every number (five ticks and the end mark) goes ticker -> mixer on "numbers", 20 ms after
    # its sleep began; every line (five ticks, the key, "done") mixer -> printer on "lines".
    numbers = view.flows("numbers")
    lines = view.flows("lines")
    assert len(numbers) == 6 and {(f.sender, f.receiver) for f in numbers} == {(ticker, mixer)}
    assert len(lines) == 7 and {(f.sender, f.receiver) for f in lines} == {(mixer, printer)}
    assert all(0 <= f.ts - (e.ts + 20_000_000) < 1_000 for f, e in zip(numbers, sleeps))
    assert [f.size for f in numbers] == [8] * 6
    ids = [f.id for f in view.flows()]
    assert len(ids) == len(set(ids))
    # Each flow: a send instant on the sender's track, a recv on the receiver's, the same time.
    for f in numbers + lines:
        (send,) = [e for e in view.events(kind="channel") if e.flow_out == f.id]
        (recv,) = [e for e in view.events(kind="channel") if e.flow_in == f.id]
        assert (send.track, recv.track, send.ts) == (("fiber", f.sender), ("fiber", f.receiver), recv.ts)
    # The mixer wakes for the key: IRQ 4 raised, vector 0x24 delivered and EOId, a rendezvous on console.rx.
    raised = [ts for ts, level in view.line("irq4") if level]
    assert raised and raised[0] >= KEY_AT
    assert [e.ts for e in view.events(kind="irq", event="delivered", vector=0x24)][0] == raised[0]
    assert view.events(kind="irq", event="eoi", vector=0x24)
    assert view.flows("console.rx")[0].receiver == mixer
    # States alternate; the ticker blocks in each sleep and runs again 20 ms later.
    states = view.states(ticker)
    assert states[0] == (0, "runnable")
    assert all(a[1] != b[1] for a, b in zip(states, states[1:]))
    blocked = [ts for ts, s in states if s == "blocked"]
    assert blocked[:5] == [e.ts for e in sleeps][:5]


def test_perfetto_file_parses_with_perfettos_protos(traced) -> None:
    _r, _k, _out, _m, t = traced
    trace = pb.Trace()
    trace.ParseFromString(perfetto_bytes(t))
    tracks = {p.track_descriptor.uuid: p.track_descriptor for p in trace.packet if p.HasField("track_descriptor")}
    names = {d.name for d in tracks.values()}
    assert {"CPU 0", "interrupts", "timer deadlines", "fiber on CPU", "IRQ lines", "irq4",
            "pid 0 (kernel)", "pid 1 (printer)", "pid 2 (mixer)", "pid 3 (ticker)"} <= names
    assert all(d.parent_uuid in tracks for d in tracks.values() if d.HasField("parent_uuid"))
    assert tracks[next(u for u, d in tracks.items() if d.name == "irq4")].HasField("counter")
    events = [p for p in trace.packet if p.HasField("track_event")]
    assert len(events) == len(t.events)
    assert all(p.trusted_packet_sequence_id == 1 for p in trace.packet)
    assert [p.timestamp for p in events] == [e.ts for e in t.events]
    assert all(p.track_event.track_uuid in tracks for p in events)
    kinds = Counter(p.track_event.categories[0] for p in events if p.track_event.categories)
    assert {"fiber", "syscall", "channel", "irq", "timer"} <= set(kinds)
    TE = pb.TrackEvent
    starts = {i for p in events for i in p.track_event.flow_ids}
    ends = {i for p in events for i in p.track_event.terminating_flow_ids}
    assert starts == ends == {f.id for f in TraceView(t).flows()}
    # Slices balance on every track, and nest: B/E in stack order.
    depth: Counter = Counter()
    for p in events:
        te = p.track_event
        if te.type == TE.TYPE_SLICE_BEGIN:
            depth[te.track_uuid] += 1
        elif te.type == TE.TYPE_SLICE_END:
            depth[te.track_uuid] -= 1
            assert depth[te.track_uuid] >= 0
    assert not +depth
    send = next(p.track_event for p in events if p.track_event.name == "send numbers")
    ann = {a.name: a for a in send.debug_annotations}
    assert ann["channel"].string_value == "numbers" and ann["bytes"].int_value == 8
    assert tracks[send.track_uuid].name.startswith("ticker.main")
