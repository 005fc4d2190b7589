#!/usr/bin/env python3
"""virtio-blk throughput: 4 KiB random reads through kvmpy's VirtioBlk against an os.preadv loop.

The disk is a 256 MiB file of random bytes (``../out/virtio_blk/disk.img``, made once, read once
to be in the page cache). Both sides read the same seeded list of 4 KiB-aligned random offsets:

- **preadv**: ``os.preadv(fd, [buf], offset)`` into one ``bytearray(4096)``, in a Python loop.
- **kvmpy**: a real VM (``Kvm().create_vm()``, a 16 MiB GuestMemory registered with
  KVM_SET_USER_MEMORY_REGION), ``VirtioBlk(ro=True)`` behind ``VirtioMmio`` on an MmioBus,
  negotiated by the tests' spec-written driver (tests/virtio_driver.py: ``MmioDriver.init``),
  ``attach_ioeventfds(vm, base, IoThread())``: QueueNotify is a KVM_IOEVENTFD, served by the I/O
  thread. The driver then plays the guest: per batch it writes QD request headers
  (IN, sector) into preallocated chains (header 16 B | data 4096 B device-writable | status 1 B,
  descriptors written once), publishes them in the avail ring, bumps avail.idx once, notifies
  (a QueueNotify register write through the bus: the transport writes the queue's ioeventfd
  eventfd, the very fd KVM signals on a guest write; see README), and waits for the used-buffer
  interrupt, then checks used.idx and every status byte.

  Completion: the transport's interrupt line is a callable that writes an eventfd of ours
  (``os.eventfd_write``, the same single system call kvmpy.virtio.irqfd.IrqFd.__call__ makes);
  the driver blocks in ``os.eventfd_read`` on it. (An fd handed to KVM_IRQFD is consumed by KVM
  itself, so user space cannot wait on it.) ``--poll`` instead spins on used.idx.

Each repetition runs preadv, then kvmpy at each queue depth, on fresh offsets, alternating the
order; medians of req/s are reported, and kvmpy / preadv. ``--profile`` runs one extra kvmpy pass
with cProfile enabled inside the I/O thread (around each eventfd callback) and prints the top
functions; ``--profile-driver`` profiles the driver (main thread) side too.
Exit status 0 unless a request failed; the 50 % goal is reported, not enforced.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import statistics
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))   # the tests' guest driver
sys.path.insert(0, os.path.join(HERE, ".."))                  # virtio_rig

from kvmpy.virtio.blk import VirtioBlk                         # noqa: E402
from kvmpy.virtio.queue import full_barrier, vring_need_event   # noqa: E402
from virtio_driver import F_EVENT_IDX, F_VERSION_1, NEXT, WRITE  # noqa: E402
from virtio_rig import VirtioRig                                 # noqa: E402

BLOCK = 4096
DISK = 256 << 20
GOAL = 0.5
MEM = 16 << 20
HDR = struct.Struct("<IIQ")
U16 = struct.Struct("<H")


def make_disk(path: str) -> None:
    if os.path.exists(path) and os.path.getsize(path) == DISK:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rnd = random.Random(1)
    with open(path + ".tmp", "wb") as f:
        for _ in range(DISK // (1 << 20)):
            f.write(rnd.randbytes(1 << 20))
    os.replace(path + ".tmp", path)


def warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def offsets(n: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(DISK // BLOCK) * BLOCK for _ in range(n)]


# -- baseline ---------------------------------------------------------------------------------
def run_preadv(path: str, offs: list[int]) -> float:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = bytearray(BLOCK)
        bufs = [buf]
        preadv = os.preadv
        t0 = time.perf_counter()
        for off in offs:
            if preadv(fd, bufs, off) != BLOCK:
                raise SystemExit("short preadv")
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def run_inline(path: str, offs: list[int], depth: int = 32) -> float:
    """What no Python virtio-blk can beat: the least a device must do per request, inlined in
    one loop with no classes, no threads and no interrupts, next to an equally lean driver.

    Per request the "driver" writes the header's sector and an avail entry; the "device" reads
    avail.idx and the head, walks the 3-descriptor chain (one struct unpack and one bounds test
    per descriptor), parses the header, preadv()s into guest RAM through a memoryview, writes
    the status byte, a used element and used.idx. Ring validation beyond the bounds tests
    (flags order, loops, indirect tables) and every error path are left out, so this is a lower
    bound on per-request time, not a device."""
    desc, u16, used_elem = struct.Struct("<QIHH"), U16, struct.Struct("<II")
    ram = bytearray(MEM)
    mv = memoryview(ram)
    table, avail, used, hdrs, status, data = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x10000
    size = 256
    for i in range(depth):   # header | data (device-writable) | status (device-writable)
        desc.pack_into(ram, table + 16 * 3 * i, hdrs + 16 * i, 16, NEXT, 3 * i + 1)
        desc.pack_into(ram, table + 16 * (3 * i + 1), data + BLOCK * i, BLOCK, NEXT | WRITE,
                       3 * i + 2)
        desc.pack_into(ram, table + 16 * (3 * i + 2), status + i, 1, WRITE, 0)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        preadv, unpack_desc, unpack_hdr = os.preadv, desc.unpack_from, HDR.unpack_from
        idx = last = 0
        t0 = time.perf_counter()
        for b in range(0, len(offs), depth):
            for i, off in enumerate(offs[b:b + depth]):          # driver
                HDR.pack_into(ram, hdrs + 16 * i, 0, 0, off >> 9)
                u16.pack_into(ram, avail + 4 + 2 * (idx % size), 3 * i)
                idx = (idx + 1) & 0xFFFF
            u16.pack_into(ram, avail + 2, idx)
            end = u16.unpack_from(ram, avail + 2)[0]                # device
            while last != end:
                head = index = u16.unpack_from(ram, avail + 4 + 2 * (last % size))[0]
                rd, wr = [], []
                while True:
                    addr, length, flags, index = unpack_desc(ram, table + 16 * index)
                    if addr + length > MEM:
                        raise SystemExit("buffer outside RAM")
                    (wr if flags & WRITE else rd).append((addr, length))
                    if not flags & NEXT:
                        break
                rtype, _, sector = unpack_hdr(ram, rd[0][0])
                a, n = wr[0]
                view = mv[a:a + n]
                if rtype != 0 or preadv(fd, [view], sector << 9) != n:
                    raise SystemExit("request failed")
                view.release()
                ram[wr[-1][0]] = 0
                used_elem.pack_into(ram, used + 4 + 8 * (last % size), head, n + 1)
                last = (last + 1) & 0xFFFF
                u16.pack_into(ram, used + 2, last)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


# -- kvmpy ------------------------------------------------------------------------------------
def ring_words(region, *offsets: int):
    """The region's 16-bit view and the word index of each byte offset: the driver stores and
    loads ring fields with one 16-bit access each, as a guest does (struct's pack_into zeroes
    the bytes first: the device, reading avail.idx meanwhile, could see 0)."""
    for off in offsets:
        assert off % 2 == 0
    return (region.u16, *(off >> 1 for off in offsets))


class Rig(VirtioRig):
    def __init__(self, path: str, depth: int, poll: bool, direct: bool = False,
                 process: bool = False, engine: str = "c", keep: bool = False):
        # --direct: no ioeventfd, the notify runs the queue in this thread
        # --driver-process: the driver runs in a forked process (RAM shared), as a guest runs
        # on its own vCPU: it does not hold the VMM's GIL
        # engine: "c" (kvmpy/virtio/fastblk.c takes the reads) or "python" (the Python device)
        # keep: `depth` requests kept in flight (fio's iodepth), with EVENT_IDX as Linux's
        # virtio_blk negotiates it; otherwise batches of `depth`, each waited for whole
        super().__init__(lambda mem: VirtioBlk(mem, path, ro=True, engine=engine), MEM,
                         ioeventfds=not direct, shared=process,
                         want=F_VERSION_1 | (F_EVENT_IDX if keep else 0))
        self.keep = keep
        self.process = process
        self.vq = self.drv.queues[0]
        self.depth, self.poll = depth, poll
        assert 3 * depth <= self.vq.size
        a = self.drv.alloc
        self.slots = []   # (head, header gpa, data gpa, status gpa)
        for i in range(depth):
            hdr, data, st = a.alloc(16), a.alloc(BLOCK, align=BLOCK), a.alloc(1)
            d0, d1, d2 = 3 * i, 3 * i + 1, 3 * i + 2
            self.vq.write_desc(d0, hdr, 16, NEXT, d1)
            self.vq.write_desc(d1, data, BLOCK, WRITE | NEXT, d2)
            self.vq.write_desc(d2, st, 1, WRITE, 0)
            self.slots.append((d0, hdr, data, st))
        self.slot_of = {s[0]: i for i, s in enumerate(self.slots)}   # head -> slot
        self.last_off = [None] * depth        # the offset each slot read last (for check())
        self.avail_idx = 0
        self.used_seen = 0

    def run(self, offs: list[int]) -> float:
        run = self._run_keep if self.keep else self._run
        if not self.process:
            return run(offs, self.drv.notify)
        # The guest side in another process: it notifies through the queue's ioeventfd (what
        # KVM signals on the guest's QueueNotify store) and waits on the interrupt eventfd.
        efd = self.transport._eventfds[0]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)
                t = run(offs, lambda q: os.eventfd_write(efd, 1))
                os.write(w, f"{t} {self.avail_idx} {self.used_seen}".encode())
                code = 0
            except BaseException as e:     # SystemExit from a failed request included
                os.write(2, f"driver process: {e}\n".encode())
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r) as f:
            reply = f.read().split()
        _, wstatus = os.waitpid(pid, 0)
        if wstatus or len(reply) != 3:
            raise SystemExit(f"the driver process failed (wait status {wstatus:#x})")
        t, self.avail_idx, self.used_seen = float(reply[0]), int(reply[1]), int(reply[2])
        self.vq.avail_idx = self.vq.last_used = self.avail_idx
        return t

    def _run(self, offs: list[int], notify) -> float:
        # The driver is the guest: it writes its own RAM directly (one mapping, located once),
        # as a guest kernel does, so that the time measured is kvmpy's, not the test driver's
        # GuestMemory calls. kvmpy's side still goes through GuestMemory.check for every buffer.
        region, base = self.mem.check(0, MEM)
        ram = region.mapping
        vq, slots, depth = self.vq, self.slots, self.depth
        avail_ring, avail_idx_at, used_idx_at = (base + vq.avail + 4, base + vq.avail + 2,
                                                 base + vq.used + 2)
        size = vq.size
        pack_hdr = HDR.pack_into
        w, avail_ring_w, avail_idx_w, used_idx_w = ring_words(region, avail_ring, avail_idx_at,
                                                              used_idx_at)
        irqfd, poll = self.irq.fd, self.poll
        idx, used = self.avail_idx, self.used_seen
        t0 = time.perf_counter()
        for b in range(0, len(offs), depth):
            batch = offs[b:b + depth]
            for (head, hdr, _data, st), off in zip(slots, batch):
                pack_hdr(ram, base + hdr, 0, 0, off >> 9)       # VIRTIO_BLK_T_IN
                ram[base + st] = 0xFF                           # poison the status byte
                w[avail_ring_w + idx % size] = head
                idx = (idx + 1) & 0xFFFF
            w[avail_idx_w] = idx
            notify(0)
            want = (used + len(batch)) & 0xFFFF
            while w[used_idx_w] != want:
                if not poll:
                    os.eventfd_read(irqfd)
            used = want
            for head, hdr, data, st in slots[:len(batch)]:
                if ram[base + st] != 0:
                    raise SystemExit(f"request failed: status {ram[base + st]}")
        elapsed = time.perf_counter() - t0
        last = len(offs) % depth or depth             # the last batch may be short
        self.last_off[:last] = offs[-last:]
        self.avail_idx, self.used_seen = idx, used
        vq.avail_idx = vq.last_used = idx
        return elapsed

    def _run_keep(self, offs: list[int], notify) -> float:
        """fio-style: ``depth`` requests in flight at all times; each completion is answered by
        the next request at once. As Linux's virtio_ring does: avail.idx is stored as each
        request is added (so the device may start on it while the driver adds the next), one
        notify per refill and only when the device asked for it (EVENT_IDX, avail_event), and
        used_event set before the driver sleeps on the interrupt (2.7.7.2, 2.7.10)."""
        region, base = self.mem.check(0, MEM)
        ram = region.mapping
        vq, slots, slot_of, last_off = self.vq, self.slots, self.slot_of, self.last_off
        size = vq.size
        avail_ring, avail_idx_at = base + vq.avail + 4, base + vq.avail + 2
        used_event_at = base + vq.avail + 4 + 2 * size
        used_ring, used_idx_at = base + vq.used + 4, base + vq.used + 2
        avail_event_at = base + vq.used + 4 + 8 * size
        pack_hdr = HDR.pack_into
        w, avail_ring_w, avail_idx_w, used_idx_w, used_event_w, avail_event_w = ring_words(
            region, avail_ring, avail_idx_at, used_idx_at, used_event_at, avail_event_at)
        unpack_u32 = struct.Struct("<I").unpack_from
        irqfd, poll = self.irq.fd, self.poll
        idx, used = self.avail_idx, self.used_seen
        n, posted, completed = len(offs), 0, 0
        t0 = time.perf_counter()
        for i, (head, hdr, _data, st) in enumerate(slots[:min(self.depth, n)]):
            off = offs[posted]
            pack_hdr(ram, base + hdr, 0, 0, off >> 9)           # VIRTIO_BLK_T_IN
            ram[base + st] = 0xFF
            last_off[i] = off
            w[avail_ring_w + idx % size] = head
            idx = (idx + 1) & 0xFFFF
            posted += 1
        w[avail_idx_w] = idx
        notify(0)
        while completed < n:
            u = w[used_idx_w]
            if u == used:
                if poll:
                    continue
                w[used_event_w] = used   # interrupt me at the next used entry
                full_barrier()
                if w[used_idx_w] == used:
                    os.eventfd_read(irqfd)
                continue
            old = idx
            while used != u:
                head = unpack_u32(ram, used_ring + 8 * (used % size))[0]
                i = slot_of[head]
                _, hdr, _data, st = slots[i]
                if ram[base + st] != 0:
                    ring = [unpack_u32(ram, used_ring + 8 * (k % size))[0]
                            for k in range(used - 4, used + 4)]
                    raise SystemExit(
                        f"request failed: status {ram[base + st]} (head {head}, used entry "
                        f"{used}, used.idx {u} now {w[used_idx_w]}, "
                        f"avail.idx {idx}, posted {posted}, completed {completed}, "
                        f"used ring heads {used - 4}..{used + 3}: {ring})")
                completed += 1
                if posted < n:
                    off = offs[posted]
                    pack_hdr(ram, base + hdr, 0, 0, off >> 9)
                    ram[base + st] = 0xFF
                    last_off[i] = off
                    w[avail_ring_w + idx % size] = head
                    idx = (idx + 1) & 0xFFFF
                    w[avail_idx_w] = idx   # each request at once, as Linux does
                    posted += 1
                used = (used + 1) & 0xFFFF
            if idx != old:   # one notify per refill, if the device asked (blk-mq's commit)
                full_barrier()
                if vring_need_event(w[avail_event_w], idx, old):
                    notify(0)
        elapsed = time.perf_counter() - t0
        self.avail_idx, self.used_seen = idx, used
        vq.avail_idx = vq.last_used = idx
        return elapsed

    def check(self, path: str, offs: list[int]) -> None:
        """The data is right: each slot holds what the file has at the offset it read last."""
        with open(path, "rb") as f:
            for (head, hdr, data, st), off in zip(self.slots, self.last_off):
                if off is None:
                    continue
                f.seek(off)
                if self.mem.read(data, BLOCK) != f.read(BLOCK):
                    raise SystemExit("data mismatch")

def profile_iothread(rig: Rig, offs: list[int], driver: bool) -> None:
    prof = cProfile.Profile()
    fd = rig.transport._eventfds[0]
    orig = rig.io._callbacks[fd]

    def wrapped():
        prof.enable()
        try:
            return orig()
        finally:
            prof.disable()

    rig.io._callbacks[fd] = wrapped
    dprof = cProfile.Profile() if driver else None
    if dprof:
        dprof.enable()
    t = rig.run(offs)
    if dprof:
        dprof.disable()
    rig.io._callbacks[fd] = orig
    print(f"\n-- cProfile of the I/O thread, {rig.dev.engine} engine, QD {rig.depth}, "
          f"{len(offs)} requests "
          f"({len(offs) / t:,.0f} req/s under the profiler) --")
    for p, title in ((prof, "I/O thread"), (dprof, "driver (main thread)")):
        if p is None:
            continue
        s = io.StringIO()
        pstats.Stats(p, stream=s).sort_stats("tottime").print_stats(18)
        text = s.getvalue()
        print(f"[{title}]")
        print(text[text.find("   ncalls"):].rstrip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--depths", default="32,1")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--poll", action="store_true", help="spin on used.idx, no interrupt wait")
    ap.add_argument("--direct", action="store_true",
                    help="no ioeventfd/I/O thread: the notify runs the device in the driver's "
                         "thread (the device's own Python cost, without thread handoffs)")
    ap.add_argument("--driver-process", action="store_true",
                    help="run the driver in a forked process (guest RAM shared): the guest side "
                         "runs beside the device, as a guest's vCPU does, not under its GIL")
    ap.add_argument("--keep", action="store_true",
                    help="keep QD requests in flight (fio iodepth) with EVENT_IDX, instead of "
                         "batches of QD each waited for whole")
    ap.add_argument("--engines", default="c,python",
                    help="virtio-blk engines to measure (VirtioBlk engine=): c, python or both")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-driver", action="store_true")
    ap.add_argument("--disk", default=os.path.join(HERE, "..", "out", "virtio_blk", "disk.img"))
    args = ap.parse_args()
    if args.direct and args.driver_process:
        ap.error("--direct runs the device in the driver's thread; --driver-process needs the "
                 "I/O thread (leave out one of them)")
    depths = [int(d) for d in args.depths.split(",")]
    engines = [e for e in args.engines.split(",") if e]
    if not engines or set(engines) - {"c", "python"}:
        ap.error("--engines takes c, python or c,python")
    path = os.path.abspath(args.disk)
    make_disk(path)
    warm(path)
    n = args.requests
    # one rig per engine and depth, named like the rows: "c qd32", "python qd1"
    rigs = {f"{e} qd{d}": Rig(path, d, args.poll, args.direct, args.driver_process, e,
                              args.keep)
            for e in engines for d in depths}
    res: dict[str, list[float]] = {"preadv": [], "inline": [], **{k: [] for k in rigs}}
    try:
        for rig in rigs.values():   # warm-up pass (page cache, code paths)
            rig.run(offsets(min(n, 5000), 99))
        run_preadv(path, offsets(min(n, 5000), 99))
        for rep in range(args.reps):
            offs = offsets(n, rep)
            order = ["preadv", "inline"] + list(rigs)
            if rep % 2:
                order.reverse()
            for name in order:
                if name == "preadv":
                    t = run_preadv(path, offs)
                elif name == "inline":
                    t = run_inline(path, offs)
                else:
                    rig = rigs[name]
                    t = rig.run(offs)
                    rig.check(path, offs)
                res[name].append(n / t)
        print(f"virtio-blk 4 KiB random reads, {n} requests x {args.reps} reps, 256 MiB file "
              f"(page cache), completion: {'polling used.idx' if args.poll else 'interrupt eventfd'}"
              f"{', DIRECT (no I/O thread)' if args.direct else ''}"
              f"{', driver in a forked process' if args.driver_process else ''}")
        print(f"{'':17} {'median req/s':>13} {'min':>10} {'max':>10} {'µs/req':>8} "
              f"{'vs preadv':>9}")
        base = statistics.median(res["preadv"])
        for name, vals in res.items():
            med = statistics.median(vals)
            label = name if name in ("preadv", "inline") else f"kvmpy {name.replace('qd', 'QD ')}"
            print(f"{label:17} {med:13,.0f} {min(vals):10,.0f} {max(vals):10,.0f} "
                  f"{1e6 / med:8.2f} {med / base:9.3f}")
        for name in rigs:
            r = statistics.median(res[name]) / base
            print(f"{name.replace('qd', 'QD ')}: kvmpy / preadv = {r:.3f}; goal >= {GOAL} "
                  f"{'met' if r >= GOAL else 'NOT met'}")
        for name, rig in rigs.items():
            print(f"device stats ({name}): {rig.dev.stats}")
        print(f"I/O thread errors: {sum(r.io.errors for r in rigs.values())}")
        if (args.profile or args.profile_driver) and not args.direct:
            for rig in rigs.values():
                profile_iothread(rig, offsets(min(n, 50_000), 1234), args.profile_driver)
    finally:
        for r in rigs.values():
            r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
