"""The vmk image: one file holding the VM kernel's settings and its containers.

``vmk build`` (``tools/build.py``) writes it from a manifest; pid 0 reads it
at boot.  This module is the format: the dataclasses, :func:`encode_image` /
:func:`write_image`, and :func:`read_image`, which refuses a malformed file
with an :class:`ImageFormatError` (an :class:`~vmk.boot.loader.ImageError`)
whose one-line message reads ``<file>: <what> (<where>)``.

File layout (little endian)::

    offset 0   header, 64 bytes
                 char magic[8]      "VMKIMG01"
                 u32  version       1
                 u32  header_size   64
                 u64  file_size     the whole file; less on disk = truncated
                 u64  meta_offset   u64 meta_size     the metadata block
                 u64  blob_offset   u64 blob_size     the program bytes
                 u32  meta_crc32    u32 blob_crc32    zlib.crc32 of each block
    64         metadata: UTF-8 JSON, one object (below)
    blob_offset (16-aligned)  segment bytes, each 16-aligned, addressed by
               (offset, size) relative to blob_offset

Metadata (every field required, no other field allowed; sizes in bytes,
times in virtual ns)::

    {"kernel":     {"policy": "global" | "per-container", "channels": 256,
                    "fiber_preemption_ns": 0, "timeslice_ns": 1000000,
                    "console_ring": 4096, "max_fibers": 16384, "fiber_stack": 16384},
     "programs":   [{"name", "source", "entry",
                     "segments": [{"vaddr", "memsz", "flags": "rx", "offset", "size"}],
                     "symbols": {"name": address}}],
     "channels":   [{"name", "msg_size", "tag"}],
     "containers": [{"name", "program", "memory", "stack", "priority",
                     "ports": [[first, last], ...], "irqs": [4], "autostart": true,
                     "handles": ["console.rx", "console.tx", "jobs"],
                     "max_fibers": 100, "fiber_stack": 8192}]}

Two exceptions to "every field required", for images written before the
fiber settings existed: a kernel without ``max_fibers`` / ``fiber_stack``
reads as the defaults (:class:`KernelSettings`), and a container's
``max_fibers`` / ``fiber_stack`` are written only when the manifest sets them
(absent: the kernel's value).  ``max_fibers`` is how many fibers a container
may have alive at once (main included; ``fiber_spawn`` beyond it: -EAGAIN);
``fiber_stack`` the size of a stack the kernel chooses (``fiber_spawn`` with
stack_top 0), taken from the top of the container's heap.

The names of the kernel, channel and container fields are the manifest's keys
(``tools/build.py`` maps an error's ``where`` back to a manifest line).

Virtual layout of every container (one address space each, user pages only)::

    USER_BASE  0x0040_0000   program segments (code, then data/bss), page-granular;
                             the entry point of a flat ``.s`` program is ``_start``,
                             or USER_BASE when it has no ``_start`` label
    heap_base                first page above the program: the heap, up to the
                             ``memory`` left after the program and the stack
                             (see :meth:`Image.layout`)
    stack_bottom             STACK_TOP - stack (one unmapped guard page below it
                             comes for free: the heap ends far lower)
    STACK_TOP  0x7FFF_F000   initial RSP (16-byte aligned); the stack grows down

``memory`` is the physical RAM the container may use: its program pages, its
heap and its stack (page tables are the kernel's).  The sum over the running
containers is checked against the machine's RAM at boot, not here.

Boot order: the containers with ``autostart`` get pids 1, 2, ... in image
order (pid 1 = the first).  A container without ``autostart`` is a template
for the ``spawn`` syscall, which starts it by name with the handles it is
passed.  Handle ``i`` of a container is ``handles[i]``: ``console.rx`` /
``console.tx`` are the kernel's serial channels, any other name is a channel
of ``channels``, created once at boot and shared by every container naming it.

Invariants checked by :func:`validate_image` (and so by both the writer and
the reader): unique names; references resolve; every declared channel is
named by some container; the channel table holds the boot channels; segments
lie in [USER_BASE, STACK_TOP), do not share a page, and the entry is in an
executable one; a container's program and stack fit its ``memory`` and do not
overlap; ports are 0..0xFFFF; IRQs are 0..23 (not 2, the PIC cascade) and
granted to at most one container; at least one container starts at boot.
"""
from __future__ import annotations

