"""Build a vmk image from program sources and boot it on a test machine: the
scaffolding of the VM-kernel tests (one source, used by tests/kernel/).

:func:`build_programs` writes each program (C when it has an ``#include``, else
assembly for keystone, with ``vmk.inc``), one container per program in order
(pids 1, 2, ...), each holding the console (handles 0: rx, 1: tx), and builds
the image.  :func:`boot` runs it to a virtual time and returns the result, the
kernel and the console text; :func:`peek` reads a global of a live container."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vmk.boot.vmkimage import read_image
from vmk.kernel.pid0 import VMKernel
from vmk.machine.pc import Machine, MachineConfig, RunResult
from vmk.tools.build import build

from .harness import SerialCapture

__all__ = ["TICKER_S", "boot", "build_programs", "peek"]

TICKER_S = """
    mov r12, 3
again:
    mov rax, SYS_SLEEP
    mov rdi, 1000000
    syscall
    lea rsi, [rip + msg]
    mov rdi, 1
    mov rdx, 5
    mov rax, SYS_SEND
    syscall
    dec r12
    jnz again
    mov rdi, 42
    mov rax, SYS_EXIT
    syscall
msg:
    .ascii "tick\\n"
"""
"""Prints "tick" three times on the console, 1 ms apart, and exits 42: the container
that must go on next to one that misbehaves."""


def build_programs(tmp: Path, programs: dict[str, str], *, memory: str = "128K",
                   extra: dict[str, str] | None = None, kernel: str = "channels = 16") -> Path:
    """The image ``tmp/image.img``: one container per program; ``extra``: more manifest
    lines for a container; ``kernel``: the ``[kernel]`` section's lines."""
    lines = ["[kernel]", kernel, ""]
    for name, src in programs.items():
        suffix = "c" if "#include" in src else "s"
        (tmp / f"{name}.{suffix}").write_text(src)
        lines += ["[[program]]", f'name = "{name}"', f'source = "{name}.{suffix}"', ""]
    for name in programs:
        lines += ["[[container]]", f'name = "{name}"', f'program = "{name}"', f'memory = "{memory}"',
                  'handles = ["console.rx", "console.tx"]']
        if extra and name in extra:
            lines.append(extra[name])
        lines.append("")
    (tmp / "image.toml").write_text("\n".join(lines))
    build(tmp / "image.toml", tmp / "image.img")
    return tmp / "image.img"


def boot(image: Path, until: int = 100_000_000, **config: Any) -> tuple[RunResult, VMKernel, str]:
    """Run ``image`` to virtual time ``until`` (ns) on a machine with COM1 captured;
    ``config``: more MachineConfig fields (``mem``, ``serial_timing``, ...)."""
    com1 = SerialCapture()
    k = VMKernel(Machine(MachineConfig(serial=[com1], **config)), read_image(image))
    r = k.run(until=until)
    return r, k, com1.data.decode()


def peek(k: VMKernel, pid: int, symbol: str, count: int = 1) -> Any:
    """``count`` signed longs at a global of container ``pid``'s program (one: an int)."""
    c = k.containers[pid]
    assert c.exit_code is None, f"{c!r} ended ({c.exit_code}): its memory is gone"
    prog = k.image.program(k.image.container(c.name).program)
    raw = c.aspace.read(prog.symbols[symbol], 8 * count)
    out = [int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, 8 * count, 8)]
    return out[0] if count == 1 else out
