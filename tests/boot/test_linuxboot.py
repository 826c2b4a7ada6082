"""The Linux/x86 boot protocol (boot/linuxboot.py) with a bzImage of our own.

The image is built here from Documentation/x86/boot.rst: a boot sector with
the setup header (``HdrS``, protocol 2.15), seven setup sectors of 16-bit code
and a protected-mode kernel loaded at 0x100000 with a 32-bit entry at +0 and a
64-bit entry at +0x200.

* The 16-bit setup code is what a BIOS boot loader (QEMU) runs: it asks the
  BIOS for the E820 map (INT 15h) into the zero page, as Linux's setup does,
  enters protected mode with __BOOT_CS = 0x10 / __BOOT_DS = 0x18 and jumps to
  ``code32_start`` with ESI = the zero page.  vmk never runs it: it enters
  after it, as the protocol allows.
* The 32-bit entry switches to long mode and joins the 64-bit entry, which
  prints what holds on any correct loader: the entry it was started at, CS,
  RFLAGS.IF, the zero page's address, type_of_loader, loadflags,
  heap_end_ptr, the command line, the initrd's address, size and byte sum, and
  the E820 table; then it exits through isa-debug-exit (status 0x21).

With XLF_KERNEL_64 clear vmk takes the 32-bit entry, as QEMU's setup path
does, and the same file prints the same bytes on QEMU; with it set vmk takes
the 64-bit entry and only the entry line differs.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from vmk.boot.firmware import memory_map
from vmk.boot.linuxboot import BOOT_PARAMS, CMDLINE_ADDR
from vmk.boot.loader import ImageError
from vmk.machine.cpu import EFER_LMA, MSR_EFER, Reg
from vmk.machine.pc import Why
from vmk.testing import Harness, assemble

MEM = 128 << 20
KERNEL = 0x100000
KDATA = KERNEL + 0xF00          # MODE dword
STRINGS = KERNEL + 0xC00
GDT64 = KERNEL + 0xE00
PAGES = 0x110000
SETUP_START = 0x280             # file offset the jump at 0x200 goes to, past the header
CODE_OFF = 0xE00                # the setup code proper: past the zero page's E820 table (0x2D0-0xCFF)
GDT_OFF, GDTR_OFF, PM32_OFF = 0xF00, 0xF20, 0xF40
SETUP_SECTS = 7
COMMON_OFF = 0x240              # the code both entries run, in long mode
CMDLINE = "console=ttyS0 vmk.linuxboot=yes root=/dev/ram0"
INITRD = bytes((i * 7 + 3) & 0xFF for i in range(5000))
EXIT_STATUS = (0x10 << 1) | 1

SETUP16 = f"""
    cli
    mov ax, cs
    sub ax, 0x20
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0xF000
    xor ebx, ebx
    mov di, 0x2D0
    xor si, si
e820_next:
    mov eax, 0xE820
    mov edx, 0x534D4150
    mov ecx, 20
    int 0x15
    jc e820_done
    cmp eax, 0x534D4150
    jne e820_done
    add di, 20
    inc si
    test ebx, ebx
    jz e820_done
    cmp si, 128
    jb e820_next
e820_done:
    mov ax, si
    mov bx, 0x1E8
    mov byte ptr [bx], al
    xor ebx, ebx
    mov bx, ds
    shl ebx, 4
    mov eax, ebx
    add eax, {GDT_OFF}
    mov bx, {GDTR_OFF + 2}
    mov dword ptr [bx], eax
    mov bx, {GDTR_OFF}
    lgdt [bx]
    xor ebx, ebx
    mov bx, ds
    shl ebx, 4
    mov esi, ebx
    mov eax, cr0
    or al, 1
    mov cr0, eax
    mov eax, ebx
    add eax, {PM32_OFF}
"""
# then: push dword 0x10; push eax; o32 retf (encoded by hand below)

PM32 = """
    mov ax, 0x18
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov eax, dword ptr [esi + 0x214]
    xor ebp, ebp
    xor edi, edi
    xor ebx, ebx
    jmp eax
