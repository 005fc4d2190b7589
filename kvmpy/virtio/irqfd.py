"""An interrupt line for a virtio transport made of a KVM irqfd: no ioctl per interrupt.

:class:`IrqFd` is a callable with the same contract as ``Machine.irq_line(gsi)`` (``irq(1)``:
raise, ``irq(0)``: lower), so a transport does not care which one it got. KVM_IRQFD injects a
*pulse* on ``gsi`` for every eventfd write (Documentation/virt/kvm/api.rst, KVM_IRQFD), which is
what an edge-triggered input (the ISA IRQs virtio-mmio uses on x86) needs: ``irq(1)`` writes the
eventfd, ``irq(0)`` does nothing. It needs the in-kernel irqchip.

It does not support level-triggered resampling (KVM_IRQFD_FLAG_RESAMPLE).
"""
from __future__ import annotations

import os

from kvmpy.errors import KvmpyError


class IrqFd:
    def __init__(self, vm, gsi: int):
        self.vm, self.gsi = vm, gsi
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            vm.irqfd(self.fd, gsi)
        except BaseException:
            os.close(self.fd)
            raise

    def __call__(self, level: int) -> None:
        if level and self.fd >= 0:
            try:
                os.eventfd_write(self.fd, 1)
            except BlockingIOError:   # counter saturated: an injection is pending anyway
                pass

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.vm.irqfd(self.fd, self.gsi, deassign=True)
        except KvmpyError:   # the VM fd may already be gone; closing the eventfd detaches it
            pass
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "IrqFd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
