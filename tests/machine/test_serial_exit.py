"""The UART's transmit timing seen from a bare-metal guest, and no output lost when
the machine stops: every byte the guest gave COM1 before isa-debug-exit, HLT with
IF=0, a triple fault or an emulation error reaches the back end, in both timings.
"""
from __future__ import annotations

import pytest
from vmk.machine.pc import SerialTiming, Why
from vmk.testing import Harness

COM1, LSR, FCR = 0x3F8, 0x3FD, 0x3FA
C9600 = 1_041_667          # one 8N1 character at the reset divisor (12), ns
C115200 = 86_806
LIMIT = 1_000_000_000
MESSAGE = b"0123456789abcdef"       # 16 bytes: the shift register plus 15 in the FIFO, no overrun

TIMINGS = [SerialTiming.BAUD, SerialTiming.INSTANT]


def _write_all(data: bytes) -> str:
    """Write ``data`` to THR without polling THRE (the FIFO takes it all)."""
    lines = [f"mov dx, {FCR:#x}", "mov al, 1", "out dx, al", f"mov dx, {COM1:#x}"]
    for b in data:
        lines += [f"mov al, {b:#x}", "out dx, al"]
    return "\n".join(lines)


ENDINGS = {
    "debug-exit": ("mov dx, 0xf4\nmov al, 3\nout dx, al\nhlt", Why.EXIT),
    "hlt-if0": ("cli\nhlt", Why.DEAD),
    # IDT limit 0: #DE -> #GP -> #DF -> shutdown.
    "triple-fault": ("sub rsp, 16\nmov word ptr [rsp], 0\nlidt [rsp]\nxor ecx, ecx\ndiv ecx", Why.TRIPLE_FAULT),
    # A load from a physical address that is neither RAM nor a device (an error
    # with unassigned_ok=False; by default it reads 0, as on QEMU).
    "error": ("mov rax, 0xE0000000\nmov rax, [rax]", Why.ERROR),
}


@pytest.mark.parametrize("timing", TIMINGS, ids=lambda t: t.value)
@pytest.mark.parametrize("ending", list(ENDINGS))
def test_no_output_lost_when_the_machine_stops(timing: SerialTiming, ending: str) -> None:
    code, why = ENDINGS[ending]
    h = Harness.from_asm(_write_all(MESSAGE) + "\n" + code, serial_timing=timing,
                         unassigned_ok=ending != "error")
    r = h.run_to_end(LIMIT)
    assert r.why == why, r.message
    assert h.serial(0).output == MESSAGE
    assert h.machine.uarts[0].tx_dropped == 0
    times = h.serial(0).times
    if timing is SerialTiming.BAUD:
        # Stamped when each byte would have left the line: one character time apart.
        assert [b - a for a, b in zip(times, times[1:])] == [C9600] * (len(MESSAGE) - 1)
    else:
        assert times[-1] - times[0] < 100                # a few instructions: one write each
    assert h.machine.uarts[0].read(LSR - COM1, 1) == 0x60    # THRE|TEMT: nothing left in flight


def test_a_time_limit_leaves_the_transmitter_running() -> None:
    """A time limit can be resumed: the bytes keep their line timing, none is sent early."""
    h = Harness.from_asm(_write_all(b"abc") + "\nspin: jmp spin")
    r = h.run_for(C9600 // 2)
    assert r.why == Why.TIME_LIMIT and h.serial(0).output == b""
    h.run_for(3 * C9600)
    assert h.serial(0).output == b"abc"


def _polling_print(n: int) -> str:
    """Print ``n`` bytes at 115200 baud, polling LSR.THRE before each, then exit."""
    return f"""
        mov dx, {COM1 + 3:#x}
        mov al, 0x83
        out dx, al
        mov dx, {COM1:#x}
        mov al, 1
        out dx, al
        mov dx, {COM1 + 1:#x}
        xor eax, eax
        out dx, al
        mov dx, {COM1 + 3:#x}
        mov al, 3
        out dx, al
        mov ecx, {n}
        mov bl, 0x41
    next:
        mov dx, {LSR:#x}
    wait:
        in al, dx
        test al, 0x20
        jz wait
        mov dx, {COM1:#x}
        mov al, bl
        out dx, al
        inc bl
        dec ecx
        jnz next
        mov dx, 0xf4
        xor eax, eax
        out dx, al
    """


@pytest.mark.parametrize("n", [1, 4])
def test_instant_timing_prints_without_spinning(n: int) -> None:
    """Measured with n=300: 25,868,222 instructions (59 s of host time on a busy
    machine) at 115200 baud, 3,017 instructions (0.01 s) in instant timing."""
    runs = {}
    for timing in TIMINGS:
        h = Harness.from_asm(_polling_print(n), serial_timing=timing)
        r = h.run_to_end(LIMIT)
        assert r.why == Why.EXIT
        assert h.serial(0).output == bytes(range(0x41, 0x41 + n))
        runs[timing] = h.instructions
    assert runs[SerialTiming.INSTANT] < 20 + 10 * n
    if n > 1:
        # THR and the shift register take two bytes at once; every further byte
        # waits one character time for THRE (1 ns per instruction).
        assert runs[SerialTiming.BAUD] > (n - 2) * C115200
        assert runs[SerialTiming.BAUD] > 1000 * runs[SerialTiming.INSTANT]


def test_bad_serial_timing_name_is_refused() -> None:
    with pytest.raises(ValueError):
        Harness(serial_timing="warp")
