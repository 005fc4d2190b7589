"""IPv4 reassembly of the guest's fragmented datagrams, in front of libslirp.

libslirp 4.7 reassembles fragments itself, but a guest can crash the whole process through it:
a last fragment that arrives with no fragment of its datagram queued (alone, before the first
one, or again after the datagram completed) ends in SIGBUS or SIGSEGV inside libslirp.so. So
the slirp backend never hands libslirp a fragment. It reassembles here and passes each
datagram whole, as one frame (libslirp takes frames larger than the MTU: slirp_input grows its
buffer to the frame), and the host's kernel fragments again where the datagram goes on.

The rules (RFC 791 section 3.2, "Fragmentation and reassembly"): fragments belong together when
source, destination, protocol and identification match; every fragment but the last carries a
multiple of 8 bytes; a datagram is at most 65535 bytes, header included. Stricter than RFC 791,
as hosts and firewalls are today: fragments that overlap, or disagree about where the datagram
ends, drop the whole datagram (RFC 5722 makes that the rule for IPv6; no honest sender
overlaps). A datagram not complete within TIMEOUT_S is dropped (RFC 791 suggests 15 s as the
lower bound of that timer), at most MAX_DATAGRAMS are in progress (a new one pushes out the
oldest) and a datagram may come in at most MAX_PARTS fragments (a 64 KiB datagram at the
smallest MTU IPv4 hosts must accept, 576, is 119 fragments; 128 with 60-byte headers), so what
a guest can make this hold is bounded:
MAX_DATAGRAMS x (64 KiB + MAX_PARTS small objects), and each fragment costs at most MAX_PARTS
comparisons. A fragment whose header is not IPv4 or whose header checksum is wrong is dropped
(RFC 1122 3.2.1.2), as libslirp drops such an unfragmented datagram.

This module knows Ethernet + IPv4 headers only; it does not look at what the datagram carries.
"""
from __future__ import annotations

import struct
import time
from collections.abc import Callable

ETH_HLEN = 14
IP_MF, IP_OFFSET = 0x2000, 0x1FFF   # RFC 791: the flags/fragment offset field
MAX_DATAGRAM = 65535                # RFC 791: total length is 16 bits
MAX_DATAGRAMS = 64
MAX_PARTS = 256
TIMEOUT_S = 30.0


def is_fragment(frame: bytes) -> bool:
    """An Ethernet frame with an IPv4 fragment: MF set or a non-zero offset (RFC 791)."""
    return (len(frame) >= ETH_HLEN + 8 and frame[12] == 0x08 and frame[13] == 0x00
            and bool(((frame[20] << 8) | frame[21]) & (IP_MF | IP_OFFSET)))


def internet_checksum(data: bytes | bytearray) -> int:
    """The RFC 1071 Internet checksum of ``data`` (IPv4 headers, TCP with its pseudo-header)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class _Datagram:
    __slots__ = ("expires", "parts", "head", "end", "have")

    def __init__(self, expires: float):
        self.expires = expires
        self.parts: list[tuple[int, int, bytes]] = []   # (start, end, payload)
        self.head: bytes | None = None      # Ethernet + IP header of the fragment at offset 0
        self.end: int | None = None         # payload length, known from the last fragment
        self.have = 0                       # payload bytes held


class Reassembler:
    """Whole datagrams out of fragments; see the module docstring. Not thread-safe: the caller
    serializes (the slirp backend calls it under its lock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 max_datagrams: int = MAX_DATAGRAMS, timeout: float = TIMEOUT_S):
        self._clock = clock
        self._max = max_datagrams
        self._timeout = timeout
        self._pending: dict[bytes, _Datagram] = {}   # oldest first (dicts keep order)
        self.fragments = 0      # fragments given to add()
        self.dropped = 0        # fragments thrown away (malformed, overlapping, late, pushed out)
        self.datagrams = 0      # datagrams reassembled

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, frame: bytes) -> bytes | None:
        """Take one fragment (an Ethernet frame for which :func:`is_fragment` holds). Returns the
        whole datagram as one Ethernet frame if this fragment completes it, else None."""
        self.fragments += 1
        now = self._clock()
        self._expire(now)
        if len(frame) < ETH_HLEN + 20:
            return self._reject()
        ihl = (frame[ETH_HLEN] & 0x0F) * 4
        total = int.from_bytes(frame[16:18], "big")
        if (frame[ETH_HLEN] >> 4 != 4 or ihl < 20 or total < ihl
                or len(frame) < ETH_HLEN + total or internet_checksum(frame[ETH_HLEN:ETH_HLEN + ihl])):
            return self._reject()
        field = int.from_bytes(frame[20:22], "big")
        more = bool(field & IP_MF)
        start = (field & IP_OFFSET) * 8
        payload = frame[ETH_HLEN + ihl:ETH_HLEN + total]
        end = start + len(payload)
        if (more and (not payload or len(payload) % 8)) or ihl + end > MAX_DATAGRAM:
            return self._reject()
        key = frame[18:20] + frame[23:24] + frame[26:34]     # id, protocol, source, destination
        d = self._pending.get(key)
        if d is None:
            if len(self._pending) >= self._max:             # push out the oldest
                self._drop(next(iter(self._pending)))
            d = self._pending[key] = _Datagram(now + self._timeout)
        if (len(d.parts) >= MAX_PARTS
                or any(start < e and s < end for s, e, _ in d.parts)
                or (d.end is not None and (end > d.end or (not more and end != d.end)))
                or (not more and any(e > end for _, e, _ in d.parts))
                or (start == 0 and ihl + max([end] + [e for _, e, _ in d.parts]) > MAX_DATAGRAM)
                or (d.head is not None and len(d.head) - ETH_HLEN + end > MAX_DATAGRAM)):
            # too many pieces, an overlap, a second (other) end, or more than 64 KiB with the
            # first fragment's header (each fragment was checked with its own header length)
            self._drop(key)
            return self._reject()
        d.parts.append((start, end, payload))
        d.have += len(payload)
        if start == 0:
            d.head = frame[:ETH_HLEN + ihl]
        if not more:
            d.end = end
        if d.end is None or d.head is None or d.have != d.end:
            return None
        # No overlaps and every part inside [0, end): `have == end` means all of it is here.
        del self._pending[key]
        self.datagrams += 1
        head = bytearray(d.head)
        ip_hlen = len(head) - ETH_HLEN
        head[16:18] = (ip_hlen + d.end).to_bytes(2, "big")   # total length
        head[20:22] = b"\0\0"                                # not a fragment any more
        head[24:26] = b"\0\0"
        head[24:26] = internet_checksum(head[ETH_HLEN:]).to_bytes(2, "big")
        return bytes(head) + b"".join(p for _, _, p in sorted(d.parts, key=lambda t: t[0]))

    def _reject(self) -> None:
        self.dropped += 1
        return None

    def _drop(self, key: bytes) -> None:
        d = self._pending.pop(key)
        self.dropped += len(d.parts)

    def _expire(self, now: float) -> None:
        while self._pending:
            key, d = next(iter(self._pending.items()))
            if d.expires > now:       # insertion order is expiry order (one timeout for all)
                break
            self._drop(key)
