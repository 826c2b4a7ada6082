"""``vmk build``: a manifest (TOML) -> a vmk image (``boot/vmkimage.py``).

The manifest names the programs, the channels created at boot, the
containers and the kernel settings.  Every table and key is optional unless
marked *required*; no other key is accepted::

    [kernel]
    policy = "global"            # scheduler: "global" | "per-container"
    channels = 256               # capacity of the global channel table (1..65536);
                                 #   must hold the [[channel]]s + console.rx/tx
    fiber_preemption_ns = 0      # 0 = cooperative fibers; else >= 1000 (or "1ms")
    timeslice_ns = 1_000_000     # container time slice, >= 1000 (or "1ms")
    console_ring = 4096          # UART receive ring, bytes (16..1M)
    max_fibers = 16384           # live fibers a container may have (main included; 1..1048576);
                                 #   fiber_spawn beyond it returns -EAGAIN
    fiber_stack = "16K"          # a stack the kernel chooses (fiber_spawn with stack_top 0),
                                 #   taken from the top of the container's heap (whole pages)

    [[program]]
    name = "shell"               # required; letters, digits, _ - . (64 at most)
    source = "shell.s"           # required, relative to the manifest:
                                 #   .s    keystone assembly, flat, at 0x400000
                                 #   .c    gcc (a list of .c files is allowed too)
                                 #   .elf  a static ELF64 x86-64 executable, as is
    cflags = ["-DNDEBUG"]        # .c only: extra gcc flags

    [[channel]]
    name = "jobs"                # required; letters, digits, _ - (no '.')
    msg_size = 8                 # 0 = any size up to 4096
    tag = 0                      # 0 = any

    [[container]]
    name = "init"                # required
    program = "shell"            # required: a [[program]] name
    memory = "256K"              # required: RAM for program + heap + stack, whole pages;
                                 #   an integer is bytes, a string needs a unit (K, M, G)
    stack = "16K"                # counted in memory (default 16K)
    priority = 1                 # 0..255, higher runs first
    max_fibers = 100             # this container's own limit (default: [kernel] max_fibers)
    fiber_stack = "4K"           # its kernel-chosen fiber stacks (default: [kernel] fiber_stack)
    ports = [0x3F8, "0x2F8-0x2FF"]   # I/O ports granted (single ports or "A-B" ranges)
    irqs = [4]                   # IRQ lines granted (0..23, not 2); one container per line
    autostart = true             # start at boot; pids 1, 2, ... in manifest order;
                                 #   false: a template for the spawn syscall
    handles = ["console.rx", "console.tx", "jobs"]
                                 # the initial handle table: handle 0, 1, ...;
                                 #   console.rx/tx are the kernel's serial channels,
                                 #   any other name is a [[channel]] (shared by all who name it)

Programs.  A ``.s`` source is assembled by keystone (64-bit, Intel syntax,
``#`` comments, ``;`` separates statements) at 0x400000 as one read-write-
execute segment; the constants of ``vmk.inc`` (``SYS_*``, ``E*``, ``ERR_*`` =
-errno, ``EV_*``, ``EVENT_OFF_*``, ``EVENT_SIZE``) are predefined; the entry is
the label ``_start``, or the first byte.  What keystone 0.9.2 gets wrong is
refused with the line rather than silently mis-assembled: section directives
(``.data``...: it crashes), ``.include`` (ignored), and a subtracted or
negated symbol in an instruction (``cmp rax, -EPIPE`` becomes a memory
operand: write ``ERR_EPIPE``).  A ``.c`` program is compiled and linked by gcc
(:data:`CFLAGS`) with ``guest/include/vmk_crt0.c`` (``_start`` calls
``int main(void)`` and exits with its value) and ``guest/include/vmk.ld``
(text at 0x400000, data on the next page); ``#include "vmk.h"`` gives the
syscall wrappers.  An ``.elf`` must be a static ELF64 x86-64 executable whose
segments lie in the user range.  Every label / ELF symbol is kept in the
image for the debugger.

Errors are one line: ``MANIFEST:LINE: what`` for the manifest (the line of
the offending key: TOML syntax errors come from tomllib, the rest is found
by scanning the text for the table and key), ``SOURCE:LINE: what`` for a
program that does not assemble or compile.

Discussion: keystone 0.9.2 crashes the process on some inputs (``.data``)
and prints diagnostics straight to file descriptor 2, so every assembly runs
in a forked child whose stderr goes to a temporary file.  Keystone reports an
error kind but no line: the line is found by assembling growing prefixes of
the source (binary search), where a prefix that only misses a symbol (a
forward reference cut off) counts as good.  The name of an undefined symbol
comes from a run with a symbol resolver, whose output is thrown away: setting
any keystone option switches it to radix 16 ("32" = 0x32, keystone #481).
"""
from __future__ import annotations

