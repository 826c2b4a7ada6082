"""The Linux/x86 boot protocol: booting a bzImage as ``qemu-system-x86_64 -kernel`` does.

Written from the kernel's Documentation/x86/boot.rst ("THE LINUX/x86 BOOT
PROTOCOL").  A bzImage is the real-mode setup (a boot sector and
``setup_sects`` 512-byte sectors, the *setup header* at 0x1F1) followed by
the protected-mode kernel (``syssize`` 16-byte paragraphs).  The header is
recognised by the magic ``HdrS`` at 0x202 and the protocol version at 0x206.

A BIOS boot loader (QEMU's linuxboot option ROM) runs the real-mode setup,
which asks the BIOS for the memory map (INT 15h E820) and the video mode and
then enters the kernel in 32-bit mode.  vmk has no real-mode BIOS, so it
does what the setup code would have done and enters the kernel after it, as
the protocol allows ("32-bit/64-bit boot protocol", for loaders without a
BIOS, kexec and UEFI stubs):

* the protected-mode kernel is loaded at 0x100000, as QEMU loads it (a
  relocatable kernel moves itself to its ``pref_address``);
* the *zero page* (``struct boot_params``, 4 KiB) at :data:`BOOT_PARAMS`
  (0x10000, where QEMU puts the real-mode setup whose first 4 KiB it is) is
  zero except for the setup header copied from the image (0x1F1 up to
  0x202 + the byte at 0x201, the end of the header as boot.rst computes it),
  with the loader's fields set as QEMU sets them: ``type_of_loader`` 0xB0
  (QEMU's id), ``loadflags`` |= CAN_USE_HEAP with ``heap_end_ptr`` 0xFE00,
  ``cmd_line_ptr``, ``ramdisk_image``/``ramdisk_size``; and what the setup
  code fills in from the BIOS: the E820 table (the firmware's map,
  ``firmware.memory_map``), ``ext_mem_k``/``alt_mem_k`` and ``screen_info``
  for VGA text mode 3, 80x25 (what SeaBIOS leaves);
* the command line (NUL-terminated, at most ``cmdline_size`` bytes) at
  :data:`CMDLINE_ADDR` (0x20000, QEMU's address);
* the initrd page-aligned at the top of the memory below the ACPI tables
  and below ``initrd_addr_max``, as QEMU places it (at the end of RAM
  that the E820 map lists as usable);
* entry, for protocol >= 2.12 with XLF_KERNEL_64: the 64-bit entry at load
  address + 0x200, in long mode with the first 4 GiB identity-mapped (2 MiB
  pages), a GDT with flat __BOOT_CS (0x10, 64-bit code) and __BOOT_DS (0x18),
  CS = 0x10, DS = ES = SS = 0x18, IF = 0, RSI = the zero page; otherwise the
  32-bit entry at the header's ``code32_start`` (the load address) in flat protected mode with paging off,
  CS = 0x10 (32-bit code), DS = ES = SS = 0x18, ESI = the zero page, EBP = EDI
  = EBX = 0.

QEMU takes one initrd for a Linux kernel (``-initrd a,b`` names a multiboot
kernel's modules); so does vmk.  Not done: the 16-bit entry (no real-mode
BIOS), EDD, APM and IST info, setup_data (no DTB, no SETUP_E820_EXT: the
zero page holds 128 E820 entries, the firmware's map has 7), loading above
4 GiB (``ext_ramdisk_image`` stays 0).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from vmk.machine.cpu import EFER_LMA, EFER_LME, HF, MSR_EFER, Reg, Seg
from vmk.machine.mmu import CR0_PE, CR0_PG, CR0_WP, CR4_PAE
from vmk.machine.pc import Machine

from .firmware import ACPI_AREA_SIZE, bios_state, memory_map

__all__ = ["LinuxImageError", "LinuxBoot", "is_bzimage", "load_bzimage", "BOOT_PARAMS", "CMDLINE_ADDR",
           "KERNEL_ADDR", "HDRS_MAGIC", "LOADER_TYPE_QEMU"]

# Setup header offsets (boot.rst, "THE REAL-MODE KERNEL HEADER"); in the image and in the zero page alike.
HDR_START = 0x1F1
SETUP_SECTS = 0x1F1
SYSSIZE = 0x1F4
BOOT_FLAG = 0x1FE
JUMP = 0x200
HEADER = 0x202
VERSION = 0x206
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
CODE32_START = 0x214
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238

# Zero page (struct boot_params, boot.rst "THE ZERO PAGE" / zero-page.rst)
ZP_SIZE = 0x1000
ZP_SCREEN_INFO = 0x000
ZP_ALT_MEM_K = 0x1E0
ZP_E820_ENTRIES = 0x1E8
ZP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128

HDRS_MAGIC = 0x53726448             # "HdrS"
BOOT_FLAG_MAGIC = 0xAA55
LOADER_TYPE_QEMU = 0xB0             # boot.rst's boot loader ids: 0xB = Qemu, version 0
LOADED_HIGH = 0x01                  # loadflags
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01                # xloadflags
PROTOCOL_MIN = 0x202                # LOADED_HIGH kernels with cmd_line_ptr
PROTOCOL_64BIT = 0x20C              # 2.12: xloadflags and the 64-bit entry
DEFAULT_INITRD_MAX = 0x37FFFFFF     # boot.rst: for protocol < 2.03
DEFAULT_CMDLINE_SIZE = 255          # boot.rst: for protocol < 2.06

# Where vmk puts the boot data (low memory, QEMU's addresses where it has them; Linux reserves the first MiB)
PML4_ADDR = 0x1000                  # .. 0x6FFF: PML4, PDPT, 4 page directories
GDT_ADDR = 0x7000
BOOT_PARAMS = 0x10000               # QEMU's real_addr: where the setup code and its zero page are
CMDLINE_ADDR = 0x20000              # QEMU's cmdline_addr for protocol >= 2.02
CMDLINE_END = 0x80000
STACK_TOP = 0x80000
KERNEL_ADDR = 0x100000
ENTRY_64_OFFSET = 0x200
HEAP_END = 0xFE00                   # QEMU: cmdline_addr - real_addr - 0x200

BOOT_CS = 0x10
BOOT_DS = 0x18
CODE64_FLAGS = 0x00AF9B00
CODE32_FLAGS = 0x00CF9B00
DATA32_FLAGS = 0x00CF9300
GDT = [0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF]          # 0x10: 64-bit code, 0x18: flat data
GDT32 = [0, 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF]        # 0x10: 32-bit code, 0x18: flat data
CR0_ET = 1 << 4

# screen_info (include/uapi/linux/screen_info.h) for VGA text mode 3, as the setup code reads it from the BIOS
SI_ORIG_VIDEO_MODE = 0x06
SI_ORIG_VIDEO_COLS = 0x07
SI_ORIG_VIDEO_EGA_BX = 0x0A
SI_ORIG_VIDEO_LINES = 0x0E
SI_ORIG_VIDEO_ISVGA = 0x0F
SI_ORIG_VIDEO_POINTS = 0x10
SI_EXT_MEM_K = 0x02


class LinuxImageError(Exception):
    """A bzImage that cannot be booted (loader.py turns it into its ImageError)."""


@dataclass(slots=True)
class LinuxBoot:
    protocol: int
    entry: int
    mode: str                       # "64" or "32"
    load_end: int
    initrd_addr: int
    initrd_size: int


def is_bzimage(data: bytes) -> bool:
    """A Linux kernel image: the setup header's magic ``HdrS`` at 0x202 (QEMU checks it before multiboot)."""
    return len(data) >= HEADER + 4 and struct.unpack_from("<I", data, HEADER)[0] == HDRS_MAGIC


