"""Several CPUs on one machine (``MachineConfig.cpus`` > 1, ``vmk boot --smp N``).

How it works
------------
Each CPU is its own Unicorn instance (:class:`~vmk.machine.cpu.CPU`) mapping
the same host RAM (``mem_map_ptr`` on the one buffer), with its own local
APIC mapped at 0xFEE00000 in its own Unicorn; the other MMIO windows and the
port bus are shared.  APIC IDs are 0..N-1, as the MP table and the MADT list
them; CPU 0 is the bootstrap processor.  The local APICs talk through the
APIC bus (machine/devices/apicbus.py), which also carries the IO-APIC's
messages to the APIC(s) their destination names.

Time (Discussion).  Virtual time is one clock, and the CPUs take turns on one
host thread, round-robin in CPU order, each for a *turn* of
``MachineConfig.smp_quantum_ns`` of virtual time (default 10 us = 10,000
instructions at 1 ns each) or until it halts: the clock advances with the
instructions of whichever CPU runs, as QEMU's ``-icount`` does with
``-smp``, so N busy CPUs each run at 1/N of the instruction rate in virtual
time.  Timers still fire exactly (every slice is cut at the next deadline,
as on one CPU) and a halted CPU costs nothing: its turn is skipped; when
every CPU is halted or waits for SIPI the clock jumps to the next deadline.
One thread also keeps ``lock``-prefixed instructions atomic (two Unicorn
instances in two threads lose increments: notes/unicorn.md §6).

An IPI is in the target APIC when the sender's ICR write returns; the
target takes it at the start of its next turn (the latest is one round:
N-1 turns).  Since the order of turns, their lengths and every stop are
functions of the instruction stream, two runs are identical, instruction
for instruction.

APs and INIT-SIPI-SIPI (SDM vol. 3, §9.4 "Multiple-processor (MP)
initialization"; §11.6.1 ICR).  An AP starts in wait-for-SIPI and is never
run in that state.  INIT (any time) resets its APIC and puts it back into
wait-for-SIPI; STARTUP with vector VV starts a waiting AP in real mode at
CS = VV00h (base VV000h, limit FFFFh), IP = 0, with the register state the
SDM gives after INIT (Table 10-1/9-1: CR0 = 60000010h, EFLAGS = 2, EDX = the
processor signature, everything else 0, EFER = 0); STARTUP to a CPU that does
not wait is ignored.  Measured: a UC_MODE_64 instance patched into real mode
this way runs 16-bit code, switches to protected mode (lgdt, CR0.PE, ljmp)
and to long mode (CR4.PAE, CR3, EFER.LME, CR0.PG, ljmp to a 64-bit CS) as a
real AP trampoline does (tests/machine/test_smp.py), so APs need no
UC_MODE_16 instance, and every register read works in every mode.

Cross-modifying code.  A Unicorn instance does not see other instances'
writes to code it has already translated (notes/unicorn.md §6).  The SDM's
protocol for cross-modifying code (§9.1.3) has the modifying CPU signal the
executing ones, which then serialize; Linux does it with an IPI.  So a CPU
that receives an IPI from another CPU drops its translations before its next
slice, and so does a CPU started by SIPI.  Code written by one CPU and run
by another that already ran it, with no IPI in between, stays stale (a
documented limit).  Page tables are per CPU as on hardware: a PTE change
needs ``invlpg`` (a TLB shootdown) on each CPU.

Not modelled: NMI delivery into the guest (an NMI message sets the target
APIC's ``nmi_pending`` as on one CPU), INIT to the BSP (logged: there is no
BIOS to reset into), SMI.  The debugger (machine/debug.py) sees every CPU; a single step
runs only the stepped CPU (``Machine.run_only``), the others stay stopped.
"""
from __future__ import annotations

import ctypes
import struct
from enum import Enum
from typing import TYPE_CHECKING

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as X

from .clock import cannot_shorten
from .cpu import CPU, EFLAGS, HF, Reg, Seg, Stop
from .devices.lapic import LocalAPIC
from .x86 import IdtSink

if TYPE_CHECKING:
    from .pc import Machine, RunResult

__all__ = ["Processor", "ApState", "MAX_CPUS", "SMP_QUANTUM_NS", "start_at_sipi", "native_cpuid", "cpuid_leaf1", "run"]