import faulthandler
import os
import pickle
import re
import shutil
import signal
import subprocess
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, NoReturn

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from vmk.boot.vmkimage import (
    MAX_PORT,
    USER_BASE,
    ChannelSpec,
    ContainerSpec,
    Image,
    ImageFormatError,
    KernelSettings,
    Policy,
    Program,
    SegFlag,
    Segment,
    validate_image,
    write_image,
)

from .guestapi import INCLUDE_DIR, generate_inc
from .units import parse_duration

__all__ = ["BuildError", "build", "build_image", "assemble", "assemble_snippet", "compile_c", "load_elf_program",
           "CFLAGS", "LDFLAGS"]

# -mgeneral-regs-only: a guest fiber's saved context is its general registers
# (hal/context.py); code that used SSE would lose XMM state at a fiber switch.
CFLAGS = ("-ffreestanding", "-nostdlib", "-static", "-fno-pic", "-no-pie", "-mno-red-zone", "-O2",
          "-mgeneral-regs-only",
          "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fcf-protection=none", "-std=gnu11")
LDFLAGS = ("-Wl,--build-id=none", "-Wl,-z,max-page-size=0x1000", "-Wl,-z,noexecstack")
CRT0 = "vmk_crt0.c"
LINKER_SCRIPT = "vmk.ld"
GCC_TIMEOUT = 300

