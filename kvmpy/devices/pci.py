"""PCI configuration space, mechanism #1 (ports 0xCF8-0xCFF), with bus 0 and its host bridge.

PCI Local Bus Specification 3.0, 3.2.2.3.2: a 32-bit write to CONFIG_ADDRESS (0xCF8) selects
bus/device/function/register when bit 31 (enable) is set; CONFIG_DATA (0xCFC-0xCFF) then reads or
writes that register, at byte offset (port - 0xCFC). Anything that addresses no function reads
all-ones and drops writes (the master-abort behaviour), including bus != 0, the reserved bits
1:0 of CONFIG_ADDRESS, disabled accesses, and accesses that would cross the 4-byte register
(e.g. 4 bytes at 0xCFE) -- shared/hostile-inputs.md item 24.

Non-dword accesses to 0xCF8-0xCFB are not CONFIG_ADDRESS on a PC (the chipset routes them
elsewhere, 0xCF9 being the reset control register); they are ignored here.

Functions implement :class:`PciFunction` (config space as 256 bytes with per-byte write masks);
virtio-pci devices will plug into :class:`PciBus` the same way the host bridge does.
"""
from __future__ import annotations

import struct
import sys
import threading

from kvmpy.errors import KvmpyError
from kvmpy.vmexit.bus import BusDevice, BusOverlapError

CONFIG_ADDRESS_ENABLE = 1 << 31
# Type 0 header offsets (PCI 3.0, figure 6-1)
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION, CLASS_PROG, SUBCLASS, CLASS = 0x08, 0x09, 0x0A, 0x0B
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYS_VENDOR, SUBSYS_ID = 0x2C, 0x2E
CAP_PTR = 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
STATUS_CAP_LIST = 1 << 4          # STATUS bit 4: the capability list at CAP_PTR is valid
CAP_START = 0x40                  # capabilities live after the 64-byte header
# BAR low bits (PCI 3.0, 6.2.5.1): bit 0 = 0 memory; bits 2:1 = 00 32-bit, 10 64-bit; bit 3
# prefetchable.
BAR_MEM64 = 0x4
BAR_PREFETCH = 0x8
CMD_MEMORY = 1 << 1               # COMMAND bit 1, Memory Space (PCI 3.0, 6.2.2): BARs decode


class Bar:
    """A memory BAR: its size (a power of two) and where the guest (or the builder) put it."""

    def __init__(self, index: int, size: int, mem64: bool, on_move):
        if size < 16 or size & (size - 1):
            raise ValueError(f"BAR size {size:#x} must be a power of two >= 16")
        self.index, self.size, self.mem64, self.on_move = index, size, mem64, on_move
        self.address = 0