# xAPIC: 8-bit APIC IDs, 0xFF is the broadcast destination (SDM §11.6.2.1), so
# IDs 0..254; the MP table's and MADT's processor entries have 8-bit IDs too.
MAX_CPUS = 255
SMP_QUANTUM_NS = 10_000          # one CPU's turn: 10 us of virtual time

# Offset of EFER in Unicorn 2.1.4's saved x86-64 context (measured: the only
# qword that changes when IA32_EFER is written; tests/machine/test_smp.py
# re-checks it).  Quirk: wrmsr/msr_write cannot clear EFER.LMA, which a
# UC_MODE_64 instance starts with; an AP in real mode must not have it.
CTX_EFER = 632

CR0_AFTER_INIT = 0x6000_0010    # CD, NW, ET (SDM Table 10-1 / 9-1)
_REAL_CS_FLAGS = 0x9B << 8      # present, code, readable, accessed (QEMU's real-mode descriptor cache)
_REAL_DATA_FLAGS = 0x93 << 8    # present, data, writable, accessed
_REAL_LIMIT = 0xFFFF


class ApState(Enum):
    """Where a CPU is in the MP initialization protocol (SDM §9.4)."""
    RUNNING = "running"
    WAIT_FOR_SIPI = "wait-for-sipi"


class Processor:
    """One CPU of the machine: its Unicorn CPU, local APIC and IDT sink."""

    __slots__ = ("index", "cpu", "lapic", "idt", "sink", "state", "instructions", "flush_pending", "sipis")

    def __init__(self, index: int, cpu: CPU, lapic: LocalAPIC, idt: IdtSink) -> None:
        self.index = index
        self.cpu = cpu
        self.lapic = lapic
        self.idt = idt
        self.sink = idt
        self.state = ApState.RUNNING if index == 0 else ApState.WAIT_FOR_SIPI
        self.instructions = 0                 # retired by this CPU
        self.flush_pending = False            # drop translations before the next slice
        self.sipis = 0                        # STARTUP messages that started this CPU


