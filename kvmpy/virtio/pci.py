"""virtio-pci, the modern (non-transitional) interface (virtio 1.2 section 4.1): a virtio device as
a PCI function on bus 0. This is the transport Debian's stock kernel finds devices on.

Config space (4.1.2): vendor 0x1AF4, device 0x1040 + the virtio device ID, revision 1, the
subsystem IDs repeating both, class 01/00 for block, 02/00 for network, ff/00 for the rest,
interrupt pin A; one 64-bit memory BAR (BAR 0, 16 KiB) and a capability list of five
vendor-specific capabilities (ID 0x09, ``struct virtio_pci_cap``, 4.1.4) and MSI-X (ID 0x11):

    BAR 0 offset     capability (cfg_type)    what
    0x0000-0x0fff    common (1)               struct virtio_pci_common_cfg (4.1.4.3)
    0x1000-0x1fff    ISR (3)                  one byte, read-to-clear (4.1.4.5)
    0x2000-0x2fff    device (4)               the device-specific config (4.1.4.6)
    0x3000-0x37ff    notify (2)               queue q at 0x3000 + 4 * q (multiplier 4, 4.1.4.4)
    0x3800-0x3bff    MSI-X table              up to 64 vectors: config + one per queue
    0x3c00-0x3c07    MSI-X PBA
    (config space)   PCI cfg access (5)       a window into BAR 0 through config space (4.1.4.9)

Common config registers (offset, width): device_feature_select 0x00/4, device_feature 0x04/4,
driver_feature_select 0x08/4, driver_feature 0x0c/4, config_msix_vector 0x10/2, num_queues 0x12/2,
device_status 0x14/1, config_generation 0x15/1, queue_select 0x16/2, queue_size 0x18/2,
queue_msix_vector 0x1a/2, queue_enable 0x1c/2, queue_notify_off 0x1e/2, queue_desc 0x20/8,
queue_driver 0x28/8, queue_device 0x30/8.

What the guest can and cannot do here (shared/hostile-inputs.md items 7-9, 24, 25):
- each register takes its natural width only (4.1.3.1; the 64-bit ones also as two 32-bit
  halves); any other width or offset reads all-ones and is dropped on write;
- queue_select may hold any value; while it names no queue the queue registers read 0
  (queue_size 0 is "not available"; queue_msix_vector reads NO_VECTOR) and writes are dropped;
- queue registers are writable only between FEATURES_OK and DRIVER_OK, and the ring layout only
  while the queue is not enabled; queue_enable takes 1 only (4.1.4.3.2: the driver "MUST NOT
  write a 0") (CVE-2026-5747 class); the device layer validates the ring at enable;
- a notify naming no queue, or at the wrong address for its index, is dropped (CVE-2011-2512);
- an MSI-X vector number past the table is stored as VIRTIO_MSI_NO_VECTOR, which the driver reads
  back as "mapping failed" (4.1.5.1.2.1); MSI-X table and PBA accesses past their end are
  ignored (CVE-2020-13754 class; kvmpy/virtio/msix.py).

Notifications: a write of the 16-bit queue index at the queue's notify address. By default it
runs the queue in the writing vCPU thread; given a Vm and an I/O thread, each queue has a KVM
ioeventfd there (2-byte write, datamatch = index), registered while the BAR is mapped and moved
with it, and the I/O thread (kvmpy/virtio/iothread.py) runs the queue.

Interrupts: with MSI-X enabled, a used buffer raises the queue's vector and a config change the
config vector (and sets ISR's configuration bit 0x2 too, 4.1.4.5.1), through kvmpy/virtio/msix.py (KVM irqfds and GSI
routes with a Vm, a ``msi(address, data)`` callable without). With MSI-X disabled, ISR bits are
set and INTx (pin A) is the callable ``irq(level)``: 1 while ISR is non-zero and the command
register's Interrupt Disable is clear, 0 once the driver's ISR read clears it.

The BAR decodes (is on the MMIO bus) while COMMAND.Memory Space is set and the BAR holds a
non-zero address, as on real hardware: a guest sizing or moving the BAR moves the window and its
ioeventfds. A BAR the guest puts over another window stays unmapped (reported once).

Not implemented: legacy/transitional interface (I/O BAR, 4.1.4.10), VIRTIO_F_NOTIFICATION_DATA,
VIRTIO_F_RING_RESET (queue_notify_data, queue_reset), shared memory capabilities, enforcement
of COMMAND.Bus Master on DMA, function-level reset, PCI Express capabilities.

This module does not parse requests or touch rings: the device (kvmpy/virtio/device.py) does.
:func:`add_to_machine` is the builder's recipe (slot, BAR address, INTx line).
"""
from __future__ import annotations

