"""The device's side of one split virtqueue (virtio 1.2 section 2.7), checking all the driver wrote.

A :class:`Queue` knows where the driver put the three parts of the ring (descriptor table, driver
area a.k.a. available ring, device area a.k.a. used ring) and how big it is. The device layer
asks it for the next request with :meth:`Queue.pop`, which returns a :class:`DescriptorChain`: the
request's buffers as two lists of guest-physical ``(addr, len)`` segments, device-readable ones
and device-writable ones. Devices never see descriptor flags, ``next`` fields or ring indices.
When a request is done, :meth:`Queue.add_used` publishes it in the used ring, and
:meth:`Queue.needs_interrupt` says whether the driver asked to be interrupted for it.

The guest is untrusted (shared/hostile-inputs.md items 1-7, 10, 11, 15). Every rule the ring
protocol has is checked here, and a driver that breaks one gets a :class:`QueueError`, which the
device layer turns into DEVICE_NEEDS_RESET (2.1.2). In particular:

- activation refuses a size that is 0, not a power of two or above the device's maximum, and
  rings that are misaligned or not wholly inside guest RAM (2.7, "Virtqueue Part Alignment");
- each descriptor is read from guest memory exactly once, into a local tuple, and never again
  (the driver may rewrite it under our feet);
- ``next`` must be below the table size; a chain may visit at most table-size descriptors, so a
  loop ends in an error, never a hang (2.7.5.2);
- the total length is kept below 2^32 (2.7.5.2; a used-ring ``len`` is 32 bits);
- device-writable descriptors come after all device-readable ones (2.7.4.2);
- VIRTQ_DESC_F_INDIRECT only if negotiated, never together with NEXT, never inside an indirect
  table, with a table length that is a non-zero multiple of 16 and at most 65535 entries
  (2.7.5.3.1);
- every buffer lies wholly inside one RAM region (GuestMemory.check, or the same test against
  the region of the buffer before it: no wrap past 2^64, no holes, no MMIO, so never the
  device's own registers);
- ``avail.idx`` may run at most ``size`` entries ahead of what the device consumed (2.7.6), and a
  head that is still in flight cannot be made available again (it would be completed twice).

It does not parse requests (devices do), run anything asynchronously, or know about transports.
Only the split ring is implemented (no VIRTIO_F_RING_PACKED, no VIRTIO_F_IN_ORDER).

Memory ordering: the rings are shared with vCPUs running concurrently. The 16-bit fields the
driver reads or writes meanwhile (avail.idx, avail.flags, the ring heads, used_event, used.idx,
avail_event) are each accessed with one 16-bit load or store (MemoryRegion.u16), never with
struct's pack_into, which zeroes the bytes and then stores them one at a time: a guest reading
used.idx in between took 0 for it (tests/test_virtio_queue.py shows the torn reads). x86 keeps
stores in order and loads in order, so the used element is visible before the used index that
publishes it, and the available index is read before the ring entries it covers. The one reordering x86 does allow,
a later load passing an earlier store, matters where the device stores one index and then loads
the driver's (event index handshakes); :func:`full_barrier` is placed there.
"""
from __future__ import annotations

import collections
import enum
import struct
import threading

from kvmpy.errors import GuestMemoryError

# struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; } (2.7.5)
DESC = struct.Struct("<QIHH")
# struct virtq_used_elem { le32 id; le32 len; } (2.7.8)
USED_ELEM = struct.Struct("<II")

MAX_QUEUE_SIZE = 32768          # 2.7: "Queue Size ... The maximum Queue Size value is 32768"
MAX_INDIRECT_ENTRIES = 65535    # an indirect table is indexed by the 16-bit `next` (2.7.5.3)
CHAIN_LENGTH_LIMIT = 1 << 32    # total bytes of one chain stay below this (used `len` is le32)

# Alignment of each part in bytes (2.7, table "Virtqueue Part / Alignment / Size").
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4


class DescFlag(enum.IntFlag):
    """virtq_desc.flags (2.7.5)."""

    NEXT = 1        # the buffer continues in the descriptor named by `next`
    WRITE = 2       # device-writable (otherwise device-readable)
    INDIRECT = 4    # the buffer is a table of descriptors (2.7.5.3)


