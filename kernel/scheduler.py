"""The VM fiber scheduler (pid 0): one scheduler for kernel and guest fibers.

Who calls what
--------------

The HAL owns the CPU loop; the scheduler only answers "who runs next" and
parks/wakes fibers.  A HAL loop looks like::

    sched.run_kernel_fibers()           # drivers first: eager bottom halves
    f = sched.next_fiber()              # policy's choice, now RUNNING
    if f is None:       idle until the next clock deadline or interrupt
    elif f.is_kernel:   sched.step(f)   # resume the generator until it waits
    else:               run f.ctx until a trap; the syscall layer then calls
                        sched.sync(f, op) / sched.yield_(f) / sched.exit(f, v);
                        a preempting HAL calls sched.requeue_front(f) (time
                        slice over, or an interrupt woke someone) or
                        sched.rotate(f) (the fiber timer, fiber_preemption_ns)

Preconditions are asserted where the switch happens (xv6): ``next_fiber``
only when no fiber is RUNNING for the HAL, ``sync`` only for that fiber.

Blocking is "try, then park" (trio): :func:`~vmk.kernel.events.perform` tries
every arm and otherwise parks the sync on its sources with cancel tokens.  A
parked fiber is in no run queue: it is referenced only by what it waits on,
so 10,000 blocked fibers cost the scheduler nothing, and nothing is polled.
When a source commits the sync, the fiber is queued RUNNABLE; a guest fiber's
``result`` is set then (RAX), a kernel fiber's value is sent at its next step.

Fibers are cooperative inside a container
------------------------------------------

Only the fiber itself lets a sibling (a fiber of the same container) run: by
blocking, by ``yield_``, or by ending.  A fiber the HAL preempts goes back
*first* in its container's order (``requeue_front``), so when the container
next gets the CPU the same fiber continues, whatever the policy; the
container itself is preempted as usual (its time slice).  ``rotate`` is the
optional fiber timer (Guile fibers' ``hz``): the fiber goes *behind* its
siblings and the container keeps its turn.  Each container's runnable fibers
are a group (:class:`_Group`): at most one preempted fiber in ``front``, the
rest in an aging queue.

Policies
--------

Priorities are integers, **higher runs first**, as in the image (containers
0..255; pid 0's fibers default to :data:`~vmk.kernel.fiber.KERNEL_PRIORITY` =
255).  Both policies are built on one aging queue: an entry queued at dispatch
count ``tick`` with priority ``p`` gets the key ``tick - p * aging`` and the
smallest key runs first (ties FIFO).  So:

* at equal priority it is exactly FIFO, and a fiber that yields goes behind
  everything already queued (round robin);
* a more urgent entry queued at the same moment goes first: when one event
  (an IRQ burst, a condition) wakes several fibers in one go they are queued
  by priority (*prioritised wakeups*);
* no starvation: an entry of priority ``p`` is overtaken by an entry of
  priority ``q > p`` only if that one was queued less than ``(q - p) * aging``
  dispatches after it, so it waits at most ``(q - p) * aging`` dispatches plus
  whatever was ahead of it when it was queued, however busy the more urgent
  fibers are.  (Strict priority would let one yielding fiber starve every
  fiber of a lower priority.)  With the defaults a kernel fiber (255) that
  never blocks delays a priority-1 container by at most 254 * 16 = 4064
  dispatches; drivers are expected to block, not spin.

``global``
    One run queue over all fibers of all containers, ordered as above (kept
    as two heaps, kernel and guest, sharing one key space, so that
    ``run_kernel_fibers`` can take kernel fibers without scanning).  The guest
    heap holds one dispatch slot per runnable fiber, tagged with its
    container; the slot says *when* the container runs, the container's group
    says *which* of its fibers (see :class:`GlobalPolicy`).  The share of the
    CPU is per fiber: a container with more runnable fibers gets more turns.

``per-container``
    A run queue per container (FIFO inside, or by fiber priority for pid 0's
    group of kernel fibers), and a queue of containers with runnable fibers
    ordered the same way by container priority, which is round robin inside
    a priority.  The current container runs for at most ``quantum`` fiber
    dispatches, or until the HAL's container scheduler calls
    :meth:`Scheduler.slice_expired` (its time slice ran out) or switches with
    :meth:`Scheduler.pick_container`; it then goes behind the containers of
    its priority.  A container that floods its queue (many fibers, or fibers
    that keep yielding) therefore gets one turn like any other container of
    its priority.  Kernel fibers form pid 0's group (KERNEL_PRIORITY).

Exits
-----

``exit`` ends one fiber, ``kill_container`` all fibers of a container (both
abort a parked sync: its arms are cancelled, its nacks signalled), and every
fiber parked in ``join`` on them wakes with the exit value.  Closing the
container's handles is the handle layer's job.  A kernel fiber that raises
ends alone (logged, kept in ``fiber.error``); its joiners get the exception
object as the exit value.
"""
from __future__ import annotations