import bisect
import itertools
import json
import os
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntFlag, StrEnum
from typing import Any, NoReturn

from .loader import ImageError

__all__ = [
    "MAGIC", "VERSION", "HEADER_SIZE", "PAGE_SIZE", "USER_BASE", "STACK_TOP", "MAX_MEMORY", "DEFAULT_STACK",
    "MAX_MSG_SIZE", "IRQ_LINES", "CONSOLE_RX", "CONSOLE_TX", "NAME_RE", "CHANNEL_NAME_RE",
    "ImageError", "ImageFormatError", "Policy", "SegFlag", "KernelSettings", "Segment", "Program",
    "ChannelSpec", "ContainerSpec", "Layout", "Image", "DEFAULT_MAX_FIBERS", "DEFAULT_FIBER_STACK",
    "validate_image", "encode_image", "write_image", "read_image", "is_vmk_image",
]

MAGIC = b"VMKIMG01"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQQQQII")
HEADER_SIZE = _HEADER.size                  # 64
BLOB_ALIGN = 16

PAGE_SIZE = 0x1000
USER_BASE = 0x0040_0000
STACK_TOP = 0x7FFF_F000
MAX_MEMORY = STACK_TOP - USER_BASE          # the whole user range
DEFAULT_STACK = 16 << 10
MAX_MSG_SIZE = 4096                         # chan_create: 0 = any size up to this
MAX_TAG = 0xFFFF_FFFF
MAX_CHANNELS = 65536
MAX_PRIORITY = 255
MIN_SLICE_NS = 1_000                        # shorter slices would be all switching
DEFAULT_MAX_FIBERS = 16_384                 # per container, main fiber included
MAX_MAX_FIBERS = 1 << 20                    # the most a manifest may allow one container
DEFAULT_FIBER_STACK = 16 << 10              # a kernel-chosen fiber stack: as the default main stack
CONSOLE_RING_RANGE = (16, 1 << 20)
IRQ_LINES = 24                              # IO-APIC redirection entries
IRQ_CASCADE = 2                             # the slave 8259 hangs on IRQ 2
MAX_PORT = 0xFFFF
CONSOLE_RX = "console.rx"
CONSOLE_TX = "console.tx"
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")      # programs, containers
CHANNEL_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")  # no '.': never a console.* name
_U64 = (1 << 64) - 1
_I64 = (1 << 63) - 1

Where = tuple[str | int, ...]
Fail = Callable[..., NoReturn]          # fail(what, *where)


class ImageFormatError(ImageError):
    """A vmk image (or an :class:`Image` about to be written) that breaks the format.

    ``what`` says what is wrong, ``where`` is the path of the offending field
    (``("containers", 0, "memory")``) or a byte position (``("offset 0x10",)``).
    """

    def __init__(self, path: str, what: str, where: Where = ()) -> None:
        self.path, self.what, self.where = path, what, where
        super().__init__(f"{path}: {what} ({format_where(where)})" if where else f"{path}: {what}")


def format_where(where: Where) -> str:
    out = ""
    for part in where:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class Policy(StrEnum):
    """Which scheduler runs the fibers (DESIGN.md, kernel/ "Scheduling policy")."""
    GLOBAL = "global"                   # one scheduler over every fiber
    PER_CONTAINER = "per-container"     # one per container, under the HAL's container scheduler


class SegFlag(IntFlag):
    """Segment permissions; the bits of ELF ``p_flags``."""
    X = 1
    W = 2
    R = 4


def _flags_text(flags: SegFlag) -> str:
    return "".join(ch for ch, bit in (("r", SegFlag.R), ("w", SegFlag.W), ("x", SegFlag.X)) if flags & bit)


@dataclass(frozen=True, slots=True)
class KernelSettings:
    policy: Policy = Policy.GLOBAL
    channels: int = 256                 # capacity of the global channel table
    fiber_preemption_ns: int = 0        # 0: fibers are cooperative inside a container
    timeslice_ns: int = 1_000_000       # container time slice (LAPIC timer)
    console_ring: int = 4096            # UART receive ring, bytes
    max_fibers: int = DEFAULT_MAX_FIBERS    # live fibers per container (a container may say otherwise)
    fiber_stack: int = DEFAULT_FIBER_STACK  # bytes of a kernel-chosen fiber stack (idem)


