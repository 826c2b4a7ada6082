"""Guest fiber register contexts and the ring-3 CPU state containers run in.

A guest fiber is a saved x86-64 user context: the 16 general registers, RIP,
RFLAGS and the FS/GS bases (thread pointers).  Switching fibers is one batched
register write (direct ctypes, ~20 registers in a single call); switching
containers adds a CR3 write.  The CPU never leaves ring 3 while containers
run: syscalls, interrupts and faults reach pid 0 (Python) through Unicorn's
hooks, so no kernel code or kernel mapping exists in guest memory.

``enter_user_mode`` puts the CPU in 64-bit ring 3 once (the hidden segment
state, see notes/unicorn.md §2.3); after that only registers and CR3 change.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmk.machine.cpu import CPU, HF, Reg, RegBatch, Seg
from vmk.machine.pc import Machine

__all__ = ["GuestContext", "ContextSwitcher", "enter_user_mode", "RAX_SLOT", "USER_CS", "USER_SS", "RFLAGS_USER"]

USER_CS = 0x23
USER_SS = 0x1B
RFLAGS_USER = 0x202          # IF=1: containers are always preemptible
GDT_PHYS = 0x8000
_GDT = [0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CFF2000000FFFF, 0x00AFFA000000FFFF]
_UCODE_FLAGS = 0x00AFFB00
_UDATA_FLAGS = 0x00CFF300

ORDER = (Reg.RAX, Reg.RBX, Reg.RCX, Reg.RDX, Reg.RSI, Reg.RDI, Reg.RBP, Reg.RSP,
         Reg.R8, Reg.R9, Reg.R10, Reg.R11, Reg.R12, Reg.R13, Reg.R14, Reg.R15,
         Reg.RIP, Reg.RFLAGS, Reg.FS_BASE, Reg.GS_BASE)
NAMES = tuple(r.name.lower() for r in ORDER)
_IDX = {n: i for i, n in enumerate(NAMES)}
_RIP = _IDX["rip"]
RAX_SLOT = _IDX["rax"]
"""Where RAX is in ``GuestContext.regs`` (a syscall's result goes there)."""


@dataclass(slots=True)
class GuestContext:
    """The saved registers of one guest fiber (in :data:`ORDER`)."""
    regs: list[int] = field(default_factory=lambda: [0] * len(ORDER))

    @classmethod
    def start(cls, entry: int, stack_top: int, arg: int = 0) -> "GuestContext":
        ctx = cls()
        ctx["rip"] = entry
        ctx["rsp"] = stack_top
        ctx["rdi"] = arg
        ctx["rflags"] = RFLAGS_USER
        return ctx

    def __getitem__(self, name: str) -> int:
        return self.regs[_IDX[name]]

    def __setitem__(self, name: str, value: int) -> None:
        self.regs[_IDX[name]] = value & 0xFFFF_FFFF_FFFF_FFFF

    def as_dict(self) -> dict[str, int]:
        return dict(zip(NAMES, self.regs))


class ContextSwitcher:
    """Loads and saves guest contexts on the CPU with one batched call each."""

    def __init__(self, cpu: CPU) -> None:
        self.cpu = cpu
        self._batch = RegBatch(cpu.uc, [int(r) for r in ORDER])
        self._cr3_reg = RegBatch(cpu.uc, [int(Reg.CR3)])
        self._cr3 = -1

    def _load_cr3(self, cr3: int) -> None:
        if cr3 != self._cr3:
            self._cr3_reg.write((cr3,))             # also flushes Unicorn's TLB
            self._cr3 = cr3

    def load(self, ctx: GuestContext, cr3: int) -> None:
        self.cpu.invalidate_ctx()
        self._load_cr3(cr3)
        self._batch.write(ctx.regs)
        self.cpu.halted = False

    def save(self, ctx: GuestContext) -> None:
        ctx.regs[:] = self._batch.read()

    # Quirk: inside Unicorn's SYSCALL hook RIP is still the SYSCALL's address,
    # and Unicorn adds 2 to whatever RIP holds when the hook returns.
    SYSCALL_LEN = 2

    def switch_in_syscall(self, old: GuestContext, new: GuestContext, cr3: int) -> None:
        """From inside the SYSCALL hook, in one register call: save ``old`` (it resumes
        after the SYSCALL) and load ``new`` (the CPU goes on at its RIP)."""
        self.cpu.invalidate_ctx()
        self._load_cr3(cr3)
        self._batch.swap(old.regs, new.regs, _RIP, self.SYSCALL_LEN)
        self.cpu.halted = False

    def forget_cr3(self) -> None:
        self._cr3 = -1


def enter_user_mode(machine: Machine) -> None:
    """Long mode, paging on, CPL 3 with flat 64-bit user segments."""
    cpu = machine.cpu
    uc = cpu.uc
    machine.write_physical(GDT_PHYS, struct.pack(f"<{len(_GDT)}Q", *_GDT))
    uc.reg_write(Reg.GDTR, (0, GDT_PHYS, 8 * len(_GDT) - 1, 0))
    uc.reg_write(Reg.CR4, (1 << 5) | (1 << 9))                  # PAE, OSFXSR
    uc.msr_write(0xC000_0080, (1 << 8) | (1 << 10) | (1 << 11) | 1)   # EFER: LME, LMA, NXE (W^X), SCE
    uc.reg_write(Reg.CR0, 0x8001_0033)                          # PG, WP, NE, ET, MP, PE
    udata = (USER_SS, 0, 0xFFFF_FFFF, _UDATA_FLAGS)
    cpu.set_hidden_state(cpl=3, segs={
        Seg.CS: (USER_CS, 0, 0xFFFF_FFFF, _UCODE_FLAGS),
        Seg.SS: udata, Seg.DS: udata, Seg.ES: udata, Seg.FS: udata, Seg.GS: udata,
    }, hflags_set=HF.CS32 | HF.SS32 | HF.CS64 | HF.LMA | HF.PE, hflags_clear=HF.ADDSEG)
    cpu.invalidate_ctx()
