"""virtio-net (virtio 1.2 section 5.1): one RX/TX queue pair over a host backend.

The backend (kvmpy/net/: tap or libslirp user networking) moves Ethernet frames:
``send(frame)`` for guest -> host, and a receiver this device installs for host -> guest that
returns False when the guest has posted no receive buffer, so the backend holds the frame and
stops reading until :meth:`rx_ready` (hostile-inputs 19: no permanent stall, bounded memory).

Offered features: VIRTIO_NET_F_MAC (5), so the guest uses the MAC in the config space, and
VIRTIO_NET_F_STATUS (16), link always up. No checksum or segmentation offloads (offload-free
defaults, as Firecracker's), no mergeable RX buffers: each frame goes into one receive chain
after a 12-byte struct virtio_net_hdr (5.1.6: with VIRTIO_F_VERSION_1 the header always has
num_buffers). A frame that does not fit the chain it gets is dropped and counted.
"""
from __future__ import annotations

import os
import struct

from kvmpy.virtio.device import DeviceType, Interrupt, VirtioDevice
from kvmpy.virtio.queue import DescriptorChain, Queue

F_MAC = 1 << 5
F_STATUS = 1 << 16
STATUS_LINK_UP = 1
HDR = struct.Struct("<BBHHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_off, num_buffers
HDR_LEN = HDR.size                # 12
RECEIVEQ, TRANSMITQ = 0, 1
QUEUE_SIZE = 256
MAX_FRAME = 65562                 # 5.1.6.3.1: 65550 + header without GSO is more than enough


def random_mac() -> bytes:
    # locally administered, unicast (IEEE 802: bit 1 of the first octet set, bit 0 clear)
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return bytes(b)


class VirtioNet(VirtioDevice):
    device_type = DeviceType.NET
    name = "net"

    def __init__(self, memory, backend, mac: bytes | None = None, queue_size: int = QUEUE_SIZE):
        self.mac = mac or random_mac()
        config = self.mac + struct.pack("<H", STATUS_LINK_UP)   # struct virtio_net_config
        super().__init__(memory, [queue_size, queue_size], features=F_MAC | F_STATUS,
                         config=config)
        self.backend = backend
        self.rx_frames = self.tx_frames = self.rx_dropped = self.tx_dropped = 0
        backend.set_receiver(self.receive)

    # host -> guest (called from the I/O thread by the backend)
    def receive(self, frame: bytes) -> bool:
        with self.lock:
            q = self.queues[RECEIVEQ]
            if not self.live or not q.ready:
                self.rx_dropped += 1
                return True          # nobody listens: drop, do not hold the backend
            with self.boundary(RECEIVEQ):
                chain = q.pop()
                if chain is None:
                    return False     # no buffer: the backend keeps the frame
                data = HDR.pack(0, 0, 0, 0, 0, 0, 1) + frame
                if len(data) > chain.write_len:
                    self.rx_dropped += 1
                    q.add_used(chain.head, 0)
                else:
                    q.add_used(chain.head, chain.write(0, data))
                    self.rx_frames += 1
                if q.needs_interrupt():
                    self._signal(Interrupt.USED_BUFFER)
            return True

    def process_queue(self, queue: Queue) -> bool:
        if queue.index == RECEIVEQ:   # the driver posted receive buffers
            self.backend.rx_ready()
            return False
        return super().process_queue(queue)

    # guest -> host
    def handle_request(self, queue: Queue, chain: DescriptorChain) -> int:
        n = chain.read_len
        if n < HDR_LEN or n > MAX_FRAME + HDR_LEN:
            self.tx_dropped += 1
            return 0
        frame = chain.read(HDR_LEN, n - HDR_LEN)
        self.backend.send(frame)
        self.tx_frames += 1
        return 0

    def close(self) -> None:
        self.backend.close()
