"""Local APIC (xAPIC, MMIO mode), one per CPU.

Section numbers refer to the Intel SDM Vol. 3A, chapter "Advanced Programmable
Interrupt Controller (APIC)" (chapter 11 since 2023, chapter 10 before; the
section numbers inside the chapter are the same).

How it works
------------
The register window is 4 KiB at :data:`APIC_BASE`.  Registers are 32 bits wide
on 16-byte strides (§11.4.1, Table 11-1); anything but an aligned 4-byte
access is logged and ignored (reads return 0), as QEMU drops sub-dword
accesses.  An access to an offset that names no register sets ESR bit 7
"illegal register address", as on QEMU.

Interrupt state is three 256-bit vectors kept as Python ints: IRR (requested),
ISR (in service) and TMR (trigger mode of each accepted vector).  Fixed-mode
messages (the IO-APIC, self-IPIs, the timer, LINT pins in fixed mode) enter
through :meth:`LocalAPIC.accept`.  The CPU side is two calls the machine makes
between instruction slices:

* :meth:`~LocalAPIC.pending` -- is there something to present now?  Either an
  ExtINT request (LINT0 unmasked in ExtINT mode with the PIC's INTR high), or
  the highest IRR vector whose priority class is above PPR's, with the APIC
  software-enabled.  ExtINT is checked first and ignores priorities, as in
  QEMU's ``apic_get_interrupt``.
* :meth:`~LocalAPIC.acknowledge` -- the INTA cycle.  ExtINT asks the PIC
  (``extint_ack``, wired by the machine) for the vector and leaves IRR/ISR
  alone; otherwise the vector moves IRR -> ISR.  If nothing is deliverable any
  more the spurious vector (SVR[7:0]) comes back and ISR is untouched.

``on_change()`` is called whenever :meth:`pending` may have become true (or an
NMI was recorded): the machine uses it to end the running slice so the
interrupt is taken at the next instruction boundary.  It may be called while
an interrupt was already pending; it is never called from ``pending`` or
``acknowledge``.

The timer counts APIC bus ticks (QEMU's: 1 ns each) divided by the divide
configuration.  The current count is computed from ``clock.now - load_time``;
one :class:`~vmk.machine.clock.Timer` is armed for the next expiry only.  An
initial count N gives an interrupt N divided ticks after the write, when the
count reaches 0 (§11.5.4); in periodic mode the count reloads to N at that
moment and the period is N divided ticks.  (QEMU fires one tick later, after
N+1 ticks, and its periodic count passes through 0; we follow the SDM.)

Invariants
----------
* IRR, ISR and TMR never hold vectors 0-15 (they are refused with ESR bit 6).
* While SVR.8 (software enable) is clear, every LVT mask bit is set and
  cannot be cleared (§11.4.7.2).  The one exception is the reset state, which
  copies QEMU's ``apic_reset_common`` for the BSP: LINT0 = 0x700 (ExtINT,
  unmasked, what the BIOS leaves behind) with SVR = 0xFF, so PIC interrupts
  reach the CPU before the guest touches the APIC.
* ``_timer_deadline`` is the deadline the timer is armed for, or None; it is
  saved in snapshots (like QEMU's ``timer_expiry``) because after a divider
  change it cannot be derived from the registers.
* ``_update_irq`` is the one place that signals the CPU (``on_change``).

Not modelled
------------
* The IA32_APIC_BASE MSR: Unicorn cannot trap RDMSR/WRMSR of it, so the APIC
  is fixed at 0xFEE00000 and globally enabled; x2APIC mode does not exist.
* Other CPUs, when the APIC is alone (``bus`` None, a one-CPU machine):
  INIT, SIPI, SMI and IPIs whose destination is not this APIC are logged
  ("not modelled (single CPU)").  With a bus (``machine/devices/apicbus.py``,
  ``--smp N``) the ICR's message goes to the bus, which resolves the
  destination and delivers it to every APIC it names, this one included.
  Lowest-priority arbitration is the bus's (deterministic); APR (reads 0),
  RRD (reads 0), focus checking (SVR.9 is stored only).
* TSC-deadline timer mode (IA32_TSC_DEADLINE cannot be trapped either): a
  write selecting it is logged, the timer stays idle, the current count reads
  0 and initial-count writes are ignored, as the SDM says for that mode.
* CMCI: the version register advertises 6 LVT entries (max LVT index 5, as on
  QEMU), so 0x2F0 is not a register.  Thermal and performance-counter LVTs are
  stored but nothing ever raises them.  EOI-broadcast suppression (version
  bit 24 clear), the CR8 alias of TPR (the machine must sync it if wanted).
* LVT delivery-status and ICR delivery-status bits always read 0: messages
  are delivered at once (an IPI is in the target's IRR, or has reset or
  started the target CPU, when the ICR write returns), so the "send pending"
  state a guest polls for (§11.6.1, bit 12) is never seen.  LINT polarity (bit 13) is stored only: the inputs
  are given as logical assert levels, as on QEMU.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Callable

from vmk.machine.clock import Clock
from vmk.machine.devices import Log, nolog

__all__ = [
    "LocalAPIC",
    "APIC_BASE",
    "APIC_WINDOW",
    "Reg",
    "Lvt",
    "LvtBit",
    "DeliveryMode",
    "TimerMode",
    "Svr",
    "Esr",
    "Icr",
    "Shorthand",
    "APIC_VERSION",
    "TICK_NS",
]

APIC_BASE = 0xFEE00000          # default IA32_APIC_BASE (§11.4.4); fixed here
APIC_WINDOW = 0x1000            # 4 KiB register page

REG_SIZE = 4                    # every register is a 32-bit access
REG_STRIDE = 0x10               # registers are 16-byte aligned (§11.4.1)
WORD_BITS = 32
VECTOR_WORDS = 8                # ISR/TMR/IRR: 8 x 32-bit registers (§11.8.4)
FIRST_LEGAL_VECTOR = 16         # vectors 0-15 are illegal (§11.5.3, §11.8.1)
PRIORITY_CLASS_SHIFT = 4        # priority class = vector[7:4] (§11.8.3)
BYTE_MASK = 0xFF

# Version register (§11.4.8): version 0x14 and max LVT entry 5, as QEMU's default.
APIC_VERSION_ID = 0x14
MAX_LVT_INDEX = 5
MAX_LVT_SHIFT = 16
APIC_VERSION = (MAX_LVT_INDEX << MAX_LVT_SHIFT) | APIC_VERSION_ID

# QEMU's APIC bus runs at 1 GHz: one timer tick per virtual nanosecond.
TICK_NS = 1

ID_SHIFT = 24                   # APIC ID in bits 31:24 (§11.4.6)
LDR_SHIFT = 24                  # logical APIC ID in bits 31:24 (§11.6.2.2)
DFR_MODEL_SHIFT = 28            # DFR model in bits 31:28 (§11.6.2.2)
DFR_RESERVED_ONES = 0x0FFFFFFF  # DFR bits 27:0 read as ones
DFR_FLAT = 0xF
DFR_CLUSTER = 0x0
BROADCAST_DEST = 0xFF           # xAPIC broadcast destination (§11.6.2.1)
CLUSTER_MASK = 0xF0
MEMBER_MASK = 0x0F


class Reg(IntEnum):
    """Register offsets in the APIC page (Table 11-1)."""
    ID = 0x020
    VERSION = 0x030
    TPR = 0x080
    APR = 0x090
    PPR = 0x0A0
    EOI = 0x0B0
    RRD = 0x0C0
    LDR = 0x0D0
    DFR = 0x0E0
    SVR = 0x0F0
    ISR0 = 0x100                # ISR0..ISR7 at 0x100..0x170
    TMR0 = 0x180                # TMR0..TMR7 at 0x180..0x1F0
    IRR0 = 0x200                # IRR0..IRR7 at 0x200..0x270
    ESR = 0x280
    ICR_LO = 0x300
    ICR_HI = 0x310
    LVT_TIMER = 0x320
    LVT_THERMAL = 0x330
    LVT_PERF = 0x340
    LVT_LINT0 = 0x350
    LVT_LINT1 = 0x360
    LVT_ERROR = 0x370
    TIMER_INITIAL = 0x380
    TIMER_CURRENT = 0x390
    TIMER_DIVIDE = 0x3E0


class Lvt(IntEnum):
    """Local vector table entries, in register order (§11.5.1)."""
    TIMER = 0
    THERMAL = 1
    PERF = 2
    LINT0 = 3
    LINT1 = 4
    ERROR = 5


LVT_REGS = {
    Lvt.TIMER: Reg.LVT_TIMER,
    Lvt.THERMAL: Reg.LVT_THERMAL,
    Lvt.PERF: Reg.LVT_PERF,
    Lvt.LINT0: Reg.LVT_LINT0,
    Lvt.LINT1: Reg.LVT_LINT1,
    Lvt.ERROR: Reg.LVT_ERROR,
}


class LvtBit(IntEnum):
    """LVT entry fields (§11.5.1, Figure 11-8)."""
    VECTOR = 0xFF
    DELIVERY_MODE = 0x700
    DELIVERY_STATUS = 1 << 12   # read-only, always 0 here
    POLARITY_LOW = 1 << 13      # LINT only
    REMOTE_IRR = 1 << 14        # LINT only, read-only
    LEVEL = 1 << 15             # LINT only: trigger mode
    MASKED = 1 << 16
    TIMER_MODE = 3 << 17        # timer only


DELIVERY_MODE_SHIFT = 8
TIMER_MODE_SHIFT = 17

# Writable bits of each LVT entry (Figure 11-8); the rest read as 0.
LVT_WRITABLE = {
    Lvt.TIMER: LvtBit.VECTOR | LvtBit.MASKED | LvtBit.TIMER_MODE,
    Lvt.THERMAL: LvtBit.VECTOR | LvtBit.DELIVERY_MODE | LvtBit.MASKED,
    Lvt.PERF: LvtBit.VECTOR | LvtBit.DELIVERY_MODE | LvtBit.MASKED,
    Lvt.LINT0: (LvtBit.VECTOR | LvtBit.DELIVERY_MODE | LvtBit.POLARITY_LOW
                | LvtBit.LEVEL | LvtBit.MASKED),
    Lvt.LINT1: (LvtBit.VECTOR | LvtBit.DELIVERY_MODE | LvtBit.POLARITY_LOW
                | LvtBit.LEVEL | LvtBit.MASKED),
    Lvt.ERROR: LvtBit.VECTOR | LvtBit.MASKED,
}


class DeliveryMode(IntEnum):
    """Delivery mode field of LVT entries and the ICR (§11.5.1, §11.6.1)."""
    FIXED = 0
    LOWEST = 1
    SMI = 2
    NMI = 4
    INIT = 5
    STARTUP = 6
    EXTINT = 7


class TimerMode(IntEnum):
    """LVT timer bits 18:17 (§11.5.4)."""
    ONE_SHOT = 0
    PERIODIC = 1
    TSC_DEADLINE = 2
    RESERVED = 3


class Svr(IntEnum):
    """Spurious-interrupt vector register (§11.9, Figure 11-23)."""
    VECTOR = 0xFF
    ENABLE = 1 << 8             # APIC software enable
    FOCUS_DISABLE = 1 << 9      # focus processor checking (stored only)


SVR_WRITABLE = Svr.VECTOR | Svr.ENABLE | Svr.FOCUS_DISABLE
SVR_RESET = 0xFF


class Esr(IntEnum):
    """Error status register bits (§11.5.3, Figure 11-9)."""
    SEND_CHECKSUM = 1 << 0
    RECV_CHECKSUM = 1 << 1
    SEND_ACCEPT = 1 << 2
    RECV_ACCEPT = 1 << 3
    REDIRECTABLE_IPI = 1 << 4
    SEND_ILLEGAL_VECTOR = 1 << 5
    RECV_ILLEGAL_VECTOR = 1 << 6
    ILLEGAL_REGISTER = 1 << 7


class Icr(IntEnum):
    """Interrupt command register, low dword (§11.6.1, Figure 11-12)."""
    VECTOR = 0xFF
    DELIVERY_MODE = 0x700
    DEST_LOGICAL = 1 << 11
    DELIVERY_STATUS = 1 << 12   # read-only, always 0 here
    LEVEL_ASSERT = 1 << 14
    TRIGGER_LEVEL = 1 << 15
    SHORTHAND = 3 << 18


ICR_LO_WRITABLE = (Icr.VECTOR | Icr.DELIVERY_MODE | Icr.DEST_LOGICAL | Icr.LEVEL_ASSERT
                   | Icr.TRIGGER_LEVEL | Icr.SHORTHAND)
ICR_DEST_SHIFT = 24             # ICR high dword: destination in bits 31:24
ICR_HI_WRITABLE = BYTE_MASK << ICR_DEST_SHIFT
SHORTHAND_SHIFT = 18


class Shorthand(IntEnum):
    """ICR destination shorthand (§11.6.1)."""
    NONE = 0
    SELF = 1
    ALL_INCLUDING_SELF = 2
    ALL_EXCLUDING_SELF = 3


# Divide configuration register (§11.5.4, Figure 11-10): bits 0, 1 and 3
# encode the divisor; the value is log2(divisor).
DIVIDE_WRITABLE = 0b1011
DIVIDE_SHIFT = {
    0b0000: 1,                  # divide by 2
    0b0001: 2,                  # by 4
    0b0010: 3,                  # by 8
    0b0011: 4,                  # by 16
    0b1000: 5,                  # by 32
    0b1001: 6,                  # by 64
    0b1010: 7,                  # by 128
    0b1011: 0,                  # by 1
}
COUNT_MASK = 0xFFFFFFFF


def _nothing() -> None:
    return None


# Hot-path copies of enum members as plain ints.
_SVR_ENABLE = int(Svr.ENABLE)
_LVT_TIMER = int(Lvt.TIMER)
_LVT_LINT0 = int(Lvt.LINT0)
_MASKED = int(LvtBit.MASKED)
_VECTOR_BITS = int(LvtBit.VECTOR)
_TIMER_MODE_BITS = int(LvtBit.TIMER_MODE)
_PERIODIC = int(TimerMode.PERIODIC)
_ONE_SHOT = int(TimerMode.ONE_SHOT)


class LocalAPIC:
    """The local APIC of CPU ``apic_id`` (``bsp``: of the bootstrap processor).

    Wiring done by the machine: ``on_change`` (stop the slice), ``extint_ack``
    (the PIC pair's INTA, returns a vector), ``eoi_broadcast`` (the IO-APIC's
    ``eoi``); ``set_lint0`` / ``set_lint1`` are IrqLine sinks (LINT0 is the
    PIC's INTR).  ``nmi_pending`` is set by LINT/ICR NMIs; the machine clears
    it when it delivers the NMI.
    """

    def __init__(self, clock: Clock, log: Log = nolog, apic_id: int = 0, bsp: bool = True) -> None:
        self._clock = clock
        self._log = log
        self._reset_id = apic_id & BYTE_MASK
        # The BSP's APIC leaves reset in virtual-wire mode (LINT0 ExtINT, what the
        # BIOS leaves); an AP's has every LVT masked (QEMU's apic_reset_common).
        self._bsp = bsp
        # The APIC bus (machine/devices/apicbus.py) of a multi-CPU machine: ICR
        # messages go there.  None: this APIC is alone (IPIs reach itself only).
        self.bus = None
        self.on_change: Callable[[], None] = _nothing
        self.extint_ack: Callable[[], int] = self._extint_unwired
        self.eoi_broadcast: Callable[[int], None] = self._eoi_unwired
        self.tracer = None              # a machine/trace.py Tracer (the machine sets it when tracing)
        self.nmi_pending = False
        self._lint_level = [False, False]       # LINT0, LINT1 input wires
        self._in_error = False
        self._timer = clock.timer(self._timer_expired, "lapic-timer")
        self._timer_deadline: int | None = None
        self._readers, self._writers = self._dispatch_tables()
        self.reset()

    # -- reset -----------------------------------------------------------------
    def reset(self) -> None:
        """QEMU's apic_reset_common (see the module docstring)."""
        self._id = self._reset_id
        self._reset_state()

    def init_reset(self) -> None:
        """An INIT message (§11.4.7.3, §10.4.7.3 before 2023): the power-up state,
        except the APIC ID (and arbitration ID), which INIT leaves alone."""
        self._reset_state()

    @property
    def apic_id(self) -> int:
        """The APIC ID register's value (bits 31:24), as software set it."""
        return self._id

    @property
    def tpr(self) -> int:
        return self._tpr

    def _reset_state(self) -> None:
        self._tpr = 0
        self._ldr = 0
        self._dfr_model = DFR_FLAT
        self._svr = SVR_RESET
        self._isr = 0
        self._tmr = 0
        self._irr = 0
        self._esr = 0                   # value software reads
        self._esr_pending = 0           # errors since the last ESR write
        self._lvt = [int(LvtBit.MASKED)] * len(Lvt)
        if self._bsp:
            self._lvt[Lvt.LINT0] = int(DeliveryMode.EXTINT) << DELIVERY_MODE_SHIFT
        self._icr_lo = 0
        self._icr_hi = 0
        self._divide = 0
        self._shift = DIVIDE_SHIFT[0]
        self._initial = 0
        self._load_time = 0
        self.nmi_pending = False
        self._timer.cancel()
        self._timer_deadline = None

    # -- MMIO ------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size != REG_SIZE or offset % REG_STRIDE or not 0 <= offset < APIC_WINDOW:
            self._log(f"lapic: unsupported read of {size} bytes at +{offset:#x}, returning 0")
            return 0
        reader = self._readers.get(offset)
        if reader is None:
            self._log(f"lapic: read of reserved register +{offset:#x}")
            self._error(Esr.ILLEGAL_REGISTER)
            return 0
        return reader() & COUNT_MASK

    def write(self, offset: int, size: int, value: int) -> None:
        if size != REG_SIZE or offset % REG_STRIDE or not 0 <= offset < APIC_WINDOW:
            self._log(f"lapic: unsupported write of {size} bytes at +{offset:#x} ignored")
            return
        writer = self._writers.get(offset)
        if writer is None:
            if offset in self._readers:
                self._log(f"lapic: write {value:#x} to read-only register +{offset:#x} ignored")
                return
            self._log(f"lapic: write {value:#x} to reserved register +{offset:#x}")
            self._error(Esr.ILLEGAL_REGISTER)
            return
        writer(value & COUNT_MASK)

    def _dispatch_tables(self) -> tuple[dict[int, Callable[[], int]], dict[int, Callable[[int], None]]]:
        readers: dict[int, Callable[[], int]] = {
            Reg.ID: lambda: self._id << ID_SHIFT,
            Reg.VERSION: lambda: APIC_VERSION,
            Reg.TPR: lambda: self._tpr,
            Reg.APR: lambda: 0,
            Reg.PPR: self._ppr,
            Reg.EOI: lambda: 0,
            Reg.RRD: lambda: 0,
            Reg.LDR: lambda: self._ldr << LDR_SHIFT,
            Reg.DFR: lambda: (self._dfr_model << DFR_MODEL_SHIFT) | DFR_RESERVED_ONES,
            Reg.SVR: lambda: self._svr,
            Reg.ESR: lambda: self._esr,
            Reg.ICR_LO: lambda: self._icr_lo,
            Reg.ICR_HI: lambda: self._icr_hi,
            Reg.TIMER_INITIAL: lambda: self._initial,
            Reg.TIMER_CURRENT: self._current_count,
            Reg.TIMER_DIVIDE: lambda: self._divide,
        }
        for word in range(VECTOR_WORDS):
            shift = word * WORD_BITS
            readers[Reg.ISR0 + word * REG_STRIDE] = lambda s=shift: (self._isr >> s) & COUNT_MASK
            readers[Reg.TMR0 + word * REG_STRIDE] = lambda s=shift: (self._tmr >> s) & COUNT_MASK
            readers[Reg.IRR0 + word * REG_STRIDE] = lambda s=shift: (self._irr >> s) & COUNT_MASK
        for lvt, reg in LVT_REGS.items():
            readers[reg] = lambda i=lvt: self._lvt[i]

        writers: dict[int, Callable[[int], None]] = {
            Reg.ID: self._write_id,
            Reg.TPR: self._write_tpr,
            Reg.EOI: lambda _value: self._eoi(),
            Reg.LDR: self._write_ldr,
            Reg.DFR: self._write_dfr,
            Reg.SVR: self._write_svr,
            Reg.ESR: lambda _value: self._write_esr(),
            Reg.ICR_LO: self._write_icr_lo,
            Reg.ICR_HI: self._write_icr_hi,
            Reg.TIMER_INITIAL: self._write_initial,
            Reg.TIMER_DIVIDE: self._write_divide,
        }
        for lvt, reg in LVT_REGS.items():
            writers[reg] = lambda value, i=lvt: self._write_lvt(i, value)
        return readers, writers

    # -- register writes -----------------------------------------------------------
    def _write_id(self, value: int) -> None:
        self._id = (value >> ID_SHIFT) & BYTE_MASK

    def _write_tpr(self, value: int) -> None:
        self._tpr = value & BYTE_MASK
        self._update_irq()

    def _write_ldr(self, value: int) -> None:
        self._ldr = (value >> LDR_SHIFT) & BYTE_MASK

    def _write_dfr(self, value: int) -> None:
        model = (value >> DFR_MODEL_SHIFT) & MEMBER_MASK
        if model not in (DFR_FLAT, DFR_CLUSTER):
            self._log(f"lapic: DFR model {model:#x} is reserved")
        self._dfr_model = model

    def _write_svr(self, value: int) -> None:
        self._svr = int(value & SVR_WRITABLE)
        if not self._svr & Svr.ENABLE:
            # §11.4.7.2: software-disabling sets every LVT mask bit.
            for i in Lvt:
                self._lvt[i] |= int(LvtBit.MASKED)
            self._timer_update(self._clock.now)
        self._update_irq()

    def _write_esr(self) -> None:
        # §11.5.3: a write latches the errors seen since the previous write
        # into the readable ESR and starts collecting anew.
        self._esr = self._esr_pending
        self._esr_pending = 0

    def _write_icr_hi(self, value: int) -> None:
        self._icr_hi = int(value & ICR_HI_WRITABLE)

    def _write_icr_lo(self, value: int) -> None:
        self._icr_lo = int(value & ICR_LO_WRITABLE)
        self._send_ipi()

    def _write_lvt(self, lvt: Lvt, value: int) -> None:
        new = int(value & LVT_WRITABLE[lvt])
        if not self._svr & Svr.ENABLE:
            new |= LvtBit.MASKED            # mask bits stick while disabled
        old = self._lvt[lvt]
        if lvt in (Lvt.LINT0, Lvt.LINT1) and self._lint_is_level_fixed(lvt, new):
            new |= old & LvtBit.REMOTE_IRR  # read-only; kept while level/fixed
        self._lvt[lvt] = int(new)
        if lvt == Lvt.TIMER:
            mode = (new & LvtBit.TIMER_MODE) >> TIMER_MODE_SHIFT
            if mode not in (TimerMode.ONE_SHOT, TimerMode.PERIODIC):
                self._log(f"lapic: timer mode {TimerMode(mode).name} not supported; timer idle")
            self._timer_update(self._clock.now)
        elif lvt in (Lvt.LINT0, Lvt.LINT1):
            pin = lvt - Lvt.LINT0
            if self._lint_level[pin] and self._lint_is_level_fixed(lvt, new):
                self._lint_level_deliver(lvt)
            self._update_irq()

    # -- priorities and the CPU side ----------------------------------------------------
    def _ppr(self) -> int:
        """Processor priority (§11.8.3.1): the higher of TPR and the ISR class."""
        isrv = self._isr.bit_length() - 1 if self._isr else 0
        if self._tpr >> PRIORITY_CLASS_SHIFT >= isrv >> PRIORITY_CLASS_SHIFT:
            return self._tpr
        return isrv & CLUSTER_MASK

    # The next three run several times per interrupt: plain ints, no enum
    # attribute lookups (90 ns each).
    def _deliverable_vector(self) -> int | None:
        """The highest IRR vector above the processor priority class, if any."""
        irr = self._irr
        if not irr or not self._svr & _SVR_ENABLE:
            return None
        vector = irr.bit_length() - 1
        isr = self._isr
        # PPR's class (§11.8.3.1) is the higher of TPR's and the highest ISR vector's.
        if vector >> PRIORITY_CLASS_SHIFT > max(self._tpr, isr.bit_length() - 1 if isr else 0) \
                >> PRIORITY_CLASS_SHIFT:
            return vector
        return None

    def _extint_requested(self) -> bool:
        # As QEMU's apic_accept_pic_intr: only the LINT0 entry decides, not
        # SVR.8 (software-disabling masks LINT0 here, see _write_svr).
        if not self._lint_level[0]:
            return False
        lvt = self._lvt[_LVT_LINT0]
        return not lvt & _MASKED and _delivery_mode(lvt) == DeliveryMode.EXTINT

    def pending(self) -> bool:
        """True if an interrupt should be presented to the CPU now."""
        irr = self._irr
        if irr and self._svr & _SVR_ENABLE:       # _deliverable_vector, inlined
            isr = self._isr
            if (irr.bit_length() - 1) >> PRIORITY_CLASS_SHIFT > \
                    max(self._tpr, isr.bit_length() - 1 if isr else 0) >> PRIORITY_CLASS_SHIFT:
                return True
        return bool(self._lint_level[0]) and self._extint_requested()

    def acknowledge(self) -> int:
        """The INTA cycle: return the vector the CPU takes now."""
        if self._extint_requested():
            return self.extint_ack() & BYTE_MASK
        vector = self._deliverable_vector()
        if vector is None:
            return int(self._svr & Svr.VECTOR)
        bit = 1 << vector
        self._irr &= ~bit
        self._isr |= bit
        return vector

    def _update_irq(self) -> None:
        """The one place that tells the CPU something may be pending."""
        if self.nmi_pending or self.pending():
            self.on_change()

    # -- inputs ------------------------------------------------------------------------
    def accept(self, vector: int, level_triggered: bool) -> None:
        """A fixed-mode message for this APIC (IO-APIC, IPI, local source)."""
        vector &= BYTE_MASK
        if vector < FIRST_LEGAL_VECTOR:
            self._log(f"lapic: received illegal vector {vector}, dropped")
            self._error(Esr.RECV_ILLEGAL_VECTOR)
            return
        bit = 1 << vector
        self._irr |= bit
        if level_triggered:            # §11.8.4: TMR follows the accepted message
            self._tmr |= bit
        else:
            self._tmr &= ~bit
        self._update_irq()

    def set_lint0(self, level: bool) -> None:
        """LINT0 input (the PIC's INTR on a PC)."""
        self._lint_input(Lvt.LINT0, level)

    def set_lint1(self, level: bool) -> None:
        """LINT1 input (NMI on a PC)."""
        self._lint_input(Lvt.LINT1, level)

    def _lint_input(self, lvt: Lvt, level: bool) -> None:
        pin = lvt - Lvt.LINT0
        level = bool(level)
        rising = level and not self._lint_level[pin]
        self._lint_level[pin] = level
        entry = self._lvt[lvt]
        mode = _delivery_mode(entry)
        if mode == DeliveryMode.EXTINT:
            if level:
                self._update_irq()      # the PIC's vector is fetched at INTA
            return
        if entry & LvtBit.MASKED or not level:
            return
        if mode == DeliveryMode.FIXED:
            if self._lint_is_level_fixed(lvt, entry):
                self._lint_level_deliver(lvt)
            elif rising:
                self.accept(entry & LvtBit.VECTOR, False)
        elif mode == DeliveryMode.NMI:
            if rising:                  # NMI is always edge-sensitive
                self.nmi_pending = True
                self._update_irq()
        elif rising:
            self._log(f"lapic: {lvt.name} delivery mode {_mode_name(mode)} not modelled")

    @staticmethod
    def _lint_is_level_fixed(lvt: Lvt, entry: int) -> bool:
        # §11.5.1: level-sensitive LINT1 is not supported; LINT1 is always edge.
        return (lvt == Lvt.LINT0 and bool(entry & LvtBit.LEVEL)
                and _delivery_mode(entry) == DeliveryMode.FIXED)

    def _lint_level_deliver(self, lvt: Lvt) -> None:
        """Level-triggered fixed LINT: deliver unless remote IRR is already set."""
        entry = self._lvt[lvt]
        if entry & (LvtBit.REMOTE_IRR | LvtBit.MASKED):
            return
        self._lvt[lvt] = entry | int(LvtBit.REMOTE_IRR)
        self.accept(entry & LvtBit.VECTOR, True)

    # -- EOI -------------------------------------------------------------------------
    def _eoi(self) -> None:
        if not self._isr:
            return
        vector = self._isr.bit_length() - 1
        bit = 1 << vector
        self._isr &= ~bit
        t = self.tracer
        if t is not None:
            t.irq_eoi(vector)
        if self._tmr & bit:
            self.eoi_broadcast(vector)
            entry = self._lvt[Lvt.LINT0]
            if entry & LvtBit.REMOTE_IRR and entry & LvtBit.VECTOR == vector:
                self._lvt[Lvt.LINT0] = entry & ~int(LvtBit.REMOTE_IRR)
                if self._lint_level[0] and self._lint_is_level_fixed(Lvt.LINT0, entry):
                    self._lint_level_deliver(Lvt.LINT0)
        self._update_irq()

    # -- errors ------------------------------------------------------------------------
    def _error(self, bits: Esr) -> None:
        """Record an error (§11.5.3) and raise the LVT error interrupt."""
        self._esr_pending |= int(bits)
        if self._in_error:
            return                      # an illegal LVT-error vector must not loop
        entry = self._lvt[Lvt.ERROR]
        if not entry & LvtBit.MASKED:
            self._in_error = True
            try:
                self.accept(entry & LvtBit.VECTOR, False)
            finally:
                self._in_error = False

    # -- IPIs ----------------------------------------------------------------------------
    def _send_ipi(self) -> None:
        lo = self._icr_lo
        vector = int(lo & Icr.VECTOR)
        mode = _delivery_mode(lo)
        shorthand = Shorthand((lo & Icr.SHORTHAND) >> SHORTHAND_SHIFT)
        dest = self._icr_hi >> ICR_DEST_SHIFT
        if self.bus is not None:
            if mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST) and vector < FIRST_LEGAL_VECTOR:
                self._log(f"lapic: IPI with illegal vector {vector} not sent")
                self._error(Esr.SEND_ILLEGAL_VECTOR)
                return
            self.bus.send(self, lo, dest)
            return
        if shorthand == Shorthand.NONE:
            to_self = self._matches(dest, bool(lo & Icr.DEST_LOGICAL))
        else:
            to_self = shorthand in (Shorthand.SELF, Shorthand.ALL_INCLUDING_SELF)
        if mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST):
            if vector < FIRST_LEGAL_VECTOR:
                self._log(f"lapic: IPI with illegal vector {vector} not sent")
                self._error(Esr.SEND_ILLEGAL_VECTOR)
            elif to_self:
                self.accept(vector, False)   # IPIs are edge (§11.6.1, trigger mode)
            else:
                self._log(f"lapic: IPI vector {vector:#x} to {shorthand.name} dest {dest:#x} "
                          "reaches no CPU: not modelled (single CPU)")
        elif mode == DeliveryMode.NMI and to_self:
            self.nmi_pending = True
            self._update_irq()
        else:
            self._log(f"lapic: IPI delivery mode {_mode_name(mode)} to {shorthand.name} dest {dest:#x}: "
                      "not modelled (single CPU)")

    def raise_nmi(self) -> None:
        """An NMI message (ICR or IO-APIC delivery mode NMI)."""
        self.nmi_pending = True
        self._update_irq()

    def matches(self, dest: int, logical: bool) -> bool:
        """Does a shorthand-free destination name this APIC (§11.6.2)?"""
        return self._matches(dest, logical)

    def _matches(self, dest: int, logical: bool) -> bool:
        """Does a shorthand-free destination name this APIC (§11.6.2)?"""
        if dest == BROADCAST_DEST:
            return True
        if not logical:
            return dest == self._id
        if self._dfr_model == DFR_CLUSTER:
            return (dest & CLUSTER_MASK) == (self._ldr & CLUSTER_MASK) and bool(
                dest & self._ldr & MEMBER_MASK)
        return bool(dest & self._ldr)

    # -- timer ---------------------------------------------------------------------------
    def _timer_mode(self) -> int:
        return (self._lvt[Lvt.TIMER] & LvtBit.TIMER_MODE) >> TIMER_MODE_SHIFT

    def _tick_ns(self) -> int:
        return TICK_NS << self._shift

    def _current_count(self) -> int:
        n = self._initial
        mode = self._timer_mode()
        if n == 0 or mode not in (TimerMode.ONE_SHOT, TimerMode.PERIODIC):
            return 0
        ticks = (self._clock.now - self._load_time) // self._tick_ns()
        if mode == TimerMode.PERIODIC:
            return n - ticks % n
        return max(n - ticks, 0)

    def _write_initial(self, value: int) -> None:
        if self._timer_mode() == TimerMode.TSC_DEADLINE:
            self._log("lapic: initial-count write ignored in TSC-deadline mode")
            return
        self._initial = value
        self._load_time = self._clock.now
        self._timer_update(self._load_time)

    def _write_divide(self, value: int) -> None:
        # Discussion: as QEMU, a new divider takes effect for the whole count
        # since the last initial-count write: the load time is not moved, so the
        # current count jumps to initial - elapsed/new_divisor, and the armed
        # expiry is NOT moved.  When that expiry comes the interrupt is raised
        # and the next one is computed with the new divider, so a one-shot count
        # whose divider grew fires a second time.  Writing the initial count or
        # the LVT timer entry re-synchronises the expiry with the count.
        self._divide = value & DIVIDE_WRITABLE
        self._shift = DIVIDE_SHIFT[self._divide]

    def _next_expiry(self, after: int) -> int | None:
        """The first expiry strictly after the tick boundary at ``after``."""
        n = self._initial
        entry = self._lvt[_LVT_TIMER]
        mode = (entry & _TIMER_MODE_BITS) >> TIMER_MODE_SHIFT
        if entry & _MASKED or n == 0 or not (mode == _PERIODIC or mode == _ONE_SHOT):
            return None
        tick = TICK_NS << self._shift
        ticks = (after - self._load_time) // tick
        if mode == _PERIODIC:
            return self._load_time + (ticks // n + 1) * n * tick
        if ticks >= n:
            return None
        return self._load_time + n * tick

    def _timer_update(self, after: int) -> None:
        self._timer_deadline = self._next_expiry(after)
        t = self.tracer
        if t is not None:
            t.timer_deadline("lapic timer", self._timer_deadline)
        if self._timer_deadline is None:
            self._timer.cancel()
        else:
            self._timer.arm(self._timer_deadline)

    def _timer_expired(self) -> None:
        deadline = self._timer_deadline
        assert deadline is not None, "lapic timer fired while not armed"
        entry = self._lvt[_LVT_TIMER]
        if not entry & _MASKED:
            self.accept(entry & _VECTOR_BITS, False)
        self._timer_update(deadline)

    # -- wiring defaults --------------------------------------------------------------------
    def _extint_unwired(self) -> int:
        self._log("lapic: ExtINT acknowledge with no PIC wired; spurious vector")
        return int(self._svr & Svr.VECTOR)

    @staticmethod
    def _eoi_unwired(vector: int) -> None:
        return None

    # -- snapshots ---------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {
            "id": self._id,
            "tpr": self._tpr,
            "ldr": self._ldr,
            "dfr_model": self._dfr_model,
            "svr": self._svr,
            "isr": self._isr,
            "tmr": self._tmr,
            "irr": self._irr,
            "esr": self._esr,
            "esr_pending": self._esr_pending,
            "lvt": list(self._lvt),
            "icr_lo": self._icr_lo,
            "icr_hi": self._icr_hi,
            "divide": self._divide,
            "initial": self._initial,
            "load_time": self._load_time,
            "timer_deadline": self._timer_deadline,
            "lint_level": list(self._lint_level),
            "nmi_pending": self.nmi_pending,
        }

    def restore(self, state: dict) -> None:
        self._id = state["id"]
        self._tpr = state["tpr"]
        self._ldr = state["ldr"]
        self._dfr_model = state["dfr_model"]
        self._svr = state["svr"]
        self._isr = state["isr"]
        self._tmr = state["tmr"]
        self._irr = state["irr"]
        self._esr = state["esr"]
        self._esr_pending = state["esr_pending"]
        self._lvt = list(state["lvt"])
        self._icr_lo = state["icr_lo"]
        self._icr_hi = state["icr_hi"]
        self._divide = state["divide"]
        self._shift = DIVIDE_SHIFT[self._divide]
        self._initial = state["initial"]
        self._load_time = state["load_time"]
        self._lint_level = list(state["lint_level"])
        self.nmi_pending = state["nmi_pending"]
        self._timer_deadline = state["timer_deadline"]
        if self._timer_deadline is None:
            self._timer.cancel()
        else:
            self._timer.arm(self._timer_deadline)


def _delivery_mode(entry: int) -> int:
    return (entry & LvtBit.DELIVERY_MODE) >> DELIVERY_MODE_SHIFT


def _mode_name(mode: int) -> str:
    try:
        return DeliveryMode(mode).name
    except ValueError:
        return f"reserved ({mode})"