def load_bzimage(machine: Machine, data: bytes, path: str, cmdline: str, initrd: bytes | None) -> LinuxBoot:
    """Load a bzImage, its command line and initrd, build the zero page and enter the kernel."""
    if len(data) < 0x400:
        raise LinuxImageError(f"{path}: Linux image too short ({len(data)} bytes) for a setup header")
    protocol = struct.unpack_from("<H", data, VERSION)[0]
    if protocol < PROTOCOL_MIN:
        raise LinuxImageError(f"{path}: Linux boot protocol {protocol >> 8}.{protocol & 0xFF:02d} is too old "
                              f"(vmk boots 2.02 and later)")
    if struct.unpack_from("<H", data, BOOT_FLAG)[0] != BOOT_FLAG_MAGIC:
        raise LinuxImageError(f"{path}: Linux setup header without the boot_flag 0xAA55 at 0x1FE")
    loadflags = data[LOADFLAGS]
    if not loadflags & LOADED_HIGH:
        raise LinuxImageError(f"{path}: a zImage (loadflags.LOADED_HIGH clear, kernel at 0x10000) is not supported")
    setup_sects = data[SETUP_SECTS] or 4
    setup_size = (setup_sects + 1) * 512
    syssize = struct.unpack_from("<I", data, SYSSIZE)[0] * 16
    hdr_end = JUMP + 2 + data[JUMP + 1]             # boot.rst: 0x0202 + the byte at 0x0201
    if hdr_end > setup_size or hdr_end > ZP_SIZE:
        raise LinuxImageError(f"{path}: setup header end {hdr_end:#x} is past the setup code "
                              f"({setup_sects} sectors)")
    if setup_size >= len(data):
        raise LinuxImageError(f"{path}: setup_sects {setup_sects} puts the kernel past the end of the file "
                              f"({len(data)} bytes)")
    kernel = data[setup_size:]
    if syssize and syssize > len(kernel) + 15:
        raise LinuxImageError(f"{path}: syssize says {syssize} bytes of kernel, the file has {len(kernel)}: "
                              "truncated?")
    xloadflags = struct.unpack_from("<H", data, XLOADFLAGS)[0] if protocol >= PROTOCOL_64BIT else 0
    initrd_max = struct.unpack_from("<I", data, INITRD_ADDR_MAX)[0] if protocol >= 0x203 else DEFAULT_INITRD_MAX
    cmdline_max = struct.unpack_from("<I", data, CMDLINE_SIZE)[0] if protocol >= 0x206 else DEFAULT_CMDLINE_SIZE

    ram = machine.ram.size
    usable_top = min(ram, 1 << 32) - ACPI_AREA_SIZE
    load_end = KERNEL_ADDR + len(kernel)
    if load_end > usable_top:
        raise LinuxImageError(f"{path}: the {len(kernel)}-byte kernel does not fit in {ram >> 20} MiB of RAM "
                              "(try --mem)")
    cmd = cmdline.encode()
    if len(cmd) > cmdline_max:
        raise LinuxImageError(f"{path}: command line of {len(cmd)} bytes, the kernel takes at most {cmdline_max}")
    if CMDLINE_ADDR + len(cmd) + 1 > CMDLINE_END:
        raise LinuxImageError(f"{path}: command line of {len(cmd)} bytes is too long")
    initrd_addr = 0
    initrd_size = 0
    if initrd is not None:
        initrd_size = len(initrd)
        limit = min(initrd_max + 1, usable_top)
        initrd_addr = (limit - initrd_size) & ~0xFFF
        if initrd_addr < load_end:
            raise LinuxImageError(f"{path}: the {initrd_size}-byte initrd does not fit between the kernel and "
                                  f"{limit:#x} (try --mem)")

    # The firmware first: bios_state writes its tables and programs the devices; then our data.
    bios_state(machine)
    machine.write_physical(KERNEL_ADDR, kernel)
    if initrd:
        machine.write_physical(initrd_addr, initrd)
    machine.write_physical(CMDLINE_ADDR, cmd + b"\0")
    zp = _zero_page(data, hdr_end, ram, initrd_addr, initrd_size, loadflags)
    machine.write_physical(BOOT_PARAMS, zp)
    if xloadflags & XLF_KERNEL_64:
        entry = KERNEL_ADDR + ENTRY_64_OFFSET
        _enter_64(machine, entry)
        mode = "64"
    else:
        entry = struct.unpack_from("<I", data, CODE32_START)[0] or KERNEL_ADDR   # where the setup code jumps
        _enter_32(machine, entry)
        mode = "32"
    return LinuxBoot(protocol, entry, mode, load_end, initrd_addr, initrd_size)


