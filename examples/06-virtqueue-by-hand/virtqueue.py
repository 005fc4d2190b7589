"""Lesson 6: a virtqueue by hand. Python plays the guest's driver against kvmpy's virtio-rng.

    python examples/06-virtqueue-by-hand/virtqueue.py

A split virtqueue (virtio 1.2, 2.7) is three tables in guest memory that driver and device
share: the descriptor table (address, length, flags, next: 16 bytes each), the available ring
(driver -> device: flags, idx, ring[] of descriptor heads) and the used ring (device -> driver:
flags, idx, ring[] of {head, bytes written}). The transport here is virtio-mmio (4.2.2): the
driver writes register offsets; a real guest would do it with MMIO stores.
"""
import struct
import sys

from kvmpy.memory import GuestMemory
from kvmpy.virtio.mmio import VirtioMmio
from kvmpy.virtio.rng import VirtioRng

# virtio-mmio register offsets (virtio 1.2, 4.2.2) and status bits (2.1)
STATUS, DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x70, 0x20, 0x24
QUEUE_SEL, QUEUE_NUM, QUEUE_READY, QUEUE_NOTIFY = 0x30, 0x38, 0x44, 0x50
QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE = 0x80, 0x90, 0xA0
ACK, DRIVER, FEATURES_OK, DRIVER_OK = 1, 2, 8, 4
DESC, AVAIL, USED, BUF = 0x1000, 0x2000, 0x3000, 0x4000
F_WRITE = 2                                     # VIRTQ_DESC_F_WRITE: the device writes it


def main() -> int:
    with GuestMemory([(0, 1 << 20)]) as mem:
        t = VirtioMmio(VirtioRng(mem))
        w = lambda off, val: t.write(off, 4, val)  # noqa: E731  (a guest's 4-byte store)
        w(STATUS, 0)                                       # reset
        w(STATUS, ACK | DRIVER)
        w(DRIVER_FEATURES_SEL, 1)
        w(DRIVER_FEATURES, 1)                              # VIRTIO_F_VERSION_1 (bit 32)
        w(STATUS, ACK | DRIVER | FEATURES_OK)
        w(QUEUE_SEL, 0)
        w(QUEUE_NUM, 4)                                    # a 4-entry queue
        for reg, addr in ((QUEUE_DESC, DESC), (QUEUE_DRIVER, AVAIL), (QUEUE_DEVICE, USED)):
            w(reg, addr)
            w(reg + 4, 0)
        w(QUEUE_READY, 1)
        w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK)

        # descriptor 0: a 16-byte buffer at BUF that the device may write
        mem.write(DESC, struct.pack("<QIHH", BUF, 16, F_WRITE, 0))
        # available ring: ring[0] = head 0, then idx = 1 (publish after the entry is written)
        mem.write_u16(AVAIL + 4, 0)
        mem.write_u16(AVAIL + 2, 1)
        w(QUEUE_NOTIFY, 0)                                 # "queue 0 has work"

        used_idx = mem.read_u16(USED + 2)
        head, written = struct.unpack("<II", mem.read(USED + 4, 8))
        print(f"used.idx={used_idx} head={head} written={written}")
        print(f"random bytes: {mem.read(BUF, written).hex(' ')}")
        return 0 if (used_idx, head, written) == (1, 0, 16) else 1


if __name__ == "__main__":
    sys.exit(main())