class PciFunction:
    """A function's 256-byte configuration space. Writable bits are those set in ``wmask``."""

    name = "pci-function"

    def __init__(self, vendor: int, device: int, class_code: int, subclass: int, prog_if: int = 0,
                 revision: int = 0, header_type: int = 0):
        self.config = bytearray(256)
        self.wmask = bytearray(256)
        struct.pack_into("<HH", self.config, VENDOR_ID, vendor, device)
        self.config[REVISION] = revision
        self.config[CLASS_PROG] = prog_if
        self.config[SUBCLASS] = subclass
        self.config[CLASS] = class_code
        self.config[HEADER_TYPE] = header_type
        # COMMAND: I/O space, memory space, bus master, INTx disable are the guest's to set
        struct.pack_into("<H", self.wmask, COMMAND, 0x0407)

        self.bars: dict[int, Bar] = {}
        self._cap_end = CAP_START

    def add_bar(self, index: int, size: int, mem64: bool = False, on_move=None) -> Bar:
        """Declare memory BAR ``index`` of ``size`` bytes. The writable bits are the address bits
        above the size, so a guest that writes all-ones reads back ~(size-1): BAR sizing (PCI 3.0,
        6.2.5.1). ``on_move(bar, old, new)`` is called when its address changes."""
        bar = Bar(index, size, mem64, on_move)
        self.bars[index] = bar
        off = BAR0 + 4 * index
        flags = BAR_MEM64 if mem64 else 0
        struct.pack_into("<I", self.config, off, flags)
        struct.pack_into("<I", self.wmask, off, ~(size - 1) & 0xFFFFFFF0)
        if mem64:   # the upper half is the next BAR register, all writable
            struct.pack_into("<I", self.wmask, off + 4, 0xFFFFFFFF)
        return bar

    def set_bar_address(self, index: int, address: int) -> None:
        """Place a BAR (what firmware would do before the OS starts)."""
        bar = self.bars[index]
        off = BAR0 + 4 * index
        struct.pack_into("<I", self.config, off,
                         (address & 0xFFFFFFF0) | (BAR_MEM64 if bar.mem64 else 0))
        if bar.mem64:
            struct.pack_into("<I", self.config, off + 4, address >> 32)
        self._bar_changed(bar)

    def _bar_changed(self, bar: Bar) -> None:
        off = BAR0 + 4 * bar.index
        new = struct.unpack_from("<I", self.config, off)[0] & 0xFFFFFFF0
        if bar.mem64:
            new |= struct.unpack_from("<I", self.config, off + 4)[0] << 32
        if new != bar.address:
            old, bar.address = bar.address, new
            if bar.on_move is not None:
                bar.on_move(bar, old, new)

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (id, next pointer, ``body``) to the list; returns its offset.
        ``writable``: a write mask for ``body`` (default read-only)."""
        off = self._cap_end
        length = (2 + len(body) + 3) & ~3
        if off + length > 256:
            raise ValueError("PCI capabilities do not fit in the 256-byte config space")
        self.config[off] = cap_id
        self.config[off + 1] = 0
        self.config[off + 2:off + 2 + len(body)] = body
        if writable:
            self.wmask[off + 2:off + 2 + len(writable)] = writable
        if off == CAP_START:
            self.config[CAP_PTR] = off
            struct.pack_into("<H", self.config, STATUS,
                             struct.unpack_from("<H", self.config, STATUS)[0] | STATUS_CAP_LIST)
        else:
            self.config[self._last_cap + 1] = off
        self._last_cap = off
        self._cap_end = off + length
        return off

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            b = (value >> (8 * i)) & 0xFF
            m = self.wmask[offset + i]
            self.config[offset + i] = (self.config[offset + i] & ~m) | (b & m)
        if self.bars and offset < BAR0 + 24 and offset + size > BAR0:
            for bar in self.bars.values():
                reg = BAR0 + 4 * bar.index
                end = reg + (8 if bar.mem64 else 4)
                if offset < end and offset + size > reg:
                    self._bar_changed(bar)


class BarWindow(BusDevice):
    """A function's memory BAR as a window on the MMIO bus; the function moves it."""

    def __init__(self, function: "MmioBarFunction", size: int):
        self.function, self.window, self.name = function, size, function.name

    def read(self, offset: int, size: int) -> int:
        return self.function.bar_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.function.bar_write(offset, size, value)

    def register_name(self, offset: int, is_write: bool) -> str | None:
        return self.function.bar_register_name(offset)


