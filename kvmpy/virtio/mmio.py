"""virtio-mmio transport, version 2 (virtio 1.2 section 4.2): a virtio device as a BusDevice.

The register block (4.2.2, "MMIO Device Register Layout"), offsets in the device's 4 KiB window:

    0x000 MagicValue R  0x74726976 ("virt")     0x050 QueueNotify W
    0x004 Version R     2 (not legacy)          0x060 InterruptStatus R
    0x008 DeviceID R                            0x064 InterruptACK W
    0x00c VendorID R                            0x070 Status RW
    0x010 DeviceFeatures R                      0x080/0x084 QueueDescLow/High W
    0x014 DeviceFeaturesSel W                   0x090/0x094 QueueDriverLow/High W
    0x020 DriverFeatures W                      0x0a0/0x0a4 QueueDeviceLow/High W
    0x024 DriverFeaturesSel W                   0x0ac-0x0bc SHM registers (no regions: length -1)
    0x030 QueueSel W                            0x0c0 QueueReset (not offered)
    0x034 QueueNumMax R                         0x0fc ConfigGeneration R
    0x038 QueueNum W                            0x100+ device-specific config space
    0x044 QueueReady RW

What the guest can and cannot do here (shared/hostile-inputs.md items 8, 9, 25):
- registers take aligned 32-bit accesses only (4.2.2.2); any other width or alignment reads as
  all-ones and is dropped on write. Config space takes any width that stays inside it;
- QueueSel may hold any value; while it names no queue, the queue registers read 0 (so
  QueueNumMax says "not available", 4.2.3.2) and writes to them are dropped;
- queue registers are writable only between FEATURES_OK and DRIVER_OK, and only while the queue
  is not ready; otherwise they are dropped (CVE-2026-5747 class);
- QueueNotify with an index that names no queue is dropped (CVE-2011-2512 class).

Notifications: by default a QueueNotify write runs the queue in the writing vCPU thread ("direct
mode", which is also what tests use without /dev/kvm). After :meth:`VirtioMmio.attach_ioeventfds`
each queue has a KVM ioeventfd on QueueNotify matching its index, so notifies do not exit to
userspace and the I/O thread (:mod:`kvmpy.virtio.iothread`) runs the queue.

Interrupts: ``irq(level)`` is called with 1 each time the device sets a bit in InterruptStatus
and with 0 when the driver's InterruptACK clears the last bit (or on reset). That suits both a
KVM_IRQ_LINE callable (``Machine.irq_line``) and an :class:`~kvmpy.virtio.irqfd.IrqFd`.

This module does not parse requests or touch rings: the device (:mod:`kvmpy.virtio.device`) does.
The builder chooses the base address and IRQ (:func:`placement`: ``MMIO_BASE + k * 0x1000`` on the
k-th of ``VIRTIO_IRQS``) and tells Linux with ``virtio_mmio.device=4K@BASE:IRQ`` on the command
line (:func:`kernel_cmdline_arg`).
"""
from __future__ import annotations

import enum
import functools
import os
import threading
from collections.abc import Callable

from kvmpy.errors import KvmpyError
from kvmpy.virtio.transport import QueueKicker
from kvmpy.virtio.device import Status, VirtioDevice
from kvmpy.vmexit.bus import BusDevice

MAGIC_VALUE = 0x74726976     # 4.2.2: little-endian "virt"
VERSION = 2                  # 4.2.2: 0x2 (0x1 is the legacy interface)
VENDOR_ID = 0x706D766B       # "kvmp" little-endian; drivers only use it to match quirks

# Where the builder puts virtio-mmio devices: device k at MMIO_BASE + k * MMIO_WINDOW (inside the
# 32-bit MMIO hole) on the k-th free ISA IRQ. Not 8: Linux's rtc-cmos claims it unshared for the
# CMOS RTC kvmpy has at 0x70 (virtio-mmio asks for a shared line, so the second request fails);
# not 12: the i8042 AUX port's. 1 and 4 are the keyboard's and COM1's.
MMIO_BASE = 0xD000_0000
MMIO_WINDOW = 0x1000
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11)
FIRST_IRQ = VIRTIO_IRQS[0]

_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
_DRIVER_OK, _FEATURES_OK = int(Status.DRIVER_OK), int(Status.FEATURES_OK)


