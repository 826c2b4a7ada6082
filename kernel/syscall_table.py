"""The one table of vmk system calls.

Containers enter the kernel only through ``syscall``: number in RAX,
arguments in RDI, RSI, RDX, R10, R8, R9, result in RAX, a negative errno on
failure (the Linux convention).  Every pointer argument is checked against the
caller's address space.  ``vmk.h`` (C) and ``vmk.inc`` (assembler) for guest
programs are generated from this table (``vmk.tools.guestapi``); nothing else
defines a syscall number.

The CML ``sync`` call takes an array of event descriptors (:data:`EVENT_LAYOUT`)
and returns the index of the arm that fired; the arm's value (bytes received,
fiber exit value, ...) is written back into that descriptor's ``result`` field.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = ["Syscall", "SYSCALLS", "Errno", "EventKind", "EVENT_LAYOUT", "EVENT_SIZE", "SyscallSpec"]


@dataclass(frozen=True, slots=True)
class SyscallSpec:
    number: int
    name: str
    args: tuple[str, ...]          # C declarations, in register order
    returns: str
    doc: str


class Syscall(IntEnum):
    EXIT = 0
    YIELD = 1
    FIBER_SPAWN = 2
    FIBER_JOIN = 3
    FIBER_EXIT = 4
    FIBER_SELF = 5
    CHAN_CREATE = 6
    CHAN_CLOSE = 7
    SEND = 8
    RECV = 9
    SYNC = 10
    SLEEP = 11
    TIME = 12
    GETPID = 13
    SPAWN = 14
    WAIT = 15
    CONSOLE_WRITE = 16
    HANDLE_DUP = 17
    COND_CREATE = 18
    COND_SIGNAL = 19


SYSCALLS: tuple[SyscallSpec, ...] = (
    SyscallSpec(0, "exit", ("long code",), "void", "End the calling container (all its fibers) with an exit code."),
    SyscallSpec(1, "yield", (), "long", "Let other fibers run; returns 0."),
    SyscallSpec(2, "fiber_spawn", ("void *entry", "void *stack_top", "long arg"), "long",
                "Start a fiber in this container at entry(arg) on the given stack; returns its fiber id."),
    SyscallSpec(3, "fiber_join", ("long fid",), "long", "Wait for a fiber of this container to end; returns its exit value."),
    SyscallSpec(4, "fiber_exit", ("long value",), "void", "End the calling fiber with a value for fiber_join."),
    SyscallSpec(5, "fiber_self", (), "long", "The calling fiber's id."),
    SyscallSpec(6, "chan_create", ("long msg_size", "long tag"), "long",
                "A new channel for messages of exactly msg_size bytes (0 = any size up to 4096) and tag "
                "(0 = any); returns a handle, or -ENFILE when the global channel table is full."),
    SyscallSpec(7, "chan_close", ("long handle",), "long",
                "Close a handle; the channel is freed with its last handle, and fibers blocked on it wake with -EPIPE."),
    SyscallSpec(8, "send", ("long handle", "const void *buf", "long len"), "long",
                "Rendezvous: block until a receiver takes the message; returns 0."),
    SyscallSpec(9, "recv", ("long handle", "void *buf", "long len"), "long",
                "Rendezvous: block until a sender offers a message; returns its length."),
    SyscallSpec(10, "sync", ("struct vmk_event *events", "long count"), "long",
                "Concurrent ML sync on an array of events: exactly one arm commits; returns its index."),
    SyscallSpec(11, "sleep", ("long ns",), "long", "Block for ns nanoseconds of virtual time; returns 0."),
    SyscallSpec(12, "time", (), "long", "Virtual time in nanoseconds since boot."),
    SyscallSpec(13, "getpid", (), "long", "The calling container's pid."),
    SyscallSpec(14, "spawn", ("const char *program", "long name_len", "const long *handles", "long nhandles"), "long",
                "Start a container from a program of the boot image, passing it copies of handles; returns its pid."),
    SyscallSpec(15, "wait", ("long pid",), "long", "Wait for a container to end; returns its exit code."),
    SyscallSpec(16, "console_write", ("const void *buf", "long len"), "long",
                "Early-debug output straight to the console; returns len."),
    SyscallSpec(17, "handle_dup", ("long handle",), "long", "A second handle to the same channel."),
    SyscallSpec(18, "cond_create", (), "long", "A condition (a one-shot broadcast event); returns a handle."),
    SyscallSpec(19, "cond_signal", ("long handle",), "long", "Signal a condition: every waiter, now and later, wakes."),
)

assert [s.number for s in SYSCALLS] == [int(s) for s in Syscall], "table and enum disagree"


class Errno(IntEnum):
    """Errors returned as -errno (Linux numbers)."""
    EPERM = 1
    ESRCH = 3
    EINTR = 4
    EBADF = 9
    ECHILD = 10
    EAGAIN = 11
    ENOMEM = 12
    EFAULT = 14
    EINVAL = 22
    ENFILE = 23
    EMFILE = 24
    EPIPE = 32
    ENOSYS = 38
    EMSGSIZE = 90
    ETIMEDOUT = 110


class EventKind(IntEnum):
    """``struct vmk_event.kind`` for sync()."""
    SEND = 1          # handle, buf, len
    RECV = 2          # handle, buf, len   -> result = bytes received
    TIMEOUT = 3       # arg0 = ns relative to the sync
    AT_TIME = 4       # arg0 = absolute virtual ns
    IRQ = 5           # handle = IRQ line granted to the container -> result = count since last
    JOIN = 6          # handle = fiber id -> result = exit value
    COND = 7          # handle = condition
    ALWAYS = 8        # result = arg0
    NEVER = 9


# struct vmk_event { u32 kind; u32 flags; i64 handle; u64 arg0; u64 arg1; i64 result; }  (40 bytes)
EVENT_LAYOUT = (("kind", "I"), ("flags", "I"), ("handle", "q"), ("arg0", "Q"), ("arg1", "Q"), ("result", "q"))
EVENT_SIZE = 40
