"""Port-I/O and MMIO buses: who owns which address, and dispatch of one access to its owner.

Devices never see absolute addresses: the bus subtracts the base it was given at insert time and
calls ``read(offset, size)`` / ``write(offset, size, value)``. The builder, not the device,
chooses the base (Firecracker's BusDevice model). Overlapping inserts are refused.

The PIO bus indexes a 65536-entry list by port, so a hot port costs one list lookup (no dict, no
search). The MMIO bus keeps a sorted list of windows and bisects it.

This module does not count, trace or catch device errors: the dispatcher does that.
"""
from __future__ import annotations

import bisect


class BusDevice:
    """What a device on a bus implements. Values are little-endian integers of ``size`` bytes.

    ``window`` is the number of ports (PIO) or bytes (MMIO) the device decodes. ``read`` must
    return an int (the bus masks it to ``size`` bytes); ``write`` gets the value the guest wrote.
    A device may raise :class:`kvmpy.outcome.VmStop` to end the VM; any other exception is a
    device bug that the dispatcher contains.
    """

    name: str = "device"
    window: int = 1

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        pass

    def register_name(self, offset: int, is_write: bool) -> str | None:
        """Name of the register at ``offset`` (for traces), or None."""
        return None


class BusOverlapError(ValueError):
    pass


class Mapping:
    """One device placed on a bus: the device, its base, its name there, and access counts."""

    __slots__ = ("device", "base", "end", "name", "reads", "writes")

    def __init__(self, device: BusDevice, base: int, name: str):
        self.device = device
        self.base = base
        self.end = base + device.window
        self.name = name
        self.reads = 0
        self.writes = 0

    def __repr__(self) -> str:
        return f"<{self.name} {self.base:#x}-{self.end - 1:#x}>"


class PioBus:
    """x86 I/O port space: 0x0000-0xffff."""

    SIZE = 0x10000

    def __init__(self) -> None:
        #: the owner of each port (None: unassigned); the dispatcher indexes it directly
        self.slots: list[Mapping | None] = [None] * self.SIZE
        self.mappings: list[Mapping] = []

    def insert(self, device: BusDevice, base: int, name: str | None = None) -> Mapping:
        end = base + device.window
        if device.window <= 0 or base < 0 or end > self.SIZE:
            raise BusOverlapError(f"{name or device.name}: ports {base:#x}+{device.window} "
                                  "are outside the I/O space 0x0-0xffff")
        for m in self.mappings:
            if base < m.end and m.base < end:
                raise BusOverlapError(f"{name or device.name} at ports {base:#x}-{end - 1:#x} "
                                      f"overlaps {m.name} at {m.base:#x}-{m.end - 1:#x}")
        m = Mapping(device, base, name or device.name)
        self.mappings.append(m)
        for port in range(base, end):
            self.slots[port] = m
        return m

    def lookup(self, port: int) -> Mapping | None:
        return self.slots[port & 0xFFFF]


class MmioBus:
    """Guest-physical MMIO windows (anything not backed by a memory slot exits here)."""

    def __init__(self) -> None:
        self._bases: list[int] = []
        self.mappings: list[Mapping] = []

    def insert(self, device: BusDevice, base: int, name: str | None = None) -> Mapping:
        end = base + device.window
        if device.window <= 0 or base < 0 or end > 1 << 64:
            raise BusOverlapError(f"{name or device.name}: bad MMIO window {base:#x}+{device.window}")
        for m in self.mappings:
            if base < m.end and m.base < end:
                raise BusOverlapError(f"{name or device.name} at {base:#x}-{end - 1:#x} "
                                      f"overlaps {m.name} at {m.base:#x}-{m.end - 1:#x}")
        m = Mapping(device, base, name or device.name)
        i = bisect.bisect(self._bases, base)
        self._bases.insert(i, base)
        self.mappings.insert(i, m)
        return m

    def remove(self, mapping: Mapping) -> None:
        """Take a window off the bus (e.g. a PCI BAR the guest moves)."""
        i = self.mappings.index(mapping)
        del self.mappings[i]
        del self._bases[i]

    def lookup(self, addr: int) -> Mapping | None:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0:
            m = self.mappings[i]
            if addr < m.end:
                return m
        return None
