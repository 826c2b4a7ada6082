"""The Intel MultiProcessor Specification tables (MP Spec 1.4, chapter 4).

Kernels that predate ACPI, or keep it simple (xv6), find the CPUs and the
IO-APIC through these.  OSes search for the 16-byte *MP floating pointer
structure* ("_MP_", §4.1) in the first KiB of the EBDA, the last KiB of base
memory, or 0xF0000-0xFFFFF; SeaBIOS on QEMU puts it in the F segment, and so
does vmk.  It points at the *MP configuration table* ("PCMP", §4.2): a 44-byte
header and, sorted by type (§4.3):

* one processor entry per CPU (type 0, 20 bytes): LAPIC ID = CPU number,
  version 0x14 (our LAPIC's), enabled, CPU 0 the bootstrap processor, the
  CPUID signature and features of Unicorn's default "qemu64" model (as SeaBIOS
  copies them from CPUID leaf 1 on QEMU);
* one bus entry (type 1): bus 0 "ISA   " (vmk has no PCI);
* the IO-APIC (type 2): ID 0, version 0x11, 0xFEC00000;
* I/O interrupt assignments (type 3) for ISA IRQs 0-15 except 2: IRQ n on
  pin n, IRQ0 on pin 2 (the PIT's wiring, as QEMU), IRQ9 (the ACPI SCI)
  level-triggered and active high, the others conforming to the ISA bus
  (edge, active high);
* local interrupt assignments (type 4): ExtINT on LINT0 of the BSP (the 8259
  virtual wire) and NMI on LINT1 of every LAPIC.

Both structures carry checksums (bytes sum to 0); there is no extended table.
"""
from __future__ import annotations

import struct

from vmk.machine.devices.lapic import APIC_VERSION_ID
from vmk.machine.pc import ACPI_SCI_IRQ, IOAPIC_BASE, IOAPIC_PIN_OF_ISA_IRQ0, LAPIC_BASE

from .acpi import checksum

__all__ = ["floating_pointer", "config_table", "SPEC_REV", "IOAPIC_VERSION", "CPU_SIGNATURE", "CPU_FEATURES"]

SPEC_REV = 4                     # MP Spec 1.4
OEM_ID = b"VMK     "
PRODUCT_ID = b"VMKPC       "
HEADER_LEN = 44

# CPUID.1 EAX/EDX of the qemu64 model (family 15, model 107, stepping 1), as Unicorn runs it
CPU_SIGNATURE = 0x0006_0FB1
CPU_FEATURES = 0x078B_FBFD
IOAPIC_ID = 0
IOAPIC_VERSION = 0x11            # what QEMU's MP table reports (an 82093AA)
ISA_BUS = 0

ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IO_INT, ENTRY_LOCAL_INT = 0, 1, 2, 3, 4
CPU_ENABLED, CPU_BSP = 1 << 0, 1 << 1
IOAPIC_ENABLED = 1
INT_INT, INT_NMI, INT_SMI, INT_EXTINT = 0, 1, 2, 3
# I/O interrupt flags (§4.3.4, table 4-10): PO bits 0-1, EL bits 2-3; 0 = conforms to the bus
PO_ACTIVE_HIGH = 0b01
EL_LEVEL = 0b11 << 2
ALL_LAPICS = 0xFF
CASCADE_IRQ = 2                  # the slave 8259; its IO-APIC pin carries IRQ0


def floating_pointer(config_addr: int) -> bytes:
    """The MP floating pointer structure (§4.1, table 4-1), 16 bytes."""
    fp = bytearray(struct.pack("<4sIBBB5B", b"_MP_", config_addr, 1, SPEC_REV, 0, 0, 0, 0, 0, 0))
    fp[10] = checksum(fp)
    return bytes(fp)


def _entries(cpus: int) -> list[bytes]:
    out = []
    for n in range(cpus):
        flags = CPU_ENABLED | (CPU_BSP if n == 0 else 0)
        out.append(struct.pack("<BBBBII8x", ENTRY_PROCESSOR, n, APIC_VERSION_ID, flags, CPU_SIGNATURE, CPU_FEATURES))
    out.append(struct.pack("<BB6s", ENTRY_BUS, ISA_BUS, b"ISA   "))
    out.append(struct.pack("<BBBBI", ENTRY_IOAPIC, IOAPIC_ID, IOAPIC_VERSION, IOAPIC_ENABLED, IOAPIC_BASE))
    for irq in range(16):
        if irq == CASCADE_IRQ:
            continue
        pin = IOAPIC_PIN_OF_ISA_IRQ0 if irq == 0 else irq
        flags = PO_ACTIVE_HIGH | EL_LEVEL if irq == ACPI_SCI_IRQ else 0
        out.append(struct.pack("<BBHBBBB", ENTRY_IO_INT, INT_INT, flags, ISA_BUS, irq, IOAPIC_ID, pin))
    out.append(struct.pack("<BBHBBBB", ENTRY_LOCAL_INT, INT_EXTINT, 0, ISA_BUS, 0, 0, 0))
    out.append(struct.pack("<BBHBBBB", ENTRY_LOCAL_INT, INT_NMI, 0, ISA_BUS, 0, ALL_LAPICS, 1))
    return out


def config_table(cpus: int) -> bytes:
    """The MP configuration table (§4.2, table 4-2) with its base entries."""
    entries = _entries(cpus)
    body = b"".join(entries)
    t = bytearray(struct.pack("<4sHBB8s12sIHHIHBx", b"PCMP", HEADER_LEN + len(body), SPEC_REV, 0, OEM_ID,
                              PRODUCT_ID, 0, 0, len(entries), LAPIC_BASE, 0, 0) + body)
    t[7] = checksum(t)
    return bytes(t)
