"""Handles: a container's capabilities, like file descriptors.

A :class:`HandleTable` belongs to one container (its *owner*) and maps small
integers (lowest free first, as POSIX does for fds) to kernel objects: a
:class:`~vmk.kernel.channel.Channel`, a
:class:`~vmk.kernel.events.Condition`, an
:class:`~vmk.kernel.events.IrqSource` the HAL granted.  A guest names objects
only through its own table, so a handle cannot be forged: a number that is not
open in *this* table (another container's handle, a closed one, a negative
one, one of the wrong kind) is ``KernelError(EBADF)``, which the syscall layer
returns as ``-EBADF``.

Channel handles are counted holds (``Channel.hold(owner)``): ``dup`` and
``copy_to`` (the syscall layer passing a handle to another container, e.g. at
``spawn``, or a message carrying it: kernel/pid0.py) add one, ``close`` drops
one, and the channel is freed with its last hold; a moved handle takes its
sender's hold over (``install(obj, moved_from)``, then ``forget`` in the
sender).  Dropping holds is also what wakes a partner with ``EPIPE`` when the
other side of a channel is gone (kernel/channel.py).  ``close_all`` closes a
dying container's handles, in ascending order.

Every error is a :class:`~vmk.kernel.events.KernelError`; nothing else is raised
for bad guest input.
"""
from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any, TypeVar, overload

from .channel import Channel, ChannelTable
from .events import KernelError
from .syscall_table import Errno

__all__ = ["DEFAULT_HANDLES", "HandleTable"]

DEFAULT_HANDLES = 64
"""Handles per container unless the image says otherwise (``EMFILE`` beyond)."""

T = TypeVar("T")


class HandleTable:
    """The handles of one container (``owner``), at most ``capacity`` open."""

    def __init__(self, owner: Any, capacity: int = DEFAULT_HANDLES) -> None:
        self.owner = owner
        self.capacity = capacity
        self._objs: dict[int, Any] = {}
        self._free: list[int] = []          # closed numbers below _next, a heap
        self._next = 0

    # -- allocation ------------------------------------------------------------
    def _number(self) -> int:
        if len(self._objs) >= self.capacity:
            raise KernelError(Errno.EMFILE, f"{self.capacity} handles open")
        if self._free:
            return heapq.heappop(self._free)
        self._next += 1
        return self._next - 1

    def install(self, obj: Any, moved_from: Any = None) -> int:
        """A new handle to ``obj`` (a channel gains a hold by the owner).

        ``moved_from``: a party whose hold the new handle takes over instead
        (``Channel.transfer``: a moved handle, which its sender then ``forget``s)."""
        h = self._number()
        if isinstance(obj, Channel):
            if moved_from is None:
                obj.hold(self.owner)
            else:
                obj.transfer(moved_from, self.owner)
        self._objs[h] = obj
        return h

    def names(self, h: int, obj: Any) -> bool:
        """``h`` is open here and names ``obj``."""
        return self._objs.get(h) is obj

    def forget(self, h: int) -> None:
        """Drop ``h`` without releasing its object: its hold was moved away (``install``
        with ``moved_from``)."""
        del self._objs[h]
        heapq.heappush(self._free, h)

    def create_channel(self, table: ChannelTable, msg_size: int = 0, tag: int = 0, name: str = "") -> int:
        """``chan_create``: a new channel and a handle to it (EMFILE, ENFILE, EINVAL)."""
        if len(self._objs) >= self.capacity:
            raise KernelError(Errno.EMFILE, f"{self.capacity} handles open")
        ch = table.create(msg_size, tag, holder=self.owner, name=name)
        h = self._number()
        self._objs[h] = ch
        return h

    # -- lookup ----------------------------------------------------------------
    @overload
    def get(self, h: int) -> Any: ...

    @overload
    def get(self, h: int, kind: type[T]) -> T: ...

    def get(self, h: int, kind: type[Any] | None = None) -> Any:
        """The object behind ``h``; EBADF if not open here or not a ``kind``."""
        obj: Any = self._objs.get(h) if isinstance(h, int) and not isinstance(h, bool) else None
        if obj is None:
            raise KernelError(Errno.EBADF, f"handle {h!r} is not open")
        if kind is not None and not isinstance(obj, kind):
            raise KernelError(Errno.EBADF, f"handle {h} is a {type(obj).__name__}, not a {kind.__name__}")
        return obj

    def channel(self, h: int) -> Channel:
        obj = self._objs.get(h) if type(h) is int else None
        if type(obj) is Channel:
            return obj                  # every send and recv comes here
        return self.get(h, Channel)

    # -- handle operations -----------------------------------------------------
    def dup(self, h: int) -> int:
        """``handle_dup``: a second handle to the same object."""
        return self.install(self.get(h))

    def copy_to(self, h: int, dest: HandleTable) -> int:
        """Pass ``h`` to another container: a new handle in ``dest`` to the same object."""
        return dest.install(self.get(h))

    def close(self, h: int) -> None:
        """``chan_close``: EBADF if ``h`` is not open; a channel loses one hold."""
        obj = self.get(h)
        del self._objs[h]
        heapq.heappush(self._free, h)
        if isinstance(obj, Channel):
            obj.release(self.owner)

    def close_if(self, h: int, obj: Any) -> bool:
        """Close ``h`` if it still names ``obj`` (a moved handle that went nowhere: the
        number may have been closed, or reused for something else, since)."""
        if self._objs.get(h) is not obj:
            return False
        self.close(h)
        return True

    def close_all(self) -> int:
        """Close every handle (the container is ending); returns how many."""
        n = 0
        for h in sorted(self._objs):
            self.close(h)
            n += 1
        return n

    def __contains__(self, h: object) -> bool:
        return h in self._objs

    def __len__(self) -> int:
        return len(self._objs)

    def items(self) -> Iterator[tuple[int, Any]]:
        return iter(sorted(self._objs.items()))

    def __repr__(self) -> str:
        return f"<HandleTable of {self.owner!r}: {len(self._objs)}/{self.capacity}>"