_SIZE_UNITS = {"b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


class BuildError(Exception):
    """A manifest or program that cannot be built; the message is one line naming FILE[:LINE]."""


# ---------------------------------------------------------------------- the manifest
_KERNEL_KEYS = ("policy", "channels", "fiber_preemption_ns", "timeslice_ns", "console_ring", "max_fibers",
                "fiber_stack")
_PROGRAM_KEYS = ("name", "source", "cflags")
_CHANNEL_KEYS = ("name", "msg_size", "tag")
_CONTAINER_KEYS = ("name", "program", "memory", "stack", "priority", "ports", "irqs", "autostart", "handles",
                   "max_fibers", "fiber_stack")
_TABLES = {"kernel": _KERNEL_KEYS, "program": _PROGRAM_KEYS, "channel": _CHANNEL_KEYS, "container": _CONTAINER_KEYS}
_IMAGE_TABLE = {"programs": "program", "channels": "channel", "containers": "container"}


class _Lines:
    """Finds the line of a table or key in the manifest text (1-based)."""
    _HEADER = re.compile(r"^\s*\[(\[)?\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(?:#.*)?$")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: list[tuple[int, str, bool]] = []       # (line index, name, is array of tables)
        for i, line in enumerate(self.lines):
            m = self._HEADER.match(line)
            if m:
                self.headers.append((i, m.group(2).strip().strip("\"'"), m.group(1) is not None))

    def table(self, name: str, index: int | None) -> tuple[int, int] | None:
        """(first, end) line indexes of the body of [name] (index None) or the index-th [[name]]."""
        n = -1
        for h, (i, hname, array) in enumerate(self.headers):
            if hname == name and (array == (index is not None)):
                n += 1
                if index is None or n == index:
                    end = self.headers[h + 1][0] if h + 1 < len(self.headers) else len(self.lines)
                    return i, end
        return None

    def find(self, table: str | None, index: int | None, key: str | None, needle: str | None = None) -> int:
        if table is None:               # top level: before the first header
            span = (-1, self.headers[0][0] if self.headers else len(self.lines))
        else:
            found = self.table(table, index)
            if found is None:
                return 1
            span = found
        first, end = span
        if key is None:
            return first + 1 if first >= 0 else 1
        pat = re.compile(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*=")
        other = re.compile(r"^\s*[A-Za-z0-9_\-\"']+\s*=")
        for i in range(first + 1, end):
            if pat.match(self.lines[i]):
                if needle is not None:          # an element of a (multi-line) array
                    for j in range(i, end):
                        if j > i and other.match(self.lines[j]):
                            break
                        if needle in self.lines[j]:
                            return j + 1
                return i + 1
        return first + 1 if first >= 0 else 1


@dataclass(slots=True)
class _ProgramEntry:
    index: int
    name: str
    sources: list[str]
    cflags: list[str]


class _Manifest:
    def __init__(self, path: str, text: str) -> None:
        self.path, self.text = path, text
        self.lines = _Lines(text)
        try:
            self.doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            msg = str(e)
            m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
            if m:
                raise BuildError(f"{path}:{m.group(1)}: {msg[:m.start()]} (column {m.group(2)})") from None
            m = re.search(r"\s*\(at end of document\)$", msg)
            line = max(1, len(text.splitlines()))
            raise BuildError(f"{path}:{line}: {msg[:m.start()] if m else msg} (at the end of the file)") from None

    def fail(self, what: str, table: str | None, index: int | None = None, key: str | None = None,
             needle: str | None = None) -> NoReturn:
        raise BuildError(f"{self.path}:{self.lines.find(table, index, key, needle)}: {what}")

    # -- tables
    def tables(self) -> None:
        for key, value in self.doc.items():
            if key not in _TABLES:
                known = ", ".join(f"[{t}]" if t == "kernel" else f"[[{t}]]" for t in _TABLES)
                self.top_fail(f"unknown table or key {key!r} (known: {known})", key)
            if key == "kernel" and not isinstance(value, dict):
                self.top_fail("kernel must be a table: [kernel]", key)
            if key != "kernel" and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
                self.top_fail(f"{key} must be an array of tables: [[{key}]]", key)

    def top_fail(self, what: str, key: str) -> NoReturn:
        """An error about a top-level key: its `key =` line or its first table header."""
        line = self.lines.find(None, None, key)
        for i, hname, _ in self.lines.headers:
            if hname == key or hname.startswith(key + "."):
                line = i + 1
                break
        raise BuildError(f"{self.path}:{line}: {what}")

    def entries(self, table: str) -> list[dict[str, Any]]:
        value = self.doc.get(table, [])
        for i, entry in enumerate(value):
            for key in entry:
                if key not in _TABLES[table]:
                    self.fail(f"unknown key {key!r} in [[{table}]] (known: {', '.join(_TABLES[table])})",
                              table, i, key)
        return value

    def required(self, entry: dict[str, Any], table: str, i: int, key: str) -> Any:
        if key not in entry:
            label = f" {entry['name']!r}" if isinstance(entry.get("name"), str) else f" number {i + 1}"
            self.fail(f"[[{table}]]{label} has no {key!r} (required)", table, i)
        return entry[key]

    # -- values
    def integer(self, value: Any, table: str, i: int | None, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{key} must be an integer, not {_toml_repr(value)}", table, i, key)
        return value

    def string(self, value: Any, table: str, i: int | None, key: str) -> str:
        if not isinstance(value, str):
            self.fail(f"{key} must be a string, not {_toml_repr(value)}", table, i, key)
        return value

    def strings(self, value: Any, table: str, i: int, key: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(f"{key} must be a list of strings, not {_toml_repr(value)}", table, i, key)
        return value

    def size(self, value: Any, table: str, i: int | None, key: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]+)\s*", value) if isinstance(value, str) else None
        if m is None or m.group(2).lower() not in _SIZE_UNITS:
            self.fail(f"{key} must be a size such as \"256K\", \"1M\" or a number of bytes, not "
                      f"{_toml_repr(value)}", table, i, key)
        return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]

    def duration(self, value: Any, table: str, key: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.search(r"[a-zµ]\s*$", value):
            try:
                return parse_duration(value)
            except ValueError:
                pass
        self.fail(f"{key} must be nanoseconds or a duration such as \"1ms\", not {_toml_repr(value)}",
                  table, None, key)

    def ports(self, value: Any, i: int, who: str) -> tuple[tuple[int, int], ...]:
        def bad(what: str, needle: str | None = None) -> NoReturn:
            self.fail(f"container {who!r}: {what}", "container", i, "ports", needle)
        if not isinstance(value, list):
            bad(f"ports must be a list of ports and \"FIRST-LAST\" ranges, not {_toml_repr(value)}")
        ranges = []
        for item in value:
            needle = f'"{item}"' if isinstance(item, str) else None
            if isinstance(item, int) and not isinstance(item, bool):
                first = last = item
            else:
                m = re.fullmatch(r"\s*(\w+)\s*-\s*(\w+)\s*", item) if isinstance(item, str) else None
                try:
                    first, last = (int(m.group(1), 0), int(m.group(2), 0)) if m else (-1, -1)
                except ValueError:
                    m = None
                if m is None:
                    bad(f"bad port {_toml_repr(item)}: use a number or a \"FIRST-LAST\" range such as "
                        "\"0x3F8-0x3FF\"", needle)
            for port in (first, last):
                if not 0 <= port <= MAX_PORT:
                    bad(f"port {port:#x} is out of range (0..{MAX_PORT:#x})", needle)
            if first > last:
                bad(f"port range {_toml_repr(item)} is backwards", needle)
            ranges.append((first, last))
        merged: list[tuple[int, int]] = []
        for first, last in sorted(ranges):
            if merged and first <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], last))
            else:
                merged.append((first, last))
        return tuple(merged)

    # -- the sections
    def kernel(self) -> KernelSettings:
        k = self.doc.get("kernel", {})
        for key in k:
            if key not in _KERNEL_KEYS:
                self.fail(f"unknown key {key!r} in [kernel] (known: {', '.join(_KERNEL_KEYS)})",
                          "kernel", None, key)
        d = KernelSettings()
        policy = self.string(k.get("policy", d.policy.value), "kernel", None, "policy")
        if policy not in {p.value for p in Policy}:
            self.fail(f"unknown policy {policy!r} (use {' or '.join(repr(p.value) for p in Policy)})",
                      "kernel", None, "policy")
        return KernelSettings(
            Policy(policy),
            self.integer(k.get("channels", d.channels), "kernel", None, "channels"),
            self.duration(k.get("fiber_preemption_ns", d.fiber_preemption_ns), "kernel", "fiber_preemption_ns"),
            self.duration(k.get("timeslice_ns", d.timeslice_ns), "kernel", "timeslice_ns"),
            self.integer(k.get("console_ring", d.console_ring), "kernel", None, "console_ring"),
            self.integer(k.get("max_fibers", d.max_fibers), "kernel", None, "max_fibers"),
            self.size(k.get("fiber_stack", d.fiber_stack), "kernel", None, "fiber_stack"))

    def programs(self) -> list[_ProgramEntry]:
        out = []
        for i, p in enumerate(self.entries("program")):
            name = self.string(self.required(p, "program", i, "name"), "program", i, "name")
            src = self.required(p, "program", i, "source")
            sources = [src] if isinstance(src, str) else src
            if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
                self.fail(f"program {name!r}: source must be a file name (or a list of .c files), not "
                          f"{_toml_repr(src)}", "program", i, "source")
            kinds = {_source_kind(s) for s in sources}
            if None in kinds:
                bad = next(s for s in sources if _source_kind(s) is None)
                self.fail(f"program {name!r}: source {bad!r} is not .s (assembly), .c (C) or .elf",
                          "program", i, "source")
            if len(sources) > 1 and kinds != {"c"}:
                self.fail(f"program {name!r}: only .c sources can be listed together", "program", i, "source")
            cflags = self.strings(p.get("cflags", []), "program", i, "cflags")
            if cflags and kinds != {"c"}:
                self.fail(f"program {name!r}: cflags apply to .c sources only", "program", i, "cflags")
            out.append(_ProgramEntry(i, name, sources, cflags))
        return out

    def channels(self) -> list[ChannelSpec]:
        out = []
        for i, ch in enumerate(self.entries("channel")):
            d = ChannelSpec("")
            out.append(ChannelSpec(
                self.string(self.required(ch, "channel", i, "name"), "channel", i, "name"),
                self.integer(ch.get("msg_size", d.msg_size), "channel", i, "msg_size"),
                self.integer(ch.get("tag", d.tag), "channel", i, "tag")))
        return out

    def containers(self) -> list[ContainerSpec]:
        out = []
        for i, c in enumerate(self.entries("container")):
            d = ContainerSpec("", "", 0)
            name = self.string(self.required(c, "container", i, "name"), "container", i, "name")
            irqs = c.get("irqs", [])
            if not isinstance(irqs, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in irqs):
                self.fail(f"irqs must be a list of IRQ numbers, not {_toml_repr(irqs)}", "container", i, "irqs")
            autostart = c.get("autostart", d.autostart)
            if not isinstance(autostart, bool):
                self.fail(f"autostart must be true or false, not {_toml_repr(autostart)}",
                          "container", i, "autostart")
            out.append(ContainerSpec(
                name,
                self.string(self.required(c, "container", i, "program"), "container", i, "program"),
                self.size(self.required(c, "container", i, "memory"), "container", i, "memory"),
                self.size(c.get("stack", d.stack), "container", i, "stack"),
                self.integer(c.get("priority", d.priority), "container", i, "priority"),
                self.ports(c.get("ports", []), i, name),
                tuple(irqs),
                autostart,
                tuple(self.strings(c.get("handles", []), "container", i, "handles")),
                None if "max_fibers" not in c else self.integer(c["max_fibers"], "container", i, "max_fibers"),
                None if "fiber_stack" not in c else self.size(c["fiber_stack"], "container", i, "fiber_stack")))
        return out

    def image_error(self, e: ImageFormatError) -> BuildError:
        """The manifest line of an image invariant that the built image breaks."""
        where = e.where
        table = key = needle = None
        index: int | None = None
        if where and where[0] == "kernel":
            table, key = "kernel", str(where[1]) if len(where) > 1 else None
        elif where and where[0] in _IMAGE_TABLE:
            table = _IMAGE_TABLE[str(where[0])]
            if len(where) > 1 and isinstance(where[1], int):
                index = where[1]
            else:                       # the image as a whole, e.g. no autostart container
                index = 0 if self.doc.get(table) else None
                if index is None:
                    raise BuildError(f"{self.path}:1: {e.what}")
            if len(where) > 2:
                key = str(where[2]) if table != "program" or where[2] == "name" else "source"
            if len(where) > 3 and isinstance(where[3], int) and key in ("handles", "ports"):
                item = self.doc[table][index].get(key, [])
                if isinstance(item, list) and where[3] < len(item) and isinstance(item[where[3]], str):
                    needle = f'"{item[where[3]]}"'
        return BuildError(f"{self.path}:{self.lines.find(table, index, key, needle)}: {e.what}")