@dataclass(frozen=True, slots=True)
class Segment:
    vaddr: int
    data: bytes                         # the initialised bytes; the rest up to memsz is zero
    memsz: int
    flags: SegFlag

    @property
    def end(self) -> int:
        return self.vaddr + self.memsz


@dataclass(frozen=True, slots=True)
class Program:
    name: str
    source: str                         # what it was built from (file name, for messages and the debugger)
    entry: int
    segments: tuple[Segment, ...]
    symbols: Mapping[str, int] = field(default_factory=dict)

    @property
    def end(self) -> int:
        """First byte above the highest segment."""
        return max((s.end for s in self.segments), default=USER_BASE)

    def pages(self) -> int:
        """Bytes of RAM the segments occupy (distinct pages)."""
        pages: set[int] = set()
        for s in self.segments:
            pages.update(range(s.vaddr // PAGE_SIZE, -(-s.end // PAGE_SIZE)))
        return len(pages) * PAGE_SIZE

    def symbolize(self, address: int) -> tuple[str, int] | None:
        """The nearest symbol at or below ``address`` and the offset from it."""
        table = sorted((a, n) for n, a in self.symbols.items())
        i = bisect.bisect_right(table, (address, "\U0010ffff")) - 1
        return (table[i][1], address - table[i][0]) if i >= 0 else None


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    name: str
    msg_size: int = 0                   # 0 = any size up to MAX_MSG_SIZE
    tag: int = 0                        # 0 = any


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    name: str
    program: str
    memory: int
    stack: int = DEFAULT_STACK
    priority: int = 1                   # 0..255, higher runs first
    ports: tuple[tuple[int, int], ...] = ()     # granted I/O ports, inclusive ranges
    irqs: tuple[int, ...] = ()
    autostart: bool = True
    handles: tuple[str, ...] = ()       # handle i -> console.rx | console.tx | a channel name
    max_fibers: int | None = None       # None: the kernel's max_fibers
    fiber_stack: int | None = None      # None: the kernel's fiber_stack

    def allows_port(self, port: int) -> bool:
        return any(lo <= port <= hi for lo, hi in self.ports)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where things are in a container's address space (see the module docstring)."""
    code_base: int
    heap_base: int
    heap_size: int
    stack_bottom: int
    stack_top: int


@dataclass(frozen=True, slots=True)
class Image:
    kernel: KernelSettings
    programs: tuple[Program, ...]
    containers: tuple[ContainerSpec, ...]
    channels: tuple[ChannelSpec, ...] = ()

    def program(self, name: str) -> Program:
        for p in self.programs:
            if p.name == name:
                return p
        raise KeyError(name)

    def container(self, name: str) -> ContainerSpec:
        for c in self.containers:
            if c.name == name:
                return c
        raise KeyError(name)

    def channel(self, name: str) -> ChannelSpec:
        for ch in self.channels:
            if ch.name == name:
                return ch
        raise KeyError(name)

    def max_fibers(self, container: ContainerSpec) -> int:
        """How many fibers ``container`` may have alive at once."""
        return self.kernel.max_fibers if container.max_fibers is None else container.max_fibers

    def fiber_stack(self, container: ContainerSpec) -> int:
        """The size of the fiber stacks the kernel chooses in ``container``."""
        return self.kernel.fiber_stack if container.fiber_stack is None else container.fiber_stack

    def boot_order(self) -> tuple[ContainerSpec, ...]:
        """The autostart containers; the first gets pid 1."""
        return tuple(c for c in self.containers if c.autostart)

    def layout(self, container: ContainerSpec) -> Layout:
        prog = self.program(container.program)
        heap_base = _page_up(prog.end)
        return Layout(USER_BASE, heap_base, container.memory - prog.pages() - container.stack,
                      STACK_TOP - container.stack, STACK_TOP)


def _page_up(n: int) -> int:
    return -(-n // PAGE_SIZE) * PAGE_SIZE


def _size(n: int) -> str:
    if n and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n and n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return f"{n} bytes"


# ---------------------------------------------------------------------- validation
def validate_image(image: Image, path: str = "<image>") -> None:
    """Check the invariants of the module docstring; raise :class:`ImageFormatError`."""
    def fail(what: str, *where: str | int) -> NoReturn:
        raise ImageFormatError(path, what, tuple(where))

    k = image.kernel
    if not isinstance(k.policy, Policy):
        fail(f"unknown scheduling policy {k.policy!r} (use {' or '.join(repr(p.value) for p in Policy)})",
             "kernel", "policy")
    if not 1 <= k.channels <= MAX_CHANNELS:
        fail(f"channel table capacity {k.channels} is out of range (1..{MAX_CHANNELS})", "kernel", "channels")
    if k.fiber_preemption_ns != 0 and not MIN_SLICE_NS <= k.fiber_preemption_ns <= _I64:
        fail(f"fiber_preemption_ns {k.fiber_preemption_ns} must be 0 (cooperative) or at least {MIN_SLICE_NS}",
             "kernel", "fiber_preemption_ns")
    if not MIN_SLICE_NS <= k.timeslice_ns <= _I64:
        fail(f"timeslice_ns {k.timeslice_ns} must be at least {MIN_SLICE_NS}", "kernel", "timeslice_ns")
    lo, hi = CONSOLE_RING_RANGE
    if not lo <= k.console_ring <= hi:
        fail(f"console_ring {k.console_ring} is out of range ({lo}..{hi} bytes)", "kernel", "console_ring")
    _check_fiber_settings(k.max_fibers, k.fiber_stack, lambda what, *where: fail(what, "kernel", *where))

    programs: dict[str, Program] = {}
    for i, p in enumerate(image.programs):
        _check_name(p.name, NAME_RE, "program", fail, ("programs", i, "name"))
        if p.name in programs:
            fail(f"two programs are named {p.name!r}", "programs", i, "name")
        programs[p.name] = p
        _check_program(p, lambda what, *where, i=i: fail(what, "programs", i, *where))

    channels: dict[str, int] = {}
    for i, ch in enumerate(image.channels):
        _check_name(ch.name, CHANNEL_NAME_RE, "channel", fail, ("channels", i, "name"))
        if ch.name in channels:
            fail(f"two channels are named {ch.name!r}", "channels", i, "name")
        channels[ch.name] = i
        if not 0 <= ch.msg_size <= MAX_MSG_SIZE:
            fail(f"channel {ch.name!r}: msg_size {ch.msg_size} is out of range "
                 f"(0 = any size, or 1..{MAX_MSG_SIZE})", "channels", i, "msg_size")
        if not 0 <= ch.tag <= MAX_TAG:
            fail(f"channel {ch.name!r}: tag {ch.tag} is out of range (0 = any, or 1..{MAX_TAG:#x})",
                 "channels", i, "tag")
    if len(channels) + 2 > k.channels:
        fail(f"the channel table holds {k.channels} channels, fewer than the {len(channels) + 2} created at "
             f"boot ({len(channels)} declared + console.rx and console.tx)", "kernel", "channels")

    names: set[str] = set()
    irq_owner: dict[int, str] = {}
    named: set[str] = set()
    for i, c in enumerate(image.containers):
        def cfail(what: str, *where: str | int, i: int = i, c: ContainerSpec = c) -> NoReturn:
            fail(f"container {c.name!r}: {what}", "containers", i, *where)
        _check_name(c.name, NAME_RE, "container", fail, ("containers", i, "name"))
        if c.name in names:
            fail(f"two containers are named {c.name!r}", "containers", i, "name")
        names.add(c.name)
        prog = programs.get(c.program)
        if prog is None:
            cfail(f"no program is named {c.program!r}", "program")
        if c.memory <= 0 or c.memory % PAGE_SIZE:
            cfail(f"memory {c.memory} must be a positive multiple of the page size ({PAGE_SIZE})", "memory")
        if c.memory > MAX_MEMORY:
            cfail(f"memory {_size(c.memory)} is more than the user address range holds "
                  f"({MAX_MEMORY:#x} bytes)", "memory")
        if c.stack <= 0 or c.stack % PAGE_SIZE:
            cfail(f"stack {c.stack} must be a positive multiple of the page size ({PAGE_SIZE})", "stack")
        need = prog.pages() + c.stack
        if need > c.memory:
            cfail(f"memory {_size(c.memory)} is too small: program {prog.name!r} takes {_size(prog.pages())} "
                  f"and the stack {_size(c.stack)}", "memory")
        if prog.end > STACK_TOP - c.stack:
            cfail(f"program {prog.name!r} ends at {prog.end:#x}, inside the stack "
                  f"({STACK_TOP - c.stack:#x}..{STACK_TOP:#x})", "stack")
        if not 0 <= c.priority <= MAX_PRIORITY:
            cfail(f"priority {c.priority} is out of range (0..{MAX_PRIORITY})", "priority")
        _check_fiber_settings(c.max_fibers, c.fiber_stack, cfail)
        for j, (first, last) in enumerate(c.ports):
            for port in (first, last):
                if not 0 <= port <= MAX_PORT:
                    cfail(f"port {port:#x} is out of range (0..{MAX_PORT:#x})", "ports", j)
            if first > last:
                cfail(f"port range {first:#x}-{last:#x} is backwards", "ports", j)
        seen_irqs: set[int] = set()
        for j, irq in enumerate(c.irqs):
            if not 0 <= irq < IRQ_LINES:
                cfail(f"IRQ {irq} is out of range (0..{IRQ_LINES - 1})", "irqs", j)
            if irq == IRQ_CASCADE:
                cfail(f"IRQ {IRQ_CASCADE} is the PIC cascade and cannot be granted", "irqs", j)
            if irq in seen_irqs:
                cfail(f"IRQ {irq} is listed twice", "irqs", j)
            seen_irqs.add(irq)
            if irq in irq_owner:
                cfail(f"IRQ {irq} is already granted to container {irq_owner[irq]!r}", "irqs", j)
            irq_owner[irq] = c.name
        for j, h in enumerate(c.handles):
            if h not in (CONSOLE_RX, CONSOLE_TX) and h not in channels:
                cfail(f"handle {j} names {h!r}, which is neither {CONSOLE_RX}, {CONSOLE_TX} nor a declared "
                      "channel", "handles", j)
            named.add(h)
    for name, i in channels.items():
        if name not in named:
            fail(f"channel {name!r} is declared but no container names it in its handles", "channels", i, "name")
    if not any(c.autostart for c in image.containers):
        fail("no container has autostart = true: nothing would run as pid 1", "containers")


def _check_fiber_settings(max_fibers: int | None, fiber_stack: int | None, fail: Fail) -> None:
    if max_fibers is not None and not 1 <= max_fibers <= MAX_MAX_FIBERS:
        fail(f"max_fibers {max_fibers} is out of range (1..{MAX_MAX_FIBERS})", "max_fibers")
    if fiber_stack is not None and not (0 < fiber_stack <= MAX_MEMORY and fiber_stack % PAGE_SIZE == 0):
        fail(f"fiber_stack {fiber_stack} must be a positive multiple of the page size ({PAGE_SIZE})",
             "fiber_stack")


def _check_name(name: str, pattern: re.Pattern[str], kind: str, fail: Fail, where: Where) -> None:
    if not pattern.fullmatch(name):
        allowed = "letters, digits, '_', '-'" + (", '.'" if pattern is NAME_RE else "")
        fail(f"bad {kind} name {name!r} (up to 64 of {allowed}; not starting with a digit, '-' or '.')", *where)


def _check_program(p: Program, fail: Fail) -> None:
    who = f"program {p.name!r}"
    if not p.segments:
        fail(f"{who} has no segments", "segments")
    spans = []
    for j, s in enumerate(p.segments):
        if s.memsz <= 0:
            fail(f"{who}: segment {j} is empty", "segments", j, "memsz")
        if len(s.data) > s.memsz:
            fail(f"{who}: segment {j} has {len(s.data)} bytes of data but memsz {s.memsz}", "segments", j, "size")
        if not s.flags or s.flags & ~(SegFlag.R | SegFlag.W | SegFlag.X):
            fail(f"{who}: segment {j} has bad flags {int(s.flags)}", "segments", j, "flags")
        if s.vaddr < USER_BASE or s.end > STACK_TOP:
            fail(f"{who}: segment {j} at {s.vaddr:#x}..{s.end:#x} is outside the user range "
                 f"{USER_BASE:#x}..{STACK_TOP:#x}", "segments", j, "vaddr")
        spans.append((s.vaddr, s.end, j))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in itertools.pairwise(spans):
        if _page_up(end_a) > start_b:
            where = "overlap" if end_a > start_b else "share the page at"
            page = start_b if end_a > start_b else start_b & ~(PAGE_SIZE - 1)
            fail(f"{who}: segments {a} and {b} {where} {page:#x}", "segments", b, "vaddr")
    if not any(s.vaddr <= p.entry < s.end and s.flags & SegFlag.X for s in p.segments):
        fail(f"{who}: entry point {p.entry:#x} is not in an executable segment", "entry")
    for name, addr in p.symbols.items():
        if not name or not 0 <= addr <= _U64:
            fail(f"{who}: bad symbol {name!r} = {addr}", "symbols")


# ---------------------------------------------------------------------- writing
def encode_image(image: Image) -> bytes:
    """The bytes of ``image``, after :func:`validate_image`.  Deterministic."""
    validate_image(image)
    blob = bytearray()
    programs = []
    for p in image.programs:
        segs = []
        for s in p.segments:
            blob += bytes(-len(blob) % BLOB_ALIGN)
            segs.append({"vaddr": s.vaddr, "memsz": s.memsz, "flags": _flags_text(s.flags),
                         "offset": len(blob), "size": len(s.data)})
            blob += s.data
        programs.append({"name": p.name, "source": p.source, "entry": p.entry, "segments": segs,
                         "symbols": dict(sorted(p.symbols.items()))})
    k = image.kernel
    meta = {
        "kernel": {"policy": k.policy.value, "channels": k.channels, "fiber_preemption_ns": k.fiber_preemption_ns,
                   "timeslice_ns": k.timeslice_ns, "console_ring": k.console_ring,
                   "max_fibers": k.max_fibers, "fiber_stack": k.fiber_stack},
        "programs": programs,
        "channels": [{"name": ch.name, "msg_size": ch.msg_size, "tag": ch.tag} for ch in image.channels],
        "containers": [_container_meta(c) for c in image.containers],
    }
    meta_bytes = json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode()
    blob_offset = HEADER_SIZE + len(meta_bytes)
    blob_offset += -blob_offset % BLOB_ALIGN
    file_size = blob_offset + len(blob)
    header = _HEADER.pack(MAGIC, VERSION, HEADER_SIZE, file_size, HEADER_SIZE, len(meta_bytes),
                          blob_offset, len(blob), zlib.crc32(meta_bytes), zlib.crc32(blob))
    return header + meta_bytes + bytes(blob_offset - HEADER_SIZE - len(meta_bytes)) + bytes(blob)


def _container_meta(c: ContainerSpec) -> dict[str, Any]:
    out = {"name": c.name, "program": c.program, "memory": c.memory, "stack": c.stack, "priority": c.priority,
           "ports": [list(r) for r in c.ports], "irqs": list(c.irqs), "autostart": c.autostart,
           "handles": list(c.handles)}
    for key in ("max_fibers", "fiber_stack"):        # optional: absent means the kernel's
        value = getattr(c, key)
        if value is not None:
            out[key] = value
    return out


def write_image(image: Image, path: str | os.PathLike[str]) -> None:
    """Write ``image`` to ``path`` atomically (a failed write leaves no partial file)."""
    data = encode_image(image)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------- reading
def is_vmk_image(data: bytes) -> bool:
    return data[:len(MAGIC)] == MAGIC


def read_image(source: bytes | bytearray | memoryview | str | os.PathLike[str], path: str | None = None) -> Image:
    """Parse and validate a vmk image, from its bytes or from a file.

    ``path`` names the image in messages (default: the file name, or ``<image>``).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = path or "<image>"
    else:
        name = path or os.fspath(source)
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageError(f"{name}: cannot read: {e.strerror}") from None
    return _Reader(name, data).read()


class _Reader:
    def __init__(self, path: str, data: bytes) -> None:
        self.path, self.data = path, data

    def fail(self, what: str, *where: str | int) -> NoReturn:
        raise ImageFormatError(self.path, what, tuple(where))

    def read(self) -> Image:
        data, fail = self.data, self.fail
        if len(data) < len(MAGIC):
            fail(f"file is too short ({len(data)} bytes) to be a vmk image")
        if data[:len(MAGIC)] != MAGIC:
            if data[:6] == MAGIC[:6]:
                fail(f"unsupported vmk image format {data[:8]!r} (this vmk reads {MAGIC.decode()})", "offset 0")
            fail(f"not a vmk image (magic {data[:8]!r}, expected {MAGIC!r})", "offset 0")
        if len(data) < HEADER_SIZE:
            fail(f"truncated: the header needs {HEADER_SIZE} bytes, the file has {len(data)}", "header")
        (_, version, header_size, file_size, meta_off, meta_size, blob_off, blob_size,
         meta_crc, blob_crc) = _HEADER.unpack_from(data)
        if version != VERSION:
            fail(f"image version {version} is not supported (this vmk reads version {VERSION})", "header.version")
        if header_size != HEADER_SIZE:
            fail(f"header size {header_size} is not {HEADER_SIZE}", "header.header_size")
        if file_size > len(data):
            fail(f"truncated: the header says {file_size} bytes, the file has {len(data)}", "header.file_size")
        if file_size < len(data):
            fail(f"{len(data) - file_size} bytes of garbage after the end of the image ({file_size} bytes)",
                 "header.file_size")
        for what, off, size, key in (("metadata", meta_off, meta_size, "meta_offset"),
                                     ("program data", blob_off, blob_size, "blob_offset")):
            if off < HEADER_SIZE or off + size > file_size:
                fail(f"{what} block at offset {off:#x} size {size:#x} is outside the file "
                     f"({HEADER_SIZE:#x}..{file_size:#x})", f"header.{key}")
        if meta_off < blob_off + blob_size and blob_off < meta_off + meta_size:
            fail("the metadata and program data blocks overlap", "header.blob_offset")
        meta_bytes = data[meta_off:meta_off + meta_size]
        self.blob = data[blob_off:blob_off + blob_size]
        if zlib.crc32(meta_bytes) != meta_crc:
            fail("metadata checksum mismatch: the file is corrupt", f"offset {meta_off:#x}")
        if zlib.crc32(self.blob) != blob_crc:
            fail("program data checksum mismatch: the file is corrupt", f"offset {blob_off:#x}")
        try:
            meta = json.loads(meta_bytes.decode(), object_pairs_hook=_no_duplicates)
        except UnicodeDecodeError as e:
            fail(f"metadata is not UTF-8: {e.reason}", f"offset {meta_off + e.start:#x}")
        except _DuplicateKey as e:
            fail(f"metadata has the key {e.args[0]!r} twice", f"offset {meta_off:#x}")
        except json.JSONDecodeError as e:
            fail(f"metadata is not valid JSON: {e.msg}", f"offset {meta_off + e.pos:#x}")
        image = self.image(meta)
        validate_image(image, self.path)
        return image

    # -- structure: every field present, no other field, the right JSON type
    def obj(self, value: Any, where: Where, fields: dict[str, type | tuple[type, ...]],
            optional: dict[str, type] | None = None) -> dict[str, Any]:
        """``value`` as an object with every field of ``fields`` and perhaps some of
        ``optional`` (fields newer than the format: older images lack them)."""
        optional = optional or {}
        if not isinstance(value, dict):
            self.fail(f"expected an object, found {_json_type(value)}", *where)
        for key in value:
            if key not in fields and key not in optional:
                self.fail(f"unknown field {key!r} (known: {', '.join([*fields, *optional])})", *where)
        for key, typ in fields.items():
            if key not in value:
                self.fail(f"missing field {key!r}", *where)
            self.check(value[key], typ, (*where, key))
        for key, typ in optional.items():
            if key in value:
                self.check(value[key], typ, (*where, key))
        return value

    def check(self, value: Any, typ: type | tuple[type, ...], where: Where) -> None:
        ok = isinstance(value, typ) and not (isinstance(value, bool) and typ is int)
        if ok and typ is int and not -_U64 <= value <= _U64:
            self.fail(f"number {value} is out of range", *where)
        if not ok:
            want = {int: "an integer", str: "a string", bool: "true or false", list: "a list",
                    dict: "an object"}.get(typ, str(typ))       # type: ignore[call-overload]
            self.fail(f"expected {want}, found {_json_type(value)}", *where)

    def list_of(self, value: Any, where: Where, typ: type) -> list[Any]:
        for j, item in enumerate(value):
            self.check(item, typ, (*where, j))
        return value

    def image(self, meta: Any) -> Image:
        m = self.obj(meta, (), {"kernel": dict, "programs": list, "channels": list, "containers": list})
        k = self.obj(m["kernel"], ("kernel",), {"policy": str, "channels": int, "fiber_preemption_ns": int,
                                                "timeslice_ns": int, "console_ring": int}, _FIBER_FIELDS)
        try:
            policy = Policy(k["policy"])
        except ValueError:
            self.fail(f"unknown scheduling policy {k['policy']!r} "
                      f"(use {' or '.join(repr(p.value) for p in Policy)})", "kernel", "policy")
        kernel = KernelSettings(policy, k["channels"], k["fiber_preemption_ns"], k["timeslice_ns"],
                                k["console_ring"], k.get("max_fibers", DEFAULT_MAX_FIBERS),
                                k.get("fiber_stack", DEFAULT_FIBER_STACK))
        programs = tuple(self.program(p, ("programs", i)) for i, p in enumerate(m["programs"]))
        channels = []
        for i, ch in enumerate(m["channels"]):
            ch = self.obj(ch, ("channels", i), {"name": str, "msg_size": int, "tag": int})
            channels.append(ChannelSpec(ch["name"], ch["msg_size"], ch["tag"]))
        containers = []
        for i, c in enumerate(m["containers"]):
            w = ("containers", i)
            c = self.obj(c, w, {"name": str, "program": str, "memory": int, "stack": int, "priority": int,
                                "ports": list, "irqs": list, "autostart": bool, "handles": list}, _FIBER_FIELDS)
            ports = []
            for j, r in enumerate(c["ports"]):
                if not (isinstance(r, list) and len(r) == 2):
                    self.fail("expected a [first, last] port range", *w, "ports", j)
                self.list_of(r, (*w, "ports", j), int)
                ports.append((r[0], r[1]))
            containers.append(ContainerSpec(
                c["name"], c["program"], c["memory"], c["stack"], c["priority"], tuple(ports),
                tuple(self.list_of(c["irqs"], (*w, "irqs"), int)), c["autostart"],
                tuple(self.list_of(c["handles"], (*w, "handles"), str)),
                c.get("max_fibers"), c.get("fiber_stack")))
        return Image(kernel, programs, tuple(containers), tuple(channels))

    def program(self, value: Any, where: Where) -> Program:
        p = self.obj(value, where, {"name": str, "source": str, "entry": int, "segments": list, "symbols": dict})
        segments = []
        for j, s in enumerate(p["segments"]):
            w = (*where, "segments", j)
            s = self.obj(s, w, {"vaddr": int, "memsz": int, "flags": str, "offset": int, "size": int})
            if not s["flags"] or any(ch not in "rwx" for ch in s["flags"]):
                self.fail(f"bad segment flags {s['flags']!r} (letters r, w, x)", *w, "flags")
            flags = SegFlag(0)
            for ch, bit in (("r", SegFlag.R), ("w", SegFlag.W), ("x", SegFlag.X)):
                if ch in s["flags"]:
                    flags |= bit
            off, size = s["offset"], s["size"]
            if off < 0 or size < 0 or off + size > len(self.blob):
                self.fail(f"segment data at offset {off:#x} size {size:#x} is outside the program data block "
                          f"({len(self.blob):#x} bytes)", *w, "offset")
            segments.append(Segment(s["vaddr"], self.blob[off:off + size], s["memsz"], flags))
        for name, addr in p["symbols"].items():
            self.check(addr, int, (*where, "symbols", name))
        return Program(p["name"], p["source"], p["entry"], tuple(segments), dict(p["symbols"]))


_FIBER_FIELDS: dict[str, type] = {"max_fibers": int, "fiber_stack": int}   # optional in kernel and containers


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return {int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)
