"""Interrupt and exception delivery through the guest IDT (bare-metal mode).

Unicorn never delivers an interrupt itself (notes/unicorn.md §2): its hooks
only report that one happened.  This module does what the processor does
(SDM vol. 3, chapter 6), between CPU slices:

* long mode: 16-byte gates, 64-bit interrupt/trap gates only, stack switch to
  TSS.RSPn on a privilege change or to TSS.ISTn when the gate names one, RSP
  aligned to 16, the 5-word frame SS, RSP, RFLAGS, CS, RIP (+ error code);
* 32-bit protected mode: 8-byte 32-bit interrupt/trap gates, SS:ESP from the
  32-bit TSS on a privilege change, frame [SS, ESP,] EFLAGS, CS, EIP (+ code);
* checks in the architectural order: IDT limit (#GP), gate type (#GP),
  software INT n against the gate DPL (#GP), present (#NP), target code
  segment (#GP/#NP), stack pushes through the page tables (#PF);
* interrupt gates clear IF, all gates clear TF, NT, RF and VM;
* a fault during delivery combines with the first event by the SDM's table
  (benign / contributory / page fault): serial handling, #DF, or a triple fault
  (:class:`TripleFault`, which the machine reports and stops on).

Not modelled: task gates, 16-bit gates, virtual-8086 mode, real-mode IVT
delivery, segment limit checks on stack pushes, LDT-based code selectors,
RF in the pushed image of faults (QEMU does not set it either).

The common case, a hardware interrupt in long mode through a valid gate at
the current privilege without IST, is done in C (``CPU.deliver_fast``, the
same checks and pushes); it declines anything else, faults included, and the
general path here runs.  tests/machine/test_exceptions.py covers both.
"""
from __future__ import annotations

import struct
from typing import Callable

from .cpu import CPU, EFLAGS, HF, SEG_SIZE, Ctx, Reg, Seg
from .mmu import PageFault, Paging, translate

__all__ = ["IdtSink", "Fault", "TripleFault", "EXCEPTION_NAMES"]

EXCEPTION_NAMES = {
    0: "#DE divide error", 1: "#DB debug", 2: "NMI", 3: "#BP breakpoint", 4: "#OF overflow",
    5: "#BR bound range", 6: "#UD invalid opcode", 7: "#NM device not available",
    8: "#DF double fault", 10: "#TS invalid TSS", 11: "#NP segment not present",
    12: "#SS stack fault", 13: "#GP general protection", 14: "#PF page fault",
    16: "#MF x87 error", 17: "#AC alignment check", 18: "#MC machine check",
    19: "#XM SIMD exception", 20: "#VE virtualization", 21: "#CP control protection",
}

_CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})
_PF = 14
_DF = 8

# descriptor bits (high dword)
D_TYPE_SHIFT = 8
D_S = 1 << 12
D_DPL_SHIFT = 13
D_P = 1 << 15
D_L = 1 << 21
D_B = 1 << 22
D_CODE = 1 << 11           # type bit 3: code segment
D_CONFORMING = 1 << 10

GATE_INT64 = 0xE
GATE_TRAP64 = 0xF
GATE_INT32 = 0xE
GATE_TRAP32 = 0xF

_Q = struct.Struct("<Q")
_I = struct.Struct("<I")


class Fault(Exception):
    """An exception raised while delivering another one."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        super().__init__(EXCEPTION_NAMES.get(vector, f"vector {vector}"))
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


class TripleFault(Exception):
    """Shutdown: a fault while delivering #DF."""