import heapq
import inspect
import itertools
import logging
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from .events import KERNEL, NOT_READY, Failed, KernelError, Operation, Sync, perform
from .fiber import KERNEL_PRIORITY, Fiber, FiberKind, FiberState
from .syscall_table import Errno

if TYPE_CHECKING:
    import random

    from vmk.machine.clock import Clock

__all__ = ["AGING", "BLOCKED", "POLICIES", "QUANTUM", "Blocked", "Completed", "Scheduler"]

AGING = 16
"""Dispatches one priority level is worth (the aging rate)."""
QUANTUM = 8
"""Fiber dispatches per container turn in the per-container policy."""

_log = logging.getLogger("vmk.kernel")


class _Queued(Protocol):
    _rq: int | None         # the sequence number of its live entry, or None


_T = TypeVar("_T", bound=_Queued)


@dataclass(frozen=True, slots=True)
class Completed:
    """``sync`` committed at once: ``value`` is the result (``-errno`` if ``error``)."""
    value: Any
    error: KernelError | None = None


class Blocked:
    """``sync`` parked the fiber; it will be RUNNABLE with ``fiber.result`` set."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "BLOCKED"


BLOCKED = Blocked()


class _Stats:
    __slots__ = ("seq", "work")

    def __init__(self) -> None:
        self.work = 0           # run-queue entries touched (pushes, pops, stale skips)
        self.seq = 0            # one FIFO sequence shared by every queue


class _AgingQueue(Generic[_T]):
    """A heap keyed by ``tick - priority * aging``, then FIFO; O(log n) in queued entries.

    Items carry an ``_rq`` token: an entry is live iff the item's token is its
    sequence number, so ``discard`` is O(1) and the stale entry is dropped
    when it reaches the top.
    """
    __slots__ = ("_aging", "_heap", "_live", "_stats")

    def __init__(self, aging: int, stats: _Stats) -> None:
        self._heap: list[tuple[int, int, _T]] = []
        self._live = 0
        self._aging = aging
        self._stats = stats

    def push(self, item: _T, priority: int, tick: int) -> None:
        self._stats.seq += 1
        seq = item._rq = self._stats.seq
        heapq.heappush(self._heap, (tick - priority * self._aging, seq, item))
        self._live += 1
        self._stats.work += 1

    def _clean(self) -> None:
        h = self._heap
        while h and h[0][2]._rq != h[0][1]:
            heapq.heappop(h)
            self._stats.work += 1

    def peek(self) -> tuple[int, int] | None:
        self._clean()
        return self._heap[0][:2] if self._heap else None

    def peek_item(self) -> _T | None:
        self._clean()
        return self._heap[0][2] if self._heap else None

    def pop(self) -> _T | None:
        self._clean()
        if not self._heap:
            return None
        _, _, item = heapq.heappop(self._heap)
        item._rq = None
        self._live -= 1
        self._stats.work += 1
        return item

    def discard(self, item: _T) -> None:
        if item._rq is not None:
            item._rq = None
            self._live -= 1

    def __len__(self) -> int:
        return self._live


class _Group:
    """The runnable fibers of one container, in the container's own order.

    ``front`` is a fiber the HAL preempted (:meth:`Scheduler.requeue_front`):
    it runs before every other fiber of the group, so a container's fibers
    are cooperative.  ``queue`` holds the rest, FIFO at equal priority.  In
    the per-container policy pid 0's kernel fibers are the group of KERNEL.
    ``count`` is how many fibers it holds (both places).  ``slots`` and
    ``dropped`` are the global policy's bookkeeping (its dispatch slots of
    this group; the container was killed).
    """
    __slots__ = ("_rq", "container", "count", "dropped", "front", "queue", "slots")

    def __init__(self, container: Any, aging: int, stats: _Stats) -> None:
        self.container = container
        self.queue: _AgingQueue[Fiber] = _AgingQueue(aging, stats)
        self.front: Fiber | None = None
        self.count = 0
        self._rq: int | None = None
        self.slots = 0
        self.dropped = False

    @property
    def priority(self) -> int:
        return KERNEL_PRIORITY if self.container is KERNEL else int(self.container.priority)

    def add(self, f: Fiber, priority: int, tick: int) -> None:
        self.queue.push(f, priority, tick)
        self.count += 1

    def put_front(self, f: Fiber) -> None:
        assert self.front is None, f"{self.front!r} is already first of {self.container!r}"
        self.front = f
        self.count += 1

    def pop(self) -> Fiber | None:
        f = self.front
        if f is not None:
            self.front = None
        else:
            f = self.queue.pop()
            if f is None:
                return None
        self.count -= 1
        return f

    def discard(self, f: Fiber) -> None:
        if self.front is f:
            self.front = None
            self.count -= 1
        elif f._rq is not None:
            self.queue.discard(f)
            self.count -= 1


def _group_key(f: Fiber) -> Any:
    return KERNEL if f.kind is FiberKind.KERNEL or f.container is None else f.container


_Slot = tuple[int, int, _Group, int]        # (key, seq, group, priority): one entry of the global slot heap


class GlobalPolicy:
    """One run queue over all fibers: priority (with aging), then FIFO.

    The queue holds one *dispatch slot* per runnable guest fiber (a fiber
    that is queued adds a slot of its container at its key), so the share of
    the CPU is per fiber, as with one queue of fibers.  Which fiber of the
    container fills a slot is the container's own order (:class:`_Group`):
    the preempted fiber first, then FIFO; that is what keeps a container's
    fibers cooperative.  Kernel fibers have a heap of their own in the same
    key space (``run_kernel_fibers`` takes them without scanning).

    The slot of the fiber on the CPU is its container's *turn*.  A fiber that
    yields, blocks or ends gives the turn up, and so does one the HAL
    preempts (``requeue_front``): its container gets a new slot at the back,
    as for a yield, and the fiber stays first of its container.  When the
    fiber timer rotates the fiber (``rotate``), the turn is *held* instead: at
    the next choice it goes on with the container's next fiber unless the
    head of the queue is of a strictly higher priority (then that one runs
    and the turn waits at its old place); ``slice_expired`` sends a held turn
    to the back.

    Discussion: why a wakeup ends the turn.  The order is per fiber and ages
    by dispatches.  If a preempted container kept its place for the rest of
    its time slice, an interrupt storm (many dispatches of the woken fiber)
    would age the *other* waiting containers past the interrupt-driven one,
    which then waits a whole slice (measured: ``vmk bench kernel``, IRQ storm,
    4 ns -> 0.8 ms mean latency).  Sending the preempted container to the
    back keeps every waiting entry's key fresh relative to the woken fibers.
    A held turn (the fiber timer) is compared by priority, not by key, for the
    same reason: its key is as old as the container's turn.

    Slots are anonymous within a container: a group's slot is stale when the
    group has more slots (queued or held) than runnable fibers, which is how a
    discarded fiber's slot disappears (lazily, at the top of the heap).
    """
    name = "global"

    def __init__(self, stats: _Stats, aging: int, quantum: int) -> None:
        self._stats = stats
        self._aging = aging
        self._kernel: _AgingQueue[Fiber] = _AgingQueue(aging, stats)
        self._groups: dict[Any, _Group] = {}
        self._slots: list[_Slot] = []
        self._turn: _Slot | None = None       # the slot of the guest fiber dispatched last
        self._held: _Slot | None = None       # that slot, kept while its fiber is preempted
        self._count = 0

    def _group_of(self, f: Fiber) -> _Group:
        g = self._groups.get(f.container)
        if g is None:
            g = self._groups[f.container] = _Group(f.container, self._aging, self._stats)
        return g

    # -- the slot heap ---------------------------------------------------------
    def _push_slot(self, g: _Group, priority: int, tick: int) -> None:
        self._stats.seq += 1
        heapq.heappush(self._slots, (tick - priority * self._aging, self._stats.seq, g, priority))
        g.slots += 1
        self._stats.work += 1

    def _clean(self) -> None:
        h = self._slots
        while h and ((g := h[0][2]).dropped or g.slots > g.count):
            heapq.heappop(h)
            g.slots -= 1
            self._stats.work += 1

    def _head(self) -> tuple[bool, int] | None:
        """(is it a kernel fiber, its priority) for what runs next, held turns aside."""
        self._clean()
        k = self._kernel.peek() if len(self._kernel) else None
        h = self._slots
        if h and (k is None or (h[0][0], h[0][1]) < k):
            return False, h[0][3]
        if k is None:
            return None
        head = self._kernel.peek_item()
        assert head is not None
        return True, head.priority

    def _hold(self, g: _Group, priority: int, tick: int) -> None:
        turn, self._turn = self._turn, None
        if turn is not None and turn[2] is g and self._held is None:
            self._held = turn
            g.slots += 1
        else:
            self._push_slot(g, priority, tick)

    def _goes_on(self, held: _Slot) -> bool:
        """The held turn goes on unless the head of the queue is more urgent."""
        head = self._head()
        return head is None or head[1] <= held[3]

    # -- the policy interface --------------------------------------------------
    def push(self, f: Fiber, tick: int) -> None:
        self._count += 1
        p = f.priority
        if f.kind is FiberKind.KERNEL:
            self._kernel.push(f, p, tick)
            return
        g = self._group_of(f)
        g.add(f, p, tick)
        self._push_slot(g, p, tick)

    def requeue_front(self, f: Fiber, tick: int) -> None:
        if f.kind is FiberKind.KERNEL:
            self.push(f, tick)
            return
        g = self._group_of(f)
        g.put_front(f)
        self._count += 1
        self._turn = None
        self._push_slot(g, f.priority, tick)

    def rotate(self, f: Fiber, tick: int) -> None:
        if f.kind is FiberKind.KERNEL:
            self.push(f, tick)
            return
        g = self._group_of(f)
        p = f.priority
        g.add(f, p, tick)
        self._count += 1
        self._hold(g, p, tick)

    def pop_next(self, tick: int) -> Fiber | None:
        held, self._held = self._held, None
        if held is not None and self._goes_on(held):
            return self._fill(held)
        head = self._head()
        if head is None:                                # (then nothing was held either)
            return None
        if head[0]:
            self._turn = None
            self._count -= 1
            f = self._kernel.pop()
        else:
            self._stats.work += 1
            f = self._fill(heapq.heappop(self._slots))
        if held is not None:                            # overtaken: the turn waits at its place
            heapq.heappush(self._slots, held)
            self._stats.work += 1
        return f

    def _fill(self, slot: _Slot) -> Fiber:
        """The slot's container runs its next fiber (the preempted one first)."""
        self._turn = slot
        g = slot[2]
        g.slots -= 1
        self._count -= 1
        f = g.pop()
        assert f is not None, g
        return f

    def pop_kernel(self, tick: int) -> Fiber | None:
        f = self._kernel.pop()
        if f is not None:
            self._count -= 1
        return f

    def discard(self, f: Fiber) -> None:
        self._count -= 1
        if f.kind is FiberKind.KERNEL:
            self._kernel.discard(f)
        else:
            self._group_of(f).discard(f)

    def drop_container(self, container: Any) -> None:
        g = self._groups.pop(container, None)
        if g is not None:
            g.dropped = True
            if self._held is not None and self._held[2] is g:
                self._held = None
            if self._turn is not None and self._turn[2] is g:
                self._turn = None

    def next_is_guest(self) -> bool:
        """No kernel fiber waits, and ``pop_next`` would give a guest fiber."""
        if len(self._kernel):
            return False
        c = self.pick_container(0)
        return c is not None and c is not KERNEL

    def pop_guest(self, tick: int) -> Fiber | None:
        """``pop_next`` if it gives a guest fiber and no kernel fiber waits, else None
        (and nothing changes)."""
        if self._kernel._live:
            return None
        if self._held is not None:
            return self.pop_next(tick) if self.next_is_guest() else None
        self._clean()
        if not self._slots:
            return None
        self._stats.work += 1
        return self._fill(heapq.heappop(self._slots))

    def handoff(self, f: Fiber, tick: int) -> Fiber | None:
        """``push(f)`` then ``pop_guest``.  When nothing else is runnable (no slot
        queued, stale or live, no kernel fiber, no held turn) that gives ``f``
        back; the heaps are then left alone and only what the pair would
        leave changes: the sequence, the work count, the turn."""
        g = self._groups.get(f.container)
        if self._count or self._slots or self._held or g is None or g.queue._heap or f.kind is FiberKind.KERNEL:
            self.push(f, tick)
            return self.pop_guest(tick)
        p = f.priority
        stats = self._stats
        stats.seq += 2                          # the group's queue entry, then the slot
        stats.work += 4                         # each pushed, each popped
        self._turn = (tick - p * self._aging, stats.seq, g, p)
        return f

    def pick_container(self, tick: int) -> Any:
        if self._held is not None and self._goes_on(self._held):
            return self._held[2].container
        head = self._head()
        if head is None:
            return None
        return KERNEL if head[0] else self._slots[0][2].container

    def slice_expired(self, tick: int) -> None:
        held, self._held = self._held, None
        if held is not None:
            g = held[2]
            g.slots -= 1
            self._push_slot(g, held[3], tick)

    def runnable(self) -> int:
        return self._count


