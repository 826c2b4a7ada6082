"""Virtual time and the event queue.

Time is an integer number of virtual nanoseconds.  The CPU advances it by a
fixed cost per retired instruction (QEMU's icount idea); a halted CPU jumps
straight to the next deadline.  Devices never run "every step": each one owns
:class:`Timer` objects (QEMU's ``QEMUTimer``) that it arms for the next moment
its outputs change, and computes its registers lazily from ``clock.now``.

Invariants:

* Timers fire in deadline order; equal deadlines fire in the order they were
  armed (FIFO), so two runs of the same machine fire them identically.
* ``now`` is exact at instruction granularity even in the middle of a CPU
  slice: while the CPU runs, the clock asks it how many instructions it has
  retired so far in the slice (``_slice_source``).
* Arming a timer earlier than the end of the running slice calls ``preempt``
  so the CPU stops at the next instruction boundary and re-slices.
* Time that is not instruction time (the rest of an I/O bus cycle, see
  :meth:`Clock.charge`) is added exactly where it happens: ``now`` = the time
  at the start of the slice + the instructions retired in it times the cost
  of one + what was charged in it.  A charge that would carry the slice past
  its limit (the next deadline, or the end of the run) calls ``preempt``, so
  that deadline still fires at the first instruction boundary at or after it.
"""
from __future__ import annotations

import heapq
from typing import Callable

__all__ = ["Clock", "Timer", "NS_PER_SEC", "NS_PER_MS", "NS_PER_US"]

NS_PER_US = 1_000
NS_PER_MS = 1_000_000
NS_PER_SEC = 1_000_000_000


class Timer:
    """A one-shot callback at a virtual time, re-armable (QEMU's timer_mod)."""

    __slots__ = ("_clock", "callback", "deadline", "_gen", "name")

    def __init__(self, clock: "Clock", callback: Callable[[], None], name: str = "") -> None:
        self._clock = clock
        self.callback = callback
        self.deadline: int | None = None
        self._gen = 0
        self.name = name

    @property
    def armed(self) -> bool:
        return self.deadline is not None

    def arm(self, deadline: int) -> None:
        """Fire at absolute virtual time ``deadline`` (ns); replaces any earlier arming."""
        self._gen += 1
        self.deadline = int(deadline)
        self._clock._push(self)

    def arm_in(self, delay: int) -> None:
        self.arm(self._clock.now + delay)

    def cancel(self) -> None:
        self._gen += 1
        self.deadline = None


class Clock:
    """The machine's virtual clock and timer queue."""

    def __init__(self) -> None:
        self._base = 0                      # time at the start of the current slice
        self._heap: list[tuple[int, int, int, Timer]] = []
        self._seq = 0
        self._slice_source: Callable[[], int] | None = None   # ns elapsed inside the running slice
        self._slice_end: int | None = None
        self._slice_limit: int | None = None    # a time the running slice must stop at (or right after)
        self._charged = 0                       # ns charged inside the running slice (I/O bus cycles)
        self.charged = 0                        # ns charged since power-on (statistics, tests)
        self.preempt: Callable[[], None] = _nothing
        self.shorten: Callable[[int], bool] = cannot_shorten

    # -- reading time ------------------------------------------------------
    def read(self) -> int:
        """The current virtual time (``now`` as a method, to hand out as a callback)."""
        src = self._slice_source
        if src is None:
            return self._base
        return self._base + src() + self._charged

    now = property(read)

    def at(self, elapsed: int) -> int:
        """The time ``elapsed`` ns into the running slice (what ``now`` is when
        the slice source says ``elapsed``)."""
        return self._base + elapsed + self._charged

    def timer(self, callback: Callable[[], None], name: str = "") -> Timer:
        return Timer(self, callback, name)

    # -- the queue -----------------------------------------------------------
    def _push(self, t: Timer) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t.deadline, self._seq, t._gen, t))  # type: ignore[arg-type]
        end = self._slice_end
        if end is not None and t.deadline < end + self._charged:  # type: ignore[operator]
            self._cut(t.deadline)

    def next_deadline(self) -> int | None:
        """Earliest armed deadline, or None.  Drops stale entries on the way."""
        h = self._heap
        while h:
            deadline, _, gen, t = h[0]
            if gen == t._gen and t.deadline is not None:
                return deadline
            heapq.heappop(h)
        return None

    def run_due(self) -> int:
        """Fire every timer whose deadline is <= now, in order. Returns how many fired."""
        fired = 0
        h = self._heap
        now = self._base
        while h and h[0][0] <= now:
            deadline, _, gen, t = heapq.heappop(h)
            if gen != t._gen or t.deadline is None:
                continue
            t.deadline = None
            t.callback()
            fired += 1
        return fired

    # -- driven by the CPU loop -------------------------------------------------
    def advance_to(self, t: int) -> None:
        """Set the time (outside a slice). Time never goes backwards."""
        if t > self._base:
            self._base = t

    def begin_slice(self, source: Callable[[], int], end: int, limit: int | None = None) -> None:
        """A CPU slice starts: ``source()`` is the instruction time inside it,
        ``end`` the time its instruction budget reaches, ``limit`` the time it
        must not run past: the next deadline or the end of the run (None:
        nothing is due, only the budget bounds the slice)."""
        self._slice_source = source
        self._slice_end = end
        self._slice_limit = limit
        self._charged = 0

    def end_slice(self, elapsed: int) -> None:
        """The slice ended after ``elapsed`` ns of instruction time (charges are added here)."""
        self._base += elapsed + self._charged
        self._slice_source = None
        self._slice_end = None
        self._slice_limit = None
        self._charged = 0

    def charge(self, ns: int) -> None:
        """Add ``ns`` of virtual time that the running instruction spends
        outside the CPU core (the rest of an I/O bus cycle).  Outside a slice
        the time simply moves on.

        Discussion: the slice's instruction budget was sized to end at its
        limit; every charge moves that end later by ``ns``.  Once the end
        would pass the limit, the slice must stop after this instruction
        (``preempt``), or a timer due before the end would fire late by up
        to the sum of the charges.  The machine re-slices with the budget
        that is left, so the deadline fires at the first instruction boundary
        at or after it, exactly as if the instructions had been slow."""
        self.charged += ns
        if self._slice_source is None:
            self._base += ns
            return
        self._charged += ns
        limit = self._slice_limit
        if limit is not None and self._slice_end + self._charged > limit:  # type: ignore[operator]
            self._cut(limit)

    def _cut(self, t: int) -> None:
        """The running slice must not run past ``t``: shorten its budget if
        the CPU can (``shorten(t)``: the slice goes on up to ``t``), else end
        it after the current instruction (``preempt``).  Either way the
        machine re-slices from where it stops, so ``t`` is met exactly."""
        if self.shorten(t):
            self._slice_end = min(self._slice_end, t - self._charged)  # type: ignore[type-var]
        else:
            self.preempt()

    # -- snapshots -------------------------------------------------------------
    def snapshot(self) -> dict:
        return {"now": self._base, "seq": self._seq, "charged": self.charged}

    def restore(self, state: dict) -> None:
        """Restore the time. Timers are re-armed by their owners' restore()."""
        self._base = state["now"]
        self._seq = state["seq"]
        self.charged = state.get("charged", 0)
        self._heap.clear()


def _nothing() -> None:
    return None


def cannot_shorten(t: int) -> bool:
    return False