class IdtSink:
    """Delivers vectors to the guest through its IDT."""

    def __init__(self, cpu: CPU, ram_buf, ram_size: int, log: Callable[[str], None]) -> None:
        self.cpu = cpu
        self.buf = ram_buf
        self.ram_size = ram_size
        self.log = log
        self.delivered: dict[int, int] = {}      # vector -> count (statistics, tests, `irq` command)

    # ------------------------------------------------------------------ public
    def deliver(self, vector: int, *, error_code: int | None = None, software: bool = False,
                external: bool = True, return_rip: int | None = None, cr2: int | None = None) -> None:
        """Deliver one event; faults during delivery are combined as the SDM says."""
        if not software and return_rip is None and cr2 is None and self.cpu.deliver_fast(vector, error_code):
            self.delivered[vector] = self.delivered.get(vector, 0) + 1
            return
        first = vector
        pending = (vector, error_code, software, external, cr2)
        attempts = 0
        while True:
            v, ec, sw, ext, fault_cr2 = pending
            try:
                if fault_cr2 is not None:
                    self.cpu.uc.reg_write(_CR2_REG, fault_cr2)
                self._deliver_once(v, ec, sw, ext, return_rip)
                self.delivered[v] = self.delivered.get(v, 0) + 1
                return
            except Fault as f:
                attempts += 1
                second = f.vector
                if v == _DF and (second in _CONTRIBUTORY or second == _PF):
                    raise TripleFault(f"triple fault: {EXCEPTION_NAMES.get(second, second)} while "
                                      f"delivering #DF (first event: vector {first})") from None
                if attempts > 3:
                    raise TripleFault("triple fault: repeated faults during delivery") from None
                if sw and return_rip is not None:
                    # INT n itself faults (gate DPL, not present, ...): a fault, so the
                    # pushed RIP is the INT instruction's, not the one after it (SDM 6.12.1.1).
                    return_rip = self.int_insn_start(v, return_rip)
                if (v in _CONTRIBUTORY and second in _CONTRIBUTORY) or \
                        (v == _PF and (second in _CONTRIBUTORY or second == _PF)):
                    # #PF detected on the way still loads CR2 (SDM 6.15, #PF), even as it becomes #DF.
                    pending = (_DF, 0, False, True, f.cr2 if second == _PF else None)
                else:
                    pending = (second, f.error_code, False, True, f.cr2)

    def int_insn_start(self, vector: int, next_rip: int) -> int:
        """Where the INT3 / INTO / INT imm8 that raised ``vector`` starts, given the
        address after it (all Unicorn reports): INT3 (CC) and INTO (CE) are one byte,
        INT imm8 (CD ib) two.  The vector tells CC apart from an imm8 of 0xCC."""
        b = self.cpu.ctx_read()
        pg = _paging(b)
        cs_base = 0 if pg.lma else _Q.unpack_from(b, Ctx.SEGS + SEG_SIZE * Seg.CS + 8)[0]
        try:
            last = self._read(pg, cs_base + next_rip - 1, 1)[0]
        except Fault:
            return next_rip - 2
        if (vector == 3 and last == 0xCC) or (vector == 4 and last == 0xCE):
            return next_rip - 1
        return next_rip - 2

    # ------------------------------------------------------------------ one attempt
    def _deliver_once(self, vector: int, ec: int | None, software: bool, ext: bool,
                      return_rip: int | None) -> None:
        cpu = self.cpu
        b = cpu.ctx_read()
        hflags = _I.unpack_from(b, Ctx.HFLAGS)[0]
        cpl = hflags & HF.CPL_MASK
        pg = _paging(b)
        if not (pg.cr0 & 1):
            raise TripleFault(f"interrupt {vector} in real mode: real-mode IVT delivery is not modelled")
        idt_base, idt_limit = _table(b, Ctx.IDT)
        rip = _Q.unpack_from(b, Ctx.RIP)[0] if return_rip is None else return_rip
        rsp = _Q.unpack_from(b, Ctx.REGS + 8 * 4)[0]
        rflags = cpu.rflags
        cs_sel = _I.unpack_from(b, Ctx.SEGS + SEG_SIZE * Seg.CS)[0]
        ss_sel = _I.unpack_from(b, Ctx.SEGS + SEG_SIZE * Seg.SS)[0]
        extbit = 1 if ext and not software else 0
        idt_ec = (vector << 3) | 2 | extbit
        long_mode = pg.lma
        gate_size = 16 if long_mode else 8
        if vector * gate_size + gate_size - 1 > idt_limit:
            raise Fault(13, idt_ec)
        gate = self._read(pg, idt_base + vector * gate_size, gate_size)
        lo, hi = struct.unpack_from("<II", gate)
        gtype = (hi >> 8) & 0xF
        gdpl = (hi >> 13) & 3
        present = hi & D_P
        offset = (lo & 0xFFFF) | (hi & 0xFFFF_0000)
        sel = lo >> 16
        if long_mode:
            offset |= _I.unpack_from(gate, 8)[0] << 32
            if gtype not in (GATE_INT64, GATE_TRAP64):
                raise Fault(13, idt_ec)
            ist = gate[4] & 7
        else:
            if gtype not in (GATE_INT32, GATE_TRAP32):
                self.log(f"IDT gate type {gtype:#x} for vector {vector} (task/16-bit gates are not modelled)")
                raise Fault(13, idt_ec)
            ist = 0
        if software and gdpl < cpl:
            raise Fault(13, idt_ec)
        if not present:
            raise Fault(11, idt_ec)
        # target code segment
        gdt_base, gdt_limit = _table(b, Ctx.GDT)
        if sel & ~3 == 0:
            raise Fault(13, extbit)
        if sel & 4 or (sel | 7) > gdt_limit:
            raise Fault(13, (sel & 0xFFFC) | extbit)
        desc = self._read(pg, gdt_base + (sel & ~7), 8)
        d_lo, d_hi = struct.unpack_from("<II", desc)
        if not (d_hi & D_S) or not (d_hi & D_CODE) or (long_mode and not (d_hi & D_L)):
            raise Fault(13, (sel & 0xFFFC) | extbit)
        ddpl = (d_hi >> D_DPL_SHIFT) & 3
        if ddpl > cpl:
            raise Fault(13, (sel & 0xFFFC) | extbit)
        if not (d_hi & D_P):
            raise Fault(11, (sel & 0xFFFC) | extbit)
        new_cpl = cpl if d_hi & D_CONFORMING else ddpl
        tr_base, tr_limit = _table(b, Ctx.TR)
        push_ec = ec is not None and not software

        if long_mode:
            if ist:
                new_rsp = self._tss_read(pg, tr_base, tr_limit, 36 + 8 * (ist - 1), extbit)
            elif new_cpl < cpl:
                new_rsp = self._tss_read(pg, tr_base, tr_limit, 4 + 8 * new_cpl, extbit)
            else:
                new_rsp = rsp
            new_rsp &= ~0xF
            words = [ss_sel, rsp, rflags, cs_sel, rip]
            if push_ec:
                words.append(ec & 0xFFFF_FFFF_FFFF_FFFF)
            frame = struct.pack(f"<{len(words)}Q", *reversed(words))
            new_rsp = (new_rsp - len(frame)) & 0xFFFF_FFFF_FFFF_FFFF
            self._write(pg, new_rsp, frame)
            new_ss = (new_cpl, 0, 0, (new_cpl << D_DPL_SHIFT)) if new_cpl != cpl else None
            cs_flags = d_hi
            hset = HF.CS32 | HF.SS32 | HF.CS64
            hclear = HF.INHIBIT_IRQ
        else:
            ss_base = _Q.unpack_from(b, Ctx.SEGS + SEG_SIZE * Seg.SS + 8)[0]
            if new_cpl < cpl:
                esp0 = self._tss_read(pg, tr_base, tr_limit, 4 + 8 * new_cpl, extbit, size=4)
                ss0 = self._tss_read(pg, tr_base, tr_limit, 8 + 8 * new_cpl, extbit, size=2)
                ss_desc = self._read(pg, gdt_base + (ss0 & ~7), 8) if ss0 & ~3 and (ss0 | 7) <= gdt_limit \
                    else None
                if ss_desc is None:
                    raise Fault(10, (ss0 & 0xFFFC) | extbit)
                s_lo, s_hi = struct.unpack_from("<II", ss_desc)
                nss_base = _desc_base(s_lo, s_hi)
                words = [ss_sel, rsp & 0xFFFF_FFFF, rflags & 0xFFFF_FFFF, cs_sel, rip & 0xFFFF_FFFF]
                stack_top = esp0
                new_ss = (ss0, nss_base, _desc_limit(s_lo, s_hi), s_hi)
                base_for_push = nss_base
            else:
                words = [rflags & 0xFFFF_FFFF, cs_sel, rip & 0xFFFF_FFFF]
                stack_top = rsp & 0xFFFF_FFFF
                new_ss = None
                base_for_push = ss_base
            if push_ec:
                words.append(ec & 0xFFFF_FFFF)
            frame = struct.pack(f"<{len(words)}I", *reversed(words))
            new_rsp = (stack_top - len(frame)) & 0xFFFF_FFFF
            self._write(pg, (base_for_push + new_rsp) & 0xFFFF_FFFF, frame)
            offset &= 0xFFFF_FFFF
            cs_flags = d_hi
            hset = HF.CS32 if d_hi & D_B else 0
            hclear = HF.INHIBIT_IRQ | HF.CS64 | (0 if d_hi & D_B else HF.CS32)
            if new_ss is not None and new_ss[3] & D_B:
                hset |= HF.SS32

        new_flags = rflags & ~(EFLAGS.TF | EFLAGS.NT | EFLAGS.RF | EFLAGS.VM)
        if gtype == GATE_INT64:
            new_flags &= ~EFLAGS.IF
        new_cs = (sel & ~3) | new_cpl
        if new_cs == cs_sel and new_cpl == cpl and new_ss is None:
            cpu.write_frame_regs(offset, new_rsp, new_flags)
            return
        segs = {Seg.CS: (new_cs, _desc_base(d_lo, d_hi) if not long_mode else 0,
                         _desc_limit(d_lo, d_hi), cs_flags)}
        if new_ss is not None:
            segs[Seg.SS] = new_ss
        cpu.commit_hidden(rip=offset, rsp=new_rsp, rflags=new_flags, cpl=new_cpl, segs=segs,
                          hflags_set=hset, hflags_clear=hclear)

    # ------------------------------------------------------------------ memory helpers
    def _read(self, pg: Paging, linear: int, size: int) -> bytes:
        out = bytearray()
        while size:
            n = min(size, 0x1000 - (linear & 0xFFF))
            try:
                pa = translate(self.buf, self.ram_size, pg, linear)
            except PageFault as pf:
                raise Fault(14, pf.error_code, pf.linear) from None
            if pa + n > self.ram_size:
                raise Fault(13, 0)
            out += self.buf[pa:pa + n]
            linear += n
            size -= n
        return bytes(out)

    def _write(self, pg: Paging, linear: int, data: bytes) -> None:
        """Push a frame. The CPU pushes from the top (SS first), so pages are
        translated top-down and a #PF reports the first push that faults; every
        page is translated before anything is written."""
        pieces = []
        end = len(data)
        while end > 0:
            start = max(0, end - 1 - ((linear + end - 1) & 0xFFF))
            try:
                pa = translate(self.buf, self.ram_size, pg, linear + start, write=True)
            except PageFault as pf:
                raise Fault(14, pf.error_code, linear + end - 8) from None
            if pa + (end - start) > self.ram_size:
                raise Fault(13, 0)
            pieces.append((pa, start, end - start))
            end = start
        for pa, p, n in pieces:
            self.buf[pa:pa + n] = data[p:p + n]

    def _tss_read(self, pg: Paging, base: int, limit: int, off: int, extbit: int, size: int = 8) -> int:
        if off + size - 1 > limit:
            raise Fault(10, extbit)
        raw = self._read(pg, base + off, size)
        return int.from_bytes(raw, "little")


_CR2_REG = Reg.CR2


def _paging(b) -> Paging:
    hflags = _I.unpack_from(b, Ctx.HFLAGS)[0]
    return Paging(_Q.unpack_from(b, Ctx.CR0)[0], _Q.unpack_from(b, Ctx.CR3)[0],
                  _Q.unpack_from(b, Ctx.CR4)[0], bool(hflags & HF.LMA))


def _table(b, off: int) -> tuple[int, int]:
    base, limit = struct.unpack_from("<QI", b, off + 8)
    return base, limit


def _desc_base(lo: int, hi: int) -> int:
    return (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF00_0000)


def _desc_limit(lo: int, hi: int) -> int:
    limit = (lo & 0xFFFF) | (hi & 0x000F_0000)
    if hi & (1 << 23):
        limit = (limit << 12) | 0xFFF
    return limit