def _toml_repr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "a table"
    return repr(value)


def _source_kind(source: str) -> str | None:
    ext = os.path.splitext(source)[1]          # case matters: a .S file is for the C preprocessor + GNU as
    return {".s": "asm", ".asm": "asm", ".c": "c", ".elf": "elf"}.get(ext)


# ---------------------------------------------------------------------- building
def build(manifest: str | os.PathLike[str], output: str | os.PathLike[str], *,
          include_dir: Path = INCLUDE_DIR) -> Image:
    """Build the image of ``manifest`` and write it to ``output``; raise :class:`BuildError`."""
    image = build_image(manifest, include_dir=include_dir)
    try:
        write_image(image, output)
    except OSError as e:
        raise BuildError(f"{os.fspath(output)}: cannot write: {e.strerror}") from None
    return image


def build_image(manifest: str | os.PathLike[str], *, include_dir: Path = INCLUDE_DIR) -> Image:
    """Read ``manifest``, build its programs and return the validated :class:`Image`."""
    path = os.fspath(manifest)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise BuildError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise BuildError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    m = _Manifest(path, text)
    m.tables()
    kernel = m.kernel()
    entries = m.programs()
    channels = m.channels()
    containers = m.containers()
    base = Path(path).parent
    programs = []
    for entry in entries:
        files = [str(base / s) for s in entry.sources]
        for shown in files:
            if not os.path.isfile(shown):
                why = "no such file" if not os.path.exists(shown) else "not a regular file"
                m.fail(f"program {entry.name!r}: cannot read {shown}: {why}", "program", entry.index, "source")
        kind = _source_kind(entry.sources[0])
        source = ", ".join(entry.sources)
        if kind == "asm":
            programs.append(assemble(entry.name, Path(files[0]).read_bytes(), files[0], source=source))
        elif kind == "c":
            elf = compile_c(files, entry.cflags, include_dir=include_dir)
            programs.append(load_elf_program(entry.name, elf, files[0], source=source))
        else:
            programs.append(load_elf_program(entry.name, Path(files[0]).read_bytes(), files[0], source=source))
    image = Image(kernel, tuple(programs), tuple(containers), tuple(channels))
    try:
        validate_image(image, path)
    except ImageFormatError as e:
        raise m.image_error(e) from None
    return image


