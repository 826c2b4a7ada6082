"""Loading kernels into the machine and setting up the initial CPU state.

Two kinds of bare-metal kernel boot, as users know them from QEMU:

* **Multiboot v1** (``qemu-system-x86_64 -kernel``): an ELF32 file, or any
  file with the a.out-kludge flag, whose first 8 KiB hold the multiboot
  header.  The CPU starts in 32-bit protected mode with paging off, flat
  CS/DS/ES/FS/GS/SS, IF=0, EAX=0x2BADB002 and EBX pointing at the multiboot
  information (memory bounds, a BIOS-style memory map, the command line,
  the boot loader name).  Like QEMU, an ELF64 file is refused for multiboot
  unless the header uses the a.out kludge.
* **ELF64 in long mode** (vmk's own convention, for kernels that skip the
  32-bit stage): the first 4 GiB are identity-mapped with 2 MiB pages, CS is a
  64-bit code segment, IF=0, RSP=0x80000, and the multiboot registers are
  passed both ways: EAX/EBX as above and RDI/RSI (magic, info) so a C entry
  ``kmain(uint32_t magic, uint32_t info)`` works directly.
* **Linux bzImage** (``-kernel bzImage -initrd FILE -append ARGS``): the
  Linux/x86 boot protocol, in ``linuxboot.py``.

Before the entry, the interrupt controllers, PIT and COM1 are left as a PC
BIOS leaves them, with its data area, MP and ACPI tables in memory and the
memory map it reports (``firmware.py``), as on QEMU.

Where vmk puts its own boot data: GDT 0x8000, multiboot info 0x9000 and the
memory map after it, long-mode page tables 0x10000-0x15FFF (low memory, below
the kernel); the module list, command lines, loader name and the modules on
the pages after the kernel's image, as QEMU places them
(``_write_multiboot_info``).

A malformed or unsupported image raises :class:`ImageError` whose message
names the file and what is wrong with it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field


from vmk.machine.cpu import EFER_LMA, EFER_LME, HF, MSR_EFER, Reg, Seg
from vmk.machine.mmu import CR0_PE, CR0_PG, CR0_WP, CR4_PAE
from vmk.machine.pc import Machine

from .elf import EM_X86_64, PF_X, PT_LOAD, ElfError, ElfImage
from .firmware import E820_RAM, bios_state, memory_map
from .linuxboot import BOOT_PARAMS, KERNEL_ADDR, LinuxImageError, is_bzimage, load_bzimage

__all__ = ["ImageError", "BootInfo", "load_kernel", "load_kernel_bytes", "split_initrd", "enter_protected_mode", "enter_long_mode", "MULTIBOOT_MAGIC", "MULTIBOOT_BOOTLOADER_MAGIC"]

MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MB_SEARCH = 8192
MB_FLAG_PAGE_ALIGN = 1 << 0
MB_FLAG_MEMINFO = 1 << 1
MB_FLAG_VIDEO = 1 << 2
MB_FLAG_AOUT_KLUDGE = 1 << 16

# multiboot_info.flags bits (multiboot spec 0.6.96 §3.3)
MBI_MEM = 1 << 0
MBI_BOOTDEV = 1 << 1
MBI_CMDLINE = 1 << 2
MBI_MODS = 1 << 3
MBI_MMAP = 1 << 6
MBI_LOADER_NAME = 1 << 9

GDT_ADDR = 0x8000
MBI_ADDR = 0x9000
MBI_SIZE = 0x58                    # up to boot_loader_name (multiboot spec 0.6.96 §3.3), APM/VBE not given
MB_MOD_SIZE = 16                   # mod_start, mod_end, string, reserved
BOOT_DEVICE = 0x8000FFFF           # BIOS drive 0x80, no partition: what QEMU reports
LOADER_NAME = b"vmk"
PAGE = 0x1000
PML4_ADDR = 0x10000
BOOT_DATA_END = PML4_ADDR + 0x6000
LONG_MODE_STACK = 0x80000
LOW_MEM_END = 0x9FC00              # 639 KiB of conventional memory, as QEMU reports
KERNEL_MIN = 0x100000

# Flat descriptors (high dword as QEMU's segment cache stores it)
CODE32_FLAGS = 0x00CF9B00
DATA32_FLAGS = 0x00CF9300
CODE64_FLAGS = 0x00AF9B00
GDT = [
    0,
    0x00CF9B000000FFFF,     # 0x08: 32-bit code, flat
    0x00CF93000000FFFF,     # 0x10: data, flat
    0x00AF9B000000FFFF,     # 0x18: 64-bit code
]
SEL_CODE32 = 0x08
SEL_DATA = 0x10
SEL_CODE64 = 0x18

CR0_ET = 1 << 4
CR4_OSFXSR = 1 << 9


class ImageError(Exception):
    """A kernel image that cannot be booted; the message says why, in one line."""


@dataclass(slots=True)
class BootInfo:
    path: str
    kind: str                           # "multiboot", "elf64" or "linux"
    entry: int
    mbi: int
    load_start: int
    load_end: int
    symbols: dict[str, int] = field(default_factory=dict)


def load_kernel(machine: Machine, path: str, cmdline: str = "", initrd: list[str] | None = None) -> BootInfo:
    """Load a kernel file into RAM and set the CPU state to its entry.

    ``cmdline`` is QEMU's ``-append`` (a multiboot kernel sees ``"PATH CMDLINE"``),
    ``initrd`` as QEMU's ``-initrd`` names them: a Linux kernel's one initial
    ramdisk, or the multiboot modules, one ``"FILE [ARGS]"`` string each (QEMU's
    ``-initrd "FILE ARGS,FILE2"`` as :func:`split_initrd` cuts it)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror}") from None
    return load_kernel_bytes(machine, data, path, cmdline, initrd)


