"""Debugger support in the machine: breakpoints, watchpoints, single step,
the full register set and memory by linear address.

Everything a debugger front end (the GDB stub, the debugger shell) needs from
the machine goes through :class:`Debug`; it never changes how the machine runs
when no breakpoint is armed, and it never disturbs virtual time or interrupt
delivery when one is.

How it works
------------
* **Breakpoints are Unicorn exits** (``UC_CTL_UC_EXITS``).  An exit is checked
  when an instruction is *translated*, so an armed breakpoint that is never
  reached costs nothing at run time (a bounded ``UC_HOOK_CODE`` hook would
  cost 30-40%: with ``count=N`` every instruction already calls Unicorn's
  hook helper, which walks the whole code-hook list).  Unicorn implements an
  exit as a fake HLT *before* the instruction: ``emu_start`` returns with RIP
  on the breakpoint and the instruction not counted, so the retired count and
  virtual time are exact.  The slice ends early; ``after_slice`` sees RIP on
  an armed breakpoint and stops the run loop (``Why.BREAKPOINT``).
  Translations made before a breakpoint was armed or removed are dropped
  with ``ctl_remove_cache`` (the exit check is translation-time).
* **One exception: a breakpoint right after a 0xF4 byte.**  The CPU decides
  "the slice ended early because of HLT" by looking at the byte before RIP
  (Unicorn reports no reason); an exit there would look like a HLT.  Such a
  breakpoint uses a single-address ``UC_HOOK_CODE`` hook instead, which stops
  with ``emu_stop`` before the instruction (:meth:`CPU.stop_before_current`).
  Unicorn's count hook runs before it and has already counted the instruction
  that will not run; that method takes it back, so virtual time stays exact
  there too (measured: without it the count is one high).
* **Resuming from a breakpoint** ("step over", the x86 RF flag): the
  breakpoint under RIP is disarmed for a one-instruction slice
  (``machine.slice_limit``) and re-armed in ``after_slice``.
* **Watchpoints** are ``UC_HOOK_MEM_READ``/``UC_HOOK_MEM_WRITE`` hooks.
  Unicorn 2.1.4 checks memory hooks against the *physical* address, so the
  watched linear range is translated when the watchpoint is set (page by
  page) and the hit is reported back as a linear address.  Each range is
  widened by 15 bytes below, so that an access that starts before the watched
  bytes but overlaps them is seen (Unicorn checks only the access's first
  address); the callback checks the overlap.  The hit ends the slice right
  *after* the accessing instruction (a trap, as x86 data breakpoints are)
  through :meth:`CPU.stop_after_current` (the count budget is cut):
  ``emu_stop`` in a memory hook would abort the instruction after its access
  and run it twice (measured: an ``add [m], 1`` added 2).  A ``rep`` string instruction stops after the
  iteration that touched the watched bytes, RIP still on it.
* **Single step** is ``machine.run(max_instructions=1)``: whatever the
  machine would do at the boundary before the instruction (an interrupt or
  exception being delivered) happens exactly as in a normal run, and the step
  costs the virtual time of one instruction.  The step ends right after the
  instruction (``after_slice`` stops the loop before it delivers anything
  that became due meanwhile: x86's single-step trap comes before external
  interrupts too); that is delivered at the same boundary when the machine
  resumes.  ``hold_interrupts`` keeps external interrupts pending during a
  step instead (QEMU's default ``SSTEP_NOIRQ``; vmk's ``monitor step-irq
  off``); a halted CPU ignores it, since only an interrupt can wake it.

Several CPUs (``--smp N``)
--------------------------
Breakpoints (exits and code hooks) and watchpoints are armed on every
CPU's Unicorn, and a hit on any CPU stops the whole machine (all-stop) at
that CPU's instruction; :attr:`Debug.stop_cpu` says which CPU stopped (the
one whose slice ran last: for a stop request, the one that was running).
Registers, memory (through that CPU's CR3 and paging mode), the page walk
and single steps act on the *selected* CPU (:meth:`Debug.select_cpu`; a run
selects the CPU it stopped on), as QEMU's gdbstub uses its selected vCPU.
Stepping over a breakpoint is per CPU: every CPU whose RIP is on an armed
breakpoint when the machine resumes executes that instruction once first.

Invariants: a breakpoint stop leaves RIP on the breakpoint with the
instruction not executed; ``machine.instructions`` and ``clock.now`` are then
exactly what a run with ``max_instructions`` up to that point gives.  A
breakpoint is reported only when the CPU really is about to execute the
instruction: if a CPU event or a deliverable interrupt is due at that
boundary, it is taken first, as in a run without the debugger.

Not modelled: watchpoints do not see accesses made by the machine itself
(interrupt frames pushed by the IDT delivery, page-table walks) nor DMA, and
they watch the memory behind the linear address at the time they are set
(another mapping of the same memory triggers them too; a remapped page is not
followed until the watchpoint is set again, which gdb does at every resume);
changing a segment selector from the debugger (the descriptor would have to
be loaded); x87 FPU pointer registers are read-only.
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Callable

from unicorn import UC_HOOK_CODE, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE, UcError
from unicorn import unicorn_const as uc_const
from unicorn import x86_const as X
from unicorn.unicorn_py3 import unicorn as _ucmod

from .cpu import CPU, EFLAGS, HF, RegBatch
from .mmu import CR0_PG, PTE_P, PTE_PS, PTE_U, PTE_W, PageFault, Paging
from .pc import Machine, RunResult, Why
from .smp import ApState

__all__ = ["Debug", "DebugError", "BreakKind", "WatchKind", "StopEvent", "RegDef", "REGISTERS",
           "REG_INDEX", "WHERE_REGISTERS", "HLT_OPCODE", "PageMapping", "PTE_NX"]

HLT_OPCODE = 0xF4
PAGE = 0x1000
_MASK64 = (1 << 64) - 1
WATCH_REACH = 15                    # widest access that can start below a watched byte (16-byte SSE)
LAPIC_TPR = 0x80                    # LAPIC task-priority register offset (SDM vol. 3, table 11-1)
TPR_CLASS_SHIFT = 4                 # CR8 = TPR[7:4] (SDM vol. 3, §10.8.6.1)
MSR_EFER = 0xC000_0080
MSR_KERNEL_GS_BASE = 0xC000_0102
STEP_MESSAGE = "instruction limit reached"      # machine.run's message when max_instructions ran out
STEP_STOP = "step"                              # the stop reason of a completed single step

_lib = _ucmod.uclib


class DebugError(Exception):
    """A debugger request that cannot be done; the message says why, in one line."""


class BreakKind(Enum):
    SOFTWARE = "swbreak"            # gdb Z0
    HARDWARE = "hwbreak"            # gdb Z1 (same mechanism: nothing is written to guest memory)


class WatchKind(Enum):
    WRITE = "watch"                 # gdb Z2
    READ = "rwatch"                 # gdb Z3
    ACCESS = "awatch"               # gdb Z4


PTE_NX = 1 << 63
_PT_ADDR = 0x000F_FFFF_FFFF_F000
_LEAF_MASK = {1 << 30: 0x000F_FFFF_C000_0000, 1 << 21: 0x000F_FFFF_FFE0_0000, 1 << 12: _PT_ADDR}


@dataclass(frozen=True, slots=True)
class PageMapping:
    """One present leaf entry of the guest's 4-level page tables."""
    linear: int                     # canonical linear address of the page
    size: int                       # 4 KiB, 2 MiB or 1 GiB
    entry: int                      # the leaf entry as stored
    user: bool                      # U and W are the AND over every level, NX the OR
    writable: bool
    nx: bool

    @property
    def phys(self) -> int:
        return self.entry & _LEAF_MASK[self.size]


