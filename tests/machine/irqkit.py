"""Guest assembly for the interrupt tests: straight-line code whose virtual
time is known from its instruction count (1 instruction = 1 ns), and register
writes to the PC's devices.  Shared by test_irq_timing.py and test_irq_routing.py."""
from __future__ import annotations

import re

from vmk.testing import baremetal

LAPIC = 0xFEE0_0000
IOAPIC = 0xFEC0_0000
HOOKS = 0x16000                # free RAM between the page tables (0x10000-0x15FFF) and the log (0x20000)
REC = 0x1C000                  # where guest code records what it reads

_LABEL = re.compile(r"^[A-Za-z_.][\w.]*:\s*")


def count_insns(src: str) -> int:
    """Instruction statements in assembly text: one per line or ';'-separated part, labels excluded."""
    n = 0
    for stmt in re.split(r"[;\n]", src):
        stmt = _LABEL.sub("", stmt.strip()).strip()
        if stmt:
            n += 1
    return n


def _runtime_tsc_offset() -> int:
    """Instructions from a delivery to the runtime's rdtsc, inclusive: the stub
    (push 0; push vector; jmp common) and the common handler up to rdtsc."""
    common = baremetal._COMMON_ASM
    stub = "push 0; push 32; jmp 0x5000"
    return count_insns(stub) + count_insns(common[:common.index("rdtsc")]) + 1


RUNTIME_TSC = _runtime_tsc_offset()


class Asm:
    """Straight-line guest code from t = 0; each call returns the virtual time at
    which the code added so far ends (1 instruction = 1 ns)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.t = 0
        self._labels = 0

    def __call__(self, src: str) -> int:
        self.parts.append(src)
        self.t += count_insns(src)
        return self.t

    def spin(self, iterations: int) -> int:
        """``mov ecx, n`` and a ``dec ecx; jnz`` loop: 1 + 2n instructions."""
        self._labels += 1
        label = f"spin{self._labels}"
        self.parts.append(f"mov ecx, {iterations}\n{label}: dec ecx\njnz {label}")
        self.t += 1 + 2 * iterations
        return self.t

    def idle(self) -> None:
        """Enable interrupts and halt forever (the end of every guest)."""
        self.parts.append("sti\nidle: hlt\njmp idle")

    @property
    def source(self) -> str:
        return "\n".join(self.parts)


def outb(port: int, value: int) -> str:
    if port < 0x100:
        return f"mov al, {value:#x}\nout {port:#x}, al"
    return f"mov dx, {port:#x}\nmov al, {value:#x}\nout dx, al"


def lapic_write(reg: int, value: int) -> str:
    return f"mov rsi, {LAPIC + reg:#x}\nmov dword ptr [rsi], {value:#x}"


def ioapic_write(index: int, value: int) -> str:
    return f"mov rsi, {IOAPIC:#x}\nmov dword ptr [rsi], {index:#x}\nmov dword ptr [rsi+0x10], {value:#x}"


