"""What the virtio transports (mmio.py, pci.py) share: the queue selector and when a queue may be
configured, and running a queue when the driver notifies.

With KVM ioeventfds attached (``self._eventfds``: one eventfd per queue) a notify is an eventfd
count that the I/O thread turns into ``device.notify(index)``; without them (tests, no /dev/kvm)
the notifying vCPU runs the queue itself. Registers and interrupts stay in each transport.
"""
from __future__ import annotations

import os

from kvmpy.virtio.device import Status

_DRIVER_OK, _FEATURES_OK = int(Status.DRIVER_OK), int(Status.FEATURES_OK)


class QueueKicker:
    device: object
    _eventfds: list
    _queue_sel = 0      # the driver's queue selector (QueueSel / queue_select)
    ignored = 0         # driver writes ignored as out of place

    def _selected(self):
        queues = self.device.queues
        sel = self._queue_sel
        return queues[sel] if sel < len(queues) else None

    def _configurable_queue(self):
        """The selected queue if the driver may configure it now, else None (counted): queues
        are set up after FEATURES_OK and before DRIVER_OK (3.1.1), and a selector out of range
        names none (CVE-2011-2512 class). Call with the device lock held."""
        q = self._selected()
        s = self.device.status
        if q is None or not s & _FEATURES_OK or s & _DRIVER_OK:
            self.ignored += 1
            return None
        return q

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
        return self.device.notify(index, poll=True)   # the I/O thread may poll a while