class Reg(enum.IntEnum):
    """Register offsets (virtio 1.2, 4.2.2 table "MMIO Device Register Layout")."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    QUEUE_RESET = 0x0C0
    CONFIG_GENERATION = 0x0FC
    CONFIG = 0x100


_QUEUE_ADDR = {   # register -> (queue attribute, which 32-bit half)
    Reg.QUEUE_DESC_LOW: ("desc_addr", 0), Reg.QUEUE_DESC_HIGH: ("desc_addr", 1),
    Reg.QUEUE_DRIVER_LOW: ("avail_addr", 0), Reg.QUEUE_DRIVER_HIGH: ("avail_addr", 1),
    Reg.QUEUE_DEVICE_LOW: ("used_addr", 0), Reg.QUEUE_DEVICE_HIGH: ("used_addr", 1),
}


def placement(k: int) -> tuple[int, int]:
    """(base address, IRQ) of the k-th virtio-mmio device (k from 0)."""
    if not 0 <= k < len(VIRTIO_IRQS):
        raise KvmpyError(f"at most {len(VIRTIO_IRQS)} virtio-mmio devices are supported "
                         f"(one per free ISA IRQ: {', '.join(map(str, VIRTIO_IRQS))})")
    return MMIO_BASE + k * MMIO_WINDOW, VIRTIO_IRQS[k]


def kernel_cmdline_arg(base: int, irq: int) -> str:
    """The Linux command-line parameter that declares a device (drivers/virtio/virtio_mmio.c,
    ``virtio_mmio.device=<size>@<baseaddr>:<irq>``)."""
    return f"virtio_mmio.device=4K@{base:#x}:{irq}"


class VirtioMmio(BusDevice, QueueKicker):
    """The virtio-mmio register block of one device. It owns ``device`` (closing closes it)."""

    window = MMIO_WINDOW

    def __init__(self, device: VirtioDevice, irq: Callable[[int], None] | None = None,
                 name: str | None = None):
        self.device = device
        self.name = name or f"virtio-{device.name}"
        self._irq = irq
        self._irq_lock = threading.Lock()
        self._isr = 0                     # InterruptStatus
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._queue_sel = 0
        self.ignored = 0                  # register accesses dropped (wrong size, state, index)
        self._eventfds: list[int] = []
        self._ioeventfd_vm = None
        self._ioeventfd_addr = 0
        self._iothread = None
        device.interrupt = self._interrupt

    # -- BusDevice -----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= Reg.CONFIG:
            data = self.device.read_config(offset - Reg.CONFIG, size)
            return int.from_bytes(data, "little")
        if size != 4 or offset % 4:
            self.ignored += 1
            return _ONES.get(size, 0xFFFFFFFF)
        dev = self.device
        if offset == Reg.MAGIC_VALUE:
            return MAGIC_VALUE
        if offset == Reg.VERSION:
            return VERSION
        if offset == Reg.DEVICE_ID:
            return int(dev.device_type)
        if offset == Reg.VENDOR_ID:
            return VENDOR_ID
        if offset == Reg.DEVICE_FEATURES:
            return dev.device_features_word(self._device_features_sel)
        if offset == Reg.QUEUE_NUM_MAX:
            q = self._selected()
            return q.max_size if q is not None else 0
        if offset == Reg.QUEUE_READY:
            q = self._selected()
            return int(q is not None and q.ready)
        if offset == Reg.INTERRUPT_STATUS:
            return self._isr
        if offset == Reg.STATUS:
            return dev.status
        if offset == Reg.CONFIG_GENERATION:
            return dev.config_generation
        # Write-only registers, SHM (no regions: 4.2.2 says a length of -1) and the unused gaps.
        self.ignored += 1
        return 0xFFFFFFFF

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= Reg.CONFIG:
            data = (value & _ONES.get(size, 0)).to_bytes(size, "little")
            with self.device.lock:
                self.device.write_config(offset - Reg.CONFIG, data)
            return
        if size != 4 or offset % 4:
            self.ignored += 1
            return
        value &= 0xFFFFFFFF
        if offset == Reg.QUEUE_NOTIFY:
            self._notify(value)
        elif offset == Reg.INTERRUPT_ACK:
            self._ack(value)
        elif offset == Reg.STATUS:
            self._set_status(value)
        elif offset == Reg.DEVICE_FEATURES_SEL:
            self._device_features_sel = value
        elif offset == Reg.DRIVER_FEATURES_SEL:
            self._driver_features_sel = value
        elif offset == Reg.DRIVER_FEATURES:
            if not self.device.set_driver_features_word(self._driver_features_sel, value):
                self.ignored += 1
        elif offset == Reg.QUEUE_SEL:
            self._queue_sel = value
        elif offset == Reg.QUEUE_NUM or offset == Reg.QUEUE_READY or offset in _QUEUE_ADDR:
            self._queue_write(offset, value)
        else:
            self.ignored += 1

    def register_name(self, offset: int, is_write: bool) -> str | None:
        if offset >= Reg.CONFIG:
            return f"config+{offset - Reg.CONFIG:#x}"
        try:
            return Reg(offset).name
        except ValueError:
            return None

    # -- registers with effects ----------------------------------------------------------------
    def _queue_write(self, offset: int, value: int) -> None:
        dev = self.device
        with dev.lock:
            q = self._configurable_queue()
            if q is None:
                return
            if offset == Reg.QUEUE_READY:
                if value == 1 and not q.ready:
                    dev.queue_ready(q.index)
                elif value == 0:
                    q.ready = False
                elif value != 1:
                    self.ignored += 1
                return
            if q.ready:   # a live ring's layout cannot change under the device
                self.ignored += 1
                return
            if offset == Reg.QUEUE_NUM:
                q.size = value       # validated when the queue is made ready
            else:
                attr, half = _QUEUE_ADDR[offset]
                old = getattr(q, attr)
                if half:
                    setattr(q, attr, (old & 0xFFFFFFFF) | (value << 32))
                else:
                    setattr(q, attr, (old & ~0xFFFFFFFF) | value)

    def _set_status(self, value: int) -> None:
        dev = self.device
        with dev.lock:
            before = dev.status
            if not dev.set_status(value):
                self.ignored += 1
            if value == 0:
                # 4.2.2.1: reset clears InterruptStatus (and QueueReady, done by the device).
                with self._irq_lock:
                    self._isr = 0
                    if self._irq is not None:
                        self._irq(0)
            started = dev.status & _DRIVER_OK and not before & _DRIVER_OK
        if started:
            # Buffers a driver made available before DRIVER_OK (3.1.1 allows it) are taken now.
            for q in dev.queues:
                if q.ready:
                    self._kick(q.index)

    def _notify(self, index: int) -> None:
        if index >= len(self.device.queues):   # QueueNotify = 0xffff and friends
            self.ignored += 1
            return
        self._kick(index)

    # -- interrupts ----------------------------------------------------------------------------
    @property
    def interrupt_status(self) -> int:
        return self._isr

    def _interrupt(self, bits: int) -> None:
        """Called by the device, from whichever thread ran it."""
        with self._irq_lock:
            self._isr |= bits
            if self._irq is not None:
                self._irq(1)

    def _ack(self, value: int) -> None:
        with self._irq_lock:
            if not self._isr:
                return
            self._isr &= ~value
            if not self._isr and self._irq is not None:
                self._irq(0)

    # -- ioeventfd + I/O thread ----------------------------------------------------------------
    def attach_ioeventfds(self, vm, base: int, iothread) -> None:
        """Register a KVM ioeventfd per queue on QueueNotify at guest-physical ``base`` + 0x50
        (datamatch = queue index, 4-byte writes) and serve them from ``iothread``."""
        if self._eventfds:
            raise KvmpyError(f"{self.name}: ioeventfds are already attached")
        addr = base + Reg.QUEUE_NOTIFY
        self._ioeventfd_vm, self._ioeventfd_addr, self._iothread = vm, addr, iothread
        try:
            for i in range(len(self.device.queues)):
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                try:
                    vm.ioeventfd(fd, addr, 4, datamatch=i)
                except BaseException:
                    os.close(fd)
                    raise
                self._eventfds.append(fd)
                iothread.add_reader(fd, functools.partial(self._on_eventfd, fd, i))
        except BaseException:
            self.detach_ioeventfds()
            raise

    def detach_ioeventfds(self) -> None:
        fds, self._eventfds = self._eventfds, []
        for i, fd in enumerate(fds):
            self._iothread.remove_reader(fd)
            try:
                self._ioeventfd_vm.ioeventfd(fd, self._ioeventfd_addr, 4, datamatch=i,
                                             deassign=True)
            except KvmpyError:   # the VM may be closing; closing the eventfd releases it
                pass
            os.close(fd)

    def close(self) -> None:
        """Detach the ioeventfds and close the device. Stop vCPUs and the I/O thread first."""
        self.detach_ioeventfds()
        self.device.close()

    def __enter__(self) -> "VirtioMmio":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
