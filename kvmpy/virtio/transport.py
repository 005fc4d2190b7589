"""What the virtio transports (mmio.py, pci.py) share: running a queue when the driver notifies.

With KVM ioeventfds attached (``self._eventfds``: one eventfd per queue) a notify is an eventfd
count that the I/O thread turns into ``device.notify(index)``; without them (tests, no /dev/kvm)
the notifying vCPU runs the queue itself. Registers and interrupts stay in each transport.
"""
from __future__ import annotations

import os


class QueueKicker:
    device: object
    _eventfds: list

    def _kick(self, index: int) -> None:
        if self._eventfds:
            # A notify that reached userspace anyway (or the DRIVER_OK kick) goes through the
            # I/O thread too, so one thread runs the queues.
            os.eventfd_write(self._eventfds[index], 1)
        else:
            # Direct mode: the notifying vCPU runs the queue until it is empty.
            while self.device.notify(index):
                pass

    def _on_eventfd(self, fd: int, index: int) -> bool:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:   # called again for leftover work: nothing new to consume
            pass
        return self.device.notify(index)
