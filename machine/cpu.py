"""The CPU: one Unicorn x86-64 instance run in instruction-count slices.

How it works
------------
``run(count)`` runs at most ``count`` instructions with ``emu_start(...,
count=N)`` and returns how many retired, read exactly from Unicorn's own
instruction counter (``uc->emu_counter``, see ``_EMU_COUNTER_OFF``).  A slice
ends early when the guest executes HLT, when a hook asks to stop (a device
made an interrupt deliverable, a port write to isa-debug-exit, a fault), or
when the machine calls :meth:`request_stop` from a device callback.  The
machine converts retired instructions into virtual time.

Everything Unicorn does not do architecturally is done here or in
``x86.py``, each with the quirk it works around (``../shared/notes/unicorn.md``):

* Faults and software interrupts arrive in ``UC_HOOK_INTR``; the hook records
  them (vector, error code read from the saved context, whether it was an
  ``int n``) and stops the slice.  The machine then delivers them through the
  guest IDT *between* slices.  The hook resets ``env->old_exception`` first,
  or Unicorn turns the second fault of the run into #DF and the third into a
  silent triple fault.
* #UD never reaches ``UC_HOOK_INTR``; ``UC_HOOK_INSN_INVALID`` records it.
* ``syscall``/``sysenter`` only call a hook (no CPL change); bare-metal mode
  performs the architectural SYSCALL in :meth:`_architectural_syscall`.
* ``reg_write(CS/SS)`` does not change the CPL in 64-bit mode: segment loads
  that change privilege patch the saved context (``load_segment``).
* ``rdtsc``/``rdtscp`` return the host TSC: hooked through the binding's private
  ``__do_hook_add`` to return virtual time.
* A translation block compiled without the count hook ignores ``count``: a
  count-mode run after a block-mode (``count=0``) run flushes the
  translations first.
* Block mode (the default, see the Discussion at ``block_mode``) counts
  whole translation blocks in C and is exact to the instruction: same
  counts, times, interrupts and registers as count mode.
* ``emu_start``'s ``until`` address is probed through the page tables on every
  call, clobbering CR2 and the error code (and leaving ``old_exception`` set,
  so the next fault became #DF): the CPU runs in "exits" mode, where nothing
  is probed.
* Page-table edits made from Python do not flush Unicorn's TLB:
  :meth:`flush_tlb` must follow them.
* ``in``/``out`` are not permission-checked by Unicorn: the port bus checks
  IOPL/CPL itself (``Machine._port_allowed``).
* Where the translation buffer lands decides how fast translated code runs
  on some hosts (measured, see :func:`new_unicorn`): it is placed more than
  2 GiB from the libraries its code calls.

* RDMSR/WRMSR cannot be hooked (IA32_APIC_BASE and IA32_TSC read 0), IRET to
  ring 3 zeroes the base of an FS/GS it nulls, RDRAND returns host randomness:
  single-address code hooks added when a block is first decoded, and RDRAND
  hidden (machine/insnemu.py).

Not modelled: SMM, VMX, the x2APIC MSRs, CR8, AVX (Unicorn has none).
"""
from __future__ import annotations

import bisect
import ctypes
import os
import struct
import weakref
from enum import IntEnum
from functools import cached_property
from typing import Callable

from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_BLOCK,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_FETCH_UNMAPPED,
    UC_HOOK_MEM_READ,
    UC_HOOK_MEM_WRITE,
    UC_HOOK_MEM_READ_UNMAPPED,
    UC_HOOK_MEM_WRITE_UNMAPPED,
    UC_MODE_64,
    Uc,
    UcError,
)
from unicorn import x86_const as X
from unicorn.unicorn_py3 import unicorn as _ucmod

from . import _fasthooks
from .insnemu import EMULATED_MNEMONICS, IRET_MNEMONICS, InsnEmu, iret_nulls

__all__ = ["CPU", "Reg", "GPR_NAMES", "Stop", "CpuEvent", "EFLAGS", "Ctx"]

_END = 0xFFFF_FFFF_FFFF_FFFF        # an `until` address no code can reach (non-canonical)


class Ctx(IntEnum):
    """Byte offsets into Unicorn 2.1.4's saved x86-64 context (40-byte header +
    CPUX86State).  Measured (notes/unicorn.md §1.1, §2.3) and re-checked by
    tests/machine/test_cpu.py; re-measure if the unicorn pin changes."""
    REGS = 40           # 16 x u64, RAX.. R15 in encoding order
    RIP = 168
    EFLAGS = 176        # IF/TF/IOPL...; the arithmetic flags live lazily in cc_src
    HFLAGS = 216
    SEGS = 224          # ES CS SS DS FS GS, 24 bytes each: u32 sel, u64 base@+8, u32 limit@+16, u32 flags@+20
    LDT = 368
    TR = 392
    GDT = 416
    IDT = 440
    CR0 = 464
    CR2 = 480
    CR3 = 488
    CR4 = 496
    ERROR_CODE = 5424
    EXCEPTION_IS_INT = 5428
    EXCEPTION_NEXT_EIP = 5432
    OLD_EXCEPTION = 5536


SEG_SIZE = 24


class Seg(IntEnum):
    ES = 0
    CS = 1
    SS = 2
    DS = 3
    FS = 4
    GS = 5


class HF(IntEnum):
    """QEMU hflags bits (target/i386/cpu.h)."""
    CPL_MASK = 3
    INHIBIT_IRQ = 1 << 3
    CS32 = 1 << 4
    SS32 = 1 << 5
    ADDSEG = 1 << 6
    PE = 1 << 7
    TF = 1 << 8
    LMA = 1 << 14
    CS64 = 1 << 15


class EFLAGS(IntEnum):
    CF = 1 << 0
    PF = 1 << 2
    AF = 1 << 4
    ZF = 1 << 6
    SF = 1 << 7
    TF = 1 << 8
    IF = 1 << 9
    DF = 1 << 10
    OF = 1 << 11
    IOPL = 3 << 12
    NT = 1 << 14
    RF = 1 << 16
    VM = 1 << 17
    AC = 1 << 18


# EFLAGS.RF is bit 16; IOPL shift
IOPL_SHIFT = 12

# Model-specific registers used by the architectural SYSCALL.
MSR_EFER = 0xC000_0080
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_FMASK = 0xC000_0084
MSR_TSC_AUX = 0xC000_0103
FCW_RESET = 0x037F          # x87 control word after FNINIT: all exceptions masked, 64-bit precision, nearest
FTW_ALL_EMPTY = 0xFFFF      # x87 tag word: every register empty (tag 11b)
MXCSR_RESET = 0x1F80        # SSE: all exceptions masked, round to nearest

EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10


class Reg(IntEnum):
    RAX = X.UC_X86_REG_RAX
    RBX = X.UC_X86_REG_RBX
    RCX = X.UC_X86_REG_RCX
    RDX = X.UC_X86_REG_RDX
    RSI = X.UC_X86_REG_RSI
    RDI = X.UC_X86_REG_RDI
    RBP = X.UC_X86_REG_RBP
    RSP = X.UC_X86_REG_RSP
    R8 = X.UC_X86_REG_R8
    R9 = X.UC_X86_REG_R9
    R10 = X.UC_X86_REG_R10
    R11 = X.UC_X86_REG_R11
    R12 = X.UC_X86_REG_R12
    R13 = X.UC_X86_REG_R13
    R14 = X.UC_X86_REG_R14
    R15 = X.UC_X86_REG_R15
    RIP = X.UC_X86_REG_RIP
    RFLAGS = X.UC_X86_REG_RFLAGS
    CS = X.UC_X86_REG_CS
    SS = X.UC_X86_REG_SS
    DS = X.UC_X86_REG_DS
    ES = X.UC_X86_REG_ES
    FS = X.UC_X86_REG_FS
    GS = X.UC_X86_REG_GS
    FS_BASE = X.UC_X86_REG_FS_BASE
    GS_BASE = X.UC_X86_REG_GS_BASE
    CR0 = X.UC_X86_REG_CR0
    CR2 = X.UC_X86_REG_CR2
    CR3 = X.UC_X86_REG_CR3
    CR4 = X.UC_X86_REG_CR4
    GDTR = X.UC_X86_REG_GDTR
    IDTR = X.UC_X86_REG_IDTR
    TR = X.UC_X86_REG_TR


GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
# Register order in CPUX86State.regs (x86 encoding order).
_ENC_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


class Stop(IntEnum):
    """Why a slice ended."""
    COUNT = 0          # the instruction budget ran out
    HALT = 1           # HLT retired
    REQUEST = 2        # request_stop() from a device or the machine
    EVENT = 3          # an exception / software interrupt / #UD is pending in .event
    ERROR = 4          # Unicorn failed (unmapped memory, ...): see .error


_COUNT, _HALT = Stop.COUNT, Stop.HALT


class CpuEvent:
    """A synchronous CPU event recorded by a hook, delivered by the machine."""
    __slots__ = ("vector", "error_code", "is_int", "rip", "next_rip", "cr2")

    def __init__(self, vector: int, error_code: int | None, is_int: bool, rip: int,
                 next_rip: int, cr2: int = 0) -> None:
        self.vector = vector
        self.error_code = error_code
        self.is_int = is_int          # INT n / INT3 / INTO: gate DPL is checked, RIP = next
        self.rip = rip
        self.next_rip = next_rip
        self.cr2 = cr2

    def __repr__(self) -> str:
        ec = "" if self.error_code is None else f" ec={self.error_code:#x}"
        return f"CpuEvent(vector={self.vector}{ec} rip={self.rip:#x})"


EXC_DOUBLE_FAULT = 8
# Exceptions that push an error code (SDM vol. 3, table 6-1).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})