def native_cpuid(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
    """What Unicorn's own CPUID returns for ``leaf`` (run once on a scratch instance)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x1000, 0x1000, UC_PROT_ALL)
    uc.mem_write(0x1000, b"\x0f\xa2")                  # cpuid
    uc.reg_write(X.UC_X86_REG_RAX, leaf)
    uc.reg_write(X.UC_X86_REG_RCX, sub)
    uc.emu_start(0x1000, 0x1002)
    return tuple(uc.reg_read(r) & 0xFFFF_FFFF for r in (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX,  # type: ignore[return-value]
                                                          X.UC_X86_REG_RCX, X.UC_X86_REG_RDX))


CPUID1_ECX_OSXSAVE = 1 << 27       # SDM vol. 2A, CPUID leaf 1 ECX: reflects CR4.OSXSAVE
CPUID1_ECX_RDRAND = 1 << 30
CR4_OSXSAVE = 1 << 18


def cpuid_leaf1(native: tuple[int, int, int, int], cpu: CPU) -> tuple[int, int, int, int]:
    """CPUID leaf 1 executed by ``cpu``, from ``native`` (a scratch
    instance's :func:`native_cpuid`): what a one-CPU machine's CPU returns, with
    EBX[31:24] = the initial APIC ID.  As on that CPU, RDRAND is hidden (machine/cpu.py
    ``_hide_rdrand``: the decoder raises #UD for it) and OSXSAVE is CR4.OSXSAVE of the
    executing CPU (the scratch instance reports both set; Linux's KASLR used RDRAND
    because of it and took #UD)."""
    a, b, c, d = native
    c &= ~(CPUID1_ECX_RDRAND | CPUID1_ECX_OSXSAVE)
    if cpu.uc.reg_read(X.UC_X86_REG_CR4) & CR4_OSXSAVE:
        c |= CPUID1_ECX_OSXSAVE
    return a, (b & 0x00FF_FFFF) | ((cpu.apic_id & 0xFF) << 24), c, d


def start_at_sipi(cpu: CPU, vector: int, signature: int) -> None:
    """Load the state a STARTUP IPI with ``vector`` gives a CPU that waited for
    SIPI: real mode at VV00:0000, the rest as after INIT (SDM Table 10-1/9-1)."""
    uc = cpu.uc
    uc.reg_write(X.UC_X86_REG_CR4, 0)
    uc.reg_write(X.UC_X86_REG_CR0, CR0_AFTER_INIT)
    uc.reg_write(X.UC_X86_REG_CR3, 0)
    uc.reg_write(X.UC_X86_REG_CR2, 0)
    uc.msr_write(0xC000_0080, 0)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, 0, _REAL_LIMIT, 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, 0, _REAL_LIMIT, 0))
    data = (0, 0, _REAL_LIMIT, _REAL_DATA_FLAGS)
    # Quirk: a UC_MODE_64 instance goes to real mode by clearing PE, LMA, CS64
    # and the 32-bit flags in hflags, with real-mode segment caches (as the
    # multiboot entry drops to 32-bit mode, boot/loader.py).
    cpu.set_hidden_state(cpl=0, segs={
        Seg.CS: ((vector & 0xFF) << 8, (vector & 0xFF) << 12, _REAL_LIMIT, _REAL_CS_FLAGS),
        Seg.SS: data, Seg.DS: data, Seg.ES: data, Seg.FS: data, Seg.GS: data,
    }, hflags_set=HF.ADDSEG, hflags_clear=HF.LMA | HF.CS64 | HF.CS32 | HF.SS32 | HF.PE)
    ctx = uc.context_save()
    ctypes.c_uint64.from_address(ctypes.cast(ctx.context, ctypes.c_void_p).value + CTX_EFER).value = 0
    uc.context_restore(ctx)
    for r in (Reg.RAX, Reg.RBX, Reg.RCX, Reg.RSI, Reg.RDI, Reg.RBP, Reg.RSP,
              Reg.R8, Reg.R9, Reg.R10, Reg.R11, Reg.R12, Reg.R13, Reg.R14, Reg.R15):
        uc.reg_write(r, 0)
    uc.reg_write(Reg.RDX, signature)
    cpu.invalidate_ctx()
    cpu.rflags = 0x2
    cpu.rip = 0
    cpu.halted = False
    cpu.flush_translations()
    cpu.flush_tlb()


def efer_from_context(cpu: CPU) -> int:
    return struct.unpack_from("<Q", bytes(cpu.uc.context_save()), CTX_EFER)[0]


_IF = int(EFLAGS.IF)


def _nothing() -> None:
    return None


def run(m: "Machine", until: int | None, max_instructions: int | None) -> "RunResult":
    """The multi-CPU event loop: CPUs take turns (see the module docstring)."""
    from .pc import RunResult, Why            # pc.py imports this module
    clock = m.clock
    nspi = m.ns_per_insn
    turn_ns = m.config.smp_quantum_ns
    procs = m.processors if m.run_only is None else [m.run_only]     # a debugger step runs one CPU
    insn_limit = None if max_instructions is None else m.instructions + max_instructions
    m._stop_requested = None
    # Discussion: a run that ended inside a CPU's turn (a time limit, a
    # breakpoint, a stop) resumes inside that turn, with the same end, and the
    # round goes on from there: a run cut into pieces (Harness.run_for in
    # steps, the debugger, the CLI's pauses for host input) interleaves the
    # CPUs as the same run in one piece.  A debugger step of one CPU leaves
    # the place as it is.
    resume, m.turn_at = (m.turn_at, None) if m.run_only is None else (None, m.turn_at)
    try:
        # This is our event loop: one round = one turn of every CPU.
        while True:
            for p in procs:
                turn_end = None
                if resume is not None:
                    if p.index < resume[0]:
                        continue                 # had its turn in this round already
                    if p.index == resume[0]:
                        turn_end = resume[1]
                    resume = None
                if p.state is not ApState.RUNNING:
                    continue
                m._select(p)
                if turn_end is None:
                    turn_end = clock._base + turn_ns
                r = _turn(m, p, until, insn_limit, turn_end, nspi)
                if r is not None:
                    m.turn_at = (p.index, turn_end)
                    return r
            clock.run_due()
            if m._stop_requested is not None:
                return m._stopped()
            if any(_can_run(p) for p in procs):
                continue
            now = clock._base
            if until is not None and now >= until:
                return RunResult(Why.TIME_LIMIT, f"virtual time limit reached at {now} ns")
            if all(p.state is not ApState.RUNNING or not p.cpu.rflags & _IF for p in procs):
                m._select(procs[0])
                m._drain()
                if m._stop_requested is not None:
                    return m._stopped()
                return RunResult(Why.DEAD, f"every CPU is halted with interrupts disabled or waits for SIPI, "
                                 f"t={clock.now} ns: nothing can wake them")
            m._select(procs[0])
            r = m._idle(clock.next_deadline(), until)
            if r is not None:
                return r
    except KeyboardInterrupt:
        return RunResult(Why.INTERRUPTED, f"interrupted at t={clock.now} ns")
    finally:
        m._select(m.processors[0])
        clock.preempt = _nothing
        clock.shorten = cannot_shorten


def _can_run(p: Processor) -> bool:
    """Will this CPU do something in its next turn (run, or take an interrupt that wakes it)?"""
    if p.state is not ApState.RUNNING:
        return False
    cpu = p.cpu
    if not cpu.halted or cpu.event is not None:
        return True
    return p.lapic.pending() and bool(cpu.rflags & _IF)


def _turn(m: "Machine", p: Processor, until: int | None, insn_limit: int | None, turn_end: int,
          nspi: int) -> "RunResult | None":
    """Run CPU ``p`` until virtual time ``turn_end``, the end of its turn; a RunResult ends the whole run."""
    from .pc import _HALT, _SHADOW, RunResult, Why
    cpu = p.cpu
    lapic = p.lapic
    clock = m.clock
    in_slice = cpu.slice_source(nspi)
    while True:
        cpu.invalidate_ctx()
        clock.run_due()
        if m._stop_requested is not None:
            return m._stopped()
        if p.state is not ApState.RUNNING:
            return None                        # INIT from a device callback (not from an IPI: those come from CPUs)
        if cpu.event is not None:
            r = m._take_event()
            if r is not None:
                return r
            continue
        shadow = False
        if lapic.pending() and not m.hold_interrupts:
            r = m._take_interrupt()
            if r is _SHADOW:
                shadow = True
            elif r is not None:
                return r
            elif m._stop_requested is not None:
                return m._stopped()
            elif lapic.pending() and not (cpu.rflags & _IF):
                cpu.arm_interrupt_window()
            elif cpu.halted and lapic.pending():
                continue
        now = clock._base
        if until is not None and now >= until:
            return RunResult(Why.TIME_LIMIT, f"virtual time limit reached at {now} ns")
        if cpu.halted or now >= turn_end:
            return None
        if p.flush_pending:
            p.flush_pending = False
            cpu.flush_translations()
        budget = 1 if shadow else -(-(turn_end - now) // nspi)
        deadline = clock.next_deadline()
        limit = deadline
        if deadline is not None:
            n = -(-(deadline - now) // nspi)
            if n < budget:
                budget = n if n > 1 else 1
        if until is not None:
            n = -(-(until - now) // nspi)
            if n < budget:
                budget = n if n > 1 else 1
            if limit is None or until < limit:
                limit = until
        if insn_limit is not None:
            if m.instructions >= insn_limit:
                return RunResult(Why.STOPPED, "instruction limit reached")
            budget = min(budget, insn_limit - m.instructions)
        if m.slice_limit is not None:
            lim = m.slice_limit()
            if lim is not None:
                budget = min(budget, lim)
        clock.begin_slice(in_slice, now + budget * nspi, limit)
        try:
            executed, why = cpu.run(budget)
        except BaseException:
            clock.end_slice(cpu.retired_in_slice() * nspi)
            raise
        clock.end_slice(executed * nspi)
        m.instructions += executed
        p.instructions += executed
        if why is _HALT:
            pass                               # halted (with IF=0 too: another CPU may still INIT it)
        elif why == Stop.ERROR:
            return RunResult(Why.ERROR, f"CPU {p.index}: {cpu.error}, t={clock.now} ns")
        if m.after_slice is not None:
            m.after_slice()
        if m._pollers:
            m._poll_host(False)