@dataclass(slots=True)
class StopEvent:
    """Why the last debugger run stopped, beyond ``RunResult``."""
    kind: str                       # "breakpoint" | "watchpoint" | "step"
    pc: int
    break_kind: BreakKind | None = None
    watch_kind: WatchKind | None = None
    data_addr: int = 0              # watchpoint: the watched address that was accessed


# ---------------------------------------------------------------------- registers
@dataclass(frozen=True, slots=True)
class RegDef:
    """One register of the gdb x86-64 layout (QEMU's order and sizes)."""
    name: str
    bits: int
    type: str                       # gdb target-description type
    feature: str                    # gdb target-description feature it belongs to

    @property
    def size(self) -> int:
        return self.bits // 8


_CORE = "org.gnu.gdb.i386.core"
_SSE = "org.gnu.gdb.i386.sse"
_SEGS = "org.gnu.gdb.i386.segments"
_SYS = "org.vmk.x86.system"
_GPR_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_SEG_ORDER = ("cs", "ss", "ds", "es", "fs", "gs")
_FPU_CTL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")

REGISTERS: tuple[RegDef, ...] = (
    tuple(RegDef(n, 64, "data_ptr" if n in ("rbp", "rsp") else "int64", _CORE) for n in _GPR_ORDER)
    + (RegDef("rip", 64, "code_ptr", _CORE), RegDef("eflags", 32, "i386_eflags", _CORE))
    + tuple(RegDef(n, 32, "int32", _CORE) for n in _SEG_ORDER)
    + (RegDef("fs_base", 64, "int64", _SEGS), RegDef("gs_base", 64, "int64", _SEGS),
       RegDef("k_gs_base", 64, "int64", _SYS))
    + tuple(RegDef(n, 64, "int64", _SYS) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"))
    + tuple(RegDef(f"st{i}", 80, "i387_ext", _CORE) for i in range(8))
    + tuple(RegDef(n, 32, "int", _CORE) for n in _FPU_CTL)
    + tuple(RegDef(f"xmm{i}", 128, "vec128", _SSE) for i in range(16))
    + (RegDef("mxcsr", 32, "i386_mxcsr", _SSE),)
)
REG_INDEX = {r.name: i for i, r in enumerate(REGISTERS)}
# What a debugger needs to show where the CPU stopped (frame pointer, stack pointer, pc):
# the GDB stub sends them with every stop reply, so gdb's stepi needs no 'g'.
WHERE_REGISTERS = tuple(REG_INDEX[n] for n in ("rbp", "rsp", "rip"))

# Registers read in one ctypes batch (u64 each): GPRs, rip, rflags, selectors, bases, CRs.
_BATCH_NAMES = (_GPR_ORDER + ("rip", "eflags") + _SEG_ORDER
                + ("fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4"))
_UC_ID = {
    **{n: getattr(X, f"UC_X86_REG_{n.upper()}") for n in _GPR_ORDER + ("rip",) + _SEG_ORDER},
    "eflags": X.UC_X86_REG_RFLAGS, "fs_base": X.UC_X86_REG_FS_BASE, "gs_base": X.UC_X86_REG_GS_BASE,
    "cr0": X.UC_X86_REG_CR0, "cr2": X.UC_X86_REG_CR2, "cr3": X.UC_X86_REG_CR3, "cr4": X.UC_X86_REG_CR4,
    **{f"st{i}": X.UC_X86_REG_ST0 + i for i in range(8)},
    "fctrl": X.UC_X86_REG_FPCW, "fstat": X.UC_X86_REG_FPSW, "ftag": X.UC_X86_REG_FPTAG,
    "fiseg": X.UC_X86_REG_FCS, "fioff": X.UC_X86_REG_FIP, "foseg": X.UC_X86_REG_FDS,
    "fooff": X.UC_X86_REG_FDP, "fop": X.UC_X86_REG_FOP,
    **{f"xmm{i}": X.UC_X86_REG_XMM0 + i for i in range(16)},
    "mxcsr": X.UC_X86_REG_MXCSR,
}
# Read through uc_reg_read with a raw buffer (the binding reads ST0-7 as 64-bit integers,
# losing the exponent): 80-bit x87, FPU control words (16-bit, FIP/FDP 64-bit), 128-bit XMM.
_RAW_NAMES = tuple(f"st{i}" for i in range(8)) + _FPU_CTL + tuple(f"xmm{i}" for i in range(16)) + ("mxcsr",)
_RAW_READ_ONLY = frozenset({"fiseg", "fioff", "foseg", "fooff", "fop"})
_RAW_SLOT = 16
# How read_registers fills each register: (index, batch position, size, mask), (index, raw offset,
# size), and the few read one by one (MSRs, CR8 from the LAPIC).
_BATCH_PLAN = tuple((i, _BATCH_NAMES.index(r.name), r.size, (1 << r.bits) - 1)
                    for i, r in enumerate(REGISTERS) if r.name in _BATCH_NAMES)
_RAW_PLAN = tuple((i, _RAW_SLOT * _RAW_NAMES.index(r.name), r.size)
                  for i, r in enumerate(REGISTERS) if r.name in _RAW_NAMES)
_OTHER_PLAN = tuple(i for i, r in enumerate(REGISTERS)
                    if r.name not in _BATCH_NAMES and r.name not in _RAW_NAMES)


class _RawBatch:
    """All the raw-read registers in one uc_reg_read_batch call, each into a
    16-byte slot (a call per register costs ~1 us of ctypes each)."""

    def __init__(self, uc, names: tuple[str, ...]) -> None:
        self._uch = uc._uch
        self.names = names
        self.n = len(names)
        self.ids = (ctypes.c_int * self.n)(*[_UC_ID[n] for n in names])
        self.buf = (ctypes.c_uint8 * (_RAW_SLOT * self.n))()
        base = ctypes.addressof(self.buf)
        self.ptrs = (ctypes.c_void_p * self.n)(*[base + _RAW_SLOT * i for i in range(self.n)])

    def read(self) -> bytes:
        """The slots, concatenated (register i at offset 16 * i)."""
        ctypes.memset(self.buf, 0, len(self.buf))
        _lib.uc_reg_read_batch(self._uch, self.ids, self.ptrs, self.n)
        return bytes(self.buf)


class _Exit:
    """An armed breakpoint address: how it is implemented and who asked for it."""
    __slots__ = ("addr", "counts", "hook")

    def __init__(self, addr: int) -> None:
        self.addr = addr
        self.counts = {BreakKind.SOFTWARE: 0, BreakKind.HARDWARE: 0}
        self.hook: list[int] | None = None   # UC_HOOK_CODE handles (one per CPU) when an exit cannot be used

    @property
    def kind(self) -> BreakKind:
        return BreakKind.SOFTWARE if self.counts[BreakKind.SOFTWARE] else BreakKind.HARDWARE


class _Watch:
    __slots__ = ("addr", "length", "kind", "hooks", "count")

    def __init__(self, addr: int, length: int, kind: WatchKind) -> None:
        self.addr = addr
        self.length = length
        self.kind = kind
        self.hooks: list[tuple[object, int]] = []      # (CPU, handle): every CPU's
        self.count = 1


class _WatchPiece:
    """The part of a watchpoint that lies in one page: linear and physical start."""
    __slots__ = ("watch", "linear", "phys", "length")

    def __init__(self, watch: _Watch, linear: int, phys: int, length: int) -> None:
        self.watch = watch
        self.linear = linear
        self.phys = phys
        self.length = length


class _CpuAccess:
    """The debugger's per-CPU readers and the exit list last given to that CPU's Unicorn."""
    __slots__ = ("cpu", "batch", "where", "raw", "exits")

    def __init__(self, cpu: CPU) -> None:
        self.cpu = cpu
        self.batch = RegBatch(cpu.uc, [_UC_ID[n] for n in _BATCH_NAMES])
        self.where = RegBatch(cpu.uc, [_UC_ID[REGISTERS[i].name] for i in WHERE_REGISTERS])
        self.raw = _RawBatch(cpu.uc, _RAW_NAMES)
        self.exits: frozenset[int] = frozenset()
        cpu.uc.ctl_exits_enabled(True)
        cpu.uc.ctl_set_exits([])


class Debug:
    """Debugger access to one machine.  Create at most one per machine."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._cpus: list[_CpuAccess] = [_CpuAccess(c) for c in machine.cpus]
        self._multi = len(self._cpus) > 1
        self._index = {id(a.cpu): k for k, a in enumerate(self._cpus)}
        self.selected = 0                        # the CPU registers, memory and steps act on
        self.stop_cpu = 0                        # the CPU the last run stopped on
        self._last_cpu = 0                       # the CPU whose slice ended last (while running)
        self.cpu = machine.cpu
        self.uc = machine.cpu.uc
        # What "run" means: the machine's loop for a bare-metal kernel, pid 0's
        # loop for a VM image (tools/vmview.py sets it).
        self.runner: Callable[..., RunResult] = machine.run
        self._bps: dict[int, _Exit] = {}
        self._watches: dict[tuple[int, int, WatchKind], _Watch] = {}
        # CPU index -> breakpoint it steps over in its next one-instruction slice
        self._disarmed: dict[int, int] = {}
        self._step_from: int | None = None      # machine.instructions when the current single step began
        self.stop_event: StopEvent | None = None
        self.hold_interrupts_on_step = False     # monitor step-irq off
        # Called after every slice while running (the GDB stub polls its socket here).
        self.host_poll: Callable[[], None] | None = None
        self._batch = self._cpus[0].batch
        self._where_batch = self._cpus[0].where
        # Linear page -> physical page for debugger memory access, valid while
        # the machine has not run since (see _page_map).
        self._pages: dict[int, int] = {}
        self._pages_key: tuple[int, int] | None = None
        self._pg = None
        self._raw_batch = self._cpus[0].raw
        self._raw = (ctypes.c_uint8 * 16)()
        machine.after_slice = self._after_slice

    # ------------------------------------------------------------------ CPUs
    @property
    def cpu_count(self) -> int:
        return len(self._cpus)

    def select_cpu(self, k: int) -> None:
        """Make CPU ``k`` the one registers, memory, the page walk and steps act on."""
        if not 0 <= k < len(self._cpus):
            raise DebugError(f"no CPU {k} (the machine has {len(self._cpus)})")
        if k == self.selected:
            return
        a = self._cpus[k]
        self.selected = k
        self.cpu, self.uc = a.cpu, a.cpu.uc
        self._batch, self._where_batch, self._raw_batch = a.batch, a.where, a.raw
        self.forget()

    def cpu_state(self, k: int) -> str:
        """'waiting for SIPI', 'halted' or 'executing' (CPU ``k``)."""
        procs = self.machine.processors
        if procs and procs[k].state is ApState.WAIT_FOR_SIPI:
            return "waiting for SIPI"
        return "halted" if self._cpus[k].cpu.halted else "executing"

    def _lapic(self):
        procs = self.machine.processors
        return procs[self.selected].lapic if procs else self.machine.lapic

    def _paging(self) -> Paging:
        """The selected CPU's paging state (Machine.paging() alone is the running CPU's)."""
        return self.machine.paging(self.cpu)

    def close(self) -> None:
        """Remove every breakpoint and watchpoint and detach from the run loop."""
        self.clear()
        if self.machine.after_slice == self._after_slice:
            self.machine.after_slice = None
        self.machine.slice_limit = None

    # ------------------------------------------------------------------ breakpoints
    def add_breakpoint(self, addr: int, kind: BreakKind = BreakKind.SOFTWARE) -> None:
        """Arm a breakpoint at linear address ``addr`` (counted: add twice, remove twice)."""
        addr &= _MASK64
        bp = self._bps.get(addr)
        if bp is None:
            bp = self._bps[addr] = _Exit(addr)
            self._arm(bp)
        bp.counts[kind] += 1

    def remove_breakpoint(self, addr: int, kind: BreakKind = BreakKind.SOFTWARE) -> bool:
        addr &= _MASK64
        bp = self._bps.get(addr)
        if bp is None or bp.counts[kind] == 0:
            return False
        bp.counts[kind] -= 1
        if not any(bp.counts.values()):
            del self._bps[addr]
            self._disarm(bp)
        return True

    def breakpoints(self) -> list[tuple[int, BreakKind]]:
        return [(a, bp.kind) for a, bp in sorted(self._bps.items())]

    def _needs_hook(self, addr: int) -> bool:
        # Discussion: the CPU classifies an early end of slice as HLT when the
        # byte before RIP is 0xF4 (Unicorn gives no reason).  An exit at such an
        # address would be taken for a HLT (and with IF=0, for a dead machine),
        # so it gets a code hook.  Unreadable memory: use the hook to be safe.
        try:
            return self.read_memory((addr - 1) & _MASK64, 1) == bytes([HLT_OPCODE])
        except DebugError:
            return True

    def _arm(self, bp: _Exit) -> None:
        # An exit breakpoint reaches Unicorn when the machine next runs (_sync_exits).
        if self._needs_hook(bp.addr):
            bp.hook = []
            for k, a in enumerate(self._cpus):
                bp.hook.append(a.cpu.uc.hook_add(UC_HOOK_CODE, self._on_code_hook, k, bp.addr, bp.addr))
                a.cpu.precise += 1               # its stop is exact in count mode only
                self._drop_translations(a.cpu, bp.addr)

    def _disarm(self, bp: _Exit) -> None:
        if bp.hook is not None:
            for a, h in zip(self._cpus, bp.hook):
                a.cpu.hook_del(h)                # the CPU state kept (Unicorn's uc_hook_del quirk)
                a.cpu.precise -= 1
                self._drop_translations(a.cpu, bp.addr)
            bp.hook = None

    def _sync_exits(self) -> None:
        """Give Unicorn the armed exit breakpoints, if they changed since the last time.

        Discussion: gdb removes every breakpoint when the target stops and
        inserts them again before it resumes (z0/Z0 around each stepi), so the
        set usually comes back unchanged; syncing only before a run makes
        that pair free instead of two exit-list updates and two translation
        drops.  Called from _prepare and _rearm, i.e. before every slice the
        debugger runs.  Every CPU gets the same list, less the breakpoint it
        steps over (if any)."""
        exits = frozenset(a for a, bp in self._bps.items() if bp.hook is None)
        for k, a in enumerate(self._cpus):
            mine = exits - {self._disarmed[k]} if k in self._disarmed else exits
            old = a.exits
            if mine == old:
                continue
            a.cpu.uc.ctl_set_exits(list(mine))
            a.cpu.exit_addresses = mine
            a.exits = mine
            for addr in mine ^ old:
                self._drop_translations(a.cpu, addr)

    @staticmethod
    def _drop_translations(cpu, addr: int) -> None:
        # Exits and code hooks are decided when an instruction is translated.
        try:
            cpu.uc.ctl_remove_cache(addr, addr + 1)
        except UcError:
            cpu.flush_translations()

    def _on_code_hook(self, uc, address, size, k: int) -> None:
        if address == self._disarmed.get(k) or self.stop_event is not None:
            return
        bp = self._bps.get(address)
        if bp is None:
            return
        self.stop_event = StopEvent("breakpoint", address, break_kind=bp.kind)
        self._last_cpu = k
        self._cpus[k].cpu.stop_before_current()  # emu_stop, the instruction uncounted
        self.machine.stop("breakpoint")          # the loop returns BREAKPOINT

    # ------------------------------------------------------------------ watchpoints
    def add_watchpoint(self, addr: int, length: int, kind: WatchKind) -> None:
        if not 1 <= length <= PAGE:
            raise DebugError(f"watchpoint length {length} out of range (1..{PAGE})")
        key = (addr & _MASK64, length, kind)
        w = self._watches.get(key)
        if w is not None:
            w.count += 1
            return
        w = _Watch(addr & _MASK64, length, kind)
        pieces = self._physical_pieces(w)
        types = {WatchKind.WRITE: (UC_HOOK_MEM_WRITE,), WatchKind.READ: (UC_HOOK_MEM_READ,),
                 WatchKind.ACCESS: (UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE)}[kind]
        for k, a in enumerate(self._cpus):
            for piece in pieces:
                lo = max(0, piece.phys - WATCH_REACH)
                for t in types:
                    hi = piece.phys + piece.length - 1
                    w.hooks.append((a.cpu, a.cpu.uc.hook_add(t, self._on_mem_hook, (piece, k), lo, hi)))
            a.cpu.precise += 1                   # a hit stops right after its instruction: count mode
        self._watches[key] = w

    def _physical_pieces(self, w: _Watch) -> list[_WatchPiece]:
        m = self.machine
        pg = self._paging()
        pieces = []
        pos = 0
        while pos < w.length:
            lin = (w.addr + pos) & _MASK64
            n = min(w.length - pos, PAGE - (lin & (PAGE - 1)))
            if not self._ram_backed(lin, n, pg):
                raise DebugError(f"cannot watch {lin:#x}: not mapped to RAM")
            pieces.append(_WatchPiece(w, lin, m.translate(lin, pg=pg), n))
            pos += n
        return pieces

    def remove_watchpoint(self, addr: int, length: int, kind: WatchKind) -> bool:
        key = (addr & _MASK64, length, kind)
        w = self._watches.get(key)
        if w is None:
            return False
        w.count -= 1
        if w.count == 0:
            self._unhook(w)
            del self._watches[key]
        return True

    def _unhook(self, w: _Watch) -> None:
        for cpu, h in w.hooks:
            cpu.hook_del(h)
        for a in self._cpus:
            a.cpu.precise -= 1

    def watchpoints(self) -> list[tuple[int, int, WatchKind]]:
        return sorted(self._watches)

    def _on_mem_hook(self, uc, access, address, size, value, where: tuple[_WatchPiece, int]) -> None:
        # ``address`` is physical (Unicorn 2.1.4 memory hooks).
        piece, k = where
        if self.stop_event is not None or address + size <= piece.phys \
                or address >= piece.phys + piece.length:
            return
        cpu = self._cpus[k].cpu
        self.stop_event = StopEvent("watchpoint", cpu.rip, watch_kind=piece.watch.kind,
                                    data_addr=piece.linear + max(address, piece.phys) - piece.phys)
        self._last_cpu = k
        cpu.stop_after_current()
        self.machine.stop("breakpoint")          # no emu_stop: the slice already ends after this one

    def clear(self) -> None:
        """Remove every breakpoint and watchpoint."""
        for bp in list(self._bps.values()):
            del self._bps[bp.addr]
            self._disarm(bp)
        for w in self._watches.values():
            self._unhook(w)
        self._watches.clear()
        self._sync_exits()                       # the machine may run on without the debugger

    # ------------------------------------------------------------------ running
    def cont(self, until: int | None = None, max_instructions: int | None = None) -> RunResult:
        """Run until a breakpoint, a watchpoint, a stop request or the end of the run.
        Afterwards the CPU it stopped on is :attr:`stop_cpu`, and selected."""
        self._prepare()
        try:
            result = self.runner(until=until, max_instructions=max_instructions)
        finally:
            self._finish()
            self.forget()
        if self._multi:
            self.stop_cpu = self._last_cpu
            self.select_cpu(self.stop_cpu)
        stepped = result.why == Why.STOPPED and result.message in (STEP_MESSAGE, STEP_STOP)
        if stepped and self.stop_event is None:
            self.stop_event = StopEvent("step", self.cpu.rip)
        elif self.stop_event is not None:
            self.stop_event.pc = self.cpu.rip        # a watchpoint stops after the accessing instruction
        return result

    def step(self, until: int | None = None, cpu: int | None = None) -> RunResult:
        """Execute exactly one instruction of CPU ``cpu`` (default: the selected
        one), taking what is due at this boundary first.

        Discussion (several CPUs): only the stepped CPU runs; the others stay
        stopped (``Machine.run_only``), so a step is deterministic and costs
        one instruction of virtual time, as on one CPU.  QEMU does the same
        for gdb's stepi (measured, gdb 13 and QEMU 7.2 -smp 2: gdb sends
        ``vCont;s:p1.2`` alone, and QEMU's gdbstub leaves CPUs without an
        action stopped).  For ``vCont;s:THREAD;c`` QEMU lets the other vCPUs
        run for as long as the step takes on the host, which is not
        reproducible; vmk keeps them stopped there too.  A CPU that cannot move
        while the others stay stopped (waiting for SIPI, or halted with
        interrupts off) does not step: the step ends at once, nothing ran."""
        if cpu is not None:
            self.select_cpu(cpu)
        m = self.machine
        if self._multi:
            p = m.processors[self.selected]
            c = p.cpu
            if p.state is ApState.WAIT_FOR_SIPI or (c.halted and c.event is None and not p.lapic.nmi_pending
                                                    and not c.rflags & EFLAGS.IF):
                self.stop_event = StopEvent("step", c.rip)
                self.stop_cpu = self.selected
                return RunResult(Why.STOPPED, STEP_STOP)
            m.run_only = p
        hold = self.hold_interrupts_on_step and not self.cpu.halted
        m.hold_interrupts = hold
        self._step_from = m.instructions
        rip, before = self.cpu.rip, self._batch.read()
        try:
            result = self.cont(until=until, max_instructions=1)
            if self._aborted_write(rip, before):
                # Discussion: a store into the page of its own translation
                # (self-modifying code) makes QEMU abandon the translation block
                # and restart the instruction in a one-instruction block; the
                # count budget was spent on the abandoned attempt, so the step
                # ends before the restart and the next step does the same, for
                # ever.  A budget of 2 covers attempt and restart; as in a run
                # without the debugger, such a store costs two counts (here
                # plus the one of the abandoned step: one instruction of
                # virtual time more than that run).
                self._step_from = m.instructions
                result = self.cont(until=until, max_instructions=2)
            if self._multi and result.why == Why.DEAD:
                # The stepped CPU halted with nothing left to wake it while the others
                # stay stopped: not the machine's end, the step is over.
                result = RunResult(Why.STOPPED, STEP_STOP)
                self.stop_event = StopEvent("step", self.cpu.rip)
            return result
        finally:
            m.hold_interrupts = False
            m.run_only = None
            self._step_from = None

    def _aborted_write(self, rip: int, before: tuple[int, ...]) -> bool:
        """Did the last step count an instruction that did nothing at all, and
        is that instruction one that cannot legitimately stay in place?"""
        cpu = self.cpu
        if (self.stop_event is None or self.stop_event.kind != "step" or cpu.rip != rip or cpu.halted
                or cpu.event is not None or self.machine.instructions != self._step_from + 1
                or self._batch.read() != before):
            return False
        try:
            code = self.read_memory(rip, 15)
        except DebugError:
            return False
        from capstone import CS_ARCH_X86, CS_GRP_CALL, CS_GRP_INT, CS_GRP_IRET, CS_GRP_JUMP, CS_GRP_RET, \
            CS_MODE_32, CS_MODE_64, Cs
        md = Cs(CS_ARCH_X86, CS_MODE_64 if cpu.hflags() & HF.CS64 else CS_MODE_32)
        md.detail = True
        insn = next(md.disasm(code, rip), None)
        if insn is None or insn.prefix[0] in (0xF2, 0xF3):            # rep: an iteration stays in place
            return False
        return not any(insn.group(g) for g in (CS_GRP_JUMP, CS_GRP_CALL, CS_GRP_RET, CS_GRP_INT, CS_GRP_IRET))

    def _prepare(self) -> None:
        self.stop_event = None
        self._last_cpu = self.selected
        for k, a in enumerate(self._cpus):
            rip = a.cpu.rip
            if rip in self._bps:
                # Step over the breakpoint under this CPU's RIP (the x86 RF flag's job).
                self._disarmed[k] = rip
        if self._disarmed:
            self.machine.slice_limit = self._one_if_disarmed if self._multi else _one
        self._sync_exits()
        self.machine.after_slice = self._after_slice

    def _one_if_disarmed(self) -> int | None:
        return 1 if self._index[id(self.machine.cpu)] in self._disarmed else None

    def _finish(self) -> None:
        if self._disarmed:
            self._disarmed.clear()
            self.machine.slice_limit = None
            self._sync_exits()

    def _rearm(self, k: int) -> None:
        addr = self._disarmed.pop(k)
        if not self._disarmed:
            self.machine.slice_limit = None
        if addr in self._bps:
            self._sync_exits()

    def _after_slice(self) -> None:
        m = self.machine
        cpu = m.cpu                              # the CPU whose slice just ended
        if self._multi:
            k = self._last_cpu = self._index[id(cpu)]
        else:
            k = 0
        if self._disarmed and k in self._disarmed:
            self._rearm(k)
        if self._step_from is not None and m.instructions > self._step_from:
            m.stop(STEP_STOP)
        if self._bps and self.stop_event is None:
            rip = cpu.rip
            bp = self._bps.get(rip)
            if bp is not None and bp.hook is None and not cpu.halted and not self._diverted(cpu):
                self.stop_event = StopEvent("breakpoint", rip, break_kind=bp.kind)
                m.stop("breakpoint")
        if self.host_poll is not None:
            self.host_poll()

    def _diverted(self, cpu: CPU) -> bool:
        """Will the machine deliver something at this boundary instead of executing RIP?"""
        m = self.machine
        if cpu.event is not None:
            return True
        if m.hold_interrupts or not m.lapic.pending():          # m.lapic: the running CPU's
            return False
        return bool(cpu.rflags & EFLAGS.IF) and not cpu.in_interrupt_shadow()

    # ------------------------------------------------------------------ registers
    def read_registers(self) -> list[bytes]:
        """Every register of :data:`REGISTERS`, little-endian, in that order."""
        vals = self._batch.read()
        raw = self._raw_batch.read()
        out: list[bytes] = [b""] * len(REGISTERS)
        for i, j, size, mask in _BATCH_PLAN:
            out[i] = (vals[j] & mask).to_bytes(size, "little")
        for i, off, size in _RAW_PLAN:
            out[i] = raw[off:off + size]
        for i in _OTHER_PLAN:
            out[i] = self._read_other(REGISTERS[i])
        return out

    def read_where(self) -> list[tuple[int, bytes]]:
        """(index, little-endian value) of each of :data:`WHERE_REGISTERS`, in one batch read."""
        return [(i, v.to_bytes(8, "little")) for i, v in zip(WHERE_REGISTERS, self._where_batch.read())]

    def read_register(self, index: int) -> bytes:
        if not 0 <= index < len(REGISTERS):
            raise DebugError(f"no register number {index}")
        r = REGISTERS[index]
        if r.name in _BATCH_NAMES:
            v = self.uc.reg_read(_UC_ID[r.name])
            return (v & ((1 << r.bits) - 1)).to_bytes(r.size, "little")
        return self._read_other(r)

    def registers(self) -> dict[str, int]:
        """Name -> value for every register (x87 as the 80-bit pattern, XMM as 128-bit)."""
        return {r.name: int.from_bytes(b, "little") for r, b in zip(REGISTERS, self.read_registers())}

    def _read_other(self, r: RegDef) -> bytes:
        if r.name in _RAW_NAMES:
            ctypes.memset(self._raw, 0, 16)
            _lib.uc_reg_read(self.uc._uch, _UC_ID[r.name], self._raw)
            return bytes(self._raw)[:r.size]
        if r.name == "k_gs_base":
            v = self.uc.msr_read(MSR_KERNEL_GS_BASE)
        elif r.name == "efer":
            v = self.uc.msr_read(MSR_EFER)
        elif r.name == "cr8":
            v = (self._lapic().read(LAPIC_TPR, 4) & 0xFF) >> TPR_CLASS_SHIFT
        else:
            raise DebugError(f"register {r.name} cannot be read")
        return (v & _MASK64).to_bytes(8, "little")

    def write_register(self, index: int, data: bytes) -> None:
        """Write one register from its little-endian bytes (as many as its size)."""
        if not 0 <= index < len(REGISTERS):
            raise DebugError(f"no register number {index}")
        r = REGISTERS[index]
        if len(data) != r.size:
            raise DebugError(f"register {r.name} is {r.size} bytes, got {len(data)}")
        if data == self.read_register(index):
            return
        value = int.from_bytes(data, "little")
        name = r.name
        if name in _SEG_ORDER:
            raise DebugError(f"changing the {name} selector is not supported (the descriptor "
                             "would have to be loaded from the GDT)")
        if name in _RAW_READ_ONLY:
            raise DebugError(f"the x87 pointer register {name} is read-only")
        if name in _RAW_NAMES:
            buf = (ctypes.c_uint8 * 16)(*data.ljust(16, b"\0"))
            _lib.uc_reg_write(self.uc._uch, _UC_ID[name], buf)
        elif name == "k_gs_base":
            self.uc.msr_write(MSR_KERNEL_GS_BASE, value)
        elif name == "efer":
            self.uc.msr_write(MSR_EFER, value)
        elif name == "cr8":
            self._lapic().write(LAPIC_TPR, 4, (value & 0xF) << TPR_CLASS_SHIFT)
        else:
            self.uc.reg_write(_UC_ID[name], value)
            if name in ("cr0", "cr3", "cr4"):
                self.cpu.flush_tlb()
            if name == "rip":
                self.cpu.halted = False          # a new RIP: run from there
                self.cpu.event = None
        self.cpu.invalidate_ctx()                # written behind the CPU's context copy (paging())
        self.forget()                            # CR0/CR3/CR4 or memory seen through them may change

    def write_registers(self, values: list[bytes]) -> None:
        """Write every register (a gdb ``G`` packet); unchanged ones are left alone."""
        if len(values) != len(REGISTERS):
            raise DebugError(f"expected {len(REGISTERS)} registers, got {len(values)}")
        current = self.read_registers()
        for i, (old, new) in enumerate(zip(current, values)):
            if new != old:
                self.write_register(i, new)

    # ------------------------------------------------------------------ memory
    def read_memory(self, addr: int, size: int) -> bytes:
        """Guest RAM at a linear address, through the guest's page tables.

        Stops at the first byte that is not mapped to RAM (MMIO is not read:
        device registers can have side effects); raises :class:`DebugError`
        if not even the first byte can be read."""
        ram = self.machine.ram
        addr &= _MASK64
        off = addr & (PAGE - 1)
        if 0 < size <= PAGE - off:               # within one page (gdb's reads nearly always are)
            base = self._page_map(addr - off) + off
            if base >= off and base + size <= ram.size:
                return ram.buf[base:base + size]
        out = bytearray()
        while size > 0:
            off = addr & (PAGE - 1)
            n = min(size, PAGE - off)
            base = self._page_map(addr - off)
            if base < 0 or not ram.contains(base + off, n):
                break
            out += ram.view[base + off:base + off + n]
            addr = (addr + n) & _MASK64
            size -= n
        if not out and size:
            raise DebugError(f"cannot access memory at {addr:#x}")
        return bytes(out)

    def write_memory(self, addr: int, data: bytes) -> None:
        """Write guest RAM at a linear address; all or nothing."""
        m = self.machine
        addr &= _MASK64
        pos = 0
        while pos < len(data):
            a = (addr + pos) & _MASK64
            n = min(len(data) - pos, PAGE - (a & (PAGE - 1)))
            base = self._page_map(a & ~(PAGE - 1))
            if base < 0 or not m.ram.contains(base + (a & (PAGE - 1)), n):
                raise DebugError(f"cannot access memory at {a:#x}")
            pos += n
        if data:
            m.write_linear(addr, data, pg=self._pg)
            for a in self._cpus:                 # it may be code any CPU has translated
                if a.cpu is not m.cpu:
                    a.cpu.uc.ctl_remove_cache(addr & ~0xFFF, (addr + len(data) + 0xFFF) & ~0xFFF)
            self._pages.clear()                  # it may have been a page table

    def debug_registers(self) -> tuple[int, ...]:
        """The guest's DR0-DR3, DR6, DR7 (the debugger's own breakpoints are not in them)."""
        return tuple(self.uc.reg_read(getattr(X, f"UC_X86_REG_DR{n}")) for n in (0, 1, 2, 3, 6, 7))

    def read_physical(self, addr: int, size: int) -> bytes:
        """Guest RAM at a physical address (QEMU's ``Qqemu.PhyMemMode:1``).

        As :meth:`read_memory`: stops at the first byte that is not RAM (MMIO
        is not read) and raises :class:`DebugError` if not even the first one is."""
        ram = self.machine.ram                   # one run of RAM from physical 0
        n = min(size, ram.size - addr) if ram.contains(addr) else 0
        if n <= 0 and size:
            raise DebugError(f"cannot access physical memory at {addr:#x}")
        return bytes(ram.view[addr:addr + n])

    def write_physical(self, addr: int, data: bytes) -> None:
        """Write guest RAM at a physical address; all or nothing.

        Discussion: the bytes may be code or page tables behind any linear
        address, so every CPU drops all its translations and its TLB (cheap:
        a debugger writes seldom); ``ctl_remove_cache`` would need the linear
        addresses, which are not known here."""
        m = self.machine
        if addr < 0 or not m.ram.contains(addr, max(1, len(data))):
            raise DebugError(f"cannot access physical memory at {addr:#x}")
        if not data:
            return
        m.write_physical(addr, data)
        for cpu in m.cpus:
            cpu.flush_translations()
            cpu.uc.ctl(uc_const.UC_CTL_TLB_FLUSH, uc_const.UC_CTL_IO_WRITE)
        self._pages.clear()

    def _page_map(self, page: int) -> int:
        """The physical address of linear page ``page``, or -1 if it is not mapped.

        Discussion: gdb reads the same few pages many times per stop (the
        instruction at pc, 64-byte windows around it), so translations are
        kept until the machine runs again.  Page tables change only by guest
        instructions, by pid 0 while the machine runs (even when no
        instruction retires nor time passes: a container started at t=0), or
        through write_memory / write_register (which drop the map); so the map
        is dropped by every run through cont/step, and keyed on (instructions
        retired, virtual time) for runs that bypass the debugger.  Whoever
        changes the machine otherwise calls :meth:`forget`."""
        m = self.machine
        key = (m.instructions, m.clock.now)
        if key != self._pages_key:
            self._pages.clear()
            self._pages_key = key
            try:
                self._pg = self._paging()
            except Exception as e:          # noqa: BLE001 - a CPU state the MMU cannot walk
                raise DebugError(f"cannot access memory: {e}") from None
        base = self._pages.get(page)
        if base is None:
            try:
                base = m.translate(page, pg=self._pg)
            except (PageFault, IndexError, ValueError, struct.error):
                base = -1
            self._pages[page] = base
        return base

    def page_mappings(self) -> list[PageMapping] | None:
        """Every present page of the current address space, in linear order (a walk of
        the 4-level tables from CR3, read-only: A/D bits are left alone); None when
        paging is off.  Raises DebugError for 32-bit paging (not walked here)."""
        pg = self._paging()
        if not pg.cr0 & CR0_PG:
            return None
        if not pg.lma:
            raise DebugError("only 4-level (long mode) page tables are walked")
        buf, size = self.machine.ram.buf, self.machine.ram.size
        unpack = struct.unpack_from
        out: list[PageMapping] = []

        def walk(table: int, level: int, base: int, user: bool, writable: bool, nx: bool) -> None:
            shift = 12 + 9 * level
            if table + 4096 > size:
                return                            # a table outside RAM reads as not present
            entries = unpack("<512Q", buf, table)
            for i, e in enumerate(entries):
                if not e & PTE_P:
                    continue
                lin = base | (i << shift)
                u, w, x = user and bool(e & PTE_U), writable and bool(e & PTE_W), nx or bool(e & PTE_NX)
                if level == 0 or (e & PTE_PS and level in (1, 2)):
                    if lin & (1 << 47):
                        lin |= 0xFFFF_0000_0000_0000  # canonical
                    out.append(PageMapping(lin, 1 << shift, e, u, w, x))
                else:
                    walk(e & _PT_ADDR, level - 1, lin, u, w, x)

        walk(pg.cr3 & _PT_ADDR, 3, 0, True, True, False)
        return out

    def forget(self) -> None:
        """The machine changed behind the debugger's back: translate memory afresh."""
        self._pages_key = None

    def _ram_backed(self, addr: int, n: int, pg) -> bool:
        m = self.machine
        try:
            pa = m.translate(addr, pg=pg)
        except (PageFault, IndexError, ValueError, struct.error):
            return False
        return m.ram.contains(pa, n)


def _one() -> int:
    return 1