class MmioBarFunction(PciFunction):
    """A function with one memory BAR that decodes onto the MMIO bus ``mmio``.

    The window (``region``) is on the bus while the guest has Memory Space enabled in COMMAND
    and the BAR holds an address; it is removed when the guest turns decoding off or moves the
    BAR (BAR sizing writes all-ones), and put back at the new address. A BAR that would overlap
    another window is left undecoded and reported once. Subclasses implement
    :meth:`bar_read` / :meth:`bar_write` (offsets into the BAR) and may override
    :meth:`on_map` / :meth:`on_unmap`."""

    def init_bar(self, index: int, size: int, mem64: bool, mmio) -> None:
        """Declare the BAR (call once from ``__init__``, after setting ``name``)."""
        self.mmio = mmio
        self.mapped_at: int | None = None
        self._mapping = None
        self.ignored = 0                 # guest accesses dropped (subclasses count theirs too)
        self._reported: set[str] = set()
        self.bar = self.add_bar(index, size, mem64, on_move=self._bar_moved)
        self.region = BarWindow(self, size)

    def place(self, address: int) -> None:
        """Put the BAR at ``address`` and enable memory decoding, as firmware does before the OS
        starts; the window appears on the MMIO bus."""
        self.set_bar_address(self.bar.index, address)
        self.config_write(COMMAND, 2, self.config_read(COMMAND, 2) | CMD_MEMORY)

    def config_write(self, offset: int, size: int, value: int) -> None:
        super().config_write(offset, size, value)
        if offset < COMMAND + 2 and COMMAND < offset + size:
            self._update_mapping()

    def _bar_moved(self, bar: Bar, old: int, new: int) -> None:
        self._update_mapping()

    def _update_mapping(self) -> None:
        addr, size = self.bar.address, self.bar.size
        decodes = self.config_read(COMMAND, 2) & CMD_MEMORY
        want = addr if decodes and addr and addr + size <= 1 << 64 else None
        if want == self.mapped_at:
            return
        self.unmap()
        if want is None:
            return
        if self.mmio is not None:
            try:
                self._mapping = self.mmio.insert(self.region, want, self.name)
            except BusOverlapError as e:
                self._report("overlap", f"BAR {self.bar.index} at {want:#x} is not decoded: {e}")
                return
        self.mapped_at = want
        self.on_map(want)

    def unmap(self) -> None:
        """Take the window off the bus (also what closing the function does)."""
        if self.mapped_at is None:
            return
        self.on_unmap()
        if self._mapping is not None:
            self.mmio.remove(self._mapping)
            self._mapping = None
        self.mapped_at = None

    def on_map(self, base: int) -> None:
        """The BAR now decodes at ``base``."""

    def on_unmap(self) -> None:
        """The BAR is about to stop decoding."""

    def bar_read(self, offset: int, size: int) -> int:
        raise NotImplementedError

    def bar_write(self, offset: int, size: int, value: int) -> None:
        raise NotImplementedError

    def bar_register_name(self, offset: int) -> str | None:
        return None

    def _report(self, kind: str, message: str) -> None:
        """Count a dropped or refused guest action; say it on stderr once per kind."""
        self.ignored += 1
        if kind not in self._reported:
            self._reported.add(kind)
            print(f"kvmpy: {self.name}: {message}", file=sys.stderr)


class HostBridge(PciFunction):
    """Device 0 of bus 0: a host bridge (class 06/00), Intel i440FX IDs as QEMU's pc machine."""

    name = "host-bridge"

    def __init__(self):
        super().__init__(vendor=0x8086, device=0x1237, class_code=0x06, subclass=0x00,
                         revision=0x02)


# Where INTx pins go: IOAPIC pins 16-23, which no ISA IRQ uses (KVM_CREATE_IRQCHIP's default
# routing sends GSI 16-23 to the IOAPIC only, arch/x86/kvm/irq_comm.c), as on QEMU's q35. The
# guest learns the wiring from the MP table's PCI entries (kvmpy/mptable.py); the lines are
# level-triggered and may be shared by several functions (PCI 3.0, 2.2.6). The 8259s do not
# see them: a guest without its IOAPIC (Linux's noapic) has virtio-pci through MSI-X only.
INTX_GSIS = range(16, 24)


def intx_gsi(device: int, pin: int = 1) -> int:
    """The GSI of INTx ``pin`` (1 = INTA#) of ``device``: the usual swizzle (PCI-to-PCI Bridge
    Architecture 1.2, 9.1: INTx of device D goes to (D + x) mod 4), spread over 8 lines."""
    return INTX_GSIS[(device + pin - 1) % len(INTX_GSIS)]