def _zero_page(data: bytes, hdr_end: int, ram: int, initrd_addr: int, initrd_size: int, loadflags: int) -> bytes:
    zp = bytearray(ZP_SIZE)
    zp[HDR_START:hdr_end] = data[HDR_START:hdr_end]
    zp[TYPE_OF_LOADER] = LOADER_TYPE_QEMU
    zp[LOADFLAGS] = loadflags | CAN_USE_HEAP
    struct.pack_into("<H", zp, HEAP_END_PTR, HEAP_END)
    struct.pack_into("<I", zp, CMD_LINE_PTR, CMDLINE_ADDR)
    struct.pack_into("<II", zp, RAMDISK_IMAGE, initrd_addr, initrd_size)
    # What the real-mode setup code would have asked the BIOS for.
    ext_k = (min(ram, 1 << 32) - (1 << 20)) >> 10
    struct.pack_into("<H", zp, ZP_SCREEN_INFO + SI_EXT_MEM_K, min(ext_k, 0xFC00))   # INT 15h AH=88h caps it
    zp[ZP_SCREEN_INFO + SI_ORIG_VIDEO_MODE] = 3
    zp[ZP_SCREEN_INFO + SI_ORIG_VIDEO_COLS] = 80
    struct.pack_into("<H", zp, ZP_SCREEN_INFO + SI_ORIG_VIDEO_EGA_BX, 0x0003)       # colour, 256 KiB
    zp[ZP_SCREEN_INFO + SI_ORIG_VIDEO_LINES] = 25
    zp[ZP_SCREEN_INFO + SI_ORIG_VIDEO_ISVGA] = 1
    struct.pack_into("<H", zp, ZP_SCREEN_INFO + SI_ORIG_VIDEO_POINTS, 16)
    struct.pack_into("<I", zp, ZP_ALT_MEM_K, ext_k)                                 # INT 15h E801h
    mmap = memory_map(ram)[:E820_MAX_ENTRIES_ZEROPAGE]
    zp[ZP_E820_ENTRIES] = len(mmap)
    for i, (base, length, kind) in enumerate(mmap):
        struct.pack_into("<QQI", zp, ZP_E820_TABLE + 20 * i, base, length, kind)
    return bytes(zp)


