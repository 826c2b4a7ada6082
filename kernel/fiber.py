"""Fibers: the lightweight threads one scheduler runs.

Two kinds (:class:`FiberKind`), one record:

* **kernel** fibers are Python generators in pid 0 (drivers, services).  A
  kernel fiber waits by yielding an operation; the value of the ``yield`` is
  the sync's value, or the sync's error is raised there.  A bare ``yield``
  (None) gives up the CPU and stays runnable (trio's checkpoint).  Returning
  ends the fiber with the return value; an exception ends only that fiber
  (it is logged and kept in ``error``).
* **guest** fibers are opaque to the kernel core: ``ctx`` is whatever the HAL
  keeps there (a register context, a stack, in a container).  The syscall
  layer syncs them with ``Scheduler.sync``; when a parked guest fiber's sync
  commits, ``result`` holds the value for RAX (``-errno`` on failure, with the
  error in ``error``).

State machine (:class:`FiberState`)::

    RUNNABLE --next_fiber/step--> RUNNING --sync blocks--> BLOCKED
        ^                           |   \\--yield / requeue_front / rotate--> RUNNABLE
        +---------- commit ---------+----------------------------+
    any state --exit / kill / return--> DONE

``waiting_on`` describes a BLOCKED fiber's sync for the debugger
("recv on channel 3 | timeout at 1200 ns").

``ran_ns`` is pid 0's account for the optional fiber timer
(``fiber_preemption_ns``): the virtual ns a guest fiber has spent on the CPU
since it last blocked, yielded or was rotated by that timer.  Being preempted
(time slice, interrupt) pauses it, it does not reset it; kernel fibers are
never timed.

A fiber's *priority* (higher runs first) is its own if given at spawn, else its
container's (read every time it is queued, so a container's priority can
change), else :data:`KERNEL_PRIORITY`.  Its *party* (for channels: whose side
it is on) is its container, or KERNEL.
"""
from __future__ import annotations

from collections.abc import Generator
from enum import Enum
from typing import Any

from .events import KERNEL, Sync, WaitQueue

__all__ = ["KERNEL_PRIORITY", "Fiber", "FiberKind", "FiberState"]

KERNEL_PRIORITY = 255
"""Priority of pid 0's fibers unless given: the top of the image's container
range 0..255 (``boot/vmkimage.py`` MAX_PRIORITY); higher numbers run first."""


class FiberState(Enum):
    RUNNABLE = "runnable"
    RUNNING = "running"
    BLOCKED = "blocked"
    DONE = "done"


class FiberKind(Enum):
    KERNEL = "kernel"       # a Python generator in pid 0
    GUEST = "guest"         # an opaque context the HAL runs


class Fiber:
    """One fiber.  Created by ``Scheduler.spawn_kernel`` / ``spawn_guest`` only."""
    __slots__ = (
        "__weakref__",
        "_priority",
        "_resume",
        "_rq",
        "_sync",
        "container",
        "ctx",
        "error",
        "exit_value",
        "fid",
        "gen",
        "joiners",
        "kind",
        "name",
        "ran_ns",
        "result",
        "state",
    )

    def __init__(self, fid: int, kind: FiberKind, name: str, container: Any, priority: int | None,
                 gen: Generator[Any, Any, Any] | None = None, ctx: Any = None) -> None:
        self.fid = fid
        self.kind = kind
        self.name = name
        self.container = container
        self.state = FiberState.RUNNABLE
        self.result: Any = None             # guest: the value for RAX after a parked sync
        self.ran_ns = 0                     # guest: CPU time since it last blocked/yielded (pid 0)
        self.error: BaseException | None = None
        self.exit_value: Any = None
        self.joiners = WaitQueue()          # syncs parked on join(self)
        self.gen = gen
        self.ctx = ctx
        self._priority = priority
        self._sync: Sync | None = None      # the sync a BLOCKED fiber is parked in
        self._resume: tuple[Any, BaseException | None] = (None, None)   # kernel: next send/throw
        self._rq: int | None = None         # run-queue token (scheduler.py)

    @property
    def priority(self) -> int:
        if self._priority is not None:
            return self._priority
        if self.container is not None:
            return int(self.container.priority)
        return KERNEL_PRIORITY

    @property
    def party(self) -> Any:
        return self.container if self.container is not None else KERNEL

    @property
    def done(self) -> bool:
        return self.state is FiberState.DONE

    @property
    def is_kernel(self) -> bool:
        return self.kind is FiberKind.KERNEL

    @property
    def waiting_on(self) -> str | None:
        """What a BLOCKED fiber's sync waits for (made when asked: blocking is hot)."""
        sync = self._sync
        return sync.describe() if sync is not None and self.state is FiberState.BLOCKED else None

    def __repr__(self) -> str:
        where = f" in {self.container!r}" if self.container is not None else ""
        what = f" on {self.waiting_on}" if self.waiting_on else ""
        return f"<Fiber {self.fid} {self.name or self.kind.value}{where} {self.state.value}{what}>"
