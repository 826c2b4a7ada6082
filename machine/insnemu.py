"""Instructions Unicorn 2.1.4 gets wrong, and what the CPU does instead (issue 12).

How it works
------------
Unicorn cannot hook RDMSR, WRMSR or IRET.  When the CPU decodes a new
translation block (``CPU._decode_block``, which block mode already runs for
every block, and count mode now too), each of these instructions gets a
single-address ``UC_HOOK_CODE`` (C gateway ``_fasthooks.gw_code``); the block is
dropped from the translation cache and restarted, so the hook applies before
the instruction ever runs.  The hook runs *before* the instruction and decides:

* ``RDMSR`` at CPL 0 of an MSR in :data:`EMULATED_RDMSR`: EDX:EAX is loaded
  here and RIP skips the instruction (one retired instruction in both run
  modes; block mode takes back the rest of its block, which runs again as a
  new block).  Other MSRs, and CPL > 0 (#GP), are left to Unicorn.
* ``WRMSR`` at CPL 0 of IA32_APIC_BASE: the value is kept here, then Unicorn
  executes the instruction (it ignores that MSR).
* ``IRET`` / far ``RET`` to an outer privilege level: see :func:`iret_nulls`.

Facts (measured with tests/guest/cpuemu.c on Unicorn 2.1.4 and on QEMU 7.2
TCG, ``-cpu qemu64``):

* IA32_APIC_BASE (0x1B) reads 0 on Unicorn and ignores writes; QEMU reads
  0xFEE00900 (base 0xFEE00000, EN bit 11, BSP bit 8) and keeps a written value.
* IA32_TSC (0x10) reads 0 on Unicorn *and on QEMU 7.2 TCG*; the SDM (vol. 3
  §17.17) says it is the time-stamp counter.  vmk follows the SDM: it reads
  the virtual-time TSC, as RDTSC does at that instruction.
* RDRAND and RDSEED: QEMU's qemu64 advertises neither, and both raise #UD.
  Unicorn advertises RDRAND (host randomness: runs were not reproducible) and
  not RDSEED (which raises #UD).  The CPU clears RDRAND from Unicorn's own
  feature word (``CPU._hide_rdrand``), so CPUID.1:ECX[30] reads 0 and
  Unicorn's decoder raises #UD, exactly as on a CPU without it; no random
  source is needed.
* IRET to CPL 3 with a ring-0 data selector in FS or GS: the SDM (vol. 2A,
  IRET, RETURN-TO-OUTER-PRIVILEGE-LEVEL) nulls the selector; QEMU 7.2 keeps
  the segment base (ring 3 still reads through IA32_FS_BASE/IA32_GS_BASE),
  Unicorn zeroes it (Loko Scheme's ring-3 scheduler died on it).  With a null
  FS/GS selector Unicorn already keeps the base.

Not modelled: moving the xAPIC (a new base in IA32_APIC_BASE is kept and read
back, the LAPIC stays at 0xFEE00000) and disabling it through EN (kept and
read back, the LAPIC keeps working); each is logged once.  Writes to IA32_TSC
are ignored (the TSC is virtual time).  IA32_TSC_DEADLINE is not emulated
(CPUID.1:ECX[24] is 0).  x2APIC (EXTD, bit 10) is not advertised: the bit is
reserved and dropped from writes, as are the other reserved bits.
"""
from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Callable

__all__ = ["InsnEmu", "MSR", "ApicBase", "APIC_BASE_RESET", "EMULATED_MNEMONICS", "iret_nulls", "IRET_MNEMONICS"]


class MSR(IntEnum):
    """SDM vol. 4, table 2-2."""
    TSC = 0x10
    APIC_BASE = 0x1B


class ApicBase(IntFlag):
    """IA32_APIC_BASE bits (SDM vol. 3 §11.4.4, Figure 11-5)."""
    BSP = 1 << 8          # processor is the BSP (read-only)
    EXTD = 1 << 10        # x2APIC mode (reserved here: x2APIC is not advertised)
    EN = 1 << 11          # xAPIC global enable


