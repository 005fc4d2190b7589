"""What the virtio benchmarks (virtio_blk, virtio_net) drive a device through: a real VM with
registered guest RAM, kvmpy's I/O thread, the device behind VirtioMmio on an MmioBus, negotiated
by the tests' spec-written driver (tests/virtio_driver.py: VERSION_1 only unless a benchmark
asks for more, e.g. EVENT_IDX; no INDIRECT, no offloads), and QueueNotify as a KVM_IOEVENTFD served by the I/O thread."""
from __future__ import annotations

import os

from kvmpy.kvm import Kvm
from kvmpy.memory import GuestMemory
from kvmpy.virtio.iothread import IoThread
from kvmpy.virtio.mmio import MMIO_BASE, VirtioMmio
from kvmpy.vmexit.bus import MmioBus
from virtio_driver import F_VERSION_1, MmioDriver, Regs


class EventfdIrq:
    """The transport's interrupt line: an eventfd the driver waits on (level 0 is a no-op, as
    for IrqFd on an edge-triggered line). An fd handed to KVM_IRQFD cannot serve: KVM consumes
    its count, so user space could not wait on it."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC)

    def __call__(self, level: int) -> None:
        if level:
            os.eventfd_write(self.fd, 1)


class VirtioRig:
    """``make_device(memory)`` behind VirtioMmio in a VM with ``mem_size`` bytes of RAM.
    ``ioeventfds=False``: no ioeventfd, a notify runs the device in the notifying thread.
    ``shared=True``: guest RAM mapped shared, for a driver in a forked process."""

    def __init__(self, make_device, mem_size: int, queues: int = 1, ioeventfds: bool = True,
                 shared: bool = False, want: int = F_VERSION_1):
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        # shared: RAM that a forked guest-side driver process writes too (--driver-process)
        self.mem = GuestMemory([(0, mem_size)], shared=shared)
        self.mem.register(self.vm)
        self.io = IoThread(name="virtio-io").start()
        self.irq = EventfdIrq()
        self.dev = make_device(self.mem)
        self.transport = VirtioMmio(self.dev, irq=self.irq)
        self.bus = MmioBus()
        self.bus.insert(self.transport, MMIO_BASE)
        self.drv = MmioDriver(self.mem, Regs(self.bus, MMIO_BASE), area=(0x10000, mem_size))
        self.drv.init(want=want, queues=queues)
        if ioeventfds:
            self.transport.attach_ioeventfds(self.vm, MMIO_BASE, self.io)

    def close(self) -> None:
        self.transport.close()       # closes the device (and a net device's backend)
        self.io.close()
        os.close(self.irq.fd)
        self.mem.close()
        self.vm.close()
        self.kvm.close()