class SharedLevelLine:
    """A level-triggered GSI that several functions may drive: high while any of them holds it
    high. KVM_IRQ_LINE knows one user-space source, so the OR is done here. ``source()`` gives
    each function its own ``irq(level)``; KVM hears only changes of the OR."""

    def __init__(self, set_level):
        self._set_level = set_level
        self._high: set[int] = set()
        self._sources = 0
        self._lock = threading.Lock()

    def source(self):
        key = self._sources
        self._sources += 1

        def irq(level: int) -> None:
            with self._lock:
                was = bool(self._high)
                if level:
                    self._high.add(key)
                else:
                    self._high.discard(key)
                if bool(self._high) != was:
                    self._set_level(int(not was))
        return irq


class PciBus:
    """Bus 0: up to 32 devices x 8 functions."""

    def __init__(self):
        self.functions: dict[tuple[int, int], PciFunction] = {}
        # (device, pin, GSI) of every wired INTx pin: what the MP table tells the guest
        self.intx_routes: list[tuple[int, int, int]] = []
        self._intx_lines: dict[int, SharedLevelLine] = {}
        self._wired: dict[int, tuple[int, int]] = {}   # device -> (pin, GSI), until add()

    def wire_intx(self, device: int, pin: int, set_gsi_level) -> tuple[int, object]:
        """Wire INTx ``pin`` of ``device`` to its GSI (:func:`intx_gsi`). ``set_gsi_level(gsi)``
        gives the GSI's ``level`` setter. Returns the GSI and the function's ``irq(level)``.
        The route is announced (``intx_routes``) once the function is :meth:`add`-ed there."""
        gsi = intx_gsi(device, pin)
        line = self._intx_lines.get(gsi)
        if line is None:
            line = self._intx_lines[gsi] = SharedLevelLine(set_gsi_level(gsi))
        self._wired[device] = (pin, gsi)
        return gsi, line.source()

    def free_device(self) -> int:
        """The first device number with no function 0."""
        for d in range(32):
            if (d, 0) not in self.functions:
                return d
        raise KvmpyError("PCI bus 0 is full (32 devices)")

    def add(self, function: PciFunction, device: int | None = None, fn: int = 0) -> int:
        if device is None:
            device = self.free_device()
        if not (0 <= device < 32 and 0 <= fn < 8) or (device, fn) in self.functions:
            raise ValueError(f"PCI slot {device}.{fn} is taken or invalid")
        self.functions[(device, fn)] = function
        if fn == 0 and device in self._wired:
            self.intx_routes.append((device, *self._wired.pop(device)))
        return device


class PciConfigIo(BusDevice):
    """Ports 0xCF8-0xCFF: CONFIG_ADDRESS at offset 0, CONFIG_DATA at offsets 4-7."""

    name = "PCI"
    window = 8

    def __init__(self, bus: PciBus):
        self.bus = bus
        self.address = 0
        self._lock = threading.Lock()

    def _target(self, data_offset: int, size: int):
        a = self.address
        if not a & CONFIG_ADDRESS_ENABLE or a & 0x3:
            return None
        bus, dev, fn = (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7
        reg = (a & 0xFC) + data_offset
        if bus != 0 or data_offset + size > 4:
            return None
        f = self.bus.functions.get((dev, fn))
        return (f, reg) if f is not None else None

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == 0:
                return self.address if size == 4 else (1 << (8 * size)) - 1
            if offset >= 4:
                t = self._target(offset - 4, size)
                if t is not None:
                    return t[0].config_read(t[1], size)
            return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == 0 and size == 4:
                self.address = value & 0xFFFFFFFF
            elif offset >= 4:
                t = self._target(offset - 4, size)
                if t is not None:
                    t[0].config_write(t[1], size, value)

    def register_name(self, offset: int, is_write: bool) -> str | None:
        return "CONFIG_ADDRESS" if offset < 4 else "CONFIG_DATA"
