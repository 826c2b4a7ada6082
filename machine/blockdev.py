"""Host back ends for disks: a raw image file, addressed in 512-byte sectors.

``DiskImage`` is to the IDE model what ``CharDev`` is to the UARTs: the host
side of a device.  Reads and writes go to the file at once (``os.pread`` /
``os.pwrite``, no cache of ours), as QEMU's ``format=raw`` with its default
``cache=writeback``; ``flush()`` is ``fsync``.  With ``snapshot=True`` (QEMU's
``-snapshot`` / ``snapshot=on``) writes land in memory and the file is never
changed.  The capacity is the file size rounded down to whole sectors, as
QEMU's (a partial last sector is not addressable).
"""
from __future__ import annotations

import os

__all__ = ["DiskImage", "SECTOR"]

SECTOR = 512


class DiskImage:
    """A raw disk image file (``format=raw``)."""

    def __init__(self, path: str, *, snapshot: bool = False, readonly: bool = False) -> None:
        self.path = path
        self.snapshot = snapshot
        self.readonly = readonly
        flags = os.O_RDONLY if (snapshot or readonly) else os.O_RDWR
        self._fd = os.open(path, flags)          # OSError (missing file, permissions) for the caller
        try:
            size = os.fstat(self._fd).st_size
        except OSError:
            os.close(self._fd)
            raise
        self.sectors = size // SECTOR
        self._overlay: dict[int, bytes] = {}

    def read(self, lba: int, count: int) -> bytes:
        """``count`` sectors from ``lba`` (the caller checks the range)."""
        out = bytearray(os.pread(self._fd, count * SECTOR, lba * SECTOR))
        out.extend(bytes(count * SECTOR - len(out)))
        if self._overlay:
            for i in range(count):
                data = self._overlay.get(lba + i)
                if data is not None:
                    out[i * SECTOR:(i + 1) * SECTOR] = data
        return bytes(out)

    def write(self, lba: int, data: bytes) -> None:
        """Whole sectors from ``lba`` (the caller checks the range)."""
        if self.snapshot:
            for i in range(len(data) // SECTOR):
                self._overlay[lba + i] = bytes(data[i * SECTOR:(i + 1) * SECTOR])
            return
        os.pwrite(self._fd, data, lba * SECTOR)

    def flush(self) -> None:
        if not self.snapshot and not self.readonly:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