import enum
import functools
import os
import struct
import threading
from collections.abc import Callable

from kvmpy.devices.pci import (COMMAND, INTERRUPT_LINE, INTERRUPT_PIN, STATUS,
                               SUBSYS_VENDOR, MmioBarFunction)
from kvmpy.errors import KvmpyError
from kvmpy.virtio.transport import QueueKicker
from kvmpy.virtio.device import DeviceType, Interrupt, Status, VirtioDevice
from kvmpy.virtio.msix import MSIX_CAP_ID, Msix

VENDOR_ID = 0x1AF4              # 4.1.2: Red Hat, Inc.
DEVICE_ID_BASE = 0x1040         # 4.1.2: 0x1040 + virtio device ID (non-transitional)
REVISION = 1                    # 4.1.2.1: non-transitional devices have revision >= 1
VIRTIO_MSI_NO_VECTOR = 0xFFFF   # 4.1.5.1.2
PCI_CAP_ID_VNDR = 0x09          # PCI 3.0 Appendix H: vendor-specific capability

# Class code (class, subclass) by device type, as QEMU's virtio-pci devices: block is a "SCSI
# storage controller", net an "Ethernet controller", everything else "unassigned" (0xff).
CLASS_CODES = {DeviceType.BLOCK: (0x01, 0x00), DeviceType.NET: (0x02, 0x00)}
OTHER_CLASS = (0xFF, 0x00)

# PCI 3.0 6.2.2 / 6.2.3
CMD_INTX_DISABLE = 1 << 10      # COMMAND: Interrupt Disable
STATUS_INTERRUPT = 1 << 3       # STATUS: Interrupt Status (INTx pending)


