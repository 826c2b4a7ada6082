"""PCI configuration mechanism #1 (PCI 3.0 §3.2.2.3.2) and the PIIX3 reset control register."""
from __future__ import annotations

from vmk.machine.devices.pci_host import PciHost


def rig() -> tuple[PciHost, list[str]]:
    resets: list[str] = []
    return PciHost(resets.append), resets


def cfg(bus: int, dev: int, fn: int, reg: int) -> int:
    return 0x8000_0000 | bus << 16 | dev << 11 | fn << 8 | reg


def test_ids_classes_and_absent_functions() -> None:
    p, _ = rig()
    for (dev, ident, klass, htype) in ((0, 0x12378086, 0x060000, 0x00), (1, 0x70008086, 0x060100, 0x80)):
        p.write(0, 4, cfg(0, dev, 0, 0))
        assert p.read(4, 4) == ident
        p.write(0, 4, cfg(0, dev, 0, 8))
        assert p.read(4, 4) >> 8 == klass
        p.write(0, 4, cfg(0, dev, 0, 0xC))
        assert p.read(6, 1) == htype                            # byte at 0xCFE: register 0x0E
    for addr in (cfg(0, 2, 0, 0), cfg(0, 0, 1, 0), cfg(1, 0, 0, 0), cfg(0, 0, 0, 0) & 0x7FFF_FFFF):
        p.write(0, 4, addr)
        assert p.read(4, 4) == 0xFFFF_FFFF and p.read(5, 2) == 0xFFFF


def test_address_register_is_dword_only() -> None:
    p, _ = rig()
    p.write(0, 4, 0x1234_5678)
    assert p.read(0, 4) == 0x1234_5678
    p.write(0, 1, 0xAA)                                         # plain I/O: not latched
    assert p.read(0, 4) == 0x1234_5678 and p.read(0, 1) == 0xFF and p.read(2, 2) == 0xFFFF


def test_write_masks() -> None:
    p, _ = rig()
    p.write(0, 4, cfg(0, 1, 0, 0))
    p.write(4, 4, 0)
    assert p.read(4, 4) == 0x70008086                           # IDs are read-only
    p.write(0, 4, cfg(0, 1, 0, 4))
    p.write(4, 4, 0xFFFF_FFFF)                                  # command all ones, status write-1-to-clear
    assert p.read(4, 2) == 0x0547 and p.read(6, 2) == 0x0200
    p.write(0, 4, cfg(0, 1, 0, 0x3C))
    p.write(4, 1, 0x0B)
    assert p.read(4, 1) == 0x0B                                 # interrupt line


def test_reset_control_register() -> None:
    p, resets = rig()
    p.write(1, 1, 0x02)
    assert p.read(1, 1) == 0x02 and resets == []
    p.write(1, 1, 0x06)
    assert resets == ["reset control register 0xCF9"]