# ---------------------------------------------------------------------- assembly (keystone)
_SECTION_DIRECTIVES = {".section", ".data", ".text", ".bss", ".rodata", ".previous", ".pushsection",
                       ".popsection", ".subsection"}
_LABEL = re.compile(r"\s*([A-Za-z_.$][\w.$@]*)\s*:(?!:)")
_ASSIGNMENT = re.compile(r"\s*[A-Za-z_.$][\w.$@]*\s*=")
_WORD = r"(?<![\w.$@]){}(?![\w.$@])"
_SYMBOL_START = r"\(*\s*[A-Za-z_.$]"
_UNARY_MINUS = re.compile(rf"(?:^|[,(+*/~-])\s*[-~]\s*{_SYMBOL_START}")
_NUMBER_MINUS = re.compile(rf"(?<![\w.$])(?:0[xX][0-9a-fA-F]+|\d+)\s*\)*\s*-\s*{_SYMBOL_START}")
_BRACKET_MINUS = re.compile(rf"-\s*{_SYMBOL_START}")


def _split_code(line: str) -> tuple[str, list[str]]:
    """Strip a '#' comment (outside strings); return the code and its ';'-separated statements."""
    out, statements, cur, quote, i = [], [], [], None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            cur.append(ch)
            if ch == "\\" and i + 1 < len(line):
                cur.append(line[i + 1])
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            cur.append(ch)
        elif ch == "#":
            break
        elif ch == ";":
            statements.append("".join(cur))
            out.append("".join(cur) + ";")
            cur = []
        else:
            cur.append(ch)
        i += 1
    statements.append("".join(cur))
    out.append("".join(cur))
    return "".join(out), statements


