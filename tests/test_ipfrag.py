"""kvmpy.net.ipfrag: IPv4 reassembly of the guest's fragments before libslirp (which crashes on
some fragment sequences), against hand-made fragments and hostile sequences."""
from __future__ import annotations

import random
import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.net.ipfrag import MAX_DATAGRAMS, Reassembler, is_fragment
from test_net_frames import ETH_IP, GUEST_IP, GUEST_MAC, HOST_IP, Guest, csum, eth, ip4

SLIRP_MAC = bytes.fromhex("52550a000202")


def datagram(payload: bytes, ident: int = 7, proto: int = 17, dst: str = HOST_IP) -> bytes:
    """An unfragmented IPv4 datagram (header checksum set)."""
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, proto, 0,
                      ip4(GUEST_IP), ip4(dst))
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload


def fragment(dgram: bytes, start: int, end: int, more: bool) -> bytes:
    """The Ethernet frame of the fragment carrying payload bytes [start, end) of ``dgram``."""
    payload = dgram[20:][start:end]
    hdr = bytearray(dgram[:20])
    hdr[2:4] = (20 + len(payload)).to_bytes(2, "big")
    hdr[6:8] = ((0x2000 if more else 0) | start // 8).to_bytes(2, "big")
    hdr[10:12] = b"\0\0"
    hdr[10:12] = csum(bytes(hdr)).to_bytes(2, "big")
    return eth(SLIRP_MAC, GUEST_MAC, ETH_IP, bytes(hdr) + payload)


def split(dgram: bytes, size: int) -> list[bytes]:
    n = len(dgram) - 20
    cuts = list(range(0, n, size))
    return [fragment(dgram, a, min(a + size, n), a + size < n) for a in cuts]


def whole(dgram: bytes) -> bytes:
    return eth(SLIRP_MAC, GUEST_MAC, ETH_IP, dgram)


def test_in_any_order_the_datagram_comes_back_whole():
    dgram = datagram(bytes(range(256)) * 12)          # 3072 bytes of payload
    for order in ("in order", "reversed", "shuffled"):
        frags = split(dgram, 1480)
        if order == "reversed":
            frags.reverse()
        elif order == "shuffled":
            random.Random(1).shuffle(frags)
        r = Reassembler()
        assert all(is_fragment(f) for f in frags)
        out = [r.add(f) for f in frags]
        assert out[:-1] == [None] * (len(frags) - 1)
        assert out[-1] == whole(dgram), order
        assert csum(out[-1][14:34]) == 0 and not is_fragment(out[-1])
        assert (r.pending, r.dropped, r.datagrams) == (0, 0, 1)


def test_overlaps_and_disagreeing_ends_drop_the_datagram():
    dgram = datagram(b"x" * 64)
    cases = {
        "overlap": [fragment(dgram, 0, 32, True), fragment(dgram, 24, 64, False)],
        "duplicate": [fragment(dgram, 0, 32, True), fragment(dgram, 0, 32, True),
                      fragment(dgram, 32, 64, False)],
        "two ends": [fragment(dgram, 32, 48, False), fragment(dgram, 48, 64, False),
                     fragment(dgram, 0, 32, True)],
        "past the end": [fragment(dgram, 32, 40, False), fragment(dgram, 40, 48, True),
                         fragment(dgram, 0, 32, True)],
    }
    for name, frags in cases.items():
        r = Reassembler()
        assert [r.add(f) for f in frags] == [None] * len(frags), name
        assert r.datagrams == 0 and r.dropped >= 2, name


def test_malformed_fragments_are_refused():
    dgram = datagram(b"y" * 64)
    r = Reassembler()
    odd = bytearray(fragment(dgram, 0, 13, True))    # not the last, yet not a multiple of 8
    assert r.add(bytes(odd)) is None and r.dropped == 1
    big = bytearray(fragment(dgram, 0, 8, False))
    big[20:22] = (0x1FFF).to_bytes(2, "big")          # offset 65528 + 8 bytes > 65535
    assert r.add(bytes(big)) is None and r.dropped == 2
    short = fragment(dgram, 0, 32, True)[:40]         # frame shorter than its total length
    assert r.add(short) is None and r.dropped == 3
    assert r.pending == 0


def test_bounded_in_number_and_in_time():
    now = [0.0]
    r = Reassembler(clock=lambda: now[0])
    for ident in range(MAX_DATAGRAMS + 10):           # first halves only: never complete
        r.add(fragment(datagram(b"z" * 32, ident=ident), 0, 16, True))
    assert r.pending == MAX_DATAGRAMS and r.dropped == 10   # the oldest pushed out
    now[0] = 31.0                                          # past TIMEOUT_S
    r.add(fragment(datagram(b"z" * 32, ident=999), 0, 16, True))
    assert r.pending == 1 and r.dropped == 10 + MAX_DATAGRAMS


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x1FFF), st.booleans(),
                          st.sampled_from([0, 8, 16, 24, 64, 1480, 65480]),
                          st.integers(0, 3), st.integers(5, 15)), max_size=12))