class PerContainerPolicy:
    """A run queue per container; containers by priority (aging), round robin inside one."""
    name = "per-container"

    def __init__(self, stats: _Stats, aging: int, quantum: int) -> None:
        self._stats = stats
        self._aging = aging
        self.quantum = quantum
        self._groups: dict[Any, _Group] = {}
        self._ready: _AgingQueue[_Group] = _AgingQueue(aging, stats)      # groups with runnable fibers, not current
        self.current: _Group | None = None
        self.budget = 0
        self._count = 0

    def _group_of(self, f: Fiber) -> _Group:
        key = _group_key(f)
        g = self._groups.get(key)
        if g is None:
            g = self._groups[key] = _Group(key, self._aging, self._stats)
        return g

    def _ready_up(self, g: _Group, tick: int) -> None:
        if g is not self.current and g._rq is None:
            self._ready.push(g, g.priority, tick)

    def push(self, f: Fiber, tick: int) -> None:
        g = self._group_of(f)
        g.add(f, f.priority, tick)
        self._count += 1
        self._ready_up(g, tick)

    def requeue_front(self, f: Fiber, tick: int) -> None:
        g = self._group_of(f)
        g.put_front(f)
        self._count += 1
        self._ready_up(g, tick)

    def rotate(self, f: Fiber, tick: int) -> None:
        self.push(f, tick)                  # the current group keeps its turn (and budget)

    def _rotate(self, tick: int) -> None:
        g, self.current = self.current, None
        if g is not None and g.count and g._rq is None:
            self._ready.push(g, g.priority, tick)

    def _pick(self) -> _Group | None:
        while (g := self._ready.pop()) is not None:
            if g.count:
                self.current, self.budget = g, self.quantum
                return g
        return None

    def pop_next(self, tick: int) -> Fiber | None:
        g = self.current
        if g is not None and (self.budget <= 0 or not g.count):
            self._rotate(tick)
            g = None
        if g is None:
            g = self._pick()
            if g is None:
                return None
        self.budget -= 1
        self._count -= 1
        return g.pop()

    def pop_kernel(self, tick: int) -> Fiber | None:
        g = self._groups.get(KERNEL)
        f = g.pop() if g is not None else None
        if f is not None:
            self._count -= 1
        return f

    def discard(self, f: Fiber) -> None:
        self._count -= 1
        self._group_of(f).discard(f)

    def drop_container(self, container: Any) -> None:
        g = self._groups.pop(container, None)
        if g is not None:
            self._ready.discard(g)
            if self.current is g:
                self.current = None

    def next_is_guest(self) -> bool:
        """No kernel fiber waits, and ``pop_next`` would give a guest fiber."""
        k = self._groups.get(KERNEL)
        return not (k is not None and k.count) and self._count > 0

    def pop_guest(self, tick: int) -> Fiber | None:
        """``pop_next`` if it gives a guest fiber and no kernel fiber waits, else None
        (and nothing changes)."""
        return self.pop_next(tick) if self.next_is_guest() else None

    def handoff(self, f: Fiber, tick: int) -> Fiber | None:
        """``push(f)`` then ``pop_guest``."""
        self.push(f, tick)
        return self.pop_guest(tick)

    def pick_container(self, tick: int) -> Any:
        self._rotate(tick)
        g = self._pick()
        return g.container if g is not None else None

    def slice_expired(self, tick: int) -> None:
        self._rotate(tick)

    def runnable(self) -> int:
        return self._count


