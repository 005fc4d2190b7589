"""virtio-rng, the entropy device (virtio 1.2 section 5.4): random bytes from host getrandom().

One request queue. The driver posts device-writable buffers; the device fills at most
``max_bytes`` of each request (64 KiB by default) and says how many it wrote: 5.4.6.2 lets it
use "less than the entire buffer length", and a guest asking for 0xffffffff bytes gets 64 KiB,
never a host allocation of its requested size (hostile-inputs 18). Device-readable buffers are
ignored (5.4.6.1 forbids the driver to post them; they carry nothing the device needs).

It does not rate-limit requests (a guest can still ask continuously; each request costs at most
``max_bytes`` of getrandom) and has no config space or feature bits of its own.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from kvmpy.virtio.device import DeviceType, VirtioDevice
from kvmpy.virtio.queue import DescriptorChain, Queue

QUEUE_SIZE = 256
MAX_BYTES_PER_REQUEST = 64 * 1024


class VirtioRng(VirtioDevice):
    device_type = DeviceType.ENTROPY
    name = "rng"

    def __init__(self, memory, queue_size: int = QUEUE_SIZE,
                 max_bytes: int = MAX_BYTES_PER_REQUEST,
                 source: Callable[[int], bytes] = os.getrandom):
        super().__init__(memory, [queue_size])
        self.max_bytes = max_bytes
        self._source = source
        self.bytes_served = 0

    def handle_request(self, queue: Queue, chain: DescriptorChain) -> int:
        n = min(chain.write_len, self.max_bytes)
        if n <= 0:
            return 0
        data = self._source(n)[:n]   # getrandom may return fewer bytes (a signal): report those
        written = chain.write(0, data)
        self.bytes_served += written
        return written