def _misencoded(instruction: str) -> str | None:
    """Why keystone 0.9.2 would silently mis-encode this instruction, or None.

    Measured: in an instruction operand, ``-SYM``, ``~SYM`` and ``8 - SYM``
    become a RIP-relative memory operand, and ``[rbx - SYM]`` /
    ``[rbx + b - a]`` get the wrong displacement; ``SYM``, ``SYM + 8``,
    ``[rbx + SYM]``, ``b - a`` and symbols defined negative
    (``.equ X, -EPIPE``) are encoded right.
    """
    parts = instruction.split(None, 1)
    if len(parts) < 2 or parts[0].startswith(".") or _ASSIGNMENT.match(instruction):
        return None
    operands = parts[1]
    for m in re.finditer(r"\[([^\]]*)\]", operands):
        if _BRACKET_MINUS.search(m.group(1)):
            return "subtracting a symbol inside [...] gets a wrong displacement"
    outside = re.sub(r"\[[^\]]*\]", " ", operands)
    if _UNARY_MINUS.search(outside) or _NUMBER_MINUS.search(outside):
        return "a negated symbol becomes a memory operand"
    return None


@dataclass(slots=True)
class _KsResult:
    ok: bool
    code: bytes = b""
    errno: int = 0                  # keystone's KS_ERR_*
    error: str = ""                 # keystone's error kind, its stderr diagnostic, or the crash
    asked: tuple[str, ...] = ()     # with resolve=True: the undefined symbols


def _ks_run(text: str, base: int, resolve: bool) -> _KsResult:
    import keystone

    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)
    asked: list[str] = []
    if resolve:
        # Only to learn the names of undefined symbols: setting any option
        # (ks_option) switches keystone 0.9.2 to radix 16 for good, so "32"
        # becomes 0x32 (keystone issues #481, #538); such code is thrown away.
        def resolver(symbol: bytes, value: Any) -> bool:
            asked.append(symbol.decode(errors="replace"))
            value[0] = base
            return True
        ks.sym_resolver = resolver
    else:
        canary, _ = ks.asm(b".byte 10", 0, as_bytes=True)
        if canary != b"\x0a":
            return _KsResult(False, error="keystone reads decimal numbers as hexadecimal in this process "
                                          "(keystone issue #481)")
    try:
        enc, _ = ks.asm(text.encode("ascii"), base, as_bytes=True)
    except keystone.KsError as e:
        return _KsResult(False, errno=e.errno, error=str(e), asked=tuple(dict.fromkeys(asked)))
    return _KsResult(True, bytes(enc or b""), asked=tuple(dict.fromkeys(asked)))


def _in_child(fn: Callable[..., _KsResult], *args: Any) -> _KsResult:
    """Run ``fn(*args)`` in a forked child, its fd 2 captured; a crash becomes a failed result."""
    if not hasattr(os, "fork"):
        return fn(*args)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:                    # the child: never returns
            status = 0
            try:
                faulthandler.disable()  # a crash is an expected outcome here, not worth a Python traceback
                os.dup2(err.fileno(), 2)
                out.write(pickle.dumps(fn(*args)))
                out.flush()
            except BaseException:      # noqa: BLE001 - the child must reach os._exit, whatever happens
                status = 1
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        err.seek(0)
        diag = next((ln.strip() for ln in err.read().decode(errors="replace").splitlines()
                     if "error" in ln.lower()), "")
        out.seek(0)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            return _KsResult(False, error=f"keystone crashed ({name})")
        if os.WEXITSTATUS(status) != 0:
            return _KsResult(False, error="keystone failed")
        result: _KsResult = pickle.loads(out.read())
    if diag:                            # keystone printed an error but may still have "succeeded"
        result.ok = False
        result.error = diag.removeprefix("error: ")
    return result


def _ks_snippet(text: str, addr: int, bits: int) -> _KsResult:
    import keystone

    mode = {16: keystone.KS_MODE_16, 32: keystone.KS_MODE_32, 64: keystone.KS_MODE_64}[bits]
    try:
        enc, _ = keystone.Ks(keystone.KS_ARCH_X86, mode).asm(text.encode(), addr, as_bytes=True)
    except keystone.KsError as e:
        return _KsResult(False, errno=e.errno, error=str(e))
    return _KsResult(True, bytes(enc or b""))


def assemble_snippet(text: str, addr: int = 0, bits: int = 64) -> bytes:
    """Assemble ``text`` (keystone, Intel syntax) at ``addr`` in a forked child, as :func:`assemble` does.

    For ``vmk asm``, the debugger's ``asm`` and the test kit: keystone 0.9.2 crashes
    the process on some inputs (``.text``, ``.data``); here a crash, like any
    keystone error, is a ``ValueError`` with one line.
    """
    if bits not in (16, 32, 64):
        raise ValueError(f"bits must be 16, 32 or 64, not {bits}")
    result = _in_child(_ks_snippet, text, addr, bits)
    if not result.ok:
        raise ValueError(result.error)
    return result.code