POLICIES: dict[str, type[GlobalPolicy | PerContainerPolicy]] = {
    GlobalPolicy.name: GlobalPolicy,
    PerContainerPolicy.name: PerContainerPolicy,
}


class Scheduler:
    """The fiber scheduler of pid 0, on a virtual clock.

    ``policy`` is ``"global"`` or ``"per-container"`` (named in the image).
    ``rng``: an optional seeded ``random.Random``; if given, each sync's try
    phase starts at a random arm (Guile fibers' policy) instead of the first.
    ``log`` receives one line per kernel fiber that crashed.
    """

    def __init__(self, clock: Clock, policy: str = "global", *, aging: int = AGING,
                 quantum: int = QUANTUM, rng: random.Random | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r} (known: {', '.join(POLICIES)})")
        if aging < 0 or quantum < 1:
            raise ValueError("aging must be >= 0 and quantum >= 1")
        self.clock = clock
        self.stats = _Stats()
        self._policy = POLICIES[policy](self.stats, aging, quantum)
        self.deferred: Fiber | None = None              # committed, not queued yet (see ``policy``)
        self.rng = rng
        self.log = log if log is not None else _log.warning
        self.fibers: dict[int, Fiber] = {}              # by fid, until reaped
        self._by_container: dict[Any, dict[Fiber, None]] = {}
        self._fids = itertools.count(1)
        self.running: Fiber | None = None               # the fiber the HAL (or step) runs
        self._stepping: Fiber | None = None             # the kernel fiber inside its generator
        self.tick = 0                                   # dispatches so far
        self.wakeups = 0                                # parked fibers made RUNNABLE so far
        self.tracer: Any = None                         # a machine/trace.py Tracer (pid 0 sets it)

    @property
    def policy(self) -> Any:
        """The run queues.  A fiber committed by pid 0's IPC fast path
        (kernel/_fastipc.c) may wait in ``deferred`` instead of being queued at
        once: it is queued here, by the first look at the queues, exactly as it
        would have been at its commit (nothing was queued and no dispatch
        happened in between: anything that does either looks here first).
        ``next_guest`` takes it without queueing it when nothing else is
        runnable (``handoff``: L4's direct process switch)."""
        f = self.deferred
        if f is not None:
            self.deferred = None
            self._policy.push(f, self.tick)
        return self._policy

    # -- creating fibers -----------------------------------------------------------
    def spawn_kernel(self, gen: Generator[Any, Any, Any], name: str = "", container: Any = None,
                     priority: int | None = None) -> Fiber:
        """A kernel fiber running generator ``gen``; RUNNABLE."""
        if not inspect.isgenerator(gen):
            raise TypeError(f"spawn_kernel needs a generator, not {gen!r}")
        f = Fiber(next(self._fids), FiberKind.KERNEL, name or gen.__name__, container, priority, gen=gen)
        return self._register(f)

    def spawn_guest(self, ctx: Any, container: Any, name: str = "", priority: int | None = None) -> Fiber:
        """A guest fiber (``ctx`` is the HAL's) in ``container``; RUNNABLE."""
        if container is None:
            raise ValueError("a guest fiber belongs to a container")
        f = Fiber(next(self._fids), FiberKind.GUEST, name, container, priority, ctx=ctx)
        return self._register(f)

    def _register(self, f: Fiber) -> Fiber:
        self.fibers[f.fid] = f
        if f.container is not None:
            self._by_container.setdefault(f.container, {})[f] = None
        self.policy.push(f, self.tick)
        t = self.tracer
        if t is not None:
            t.fiber_state(f, "runnable")
        return f

    # -- syncing -------------------------------------------------------------------
    def sync(self, fiber: Fiber, op: Operation) -> Completed | Blocked:
        """Sync the running guest fiber on ``op`` (the syscall layer's entry).

        ``Completed(value)`` if an arm committed at once (``Completed(-errno,
        error)`` if it failed); the fiber goes on running.  Otherwise
        ``BLOCKED``: the fiber is parked, and becomes RUNNABLE with
        ``fiber.result`` set when an arm commits.
        """
        assert fiber is self.running and fiber.kind is FiberKind.GUEST, \
            f"sync: {fiber!r} is not the running guest fiber ({self.running!r})"
        outcome = self._perform(fiber, op)
        if outcome is NOT_READY:
            self.running = None
            return BLOCKED
        if isinstance(outcome, Failed):
            err = outcome.error
            assert isinstance(err, KernelError), err
            fiber.error = err
            return Completed(-int(err.errno), err)
        return Completed(outcome)

    def _perform(self, fiber: Fiber, op: Operation) -> Any:
        sync = Sync(self.clock, fiber.party, partial(self.committed, fiber), fiber=fiber,
                    catch_all=fiber.kind is FiberKind.KERNEL)
        outcome = perform(sync, op, self.rng)
        if outcome is NOT_READY:
            fiber.state = FiberState.BLOCKED
            fiber._sync = sync
            t = self.tracer
            if t is not None:
                t.fiber_state(fiber, "blocked", sync.describe())
        return outcome

    def park(self, fiber: Fiber, sync: Sync) -> None:
        """Block the running guest fiber on a sync the caller has already parked
        on its source (a one-arm sync that is its own waiter: kernel/pid0.py).
        ``sync`` must call :meth:`committed` when it commits."""
        assert fiber is self.running and fiber.kind is FiberKind.GUEST, \
            f"park: {fiber!r} is not the running guest fiber ({self.running!r})"
        fiber.state = FiberState.BLOCKED
        fiber._sync = sync
        self.running = None
        t = self.tracer
        if t is not None:
            t.fiber_state(fiber, "blocked", sync.describe())

    def committed(self, fiber: Fiber, outcome: Any) -> None:
        """A parked sync committed: the fiber becomes RUNNABLE with its result."""
        assert fiber.state is FiberState.BLOCKED, fiber
        fiber._sync = None
        if fiber.kind is FiberKind.KERNEL:
            fiber._resume = (None, outcome.error) if isinstance(outcome, Failed) else (outcome, None)
        elif isinstance(outcome, Failed):
            err = outcome.error
            assert isinstance(err, KernelError), err
            fiber.result, fiber.error = -int(err.errno), err
        else:
            fiber.result, fiber.error = outcome, None
        fiber.state = FiberState.RUNNABLE
        self.wakeups += 1
        self.policy.push(fiber, self.tick)
        t = self.tracer
        if t is not None:
            t.fiber_state(fiber, "runnable")

    # -- choosing and running --------------------------------------------------------
    def next_fiber(self) -> Fiber | None:
        """The fiber that runs next (now RUNNING), or None if nothing is runnable."""
        assert self.running is None, f"next_fiber while {self.running!r} is running"
        f = self.policy.pop_next(self.tick)
        if f is None:
            return None
        assert f.state is FiberState.RUNNABLE, f
        self.tick += 1
        f.state = FiberState.RUNNING
        self.running = f
        t = self.tracer
        if t is not None:
            t.fiber_state(f, "running")
        return f

    def next_guest(self) -> Fiber | None:
        """``next_fiber`` if no kernel fiber is runnable and the next fiber is a guest
        fiber (pid 0 may then switch without going round its loop:
        ``VMKernel.switch_in_place``); otherwise None, and nothing changes."""
        assert self.running is None, f"next_guest while {self.running!r} is running"
        f = self.deferred
        if f is None:
            f = self._policy.pop_guest(self.tick)
        else:
            self.deferred = None
            f = self._policy.handoff(f, self.tick)
        if f is None:
            return None
        assert f.state is FiberState.RUNNABLE, f
        self.tick += 1
        f.state = FiberState.RUNNING
        self.running = f
        t = self.tracer
        if t is not None:
            t.fiber_state(f, "running")
        return f

    def step(self, fiber: Fiber) -> None:
        """Run a kernel fiber that ``next_fiber`` returned until it waits, yields or ends."""
        assert fiber is self.running and fiber.kind is FiberKind.KERNEL, fiber
        self.running = None
        if self._run_kernel(fiber):
            fiber.state = FiberState.RUNNABLE
            self.policy.push(fiber, self.tick)
            t = self.tracer
            if t is not None:
                t.fiber_state(fiber, "runnable")

    def run_kernel_fibers(self, max_steps: int | None = None) -> int:
        """Step runnable kernel fibers until none is runnable; returns the steps.

        A fiber that wakes another (a rendezvous) lets it run in the same
        call, but a fiber that yields the CPU is queued again only when the
        call ends, so a busy kernel fiber cannot keep this loop going.  A
        guest fiber the HAL has interrupted stays RUNNING meanwhile, unless a
        kernel fiber ended it (``kill_container``): then it is DONE and
        ``running`` is None, and the HAL must not resume it.
        """
        steps = 0
        yielded: list[Fiber] = []
        while max_steps is None or steps < max_steps:
            f = self.policy.pop_kernel(self.tick)
            if f is None:
                break
            assert f.state is FiberState.RUNNABLE, f
            self.tick += 1
            steps += 1
            f.state = FiberState.RUNNING
            t = self.tracer
            if t is not None:
                t.fiber_state(f, "running")
            if self._run_kernel(f):
                yielded.append(f)
        t = self.tracer
        for f in yielded:
            f.state = FiberState.RUNNABLE
            self.policy.push(f, self.tick)
            if t is not None:
                t.fiber_state(f, "runnable")
        return steps

    def _run_kernel(self, fiber: Fiber) -> bool:
        self._stepping = fiber
        try:
            return self._step(fiber)
        finally:
            self._stepping = None

    def _step(self, fiber: Fiber) -> bool:
        """Resume the generator until it parks, yields (True) or ends."""
        gen = fiber.gen
        assert gen is not None
        value, exc = fiber._resume
        fiber._resume = (None, None)
        while True:
            try:
                op = gen.throw(exc) if exc is not None else gen.send(value)
            except StopIteration as stop:
                self._end(fiber, stop.value)
                return False
            except Exception as e:  # noqa: BLE001 - an error in a fiber ends only that fiber
                fiber.error = e
                self.log(f"kernel fiber {fiber.fid} ({fiber.name}) crashed: {e!r}")
                self._end(fiber, e)
                return False
            if fiber.state is FiberState.DONE:      # it killed itself (exit, kill_container)
                self._close(fiber)
                return False
            if op is None:
                return True
            try:
                outcome = self._perform(fiber, op)
            except Exception as e:  # noqa: BLE001 - a guard's error is raised in the fiber
                value, exc = None, e
                continue
            if outcome is NOT_READY:
                return False
            if isinstance(outcome, Failed):
                value, exc = None, outcome.error
            else:
                value, exc = outcome, None

    def yield_(self, fiber: Fiber) -> None:
        """The running fiber gives up the CPU (the ``yield`` syscall): RUNNABLE, behind
        its peers, and under the global policy its container's turn ends too."""
        self._unrun(fiber)
        self.policy.push(fiber, self.tick)

    def requeue_front(self, fiber: Fiber) -> None:
        """The HAL took the CPU from the running fiber (its container's time slice ran
        out, or an interrupt woke someone): RUNNABLE, and first of its container's
        fibers, so that when the container runs again this fiber goes on.

        Fibers are cooperative inside a container: no sibling runs before it.
        Among containers this is a yield: under the per-container policy the
        container stays current until ``slice_expired`` (or its quantum of
        dispatches), under the global policy it goes behind the fibers
        already queued (see :class:`GlobalPolicy` for why).  A kernel fiber
        is simply queued: drivers are not preempted.
        """
        self._unrun(fiber)
        self.policy.requeue_front(fiber, self.tick)

    def rotate(self, fiber: Fiber) -> None:
        """The fiber timer preempted the running fiber (``fiber_preemption_ns``):
        RUNNABLE, behind its container's other fibers, and the container keeps
        its turn, so the next of its fibers runs (round robin inside the
        container; a container with one runnable fiber just goes on)."""
        self._unrun(fiber)
        self.policy.rotate(fiber, self.tick)

    def _unrun(self, fiber: Fiber) -> None:
        assert fiber.state is FiberState.RUNNING, fiber
        if fiber is self.running:
            self.running = None
        fiber.state = FiberState.RUNNABLE
        t = self.tracer
        if t is not None:
            t.fiber_state(fiber, "runnable")

    # -- ending fibers -----------------------------------------------------------------
    def exit(self, fiber: Fiber, value: Any = 0) -> None:
        """End ``fiber`` with exit value ``value`` (``fiber_exit``); its joiners wake."""
        self._end(fiber, value)

    def kill_container(self, container: Any, exit_value: Any = -int(Errno.EINTR)) -> list[Fiber]:
        """End every fiber of ``container`` (joiners wake with ``exit_value``); reaps them."""
        fibers = list(self._by_container.pop(container, {}))
        for f in fibers:
            self._end(f, exit_value)
        self.policy.drop_container(container)
        for f in fibers:
            self.fibers.pop(f.fid, None)
        return fibers

    def _end(self, fiber: Fiber, value: Any) -> None:
        if fiber.state is FiberState.DONE:
            return
        if fiber.state is FiberState.BLOCKED:
            sync, fiber._sync = fiber._sync, None
            assert sync is not None
            sync.abort()
        elif fiber.state is FiberState.RUNNABLE:
            self.policy.discard(fiber)
        if self.running is fiber:
            self.running = None
        fiber.state = FiberState.DONE
        fiber.exit_value = value
        t = self.tracer
        if t is not None:
            t.fiber_state(fiber, "done")
        if fiber.kind is FiberKind.KERNEL and fiber is not self._stepping:
            self._close(fiber)
        fiber.joiners.wake_all(value)
        if fiber.container is None:
            self.fibers.pop(fiber.fid, None)

    def _close(self, fiber: Fiber) -> None:
        assert fiber.gen is not None
        try:
            fiber.gen.close()
        except Exception as e:  # noqa: BLE001 - a bad finally block ends nothing more
            self.log(f"kernel fiber {fiber.fid} ({fiber.name}) failed to close: {e!r}")

    def reap(self, fiber: Fiber) -> None:
        """Forget a DONE fiber (its fid no longer resolves)."""
        assert fiber.state is FiberState.DONE, fiber
        self.fibers.pop(fiber.fid, None)
        group = self._by_container.get(fiber.container)
        if group is not None:
            group.pop(fiber, None)

    # -- the container scheduler's side --------------------------------------------------
    def pick_container(self) -> Any:
        """Per-container: end the current container's turn and choose the next
        (a container, KERNEL for pid 0's fibers, or None).  Global: the
        container whose fiber would run next."""
        return self.policy.pick_container(self.tick)

    def next_is_guest(self) -> bool:
        """True iff no kernel fiber is runnable and the next fiber to run is a guest
        fiber: pid 0 may then switch without going round its loop
        (``VMKernel.switch_in_place``).  Changes nothing."""
        return self.policy.next_is_guest()

    def slice_expired(self) -> None:
        """The HAL's time slice for the current container ran out (per-container policy)."""
        self.policy.slice_expired(self.tick)

    # -- looking -------------------------------------------------------------------------
    def fiber(self, fid: int) -> Fiber | None:
        return self.fibers.get(fid)

    def fibers_of(self, container: Any) -> list[Fiber]:
        return list(self._by_container.get(container, ()))

    def blocked(self) -> Iterator[Fiber]:
        return (f for f in self.fibers.values() if f.state is FiberState.BLOCKED)

    @property
    def runnable(self) -> int:
        return self.policy.runnable()

    @property
    def work(self) -> int:
        """Run-queue entries touched so far: a cost counter for tests and benchmarks."""
        self.policy                             # noqa: B018  (queues a deferred fiber: its push counts)
        return self.stats.work
