"""virtio-blk's data path in C (kvmpy/virtio/fastblk.c), and when kvmpy uses it.

Why: a 4 KiB read costs the host ~1.5 µs in a Python ``os.preadv`` loop, while the Python
device needs ~6 µs of interpreter time per request for the ring walk, the checks and the
bookkeeping (benchmarks/virtio_blk: 0.19 of the loop at best; the least any Python device can do
is 0.44). QEMU moves this work into the kernel (vhost) or a poll loop in C; kvmpy moves just
the common case into ~300 lines of C that the I/O thread calls with the GIL released, so other
Python threads (the vCPUs, the console) run meanwhile.

What runs in C: IN, OUT and FLUSH requests of well-formed chains (direct or indirect), with
the same validation as :class:`kvmpy.virtio.queue.Queue` and the same results as
:class:`kvmpy.virtio.blk.VirtioBlk` (status byte, used length, counters, fdatasync before the
used element). What does not: everything else. The C loop stops *before* the first request it
does not take (a broken chain, an error the device must report, GET_ID, DISCARD, ...), leaving
the ring as it was, and the Python device handles that one request through ``Queue.pop`` and
``VirtioBlk.handle_request``, then the C loop goes on. So all error handling (messages,
DEVICE_NEEDS_RESET, counters) stays in Python, in one place; tests/test_virtio_blk_engines.py
checks with random rings that both engines leave the same bytes everywhere.

Memory safety: C reads and writes guest RAM through host addresses that were located in a
region (GuestMemory.check's own test, done in C for buffers and indirect tables; by
Queue.activate for the rings). During a call each region's mmap is pinned (a buffer export),
so the RAM cannot be unmapped under the C code: ``mmap.close()`` refuses while it runs.

``KVMPY_BLK_ENGINE=python`` (or ``VirtioBlk(..., engine="python")``) turns the C path off, to
compare or to debug with Python tools.
"""
from __future__ import annotations

import os
import time

from kvmpy._ffi import ffi, lib
from kvmpy.errors import KvmpyError

ENGINES = ("c", "python")
MAX_POLL_US = 1000     # a bound on the busy-wait after the ring runs empty (1 ms)
MIN_POLL_NS = 2000     # a shrinking window below this is switched off
RUN_EMPTY, RUN_DEFER, RUN_BUDGET = lib.KVMPY_RUN_EMPTY, lib.KVMPY_RUN_DEFER, lib.KVMPY_RUN_BUDGET


def choose_engine(engine: str | None) -> str:
    """``engine`` or, when None, ``$KVMPY_BLK_ENGINE`` (default "c")."""
    if engine is None:
        engine = os.environ.get("KVMPY_BLK_ENGINE") or "c"
    if engine not in ENGINES:
        raise KvmpyError(f"virtio-blk engine {engine!r} is unknown; use one of "
                         f"{', '.join(ENGINES)} (KVMPY_BLK_ENGINE)")
    return engine


def _pin(regions) -> list:
    """Every region's mmap exported (ValueError if one is already unmapped): ``mmap.close()``
    refuses until :func:`_unpin`, so C code may use the regions' host addresses meanwhile.
    (Two plain functions, not a context manager: this runs a few times per request.)"""
    pins = []
    try:
        for r in regions:
            pins.append(ffi.from_buffer(r.mapping))
    except BaseException:
        _unpin(pins)
        raise
    return pins


def _unpin(pins: list) -> None:
    for p in pins:
        ffi.release(p)