"""

ENTRY32 = f"""
    mov esp, 0x180000
    mov dword ptr [{KDATA:#x}], 0x20
    mov edi, {PAGES:#x}
    xor eax, eax
    mov ecx, 3072
    cld
    rep stosd
    mov dword ptr [{PAGES:#x}], {PAGES + 0x1003:#x}
    mov dword ptr [{PAGES + 0x1000:#x}], {PAGES + 0x2003:#x}
    mov edi, {PAGES + 0x2000:#x}
    mov eax, 0x83
    mov ecx, 512
fill:
    mov dword ptr [edi], eax
    add eax, 0x200000
    add edi, 8
    loop fill
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, {PAGES:#x}
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    lgdt [{GDT64 + 0x20:#x}]
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    push 0x10
    push {KERNEL + COMMON_OFF:#x}
    retf
"""

ENTRY64 = f"""
    mov rbp, {KDATA:#x}
    mov dword ptr [rbp], 0x40
    jmp {KERNEL + COMMON_OFF:#x}
"""

COMMON = f"""
    mov rbp, {KDATA:#x}
    mov r12, rsi
    mov r13, rsp
    mov rsp, 0x180000
    pushfq
    pop r14
    mov rsi, {STRINGS:#x}
    call puts
    mov eax, dword ptr [rbp]
    mov ecx, 2
    call hex
    mov rsi, {STRINGS + 0x20:#x}
    call puts
    xor eax, eax
    mov ax, cs
    mov ecx, 4
    call hex
    mov rsi, {STRINGS + 0x28:#x}
    call puts
    mov rax, r14
    shr rax, 9
    and eax, 1
    mov ecx, 1
    call hex
    mov rsi, {STRINGS + 0x30:#x}
    call puts
    mov rax, r12
    mov ecx, 8
    call hex
    mov rsi, {STRINGS + 0x40:#x}
    call puts
    movzx eax, byte ptr [r12 + 0x210]
    mov ecx, 2
    call hex
    mov rsi, {STRINGS + 0x50:#x}
    call puts
    movzx eax, byte ptr [r12 + 0x211]
    mov ecx, 2
    call hex
    mov rsi, {STRINGS + 0x58:#x}
    call puts
    movzx eax, word ptr [r12 + 0x224]
    mov ecx, 4
    call hex
    mov rsi, {STRINGS + 0x60:#x}
    call puts
    mov eax, dword ptr [r12 + 0x228]
    mov ecx, 8
    call hex
    mov al, 0x20
    call putc
    mov esi, dword ptr [r12 + 0x228]
    call puts
    mov rsi, {STRINGS + 0x70:#x}
    call puts
    mov eax, dword ptr [r12 + 0x218]
    mov ecx, 8
    call hex
    mov rsi, {STRINGS + 0x90:#x}
    call puts
    mov eax, dword ptr [r12 + 0x21c]
    mov ecx, 8
    call hex
    mov rsi, {STRINGS + 0x98:#x}
    call puts
    mov esi, dword ptr [r12 + 0x218]
    mov ecx, dword ptr [r12 + 0x21c]
    xor eax, eax
    xor edx, edx
sum:
    test ecx, ecx
    jz sum_done
    mov dl, byte ptr [rsi]
    add eax, edx
    inc rsi
    dec ecx
    jmp sum
sum_done:
    mov ecx, 8
    call hex
    mov rsi, {STRINGS + 0xA0:#x}
    call puts
    movzx eax, byte ptr [r12 + 0x1e8]
    mov r15, rax
    mov ecx, 2
    call hex
    mov al, 10
    call putc
    lea rbx, [r12 + 0x2d0]
e820:
    test r15, r15
    jz finish
    mov rax, qword ptr [rbx]
    mov ecx, 16
    call hex
    mov al, 0x20
    call putc
    mov rax, qword ptr [rbx + 8]
    mov ecx, 16
    call hex
    mov al, 0x20
    call putc
    mov eax, dword ptr [rbx + 16]
    mov ecx, 1
    call hex
    mov al, 10
    call putc
    add rbx, 20
    dec r15
    jmp e820
finish:
    mov dx, 0xf4
    mov eax, 0x10
    out dx, eax
halt:
    cli
    hlt
    jmp halt
putc:
    push rdx
    push rax
    mov dx, 0x3fd
putc_wait:
    in al, dx
    test al, 0x20
    jz putc_wait
    pop rax
    mov dx, 0x3f8
    out dx, al
    pop rdx
    ret
puts:
    push rax
puts_next:
    mov al, byte ptr [rsi]
    inc rsi
    test al, al
    jz puts_end
    call putc
    jmp puts_next
puts_end:
    pop rax
    ret
hex:
    push rbx
    mov rbx, rax
hex_next:
    dec ecx
    mov rax, rbx
    push rcx
    shl ecx, 2
    shr rax, cl
    pop rcx
    and eax, 15
    cmp al, 10
    jb hex_digit
    add al, 39
hex_digit:
    add al, 48
    call putc
    test ecx, ecx
    jnz hex_next
    pop rbx
    ret
"""

STRING_TABLE = {0x00: "linuxboot: entry ", 0x20: " cs ", 0x28: " if ", 0x30: "\nzero page ",
                0x40: " loader ", 0x50: " flags ", 0x58: " heap ", 0x60: "\ncmdline ",
                0x70: "\ninitrd ", 0x90: " size ", 0x98: " sum ", 0xA0: "\ne820 "}


def bzimage(kernel64: bool = True, version: int = 0x020F) -> bytes:
    """A bzImage: boot sector + 7 setup sectors (header, 16-bit setup, GDT, 32-bit stub) + kernel."""
    setup = bytearray((SETUP_SECTS + 1) * 512)
    jump = assemble(f"jmp {CODE_OFF - 0x200:#x}", SETUP_START - 0x200, bits=16)
    setup[SETUP_START:SETUP_START + len(jump)] = jump
    code16 = assemble(SETUP16, CODE_OFF - 0x200, bits=16) + bytes([0x66, 0x6A, 0x10, 0x66, 0x50, 0x66, 0xCB])
    assert CODE_OFF + len(code16) <= GDT_OFF, len(code16)
    setup[CODE_OFF:CODE_OFF + len(code16)] = code16
    setup[GDT_OFF:GDT_OFF + 32] = struct.pack("<4Q", 0, 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)
    setup[GDTR_OFF:GDTR_OFF + 6] = struct.pack("<HI", 31, 0)
    pm32 = assemble(PM32, 0, bits=32)
    setup[PM32_OFF:PM32_OFF + len(pm32)] = pm32
    kernel = bytearray(0x1000)
    e32 = assemble(ENTRY32, KERNEL, bits=32)
    assert len(e32) <= 0x200
    kernel[:len(e32)] = e32
    e64 = assemble(ENTRY64, KERNEL + 0x200, bits=64)
    assert 0x200 + len(e64) <= COMMON_OFF, len(e64)
    kernel[0x200:0x200 + len(e64)] = e64
    common = assemble(COMMON, KERNEL + COMMON_OFF, bits=64)
    assert COMMON_OFF + len(common) <= 0xC00, len(common)
    kernel[COMMON_OFF:COMMON_OFF + len(common)] = common
    for off, text in STRING_TABLE.items():
        kernel[0xC00 + off:0xC00 + off + len(text) + 1] = text.encode() + b"\0"
    kernel[0xE00:0xE20] = struct.pack("<4Q", 0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
    kernel[0xE20:0xE26] = struct.pack("<HI", 31, GDT64)
    # The setup header (boot.rst): 0x1F1 onwards
    struct.pack_into("<B", setup, 0x1F1, SETUP_SECTS)               # setup_sects
    struct.pack_into("<I", setup, 0x1F4, len(kernel) // 16)         # syssize
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)                    # boot_flag
    setup[0x200:0x202] = bytes([0xEB, SETUP_START - 0x202])         # jmp short to the setup code
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<B", setup, 0x211, 0x01)                      # loadflags: LOADED_HIGH
    struct.pack_into("<I", setup, 0x214, KERNEL)                    # code32_start
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)                # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, 0x200000)                  # kernel_alignment
    struct.pack_into("<H", setup, 0x236, 1 if kernel64 else 0)      # xloadflags: XLF_KERNEL_64
    struct.pack_into("<I", setup, 0x238, 2047)                      # cmdline_size
    struct.pack_into("<Q", setup, 0x258, KERNEL)                    # pref_address
    struct.pack_into("<I", setup, 0x260, 0x100000)                  # init_size
    return bytes(setup + kernel)


def expected(entry: int) -> bytes:
    """What a correct loader gives this kernel: QEMU's addresses and the E820 map at 128 MiB."""
    isize = len(INITRD)
    iaddr = (MEM - 0x20000 - isize) & ~0xFFF
    lines = [f"linuxboot: entry {entry:02x} cs 0010 if 0",
             f"zero page {BOOT_PARAMS:08x} loader b0 flags 81 heap fe00",
             f"cmdline {CMDLINE_ADDR:08x} {CMDLINE}",
             f"initrd {iaddr:08x} size {isize:08x} sum {sum(INITRD):08x}",
             f"e820 {len(memory_map(MEM)):02x}"]
    lines += [f"{b:016x} {n:016x} {t:x}" for b, n, t in memory_map(MEM)]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("linuxboot")
    out = {}
    for name, k64 in (("bz64", True), ("bz32", False)):
        (d / name).write_bytes(bzimage(k64))
        out[name] = d / name
    (d / "initrd").write_bytes(INITRD)
    out["initrd"] = d / "initrd"
    return out


def run_vmk(images, name: str) -> tuple[bytes, int | None]:
    h = Harness.boot(str(images[name]), CMDLINE, [str(images["initrd"])], mem=MEM, serial_timing="instant")
    r = h.run_to_end(50_000_000)
    assert r.why == Why.EXIT, r
    return h.serial(0).output, r.exit_status


def test_entry_state_64(images) -> None:
    """boot.rst "64-bit BOOT PROTOCOL": long mode, CS 0x10 / DS 0x18 flat, IF=0, RSI = zero page."""
    h = Harness.boot(str(images["bz64"]), CMDLINE, [str(images["initrd"])], mem=MEM)
    assert h.boot_info.kind == "linux" and h.boot_info.entry == KERNEL + 0x200
    uc = h.machine.cpu.uc
    assert h.machine.cpu.rip == KERNEL + 0x200
    assert uc.reg_read(Reg.RSI) == BOOT_PARAMS
    assert uc.msr_read(MSR_EFER) & EFER_LMA and uc.reg_read(Reg.CR0) & 0x8000_0001 == 0x8000_0001
    assert uc.reg_read(Reg.CS) == 0x10 and uc.reg_read(Reg.DS) == 0x18 and uc.reg_read(Reg.SS) == 0x18
    assert h.machine.cpu.rflags & 0x200 == 0
    _, gdt, _, _ = uc.reg_read(Reg.GDTR)
    assert h.u64(gdt + 0x10) == 0x00AF9B000000FFFF and h.u64(gdt + 0x18) == 0x00CF93000000FFFF
    zp = h.read(BOOT_PARAMS, 0x1000)
    assert zp[0x202:0x206] == b"HdrS" and zp[0x210] == 0xB0
    assert zp[0x1F1:0x280] != bytes(0x8F) and zp[0x1F4:0x1F8] == bzimage()[0x1F4:0x1F8]
    cmd_ptr, = struct.unpack_from("<I", zp, 0x228)
    assert h.read(cmd_ptr, len(CMDLINE) + 1) == CMDLINE.encode() + b"\0"
    addr, size = struct.unpack_from("<II", zp, 0x218)
    assert size == len(INITRD) and addr % 4096 == 0 and h.read(addr, size) == INITRD
    assert zp[0x1E8] == len(memory_map(MEM))
    table = [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(zp[0x1E8])]
    assert table == memory_map(MEM)
    assert h.read(KERNEL, 0x1000) == bzimage()[(SETUP_SECTS + 1) * 512:]


def test_entry_state_32(images) -> None:
    """boot.rst "32-bit BOOT PROTOCOL": protected mode, paging off, ESI = zero page, EBP = EDI = EBX = 0."""
    h = Harness.boot(str(images["bz32"]), CMDLINE, [], mem=MEM)
    uc = h.machine.cpu.uc
    assert h.machine.cpu.rip == KERNEL
    assert uc.reg_read(Reg.RSI) == BOOT_PARAMS
    assert uc.reg_read(Reg.CR0) & 0x8000_0001 == 1          # (EFER.LMA reads back set: notes §7's quirk)
    assert uc.reg_read(Reg.CS) == 0x10 and uc.reg_read(Reg.DS) == 0x18
    assert (uc.reg_read(Reg.RBP), uc.reg_read(Reg.RDI), uc.reg_read(Reg.RBX)) == (0, 0, 0)
    assert struct.unpack_from("<II", h.read(BOOT_PARAMS + 0x218, 8)) == (0, 0)     # no initrd


def test_64_bit_entry_prints_the_zero_page(images) -> None:
    out, status = run_vmk(images, "bz64")
    assert out == expected(0x40)
    assert status == EXIT_STATUS


def test_32_bit_entry_prints_the_same(images) -> None:
    out, status = run_vmk(images, "bz32")
    assert out == expected(0x20)
    assert status == EXIT_STATUS


def test_two_runs_print_the_same_bytes(images) -> None:
    assert run_vmk(images, "bz64") == run_vmk(images, "bz64")


@pytest.mark.parametrize("name,entry", [("bz32", 0x20), ("bz64", 0x20)])
def test_same_bytes_as_qemu(images, name: str, entry: int) -> None:
    """QEMU runs the 16-bit setup (E820 from SeaBIOS) and enters at 32 bits either way."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86); vmk side ran above")
    proc = subprocess.run([qemu, "-accel", "tcg", "-kernel", str(images[name]), "-initrd", str(images["initrd"]),
                           "-append", CMDLINE, "-serial", "stdio", "-display", "none", "-no-reboot",
                           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-m", "128"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert proc.stdout == expected(entry)
    assert proc.returncode == EXIT_STATUS
    if name == "bz32":
        assert run_vmk(images, name) == (proc.stdout, proc.returncode)


def _load(tmp_path, data: bytes, cmdline: str = "", initrd: list[str] | None = None) -> str:
    p = tmp_path / "bad"
    p.write_bytes(data)
    with pytest.raises(ImageError) as e:
        Harness.boot(str(p), cmdline, initrd, mem=MEM)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    return msg


def test_malformed_images(tmp_path) -> None:
    good = bzimage()
    assert "too old" in _load(tmp_path, good[:0x206] + b"\x01\x02" + good[0x208:])
    assert "too short" in _load(tmp_path, good[:0x300])
    assert "0xAA55" in _load(tmp_path, good[:0x1FE] + b"\0\0" + good[0x200:])
    assert "zImage" in _load(tmp_path, good[:0x211] + b"\0" + good[0x212:])
    assert "truncated" in _load(tmp_path, good[:-0x800])
    assert "past the end" in _load(tmp_path, good[:0x1F1] + b"\x40" + good[0x1F2:])
    assert "at most 2047" in _load(tmp_path, good, "x" * 3000)


def test_initrd_errors(tmp_path, images) -> None:
    assert "one initrd, not 2" in _load(tmp_path, bzimage(), "", [str(images["initrd"])] * 2)
    with pytest.raises(ImageError, match="cannot read the initrd"):
        Harness.boot(str(images["bz64"]), "", [str(tmp_path / "missing")], mem=MEM)
    big = tmp_path / "big"
    big.write_bytes(bytes(MEM))
    with pytest.raises(ImageError, match="does not fit"):
        Harness.boot(str(images["bz64"]), "", [str(big)], mem=MEM)


def test_cli_initrd_and_append(images, capfd) -> None:
    from vmk.tools.cli import main
    status = main(["boot", str(images["bz64"]), "-initrd", str(images["initrd"]), "-append", CMDLINE,
                   "--serial-timing", "instant", "--idle", "skip"])
    assert status == EXIT_STATUS
    assert capfd.readouterr().out.encode() == expected(0x40)
    status = main(["boot", str(images["bz64"]), "--initrd", f"{images['initrd']},{images['initrd']}"])
    assert status == 2
    assert "one initrd, not 2" in capfd.readouterr().err
