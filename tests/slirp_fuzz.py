"""Random IPv4 frames from a "guest" into kvmpy's libslirp backend: run as a program, in its
own process, by tests/test_net_slirp_extra.py, because what it looks for is libslirp killing the
process (it did, with fragments: SIGBUS). Frames are plausible enough to get deep into libslirp
(valid checksums mostly, real ports, TCP flag mixes, options, lengths that lie, truncation).

    python tests/slirp_fuzz.py SEED COUNT     # prints "ok ..." and exits 0 if it survived
"""
from __future__ import annotations

import os
import random
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kvmpy.net.slirp import SlirpBackend                                   # noqa: E402
from test_net_frames import ETH_IP, GUEST_IP, GUEST_MAC, Guest, csum, eth, ip4   # noqa: E402

SLIRP_MAC = bytes.fromhex("52550a000202")
ADDRS = ["10.0.2.2", "10.0.2.3", "10.0.2.255", "255.255.255.255", "192.0.2.1", "10.0.2.15",
         "0.0.0.0", "224.0.0.1", "127.0.0.1"]


def l4(rnd: random.Random, proto: int) -> bytes:
    def junk(n: int) -> bytes:
        return bytes(rnd.randrange(256) for _ in range(n))
    if proto == 6:
        flags = rnd.choice([0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x3F, rnd.randrange(256)])
        off = rnd.choice([5, 5, 6, 15, rnd.randrange(16)])
        hdr = struct.pack("!HHIIBBHHH", rnd.randrange(65536), rnd.choice([80, 22, 9]),
                          rnd.randrange(1 << 32), rnd.randrange(1 << 32), off << 4, flags,
                          rnd.randrange(65536), 0, rnd.randrange(65536))
        return hdr + junk(max(0, off * 4 - 20)) + junk(rnd.choice([0, 1, 10, 100, 1400]))
    if proto == 17:
        body = junk(rnd.choice([0, 1, 8, 48, 300, 548, 1400]))
        ulen = rnd.choice([8 + len(body), rnd.randrange(65536), 0, 8])
        return struct.pack("!HHHH", rnd.choice([68, 20000, rnd.randrange(65536)]),
                           rnd.choice([53, 67, 69, 9, 123, rnd.randrange(65536)]), ulen, 0) + body
    if proto == 1:
        kind = rnd.choice([8, 0, 3, 11, 5, 13, rnd.randrange(256)])
        return bytes([kind, rnd.randrange(256), 0, 0]) + junk(4 + rnd.choice([0, 4, 28, 60, 100]))
    return junk(rnd.randrange(64))


def frame(rnd: random.Random) -> bytes:
    proto = rnd.choice([1, 6, 17, 17, 6, rnd.randrange(256)])
    payload = l4(rnd, proto)
    ihl = rnd.choice([5, 5, 5, 6, 15, rnd.randrange(16)])
    opts = bytes(rnd.randrange(256) for _ in range(max(0, ihl * 4 - 20)))
    total = rnd.choice([20 + len(opts) + len(payload)] * 4 + [rnd.randrange(65536)])
    frag = rnd.choice([0, 0, 0, 0x4000, 0x2000, rnd.randrange(65536)])
    src = GUEST_IP if rnd.random() < 0.9 else rnd.choice(ADDRS)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, rnd.randrange(65536), frag,
                      rnd.choice([64, 1, 0]), proto, 0, ip4(src), ip4(rnd.choice(ADDRS))) + opts
    if rnd.random() < 0.9:
        hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    etype = ETH_IP if rnd.random() < 0.97 else rnd.choice([0x0806, 0x86DD])
    f = eth(rnd.choice([SLIRP_MAC, b"\xff" * 6]), GUEST_MAC, etype, hdr + payload)
    return f[:rnd.randrange(len(f) + 1)] if rnd.random() < 0.05 else f


def main(seed: int, count: int) -> None:
    rnd = random.Random(seed)
    b = SlirpBackend()
    Guest(b)
    (_, serve), = b.fds()
    for i in range(count):
        b.send(frame(rnd))
        if i % 50 == 0:
            serve()
    serve()
    print("ok", seed, count, b.flows_refused, b.fragments_dropped)
    b.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