APIC_DEFAULT_BASE = 0xFEE0_0000
APIC_BASE_RESET = APIC_DEFAULT_BASE | ApicBase.EN | ApicBase.BSP    # 0xFEE00900, as QEMU
PHYS_ADDR_BITS = 40                                                 # CPUID 0x80000008 of qemu64
APIC_BASE_FIELD = ((1 << PHYS_ADDR_BITS) - 1) & ~0xFFF              # bits 12..MAXPHYADDR-1

# Mnemonics (capstone) of the instructions the CPU hooks.
IRET_MNEMONICS = frozenset({"iretq", "iretd", "iret", "retf", "retfq"})
EMULATED_MNEMONICS = frozenset({"rdmsr", "wrmsr"}) | IRET_MNEMONICS

# Descriptor-cache flag bits (QEMU layout: the descriptor's high dword).
DESC_DPL_SHIFT = 13
DESC_CS = 1 << 11         # code segment
DESC_C = 1 << 10          # conforming (code)


def iret_nulls(selector: int, flags: int, new_cpl: int) -> bool:
    """Does an IRET (or far RET) to ``new_cpl`` null this data segment register?

    SDM vol. 2A, IRET, RETURN-TO-OUTER-PRIVILEGE-LEVEL: a data or non-conforming
    code segment whose DPL is below the new CPL gets the null selector.  (A null
    selector stays null: Unicorn already keeps the base then.)"""
    if not selector & 0xFFFC:
        return False
    if flags & DESC_CS and flags & DESC_C:
        return False
    return (flags >> DESC_DPL_SHIFT) & 3 < new_cpl


class InsnEmu:
    """The MSR state Unicorn does not keep, and the values the hooks load."""

    def __init__(self, log: Callable[[str], None] | None = None, bsp: bool = True) -> None:
        self.log: Callable[[str], None] = log or (lambda msg: None)
        self._logged: set[str] = set()
        # An AP's IA32_APIC_BASE has the BSP bit clear (0xFEE00800), SDM §10.4.4.
        self._reset_value = int(APIC_BASE_RESET) if bsp else int(APIC_BASE_RESET) & ~int(ApicBase.BSP)
        self.apic_base = self._reset_value

    def reset(self) -> None:
        self.apic_base = self._reset_value

    def _log_once(self, key: str, msg: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            self.log(msg)

    def rdmsr(self, msr: int, tsc: Callable[[], int]) -> int | None:
        """The value of an emulated MSR, or None (Unicorn's own RDMSR runs)."""
        if msr == MSR.APIC_BASE:
            return self.apic_base
        if msr == MSR.TSC:
            return tsc() & 0xFFFF_FFFF_FFFF_FFFF
        return None

    def wrmsr(self, msr: int, value: int) -> None:
        """Keep a write to an emulated MSR (Unicorn ignores them)."""
        if msr == MSR.APIC_BASE:
            keep = value & (APIC_BASE_FIELD | ApicBase.EN)
            if value & ~(APIC_BASE_FIELD | ApicBase.EN | ApicBase.BSP):
                self._log_once("reserved", f"IA32_APIC_BASE write {value:#x} sets reserved bits (dropped)")
            if keep & APIC_BASE_FIELD != APIC_DEFAULT_BASE:
                self._log_once("moved", f"IA32_APIC_BASE moves the LAPIC to {keep & APIC_BASE_FIELD:#x}: "
                                        "not modelled, it stays at 0xfee00000")
            if not keep & ApicBase.EN:
                self._log_once("disabled", "IA32_APIC_BASE.EN cleared: not modelled, the LAPIC keeps working")
            self.apic_base = keep | (self.apic_base & ApicBase.BSP)
        elif msr == MSR.TSC:
            self._log_once("tsc", "a write to IA32_TSC is ignored (the TSC is virtual time)")