class CfgType(enum.IntEnum):
    """virtio_pci_cap.cfg_type (4.1.4)."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5


# BAR 0 layout (see the table above).
BAR_INDEX = 0
BAR_SIZE = 0x4000
COMMON_CFG, COMMON_CFG_LEN = 0x0000, 0x1000
ISR_CFG, ISR_CFG_LEN = 0x1000, 0x1000
DEVICE_CFG, DEVICE_CFG_LEN = 0x2000, 0x1000
NOTIFY_CFG, NOTIFY_CFG_LEN = 0x3000, 0x0800
NOTIFY_OFF_MULTIPLIER = 4
MSIX_TABLE, MSIX_PBA = 0x3800, 0x3C00
MAX_VECTORS = (MSIX_PBA - MSIX_TABLE) // 16          # 64
MAX_QUEUES = NOTIFY_CFG_LEN // NOTIFY_OFF_MULTIPLIER

# struct virtio_pci_cap after cap_vndr/cap_next (4.1.4): cap_len, cfg_type, bar, id,
# padding[2], offset, length; virtio_pci_notify_cap adds notify_off_multiplier (4.1.4.4),
# virtio_pci_cfg_cap adds pci_cfg_data[4] (4.1.4.9).
_CAP = struct.Struct("<BBBB2xII")
CAP_LEN, NOTIFY_CAP_LEN, PCI_CFG_CAP_LEN = 16, 20, 20


class Common(enum.IntEnum):
    """struct virtio_pci_common_cfg offsets (4.1.4.3)."""

    DEVICE_FEATURE_SELECT = 0x00
    DEVICE_FEATURE = 0x04
    DRIVER_FEATURE_SELECT = 0x08
    DRIVER_FEATURE = 0x0C
    CONFIG_MSIX_VECTOR = 0x10
    NUM_QUEUES = 0x12
    DEVICE_STATUS = 0x14
    CONFIG_GENERATION = 0x15
    QUEUE_SELECT = 0x16
    QUEUE_SIZE = 0x18
    QUEUE_MSIX_VECTOR = 0x1A
    QUEUE_ENABLE = 0x1C
    QUEUE_NOTIFY_OFF = 0x1E
    QUEUE_DESC = 0x20
    QUEUE_DRIVER = 0x28
    QUEUE_DEVICE = 0x30


_WIDTH = {Common.DEVICE_FEATURE_SELECT: 4, Common.DEVICE_FEATURE: 4,
          Common.DRIVER_FEATURE_SELECT: 4, Common.DRIVER_FEATURE: 4,
          Common.CONFIG_MSIX_VECTOR: 2, Common.NUM_QUEUES: 2, Common.DEVICE_STATUS: 1,
          Common.CONFIG_GENERATION: 1, Common.QUEUE_SELECT: 2, Common.QUEUE_SIZE: 2,
          Common.QUEUE_MSIX_VECTOR: 2, Common.QUEUE_ENABLE: 2, Common.QUEUE_NOTIFY_OFF: 2}
_QUEUE_ADDR = {Common.QUEUE_DESC: "desc_addr", Common.QUEUE_DRIVER: "avail_addr",
               Common.QUEUE_DEVICE: "used_addr"}
_QUEUE_REGS = (Common.QUEUE_SIZE, Common.QUEUE_MSIX_VECTOR, Common.QUEUE_ENABLE)

_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
_DRIVER_OK, _FEATURES_OK = int(Status.DRIVER_OK), int(Status.FEATURES_OK)
_USED, _CONFIG = int(Interrupt.USED_BUFFER), int(Interrupt.CONFIG_CHANGE)


def _overlaps(offset: int, size: int, start: int, length: int) -> bool:
    return offset < start + length and start < offset + size


class VirtioPci(MmioBarFunction, QueueKicker):
    """One virtio device as a PCI function. It owns ``device`` (closing closes it).

    ``vm``: a :class:`kvmpy.vm.Vm` (or None in tests). With an in-kernel irqchip, MSI-X goes
    through KVM irqfds and the VM's :class:`~kvmpy.virtio.msix.MsiRouter` (``router``, default
    the Vm's own); otherwise MSI-X messages go to ``msi(address, data)``. With ``iothread`` too,
    notifications are KVM ioeventfds served by it. ``mmio``: the MMIO bus the BAR is placed on
    while it decodes. ``irq(level)``: the INTx line (pin A)."""

    def __init__(self, device: VirtioDevice, vm=None, *, mmio=None, iothread=None,
                 irq: Callable[[int], None] | None = None,
                 msi: Callable[[int, int], None] | None = None, router=None,
                 name: str | None = None):
        queues = len(device.queues)
        if queues > MAX_QUEUES:
            raise KvmpyError(f"virtio-pci: {device.name} has {queues} queues; at most "
                             f"{MAX_QUEUES} fit the notify region")
        cls, sub = CLASS_CODES.get(device.device_type, OTHER_CLASS)
        pci_id = DEVICE_ID_BASE + int(device.device_type)
        super().__init__(VENDOR_ID, pci_id, cls, sub, revision=REVISION)
        self.name = name or f"virtio-{device.name}"
        self.device = device
        self.vm, self.mmio, self.iothread = vm, mmio, iothread
        struct.pack_into("<HH", self.config, SUBSYS_VENDOR, VENDOR_ID, pci_id)
        self.config[INTERRUPT_PIN] = 1                   # INTA#
        self.wmask[INTERRUPT_LINE] = 0xFF                # a scratch register for the OS
        self.init_bar(BAR_INDEX, BAR_SIZE, mem64=True, mmio=mmio)

        # Capabilities, in the order Linux looks for them (the first of each type wins).
        self._add_virtio_cap(CfgType.COMMON, COMMON_CFG, COMMON_CFG_LEN)
        self._add_virtio_cap(CfgType.NOTIFY, NOTIFY_CFG, NOTIFY_CFG_LEN,
                             struct.pack("<I", NOTIFY_OFF_MULTIPLIER))
        self._add_virtio_cap(CfgType.ISR, ISR_CFG, ISR_CFG_LEN)
        if device.config:   # 4.1.4.6: only devices with a device-specific config have one
            self._add_virtio_cap(CfgType.DEVICE, DEVICE_CFG, DEVICE_CFG_LEN)
        # virtio_pci_cfg_cap: bar, offset, length and pci_cfg_data are the driver's to write
        self.pci_cfg_cap = self._add_virtio_cap(
            CfgType.PCI, 0, 0, bytes(4), writable=b"\0\0\xff\0\0\0" + b"\xff" * 12)

        vectors = min(queues + 1, MAX_VECTORS)
        kvm_msi = vm is not None and getattr(vm, "has_irqchip", False)
        self.msix = Msix(vectors, vm=vm if kvm_msi else None, msi=msi, router=router)
        try:
            body, mask = self.msix.capability(BAR_INDEX, MSIX_TABLE, BAR_INDEX, MSIX_PBA)
            self.msix_cap = self.add_capability(MSIX_CAP_ID, body, mask)

            # virtio state the transport keeps (4.1.4.3)
            self._irq = irq
            self._irq_lock = threading.Lock()
            self._isr = 0
            self._intx = 0
            self._device_feature_select = 0
            self._driver_feature_select = 0
            self._queue_sel = 0
            self._config_vector = VIRTIO_MSI_NO_VECTOR
            self._queue_vectors = [VIRTIO_MSI_NO_VECTOR] * queues
            self._seen_used = [0] * queues   # used.idx at the last interrupt, per queue
            device.interrupt = self._interrupt

            # ioeventfds: created now, registered with KVM while the BAR is mapped
            self._eventfds: list[int] = []
            self._ioeventfds: list[int | None] = []   # where each is registered, if anywhere
            if vm is not None and iothread is not None:
                for i in range(queues):
                    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                    self._eventfds.append(fd)
                    self._ioeventfds.append(None)
                    iothread.add_reader(fd, functools.partial(self._on_eventfd, fd, i))
        except BaseException:
            self._close_transport()
            raise

    def _add_virtio_cap(self, cfg_type: CfgType, offset: int, length: int, extra: bytes = b"",
                        writable: bytes | None = None) -> int:
        cap_len = 2 + _CAP.size + len(extra)
        body = _CAP.pack(cap_len, cfg_type, BAR_INDEX, 0, offset, length) + extra
        return self.add_capability(PCI_CAP_ID_VNDR, body, writable)

    # -- placement (what firmware would do) ----------------------------------------------------
    def set_interrupt_line(self, line: int) -> None:
        """What firmware writes in Interrupt Line: the IRQ the INTx pin is wired to."""
        self.config[INTERRUPT_LINE] = line

    def on_map(self, base: int) -> None:
        self._assign_ioeventfds(base)

    def on_unmap(self) -> None:
        self._deassign_ioeventfds()

    def notify_address(self, index: int) -> int:
        """Offset in BAR 0 of queue ``index``'s notify register."""
        return NOTIFY_CFG + NOTIFY_OFF_MULTIPLIER * index

    def _assign_ioeventfds(self, base: int) -> None:
        for i, fd in enumerate(self._eventfds):
            addr = base + self.notify_address(i)
            try:
                self.vm.ioeventfd(fd, addr, 2, datamatch=i)
            except KvmpyError as e:   # the notify still works, through an MMIO exit
                self._report("ioeventfd", f"no ioeventfd at {addr:#x}: {e}")
                continue
            self._ioeventfds[i] = addr

    def _deassign_ioeventfds(self) -> None:
        for i, fd in enumerate(self._eventfds):
            addr, self._ioeventfds[i] = self._ioeventfds[i], None
            if addr is not None:
                try:
                    self.vm.ioeventfd(fd, addr, 2, datamatch=i, deassign=True)
                except KvmpyError:   # the VM may be closing; closing the eventfd releases it
                    pass

    @property
    def ioeventfd_addresses(self) -> list[int | None]:
        return list(self._ioeventfds)

    # -- config space --------------------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        if _overlaps(offset, size, self.pci_cfg_cap + 16, 4):
            self._pci_cfg_access(is_write=False)
        return super().config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        super().config_write(offset, size, value)   # COMMAND's Memory Space bit maps BAR 0
        if _overlaps(offset, size, COMMAND, 2):
            self._update_intx()
        if _overlaps(offset, size, self.msix_cap + 2, 2):
            self.msix.set_control(super().config_read(self.msix_cap + 2, 2))
            self._update_intx()
        if _overlaps(offset, size, self.pci_cfg_cap + 16, 4):
            self._pci_cfg_access(is_write=True)

    def _pci_cfg_access(self, is_write: bool) -> None:
        """4.1.4.9.1: an access to pci_cfg_data is an access of cap.length bytes at cap.offset
        in BAR cap.bar. Ignored unless the BAR is ours and the access is 1, 2 or 4 bytes,
        aligned and inside it."""
        cap = self.pci_cfg_cap
        bar = self.config[cap + 4]
        offset, length = struct.unpack_from("<II", self.config, cap + 8)
        if (bar != BAR_INDEX or length not in (1, 2, 4) or offset % length
                or offset + length > BAR_SIZE):
            self.ignored += 1
            return
        data = cap + 16
        if is_write:
            self.bar_write(offset, length, int.from_bytes(self.config[data:data + length],
                                                          "little"))
        else:
            value = self.bar_read(offset, length)
            self.config[data:data + length] = value.to_bytes(length, "little")

    # -- BAR 0 ---------------------------------------------------------------------------------
    def bar_read(self, offset: int, size: int) -> int:
        if offset < ISR_CFG:
            value = self._common_read(offset, size)
        elif offset < DEVICE_CFG:
            value = self._isr_read(offset - ISR_CFG, size)
        elif offset < NOTIFY_CFG:
            data = self.device.read_config(offset - DEVICE_CFG, size)
            return int.from_bytes(data, "little")
        elif offset < MSIX_TABLE:
            value = None                     # notify registers are write-only
        elif offset < MSIX_PBA:
            return self.msix.read_table(offset - MSIX_TABLE, size)
        else:
            return self.msix.read_pba(offset - MSIX_PBA, size)
        if value is None:
            self.ignored += 1
            return _ONES.get(size, 0xFFFFFFFF)
        return value

    def bar_write(self, offset: int, size: int, value: int) -> None:
        value &= _ONES.get(size, 0)
        if offset < ISR_CFG:
            self._common_write(offset, size, value)
        elif offset < DEVICE_CFG:
            self.ignored += 1                # ISR status is read-only
        elif offset < NOTIFY_CFG:
            with self.device.lock:
                self.device.write_config(offset - DEVICE_CFG, value.to_bytes(size, "little"))
        elif offset < MSIX_TABLE:
            self._notify_write(offset - NOTIFY_CFG, size, value)
        elif offset < MSIX_PBA:
            self.msix.write_table(offset - MSIX_TABLE, size, value)
        else:
            self.msix.write_pba(offset - MSIX_PBA, size, value)

    def bar_register_name(self, offset: int) -> str | None:
        if offset < ISR_CFG:
            for reg in Common:
                if reg <= offset < reg + _WIDTH.get(reg, 8):
                    half = "" if reg in _WIDTH else ("_hi" if offset - reg >= 4 else "_lo")
                    return reg.name.lower() + half
            return None
        if offset < DEVICE_CFG:
            return "isr" if offset == ISR_CFG else None
        if offset < NOTIFY_CFG:
            return f"config+{offset - DEVICE_CFG:#x}"
        if offset < MSIX_TABLE:
            return f"notify[{(offset - NOTIFY_CFG) // NOTIFY_OFF_MULTIPLIER}]"
        if offset < MSIX_PBA:
            v, field = divmod(offset - MSIX_TABLE, 16)
            return f"msix[{v}]." + ("addr_lo", "addr_hi", "data", "ctrl")[field // 4]
        return "msix_pba"

    # -- common configuration (4.1.4.3) --------------------------------------------------------
    def _common_read(self, offset: int, size: int) -> int | None:
        addr_reg = _addr_reg(offset, size)
        if addr_reg is None and _WIDTH.get(offset) != size:
            return None
        dev = self.device
        if addr_reg is not None:
            q = self._selected()
            value = getattr(q, _QUEUE_ADDR[addr_reg]) if q is not None else 0
            return (value >> (8 * (offset - addr_reg))) & _ONES[size]
        if offset == Common.DEVICE_FEATURE_SELECT:
            return self._device_feature_select
        if offset == Common.DEVICE_FEATURE:
            return dev.device_features_word(self._device_feature_select)
        if offset == Common.DRIVER_FEATURE_SELECT:
            return self._driver_feature_select
        if offset == Common.DRIVER_FEATURE:
            sel = self._driver_feature_select
            return (dev.driver_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        if offset == Common.CONFIG_MSIX_VECTOR:
            return self._config_vector
        if offset == Common.NUM_QUEUES:
            return len(dev.queues)
        if offset == Common.DEVICE_STATUS:
            return dev.status
        if offset == Common.CONFIG_GENERATION:
            return dev.config_generation & 0xFF
        if offset == Common.QUEUE_SELECT:
            return self._queue_sel
        q = self._selected()
        if offset == Common.QUEUE_MSIX_VECTOR:
            return self._queue_vectors[q.index] if q is not None else VIRTIO_MSI_NO_VECTOR
        if q is None:
            return 0
        if offset == Common.QUEUE_SIZE:
            return q.size
        if offset == Common.QUEUE_ENABLE:
            return int(q.ready)
        return q.index   # QUEUE_NOTIFY_OFF: queue q notifies at NOTIFY_CFG + 4 * q

    def _common_write(self, offset: int, size: int, value: int) -> None:
        addr_reg = _addr_reg(offset, size)
        if addr_reg is None and _WIDTH.get(offset) != size:
            self.ignored += 1
            return
        dev = self.device
        if addr_reg is not None:
            self._queue_write(offset, size, value, addr_reg)
        elif offset == Common.DEVICE_FEATURE_SELECT:
            self._device_feature_select = value
        elif offset == Common.DRIVER_FEATURE_SELECT:
            self._driver_feature_select = value
        elif offset == Common.DRIVER_FEATURE:
            if not dev.set_driver_features_word(self._driver_feature_select, value):
                self.ignored += 1
        elif offset == Common.CONFIG_MSIX_VECTOR:
            with dev.lock:
                self._config_vector = self._vector(value)
        elif offset == Common.DEVICE_STATUS:
            self._set_status(value)
        elif offset == Common.QUEUE_SELECT:
            self._queue_sel = value
        elif offset in _QUEUE_REGS:
            self._queue_write(offset, size, value, None)
        else:   # device_feature, num_queues, config_generation, queue_notify_off: read-only
            self.ignored += 1

    def _vector(self, value: int) -> int:
        """An MSI-X vector the driver asks for: kept if it is in the table, else NO_VECTOR
        (4.1.5.1.2.1: the driver reads it back to learn that mapping failed)."""
        if value == VIRTIO_MSI_NO_VECTOR or value < self.msix.vectors:
            return value
        self.ignored += 1
        return VIRTIO_MSI_NO_VECTOR

    def _queue_write(self, offset: int, size: int, value: int, addr_reg) -> None:
        dev = self.device
        with dev.lock:
            q = self._configurable_queue()
            if q is None:
                return
            if offset == Common.QUEUE_ENABLE:
                if value != 1:       # 4.1.4.3.2: the driver MUST NOT write 0
                    self.ignored += 1
                elif not q.ready and dev.queue_ready(q.index):
                    self._seen_used[q.index] = q.used_idx
                return
            if offset == Common.QUEUE_MSIX_VECTOR:
                self._queue_vectors[q.index] = self._vector(value)
                return
            if q.ready:   # a live ring's layout cannot change under the device
                self.ignored += 1
                return
            if offset == Common.QUEUE_SIZE:
                q.size = value       # validated when the queue is enabled
                return
            attr = _QUEUE_ADDR[addr_reg]
            shift = 8 * (offset - addr_reg)
            mask = _ONES[size] << shift
            setattr(q, attr, (getattr(q, attr) & ~mask) | (value << shift))

    def _set_status(self, value: int) -> None:
        dev = self.device
        with dev.lock:
            before = dev.status
            if not dev.set_status(value):
                self.ignored += 1
            if value == 0:
                # 4.1.5.1.2.1: "all queue and configuration change events unmapped upon
                # reset"; pending interrupts are withdrawn with the ISR.
                self._config_vector = VIRTIO_MSI_NO_VECTOR
                self._queue_vectors = [VIRTIO_MSI_NO_VECTOR] * len(dev.queues)
                self._seen_used = [0] * len(dev.queues)
                self.msix.clear_pending()
                with self._irq_lock:
                    self._isr = 0
                self._update_intx()
            started = dev.status & _DRIVER_OK and not before & _DRIVER_OK
        if started:
            # Buffers a driver made available before DRIVER_OK (3.1.1 allows it) are taken now.
            for q in dev.queues:
                if q.ready:
                    self._kick(q.index)

    # -- notifications (4.1.4.4) ---------------------------------------------------------------
    def _notify_write(self, offset: int, size: int, value: int) -> None:
        index = offset // NOTIFY_OFF_MULTIPLIER
        if (size not in (2, 4) or offset % NOTIFY_OFF_MULTIPLIER
                or index >= len(self.device.queues) or value & 0xFFFF != index):
            self.ignored += 1     # QueueNotify = 0xffff and friends (CVE-2011-2512 class)
            return
        self._kick(index)

    # -- interrupts (4.1.4.5, 4.1.5.3, 4.1.5.4) ------------------------------------------------
    @property
    def interrupt_status(self) -> int:
        return self._isr

    @property
    def intx_level(self) -> int:
        return self._intx

    def _interrupt(self, bits: int) -> None:
        """Called by the device, with its lock held, from whichever thread ran it."""
        vectors: list[int] = []
        with self._irq_lock:
            if bits & _CONFIG:
                self._isr |= _CONFIG
            if self.msix.enabled:
                if bits & _CONFIG:
                    vectors.append(self._config_vector)
                if bits & _USED:
                    vectors += self._used_vectors()
            elif bits & _USED:
                self._isr |= _USED
        self._update_intx()
        for v in dict.fromkeys(vectors):
            if v != VIRTIO_MSI_NO_VECTOR:
                self.msix.notify(v)

    def _used_vectors(self) -> list[int]:
        """The vectors of the queues that used buffers since their last interrupt. (The device
        says "used buffer", not which queue; used.idx tells.) If none moved, all enabled
        queues', so that no interrupt is lost."""
        queues = self.device.queues
        moved = []
        for q in queues:
            if q.ready and q.used_idx != self._seen_used[q.index]:
                self._seen_used[q.index] = q.used_idx
                moved.append(q.index)
        if not moved:
            moved = [q.index for q in queues if q.ready]
        return [self._queue_vectors[i] for i in moved]

    def _isr_read(self, offset: int, size: int) -> int | None:
        if offset != 0 or size != 1:
            return None
        with self._irq_lock:
            isr, self._isr = self._isr, 0
        self._update_intx()
        return isr

    def _update_intx(self) -> None:
        """INTx follows ISR while MSI-X is off (4.1.4.5.1), unless the command register
        disables it; STATUS.Interrupt Status says whether it is pending."""
        with self._irq_lock:
            pending = bool(self._isr) and not self.msix.enabled
            status = struct.unpack_from("<H", self.config, STATUS)[0] & ~STATUS_INTERRUPT
            struct.pack_into("<H", self.config, STATUS,
                             status | (STATUS_INTERRUPT if pending else 0))
            cmd = struct.unpack_from("<H", self.config, COMMAND)[0]
            level = int(pending and not cmd & CMD_INTX_DISABLE)
            if level != self._intx:
                self._intx = level
                if self._irq is not None:
                    self._irq(level)

    # -- lifetime ------------------------------------------------------------------------------
    def _close_transport(self) -> None:
        if getattr(self, "_eventfds", None) is None:
            self._eventfds = []
            self._ioeventfds = []
        self.unmap()
        fds, self._eventfds = self._eventfds, []
        for fd in fds:
            self.iothread.remove_reader(fd)
            os.close(fd)
        self._ioeventfds = []
        self.msix.close()

    def close(self) -> None:
        """Unmap BAR 0, release ioeventfds and irqfds, close the device. Stop vCPUs and the I/O
        thread first."""
        self._close_transport()
        self.device.close()

    def __enter__(self) -> "VirtioPci":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _addr_reg(offset: int, size: int):
    """The 64-bit queue address register an access hits (as a whole, or a 32-bit half)."""
    for reg in _QUEUE_ADDR:
        if (offset == reg and size in (4, 8)) or (offset == reg + 4 and size == 4):
            return reg
    return None


# -- the builder's recipe ---------------------------------------------------------------------

# BARs go in the 32-bit MMIO hole (kvmpy/vcpu/modes.py MMIO_HOLE_START = 0xC0000000), above the
# boot timer at 0xC0000000 and the virtio-mmio windows at 0xD0000000, below the IOAPIC
# (0xFEC00000) and LAPIC (0xFEE00000): one 16 KiB BAR per device from 0xE0000000.
PCI_MMIO_BASE = 0xE000_0000
PCI_MMIO_END = 0xFEC0_0000


def add_to_machine(machine, device: VirtioDevice, iothread) -> str:
    """Put ``device`` on the machine's PCI bus 0 (first free slot from 1), its BAR 0 at the next
    16 KiB of PCI_MMIO_BASE, INTA# on a PCI interrupt line (GSI 16-23, kvmpy.devices.pci
    intx_gsi; the fallback when the driver does not enable MSI-X). Returns the device-map
    line."""
    pci = machine.ensure_pci()
    k = sum(isinstance(f, VirtioPci) for f in pci.functions.values())
    base = PCI_MMIO_BASE + k * BAR_SIZE
    if base + BAR_SIZE > PCI_MMIO_END:
        raise KvmpyError("no room left for another virtio-pci BAR below the IOAPIC")
    slot = pci.free_device()
    gsi, irq = None, None
    if machine.vm.has_irqchip:
        gsi, irq = pci.wire_intx(slot, 1, machine.irq_line)
    t = VirtioPci(device, machine.vm, mmio=machine.mmio, iothread=iothread, irq=irq,
                  name=f"virtio{k}")
    machine._stack.callback(t.close)
    pci.add(t, slot)
    # Interrupt Line: the GSI, or 0xFF, "unknown or no connection" (PCI 3.0, 6.2.4)
    t.set_interrupt_line(gsi if gsi is not None else 0xFF)
    t.place(base)
    machine.devices[t.name] = t
    how = "MSI-X through KVM" if t.msix.gsis else "MSI-X"
    intx = f"INTx GSI {gsi}" if gsi is not None else "no INTx (no irqchip)"
    return (f"virtio-pci 00:{slot:02x}.0: BAR0 {base:#x}-{base + BAR_SIZE - 1:#x} "
            f"{how} ({t.msix.vectors} vectors), {intx}")