def assemble(name: str, text: bytes | str, path: str, *, source: str | None = None,
             base: int = USER_BASE) -> Program:
    """Assemble a flat keystone program at ``base``, with the vmk.inc constants predefined.

    ``path`` names the file in error messages; ``source`` is what the image
    records as the program's source (default ``path``).
    """
    import keystone

    def fail(line: int, what: str) -> NoReturn:
        raise BuildError(f"{path}:{line}: {what}")

    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            line = text[:e.start].count(b"\n") + 1
            raise BuildError(f"{path}:{line}: not UTF-8 text") from None
    lines = text.splitlines()
    code_lines: list[str] = []
    labels: dict[str, int] = {}             # label -> line
    for n, line in enumerate(lines, 1):
        code, statements = _split_code(line)
        bad = next((ch for ch in code if ord(ch) > 127), None)
        if bad is not None:
            fail(n, f"non-ASCII character {bad!r} outside a comment")
        for statement in statements:
            rest = statement
            while (m := _LABEL.match(rest)) is not None:
                labels.setdefault(m.group(1), n)
                rest = rest[m.end():]
            word = rest.split()[0].lower() if rest.split() else ""
            if word in _SECTION_DIRECTIVES:
                fail(n, f"{word} is not supported: a .s program is one flat section at {base:#x} "
                        "(keystone 0.9.2 crashes on section directives)")
            if word in (".include", ".incbin"):
                fail(n, f"{word} is not supported by keystone (vmk.inc is already predefined)")
            why = _misencoded(rest)
            if why is not None:
                fail(n, f"keystone 0.9.2 mis-encodes this: {why}; define the value first "
                        f"(.equ NAME, -SYMBOL) or use the ERR_* constants: {line.strip()}")
        code_lines.append(code)

    prelude = generate_inc()

    def run(count: int | None, symbols: list[str], resolve: bool = False) -> _KsResult:
        body = "\n".join(code_lines if count is None else code_lines[:count])
        trailer = f"\n.quad {', '.join(symbols)}" if symbols else ""
        return _in_child(_ks_run, f"{prelude}{body}{trailer}\n", base, resolve)

    def undefined(symbol: str) -> NoReturn:
        pat = re.compile(_WORD.format(re.escape(symbol)))
        line = next((n for n, code in enumerate(code_lines, 1) if pat.search(code)), 0)
        if line:
            fail(line, f"undefined symbol {symbol!r}: {lines[line - 1].strip()}")
        raise BuildError(f"{path}: undefined symbol {symbol!r}")

    # The label addresses come from a trailer ".quad label, ..." assembled after the program.
    names = list(labels)
    while True:
        result = run(None, names)
        if result.ok or result.errno != keystone.KS_ERR_ASM_SYMBOL_MISSING:
            break
        asked = run(None, names, resolve=True).asked
        for symbol in asked:
            if symbol not in names:
                undefined(symbol)
        if not asked:
            break
        names = [s for s in names if s not in asked]      # the label scan was wrong about these
    if not result.ok:
        missing = keystone.KS_ERR_ASM_SYMBOL_MISSING

        def fails(count: int) -> _KsResult | None:      # a prefix may miss its forward references
            r = run(count, [])
            return r if not r.ok and r.errno != missing else None

        if fails(len(code_lines)) is None:
            raise BuildError(f"{path}: {result.error}")
        lo, hi = 1, len(code_lines)         # fails(hi); find the shortest failing prefix
        while lo < hi:
            mid = (lo + hi) // 2
            if fails(mid) is None:
                lo = mid + 1
            else:
                hi = mid
        err = (fails(hi) or result).error
        err = err[:1].lower() + err[1:]
        hint = " (';' separates statements in keystone; comments start with '#')" if ";" in code_lines[hi - 1] \
            else ""
        fail(hi, f"{err}: {lines[hi - 1].strip()}{hint}")
    code = result.code
    addresses: dict[str, int] = {}
    if names:
        table, code = code[-8 * len(names):], code[:-8 * len(names)]
        addresses = {s: int.from_bytes(table[8 * i:8 * i + 8], "little") for i, s in enumerate(names)}
    if not code:
        raise BuildError(f"{path}: assembles to no code")
    entry = addresses.get("_start", base)
    # One segment, rwx: keystone gives one blob with code and data interleaved as the
    # source has them, so there is no honest text/data split (C programs get W^X from vmk.ld).
    segment = Segment(base, code, len(code), SegFlag.R | SegFlag.W | SegFlag.X)
    return Program(name, source or path, entry, (segment,), dict(sorted(addresses.items())))


