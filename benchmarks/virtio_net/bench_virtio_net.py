#!/usr/bin/env python3
"""virtio-net TX throughput: full-size UDP frames from a test-driver "guest" through kvmpy's
VirtioNet to a host UDP socket, over the tap and the slirp backends, against plain Python loops.

Every path carries the same datagram: a 1472-byte UDP payload, i.e. a 1514-byte Ethernet frame
(14 + 20 IPv4 + 8 UDP + 1472), MTU 1500. The receiver is a separate process (so it does not take
the GIL from the sender) with one UDP socket per destination, SO_RCVBUFFORCE 32 MiB, draining them
with epoll + recv_into and reporting (datagrams, payload bytes, time of the last datagram) per run.

- **tap**: a tap device this benchmark creates (``TapBackend``, vanishes on close), given
  10.99.0.1/30 and brought up; the receiver socket is bound on 10.99.0.1. The guest frames are
  Ethernet(dst = the tap's own MAC, src 52:54:00:12:34:56) / IPv4 10.99.0.2 -> 10.99.0.1 /
  UDP (checksum 0, allowed in IPv4).
- **slirp**: ``SlirpBackend()`` (10.0.2.0/24); frames 10.0.2.15 -> 10.0.2.2, which libslirp
  hands to a host UDP socket sending to 127.0.0.1, where the receiver's second socket is bound.

kvmpy rig (as benchmarks/virtio_blk): a real VM (``Kvm().create_vm()``, 16 MiB GuestMemory
registered with KVM_SET_USER_MEMORY_REGION), ``VirtioNet(mem, backend)`` behind ``VirtioMmio`` on
an MmioBus, negotiated by tests/virtio_driver.py (``MmioDriver.init(want=VERSION_1, queues=2)``),
``attach_ioeventfds(vm, base, IoThread())`` and the backend's epoll fd served by the same I/O
thread (as kvmpy.virtio.netsetup.attach_backend). No receive buffers are posted (host -> guest
frames, e.g. IPv6 chatter, are held by the backend; the tap gets IPv6 disabled anyway). The
driver plays the guest on the TX queue (1): QD preallocated chains (virtio_net_hdr 12 B | frame
1514 B, two descriptors, written once), per batch: QD heads in the avail ring, avail.idx bumped
once, one QueueNotify (the queue's ioeventfd eventfd), wait for the used-buffer interrupt (an
eventfd of ours, as virtio_blk's bench), check used.idx.

Baselines, same datagrams, same receiver:
- **udp-loopback**: ``sock.sendto(payload, (addr, port))`` in a Python loop (to 10.99.0.1 and
  to 127.0.0.1: both go over lo).
- **tap-write**: ``os.write(tap_fd, frame)`` of the very frames, in a Python loop (no virtio).
- **slirp-send**: ``SlirpBackend.send(frame)`` in a Python loop (libslirp without virtio).

Rates: frames/s and MB/s (10^6 B of UDP payload) *delivered* to the socket, over the time from
the first send to the last datagram received; the send-side rate (frames handed over / time to the
last completion) and the delivered fraction are shown too. Medians of ``--reps`` repetitions
(order reversed every other one). ``--profile`` runs one extra kvmpy pass per backend with
cProfile inside the I/O thread (around every callback) and in the driver.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import select
import socket
import statistics
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))   # the tests' guest driver, frames
sys.path.insert(0, os.path.join(HERE, ".."))                  # virtio_rig

from kvmpy.virtio.net import HDR_LEN, VirtioNet                # noqa: E402
from test_net_frames import ETH_IP, GUEST_MAC, eth, udp        # noqa: E402
from virtio_driver import NEXT                                 # noqa: E402
from virtio_rig import VirtioRig                                 # noqa: E402

MEM = 16 << 20
PAYLOAD = 1472                     # 1500 MTU - 20 IPv4 - 8 UDP
FRAME = 14 + 20 + 8 + PAYLOAD      # 1514
TX = 1
TAP_HOST, TAP_GUEST = "10.99.0.1", "10.99.0.2"
SLIRP_MAC = bytes.fromhex("52550a000202")   # libslirp's own MAC (special ethaddr + 10.0.2.2)
RCVBUF = 32 << 20
WAIT_S = 10.0                      # no completion for this long: fail, do not hang

RECEIVER = r"""
import os, select, socket, struct, sys, time
ctl_r, ctl_w = int(sys.argv[1]), int(sys.argv[2])
socks = [socket.socket(fileno=int(fd)) for fd in sys.argv[3:]]
ep = select.epoll()
for s in socks:
    s.setblocking(False)
    ep.register(s.fileno(), select.EPOLLIN)