VIRTQ_AVAIL_F_NO_INTERRUPT = 1  # avail.flags: the driver does not want used-buffer interrupts
VIRTQ_USED_F_NO_NOTIFY = 1      # used.flags: the device does not want notifications (2.7.10)


# Plain ints for the per-descriptor tests: IntFlag's __and__ costs an enum construction each time.
_F_NEXT, _F_WRITE, _F_INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)


class QueueError(Exception):
    """The driver broke the virtqueue protocol; the device must be reset (virtio 1.2 2.1.2)."""


class Segment(collections.namedtuple("Segment", "addr len")):
    """One guest buffer: ``len`` bytes at guest-physical ``addr`` (already checked to be RAM)."""

    __slots__ = ()


def full_barrier(_lock=threading.Lock()) -> None:
    """A full memory barrier (loads may not pass earlier stores across it).

    Python has no fence instruction; acquiring a lock executes a locked read-modify-write
    (glibc's sem_trywait / futex word update), which is a full barrier on x86 (Intel SDM vol. 3A,
    9.2.2: "Locked instructions have a total order" and loads/stores are not reordered with
    them). The lock is private and almost never contended."""
    _lock.acquire()
    _lock.release()


class DescriptorChain:
    """One request: its head index and its buffers, readable ones first, then writable ones.

    Offsets in :meth:`read`, :meth:`write` and the ``*_views`` methods count bytes across the
    readable (resp. writable) segments as if they were one buffer: a device must not assume how
    the driver split a request into descriptors (2.7.4, "Message Framing").

    Each buffer was located in guest RAM once, when the chain was walked (by
    :meth:`GuestMemory.check`, or by the walk's test against the region of the buffer before it,
    which is that check's own test for one region); the chain keeps the region's mapping and the
    offset in it, so the request's reads and writes go straight to the mapping."""

    __slots__ = ("head", "_rd", "_wr", "read_len", "write_len")

    def __init__(self, head: int, readable: list[tuple], writable: list[tuple],
                 read_len: int, write_len: int):
        # Each segment: (guest address, length, mapping, offset of the address in the mapping).
        self.head = head
        self._rd = readable
        self._wr = writable
        self.read_len = read_len
        self.write_len = write_len

    def __repr__(self) -> str:
        return (f"<DescriptorChain head={self.head} readable={self.read_len} "
                f"writable={self.write_len}>")

    @property
    def readable(self) -> list[Segment]:
        """The device-readable buffers as guest ``(addr, len)`` segments."""
        return [Segment(a, n) for a, n, _, _ in self._rd]

    @property
    def writable(self) -> list[Segment]:
        """The device-writable buffers as guest ``(addr, len)`` segments."""
        return [Segment(a, n) for a, n, _, _ in self._wr]

    def read(self, offset: int = 0, size: int | None = None) -> bytes:
        """``size`` bytes (default: all) of the readable part from ``offset``; fewer if shorter."""
        if size is None:
            size = self.read_len - offset
        if self._rd and 0 <= offset and 0 < size and offset + size <= self._rd[0][1]:
            _, _, m, o = self._rd[0]     # the usual case: all in the first segment
            return m[o + offset:o + offset + size]
        pieces = _pieces(self._rd, offset, size)
        if len(pieces) == 1:
            m, o, n = pieces[0]
            return m[o:o + n]
        return b"".join([m[o:o + n] for m, o, n in pieces])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Copy ``data`` into the writable part at ``offset``; returns the bytes that fit."""
        if self._wr:                     # the usual case: all in the last segment (a status)
            _, n, m, o = self._wr[-1]
            start = offset - (self.write_len - n)
            if 0 <= start and start + len(data) <= n:
                m[o + start:o + start + len(data)] = data
                return len(data)
        pieces = _pieces(self._wr, offset, len(data))
        if len(pieces) == 1:
            m, o, n = pieces[0]
            m[o:o + n] = data if n == len(data) else memoryview(data)[:n]
            return n
        done = 0
        mv = memoryview(data)
        for m, o, n in pieces:
            m[o:o + n] = mv[done:done + n]
            done += n
        return done

    def unpack(self, st: struct.Struct, offset: int = 0) -> tuple:
        """``st`` unpacked from the readable part at ``offset`` (ValueError if it is shorter):
        straight from guest RAM when the bytes lie in the first buffer, as a header does."""
        if self._rd and 0 <= offset and offset + st.size <= self._rd[0][1]:
            _, _, m, o = self._rd[0]
            return st.unpack_from(m, o + offset)
        data = self.read(offset, st.size)
        if len(data) != st.size:
            raise ValueError(f"{st.size} bytes at {offset} are past the readable part")
        return st.unpack(data)

    def readable_views(self, offset: int, size: int) -> list[memoryview]:
        """Zero-copy views of the readable part (for pwritev). Release them when done."""
        return [memoryview(m)[o:o + n] for m, o, n in _pieces(self._rd, offset, size)]

    def writable_views(self, offset: int, size: int) -> list[memoryview]:
        """Zero-copy views of the writable part (for preadv). Release them when done."""
        if self._wr and 0 <= offset and 0 < size and offset + size <= self._wr[0][1]:
            _, _, m, o = self._wr[0]     # the usual case: one data buffer
            return [memoryview(m)[o + offset:o + offset + size]]
        return [memoryview(m)[o:o + n] for m, o, n in _pieces(self._wr, offset, size)]


def _pieces(segments: list[tuple], offset: int, size: int) -> list[tuple]:
    """(mapping, offset in it, n) pieces covering ``size`` bytes from ``offset`` across
    ``segments``, fewer bytes if they end first."""
    pieces = []
    if offset < 0 or size <= 0:
        return pieces
    for _, length, m, o in segments:
        if offset >= length:
            offset -= length
            continue
        n = length - offset
        if n > size:
            n = size
        pieces.append((m, o + offset, n))
        size -= n
        if size == 0:
            break
        offset = 0
    return pieces


class Queue:
    """One split virtqueue. The transport writes ``size`` and the three ring addresses while the
    driver configures it; :meth:`activate` validates them. The device layer calls :meth:`pop`,
    :meth:`add_used` and :meth:`needs_interrupt`, always under its own lock.

    :meth:`activate` locates each ring part in guest RAM once (GuestMemory.check: the whole part
    inside one region) and keeps the region's mapping and the part's offset in it; ring entries
    are then read and written at offsets that the index arithmetic keeps inside those checked
    parts. Guest RAM is never remapped while a VM lives, so the location stays valid."""

    #: reads one descriptor: ``(addr, len, flags, next)`` from (mapping, offset); tests wrap it
    #: to see every descriptor read
    _unpack_desc = staticmethod(DESC.unpack_from)

    def __init__(self, memory, index: int, max_size: int):
        if not (0 < max_size <= MAX_QUEUE_SIZE) or max_size & (max_size - 1):
            raise ValueError(f"queue {index}: maximum size {max_size} is not a power of two in "
                             f"1..{MAX_QUEUE_SIZE}")
        self.memory = memory
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """The state after a device reset (virtio-mmio: QueueNum reads back QueueNumMax's value
        until written, as QEMU and Firecracker do)."""
        self.size = self.max_size
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.ready = False
        self.event_idx = False       # VIRTIO_F_EVENT_IDX negotiated (2.7.7, 2.7.10)
        self.indirect = False        # VIRTIO_F_INDIRECT_DESC negotiated (2.7.5.3)
        self._clear_ring_state()

    def _clear_ring_state(self) -> None:
        self.last_avail = 0          # free-running 16-bit index of the next avail entry to take
        self._avail_seen = 0         # avail.idx as last read (entries up to it are validated)
        self.used_idx = 0            # free-running 16-bit used.idx the device publishes
        self._in_flight = bytearray(self.size)   # 1 where a head is in flight
        self.in_flight = 0
        self._signalled_used = 0     # used_idx when the driver was last interrupted
        self._signalled_valid = False
        self._added = False          # used entries added since the last needs_interrupt()
        self.notify_off = False      # disable_notify() ran and enable_notify() has not
        # (gpa, size, mapping) of the region the last buffer was in; size -1 matches nothing,
        # not even a zero-length buffer at 0, so the first buffer always goes through check()
        self._last_region = (0, -1, None)

    # -- activation ----------------------------------------------------------------------------
    def activate(self, event_idx: bool = False, indirect: bool = False) -> None:
        """Validate the configuration the driver wrote and start the ring from index 0.

        Raises QueueError (and leaves the queue not ready) if the size is 0, not a power of two
        or above the maximum, or a ring part is misaligned or not wholly inside guest RAM."""
        self.ready = False
        size = self.size
        if not (0 < size <= self.max_size) or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two in 1..{self.max_size}")
        parts = (("descriptor table", self.desc_addr, DESC_ALIGN, 16 * size),
                 ("available ring", self.avail_addr, AVAIL_ALIGN, 6 + 2 * size),
                 ("used ring", self.used_addr, USED_ALIGN, 6 + 8 * size))
        located = []
        for what, addr, align, length in parts:
            if addr % align:
                raise QueueError(f"{what} at {addr:#x} is not {align}-byte aligned")
            try:
                region, offset = self.memory.check(addr, length)
            except GuestMemoryError:
                raise QueueError(f"{what} at {addr:#x}+{length:#x} is not in guest RAM") from None
            located.append((region, offset))
        (desc, self._desc_off), (avail, self._avail_off), (used, self._used_off) = located
        self._desc_map, self._avail_map, self._used_map = desc.mapping, avail.mapping, used.mapping
        self.desc_hva = desc.host_address + self._desc_off
        self.avail_hva = avail.host_address + self._avail_off
        self.used_hva = used.host_address + self._used_off
        # 16-bit fields the driver reads or writes concurrently go through the regions' u16
        # views (one load or store each; see MemoryRegion): indices of the words below.
        self._avail16, self._used16 = avail.u16, used.u16
        a, u = self._avail_off // 2, self._used_off // 2        # both parts are 2-aligned
        self._i_avail_flags, self._i_avail_idx, self._i_avail_ring = a, a + 1, a + 2
        self._i_used_event = a + 2 + size                       # avail->ring[size]
        self._i_used_flags, self._i_used_idx = u, u + 1
        self._i_avail_event = u + 2 + 4 * size                  # used->ring[size]
        # Notifications wanted (2.7.10.1: flags is 0 or 1; avail_event 0: from the first
        # request), whatever a poll before a reset left in this memory (disable_notify).
        self._used16[self._i_used_flags] = 0
        self._used16[self._i_avail_event] = 0
        self.event_idx = bool(event_idx)
        self.indirect = bool(indirect)
        self._clear_ring_state()
        self.ready = True

    # -- available ring ------------------------------------------------------------------------
    def _read_avail_idx(self) -> int:
        """avail.idx, checked: at most ``size`` entries ahead of what the device consumed."""
        # struct virtq_avail { le16 flags; le16 idx; le16 ring[size]; le16 used_event; }
        avail_idx = self._avail16[self._i_avail_idx]
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if pending > self.size:
            raise QueueError(f"avail.idx {avail_idx} is {pending} entries ahead of the "
                             f"device ({self.last_avail}); the queue has only {self.size}")
        self._avail_seen = avail_idx
        return avail_idx

    def avail_moved(self) -> bool:
        """Whether avail.idx differs from the next entry the device would take: one 16-bit
        load, no validation (:meth:`pop` validates), for a poller's first look. Call only
        while ready."""
        return self._avail16[self._i_avail_idx] != self.last_avail

    def disable_notify(self) -> None:
        """Ask the driver not to notify (a hint it may ignore), while the device polls the
        ring: used.flags = NO_NOTIFY (2.7.10), or with VIRTIO_F_EVENT_IDX an avail_event the
        driver has already passed (2.7.10: it notifies when avail.idx passes avail_event).
        Saves the guest an exit per request. Call with the device lock held, while ready."""
        self.notify_off = True
        if self.event_idx:
            self._used16[self._i_avail_event] = (self.last_avail - 1) & 0xFFFF
        else:
            self._used16[self._i_used_flags] = VIRTQ_USED_F_NO_NOTIFY

    def enable_notify(self) -> bool:
        """Undo :meth:`disable_notify` before the device stops polling, and look again: True
        if a request was made available meanwhile (the driver may not have notified it).
        Call with the device lock held, while ready."""
        self.notify_off = False
        if self.event_idx:
            self._used16[self._i_avail_event] = self.last_avail
        else:
            self._used16[self._i_used_flags] = 0
        # The driver stores avail.idx and then loads the flags; we stored the flags and now
        # load avail.idx: without the barrier both could miss the other's store.
        full_barrier()
        return self.avail_moved()

    def pop(self) -> DescriptorChain | None:
        """The next request the driver made available, validated; None if there is none.

        Raises QueueError if the available ring or the chain breaks a rule (the ring is then in
        an unknown state: the device must be reset)."""
        if not self.ready:   # virtio-mmio 4.2.2.1: no ring access while QueueReady is 0
            return None
        last = self.last_avail
        # avail.idx is read again only once the entries it announced are used up: one read
        # per batch instead of one per request.
        if self._avail_seen == last and self._read_avail_idx() == last:
            if not self.event_idx:
                return None
            # 2.7.10: ask for a notification when the driver goes past what we consumed,
            # then look again: a buffer made available meanwhile would not be notified.
            self._used16[self._i_avail_event] = last
            full_barrier()
            if self._read_avail_idx() == last:
                return None
        head = self._avail16[self._i_avail_ring + last % self.size]
        if head >= self.size:
            raise QueueError(f"available head {head} is not below the queue size {self.size}")
        if self._in_flight[head]:
            raise QueueError(f"head {head} was made available again while still in flight")
        chain = self._walk(head)
        self.last_avail = (last + 1) & 0xFFFF
        self._in_flight[head] = 1
        self.in_flight += 1
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        check = self.memory.check
        unpack_desc = self._unpack_desc
        # The region the last buffer was in: a buffer wholly inside it needs no
        # GuestMemory.check (the test below is that check's own, for one region); any other
        # goes through check(), which finds its region or refuses it.
        r_gpa, r_size, r_map = self._last_region
        table, table_off, table_len = self._desc_map, self._desc_off, self.size
        index = head
        ttl = table_len                 # descriptors this table may still contribute
        in_indirect = False
        readable: list[tuple] = []
        writable: list[tuple] = []
        read_len = write_len = 0
        while True:
            if index >= table_len:
                where = "indirect table" if in_indirect else "descriptor table"
                raise QueueError(f"descriptor index {index} is outside the {where} of "
                                 f"{table_len} entries")
            if ttl == 0:
                # 2.7.5.2 forbids loops; a chain cannot visit more descriptors than exist.
                raise QueueError(f"descriptor chain from head {head} is longer than its table "
                                 f"({table_len} entries): a loop")
            ttl -= 1
            # The one read of this descriptor: everything below uses this local copy.
            addr, length, flags, nxt = unpack_desc(table, table_off + 16 * index)
            if flags & _F_INDIRECT:
                if not self.indirect:
                    raise QueueError("VIRTQ_DESC_F_INDIRECT used but VIRTIO_F_INDIRECT_DESC was "
                                     "not negotiated")
                if in_indirect:
                    raise QueueError("indirect descriptor inside an indirect table")
                if flags & _F_NEXT:
                    raise QueueError("descriptor has both INDIRECT and NEXT")
                if length == 0 or length % DESC.size:
                    raise QueueError(f"indirect table length {length} is not a non-zero "
                                     f"multiple of {DESC.size}")
                entries = length // DESC.size
                if entries > MAX_INDIRECT_ENTRIES:
                    raise QueueError(f"indirect table of {entries} entries (at most "
                                     f"{MAX_INDIRECT_ENTRIES})")
                try:
                    region, table_off = check(addr, length)
                except GuestMemoryError:
                    raise QueueError(f"indirect table at {addr:#x}+{length:#x} is not in "
                                     "guest RAM") from None
                # 2.7.5.3.2: the device ignores WRITE on the descriptor naming the table.
                table, table_len, ttl, index = region.mapping, entries, entries, 0
                in_indirect = True
                continue
            offset = addr - r_gpa
            if offset < 0 or offset + length > r_size:
                try:
                    region, offset = check(addr, length)
                except GuestMemoryError:
                    raise QueueError(f"buffer {addr:#x}+{length:#x} is not in guest RAM") \
                        from None
                r_gpa, r_size, r_map = region.gpa, region.size, region.mapping
                self._last_region = (r_gpa, r_size, r_map)
            if flags & _F_WRITE:
                write_len += length
                if length:
                    writable.append((addr, length, r_map, offset))
            else:
                if writable:
                    raise QueueError(f"device-readable descriptor after a device-writable one "
                                     f"in the chain from head {head}")
                read_len += length
                if length:
                    readable.append((addr, length, r_map, offset))
            if not flags & _F_NEXT:
                break
            index = nxt
        # Checked once at the end: at most 32768 + 65535 lengths below 2^32 each, so the Python
        # ints cannot grow without bound before it.
        if read_len + write_len >= CHAIN_LENGTH_LIMIT:
            raise QueueError(f"descriptor chain from head {head} holds 2^32 bytes or more")
        return DescriptorChain(head, readable, writable, read_len, write_len)

    # -- the C data path (kvmpy/virtio/fastblk.py) ----------------------------------------------
    def export_state(self, vq) -> None:
        """Copy the ring's location and indices into ``vq`` (a ``struct kvmpy_vq *``) for a C
        data path, which runs requests with this class's rules and defers to :meth:`pop` for
        any chain it does not take. ``vq.in_flight`` is set by the caller (it pins the
        buffer). Call only while ready."""
        vq.desc, vq.avail, vq.used = self.desc_hva, self.avail_hva, self.used_hva
        vq.size = self.size
        vq.event_idx, vq.indirect = self.event_idx, self.indirect
        vq.last_avail, vq.avail_seen, vq.used_idx = self.last_avail, self._avail_seen, self.used_idx

    def import_state(self, vq, completed: int) -> None:
        """Take back the indices after the C data path completed ``completed`` requests (their
        used elements are written and published)."""
        self.last_avail, self._avail_seen, self.used_idx = vq.last_avail, vq.avail_seen, vq.used_idx
        if completed:
            self._added = True

    # -- used ring -----------------------------------------------------------------------------
    def add_used(self, head: int, written: int, publish: bool = True) -> None:
        """Return request ``head`` to the driver, saying ``written`` bytes were written to it.
        ``publish=False`` leaves used.idx for :meth:`publish_used` (one store per batch; the
        driver learns of used buffers from the interrupt sent after the batch anyway)."""
        if not (0 <= head < len(self._in_flight)) or not self._in_flight[head]:
            raise QueueError(f"device completed head {head}, which is not in flight")
        # struct virtq_used { le16 flags; le16 idx; struct virtq_used_elem ring[size];
        #                     le16 avail_event; }
        used_idx = self.used_idx
        USED_ELEM.pack_into(self._used_map, self._used_off + 4 + 8 * (used_idx % self.size),
                            head, written)
        self.used_idx = (used_idx + 1) & 0xFFFF
        self._in_flight[head] = 0
        self.in_flight -= 1
        self._added = True
        if publish:
            self.publish_used()

    def publish_used(self) -> None:
        """Store used.idx: the driver may take every element added so far."""
        if self.ready:
            # 2.7.8.1: the elements are written before idx makes them visible (x86 keeps
            # store order).
            self._used16[self._i_used_idx] = self.used_idx

    def needs_interrupt(self) -> bool:
        """Whether the driver wants a used-buffer notification for what was added since the last
        call (2.7.7: VIRTQ_AVAIL_F_NO_INTERRUPT, or with VIRTIO_F_EVENT_IDX the used_event
        index and vring_need_event())."""
        if not self._added:
            return False
        self._added = False
        # The driver stores used_event/flags and then loads used.idx; we stored used.idx and now
        # load its field: without the barrier both could miss the other's store.
        full_barrier()
        if self.event_idx:
            used_event = self._avail16[self._i_used_event]
            new, old = self.used_idx, self._signalled_used
            valid = self._signalled_valid
            self._signalled_used, self._signalled_valid = new, True
            return not valid or vring_need_event(used_event, new, old)
        flags = self._avail16[self._i_avail_flags]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """2.7.7.2 / Linux include/uapi/linux/virtio_ring.h: did the index move past ``event_idx``
    when it went from ``old_idx`` to ``new_idx`` (all 16-bit, wrapping)?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