# Offset of `uint64_t emu_counter` in Unicorn 2.1.4's `struct uc_struct`
# (followed by `emu_count`).  Measured by scanning the struct after a known
# count; tests/machine/test_cpu.py re-checks it.
_EMU_COUNTER_OFF = 1368
# `uc_hook count_hook` (the instruction-count hook emu_start adds for count > 0),
# just before emu_counter: measured like it (non-zero after a count-mode run,
# 0 after a count=0 one); tests/machine/test_stale_fault_state.py re-checks it.
_COUNT_HOOK_OFF = _EMU_COUNTER_OFF - 8
# Offsets to Unicorn 2.1.4's live vCPU, measured like the one above (scan for a
# register pattern, then for the field a HLT sets): `CPUState *cpu` in `struct
# uc_struct`, `uint32_t halted` in CPUState (do_hlt sets it, resume_all_vcpus
# clears it at the next emu_start) and CPUX86State env inside X86CPU (after
# its 32 KiB tb_jmp_cache).  The CPU checks the env offset against its saved
# context when it starts.
_UC_CPU_OFF = 440
_CPUSTATE_HALTED_OFF = 33176
_CPUSTATE_ENV_OFF = 35408
# `uint32_t cflags_next_tb` in CPUState (QEMU: flags for the next translation,
# -1 = none; the low bits are the instruction limit, CF_COUNT_MASK), found by
# scanning for the -1 and checked by setting a limit (tests/machine/test_block_count.py).
_CPUSTATE_CFLAGS_NEXT_TB_OFF = 24
_CFLAGS_NONE = 0xFFFF_FFFF
_CUT_MAX = 511                      # a block has at most TCG_MAX_INSNS = 512 instructions
# _fasthooks blockcount.memo (pc u64 at +0, size u32 at +16, n u32 at +20): after
# a budget stop (hit 1), the block that was not entered.
_BC_MEMO_PC = 72
_BC_MEMO_N = 72 + 20
_BC_MEMO_HOST = 72 + 24
# Block mode: a block with one of these runs in count mode (_fasthooks BC_PRECISE).
_PORT_IO = frozenset({"in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd"})
# Quirk (measured, Unicorn 2.1.4): the CMPXCHG8B/16B helper takes the flags it
# keeps (all but ZF) from the lazy-flags state in env, whose cc_op the translator
# stores only at a block's end and before a code hook.  Run with count=0 (block
# mode) after an ALU instruction in the same block, it combined the previous
# block's cc_op with this one's operands: after a POPF the "flags" were the last
# ALU source, a pointer (Linux's SLUB then had TF set: a #DB in the kernel, issue
# 12).  Each such instruction gets a C code hook (_fasthooks gw_flags_sync) that
# loads RFLAGS, right at that point, into the state the helper reads.
_FLAGS_SYNC_MNEMONICS = frozenset({"cmpxchg8b", "cmpxchg16b"})
_BC_PRECISE = 0x8000_0000

_lib = _ucmod.uclib