ep.register(ctl_r, select.EPOLLIN)
by_fd = {s.fileno(): s for s in socks}
buf = bytearray(65536)
n = nbytes = 0
last = 0.0
end = time.monotonic() + 3600
while time.monotonic() < end:
    for fd, _ in ep.poll(1.0):
        if fd == ctl_r:
            cmd = os.read(ctl_r, 1)
            if cmd != b"R":
                sys.exit(0)
            idle = time.monotonic() + 0.3          # drain: nothing more for 0.3 s
            while time.monotonic() < idle:
                for fd2, _ in ep.poll(0.05):
                    s = by_fd.get(fd2)
                    if s is None:
                        continue
                    try:
                        while True:
                            k = s.recv_into(buf)
                            n += 1; nbytes += k; last = time.perf_counter()
                            idle = time.monotonic() + 0.3
                    except BlockingIOError:
                        pass
            os.write(ctl_w, struct.pack("<QQd", n, nbytes, last))
            n = nbytes = 0
            last = 0.0
            continue
        s = by_fd[fd]
        try:
            while True:
                k = s.recv_into(buf)
                n += 1; nbytes += k; last = time.perf_counter()
        except BlockingIOError:
            pass
"""
REPORT = struct.Struct("<QQd")


class Receiver:
    """A child process counting what arrives on the given (already bound) sockets."""

    def __init__(self, socks: list[socket.socket]):
        self.c_r, self.p_w = os.pipe()     # parent -> child commands
        self.p_r, self.c_w = os.pipe()     # child -> parent reports
        fds = [self.c_r, self.c_w] + [s.fileno() for s in socks]
        self.proc = subprocess.Popen([sys.executable, "-c", RECEIVER] + [str(f) for f in fds],
                                     pass_fds=fds)
        os.close(self.c_r)
        os.close(self.c_w)

    def report(self) -> tuple[int, int, float]:
        os.write(self.p_w, b"R")
        r, _, _ = select.select([self.p_r], [], [], 30)
        if not r:
            raise SystemExit("receiver did not report")
        return REPORT.unpack(os.read(self.p_r, REPORT.size))

    def close(self) -> None:
        try:
            os.write(self.p_w, b"Q")
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.p_w)
        os.close(self.p_r)


def udp_socket(addr: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)   # SO_RCVBUFFORCE (root)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    s.bind((addr, 0))
    return s


def payload() -> bytes:
    return bytes((i * 7 + 1) & 0xFF for i in range(PAYLOAD))


# -- tap setup --------------------------------------------------------------------------------
def make_tap(name: str):
    from kvmpy.net.tap import TapBackend

    for line in subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        if " 10.99.0." in line:
            raise SystemExit(f"10.99.0.0/30 is already in use on this host: {line}")
    tap = TapBackend(name)
    try:
        v6 = f"/proc/sys/net/ipv6/conf/{tap.name}/disable_ipv6"
        if os.path.exists(v6):
            with open(v6, "w") as f:
                f.write("1")
        subprocess.run(["ip", "addr", "add", f"{TAP_HOST}/30", "dev", tap.name], check=True)
        subprocess.run(["ip", "link", "set", tap.name, "up"], check=True)
        with open(f"/sys/class/net/{tap.name}/address") as f:
            mac = bytes.fromhex(f.read().strip().replace(":", ""))
    except BaseException:
        tap.close()
        raise
    return tap, mac


# -- kvmpy ------------------------------------------------------------------------------------
class Rig(VirtioRig):
    def __init__(self, backend, frame: bytes, depth: int):
        self.backend = backend
        super().__init__(lambda mem: VirtioNet(mem, backend, mac=GUEST_MAC), MEM, queues=2)
        self.backend_fds = [fd for fd, _ in backend.fds()]
        for fd, cb in backend.fds():                  # as netsetup.attach_backend
            self.io.add_reader(fd, cb)
        self.vq = self.drv.queues[TX]
        self.depth = depth
        assert 2 * depth <= self.vq.size
        a = self.drv.alloc
        self.heads = []
        for i in range(depth):
            hdr, data = a.alloc(HDR_LEN), a.alloc(FRAME)
            self.mem.write(hdr, bytes(HDR_LEN))
            self.mem.write(data, frame)
            self.vq.write_desc(2 * i, hdr, HDR_LEN, NEXT, 2 * i + 1)
            self.vq.write_desc(2 * i + 1, data, FRAME, 0, 0)
            self.heads.append(2 * i)
        self.avail_idx = self.used_seen = 0

    def run(self, n: int) -> float:
        mem, vq, heads, depth = self.mem, self.vq, self.heads, self.depth
        avail_ring, avail_idx_at, used_idx_at = vq.avail + 4, vq.avail + 2, vq.used + 2
        size = vq.size
        write_u16, read_u16 = mem.write_u16, mem.read_u16
        notify, irqfd = self.drv.notify, self.irq.fd
        poller = select.poll()
        poller.register(irqfd, select.POLLIN)
        idx, used = self.avail_idx, self.used_seen
        t0 = time.perf_counter()
        for b in range(0, n, depth):
            k = min(depth, n - b)
            for head in heads[:k]:
                write_u16(avail_ring + 2 * (idx % size), head)
                idx = (idx + 1) & 0xFFFF
            write_u16(avail_idx_at, idx)
            notify(TX)
            want = (used + k) & 0xFFFF
            while read_u16(used_idx_at) != want:
                if not poller.poll(WAIT_S * 1000):
                    raise SystemExit(f"no TX completion in {WAIT_S} s "
                                     f"(I/O thread errors: {self.io.errors})")
                os.eventfd_read(irqfd)
            used = want
        elapsed = time.perf_counter() - t0
        self.avail_idx, self.used_seen = idx, used
        return elapsed

    def close(self) -> None:
        for fd in self.backend_fds:
            self.io.remove_reader(fd)
        super().close()


def profile_rig(rig: Rig, n: int, label: str) -> None:
    prof, dprof = cProfile.Profile(), cProfile.Profile()
    saved = dict(rig.io._callbacks)

    def wrap(cb):
        def wrapped():
            prof.enable()
            try:
                return cb()
            finally:
                prof.disable()
        return wrapped

    for fd, cb in saved.items():
        rig.io._callbacks[fd] = wrap(cb)
    dprof.enable()
    t = rig.run(n)
    dprof.disable()
    rig.io._callbacks.update(saved)
    print(f"\n-- cProfile, {label}, QD {rig.depth}, {n} frames "
          f"({n / t:,.0f} frames/s sent under the profiler) --")
    for p, title in ((prof, "I/O thread (device + backend)"), (dprof, "driver (main thread)")):
        s = io.StringIO()
        pstats.Stats(p, stream=s).sort_stats("tottime").print_stats(14)
        text = s.getvalue()
        print(f"[{title}]")
        print(text[text.find("   ncalls"):].rstrip())


# -- baselines --------------------------------------------------------------------------------
def run_sendto(addr: tuple[str, int], data: bytes, n: int) -> float:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(addr)   # connected: the fastest plain-Python way (send, no address parsing)
        send = s.send
        t0 = time.perf_counter()
        for _ in range(n):
            send(data)
        return time.perf_counter() - t0
    finally:
        s.close()


def run_write(fd: int, frame: bytes, n: int) -> float:
    write = os.write
    t0 = time.perf_counter()
    for _ in range(n):
        try:
            write(fd, frame)
        except BlockingIOError:
            pass
    return time.perf_counter() - t0


def run_backend_send(backend, frame: bytes, n: int) -> float:
    send = backend.send
    t0 = time.perf_counter()
    for _ in range(n):
        send(frame)
    return time.perf_counter() - t0


# -- main -------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=50_000)
    ap.add_argument("--depths", default="128,1")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-tap", action="store_true")
    ap.add_argument("--no-slirp", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    n = args.frames
    depths = [int(d) for d in args.depths.split(",")]
    data = payload()

    cleanup = []
    tap = tapmac = sock_tap = None
    try:
        if not args.no_tap:
            tap, tapmac = make_tap(f"kvmpybn{os.getpid() % 100000}")
            cleanup.append(tap.close)
            sock_tap = udp_socket(TAP_HOST)
        sock_lo = udp_socket("127.0.0.1") if not args.no_slirp else None
        socks = [s for s in (sock_tap, sock_lo) if s is not None]
        rx = Receiver(socks)
        cleanup.append(rx.close)
        for s in socks:
            cleanup.append(s.close)

        # paths: name -> (run(n) -> send-side seconds)
        paths: dict[str, object] = {}
        rigs: dict[str, Rig] = {}
        frames: dict[str, bytes] = {}
        if tap is not None:
            port = sock_tap.getsockname()[1]
            f = eth(tapmac, GUEST_MAC, ETH_IP, udp(TAP_GUEST, TAP_HOST, 40000, port, data))
            assert len(f) == FRAME
            frames["tap"] = f
            paths["udp-loopback -> 10.99.0.1"] = lambda n, a=(TAP_HOST, port): \
                run_sendto(a, data, n)
            paths["tap-write (os.write)"] = lambda n, fd=tap.fd, f=f: run_write(fd, f, n)
            # the tap-write baseline uses the fd while no notify is in flight; the kvmpy rig's
            # backend reads nothing (no RX buffers), so the fd is only written by one side at a time
            for d in depths:
                rig = Rig(tap, f, d)
                rigs[f"tap QD{d}"] = rig
                paths[f"kvmpy tap QD{d}"] = rig.run
            cleanup.remove(tap.close)    # the last rig's device closes it
        if sock_lo is not None:
            from kvmpy.net.slirp import SlirpBackend

            port = sock_lo.getsockname()[1]
            f = eth(SLIRP_MAC, GUEST_MAC, ETH_IP, udp("10.0.2.15", "10.0.2.2", 40001, port, data))
            frames["slirp"] = f
            paths["udp-loopback -> 127.0.0.1"] = lambda n, a=("127.0.0.1", port): \
                run_sendto(a, data, n)
            for d in depths:
                be = SlirpBackend()
                rig = Rig(be, f, d)
                rigs[f"slirp QD{d}"] = rig
                paths[f"kvmpy slirp QD{d}"] = rig.run
            # slirp without virtio: send() from this thread into the QD-first rig's backend
            first = rigs[f"slirp QD{depths[0]}"].backend
            paths["slirp-send (no virtio)"] = lambda n, b=first, f=f: run_backend_send(b, f, n)

        # warm-up
        for name, fn in paths.items():
            fn(min(n, 2000))
            rx.report()
        res: dict[str, list[tuple[float, float, float]]] = {k: [] for k in paths}
        for rep in range(args.reps):
            order = list(paths)
            if rep % 2:
                order.reverse()
            for name in order:
                t0 = time.perf_counter()
                t_send = paths[name](n)
                got, nbytes, last = rx.report()
                t_rx = (last - t0) if got else float("inf")
                res[name].append((n / t_send, got / t_rx if got else 0.0, got / n))

        print(f"virtio-net TX, {n} frames x {args.reps} reps, {FRAME}-byte frames "
              f"({PAYLOAD}-byte UDP payload), MB = 10^6 B of UDP payload delivered")
        print(f"{'path':28} {'deliv frames/s':>14} {'MB/s':>8} {'sent frames/s':>13} "
              f"{'delivered':>9}")
        med = {}
        for name, vals in res.items():
            sent = statistics.median(v[0] for v in vals)
            deliv = statistics.median(v[1] for v in vals)
            frac = min(v[2] for v in vals)
            med[name] = deliv
            print(f"{name:28} {deliv:14,.0f} {deliv * PAYLOAD / 1e6:8.1f} {sent:13,.0f} "
                  f"{frac:9.1%}")
        print("ratios (delivered frames/s):")
        for name in med:
            if not name.startswith("kvmpy"):
                continue
            be = "tap" if " tap " in name else "slirp"
            bases = ([k for k in med if k.startswith("udp-loopback -> 10.99")] +
                     [k for k in med if k.startswith("tap-write")]) if be == "tap" else \
                ([k for k in med if k.startswith("udp-loopback -> 127")] +
                 [k for k in med if k.startswith("slirp-send")])
            print(f"  {name:20} " + ", ".join(f"/ {b}: {med[name] / med[b]:.3f}" for b in bases))
        for name, rig in rigs.items():
            print(f"{name}: device tx_frames {rig.dev.tx_frames} tx_dropped {rig.dev.tx_dropped}, "
                  f"backend tx_frames {rig.backend.tx_frames} tx_dropped "
                  f"{rig.backend.tx_dropped}, I/O thread errors {rig.io.errors}")
        if args.profile:
            for name, rig in rigs.items():
                if name.endswith(f"QD{depths[0]}"):
                    profile_rig(rig, min(n, 20_000), name.split()[0])
                    rx.report()
    finally:
        for r in locals().get("rigs", {}).values():
            r.close()
        for c in reversed(cleanup):
            try:
                c()
            except Exception as e:
                print(f"cleanup: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