class BlkFastPath:
    """The C state of one virtio-blk device's request queue."""

    def __init__(self, fd: int, capacity: int, ro: bool, iov_max: int, poll_us: int = 0):
        self._vq = ffi.new("struct kvmpy_vq *")
        b = self._blk = ffi.new("struct kvmpy_blk *")
        b.fd, b.capacity, b.ro, b.iov_max = fd, capacity, ro, iov_max
        self.poll_max_ns = max(0, min(poll_us, MAX_POLL_US)) * 1000
        self.poll_ns = self.poll_max_ns      # the current window (adaptive, see poll())
        self._gave_up_at = 0                 # monotonic ns when the I/O thread went to sleep
        self._poll_hit = False               # the last poll saw avail.idx move
        self._poll_vq = ffi.new("struct kvmpy_vq *")   # poll's own copy: it runs unlocked
        # scratch for one chain's buffers: iov_max data segments plus header and status
        self._rd = ffi.new("struct iovec[]", iov_max + 2)
        self._wr = ffi.new("struct iovec[]", iov_max + 2)
        b.rd, b.wr = self._rd, self._wr
        self._why = ffi.new("int *")
        self._regions_of = None          # the GuestMemory.regions list the table was made from
        self._regions = ffi.new("struct kvmpy_region[]", 0)

    # tests only: make the C system calls short or failing (Python's are monkeypatched)
    def inject(self, max_io: int = 0, errno_: int = 0) -> None:
        self._blk.test_max_io, self._blk.test_errno = max_io, errno_

    def close(self) -> None:
        self._blk.fd = -1

    def poll(self, memory, queue) -> bool:
        """Busy-wait (GIL released) up to the current window for the driver to make a request
        available; True if it did. For after the completions were signalled, without the
        device lock (it only reads avail.idx, in RAM pinned for the call).

        The window adapts, as QEMU's poll-grow/poll-shrink do: a poll that finds nothing, or
        finds an index that :meth:`run` then has no request for, halves it (down to off), so
        an idle or slow driver does not keep a CPU spinning; a request arriving within the
        full window after the thread went to sleep (polled in vain, or not at all) sets it
        back to the maximum, measured by :meth:`run`."""
        ns = self.poll_ns
        if not ns or not queue.ready:
            self._gave_up_at = time.monotonic_ns()   # going to sleep now
            return False
        regions = memory.regions
        if not regions:
            return False
        vq = self._poll_vq
        pins = _pin(regions)
        try:
            queue.export_state(vq)
            got = bool(lib.kvmpy_vq_poll(vq, ns))
        finally:
            _unpin(pins)
        if got:
            self._poll_hit = True
        else:
            self._shrink()
            self._gave_up_at = time.monotonic_ns()
        return got

    def hit(self) -> None:
        """The caller saw avail.idx move itself (a poll that found it at once)."""
        self._poll_hit = True

    def _shrink(self) -> None:
        ns = self.poll_ns
        self.poll_ns = ns // 2 if ns >= 2 * MIN_POLL_NS else 0

    def run(self, memory, queue, budget: int, sync_writes: bool, stats: dict) -> tuple[int, int]:
        """Run up to ``budget`` requests of ``queue`` in C. Returns (requests done, why it
        stopped: RUN_EMPTY, RUN_DEFER (the next request is Python's) or RUN_BUDGET)."""
        if self._gave_up_at:   # the first batch since the I/O thread went to sleep
            if time.monotonic_ns() - self._gave_up_at < self.poll_max_ns:
                self.poll_ns = self.poll_max_ns      # a long enough poll would have caught it
            self._gave_up_at = 0
        regions = memory.regions
        if not regions:      # GuestMemory.close() ran: the ring addresses point nowhere now
            raise ValueError("guest memory is unmapped")
        if regions is not self._regions_of:
            self._regions = ffi.new("struct kvmpy_region[]",
                                    [(r.gpa, r.size, r.host_address) for r in regions])
            self._regions_of = regions
        vq, b = self._vq, self._blk
        pins = _pin(regions)
        try:
            with ffi.from_buffer(queue._in_flight) as in_flight:
                queue.export_state(vq)
                vq.in_flight = in_flight
                b.sync_writes = sync_writes
                done = lib.kvmpy_blk_run(vq, self._regions, len(regions), b, budget, self._why)
                vq.in_flight = ffi.NULL
        finally:
            _unpin(pins)
        queue.import_state(vq, done)
        if self._poll_hit:
            self._poll_hit = False
            if not done and self._why[0] == RUN_EMPTY:
                self._shrink()      # the index moved but brought no request: no reward
        if done:
            stats["reads"] += b.reads
            stats["writes"] += b.writes
            stats["flushes"] += b.flushes
            stats["ioerr"] += b.ioerr
            b.reads = b.writes = b.flushes = b.ioerr = 0
        return done, self._why[0]