def _addr(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def _weak_method(method: Callable) -> Callable:
    """``method`` as a callable for C to own: it calls the method while its
    object lives and does not keep the object alive.

    Discussion: a reference held in C (Py_INCREF in _fasthooks) is a root the
    garbage collector cannot see through, so a bound method held there kept
    its CPU, the machine and the guest's RAM alive for ever: every Harness a
    test made stayed in memory (~5 MB each, measured).  Only the callables C
    owns need this; the hooks' borrowed callables live in ``_gateway_refs``.
    """
    ref = weakref.WeakMethod(method)

    def call(*args):
        bound = ref()
        return 0 if bound is None else bound(*args)
    return call


# The C side: hook gateways, emu_start holding the GIL, the delivery fast path.
_GATEWAYS = _fasthooks.setup(
    reg_read=_addr(_lib.uc_reg_read), reg_write_batch=_addr(_lib.uc_reg_write_batch),
    emu_stop=_addr(_lib.uc_emu_stop), emu_start=_addr(_lib.uc_emu_start),
    context_save=_addr(_lib.uc_context_save), reg_read_batch=_addr(_lib.uc_reg_read_batch),
    reg_write=_addr(_lib.uc_reg_write),
    rip_id=X.UC_X86_REG_RIP, rsp_id=X.UC_X86_REG_RSP, rflags_id=X.UC_X86_REG_RFLAGS,
    offsets=(Ctx.REGS, Ctx.RIP, Ctx.EFLAGS, Ctx.HFLAGS, Ctx.SEGS, Ctx.GDT, Ctx.IDT, Ctx.CR0, Ctx.CR3),
    # The Linux convention: number in RAX, arguments in RDI, RSI, RDX, R10, R8, R9.
    syscall_regs=(X.UC_X86_REG_RAX, X.UC_X86_REG_RDI, X.UC_X86_REG_RSI, X.UC_X86_REG_RDX, X.UC_X86_REG_R10,
                  X.UC_X86_REG_R8, X.UC_X86_REG_R9),
    vmem_read=_addr(_lib.uc_vmem_read))
_run = _fasthooks.run
_MMIO_WRITING = ctypes.c_int32.from_address(_GATEWAYS["mmio_writing"])   # 1 inside an MMIO write callback
_regs_read = _fasthooks.regs_read
_regs_write = _fasthooks.regs_write
_regs_swap = _fasthooks.regs_swap
_bc_retired = _fasthooks.bc_retired
_window = _fasthooks.window
_deliver64 = _fasthooks.deliver64


class RegBatch:
    """A fixed register list read and written in one C call (_fasthooks.regs_read /
    regs_write around uc_reg_read/write_batch).  The stock binding costs 2-4 us
    per register; a ctypes batch ~2-5 us per call on a slow host; this ~0.3 us."""

    __slots__ = ("_uch", "n", "_ids", "_ids_addr")

    def __init__(self, uc: Uc, ids: list[int]) -> None:
        self._uch = ctypes.cast(uc._uch, ctypes.c_void_p).value
        self.n = len(ids)
        self._ids = (ctypes.c_int * self.n)(*ids)
        self._ids_addr = ctypes.addressof(self._ids)

    def read(self) -> list[int]:
        return _regs_read(self._uch, self._ids_addr, self.n)

    def write(self, values: list[int] | tuple[int, ...]) -> None:
        _regs_write(self._uch, self._ids_addr, values)

    def swap(self, old: list[int], new: list[int], rip_index: int, delta: int) -> None:
        """Save into ``old`` (in place, ``old[rip_index] += delta``) and load ``new``
        (with ``new[rip_index] - delta``) in one C call: a context switch."""
        _regs_swap(self._uch, self._ids_addr, old, new, rip_index, delta)


# How far a ``call rel32`` reaches (x86-64: a signed 32-bit displacement).
_REL32_REACH = 2 << 30
_MAP_PRIVATE, _MAP_ANONYMOUS, _MAP_NORESERVE, _MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x4000, 0x100000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _called_libraries() -> list[str]:
    """The files whose functions translated code calls: libunicorn (TCG's
    helpers) and ours (the block counter and the other C hooks)."""
    return [os.path.realpath(_lib._name), os.path.realpath(_fasthooks.__file__)]


def _maps() -> list[tuple[int, int, str, str]]:
    """This process's mappings, ascending: (start, end, permissions, path); none where there is no /proc."""
    rows = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                rows.append((lo, hi, fields[1], fields[5] if len(fields) > 5 else ""))
    except OSError:
        return []
    return rows


def new_unicorn() -> Uc:
    """A UC_MODE_64 Unicorn whose translation buffer lies more than 2 GiB from
    the libraries its translated code calls (:func:`_called_libraries`).

    Discussion: TCG's x86 back end calls a helper with a direct ``call rel32``
    when the target is within 2 GiB of the call site, through a constant
    otherwise.  Linux places Unicorn's 1 GiB buffer just below the libraries,
    so the calls are direct.  On this project's host (a 2-vCPU Xeon VM) that
    made the same translated loop run at 700 M insn/s in most processes and
    2,300 M/s in a few (raw Unicorn, the 5-instruction loop of ``vmk bench``,
    one helper call per block); with the buffer out of reach, every process
    ran at 2,200-2,300 M/s, and vmk's block mode at 800-1,300 M/s instead of
    450-780 M/s.  An indirect call is no slower where direct calls are fast,
    so the placement is unconditional.

    Unicorn maps the buffer on the first call that needs the engine (here a
    register read).  Until then every free range within reach of the
    libraries is held by a PROT_NONE mapping (no memory behind it), so the
    buffer can only land out of reach; the holders are released at once.
    The range right under the main stack is left alone (the stack grows
    into it; Linux never places mappings there)."""
    return _placed_unicorn()[0]


def _placed_unicorn() -> tuple[Uc, tuple[int, int]]:
    """:func:`new_unicorn`, and where its translation buffer is, [start, end)
    ((0, 2**64 - 1) where that cannot be seen): the block counter tells
    translations apart by the addresses of their code in it."""
    maps = _maps()
    libs = _called_libraries()
    spans = [(lo, hi) for lo, hi, _, path in maps if path in libs]
    holders = []
    if spans:
        low = max(min(lo for lo, _ in spans) - _REL32_REACH, 1 << 20)
        high = max(hi for _, hi in spans) + _REL32_REACH
        for (_, prev_hi, _, _), (next_lo, _, _, next_path) in zip(maps, maps[1:]):
            lo, hi = max(prev_hi, low), min(next_lo, high)
            if lo >= hi or next_path == "[stack]":
                continue
            addr = _libc.mmap(lo, hi - lo, 0, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED_NOREPLACE,
                              -1, 0)
            if addr == lo:
                holders.append((lo, hi - lo))
            elif addr not in (None, ctypes.c_void_p(-1).value):
                _libc.munmap(addr, hi - lo)     # a kernel without FIXED_NOREPLACE put it elsewhere
    try:
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.reg_read(X.UC_X86_REG_RIP)           # maps the translation buffer
    finally:
        for addr, size in holders:
            _libc.munmap(addr, size)
    known = {(lo, hi) for lo, hi, _, _ in maps}
    new = [(lo, hi) for lo, hi, perms, _ in _maps() if perms == "rwxp" and (lo, hi) not in known]
    return uc, (new[0] if len(new) == 1 else (0, 2**64 - 1))


class CPU:
    """Unicorn wrapped as a slice-run x86-64 CPU.

    Callbacks the machine sets (all optional):
      ``port_in(port, size) -> int``, ``port_out(port, size, value)``,
      ``syscall_door(nr, a0, a1, a2, a3, a4, a5) -> int | None`` (VM-kernel
      mode: the Linux convention; an int is loaded into RAX, None leaves
      it; without a door SYSCALL is architectural),
      ``rdtsc() -> int``, ``cpuid(leaf, subleaf) -> (eax, ebx, ecx, edx) | None``.
    """

    def __init__(self, apic_id: int = 0, bsp: bool = True) -> None:
        uc, self._code_buffer = _placed_unicorn()
        self.uc = uc
        # Which processor this is (machine/smp.py): its initial APIC ID (CPUID
        # leaf 1 EBX[31:24], the MP table and MADT) and whether it is the
        # bootstrap processor (IA32_APIC_BASE bit 8).  An AP is a UC_MODE_64
        # instance too: its SIPI state is real mode patched into the context.
        self.apic_id = apic_id
        self.bsp = bsp
        self._uch = ctypes.cast(uc._uch, ctypes.c_void_p).value
        # Quirk: Unicorn leaves the x87/SSE control state zeroed (FCW 0: every x87
        # exception unmasked, 24-bit precision; MXCSR 0: every SSE exception
        # unmasked), so the first inexact result faults.  Load what a kernel finds
        # after reset and firmware, as on QEMU (x86_cpu_reset) and a PC whose BIOS
        # ran FNINIT: FCW 0x037F, FSW 0, all tags empty, MXCSR 0x1F80 (SDM vol. 3
        # §9.1.1, Table 9-1; the table's power-up FCW 0x0040 is replaced by FNINIT's).
        uc.reg_write(X.UC_X86_REG_FPCW, FCW_RESET)
        uc.reg_write(X.UC_X86_REG_FPSW, 0)
        uc.reg_write(X.UC_X86_REG_FPTAG, FTW_ALL_EMPTY)
        uc.reg_write(X.UC_X86_REG_MXCSR, MXCSR_RESET)
        self._ram = (0, 0)                      # attach_ram: no RAM, the fast path always declines
        addr = ctypes.cast(uc._uch, ctypes.c_void_p).value
        self._counter = ctypes.c_uint64.from_address(addr + _EMU_COUNTER_OFF)
        self._emu_count = ctypes.c_uint64.from_address(addr + _EMU_COUNTER_OFF + 8)
        self._count_hook = ctypes.c_uint64.from_address(addr + _COUNT_HOOK_OFF)
        # Slices Unicorn ended with nothing of ours stopping them and no HLT (see run()).
        self.early_returns = 0
        self.last_early_return_rip = 0
        # One reusable saved-context buffer: context_update/context_restore copy
        # the whole CPUX86State (5.6 KB, ~0.5 us each way); fields are patched
        # in between at the Ctx offsets.
        self._ctx = uc.context_save()
        self._ctx_addr = ctypes.cast(self._ctx.context, ctypes.c_void_p).value
        self._ctx_buf = (ctypes.c_char * self._ctx.size).from_address(self._ctx_addr)
        self._ctx_valid = False
        # The live vCPU (Unicorn creates it lazily; context_save above did).
        vcpu = ctypes.c_uint64.from_address(addr + _UC_CPU_OFF).value
        self._vcpu_halted = ctypes.c_uint32.from_address(vcpu + _CPUSTATE_HALTED_OFF)
        self._vcpu_env = vcpu + _CPUSTATE_ENV_OFF
        if ctypes.string_at(self._vcpu_env, 16 * 8) != bytes(self._ctx_buf[Ctx.REGS:Ctx.REGS + 16 * 8]):
            raise RuntimeError("the vCPU offsets in machine/cpu.py do not match this unicorn build")
        # The live hflags word (CPL in bits 0-1, code-segment size), valid inside
        # hooks too: block decoding, the insn emulation and the port bus read it
        # without a register read.
        self.live_hflags = ctypes.c_uint32.from_address(self._vcpu_env + Ctx.HFLAGS - Ctx.REGS)
        # The live env->eip (what uc_reg_read(RIP) returns), for retired_in_slice.
        self._live_rip_address = self._vcpu_env + Ctx.RIP - Ctx.REGS
        # The live env->old_exception (see _emu_start).
        self._old_exception = ctypes.c_int32.from_address(self._vcpu_env + Ctx.OLD_EXCEPTION - Ctx.REGS)
        # Unicorn exit addresses (debugger breakpoints): a slice that ends early
        # at one of them is a breakpoint stop, not a HLT.
        self.exit_addresses: frozenset[int] = frozenset()
        self._running = False
        self._stop_reason = Stop.COUNT
        self.event: CpuEvent | None = None
        self.error: str | None = None
        self.halted = False
        self.rflags_after = 0
        self._budget = 0
        # callbacks wired by the machine
        self.port_in: Callable[[int, int], int] = lambda port, size: (1 << (8 * size)) - 1
        self.port_out: Callable[[int, int, int], None] = lambda port, size, value: None
        self._syscall_door: Callable[..., int | None] | None = None
        self.rdtsc: Callable[[], int] = lambda: 0
        # fetch_fault(rip) -> the #PF error code of fetching there, or None (the machine's page walk)
        self.fetch_fault: Callable[[int], int | None] = lambda rip: None
        self.cpuid: Callable[[int, int], tuple[int, int, int, int] | None] = lambda leaf, sub: None
        self._rip = RegBatch(uc, [X.UC_X86_REG_RIP])
        self._rflags = RegBatch(uc, [X.UC_X86_REG_RFLAGS])
        self._abcd = RegBatch(uc, [X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX])
        self._ad = RegBatch(uc, [X.UC_X86_REG_RAX, X.UC_X86_REG_RDX])
        self._acd = RegBatch(uc, [X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX])
        self._frame_regs = RegBatch(uc, [X.UC_X86_REG_RIP, X.UC_X86_REG_RSP, X.UC_X86_REG_RFLAGS])
        self._cs_rflags = RegBatch(uc, [X.UC_X86_REG_CS, X.UC_X86_REG_RFLAGS])
        self._install_hooks()
        self._block_mode = False
        self._bc: int | None = None           # the C block counter (block mode), see block_mode
        self._phase1 = False                  # a block-mode run (count=0) is in progress
        self._tb_count_mode = True            # the cached translations carry Unicorn's count hook
        # > 0 while something needs every stop exact to the instruction (the
        # debugger's watchpoints and code-hook breakpoints): no block mode then.
        self.precise = 0
        self._skip_to: int | None = None      # block mode: resume past an aborted MMIO store
        if self.BLOCK_MODE_DEFAULT:
            self.block_mode = True
        self._insn_emu_init()
        # Quirk: with a plain `until` address Unicorn probes that address's
        # page at every emu_start; under paging the probe of our never-reached
        # 0xFFFF...FFFF fails and overwrites CR2 and env->error_code (a guest
        # #PF handler then reads garbage).  In "exits" mode `until` is ignored
        # and nothing is probed; the debugger adds its breakpoints as exits.
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self) -> None:
        # Every hook goes through a C gateway in _fasthooks that calls the
        # bound method directly (the binding's ctypes callbacks cost 1.5-4 us
        # each); the callables are kept alive in self._gateway_refs.
        self._gateway_refs: list[object] = []
        gw = _GATEWAYS
        self._add_hook(UC_HOOK_INSN, gw["in"], self._hook_in, X.UC_X86_INS_IN)
        self._add_hook(UC_HOOK_INSN, gw["out"], self._hook_out, X.UC_X86_INS_OUT)
        self._syscall_hook = self._add_hook(UC_HOOK_INSN, gw["syscall"], self._hook_syscall, X.UC_X86_INS_SYSCALL)
        self._add_hook(UC_HOOK_INSN, gw["int"], self._hook_cpuid, X.UC_X86_INS_CPUID)
        # Quirk: the binding refuses UC_HOOK_INSN for RDTSC (UC_ERR_ARG) though
        # libunicorn supports it; uc_hook_add takes it (callback shaped as CPUID's).
        self._add_hook(UC_HOOK_INSN, gw["rdtsc"], self._hook_rdtsc, X.UC_X86_INS_RDTSC)
        # RDTSCP too (it also returned the host TSC): the same time, ECX = IA32_TSC_AUX.
        self._add_hook(UC_HOOK_INSN, gw["int"], self._hook_rdtscp, X.UC_X86_INS_RDTSCP)
        self._add_hook(UC_HOOK_INTR, gw["intr"], self._hook_intr)
        self._add_hook(UC_HOOK_INSN_INVALID, gw["bool"], self._hook_invalid)
        self._add_hook(UC_HOOK_MEM_READ_UNMAPPED | UC_HOOK_MEM_WRITE_UNMAPPED | UC_HOOK_MEM_FETCH_UNMAPPED,
                       gw["mem"], self._hook_unmapped)
        self._window = (ctypes.c_int32 * 2)()     # the interrupt window: [0] armed, [1] fired

    def _add_hook(self, kind: int, gateway: int, fn: Callable, insn: int | None = None) -> int:
        self._gateway_refs.append(fn)
        h = ctypes.c_size_t()
        extra = () if insn is None else (ctypes.c_int(insn),)
        status = _lib.uc_hook_add(self.uc._uch, ctypes.byref(h), kind, ctypes.c_void_p(gateway),
                                  ctypes.c_void_p(id(fn)), ctypes.c_uint64(1), ctypes.c_uint64(0), *extra)
        if status != 0:
            raise UcError(status)
        return h.value

    def map_mmio(self, base: int, size: int, read: Callable[[int, int], int],
                 write: Callable[[int, int, int], None]) -> None:
        """Map a device window; Unicorn calls ``read(offset, size)`` / ``write(offset, size, value)``."""
        self._gateway_refs += [read, write]
        status = _lib.uc_mmio_map(self.uc._uch, ctypes.c_uint64(base), ctypes.c_uint64(size),
                                  ctypes.c_void_p(_GATEWAYS["mmio_read"]), ctypes.c_void_p(id(read)),
                                  ctypes.c_void_p(_GATEWAYS["mmio_write"]), ctypes.c_void_p(id(write)))
        if status != 0:
            raise UcError(status)
        # Quirk: Unicorn syncs RIP before a memory access only while a memory
        # hook exists; without one an MMIO callback in the middle of a block
        # reads a stale RIP and block mode could not tell which instruction
        # made the access (its exact time).  This empty C hook is called for
        # the window's accesses only; its cost is a few % on load-heavy code.
        h = ctypes.c_size_t()
        status = _lib.uc_hook_add(self.uc._uch, ctypes.byref(h), UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE,
                                  ctypes.c_void_p(_GATEWAYS["mem_noop"]), None,
                                  ctypes.c_uint64(base), ctypes.c_uint64(base + size - 1))
        if status != 0:
            raise UcError(status)

    def flush_translations(self) -> None:
        """Drop every translated block (ctl_flush_tb), and tell the block
        counter: new translations may reuse the old ones' addresses."""
        self.uc.ctl_flush_tb()  # the one flush: all others go through here
        if self._bc is not None:
            _fasthooks.bc_forget_translations(self._bc)

    def _drop_count_hook(self) -> None:
        """Before a count=0 run: delete the count hook of the last count-mode run
        here (with the state kept) instead of inside emu_start, which deletes it
        with uc_hook_del too (see hook_del) and flushes the
        translations, as this does."""
        h = self._count_hook.value
        if h:
            self.hook_del(h)
            self._count_hook.value = 0
            self.flush_translations()

    def hook_del(self, handle: int) -> None:
        """uc_hook_del between slices, the CPU state kept (use it for every hook removal).

        Quirk (measured, Unicorn 2.1.4): uc_hook_del invalidates the blocks the
        hook was applied to, finding each block's page through the *current*
        page tables (get_page_addr_code).  A block whose page is not mapped now
        (another process's code, the AP trampoline, freed init code) makes that
        walk raise #PF into the CPU state outside any run: CR2, the error code
        and env->old_exception = 14 stay behind, so the guest's next #PF became
        #DF and the one after a silent triple fault (Unicorn halts; the CPU then
        retired the same block, slice after slice: Linux with --smp 2 never got
        past `Run /init`, issue 12).  The state from before the call is put back."""
        self._sync_ctx()
        _lib.uc_hook_del(self.uc._uch, ctypes.c_size_t(handle))
        self.uc.context_restore(self._ctx)

    def arm_interrupt_window(self) -> None:
        """Stop at the first block boundary where RFLAGS.IF=1 (an interrupt is
        waiting): the block counter's hook, which sees every block in both run
        modes, checks IF in its slow path while the window is armed (nothing
        otherwise: arming makes its fast path miss).  Before, a second block
        hook was installed for it, with a translation flush each way, and it
        made Unicorn call both hooks through its dispatcher instead of the
        counter directly."""
        self._window[0] = 1
        self._bc_memo_host.value = 0          # the counter's fast path misses while armed

    def _hook_in(self, port, size):
        return self.port_in(port, size)

    def _hook_out(self, port, size, value):
        self.port_out(port, size, value)

    def set_time_at(self, at: Callable[[int], int] | None, ns_per_insn: int = 1) -> None:
        """``at(elapsed)``, a bound method (held weakly, as C holds it): the
        virtual time (ns, the TSC) ``elapsed`` ns into the running slice, that
        is ``rdtsc()`` after ``elapsed // ns_per_insn`` instructions of it
        (Clock.at).  With it, an RDTSC in a block-mode run is answered in C
        (_fasthooks gw_rdtsc) instead of by :meth:`_hook_rdtsc`."""
        if self._bc is not None:
            fn, owner = (None, None) if at is None else (at.__func__, weakref.ref(at.__self__))  # type: ignore[attr-defined]
            _fasthooks.bc_timing(self._bc, self._block_insns, self._live_rip_address, fn, owner, ns_per_insn)

    def _hook_rdtsc(self):
        t = self.rdtsc()
        self._ad.write((t & 0xFFFF_FFFF, t >> 32))
        return 1

    def _hook_rdtscp(self):
        t = self.rdtsc()
        aux = self.uc.msr_read(MSR_TSC_AUX) & 0xFFFF_FFFF
        self._acd.write((t & 0xFFFF_FFFF, aux, t >> 32))
        return 1

    def _hook_cpuid(self):
        a, _, c, _ = self._abcd.read()
        res = self.cpuid(a & 0xFFFF_FFFF, c & 0xFFFF_FFFF)
        if res is None:
            return 0
        self._abcd.write(res)
        return 1

    @property
    def syscall_door(self) -> Callable[..., int | None] | None:
        return self._syscall_door

    @syscall_door.setter
    def syscall_door(self, door: Callable[..., int | None] | None) -> None:
        """The gateway calls the door itself (one Python frame less per syscall);
        without one, SYSCALL is architectural."""
        self._syscall_door = door
        _lib.uc_hook_del(self.uc._uch, ctypes.c_size_t(self._syscall_hook))
        self._syscall_hook = self._add_hook(UC_HOOK_INSN, _GATEWAYS["syscall"],
                                            self._hook_syscall if door is None else door,
                                            X.UC_X86_INS_SYSCALL)

    def _hook_syscall(self, nr, a0, a1, a2, a3, a4, a5):
        self._architectural_syscall()
        return None

    def _hook_intr(self, intno):
        self._sync_ctx()
        b = self._ctx_buf
        if self.event is not None:
            # Discussion: a fault raised while Unicorn *translates* the next
            # instruction (an instruction fetch from a non-present, NX or
            # non-canonical address, or an instruction that runs into such a
            # page) comes before that instruction's count hook, so the budget
            # cut below cannot stop it: Unicorn retries the fetch, faults again
            # and calls this hook for ever inside emu_start (no timer, no
            # --max-time: a wild `call` hung the machine).  A second event in
            # one slice can only be that retry (after the first one the budget
            # is cut, so no instruction runs): keep the first event, clear
            # old_exception as below, and end the slice with emu_stop, which
            # leaves the CPU loop before any further fetch.
            struct.pack_into("<i", b, Ctx.OLD_EXCEPTION, -1)
            struct.pack_into("<i", b, Ctx.EXCEPTION_IS_INT, 0)
            self.uc.context_restore(self._ctx)
            _lib.uc_emu_stop(self._uch)
            return
        is_int = bool(_i32(b, Ctx.EXCEPTION_IS_INT))
        ec = _i32(b, Ctx.ERROR_CODE) & 0xFFFF_FFFF if (intno in ERROR_CODE_VECTORS and not is_int) else None
        rip = _u64(b, Ctx.RIP)
        next_rip = _u64(b, Ctx.EXCEPTION_NEXT_EIP) if is_int else rip
        cr2 = _u64(b, Ctx.CR2) if intno == 14 else 0
        # Quirk: Unicorn's hook replaces delivery, so QEMU never resets
        # env->old_exception; the next fault would turn into #DF.
        struct.pack_into("<i", b, Ctx.OLD_EXCEPTION, -1)
        struct.pack_into("<i", b, Ctx.EXCEPTION_IS_INT, 0)
        self.uc.context_restore(self._ctx)
        self.event = CpuEvent(intno, ec, is_int, rip if not is_int else rip, next_rip, cr2)
        if is_int:
            # For INT n the saved RIP already points past the instruction.
            self.event.rip = rip
            self.event.next_rip = rip
        # Stop by cutting the count budget, not with emu_stop: after emu_stop
        # Unicorn runs the faulting instruction once more and leaves that
        # second fault pending (its stale error code and CR2 then reach the
        # hook for the *next* fault).  With the budget cut, Unicorn's count
        # hook stops before the instruction is tried again.
        if self._phase1:
            # The block was counted whole on entry; count mode would have
            # counted up to and including the faulting (or INT) instruction.
            last_n = self._bc_last_n.value
            idx = self._block_index(self._bc_last.value, self._bc_last_size.value,
                                    next_rip if is_int else rip)
            if last_n and idx is not None:
                self._bc_counter.value -= last_n - (idx if is_int else idx + 1)
        self.request_stop(Stop.EVENT)

    def _hook_invalid(self):
        rip = self._rip.read()[0]
        self.event = CpuEvent(6, None, False, rip, rip)
        self._stop(Stop.EVENT)
        return True

    # Loads and stores to physical addresses with nothing there (neither RAM nor
    # a device window): on QEMU 7.2 (measured: a store to 128 MiB with -m 128
    # is dropped, the load after it reads 0) and on a PC they go nowhere; xv6
    # frees pages up to its PHYSTOP (224 MiB) whatever the RAM size.  With
    # ``unassigned_ok`` the hole around the address (at most the 2 MiB-aligned
    # chunk, intersected with the gap between mapped regions) becomes a window
    # that reads 0 and ignores writes, reported once per chunk through
    # ``unassigned_log``; off, the access stops the CPU with a report (a wild
    # pointer, what someone debugging their own kernel wants to see).  An
    # instruction fetch from nowhere always stops.
    UNASSIGNED_CHUNK = 2 << 20
    unassigned_ok = False
    unassigned_log: Callable[[str], None] | None = None

    def _hook_unmapped(self, access, address, size, value):
        kind = {19: "read", 20: "write", 21: "fetch"}.get(access, "access")
        rip = self._rip.read()[0]
        if self.unassigned_ok and kind != "fetch" and self._map_open_bus(address, kind, rip):
            return True
        self.error = f"unmapped physical memory {kind} at {address:#x} (size {size}) by RIP {rip:#x}"
        return False

    def _map_open_bus(self, address: int, kind: str, rip: int) -> bool:
        lo = address & ~(self.UNASSIGNED_CHUNK - 1)
        hi = lo + self.UNASSIGNED_CHUNK
        for begin, end, _ in self.uc.mem_regions():          # end is inclusive
            if begin <= address <= end:
                return False
            if end < address:
                lo = max(lo, end + 1)
            elif begin > address:
                hi = min(hi, begin)
        lo &= ~0xFFF
        hi = (hi + 0xFFF) & ~0xFFF
        if lo >= hi:
            return False
        self.map_mmio(lo, hi - lo, _open_bus_read, _open_bus_write)
        if self.unassigned_log is not None:
            self.unassigned_log(f"physical {kind} at {address:#x} by RIP {rip:#x} hits no RAM or device: "
                                f"[{lo:#x}, {hi:#x}) now reads 0 and ignores writes, as on QEMU")
        return True

    # ------------------------------------------------------------------ block mode
    # Discussion: Unicorn's count mode calls a helper before every instruction
    # (55-100 M insn/s).  In block mode a slice of at least BLOCK_MIN
    # instructions first runs with count=0 under a C UC_HOOK_BLOCK counter
    # (_fasthooks.block_count_hook) that adds each block's instruction count on
    # entry (decoded once with capstone, cached by address, size and the live
    # CR3, so other address spaces never share a count) and stops before the
    # block that would pass the budget; the rest of the budget runs in that
    # block translated cut to what is left (_cut_next_block; count mode where
    # that cannot be done), so the slice still ends at the exact instruction
    # (4.8x on the compute loop).  What makes it exact where an instruction in
    # the middle of a block needs its own time or its own stop:
    # * the time a hook reads is the block's start plus the instruction's index
    #   in it (retired_in_slice), from RIP, which Unicorn syncs for IN/OUT,
    #   CPUID and RDTSC, and for MMIO while a memory hook exists (map_mmio adds
    #   an empty ranged one);
    # * a block with port I/O runs in count mode (an IN/OUT can #GP or end the
    #   slice right after itself, which count=0 cannot do mid-block);
    # * an MMIO mov store that ends the slice (an EOI or self-IPI making an
    #   interrupt deliverable) stops right after itself (_stop_after_store);
    #   other MMIO stops land at the block's end (documented latency, as QEMU
    #   TCG without icount);
    # * a fault mid-block is corrected from its RIP; a fetch fault Unicorn does
    #   not hand to the hook is found by the machine's page walk;
    # * SYSCALL, HLT and INT n end a block.
    # The debugger's watchpoints and code-hook breakpoints need an exact stop
    # after any instruction: while one is armed (``precise``) slices run in
    # count mode.  Code rewritten in place (same address, same block size,
    # another instruction count) is decoded again: each cached count remembers
    # the translation it came from and a hash of the block's bytes, and a new
    # translation with other bytes is a miss (_fasthooks.c, block counting;
    # flush_translations tells the counter when translations may reuse old
    # addresses).  Limit: a flush Unicorn makes by itself (its 1 GiB buffer
    # full) is not seen, so a block rewritten across one and translated back
    # to the very same place would keep its old count.
    BLOCK_MIN = 4096
    COUNT_BACKOFF_MAX = 256
    _count_slices = 0                    # slices to run in count mode before trying block mode again
    _count_backoff = 0
    BLOCK_MODE_DEFAULT = True

    @property
    def block_mode(self) -> bool:
        return self._block_mode

    @block_mode.setter
    def block_mode(self, on: bool) -> None:
        if on and self._bc is None:
            from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, CS_MODE_64, Cs
            # One decoder per code-segment size: a block is decoded in the mode
            # it runs in (boot code and xv6 run 32-bit, trampolines 16-bit).
            self._cs64, self._cs32, self._cs16 = (Cs(CS_ARCH_X86, m) for m in (CS_MODE_64, CS_MODE_32, CS_MODE_16))
            # The counter also watches the interrupt window (one block hook, called directly).
            self._bc = _fasthooks.bc_new(_weak_method(self._decode_block), self._env_cr3_address(),
                                         ctypes.addressof(self._window), self._vcpu_env + Ctx.EFLAGS - Ctx.REGS,
                                         *self._code_buffer)
            weakref.finalize(self, _fasthooks.bc_free, self._bc)
            self._block_insns: dict[tuple[int, int, int], tuple[int, ...]] = {}
            self._bc_counter = ctypes.c_uint64.from_address(self._bc)
            self._bc_limit = ctypes.c_uint64.from_address(self._bc + 8)
            self._bc_active = ctypes.c_int32.from_address(self._bc + 16)
            self._bc_hit = ctypes.c_int32.from_address(self._bc + 20)
            self._bc_last = ctypes.c_uint64.from_address(self._bc + 24)
            self._bc_last_size = ctypes.c_uint32.from_address(self._bc + 32)
            self._bc_last_n = ctypes.c_uint32.from_address(self._bc + 36)
            self._bc_misses = ctypes.c_uint64.from_address(self._bc + 40)
            self._bc_last_cr3 = ctypes.c_uint64.from_address(self._bc + 48)
            self._bc_memo_host = ctypes.c_uint64.from_address(self._bc + _BC_MEMO_HOST)
            h = ctypes.c_size_t()
            status = _lib.uc_hook_add(self.uc._uch, ctypes.byref(h), UC_HOOK_BLOCK,
                                      ctypes.c_void_p(_GATEWAYS["blockcount"]), ctypes.c_void_p(self._bc),
                                      ctypes.c_uint64(1), ctypes.c_uint64(0))
            if status != 0:
                raise UcError(status)
            self.flush_translations()
        self._block_mode = bool(on)

    def _block_bytes(self, pc: int, size: int) -> bytes:
        buf = ctypes.create_string_buffer(size)
        if _lib.uc_vmem_read(self.uc._uch, ctypes.c_uint64(pc), 4, buf, ctypes.c_size_t(size)) != 0:
            return b""
        return buf.raw

    def _env_cr3_address(self) -> int:
        """Address of the live env->cr[3] (the env offset is checked at start)."""
        return self._vcpu_env + Ctx.CR3 - Ctx.REGS

    # Instruction addresses kept for the in-block index (about 40 bytes each):
    # counted in addresses, not blocks, since a block holds up to 512 (a guest
    # running through zeroed memory made 2^18 such blocks, 5 GiB).
    BLOCK_INSNS_MAX = 1 << 21
    _block_insns_kept = 0

    def _decode_block(self, pc: int, size: int, cr3: int) -> int:
        """The block counter's decode (C, on a block's first entry in both run
        modes): its instruction count (at least 1), with _BC_PRECISE for port
        I/O; 0 when it hooked an instruction to emulate and restarted the block
        (not counted: it runs again, translated with the hook)."""
        addrs, precise, emulated = self._decode_insns(pc, size, cr3)
        if emulated and self._hook_emulated(emulated, pc, size):
            return 0
        return (len(addrs) or 1) | precise

    def _decode_insns(self, pc: int, size: int, cr3: int) -> tuple[tuple[int, ...], int, list[int]]:
        """Decode [pc, pc+size): (instruction addresses, _BC_PRECISE or 0, addresses
        of instructions to emulate); keeps the addresses for :meth:`_block_index`."""
        addrs = []
        precise = 0
        emulated = []
        for a, _, mnemonic, _ in self._cs_now().disasm_lite(self._block_bytes(pc, size), pc):
            addrs.append(a)
            m = mnemonic.rpartition(" ")[2]
            if m in _PORT_IO:
                precise = _BC_PRECISE
            elif m in EMULATED_MNEMONICS:
                emulated.append(a)
                if m in IRET_MNEMONICS:
                    self._iret_sites.add(a)
            elif m in _FLAGS_SYNC_MNEMONICS:
                emulated.append(a)
                self._sync_sites.add(a)
        self._block_insns_kept += len(addrs)
        if self._block_insns_kept > self.BLOCK_INSNS_MAX:
            self._block_insns.clear()
            self._block_insns_kept = len(addrs)
        t = self._block_insns[(pc, size, cr3)] = tuple(addrs)
        return t, precise, emulated

    def _cs_now(self):
        """The decoder for the code segment running now (live env hflags: the
        block being decoded is the one the CPU is in).  Decoding 32-bit code as
        64-bit miscounts it (0x41 is `inc ecx` there, a REX prefix here)."""
        hf = self.live_hflags.value
        return self._cs64 if hf & HF.CS64 else self._cs32 if hf & HF.CS32 else self._cs16

    def _block_index(self, pc: int, size: int, rip: int) -> int | None:
        """How many instructions of the block entered last (at pc) start before
        ``rip`` (None: rip is not in it)."""
        if not pc <= rip < pc + size:
            return None
        cr3 = self._bc_last_cr3.value
        addrs = self._block_insns.get((pc, size, cr3))
        if addrs is None:
            addrs = self._decode_insns(pc, size, cr3)[0]
        return bisect.bisect_left(addrs, rip)

    def _stop_after_store(self) -> bool:
        """Block mode, from an MMIO write that asks to stop: end the slice right
        after the storing instruction, as count mode does.  Quirk (measured):
        ``emu_stop`` inside an MMIO write aborts the instruction after the
        device has taken the write and leaves RIP on it, so it would store
        again on resume; a plain ``mov`` store has no other effect, so the run
        resumes past it (``_skip_to``).  False for any other instruction: the
        stop then takes effect at the end of the block."""
        rip = self._rip.read()[0]
        last, size, n = self._bc_last.value, self._bc_last_size.value, self._bc_last_n.value
        idx = self._block_index(last, size, rip) if n else None
        if idx is None:
            return False
        for _, length, mnemonic, ops in self._cs_now().disasm_lite(self._block_bytes(rip, min(15, last + size - rip)),
                                                                   rip, 1):
            if mnemonic != "mov" or "ptr [" not in ops.partition(",")[0]:
                return False
            self._bc_counter.value -= n - (idx + 1)
            self._bc_last_n.value = 0
            self._skip_to = rip + length
            _lib.uc_emu_stop(self._uch)
            return True
        return False

    # ------------------------------------------------------------------ insn emulation
    # What Unicorn gets wrong in RDMSR/WRMSR/IRET, emulated at a single-address
    # code hook on each such instruction (machine/insnemu.py says what and why).
    # The hooks are added when _decode_block first sees the instruction; a hook
    # only reaches code translated after it, so that block is dropped from the
    # translation cache and restarted before any of it runs.

    # Unicorn 2.1.4's CPUX86State.features (uint64 words FEAT_1_EDX, FEAT_1_ECX,
    # FEAT_7_0_EBX, ...), measured: found after the regs at the word CPUID leaf 1
    # returns in ECX (less OSXSAVE and the hypervisor bit, which CPUID computes).
    _ENV_FEAT_1_ECX = 5640
    _CPUID_1_ECX_RDRAND = 1 << 30

    def _insn_emu_init(self) -> None:
        self.insn_emu = InsnEmu(bsp=self.bsp)
        self._emu_hooks: dict[int, int] = {}                 # address -> hook handle
        gws = _fasthooks.insn_gateways()
        self._code_gw = gws["code"]
        self._emu_cb = self._hook_emulated_insn              # one bound method: the hooks hold its address
        self._gateway_refs.append(self._emu_cb)
        env = self._vcpu_env                                  # = &env->regs[0] = the env itself
        # IRET/far RET hooks go through a C filter (every interrupt return runs
        # one): Python only for a return to an outer level with FS/GS not null.
        seg0 = env + Ctx.SEGS - Ctx.REGS
        self._iret_gw = gws["iret"]
        self._iret_ud = _fasthooks.iret_filter_new(
            _weak_method(self._emu_cb), seg0 + SEG_SIZE * Seg.FS, seg0 + SEG_SIZE * Seg.GS, env + Ctx.HFLAGS - Ctx.REGS,
            env + 8 * 4, ctypes.cast(_lib.uc_vmem_read, ctypes.c_void_p).value)
        weakref.finalize(self, _fasthooks.iret_filter_free, self._iret_ud)
        self._iret_sites: set[int] = set()
        # _FLAGS_SYNC_MNEMONICS: a C hook loads the flags into env (user data: &env->eflags)
        self._sync_gw = gws["flags_sync"]
        self._sync_ud = env + Ctx.EFLAGS - Ctx.REGS
        if Ctx.HFLAGS - Ctx.EFLAGS != 40:
            raise RuntimeError("the lazy-flags layout in machine/_fasthooks.c does not match this unicorn build")
        self._sync_sites: set[int] = set()
        seg = env + Ctx.SEGS - Ctx.REGS
        self._env_fs = (ctypes.c_uint32.from_address(seg + SEG_SIZE * Seg.FS),
                        ctypes.c_uint32.from_address(seg + SEG_SIZE * Seg.FS + 20))
        self._env_gs = (ctypes.c_uint32.from_address(seg + SEG_SIZE * Seg.GS),
                        ctypes.c_uint32.from_address(seg + SEG_SIZE * Seg.GS + 20))
        # CS's base in the live segment cache (SegmentCache: selector, base at +8): block and
        # code hooks get linear addresses, RIP is an offset in CS (real mode: an AP's trampoline).
        self._env_cs_base = ctypes.c_uint64.from_address(seg + SEG_SIZE * Seg.CS + 8)
        self._rsp = RegBatch(self.uc, [X.UC_X86_REG_RSP])
        self._hide_rdrand()
        if self._bc is None:
            # The block counter's hook is what finds new blocks, in count mode too.
            self.block_mode = True
            self.block_mode = False

    def _hide_rdrand(self) -> None:
        """Clear RDRAND from Unicorn's feature word: CPUID.1:ECX[30] reads 0 and
        the decoder raises #UD, as on QEMU's qemu64 (insnemu.py)."""
        feat = ctypes.c_uint64.from_address(self._vcpu_env + self._ENV_FEAT_1_ECX)
        # SSE3 (bit 0) and SSSE3 (bit 9) are set in Unicorn's default model: a
        # cheap check that the offset still points at FEAT_1_ECX.
        if feat.value & 0x201 != 0x201:
            raise RuntimeError("the CPUID feature offset in machine/cpu.py does not match this unicorn build")
        feat.value &= ~self._CPUID_1_ECX_RDRAND
        self.flush_translations()

    def _hook_emulated(self, addresses: list[int], pc: int, size: int) -> bool:
        """Hook the instructions at ``addresses`` not hooked yet; if any was new,
        drop the block [pc, pc+size) from the translation cache and restart it
        at ``pc`` (the block hook runs before the block's first instruction)."""
        new = [a for a in addresses if a not in self._emu_hooks]
        if not new:
            return False
        for a in new:
            h = ctypes.c_size_t()
            gw, ud = ((self._iret_gw, self._iret_ud) if a in self._iret_sites
                      else (self._sync_gw, self._sync_ud) if a in self._sync_sites
                      else (self._code_gw, id(self._emu_cb)))
            status = _lib.uc_hook_add(self.uc._uch, ctypes.byref(h), UC_HOOK_CODE, ctypes.c_void_p(gw),
                                      ctypes.c_void_p(ud), ctypes.c_uint64(a), ctypes.c_uint64(a))
            if status != 0:
                raise UcError(status)
            self._emu_hooks[a] = h.value
        self.uc.ctl_remove_cache(pc, pc + size)
        if self._running:
            # Quirk: only the stock reg_write of RIP makes Unicorn leave the
            # translation block and resume at the new RIP (uc_reg_write_batch,
            # RegBatch, does not); the block hook runs before the block's
            # first instruction, so nothing of it has run.
            self.uc.reg_write(X.UC_X86_REG_RIP, pc - self._env_cs_base.value)
        return True

    def _hook_emulated_insn(self, address: int, size: int) -> None:
        """UC_HOOK_CODE before an RDMSR, WRMSR, IRET or far RET."""
        fs_sel, fs_flags = self._env_fs
        gs_sel, gs_flags = self._env_gs
        code = self._block_bytes(address, size)
        last = code[-1:]
        if last in (b"\xcf", b"\xcb") or code[-3:-2] == b"\xca":
            # IRET / far RET.  Quirk: to an outer privilege level Unicorn zeroes
            # the base of the FS/GS it nulls; null them here (base kept, as
            # QEMU 7.2) and Unicorn leaves null selectors alone.
            if not (fs_sel.value | gs_sel.value) & 0xFFFC:
                return
            hf = self.live_hflags.value
            slot = self._iret_slot(code, hf)
            frame = ctypes.create_string_buffer(2)
            if _lib.uc_vmem_read(self.uc._uch, ctypes.c_uint64(self._rsp.read()[0] + slot), 1, frame,
                                 ctypes.c_size_t(2)) != 0:
                return                                   # Unicorn raises the fault
            new_cpl = frame.raw[0] & 3
            if new_cpl <= hf & HF.CPL_MASK:
                return
            for sel, flags in ((fs_sel, fs_flags), (gs_sel, gs_flags)):
                if iret_nulls(sel.value, flags.value, new_cpl):
                    sel.value = 0
            return
        if code[-2:] not in (b"\x0f\x32", b"\x0f\x30") or self.live_hflags.value & HF.CPL_MASK:
            return                                       # another instruction here now, or CPL > 0: #GP
        rax, rcx, rdx = self._acd.read()
        msr = rcx & 0xFFFF_FFFF
        if code[-1] == 0x30:
            self.insn_emu.wrmsr(msr, (rdx & 0xFFFF_FFFF) << 32 | rax & 0xFFFF_FFFF)
            return                                       # Unicorn's WRMSR runs (and ignores these MSRs)
        value = self.insn_emu.rdmsr(msr, self.rdtsc)
        if value is None:
            return
        self._ad.write((value & 0xFFFF_FFFF, value >> 32))
        self._skip_insn(address, size)

    @staticmethod
    def _iret_slot(code: bytes, hflags: int) -> int:
        """Stack slot size of an IRET/far RET (its operand size)."""
        rex_w = len(code) >= 2 and 0x48 <= code[-2] <= 0x4F and code[-2] & 8
        if hflags & HF.CS64 and rex_w:
            return 8
        return 2 if b"\x66" in code[:-1] else 4

    def _skip_insn(self, address: int, size: int) -> None:
        """From a code hook: the instruction at ``address`` was emulated; go on
        after it.  It retires as one instruction: count mode counted it before
        the hook; block mode counted its whole block on entry, and the rest of
        the block runs again as a new block (counted then), so take it back."""
        if self._phase1:
            last_n = self._bc_last_n.value
            idx = self._block_index(self._bc_last.value, self._bc_last_size.value, address)
            if last_n and idx is not None:
                self._bc_counter.value -= last_n - (idx + 1)
                self._bc_last_n.value = 0
        # (RIP is the offset in CS: the hooks' addresses are linear, CS base + RIP.)
        self.uc.reg_write(X.UC_X86_REG_RIP, address + size - self._env_cs_base.value)   # stock: leaves the block

    # ------------------------------------------------------------------ running
    def _stop(self, reason: Stop) -> None:
        if self._running and self._stop_reason == Stop.COUNT:
            self._stop_reason = reason
            _lib.uc_emu_stop(self._uch)

    def request_stop(self, reason: Stop = Stop.REQUEST) -> None:
        """End the running slice right after the current instruction (no-op outside a slice).

        Called from I/O, MMIO and syscall hooks (a device made an interrupt
        deliverable, a timer moved earlier, a debug exit).  Quirk: ``emu_stop``
        there is wrong both ways: in a memory hook it aborts the instruction
        after its access (RIP stays, the store runs again on resume); in an
        IN/OUT hook the next instruction is already counted.  Cutting the count
        budget to what has been counted lets the instruction complete and
        Unicorn's own count hook stop before the next one, exactly."""
        if self._running and self._stop_reason == Stop.COUNT:
            if self._phase1:
                self._stop_reason = reason
                if _MMIO_WRITING.value and self._skip_to is None and self._stop_after_store():
                    return
                self._bc_limit.value = self._bc_counter.value     # stop before the next block
                return
            c = self._counter.value
            self._budget = c
            self._emu_count.value = c
            self._stop_reason = reason

    def limit_slice(self, more: int) -> bool:
        """Let the running slice retire at most ``more`` instructions after the
        current one (a timer came due earlier, an I/O cost used up time).
        False where it cannot be done exactly (a block-mode run): the caller
        then ends the slice with :meth:`request_stop`."""
        if not self._running or self._stop_reason != Stop.COUNT:
            return True
        if self._phase1:
            return False
        new = self._counter.value + more
        if new < self._budget:
            self._budget = new
            self._emu_count.value = new
        return True

    @property
    def running(self) -> bool:
        return self._running

    def stop_after_current(self) -> None:
        """From a memory hook: end the slice right after the current instruction."""
        self.request_stop(Stop.REQUEST)

    def stop_before_current(self) -> None:
        """From a UC_HOOK_CODE callback: end the slice *before* the hooked
        instruction executes (a debugger breakpoint).  ``emu_stop`` in a code
        hook does stop before the instruction; quirk: Unicorn's count hook ran
        first and has already counted it, so take it back (exact time)."""
        if self._running and self._stop_reason == Stop.COUNT:
            self._counter.value -= 1
            self._stop_reason = Stop.REQUEST
            self.uc.emu_stop()

    def retired_in_slice(self) -> int:
        """Instructions retired so far in the running slice (exact, from Unicorn's counter)."""
        if self._phase1:
            # The block was counted whole on entry; the hook that asks runs in
            # the instruction at RIP (IN/OUT/CPUID/RDTSC and MMIO sync it), so
            # count up to and including that one, as count mode does.  In C
            # when the block's addresses are known (every RDTSC, MMIO access
            # and port access asks: Linux's delay loops make millions).
            r = _bc_retired(self._bc, self._block_insns, self._live_rip_address)
            if r is not None:
                return r
            n = self._bc_last_n.value
            if n > 1:
                idx = self._block_index(self._bc_last.value, self._bc_last_size.value, self._rip.read()[0])
                if idx is not None:
                    return self._bc_counter.value - n + idx + 1
            return self._bc_counter.value
        c = self._counter.value
        b = self._budget
        return self._phase1_done + (c if c < b else b)

    _phase1_done = 0

    def slice_source(self, ns_per_insn: int) -> Callable[[], int]:
        """The clock's view of a running slice: ns elapsed in it.  At the
        default 1 ns per instruction, retired_in_slice itself: one call less on
        every read of the time from inside a slice (each RDTSC, MMIO and port
        access)."""
        if ns_per_insn == 1:
            return self.retired_in_slice
        return lambda: self.retired_in_slice() * ns_per_insn

    def run(self, count: int) -> tuple[int, Stop]:
        """Run up to ``count`` (> 0) instructions from the current RIP.

        Afterwards ``rflags_after`` holds RFLAGS as the slice left it."""
        if count <= 0:
            raise ValueError("slice must be at least one instruction")
        self.event = None
        self.error = None
        self._stop_reason = _COUNT
        self._budget = count
        self._running = True
        self._ctx_valid = False
        uc = self.uc
        uc._hook_exception = None                 # the binding's hooks (debugger) report through it
        self._phase1_done = 0
        if self._count_slices:
            self._count_slices -= 1
        elif self._block_mode and count >= self.BLOCK_MIN and not self.precise:
            done, count = self._run_blocks(count)
            if done is not None:
                return done
            self._phase1_done = self._budget - count
            self._budget = count
            self._running = True
        if not self._tb_count_mode:
            # Quirk: blocks translated for a count=0 run have no count hook
            # and would ignore the budget (the guest runs on past deadlines).
            self.flush_translations()
            self._tb_count_mode = True
        try:
            self._emu_start(count)
        finally:
            self._running = False
            self._ctx_valid = False          # hooks may have synced mid-slice; the CPU ran on
        raw = self._counter.value
        # When the budget runs out, Unicorn's count hook has already counted the
        # instruction it stops before (raw = budget + 1); when HLT ended the
        # slice, raw is exactly what retired, even if the HLT used the last unit.
        executed = (raw if raw <= self._budget else self._budget) + self._phase1_done
        reason = self._stop_reason
        w = self._window
        if w[1]:
            w[1] = 0
            if reason is _COUNT:
                reason = Stop.REQUEST
        w[0] = 0
        if reason is _COUNT and raw <= count:
            # Nothing of ours stopped the slice: HLT retired, a debugger exit
            # address was reached, or Unicorn returned for a reason of its own.
            reason = self._early_stop_reason(executed)
        return executed, reason

    def _halt_retired(self) -> bool:
        """Did the slice that just ended stop on a retired HLT?  From the vCPU's
        own flag (CPUState.halted: HLT's helper sets it, the next emu_start
        clears it), not from "nothing of ours stopped the slice"."""
        return bool(self._vcpu_halted.value)

    def _early_stop_reason(self, executed: int) -> Stop:
        """Why a slice ended before its budget with no stop of ours recorded.

        Discussion: this used to be taken as HLT.  Any other early return of
        emu_start (a uc_emu_stop that did not come through request_stop, or a
        Unicorn exit of its own) then parked a running CPU until the next
        interrupt: it advanced one slice per timer tick and Linux reported a
        soft lockup in clear_user.  Now only a retired HLT halts; anything
        else ends the slice as a plain stop and the machine runs on.  A return
        that retired nothing would loop for ever, so it is an error."""
        if self.exit_addresses and self._rip.read()[0] in self.exit_addresses:
            return Stop.REQUEST
        if self._old_exception.value == EXC_DOUBLE_FAULT and self.fetch_fault(self._rip.read()[0]) is None:
            # Unicorn's own triple fault (a fault while it had a #DF pending:
            # it returns as if halted), not the fetch fault handled below.
            # _emu_start clears old_exception, so this would be a new quirk:
            # say so rather than run on in a loop.
            self._old_exception.value = -1
            self.error = (f"Unicorn ended the slice in a triple fault of its own at RIP {self._rip.read()[0]:#x} "
                          "(a fault while a double fault was pending, not delivered to the machine)")
            return Stop.ERROR
        if self._halt_retired():
            self.halted = True
            return _HALT
        rip = self._rip.read()[0]
        self.early_returns += 1
        self.last_early_return_rip = rip
        # Quirk (measured, block mode, ring 3): an instruction fetch from an
        # NX page can leave emu_start without calling the interrupt hook
        # (Unicorn went on to a #DF it never delivered: old_exception 8); the
        # machine's page walk says whether the fetch at RIP faults.
        ec = self.fetch_fault(rip)
        if ec is not None:
            self._sync_ctx()
            struct.pack_into("<i", self._ctx_buf, Ctx.OLD_EXCEPTION, -1)
            self.uc.context_restore(self._ctx)
            self.event = CpuEvent(14, ec, False, rip, rip, rip)
            return Stop.EVENT
        if executed == 0:
            self.error = f"Unicorn returned without running an instruction at RIP {rip:#x}"
            return Stop.ERROR
        return Stop.REQUEST

    def _emu_start(self, count: int) -> None:
        """One ``emu_start`` of ``count`` instructions (0: no count limit); an
        emulation error becomes ``Stop.ERROR`` with ``self.error`` set.

        Quirk: QEMU resets env->old_exception when it has delivered an
        exception; under Unicorn the machine delivers them, so a value left
        behind (by a fault raised outside any run, as uc_hook_del's page walk
        did: see hook_del) turned the guest's next #PF into #DF and the one
        after into a triple fault that ends emu_start without a word.
        No exception is ever being delivered when a slice starts: every slice
        starts with none."""
        self._old_exception.value = -1
        try:
            status, self.rflags_after = _run(self._uch, count, _END)
            if status:
                raise UcError(status)
            if self.uc._hook_exception is not None:
                raise self.uc._hook_exception
        except UcError as e:
            if self.error is None:
                self.error = f"{e} at RIP {self._rip.read()[0]:#x}"
            self._stop_reason = Stop.ERROR
            self.rflags_after = self._rflags.read()[0]

    def _run_blocks(self, count: int) -> tuple[tuple[int, Stop] | None, int]:
        """Block mode, phase 1: run with count=0 under the block counter.
        Returns (the slice's result, 0) when it ended here, or (None, the
        instructions left) to finish in count mode."""
        bc = self._bc
        self._bc_counter.value = 0
        self._bc_limit.value = count
        self._drop_count_hook()
        cut = False
        while True:
            self._bc_hit.value = 0
            self._bc_last_n.value = 0
            self._bc_active.value = 1
            _fasthooks.bc_select(bc)
            self._phase1 = True
            self._tb_count_mode = False
            try:
                self._emu_start(0)
            finally:
                self._phase1 = False
                self._bc_active.value = 0
                _fasthooks.bc_select(0)
                self._running = False
                self._ctx_valid = False
                if cut:
                    self._cflags_next_tb.value = _CFLAGS_NONE   # consumed by the cut block; if not, unused
            executed = self._bc_counter.value
            if (not cut and self._bc_hit.value == 1 and self._stop_reason is _COUNT
                    and self._skip_to is None and not self._window[1] and executed < count):
                # The budget stopped us before a block: run only its first
                # instructions, up to the budget (see _cut_next_block).
                cut = self._cut_next_block(count - executed)
                if cut:
                    self._running = True
                    continue
            break
        if self._skip_to is not None:
            self._rip.write((self._skip_to,))
            self._skip_to = None
        reason = self._stop_reason
        w = self._window
        if w[1]:
            w[1] = 0
            w[0] = 0
            if reason is _COUNT:
                reason = Stop.REQUEST
        if self._bc_hit.value == 2 and executed < self.BLOCK_MIN:
            # A port-I/O block came at once (a polling loop): run the next
            # slices in count mode, doubling while it goes on, so the switch
            # (a translation flush each way) is not paid per slice.
            self._count_backoff = min(2 * self._count_backoff or 1, self.COUNT_BACKOFF_MAX)
            self._count_slices = self._count_backoff
        else:
            self._count_backoff = 0
        if reason is _COUNT and self._bc_hit.value:
            if executed == count:
                return (executed, reason), 0
            # The budget stopped us before a block: finish it exactly in count
            # mode (run() flushes the count=0 translations first).
            self._running = True
            return None, count - executed
        if reason is _COUNT and executed == 0 and not self._halt_retired() and self.event is None:
            # Unicorn left the count=0 run before any block (measured: a user
            # jump to an unmapped page, whose fetch fault is raised while
            # translating): count mode runs the slice and reports it exactly.
            self._running = True
            return None, count
        if reason is _COUNT:
            reason = self._early_stop_reason(executed)
        return (executed, reason), 0

    # Discussion: the budget usually runs out a few instructions into a block
    # (the timer deadline of every slice).  Finishing those in count mode
    # costs two translation flushes per slice, and worse, a retranslation of
    # the hot code: measured on this host, a loop whose translation is fresh
    # runs at half speed for the next 1-2 ms of host time (a 1 kHz guest timer
    # then costs ~35%; dropping just the loop's translation, as a Unicorn exit
    # armed inside it would need, costs the same).  Instead the CPU asks QEMU
    # to translate the next block with at most ``left`` instructions
    # (CPUState.cflags_next_tb, QEMU's own mechanism for icount I/O
    # recompiles: the instruction limit is part of the translation's hash
    # key, so the cut translation is cached beside the full one, which stays
    # valid and hot).  The same block counter counts the cut block, and the
    # budget then refuses the block after it: the slice stops on the same
    # instruction boundary as count mode, with nothing flushed.  If the cut
    # is not taken (cflags_next_tb is consumed by the first translation
    # looked up, so it is reset after the run either way), the counter stops
    # before the full block again and count mode finishes the slice.
    @cached_property
    def _cflags_next_tb(self) -> ctypes.c_uint32:
        vcpu = ctypes.addressof(self._vcpu_halted) - _CPUSTATE_HALTED_OFF
        return ctypes.c_uint32.from_address(vcpu + _CPUSTATE_CFLAGS_NEXT_TB_OFF)

    def _cut_next_block(self, left: int) -> bool:
        """Phase 1 stopped before a block of more than ``left`` instructions
        (the C counter's memo holds it, RIP is on it): have the next
        translation there end after ``left`` instructions.  False: not here."""
        n = ctypes.c_uint32.from_address(self._bc + _BC_MEMO_N).value & ~_BC_PRECISE
        pc = ctypes.c_uint64.from_address(self._bc + _BC_MEMO_PC).value
        field = self._cflags_next_tb
        if not 0 < left < n or left > _CUT_MAX or field.value != _CFLAGS_NONE or self._rip.read()[0] != pc:
            return False
        field.value = left
        return True

    # ------------------------------------------------------------------ registers
    def reg(self, r: Reg) -> int:
        return self.uc.reg_read(r)

    def set_reg(self, r: Reg, value: int) -> None:
        self._ctx_valid = False
        self.uc.reg_write(r, value)

    @property
    def rip(self) -> int:
        return self._rip.read()[0]

    @rip.setter
    def rip(self, value: int) -> None:
        self._ctx_valid = False
        self._rip.write((value,))

    @property
    def rflags(self) -> int:
        return self._rflags.read()[0]

    @rflags.setter
    def rflags(self, value: int) -> None:
        self._ctx_valid = False
        self._rflags.write((value,))

    def cs_and_rflags(self) -> tuple[int, int]:
        cs, fl = self._cs_rflags.read()
        return cs, fl

    def interrupts_enabled(self) -> bool:
        return bool(self._rflags.read()[0] & EFLAGS.IF)

    # ------------------------------------------------------------------ context fields
    def _sync_ctx(self) -> None:
        # The copy stays valid until the CPU runs or a register is written
        # through this class (every write path clears _ctx_valid).
        # Inside a slice (hooks) the guest moves on between calls: always copy.
        if self._running or not self._ctx_valid:
            self.uc.context_update(self._ctx)
            self._ctx_valid = not self._running

    def ctx_read(self):
        """A fresh copy of the CPU state, addressed with :class:`Ctx` offsets."""
        self._sync_ctx()
        return self._ctx_buf

    def invalidate_ctx(self) -> None:
        """Registers were changed behind this class's back (uc.reg_write): drop the copy."""
        self._ctx_valid = False

    def hflags(self) -> int:
        self._sync_ctx()
        return _u32(self._ctx_buf, Ctx.HFLAGS)

    def in_interrupt_shadow(self) -> bool:
        """STI / MOV SS shadow: the next instruction runs before any interrupt (hflags bit 3)."""
        return bool(self.hflags() & HF.INHIBIT_IRQ)

    def cpl(self) -> int:
        return self.hflags() & HF.CPL_MASK

    def long_mode(self) -> bool:
        return bool(self.hflags() & HF.LMA)

    def seg_cache(self, seg: Seg | int) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) from the hidden segment cache."""
        self._sync_ctx()
        return _seg_at(self._ctx_buf, Ctx.SEGS + SEG_SIZE * seg)

    def table_regs(self) -> dict[str, tuple[int, int, int, int]]:
        self._sync_ctx()
        b = self._ctx_buf
        return {"gdt": _seg_at(b, Ctx.GDT), "idt": _seg_at(b, Ctx.IDT),
                "tr": _seg_at(b, Ctx.TR), "ldt": _seg_at(b, Ctx.LDT)}

    def set_hidden_state(self, *, cpl: int | None = None,
                         segs: dict[int, tuple[int, int, int, int]] | None = None,
                         hflags_set: int = 0, hflags_clear: int = 0) -> None:
        """Patch CPL, segment caches and hflags in the context and load it.

        Quirk: in UC_MODE_64 reg_write(CS/SS) stores only the selector; the
        privilege level lives in hflags and the descriptor cache (notes §2.3).
        """
        self._sync_ctx()
        b = self._ctx_buf
        hf = _u32(b, Ctx.HFLAGS)
        if cpl is not None:
            hf = (hf & ~HF.CPL_MASK) | (cpl & 3)
        hf = (hf | hflags_set) & ~hflags_clear
        struct.pack_into("<I", b, Ctx.HFLAGS, hf & 0xFFFF_FFFF)
        for seg, (sel, base, limit, flags) in (segs or {}).items():
            off = Ctx.SEGS + SEG_SIZE * seg
            struct.pack_into("<I", b, off, sel)
            struct.pack_into("<QII", b, off + 8, base, limit, flags)
        self.uc.context_restore(self._ctx)

    def attach_ram(self, host_address: int, size: int) -> None:
        """Where guest RAM (physical 0..size) lives in this process: the delivery fast path writes there."""
        self._ram = (host_address, size)

    def interrupt_window(self) -> int:
        """0: RFLAGS.IF=0; 1: IF=1 but the STI/MOV SS shadow holds; 2: an interrupt can be taken now."""
        w = _window(self._uch, self._ctx_addr)
        self._ctx_valid = True                  # the C side saved the context into our buffer
        return w

    def deliver_fast(self, vector: int, error_code: int | None) -> bool:
        """The common delivery in C (_fasthooks.deliver64): long mode, a valid
        64-bit gate, same privilege, no IST.  False: nothing was changed, take
        the general path (which also raises the faults)."""
        host, size = self._ram
        done = not _deliver64(self._uch, self._ctx_addr, host, size, vector, error_code or 0,
                              error_code is not None, self._ctx_valid)
        self._ctx_valid = not done              # not delivered: the context was saved and still holds
        return done

    def write_frame_regs(self, rip: int, rsp: int, rflags: int) -> None:
        self._ctx_valid = False
        self._frame_regs.write((rip, rsp, rflags))

    def read_frame_regs(self) -> tuple[int, int, int]:
        rip, rsp, rflags = self._frame_regs.read()
        return rip, rsp, rflags

    def commit_hidden(self, *, rip: int, rsp: int, rflags: int, cpl: int,
                      segs: dict[int, tuple[int, int, int, int]], hflags_set: int = 0,
                      hflags_clear: int = 0) -> None:
        """Enter a handler that changes CS (and maybe SS/CPL): hidden state, then RIP/RSP/RFLAGS."""
        self.set_hidden_state(cpl=cpl, segs=segs, hflags_set=hflags_set, hflags_clear=hflags_clear)
        self._ctx_valid = False
        self._frame_regs.write((rip, rsp, rflags))

    # ------------------------------------------------------------------ SYSCALL
    def _architectural_syscall(self) -> None:
        """SYSCALL as the SDM defines it (Unicorn only calls the hook, then RIP += 2)."""
        uc = self.uc
        rip = self._rip.read()[0]
        if not uc.msr_read(MSR_EFER) & EFER_SCE:
            # SDM: SYSCALL with EFER.SCE=0 is #UD (Unicorn executes it regardless).
            self.event = CpuEvent(6, None, False, rip, rip)
            self.request_stop(Stop.EVENT)
            return
        rflags = self._rflags.read()[0]
        star = uc.msr_read(MSR_STAR)
        lstar = uc.msr_read(MSR_LSTAR)
        fmask = uc.msr_read(MSR_FMASK)
        uc.reg_write(X.UC_X86_REG_RCX, rip + 2)
        uc.reg_write(X.UC_X86_REG_R11, rflags)
        self._rflags.write((rflags & ~fmask & ~EFLAGS.RF,))
        cs = (star >> 32) & 0xFFFC
        self.set_hidden_state(cpl=0, segs={
            Seg.CS: (cs, 0, 0xFFFF_FFFF, _CS64_FLAGS),
            Seg.SS: (cs + 8, 0, 0xFFFF_FFFF, _DATA_FLAGS),
        }, hflags_set=HF.CS64 | HF.SS32, hflags_clear=HF.CS32)
        # Quirk: Unicorn adds 2 to whatever RIP the hook leaves.
        self._rip.write(((lstar - 2) & 0xFFFF_FFFF_FFFF_FFFF,))

    # ------------------------------------------------------------------ TLB
    def flush_tlb(self) -> None:
        """Quirk: page-table edits from Python are invisible until the TLB is
        flushed; rewriting CR3 with its own value flushes it (notes §1)."""
        self.uc.reg_write(X.UC_X86_REG_CR3, self.uc.reg_read(X.UC_X86_REG_CR3))


# Descriptor-cache flag words (QEMU layout: the descriptor's high dword).
_CS64_FLAGS = 0x00A09B00      # P, DPL0, S, code exec/read accessed, L=1, G
_DATA_FLAGS = 0x00CF9300      # P, DPL0, S, data r/w accessed, B=1, G


def _open_bus_read(offset: int, size: int) -> int:
    return 0


def _open_bus_write(offset: int, size: int, value: int) -> None:
    pass


def _u32(b, off: int) -> int:
    return struct.unpack_from("<I", b, off)[0]


def _i32(b, off: int) -> int:
    return struct.unpack_from("<i", b, off)[0]


def _u64(b, off: int) -> int:
    return struct.unpack_from("<Q", b, off)[0]


def _seg_at(b, off: int) -> tuple[int, int, int, int]:
    sel = struct.unpack_from("<I", b, off)[0]
    base, limit, flags = struct.unpack_from("<QII", b, off + 8)
    return sel, base, limit, flags