def test_random_fragments_never_raise_and_only_whole_datagrams_come_out(frags):
    r = Reassembler()
    for off8, more, n, ident, words in frags:
        hlen = 4 * words
        n = min(n, 65535 - hlen)
        hdr = bytearray(datagram(b"", ident=ident)[:20] + b"\x01" * (hlen - 20))
        hdr[0] = 0x40 | words
        hdr[2:4] = (hlen + n).to_bytes(2, "big")
        hdr[6:8] = ((0x2000 if more else 0) | off8).to_bytes(2, "big")
        hdr[10:12] = b"\0\0"
        hdr[10:12] = csum(bytes(hdr)).to_bytes(2, "big")
        frame = eth(SLIRP_MAC, GUEST_MAC, ETH_IP, bytes(hdr) + b"q" * n)
        if not is_fragment(frame):        # offset 0 and no MF: not the reassembler's
            continue
        out = r.add(frame)
        if out is not None:
            hl = (out[14] & 15) * 4
            assert not is_fragment(out) and csum(out[14:14 + hl]) == 0
            assert struct.unpack("!H", out[16:18])[0] == len(out) - 14 <= 65535
            assert set(out[14 + hl:]) <= {ord("q")}


def test_a_datagram_larger_than_the_mtu_reaches_the_host_through_slirp():
    from kvmpy.net.slirp import SlirpBackend
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(5)
    try:
        data = bytes(random.Random(2).randrange(256) for _ in range(4000))
        udp = struct.pack("!HHHH", 40000, server.getsockname()[1], 8 + len(data), 0) + data
        with SlirpBackend() as b:
            Guest(b)
            (_, serve), = b.fds()
            serve()
            for f in reversed(split(datagram(udp), 1480)):
                b.send(f)
            serve()
            got, _ = server.recvfrom(65536)
            assert got == data and b.fragments_dropped == 0
    finally:
        server.close()


def _with_options(dgram: bytes, words: int) -> bytes:
    """``dgram`` with ``words`` 32-bit words of IP options (NOPs) in its header."""
    hdr = bytearray(dgram[:20] + b"\x01" * (4 * words))
    hdr[0] = 0x40 | (5 + words)
    hdr[2:4] = (len(dgram) + 4 * words).to_bytes(2, "big")
    hdr[10:12] = b"\0\0"
    hdr[10:12] = csum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + dgram[20:]


def test_the_first_fragments_header_counts_toward_64_kib():
    # each fragment fits with its own 20-byte header, but the datagram carries the first
    # fragment's 60-byte one: 60 + 65496 > 65535. Refused, never an exception.
    big = datagram(b"w" * (65535 - 20 - 8))                  # payload 65496 (multiple of 8)
    first = _with_options(datagram(b"w" * 1480), 10)         # 60-byte header ...
    first = bytearray(first)
    first[6:8] = (0x2000).to_bytes(2, "big")                 # ... as the first fragment
    first[10:12] = b"\0\0"
    first[10:12] = csum(bytes(first[:60])).to_bytes(2, "big")
    first = eth(SLIRP_MAC, GUEST_MAC, ETH_IP, bytes(first))
    r = Reassembler()
    frags = [fragment(big, a, min(a + 1480, 65496), a + 1480 < 65496)
             for a in range(1480, 65496, 1480)]
    out = [r.add(f) for f in frags + [bytes(first)]]
    assert out == [None] * len(out) and r.datagrams == 0 and r.dropped > 0
    assert [r.add(f) for f in reversed(frags + [bytes(first)])] == [None] * len(out)


def test_bad_header_checksum_version_and_too_many_pieces_are_refused():
    dgram = datagram(b"v" * 2048)
    bad = bytearray(fragment(dgram, 0, 1024, True))
    bad[24] ^= 0xFF                                          # header checksum
    v6 = bytearray(fragment(dgram, 0, 1024, True))
    v6[14] = 0x65
    r = Reassembler()
    assert r.add(bytes(bad)) is None and r.add(bytes(v6)) is None and r.dropped == 2
    dgram = datagram(b"v" * 8 * 300)
    pieces = [fragment(dgram, a, a + 8, True) for a in range(0, 8 * 300, 8)]
    assert all(r.add(f) is None for f in pieces)
    assert r.pending <= 1 and r.dropped > 2 + 256            # the 257th piece drops it


def test_a_first_fragment_with_options_keeps_them():
    dgram = _with_options(datagram(b"o" * 3000), 2)
    r = Reassembler()
    hdr_len = 28
    n = len(dgram) - hdr_len
    frags = []
    for a in range(0, n, 1480):
        payload = dgram[hdr_len:][a:a + 1480]
        hdr = bytearray(dgram[:hdr_len])
        hdr[2:4] = (hdr_len + len(payload)).to_bytes(2, "big")
        hdr[6:8] = ((0x2000 if a + 1480 < n else 0) | a // 8).to_bytes(2, "big")
        hdr[10:12] = b"\0\0"
        hdr[10:12] = csum(bytes(hdr)).to_bytes(2, "big")
        frags.append(eth(SLIRP_MAC, GUEST_MAC, ETH_IP, bytes(hdr) + payload))
    out = [r.add(f) for f in frags][-1]
    assert out == whole(dgram)
