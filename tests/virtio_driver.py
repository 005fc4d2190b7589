"""The guest's side of virtio-mmio, played in Python, for the virtio tests.

A driver written from the spec (virtio 1.2 sections 2.7, 3.1.1, 4.2.3), not from kvmpy's device
code: it lays split rings out in guest RAM through GuestMemory, talks to the device only through
register reads and writes at MMIO offsets (the transport itself, or an MmioBus at an absolute
address as the vCPU exit path would), posts descriptor chains, notifies, and reads the used
ring. Helpers for writing raw (hostile) descriptors are included.
"""
from __future__ import annotations

import struct
import threading
import time

# 4.2.2 register offsets, written out again here on purpose (not imported from kvmpy).
MAGIC, VERSION, DEVICE_ID, VENDOR_ID = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY, INTERRUPT_STATUS, INTERRUPT_ACK, STATUS = 0x050, 0x060, 0x064, 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
CONFIG_GENERATION, CONFIG = 0x0FC, 0x100

# 2.1 status bits
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128
# feature bits
F_INDIRECT_DESC, F_EVENT_IDX, F_VERSION_1 = 1 << 28, 1 << 29, 1 << 32
# 2.7.5 descriptor flags
NEXT, WRITE, INDIRECT = 1, 2, 4

DESC = struct.Struct("<QIHH")


class Regs:
    """Register access through an MmioBus at guest-physical ``base``, as the dispatcher does."""

    def __init__(self, bus, base: int):
        self.bus, self.base = bus, base

    def read(self, offset: int, size: int = 4) -> int:
        addr = self.base + offset
        m = self.bus.lookup(addr)
        mask = (1 << (8 * size)) - 1
        return mask if m is None else m.device.read(addr - m.base, size) & mask

    def write(self, offset: int, size: int, value: int) -> None:
        addr = self.base + offset
        m = self.bus.lookup(addr)
        if m is not None:
            m.device.write(addr - m.base, size, value & ((1 << (8 * size)) - 1))


class IrqRecorder:
    """An interrupt line: records levels, and lets a test wait for the next rising edge."""

    def __init__(self) -> None:
        self.levels: list[int] = []
        self.raised = 0
        self._cond = threading.Condition()

    def __call__(self, level: int) -> None:
        with self._cond:
            self.levels.append(level)
            if level:
                self.raised += 1
            self._cond.notify_all()

    def wait_raised(self, count: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.raised >= count, timeout)