# ---------------------------------------------------------------------- C (gcc)
def compile_c(sources: list[str], cflags: list[str] | tuple[str, ...] = (), *,
              include_dir: Path = INCLUDE_DIR) -> bytes:
    """Compile and link C sources with vmk_crt0.c and vmk.ld; return the ELF file's bytes."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError(f"{sources[0]}: cannot compile C: gcc is not installed (or give a prebuilt .elf)")
    with tempfile.TemporaryDirectory(prefix="vmk-build-") as tmp:
        out = os.path.join(tmp, "program.elf")
        cmd = [gcc, *CFLAGS, f"-I{include_dir}", *cflags, "-T", str(include_dir / LINKER_SCRIPT), *LDFLAGS,
               "-o", out, str(include_dir / CRT0), *sources, "-lgcc"]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=GCC_TIMEOUT,
                                  env={**os.environ, "LC_ALL": "C"})      # ASCII quotes in messages
        except subprocess.TimeoutExpired:
            raise BuildError(f"{sources[0]}: gcc did not finish in {GCC_TIMEOUT} s") from None
        if proc.returncode != 0:
            raise BuildError(_gcc_error(proc.stderr, sources[0], tmp))
        return Path(out).read_bytes()


def _gcc_error(stderr: str, first_source: str, tmp: str) -> str:
    lines = [ln.replace(tmp + os.sep, "") for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        m = re.match(r"^(.+?):(\d+):(?:\d+:)? (?:fatal )?error: (.*)$", ln)
        if m:
            return f"{m.group(1)}:{m.group(2)}: {m.group(3)}"
    for ln in lines:
        m = re.search(r"undefined reference to (.*)$", ln)
        if m:
            hint = " (a C program defines int main(void))" if m.group(1) == "`main'" else ""
            return f"{first_source}: link failed: undefined reference to {m.group(1)}{hint}"
    useful = [ln for ln in lines if "error" in ln.lower() and not ln.startswith("collect2")] or lines
    return f"{first_source}: gcc failed: {useful[0].strip() if useful else 'no message'}"


# ---------------------------------------------------------------------- ELF programs
def load_elf_program(name: str, data: bytes, path: str, *, source: str | None = None) -> Program:
    """A static ELF64 x86-64 executable as a program: its PT_LOAD segments, entry and symbols."""
    if data[:4] != b"\x7fELF":
        raise BuildError(f"{path}: not an ELF file")
    try:
        elf = ELFFile(BytesIO(data))
        if elf.elfclass != 64 or not elf.little_endian or elf["e_machine"] != "EM_X86_64":
            raise BuildError(f"{path}: ELF{elf.elfclass} for {elf['e_machine']}: vmk programs are ELF64 x86-64")
        if elf["e_type"] != "ET_EXEC":
            why = "position-independent (ET_DYN): link with -static -no-pie" if elf["e_type"] == "ET_DYN" \
                else f"not an executable ({elf['e_type']})"
            raise BuildError(f"{path}: {why}")
        segments = []
        for i, seg in enumerate(elf.iter_segments()):
            kind = seg["p_type"]
            if kind in ("PT_INTERP", "PT_DYNAMIC"):
                raise BuildError(f"{path}: dynamically linked: vmk programs are static (link with -static)")
            if kind == "PT_TLS":
                raise BuildError(f"{path}: uses thread-local storage, which vmk does not provide")
            if kind != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            offset, filesz, memsz = seg["p_offset"], seg["p_filesz"], seg["p_memsz"]
            if offset + filesz > len(data):
                raise BuildError(f"{path}: segment {i} (file offset {offset:#x}+{filesz:#x}) runs past the end "
                                 f"of the file ({len(data):#x} bytes): truncated?")
            if filesz > memsz:
                raise BuildError(f"{path}: segment {i} has p_filesz > p_memsz")
            flags = SegFlag(seg["p_flags"] & 7) or SegFlag.R
            segments.append(Segment(seg["p_vaddr"], data[offset:offset + filesz], memsz, flags))
        if not segments:
            raise BuildError(f"{path}: ELF has no loadable (PT_LOAD) segment")
        return Program(name, source or path, elf["e_entry"], tuple(segments), _elf_symbols(elf))
    except (ELFError, ValueError, KeyError) as e:
        raise BuildError(f"{path}: malformed ELF: {e}") from None
    except Exception as e:          # pyelftools raises struct.error and others on garbage
        if isinstance(e, BuildError):
            raise
        raise BuildError(f"{path}: malformed ELF: {e}") from None


def _elf_symbols(elf: ELFFile) -> dict[str, int]:
    out: dict[str, int] = {}
    for sec in elf.iter_sections():
        if isinstance(sec, SymbolTableSection):
            for sym in sec.iter_symbols():
                if sym.name and sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE") \
                        and sym["st_shndx"] != "SHN_UNDEF":
                    out.setdefault(sym.name, sym["st_value"])
    return dict(sorted(out.items()))