def load_kernel_bytes(machine: Machine, data: bytes, path: str = "<image>", cmdline: str = "",
                      initrd: list[str] | None = None) -> BootInfo:
    if len(data) < 4:
        raise ImageError(f"{path}: file is too short ({len(data)} bytes) to be a kernel")
    if is_bzimage(data):        # QEMU looks for the Linux header before the multiboot one
        return _load_linux(machine, data, path, cmdline, initrd or [])
    header = _find_multiboot(data)
    is_elf = data[:4] == b"\x7fELF"
    if header is not None:
        off, flags = header[0], header[1]
        if flags & MB_FLAG_AOUT_KLUDGE:
            info = _load_aout_kludge(machine, data, path, off)
        elif not is_elf:
            raise ImageError(f"{path}: multiboot header at offset {off:#x} without the a.out kludge "
                             "(flag 16), and the file is not ELF")
        else:
            elf = _open_elf(data, path)
            if elf.elfclass != 32:
                raise ImageError(f"{path}: ELF64 multiboot kernels are not bootable (QEMU refuses them too): "
                                 "convert with 'objcopy -O elf32-i386' or set the a.out kludge")
            info = _load_elf(machine, elf, data, path, "multiboot")
        if flags & 0xFFFC & ~(MB_FLAG_MEMINFO | MB_FLAG_VIDEO) & 0xFFFF:
            raise ImageError(f"{path}: multiboot header requires unsupported features (flags {flags:#x})")
        info.mbi = _write_multiboot_info(machine, info, f"{path} {cmdline}", initrd or [])
        bios_state(machine)
        enter_protected_mode(machine, info.entry, info.mbi)
        return info
    if is_elf:
        elf = _open_elf(data, path)
        if elf.elfclass == 64:
            if elf.machine != EM_X86_64:
                raise ImageError(f"{path}: ELF64 for machine {elf.machine} (e_machine), not x86-64 ({EM_X86_64})")
            info = _load_elf(machine, elf, data, path, "elf64")
            info.mbi = _write_multiboot_info(machine, info, f"{path} {cmdline}", initrd or [])
            bios_state(machine)
            enter_long_mode(machine, info.entry, info.mbi)
            return info
        raise ImageError(f"{path}: ELF32 file without a multiboot header in its first 8 KiB")
    raise ImageError(f"{path}: not a kernel image (no ELF magic, no multiboot header in the first 8 KiB)")


# ---------------------------------------------------------------------- Linux bzImage
def _load_linux(machine: Machine, data: bytes, path: str, cmdline: str, initrd: list[str]) -> BootInfo:
    """A bzImage (linuxboot.py), with QEMU's rule for -initrd: one file for a Linux kernel."""
    if len(initrd) > 1:
        raise ImageError(f"{path}: a Linux kernel takes one initrd, not {len(initrd)} ({','.join(initrd)})")
    blob = None
    if initrd:
        try:
            with open(initrd[0], "rb") as f:
                blob = f.read()
        except OSError as e:
            raise ImageError(f"{initrd[0]}: cannot read the initrd: {e.strerror}") from None
    try:
        lb = load_bzimage(machine, data, path, cmdline, blob)
    except LinuxImageError as e:
        raise ImageError(str(e)) from None
    return BootInfo(path, "linux", lb.entry, BOOT_PARAMS, KERNEL_ADDR, lb.load_end)


