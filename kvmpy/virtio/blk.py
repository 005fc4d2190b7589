"""virtio-blk (virtio 1.2 section 5.2) backed by a raw image file (or a block device).

One request queue. A request is (5.2.6)

    struct virtio_blk_req { le32 type; le32 reserved; le64 sector;   // device-readable
                            u8 data[];                               // either direction
                            u8 status; };                            // device-writable

and the device may not assume how the driver split it into descriptors (2.7.4): the header is
the first 16 readable bytes, the status the last writable byte, data whatever lies between.
Supported: IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES. Data moves with preadv/pwritev straight
between the file and guest RAM (GuestMemory.view), at most IOV_MAX segments per system call
(hostile-inputs 14), never through a host-side copy.

Validation before any I/O (hostile-inputs 16, 17): no writable byte for the status (missing, in a
read-only descriptor, zero length): the request is returned with nothing written and no I/O
done, as there is nowhere to say IOERR. Otherwise IOERR for a header shorter than 16 readable
bytes (e.g. in a write-only descriptor), data not a multiple of 512, sectors past the capacity,
a GET_ID buffer under 20 bytes, a write of any kind to a read-only disk (whose file is opened
O_RDONLY: 5.2.6.2 "MUST NOT write any data"), a malformed discard/write-zeroes range list; UNSUPP
for unknown types and unknown discard/write-zeroes flags.

Durability (hostile-inputs 27, 28; 5.2.6.2 "stable writes"): VIRTIO_BLK_F_FLUSH is offered; a
FLUSH calls fdatasync() before its used-ring entry is written, so a "synced" guest survives a host
SIGKILL or crash. If the driver did not negotiate FLUSH, every write is made stable (fdatasync)
before it completes, as the spec requires when FLUSH was offered but not accepted.

Not implemented: multiqueue, CONFIG_WCE (write-back toggling), SECURE_ERASE, zoned devices,
lifetime metrics, asynchronous I/O (requests run one after another in the calling thread), and
locking the image against other processes.
"""
from __future__ import annotations

import ctypes
import enum
import errno
import os
import stat
import struct

from kvmpy.errors import KvmpyError
from kvmpy.virtio.device import DeviceType, VirtioDevice
from kvmpy.virtio.fastblk import RUN_BUDGET, RUN_EMPTY, BlkFastPath, choose_engine
from kvmpy.virtio.queue import DescriptorChain, Queue

SECTOR_SIZE = 512              # 5.2.6: sectors are always 512 bytes
ID_BYTES = 20                  # 5.2.6: VIRTIO_BLK_ID_BYTES
QUEUE_SIZE = 256
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per range: bounds the zero-writing fallback
MAX_DISCARD_SEG = 16
ZERO_CHUNK = 1 << 20           # fallback zero writes go out in 1 MiB pieces
# The C engine's busy-wait for more requests after signalling completions (adaptive, at most
# this long; 0 turns it off; $KVMPY_BLK_POLL_US overrides). QEMU's IOThread polls up to 32 µs
# by default; wakeups cost more on virtualised hosts (~20 µs each on PVM), hence 50.
POLL_US = 50

HEADER = struct.Struct("<IIQ")  # type, reserved, sector
# struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags; }
RANGE = struct.Struct("<QII")
RANGE_FLAG_UNMAP = 1
# struct virtio_blk_config (5.2.4) up to secure erase; fields past what we offer stay 0.
CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIII B3x III")


class BlkFeature(enum.IntFlag):
    """virtio-blk feature bits (5.2.3), as masks."""

    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14


_F_FLUSH = int(BlkFeature.FLUSH)


class RequestType(enum.IntEnum):
    """virtio_blk_req.type (5.2.6)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class BlkStatus(enum.IntEnum):
    """virtio_blk_req.status (5.2.6)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


# Plain ints for the per-request comparisons (an IntEnum member lookup costs more than the test).
_T_IN, _T_OUT = int(RequestType.IN), int(RequestType.OUT)
_S_OK, _S_IOERR = int(BlkStatus.OK), int(BlkStatus.IOERR)
_STATUS_BYTE = tuple(bytes([s]) for s in range(max(BlkStatus) + 1))   # status -> its byte

