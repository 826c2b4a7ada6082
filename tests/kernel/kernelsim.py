"""A stand-in for the HAL around the kernel core: a virtual clock, a scheduler,
and a run loop that steps kernel fibers and "runs" guest fibers.

A guest fiber's ``ctx`` here is a :class:`Guest`: a Python generator that
plays the guest program.  It yields an operation for a ``sync`` syscall
(``sched.sync``; a parked fiber is resumed later with ``fiber.result``, as the
HAL would write RAX), ``None`` for ``yield`` and returns for ``fiber_exit``.
Virtual time only moves when nothing is runnable (straight to the next
deadline), or by ``cost_ns`` per dispatch if a test asks for it.
"""
from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from vmk.kernel.fiber import Fiber, FiberKind, FiberState
from vmk.kernel.scheduler import BLOCKED, Scheduler
from vmk.machine.clock import Clock


@dataclass(eq=False)
class Box:
    """A minimal container: identity, a priority (higher runs first), a name."""
    name: str
    priority: int = 4

    def __repr__(self) -> str:
        return f"<{self.name}>"


@dataclass(eq=False)
class Guest:
    gen: Generator[Any, Any, Any]
    parked: bool = False
    value: Any = None
    results: list[Any] = field(default_factory=list)


class Sim:
    def __init__(self, policy: str = "global", cost_ns: int = 0, **kw: Any) -> None:
        self.clock = Clock()
        self.sched = Scheduler(self.clock, policy, **kw)
        self.cost_ns = cost_ns
        self.trace: list[str] = []          # fiber names in dispatch order
        self.crashes: list[str] = []
        self.sched.log = self.crashes.append

    # -- spawning ---------------------------------------------------------------
    def kernel(self, gen: Generator[Any, Any, Any], name: str = "", container: Any = None,
               priority: int | None = None) -> Fiber:
        return self.sched.spawn_kernel(gen, name, container, priority)

    def guest(self, gen: Generator[Any, Any, Any], container: Any, name: str = "") -> Fiber:
        return self.sched.spawn_guest(Guest(gen), container, name)

    # -- running ----------------------------------------------------------------
    def run_guest(self, f: Fiber) -> None:
        g: Guest = f.ctx
        value = f.result if g.parked else g.value
        g.parked = False
        while True:
            try:
                call = g.gen.send(value)
            except StopIteration as stop:
                self.sched.exit(f, stop.value if stop.value is not None else 0)
                return
            if call is None:
                g.value = 0
                self.sched.yield_(f)
                return
            r = self.sched.sync(f, call)
            if r is BLOCKED:
                g.parked = True
                return
            value = r.value

    def dispatch(self) -> Fiber | None:
        """One scheduling decision, as the HAL makes it."""
        f = self.sched.next_fiber()
        if f is None:
            return None
        self.trace.append(f.name)
        if f.kind is FiberKind.KERNEL:
            self.sched.step(f)
        else:
            self.run_guest(f)
        if self.cost_ns:
            self.clock.advance_to(self.clock.now + self.cost_ns)
            self.clock.run_due()
        return f

    def run(self, until: int | None = None, max_dispatches: int = 1_000_000,
            eager_kernel: bool = False) -> None:
        """Dispatch until nothing is runnable and no timer is due by ``until``."""
        for _ in range(max_dispatches):
            if eager_kernel:
                self.sched.run_kernel_fibers()
            if self.dispatch() is not None:
                continue
            d = self.clock.next_deadline()
            if d is None or (until is not None and d > until):
                break
            self.clock.advance_to(d)
            self.clock.run_due()
        else:
            raise AssertionError("still runnable after max_dispatches")
        if until is not None:
            self.clock.advance_to(until)

    def advance(self, t: int) -> None:
        """Fire every timer due by ``t`` without running fibers."""
        while (d := self.clock.next_deadline()) is not None and d <= t:
            self.clock.advance_to(d)
            self.clock.run_due()
        self.clock.advance_to(t)


def live_timers(clock: Clock) -> int:
    """Armed timers in the clock's queue (stale heap entries do not count)."""
    return sum(1 for (_, _, gen, t) in clock._heap if gen == t._gen and t.deadline is not None)


def blocked_names(sim: Sim) -> set[str]:
    return {f.name for f in sim.sched.fibers.values() if f.state is FiberState.BLOCKED}