def _write_gdt(machine: Machine, gdt: list[int]) -> None:
    machine.write_physical(GDT_ADDR, struct.pack(f"<{len(gdt)}Q", *gdt))
    machine.cpu.uc.reg_write(Reg.GDTR, (0, GDT_ADDR, 8 * len(gdt) - 1, 0))


def _enter_64(machine: Machine, entry: int) -> None:
    """boot.rst "64-bit BOOT PROTOCOL": long mode, identity-mapped, __BOOT_CS/__BOOT_DS, IF=0, RSI = zero page."""
    cpu = machine.cpu
    uc = cpu.uc
    _write_gdt(machine, GDT)
    pdpt = PML4_ADDR + 0x1000
    pds = PML4_ADDR + 0x2000
    machine.write_physical(PML4_ADDR, struct.pack("<Q", pdpt | 0x3) + bytes(4088))
    machine.write_physical(pdpt, b"".join(struct.pack("<Q", (pds + 0x1000 * i) | 0x3) for i in range(4))
                           + bytes(4096 - 32))
    machine.write_physical(pds, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(2048)))
    uc.reg_write(Reg.CR3, PML4_ADDR)
    uc.reg_write(Reg.CR4, CR4_PAE)
    uc.msr_write(MSR_EFER, EFER_LME | EFER_LMA)
    uc.reg_write(Reg.CR0, CR0_PE | CR0_ET | CR0_WP | CR0_PG)
    data = (BOOT_DS, 0, 0xFFFF_FFFF, DATA32_FLAGS)
    cpu.set_hidden_state(cpl=0, segs={
        Seg.CS: (BOOT_CS, 0, 0xFFFF_FFFF, CODE64_FLAGS),
        Seg.SS: data, Seg.DS: data, Seg.ES: data, Seg.FS: data, Seg.GS: data,
    }, hflags_set=HF.CS32 | HF.SS32 | HF.CS64 | HF.LMA | HF.PE, hflags_clear=HF.ADDSEG)
    for r in (Reg.RAX, Reg.RBX, Reg.RCX, Reg.RDX, Reg.RDI, Reg.RBP):
        uc.reg_write(r, 0)
    uc.reg_write(Reg.RSI, BOOT_PARAMS)
    uc.reg_write(Reg.RSP, STACK_TOP)
    cpu.rflags = 0x2
    cpu.rip = entry
    cpu.halted = False


def _enter_32(machine: Machine, entry: int) -> None:
    """boot.rst "32-bit BOOT PROTOCOL": flat protected mode, paging off, ESI = zero page, EBP = EDI = EBX = 0."""
    cpu = machine.cpu
    uc = cpu.uc
    _write_gdt(machine, GDT32)
    uc.msr_write(MSR_EFER, 0)
    uc.reg_write(Reg.CR4, 0)
    uc.reg_write(Reg.CR0, CR0_PE | CR0_ET)
    data = (BOOT_DS, 0, 0xFFFF_FFFF, DATA32_FLAGS)
    # Quirk: a UC_MODE_64 instance enters 32-bit mode by clearing HF_LMA/HF_CS64 (notes §7), as loader.py does.
    cpu.set_hidden_state(cpl=0, segs={
        Seg.CS: (BOOT_CS, 0, 0xFFFF_FFFF, CODE32_FLAGS),
        Seg.SS: data, Seg.DS: data, Seg.ES: data, Seg.FS: data, Seg.GS: data,
    }, hflags_set=HF.CS32 | HF.SS32 | HF.PE, hflags_clear=HF.LMA | HF.CS64 | HF.ADDSEG)
    for r in (Reg.RAX, Reg.RBX, Reg.RCX, Reg.RDX, Reg.RDI, Reg.RBP, Reg.RSP):
        uc.reg_write(r, 0)
    uc.reg_write(Reg.RSI, BOOT_PARAMS)
    cpu.rflags = 0x2
    cpu.rip = entry
    cpu.halted = False
