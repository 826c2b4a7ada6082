"""Looking at a recorded trace in a test: ``h.trace`` (machine/trace.py's recording).

    h = Harness.from_asm(SOURCE, trace=True)
    h.run_for(1_000_000)
    assert [e.args["vector"] for e in h.trace.events(kind="irq", event="delivered")] == [0x20, 0x20]

    t = Tracer()
    r, k, out = vmimage.boot(img, tracer=t)          # a VM image: MachineConfig(tracer=)
    view = TraceView(t)
    (f,) = view.flows(channel="numbers")[:1]
    assert (f.sender, f.receiver) == (5, 4)

Every event has ``ts`` (virtual ns), ``kind`` ("irq", "timer", "fiber",
"syscall", "channel"), ``name``, ``track`` and ``args`` (see machine/trace.py
for what each kind carries); :meth:`TraceView.events` filters on any of
them, args by keyword.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmk.machine.trace import Phase, TraceEvent, Tracer

__all__ = ["Flow", "TraceView"]


@dataclass(frozen=True, slots=True)
class Flow:
    """One channel rendezvous: the message went from fiber ``sender`` to ``receiver`` at ``ts``."""
    id: int
    ts: int
    channel: str
    cid: int
    sender: int | None
    receiver: int | None
    size: int | None


class TraceView:
    """Questions a test asks of a :class:`~vmk.machine.trace.Tracer`'s recording."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def events(self, kind: str | None = None, name: str | None = None, track: Any = None,
               **args: Any) -> list[TraceEvent]:
        """Events in the order they happened, filtered: ``kind``, ``name``, ``track``,
        and each keyword an arg's value (``events(kind="syscall", syscall="send")``)."""
        return self.tracer.select(kind, name, track, **args)

    def syscalls(self, name: str | None = None, fid: int | None = None) -> list[TraceEvent]:
        """Syscall events (``name``: "send", "sleep", ...; ``fid``: of that fiber)."""
        out = self.events(kind="syscall") if name is None else self.events(kind="syscall", syscall=name)
        return [e for e in out if fid is None or e.track == ("fiber", fid)]

    def flows(self, channel: str | None = None) -> list[Flow]:
        """Every rendezvous (sender -> receiver), from the flow's starting event."""
        out = []
        for e in self.tracer.events:
            if e.kind == "channel" and e.flow_out is not None and (channel is None or e.args["channel"] == channel):
                a = e.args
                out.append(Flow(e.flow_out, e.ts, a["channel"], a["cid"], a["sender"], a["receiver"], a["bytes"]))
        return out

    def states(self, fid: int) -> list[tuple[int, str]]:
        """(virtual ns, state) each time fiber ``fid`` changed state ("runnable",
        "running", "blocked")."""
        return [(e.ts, e.name) for e in self.tracer.events
                if e.kind == "fiber" and e.phase == Phase.BEGIN and e.track == ("fiber", fid)]

    def line(self, name: str) -> list[tuple[int, int]]:
        """(virtual ns, level) of IRQ line ``name`` ("irq4", "pit"), every change."""
        out: list[tuple[int, int]] = []
        for e in self.tracer.events:
            if e.kind == "irq" and e.phase == Phase.COUNTER and e.track == ("line", name):
                if not out or out[-1][1] != e.args["level"]:
                    out.append((e.ts, e.args["level"]))
        return out

    def __len__(self) -> int:
        return len(self.tracer.events)