# ---------------------------------------------------------------------- formats
def _find_multiboot(data: bytes) -> tuple[int, int, int] | None:
    for off in range(0, min(len(data), MB_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFF_FFFF == 0:
            return off, flags, checksum
    return None


def _open_elf(data: bytes, path: str) -> ElfImage:
    try:
        return ElfImage(data)
    except ElfError as e:
        raise ImageError(f"{path}: malformed ELF: {e}") from None


def _load_elf(machine: Machine, elf: ElfImage, data: bytes, path: str, kind: str) -> BootInfo:
    lo, hi = None, 0
    segments = [s for s in elf.segments if s["p_type"] == PT_LOAD]
    if not segments:
        raise ImageError(f"{path}: ELF has no loadable (PT_LOAD) segment")
    for i, seg in enumerate(segments):
        paddr, filesz, memsz, offset = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"], seg["p_offset"]
        if offset + filesz > len(data):
            raise ImageError(f"{path}: segment {i} (file offset {offset:#x}+{filesz:#x}) runs past the end "
                             f"of the file ({len(data):#x} bytes): truncated?")
        if memsz < filesz:
            raise ImageError(f"{path}: segment {i} has p_memsz < p_filesz")
        if paddr + memsz > machine.ram.size:
            raise ImageError(f"{path}: segment {i} at {paddr:#x}+{memsz:#x} does not fit in "
                             f"{machine.ram.size >> 20} MiB of RAM (try --mem)")
        if memsz and paddr < BOOT_DATA_END and paddr + memsz > GDT_ADDR:
            raise ImageError(f"{path}: segment {i} at {paddr:#x}+{memsz:#x} overlaps the boot loader's data "
                             f"at {GDT_ADDR:#x}-{BOOT_DATA_END:#x} (load kernels at 1 MiB or above)")
        machine.write_physical(paddr, data[offset:offset + filesz])
        if memsz > filesz:
            machine.write_physical(paddr + filesz, bytes(memsz - filesz))
        lo = paddr if lo is None else min(lo, paddr)
        hi = max(hi, paddr + memsz)
    entry = _physical_entry(elf.entry, segments)
    if kind == "multiboot":
        entry &= 0xFFFF_FFFF
    return BootInfo(path, kind, entry, 0, lo or 0, hi, elf.symbols())


def _physical_entry(entry: int, segments) -> int:
    """e_entry is a virtual address; the CPU starts with paging off.  A kernel
    linked for the higher half with AT() (xv6: entry 0x8010000c in a segment of
    vaddr 0x80100000, paddr 0x100000) starts at the physical address of its
    entry: inside an executable PT_LOAD segment's file image whose p_vaddr and
    p_paddr differ, entry - p_vaddr + p_paddr.  This is what QEMU's ELF loader
    does for -kernel (include/hw/elf_ops.h, load_elf: the same four
    conditions, the last matching segment wins); elsewhere the entry stays."""
    for seg in segments:
        vaddr, paddr = seg["p_vaddr"], seg["p_paddr"]
        if (vaddr != paddr and vaddr <= entry < vaddr + seg["p_filesz"]
                and seg["p_flags"] & PF_X):
            entry = entry - vaddr + paddr
    return entry


def _load_aout_kludge(machine: Machine, data: bytes, path: str, off: int) -> BootInfo:
    if off + 32 > len(data):
        raise ImageError(f"{path}: multiboot header at {off:#x} is truncated (a.out kludge needs 32 bytes)")
    header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<5I", data, off + 12)
    if load_addr > header_addr:
        raise ImageError(f"{path}: multiboot load_addr {load_addr:#x} is above header_addr {header_addr:#x}")
    start = off - (header_addr - load_addr)
    if start < 0:
        raise ImageError(f"{path}: multiboot header_addr/load_addr put the image before the file start")
    size = (load_end - load_addr) if load_end else len(data) - start
    if size < 0 or start + size > len(data):
        raise ImageError(f"{path}: multiboot load_end_addr {load_end:#x} is past the end of the file")
    end = max(load_addr + size, bss_end or 0)
    if end > machine.ram.size:
        raise ImageError(f"{path}: image at {load_addr:#x}..{end:#x} does not fit in "
                         f"{machine.ram.size >> 20} MiB of RAM (try --mem)")
    machine.write_physical(load_addr, data[start:start + size])
    if bss_end and bss_end > load_addr + size:
        machine.write_physical(load_addr + size, bytes(bss_end - load_addr - size))
    syms: dict[str, int] = {}
    if data[:4] == b"\x7fELF":
        try:
            syms = ElfImage(data).symbols()
        except ElfError:
            syms = {}
    return BootInfo(path, "multiboot", entry, 0, load_addr, end, syms)


# ---------------------------------------------------------------------- boot data
def split_initrd(spec: str) -> list[str]:
    """QEMU's ``-initrd`` value as a list of modules: items separated by ``,``,
    where ``,,`` stands for a comma inside an item (QEMU's option-value
    escaping, measured on QEMU 7.2); a trailing comma adds nothing."""
    items: list[str] = []
    i = 0
    while i < len(spec):
        item = []
        while i < len(spec):
            if spec[i] == ",":
                if spec[i + 1:i + 2] != ",":
                    break
                i += 1
            item.append(spec[i])
            i += 1
        items.append("".join(item))
        i += 1                                  # the separating comma
    return items


def _page_align(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


def _write_multiboot_info(machine: Machine, kernel: BootInfo, cmdline: str, initrd: list[str]) -> int:
    """The multiboot information (spec 0.6.96 §3.3) as QEMU 7.2's -kernel leaves it.

    Discussion: measured on QEMU with tests/guest/mbmods.c.  flags = MEM |
    BOOTDEV | CMDLINE | MODS | MMAP | LOADER_NAME (MODS even with no module),
    boot_device 0x8000FFFF.  The command line is "KERNEL-PATH ARGS" (with the
    space even when ARGS is empty).  On the first page boundary after the
    kernel's image (its lowest load address plus its page-aligned size)
    comes the module list (16 bytes a module), then the module strings, the
    command line and the loader name; the modules follow, each from the next
    page boundary, at start + page_align(previous end - start): an empty
    module shares its address with the next.  A module's string is its whole
    -initrd item ("FILE ARGS"); the file is the item up to the first space.
    The info structure and the memory map stay in low memory (0x9000)."""
    mmap = memory_map(machine.ram.size)
    upper = next(length for base, length, kind in mmap if base == KERNEL_MIN and kind == E820_RAM)
    mmap_bytes = b"".join(struct.pack("<IQQI", 20, base, length, kind) for base, length, kind in mmap)
    blobs = []
    for item in initrd:
        name = item.split(" ", 1)[0]
        try:
            with open(name, "rb") as f:
                blobs.append(f.read())
        except OSError as e:
            raise ImageError(f"{name}: cannot read multiboot module: {e.strerror}") from None
    strings = [item.encode() + b"\0" for item in initrd]
    cmd = cmdline.encode() + b"\0"
    name = LOADER_NAME + b"\0"
    info_page = kernel.load_start + _page_align(kernel.load_end - kernel.load_start)
    mods_addr = info_page
    addr = mods_addr + MB_MOD_SIZE * len(initrd)
    string_addrs = []
    for s in strings:
        string_addrs.append(addr)
        addr += len(s)
    cmd_addr = addr
    name_addr = cmd_addr + len(cmd)
    mod_base = info_page + _page_align(name_addr + len(name) - info_page)
    mods = []
    offset = mod_base
    for blob in blobs:
        mods.append((offset, offset + len(blob)))
        offset = _page_align(offset + len(blob))
    top = max([name_addr + len(name)] + [end for _, end in mods])
    ram_end = next(base + length for base, length, kind in mmap if base == KERNEL_MIN and kind == E820_RAM)
    if top > ram_end:
        raise ImageError(f"the kernel, its command line and {len(blobs)} multiboot module(s) end at {top:#x}, "
                         f"past the {ram_end >> 20} MiB of RAM below the PCI hole (try --mem)")
    mmap_addr = (MBI_ADDR + MBI_SIZE + 7) & ~7
    flags = MBI_MEM | MBI_BOOTDEV | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_LOADER_NAME
    mbi = bytearray(MBI_SIZE)
    struct.pack_into("<IIIIIII", mbi, 0, flags, LOW_MEM_END >> 10, upper >> 10, BOOT_DEVICE, cmd_addr,
                     len(initrd), mods_addr)
    struct.pack_into("<II", mbi, 44, len(mmap_bytes), mmap_addr)
    struct.pack_into("<I", mbi, 64, name_addr)
    machine.write_physical(MBI_ADDR, bytes(mbi))
    machine.write_physical(mmap_addr, mmap_bytes)
    machine.write_physical(info_page, b"".join(struct.pack("<IIII", start, end, string_addr, 0)
                                               for (start, end), string_addr in zip(mods, string_addrs)))
    for s, a in zip(strings, string_addrs):
        machine.write_physical(a, s)
    machine.write_physical(cmd_addr, cmd)
    machine.write_physical(name_addr, name)
    for (start, _), blob in zip(mods, blobs):
        machine.write_physical(start, blob)
    return MBI_ADDR


def _write_gdt(machine: Machine) -> None:
    machine.write_physical(GDT_ADDR, struct.pack(f"<{len(GDT)}Q", *GDT))
    machine.cpu.uc.reg_write(Reg.GDTR, (0, GDT_ADDR, 8 * len(GDT) - 1, 0))


def enter_protected_mode(machine: Machine, entry: int, mbi: int) -> None:
    """The state QEMU's multiboot option ROM leaves: 32-bit flat protected mode, paging off."""
    cpu = machine.cpu
    uc = cpu.uc
    _write_gdt(machine)
    uc.msr_write(MSR_EFER, 0)
    uc.reg_write(Reg.CR4, 0)
    uc.reg_write(Reg.CR0, CR0_PE | CR0_ET)
    flat_data = (SEL_DATA, 0, 0xFFFF_FFFF, DATA32_FLAGS)
    # Quirk: a UC_MODE_64 instance is dropped into 32-bit mode by clearing
    # HF_LMA/HF_CS64 in hflags (notes §7); the segment caches are patched too.
    cpu.set_hidden_state(cpl=0, segs={
        Seg.CS: (SEL_CODE32, 0, 0xFFFF_FFFF, CODE32_FLAGS),
        Seg.SS: flat_data, Seg.DS: flat_data, Seg.ES: flat_data, Seg.FS: flat_data, Seg.GS: flat_data,
    }, hflags_set=HF.CS32 | HF.SS32 | HF.PE, hflags_clear=HF.LMA | HF.CS64 | HF.ADDSEG)
    uc.reg_write(Reg.RAX, MULTIBOOT_BOOTLOADER_MAGIC)
    uc.reg_write(Reg.RBX, mbi)
    for r in (Reg.RCX, Reg.RDX, Reg.RSI, Reg.RDI, Reg.RBP, Reg.RSP):
        uc.reg_write(r, 0)
    cpu.rflags = 0x2
    cpu.rip = entry
    cpu.halted = False


def enter_long_mode(machine: Machine, entry: int, mbi: int) -> None:
    cpu = machine.cpu
    uc = cpu.uc
    _write_gdt(machine)
    # Identity map 4 GiB: PML4[0] -> PDPT, PDPT[0..3] -> 4 page directories of 2 MiB pages.
    pdpt = PML4_ADDR + 0x1000
    pds = PML4_ADDR + 0x2000
    machine.write_physical(PML4_ADDR, struct.pack("<Q", pdpt | 0x3) + bytes(4088))
    machine.write_physical(pdpt, b"".join(struct.pack("<Q", (pds + 0x1000 * i) | 0x3) for i in range(4))
                           + bytes(4096 - 32))
    entries = b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(2048))
    machine.write_physical(pds, entries)
    uc.reg_write(Reg.CR3, PML4_ADDR)
    uc.reg_write(Reg.CR4, CR4_PAE | CR4_OSFXSR)
    uc.msr_write(MSR_EFER, EFER_LME | EFER_LMA)
    uc.reg_write(Reg.CR0, CR0_PE | CR0_ET | CR0_WP | CR0_PG)
    flat_data = (SEL_DATA, 0, 0xFFFF_FFFF, DATA32_FLAGS)
    cpu.set_hidden_state(cpl=0, segs={
        Seg.CS: (SEL_CODE64, 0, 0xFFFF_FFFF, CODE64_FLAGS),
        Seg.SS: flat_data, Seg.DS: flat_data, Seg.ES: flat_data, Seg.FS: flat_data, Seg.GS: flat_data,
    }, hflags_set=HF.CS32 | HF.SS32 | HF.CS64 | HF.LMA | HF.PE, hflags_clear=HF.ADDSEG)
    uc.reg_write(Reg.RAX, MULTIBOOT_BOOTLOADER_MAGIC)
    uc.reg_write(Reg.RBX, mbi)
    uc.reg_write(Reg.RDI, MULTIBOOT_BOOTLOADER_MAGIC)
    uc.reg_write(Reg.RSI, mbi)
    uc.reg_write(Reg.RSP, LONG_MODE_STACK)
    cpu.rflags = 0x2
    cpu.rip = entry
    cpu.halted = False
