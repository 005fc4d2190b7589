"""Guest RAM: anonymous mmaps registered as KVM memory slots, and the one place where bytes cross
the guest boundary.

Every access by guest-physical address goes through :meth:`GuestMemory.check`, which refuses
negative addresses, sizes, wrap-around past 2^64, ranges that leave guest RAM and ranges that
straddle two regions (there may be a hole between them). Outside this module only the virtqueue
(kvmpy.virtio.queue) indexes the mmaps: at offsets check() returned, and in its ring walk with
check()'s own one-region test against a region check() returned before.

This module does not decide where RAM goes (the builder does) and does not know about devices.
"""
from __future__ import annotations

from bisect import bisect_right as _bisect
import mmap
import struct

from kvmpy._ffi import ffi
from kvmpy.errors import GuestMemoryError

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


class MemoryRegion:
    """``size`` bytes of RAM at guest-physical ``gpa``, backed by ``mapping``.

    ``u16`` views the region as native (x86: little-endian, as virtio 1.x rings are) 16-bit
    words: ``u16[off // 2] = v`` is one 16-bit store and ``u16[off // 2]`` one 16-bit load, for
    fields another CPU reads or writes at the same time (ring indices). struct's ``pack_into``
    is not: it zeroes the bytes first and stores them one at a time, so a concurrent reader
    can see 0 or a torn value. Released by GuestMemory.close(); used afterwards, it raises."""

    __slots__ = ("gpa", "size", "mapping", "host_address", "u16")

    def __init__(self, gpa: int, size: int, mapping: mmap.mmap, host_address: int):
        self.gpa, self.size, self.mapping, self.host_address = gpa, size, mapping, host_address
        self.u16 = memoryview(mapping).cast("H")

    def __repr__(self) -> str:
        return f"<MemoryRegion {self.gpa:#x}+{self.size:#x}>"

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """Guest RAM made of non-overlapping regions ``[(gpa, size), ...]``."""

    def __init__(self, layout: list[tuple[int, int]], shared: bool = False):
        """``shared``: map the RAM MAP_SHARED, so that a process forked afterwards sees and
        writes the same bytes (a guest-side test driver running beside the VMM, as a guest's
        vCPUs do); otherwise private anonymous memory, as QEMU's default RAM."""
        self.regions: list[MemoryRegion] = []
        share = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        try:
            for gpa, size in sorted(layout):
                if size <= 0 or size % mmap.PAGESIZE or gpa % mmap.PAGESIZE:
                    raise GuestMemoryError(f"memory region {gpa:#x}+{size:#x} is not page-aligned")
                if self.regions and gpa < self.regions[-1].end:
                    raise GuestMemoryError(f"memory region {gpa:#x} overlaps the one before it")
                m = mmap.mmap(-1, size, share | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                              mmap.PROT_READ | mmap.PROT_WRITE)
                ptr = ffi.from_buffer(m)
                addr = int(ffi.cast("uintptr_t", ptr))
                ffi.release(ptr)   # the address stays valid until m.close()
                self.regions.append(MemoryRegion(gpa, size, m, addr))
        except BaseException:
            self.close()
            raise
        self._starts = [r.gpa for r in self.regions]
        self.size = sum(r.size for r in self.regions)

    def close(self) -> None:
        """Unmap every region (idempotent). If a region's mapping is still exported (a view
        someone holds: GuestMemory.view, a C call's pin), its close raises BufferError after
        the others were closed; the memory counts as closed either way."""
        regions, self.regions, self._starts = self.regions, [], []
        for r in regions:
            r.u16.release()       # else the mapping refuses to close (an exported buffer)
        failed = None
        for r in regions:
            try:
                r.mapping.close()
            except BufferError as e:
                failed = failed or e
        if failed is not None:
            raise failed

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def top(self) -> int:
        """One past the highest RAM address."""
        return self.regions[-1].end if self.regions else 0

    def check(self, gpa: int, size: int) -> tuple[MemoryRegion, int]:
        """The region holding all of ``[gpa, gpa+size)`` and the offset of ``gpa`` in it."""
        # No separate test for wrapping past 2^64 is needed: a range that fits in a region ends
        # at or below the region's end, which is below 2^64.
        if gpa >= 0 and size >= 0:
            i = _bisect(self._starts, gpa) - 1
            if i >= 0:
                r = self.regions[i]
                off = gpa - r.gpa
                if off + size <= r.size and (off < r.size or size == 0):
                    return r, off
        if gpa < 0 or size < 0 or gpa + size > 1 << 64:
            raise GuestMemoryError(f"guest address {gpa:#x}+{size:#x} is out of range")
        raise GuestMemoryError(f"guest address range {gpa:#x}+{size:#x} is not in guest RAM")

    def contains(self, gpa: int, size: int = 1) -> bool:
        try:
            self.check(gpa, size)
        except GuestMemoryError:
            return False
        return True

    def read(self, gpa: int, size: int) -> bytes:
        r, off = self.check(gpa, size)
        return r.mapping[off:off + size]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        r, off = self.check(gpa, size)
        r.mapping[off:off + size] = data

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        r, off = self.check(gpa, size)
        r.mapping[off:off + size] = bytes([byte]) * size

    def view(self, gpa: int, size: int) -> memoryview:
        """Zero-copy view of guest RAM (for preadv/pwritev). Release it before close()."""
        r, off = self.check(gpa, size)
        return memoryview(r.mapping)[off:off + size]

    def host_address(self, gpa: int, size: int = 1) -> int:
        """Host virtual address of ``gpa`` (after checking ``size`` bytes from there)."""
        r, off = self.check(gpa, size)
        return r.host_address + off

    def read_u8(self, gpa: int) -> int:
        r, off = self.check(gpa, 1)
        return r.mapping[off]

    def read_u16(self, gpa: int) -> int:
        r, off = self.check(gpa, 2)
        if not off & 1:          # aligned: one 16-bit load (see MemoryRegion.u16)
            return r.u16[off >> 1]
        return _U16.unpack_from(r.mapping, off)[0]

    def read_u32(self, gpa: int) -> int:
        r, off = self.check(gpa, 4)
        return _U32.unpack_from(r.mapping, off)[0]

    def read_u64(self, gpa: int) -> int:
        r, off = self.check(gpa, 8)
        return _U64.unpack_from(r.mapping, off)[0]

    def write_u8(self, gpa: int, value: int) -> None:
        r, off = self.check(gpa, 1)
        r.mapping[off] = value & 0xFF

    def write_u16(self, gpa: int, value: int) -> None:
        r, off = self.check(gpa, 2)
        if not off & 1:          # aligned: one 16-bit store (see MemoryRegion.u16)
            r.u16[off >> 1] = value & 0xFFFF
        else:
            _U16.pack_into(r.mapping, off, value & 0xFFFF)

    def write_u32(self, gpa: int, value: int) -> None:
        r, off = self.check(gpa, 4)
        _U32.pack_into(r.mapping, off, value & 0xFFFFFFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        r, off = self.check(gpa, 8)
        _U64.pack_into(r.mapping, off, value & 0xFFFFFFFFFFFFFFFF)

    def read_struct(self, gpa: int, fmt: struct.Struct) -> tuple:
        r, off = self.check(gpa, fmt.size)
        return fmt.unpack_from(r.mapping, off)

    def write_struct(self, gpa: int, fmt: struct.Struct, *values) -> None:
        r, off = self.check(gpa, fmt.size)
        fmt.pack_into(r.mapping, off, *values)

    def register(self, vm, first_slot: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION for every region, slots numbered from ``first_slot``."""
        for i, r in enumerate(self.regions):
            vm.set_user_memory_region(first_slot + i, r.gpa, r.size, r.host_address)