class Allocator:
    """Bump allocator for buffers in guest RAM."""

    def __init__(self, start: int, end: int):
        self.next, self.end = start, end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = -(-self.next // align) * align
        if addr + size > self.end:
            raise MemoryError("test driver out of guest buffer space")
        self.next = addr + max(size, 1)
        return addr


class Request:
    """One posted chain: its head and where its device-writable buffers are."""

    def __init__(self, vq: "Virtqueue", head: int, descs: list[int], writable: list[tuple]):
        self.vq, self.head, self.descs, self.writable = vq, head, descs, writable

    def written(self) -> bytes:
        """All device-writable bytes, concatenated."""
        return b"".join(self.vq.memory.read(a, n) for a, n in self.writable)


class Virtqueue:
    """The driver's side of one split virtqueue (2.7) laid out at ``base``."""

    def __init__(self, memory, index: int, size: int, base: int, alloc: Allocator,
                 event_idx: bool = False):
        self.memory, self.index, self.size, self.alloc = memory, index, size, alloc
        self.event_idx = event_idx
        self.desc = base                                         # 16-byte aligned
        self.avail = self.desc + 16 * size                       # 2-byte aligned
        self.used = -(-(self.avail + 6 + 2 * size) // 4) * 4     # 4-byte aligned
        self.end = self.used + 6 + 8 * size
        memory.fill(base, self.end - base)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.pending: dict[int, Request] = {}

    # -- raw access (for hostile tests) --------------------------------------------------------
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
                   table: int | None = None) -> None:
        self.memory.write_struct((self.desc if table is None else table) + 16 * i, DESC,
                                 addr, length, flags, nxt)

    def publish(self, head: int) -> None:
        """Put ``head`` in the available ring and bump avail.idx (2.7.13)."""
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def publish_raw(self, head: int, descs: list[int] | None = None,
                    writable: list[tuple] = ()) -> Request:
        """Publish a chain the test wrote itself with write_desc()."""
        descs = descs or [head]
        for d in descs:
            if d in self.free:
                self.free.remove(d)
        req = Request(self, head, descs, list(writable))
        self.pending[head] = req
        self.publish(head)
        return req

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + 8 * self.size)

    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    # -- posting -------------------------------------------------------------------------------
    def submit(self, out: list[bytes] = (), in_: list[int] = (), indirect: bool = False,
               publish: bool = True) -> Request:
        """Post one chain: device-readable buffers with the bytes in ``out``, then
        device-writable buffers of the sizes in ``in_``. ``indirect``: through an indirect
        table (one ring descriptor)."""
        bufs = []
        for data in out:
            a = self.alloc.alloc(len(data))
            self.memory.write(a, data)
            bufs.append((a, len(data), 0))
        writable = []
        for n in in_:
            a = self.alloc.alloc(n)
            self.memory.fill(a, n, 0xAA)   # poison: the test sees what the device wrote
            bufs.append((a, n, WRITE))
            writable.append((a, n))
        if indirect:
            table = self.alloc.alloc(16 * len(bufs))
            for i, (a, n, f) in enumerate(bufs):
                more = NEXT if i + 1 < len(bufs) else 0
                self.write_desc(i, a, n, f | more, i + 1, table=table)
            head = self.free.pop(0)
            self.write_desc(head, table, 16 * len(bufs), INDIRECT)
            descs = [head]
        else:
            if len(bufs) > len(self.free):
                raise MemoryError("no free descriptors")
            descs = [self.free.pop(0) for _ in bufs]
            for i, (a, n, f) in enumerate(bufs):
                more = NEXT if i + 1 < len(bufs) else 0
                self.write_desc(descs[i], a, n, f | more, descs[i + 1] if more else 0)
        req = Request(self, descs[0], descs, writable)
        self.pending[req.head] = req
        if publish:
            self.publish(req.head)
        return req

    def get_used(self) -> list[tuple[Request, int]]:
        """Used entries since the last call, as (request, len); frees their descriptors."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.last_used % self.size
            head, length = self.memory.read_struct(self.used + 4 + 8 * slot, struct.Struct("<II"))
            req = self.pending.pop(head)
            self.free.extend(req.descs)
            out.append((req, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            self.set_used_event(self.last_used)
        return out


class MmioDriver:
    """Negotiates with a virtio-mmio device at ``regs`` and sets up its queues (3.1.1)."""

    def __init__(self, memory, regs, area: tuple[int, int] = (0x10000, 0x100000)):
        self.memory, self.regs = memory, regs
        self.alloc = Allocator(*area)
        self.queues: list[Virtqueue] = []
        self.features = 0

    def read(self, offset: int, size: int = 4) -> int:
        return self.regs.read(offset, size)

    def write(self, offset: int, value: int, size: int = 4) -> None:
        self.regs.write(offset, size, value)

    def status(self) -> int:
        return self.read(STATUS)

    def device_features(self) -> int:
        words = []
        for sel in (0, 1):
            self.write(DEVICE_FEATURES_SEL, sel)
            words.append(self.read(DEVICE_FEATURES))
        return words[0] | words[1] << 32

    def negotiate(self, want: int | None = None) -> int:
        """Steps 1-6 of 3.1.1: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK."""
        assert self.read(MAGIC) == 0x74726976 and self.read(VERSION) == 2
        self.write(STATUS, 0)
        self.write(STATUS, ACKNOWLEDGE)
        self.write(STATUS, ACKNOWLEDGE | DRIVER)
        offered = self.device_features()
        self.features = offered if want is None else offered & want
        for sel in (0, 1):
            self.write(DRIVER_FEATURES_SEL, sel)
            self.write(DRIVER_FEATURES, (self.features >> (32 * sel)) & 0xFFFFFFFF)
        self.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
        assert self.status() & FEATURES_OK, "device refused our features"
        return self.features

    def setup_queue(self, index: int, size: int | None = None) -> Virtqueue:
        """4.2.3.2: select, check, size, addresses, ready."""
        self.write(QUEUE_SEL, index)
        assert self.read(QUEUE_READY) == 0
        max_size = self.read(QUEUE_NUM_MAX)
        assert max_size, f"queue {index} is not available"
        size = size or max_size
        base = self.alloc.alloc(16 * size + 6 + 2 * size + 4 + 6 + 8 * size, align=4096)
        vq = Virtqueue(self.memory, index, size, base, self.alloc,
                       event_idx=bool(self.features & F_EVENT_IDX))
        self.write(QUEUE_NUM, size)
        for low, addr in ((QUEUE_DESC_LOW, vq.desc), (QUEUE_DRIVER_LOW, vq.avail),
                          (QUEUE_DEVICE_LOW, vq.used)):
            self.write(low, addr & 0xFFFFFFFF)
            self.write(low + 4, addr >> 32)
        self.write(QUEUE_READY, 1)
        while len(self.queues) <= index:
            self.queues.append(None)
        self.queues[index] = vq
        return vq

    def init(self, want: int | None = None, queues: int = 1, size: int | None = None) -> None:
        """The whole of 3.1.1: negotiate, set up ``queues`` queues, DRIVER_OK."""
        self.negotiate(want)
        for i in range(queues):
            self.setup_queue(i, size)
        self.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        assert self.status() & DRIVER_OK

    def notify(self, index: int = 0) -> None:
        self.write(QUEUE_NOTIFY, index)

    def ack_interrupt(self) -> int:
        isr = self.read(INTERRUPT_STATUS)
        if isr:
            self.write(INTERRUPT_ACK, isr)
        return isr

    def config(self, offset: int, size: int) -> int:
        return self.read(CONFIG + offset, size)

    def wait_used(self, index: int = 0, count: int = 1, timeout: float = 10.0):
        """Poll the used ring until ``count`` entries arrived (for the threaded paths)."""
        vq = self.queues[index]
        got: list = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got += vq.get_used()
            if len(got) >= count:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(got)} of {count} used entries after {timeout} s")
            time.sleep(0.001)
        return got


# -- the guest of tests/guests/virtio_blk_bench.S ---------------------------------------------
BENCH_SEED = 0x9E3779B97F4A7C15      # its SEED


def bench_blocks(n: int, nblocks: int) -> list[int]:
    """The 4 KiB blocks that guest reads, in order: xorshift64 (13, 7, 17) modulo ``nblocks``."""
    x, m, out = BENCH_SEED, (1 << 64) - 1, []
    for _ in range(n):
        x ^= (x << 13) & m
        x ^= x >> 7
        x ^= (x << 17) & m
        out.append(x % nblocks)
    return out


def bench_end(line: str) -> dict[str, int]:
    """Its last line, ``end err:E sector:S data:D sum:X``, as a dict of those four numbers
    (hexadecimal; ``data`` is the first 8 bytes of the last batch's first buffer in order,
    ``sum`` a hash of the first 8 bytes of every sector read: see :func:`bench_expect`)."""
    words = line.split()
    if words[:1] != ["end"]:
        raise ValueError(f"not the guest's end line: {line!r}")
    return {k: int(v, 16) for k, v in (w.split(":") for w in words[1:])}


def bench_expect(disk: bytes, n: int, qd: int) -> dict[str, int]:
    """What that guest's end line must say after ``n`` requests in batches of ``qd`` from the
    image ``disk`` (a multiple of 4 KiB): no error, the last batch's first request, and the
    hash of every 512-byte sector read, in request order: x = rol64(x, 5) ^ its first 8 bytes
    as a little-endian number (order-sensitive, so a buffer swapped or a sector not read
    shows)."""
    blocks = bench_blocks(n, len(disk) // 4096)
    last, x, m = blocks[n - qd], 0, (1 << 64) - 1
    for b in blocks:
        for s in range(b * 4096, b * 4096 + 4096, 512):
            x = (((x << 5) | (x >> 59)) & m) ^ int.from_bytes(disk[s:s + 8], "little")
    return {"err": 0, "sector": (last * 8) & 0xFFFFFFFF,
            "data": int.from_bytes(disk[last * 4096:last * 4096 + 8], "big"), "sum": x}
