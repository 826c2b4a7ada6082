"""The instrument interface: one recorder that the machine and the kernel report to.

How it works
------------
A :class:`Tracer` is handed down, never found: ``MachineConfig(tracer=...)``
gives it to the machine, which passes it to its IRQ lines and its local APIC
(``.tracer`` attributes set at construction) and keeps it as
``Machine.tracer``; pid 0 (kernel/pid0.py) reads it from there and hands it to
its scheduler and channel table.  Every instrumented place holds ``tracer =
None`` when nobody traces, and reports with::

    t = self.tracer
    if t is not None:
        t.irq_delivered(vector)

so tracing off costs an attribute load and a compare, and no call (trio's
``if "before_task_step" in instruments``).  The syscall door is not even
that: pid 0 installs a tracing door only when tracing is on.

What is recorded (``kind`` of each :class:`TraceEvent`):

* ``"irq"``: an IRQ line's level change (``line``), an interrupt delivered
  to the sink (``delivered``, on the CPU's interrupt track), a LAPIC EOI
  (``eoi``);
* ``"timer"``: a one-shot deadline armed by the HAL (``deadline``) and the
  kernel timers pid 0 arms (fiber timeouts, sleeps);
* ``"fiber"``: a fiber's state (``running``, ``runnable``, ``blocked``) as
  consecutive slices on its own track, and which guest fiber is on the CPU
  (a slice on the CPU's track);
* ``"syscall"``: an instant on the calling fiber's track, its number, name,
  arguments and result (``None``: it blocked);
* ``"channel"``: a rendezvous: an instant on the sender's track that starts a
  flow and one on the receiver's track that ends it (the same flow id), at
  the virtual time the two met.

Timestamps are virtual ns (``clock.now``); a tracer attached to a second
machine (``vmk boot`` reboots) goes on from where the first ended.  The
recording is in memory (``events``, ``tracks``); tools/trace.py writes it out
as a Perfetto protobuf trace and a VCD of the IRQ lines, and
``vmk.testing`` looks at it (:meth:`Tracer.select`).

Not recorded: the CPU's instructions themselves, port and MMIO accesses, and
the C IPC fast path (kernel/_fastipc.c): pid 0 turns the fast path off while
it traces, so every send/recv takes the Python path and its events.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

__all__ = ["Phase", "Track", "TraceEvent", "Tracer", "CPU_TRACK", "IRQ_TRACK", "TIMER_TRACK", "LINES_TRACK"]


class Phase:
    """What an event does on its track (the Chrome trace format's ``ph``)."""
    BEGIN = "B"          # a slice starts
    END = "E"            # the open slice ends
    INSTANT = "i"        # a point in time
    COUNTER = "C"        # a counter's new value (an IRQ line's level)


@dataclass(slots=True)
class Track:
    """A row in the trace viewer: a process-like group (``parent`` None) or a
    thread-like or counter track inside one."""
    key: Any
    name: str
    parent: Any = None
    counter: bool = False
    pid: int | None = None          # a container's pid (process tracks), a fiber's id (fiber tracks)
    tid: int | None = None


@dataclass(slots=True)
class TraceEvent:
    ts: int                         # virtual ns
    kind: str                       # "irq", "timer", "fiber", "syscall", "channel"
    phase: str                      # Phase.*
    track: Any                      # a Track key
    name: str
    args: dict = field(default_factory=dict)
    flow_out: int | None = None     # a flow that starts here (the sender's side of a rendezvous)
    flow_in: int | None = None      # a flow that ends here (the receiver's side)


CPU_TRACK = ("cpu", 0)
IRQ_TRACK = ("cpu", 0, "interrupts")
TIMER_TRACK = ("cpu", 0, "timer")
LINES_TRACK = ("irq-lines",)
_RUN_TRACK = ("cpu", 0, "fiber")


class Tracer:
    """Records what the machine and pid 0 report (see the module doc)."""

    def __init__(self) -> None:
        self.events: list[TraceEvent] = []
        self.tracks: dict[Any, Track] = {}
        self._clock: Any = None
        self._base = 0                      # virtual time of the machines before this one
        self._open: dict[Any, str] = {}     # track -> name of its open slice
        self._flows = 0
        self._running: Any = None           # the fiber last made RUNNING (a rendezvous' own side)
        self.lines: list[str] = []          # IRQ line names, in the order they were attached
        self._track(CPU_TRACK, "CPU 0")
        self._track(_RUN_TRACK, "fiber on CPU", CPU_TRACK)
        self._track(IRQ_TRACK, "interrupts", CPU_TRACK)
        self._track(TIMER_TRACK, "timer deadlines", CPU_TRACK)
        self._track(LINES_TRACK, "IRQ lines")

    # ------------------------------------------------------------------ wiring
    def attach(self, clock: Any) -> None:
        """Take times from ``clock`` (a machine's); a later machine's time goes on
        after the last one's (the slices open on the old machine end there)."""
        if self._clock is not None:
            for key in list(self._open):
                self._end(key, "fiber")
            self._base += self._clock.now
            self._running = None
        self._clock = clock

    def add_line(self, name: str, level: bool = False) -> None:
        """An IRQ line to follow (its level is a counter track; the VCD's wires)."""
        key = ("line", name)
        if key not in self.tracks:
            self.lines.append(name)
            self._track(key, name, LINES_TRACK, counter=True)
            self._emit("irq", Phase.COUNTER, key, name, {"level": int(level)})

    @property
    def now(self) -> int:
        return self._base + (self._clock.now if self._clock is not None else 0)

    # ------------------------------------------------------------------ machine reports
    def irq_line(self, name: str, level: bool) -> None:
        """An IRQ line changed level."""
        key = ("line", name)
        if key not in self.tracks:
            self.add_line(name, not level)
        self._emit("irq", Phase.COUNTER, key, name, {"level": int(level)})

    def irq_delivered(self, vector: int, external: bool = True) -> None:
        """The CPU took ``vector`` (an external interrupt, or an exception/INT n)."""
        self._emit("irq", Phase.INSTANT, IRQ_TRACK, f"deliver {vector:#x}",
                   {"event": "delivered", "vector": vector, "external": external})

    def irq_eoi(self, vector: int) -> None:
        """The local APIC retired ``vector`` (an EOI write)."""
        self._emit("irq", Phase.INSTANT, IRQ_TRACK, f"eoi {vector:#x}", {"event": "eoi", "vector": vector})

    def timer_deadline(self, name: str, at: int | None) -> None:
        """A timer was armed for virtual time ``at`` (None: disarmed)."""
        args = {"event": "deadline", "timer": name,
                "at": None if at is None else self._base + at}
        self._emit("timer", Phase.INSTANT, TIMER_TRACK, f"{name} {'off' if at is None else 'armed'}", args)

    # ------------------------------------------------------------------ kernel reports
    def fiber_state(self, fiber: Any, state: str, detail: str = "") -> None:
        """``fiber`` (a kernel/fiber.py Fiber) is now in ``state`` (a FiberState value)."""
        key = self._fiber_track(fiber)
        if key in self._open:
            self._end(key, "fiber")
        if state == "running":
            self._running = fiber
        elif self._running is fiber:
            self._running = None
        if state != "done":
            args = {"fid": fiber.fid, "state": state}
            if detail:
                args["waiting_on"] = detail
            self._begin(key, state, "fiber", args)

    def fiber_on_cpu(self, fiber: Any) -> None:
        """The guest fiber the CPU runs now (None: none, pid 0 or idle)."""
        if _RUN_TRACK in self._open:
            self._end(_RUN_TRACK, "fiber")
        if fiber is not None:
            c = fiber.container
            self._begin(_RUN_TRACK, fiber.name or f"fiber {fiber.fid}", "fiber",
                        {"fid": fiber.fid, "pid": c.pid if c is not None else 0})

    def syscall(self, fiber: Any, nr: int, name: str, args: tuple[int, ...]) -> dict:
        """``fiber`` made syscall ``nr``; returns the event's args, where the
        caller puts ``result`` once it is known (None: the fiber blocked)."""
        a = {"nr": nr, "syscall": name, "args": list(args), "result": None}
        key = self._fiber_track(fiber) if fiber is not None else _RUN_TRACK
        self._emit("syscall", Phase.INSTANT, key, name, a)
        return a

    def rendezvous(self, channel: Any, sender: Any, receiver: Any, size: int | None) -> int:
        """A send and a recv on ``channel`` met; ``sender``/``receiver`` are the
        fibers (None: the fiber running now).  Returns the flow id."""
        self._flows += 1
        flow = self._flows
        sender = sender if sender is not None else self._running
        receiver = receiver if receiver is not None else self._running
        a = {"cid": channel.cid, "channel": channel.name or f"channel {channel.cid}", "bytes": size,
             "sender": getattr(sender, "fid", None), "receiver": getattr(receiver, "fid", None), "flow": flow}
        cname = a["channel"]
        self._emit("channel", Phase.INSTANT, self._fiber_track(sender) if sender is not None else _RUN_TRACK,
                   f"send {cname}", dict(a, side="send"), flow_out=flow)
        self._emit("channel", Phase.INSTANT, self._fiber_track(receiver) if receiver is not None else _RUN_TRACK,
                   f"recv {cname}", dict(a, side="recv"), flow_in=flow)
        return flow

    def finish(self) -> None:
        """End the slices still open (at the end of a run, before writing the trace)."""
        for key in list(self._open):
            self._end(key, "fiber")

    # ------------------------------------------------------------------ looking (tests)
    def select(self, kind: str | None = None, name: str | None = None, track: Any = None,
               **args: Any) -> list[TraceEvent]:
        """The events of ``kind`` (and ``name``, ``track``) whose args have the given values."""
        return [e for e in self.events
                if (kind is None or e.kind == kind) and (name is None or e.name == name)
                and (track is None or e.track == track)
                and all(e.args.get(k) == v for k, v in args.items())]

    def __iter__(self) -> Iterator[TraceEvent]:
        return iter(self.events)

    # ------------------------------------------------------------------ inside
    def _track(self, key: Any, name: str, parent: Any = None, counter: bool = False,
               pid: int | None = None, tid: int | None = None) -> Any:
        if key not in self.tracks:
            self.tracks[key] = Track(key, name, parent, counter, pid, tid)
        return key

    def _fiber_track(self, fiber: Any) -> Any:
        key = ("fiber", fiber.fid)
        if key not in self.tracks:
            c = fiber.container
            pid = c.pid if c is not None else 0
            pkey = ("pid", pid)
            if pkey not in self.tracks:
                self._track(pkey, f"pid {pid} ({c.name})" if c is not None else "pid 0 (kernel)", pid=pid)
            self._track(key, f"{fiber.name or 'fiber'} (fiber {fiber.fid})", pkey, pid=pid, tid=fiber.fid)
        return key

    def _emit(self, kind: str, phase: str, track: Any, name: str, args: dict,
              flow_out: int | None = None, flow_in: int | None = None) -> None:
        self.events.append(TraceEvent(self.now, kind, phase, track, name, args, flow_out, flow_in))

    def _begin(self, track: Any, name: str, kind: str, args: dict) -> None:
        self._open[track] = name
        self._emit(kind, Phase.BEGIN, track, name, args)

    def _end(self, track: Any, kind: str) -> None:
        name = self._open.pop(track)
        self._emit(kind, Phase.END, track, name, {})