# fallocate(2) modes (include/uapi/linux/falloc.h); Python's os.posix_fallocate takes none.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    _fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class VirtioBlk(VirtioDevice):
    device_type = DeviceType.BLOCK
    name = "blk"

    def __init__(self, memory, path: str, ro: bool = False, serial: str | bytes | None = None,
                 queue_size: int = QUEUE_SIZE, engine: str | None = None,
                 poll_us: int | None = None):
        """``engine``: "c" runs IN/OUT/FLUSH of well-formed chains in kvmpy/virtio/fastblk.c,
        "python" runs every request here; None: ``$KVMPY_BLK_ENGINE``, default "c".
        ``poll_us``: the C engine's longest busy-wait for more requests (POLL_US)."""
        self.path = path
        self.ro = ro
        self.engine = choose_engine(engine)
        self.fd = _open_image(path, ro)
        try:
            size = os.lseek(self.fd, 0, os.SEEK_END)
            if size % SECTOR_SIZE:
                raise KvmpyError(f"disk image {path} is {size} bytes, not a multiple of "
                                 f"{SECTOR_SIZE}; pad it (truncate -s %{SECTOR_SIZE} {path})")
            st = os.fstat(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self.capacity = size // SECTOR_SIZE          # in 512-byte sectors
        if serial is None:   # stable for a given file, distinct between files (as Firecracker)
            serial = f"{st.st_dev:x}{st.st_rdev:x}{st.st_ino:x}"
        if isinstance(serial, str):
            serial = serial.encode("utf-8", "replace")
        self.serial = serial[:ID_BYTES].ljust(ID_BYTES, b"\0")
        features = BlkFeature.SEG_MAX | BlkFeature.FLUSH
        if ro:
            features |= BlkFeature.RO
        else:
            features |= BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES
        # seg_max: data segments per request, leaving two descriptors for header and status
        # (QEMU's rule), and never more than one preadv/pwritev call can take.
        seg_max = min(queue_size - 2, IOV_MAX)
        config = CONFIG.pack(
            self.capacity, 0, seg_max,
            0, 0, 0,                     # geometry (not offered)
            0,                           # blk_size (not offered)
            0, 0, 0, 0,                  # topology (not offered)
            0, 0, 0,                     # writeback, unused0, num_queues (no CONFIG_WCE, MQ)
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 8,   # discard: alignment 8 sectors (4 KiB)
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,      # write zeroes
            1,                           # write_zeroes_may_unmap: UNMAP punches a hole
            0, 0, 0)                     # secure erase (not offered)
        super().__init__(memory, [queue_size], features, config)
        self.stats = {"reads": 0, "writes": 0, "flushes": 0, "ioerr": 0, "unsupp": 0,
                      "no_status": 0}
        if poll_us is None:
            poll_us = _env_int("KVMPY_BLK_POLL_US", POLL_US)
        self.fast = (BlkFastPath(self.fd, self.capacity, ro, IOV_MAX, poll_us)
                     if self.engine == "c" else None)

    def close(self) -> None:
        with self.lock:   # a request in flight in the I/O thread finishes first
            if self.fd >= 0:
                if self.fast is not None:
                    self.fast.close()
                os.close(self.fd)
                self.fd = -1

    # -- requests ------------------------------------------------------------------------------
    def process_queue(self, queue: Queue) -> bool:
        """As VirtioDevice.process_queue (at most ``queue.size`` requests a call), with the C
        engine running the requests it takes and this class the ones it defers."""
        fast = self.fast
        if fast is None or self.fd < 0:
            return super().process_queue(queue)
        budget = queue.size
        sync_writes = not self.driver_features & _F_FLUSH   # (an IntFlag "&" costs ~1 µs)
        try:
            while True:
                done, why = fast.run(self.memory, queue, budget, sync_writes, self.stats)
                budget -= done
                if why == RUN_EMPTY:
                    return False
                if why == RUN_BUDGET or budget == 0:
                    return True
                # RUN_DEFER: the next request is ours (a bad chain raises QueueError here)
                chain = queue.pop()
                if chain is None:
                    return False
                queue.add_used(chain.head, self.handle_request(queue, chain), False)
                budget -= 1
                if budget == 0:
                    return True
        finally:
            queue.publish_used()

    def poll_queue(self, queue: Queue) -> bool:
        fast = self.fast
        if fast is None or self.fd < 0:
            return False
        # While the I/O thread watches the ring the driver need not notify (QEMU's IOThread
        # does the same): a guest then posts without an exit. Notifications come back on,
        # with a last look at the ring, before the thread sleeps; that includes a window
        # that shrank to 0 since they were turned off.
        if fast.poll_ns:
            with self.lock:
                if not queue.ready:
                    return False
                if queue.avail_moved():
                    # A driver that keeps the ring busy has usually posted again while the
                    # batch was being completed: no C poll to set up (~3 µs a request at QD 1).
                    fast.hit()
                    return True
                queue.disable_notify()
            if fast.poll(self.memory, queue):
                return True                            # still busy: leave them off
        else:
            fast.poll(self.memory, queue)              # (records when the thread went to sleep)
            if not queue.notify_off:       # (set by this thread only; a reset clears it)
                return False
        with self.lock:
            return queue.ready and queue.notify_off and queue.enable_notify()

    def handle_request(self, queue: Queue, chain: DescriptorChain) -> int:
        if chain.write_len == 0:
            # Missing, read-only or zero-length status: nowhere to report; no I/O at all.
            self.stats["no_status"] += 1
            return 0
        status_at = chain.write_len - 1
        if chain.read_len < HEADER.size:
            status, written = _S_IOERR, 0   # header missing or device-writable
        else:
            rtype, _reserved, sector = chain.unpack(HEADER)
            status, written = self._execute(rtype, sector, chain, status_at)
        if status != _S_OK:
            self.stats["ioerr" if status == _S_IOERR else "unsupp"] += 1
        chain.write(status_at, _STATUS_BYTE[status])
        return written + 1

    def _execute(self, rtype: int, sector: int, chain: DescriptorChain,
                 data_in: int) -> tuple[int, int]:
        """Run one request; returns (status, bytes of data written to the guest)."""
        if self.fd < 0:
            return _S_IOERR, 0
        data_out = chain.read_len - HEADER.size   # device-readable bytes after the header
        try:
            if rtype == _T_IN:
                if data_in % SECTOR_SIZE or sector + data_in // SECTOR_SIZE > self.capacity:
                    return _S_IOERR, 0
                views = chain.writable_views(0, data_in)
                if len(views) == 1:          # one data buffer: one preadv, no list walking
                    view = views[0]
                    try:
                        n = os.preadv(self.fd, views, sector * SECTOR_SIZE)
                        if n != data_in:
                            self._transfer_rest(views, sector * SECTOR_SIZE, n, False)
                    finally:
                        view.release()
                else:
                    self._transfer(views, sector * SECTOR_SIZE, False)
                self.stats["reads"] += 1
                return _S_OK, data_in
            if rtype == _T_OUT:
                if self.ro or not self._range_ok(sector, data_out):
                    return _S_IOERR, 0
                views = chain.readable_views(HEADER.size, data_out)
                self._transfer(views, sector * SECTOR_SIZE, True)
                self.stats["writes"] += 1
                self._write_done()
                return _S_OK, 0
            if rtype == RequestType.FLUSH:
                if not self.ro:
                    os.fdatasync(self.fd)   # before the used-ring entry (hostile-inputs 27)
                self.stats["flushes"] += 1
                return BlkStatus.OK, 0
            if rtype == RequestType.GET_ID:
                if data_in < ID_BYTES:
                    return BlkStatus.IOERR, 0
                chain.write(0, self.serial)
                return BlkStatus.OK, ID_BYTES
            if rtype in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
                return self._discard_or_zero(rtype, chain, data_out), 0
        except OSError:
            return BlkStatus.IOERR, 0
        return BlkStatus.UNSUPP, 0

    def _range_ok(self, sector: int, length: int) -> bool:
        return length % SECTOR_SIZE == 0 and sector + length // SECTOR_SIZE <= self.capacity

    def _write_done(self) -> None:
        # 5.2.6.2 case 1: FLUSH offered but not negotiated => writes are stable on completion.
        if not self.has_feature(BlkFeature.FLUSH):
            os.fdatasync(self.fd)

    def _discard_or_zero(self, rtype: int, chain: DescriptorChain, data_out: int) -> BlkStatus:
        discard = rtype == RequestType.DISCARD
        if self.ro:
            return BlkStatus.IOERR      # discard and write zeroes are writes
        if data_out <= 0 or data_out % RANGE.size or data_out // RANGE.size > MAX_DISCARD_SEG:
            return BlkStatus.IOERR
        raw = chain.read(HEADER.size, data_out)
        ranges = [RANGE.unpack_from(raw, i) for i in range(0, data_out, RANGE.size)]
        # Validate every range before touching the file: a failed request does nothing.
        for sector, count, flags in ranges:
            if flags & ~RANGE_FLAG_UNMAP or (discard and flags & RANGE_FLAG_UNMAP):
                return BlkStatus.UNSUPP  # 5.2.6.2: unknown flag, or UNMAP on a discard
            if count > MAX_DISCARD_SECTORS or sector + count > self.capacity:
                return BlkStatus.IOERR
        for sector, count, flags in ranges:
            self._zero(sector * SECTOR_SIZE, count * SECTOR_SIZE,
                       punch=discard or bool(flags & RANGE_FLAG_UNMAP))
        self._write_done()
        return BlkStatus.OK

    def _zero(self, offset: int, length: int, punch: bool) -> None:
        """Make [offset, offset+length) read as zeroes: punch a hole (deallocate) or zero the
        range in place; where the filesystem cannot, write zeroes."""
        if length == 0:
            return
        mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if punch else FALLOC_FL_ZERO_RANGE)
        try:
            fallocate(self.fd, mode, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY):
                raise
        zeros = bytes(min(length, ZERO_CHUNK))
        while length:
            n = os.pwrite(self.fd, zeros[:min(length, ZERO_CHUNK)], offset)
            offset += n
            length -= n

    def _transfer(self, views: list[memoryview], pos: int, write: bool) -> None:
        """preadv/pwritev ``views`` at file offset ``pos``, IOV_MAX at a time, until done."""
        try:
            total = sum(map(len, views))
            if total == 0:
                return
            if len(views) <= IOV_MAX:   # the usual case: one system call does it all
                n = os.pwritev(self.fd, views, pos) if write else os.preadv(self.fd, views, pos)
                if n == total:
                    return
                if n <= 0:
                    raise OSError(errno.EIO, "short transfer")
                self._transfer_rest(views, pos, n, write)
            else:
                self._transfer_rest(views, pos, 0, write)
        finally:
            for v in views:
                v.release()

    def _transfer_rest(self, views: list[memoryview], pos: int, n: int, write: bool) -> None:
        """Go on after ``n`` bytes of ``views`` were transferred (a short transfer, or more than
        IOV_MAX views), until done."""
        views = list(views)
        i = 0
        while True:
            pos += n
            while n:     # step over what was done; a partly done view is sliced
                v = views[i]
                if n >= len(v):
                    n -= len(v)
                    i += 1
                else:
                    views[i] = v[n:]
                    n = 0
            if i >= len(views):
                return
            batch = views[i:i + IOV_MAX]
            n = os.pwritev(self.fd, batch, pos) if write else os.preadv(self.fd, batch, pos)
            if n <= 0:   # end of file: the image shrank under us
                raise OSError(errno.EIO, "short transfer")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise KvmpyError(f"${name}={value!r} is not a whole number (microseconds)") from None


def _open_image(path: str, ro: bool) -> int:
    # O_NONBLOCK so that a FIFO given by mistake cannot block the open; cleared again below.
    flags = (os.O_RDONLY if ro else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise KvmpyError(f"disk image {path} does not exist") from None
    except IsADirectoryError:
        raise KvmpyError(f"disk image {path} is a directory, not a file") from None
    except PermissionError:
        what = "readable" if ro else "writable"
        raise KvmpyError(f"disk image {path} is not {what} (permission denied)"
                         + ("" if ro else "; attach it read-only")) from None
    except OSError as e:
        raise KvmpyError(f"cannot open disk image {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise KvmpyError(f"disk image {path} is neither a regular file nor a block device")
    os.set_blocking(fd, True)
    return fd
