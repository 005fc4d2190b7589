"""Hand-built Ethernet/ARP/IPv4/UDP/TCP/DHCP frames for the network backend tests (imported by
test_net_slirp.py and test_net_tap.py), a tiny "guest" that collects what a backend delivers
(answering ARP for its own address), and checks of the helpers themselves."""
from __future__ import annotations

import queue
import socket
import struct
import time

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = "10.0.2.15"
HOST_IP = "10.0.2.2"
DNS_IP = "10.0.2.3"
BROADCAST = b"\xff" * 6
ETH_IP, ETH_ARP = 0x0800, 0x0806
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 1, 2, 4, 8, 16


def ip4(a: str) -> bytes:
    return socket.inet_aton(a)


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def eth(dst: bytes, src: bytes, etype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", etype) + payload


def arp(op: int, smac: bytes, sip: str, tmac: bytes, tip: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_IP, 6, 4, op, smac, ip4(sip), tmac, ip4(tip))


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, proto, 0,
                      ip4(src), ip4(dst))
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    return ipv4(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)


def tcp(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
        payload: bytes = b"", window: int = 65535) -> bytes:
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4,
                      flags, window, 0, 0)
    pseudo = ip4(src) + ip4(dst) + struct.pack("!BBH", 0, 6, len(hdr) + len(payload))
    c = csum(pseudo + hdr + payload)
    return ipv4(src, dst, 6, hdr[:16] + struct.pack("!H", c) + hdr[18:] + payload)


def dhcp(msg_type: int, xid: int, mac: bytes = GUEST_MAC, requested: str | None = None,
         server: str | None = None) -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, b"\0" * 4,
                        b"\0" * 4, b"\0" * 4, b"\0" * 4, mac + b"\0" * 10, b"", b"")
    opts = b"\x63\x82\x53\x63" + bytes([53, 1, msg_type])
    if requested:
        opts += bytes([50, 4]) + ip4(requested)
    if server:
        opts += bytes([54, 4]) + ip4(server)
    opts += bytes([55, 3, 1, 3, 6, 255])
    payload = (bootp + opts).ljust(548, b"\0")
    return eth(BROADCAST, mac, ETH_IP, udp("0.0.0.0", "255.255.255.255", 68, 67, payload))


# -- parsing ------------------------------------------------------------------------------------
class Frame:
    def __init__(self, raw: bytes):
        self.raw = raw
        self.dst, self.src = raw[:6], raw[6:12]
        self.etype = struct.unpack("!H", raw[12:14])[0]
        self.payload = raw[14:]
        self.proto = None
        if self.etype == ETH_ARP:
            (_, _, _, _, self.arp_op, self.arp_smac, sip, self.arp_tmac,
             tip) = struct.unpack("!HHBBH6s4s6s4s", self.payload[:28])
            self.arp_sip, self.arp_tip = socket.inet_ntoa(sip), socket.inet_ntoa(tip)
        elif self.etype == ETH_IP:
            p = self.payload
            ihl = (p[0] & 15) * 4
            total = struct.unpack("!H", p[2:4])[0]
            self.proto = p[9]
            self.ip_src, self.ip_dst = socket.inet_ntoa(p[12:16]), socket.inet_ntoa(p[16:20])
            self.l4 = p[ihl:total]
            if self.proto == 17:
                self.sport, self.dport = struct.unpack("!HH", self.l4[:4])
                self.data = self.l4[8:]
            elif self.proto == 6:
                (self.sport, self.dport, self.seq, self.ack, off,
                 self.flags) = struct.unpack("!HHIIBB", self.l4[:14])
                self.data = self.l4[(off >> 4) * 4:]

    def dhcp_options(self) -> dict[int, bytes]:
        opts, i, v = {}, 240, self.data
        while i < len(v) and v[i] != 255:
            if v[i] == 0:
                i += 1
                continue
            opts[v[i]] = v[i + 2:i + 2 + v[i + 1]]
            i += 2 + v[i + 1]
        return opts


class Guest:
    """Collects delivered frames; answers ARP requests for GUEST_IP itself."""

    def __init__(self, backend, mac: bytes = GUEST_MAC, ip: str = GUEST_IP):
        self.backend, self.mac, self.ip = backend, mac, ip
        self.frames: queue.Queue[Frame] = queue.Queue()
        self.accept = True
        self.offered = 0
        backend.set_receiver(self.receive)

    def receive(self, raw: bytes) -> bool:
        self.offered += 1
        if not self.accept:
            return False
        f = Frame(raw)
        if f.etype == ETH_ARP and f.arp_op == 1 and f.arp_tip == self.ip:
            self.backend.send(eth(f.src, self.mac, ETH_ARP,
                                  arp(2, self.mac, self.ip, f.arp_smac, f.arp_sip)))
        else:
            self.frames.put(f)
        return True

    def expect(self, pred, timeout: float = 5.0, what: str = "frame") -> Frame:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            try:
                f = self.frames.get(timeout=left)
            except queue.Empty:
                continue
            if pred(f):
                return f


# -- the helpers' own checks --------------------------------------------------------------------
def test_checksums_verify_to_zero():
    packet = ipv4("10.0.2.15", "10.0.2.2", 17, b"x" * 9)
    assert csum(packet[:20]) == 0
    seg = tcp(GUEST_IP, HOST_IP, 1, 2, 3, 4, TCP_SYN, b"abc")
    pseudo = ip4(GUEST_IP) + ip4(HOST_IP) + struct.pack("!BBH", 0, 6, len(seg) - 20)
    assert csum(pseudo + seg[20:]) == 0


def test_frames_parse_back():
    f = Frame(eth(BROADCAST, GUEST_MAC, ETH_IP,
                  tcp(GUEST_IP, HOST_IP, 40000, 80, 7, 9, TCP_SYN | TCP_ACK, b"hi")))
    assert (f.ip_src, f.ip_dst, f.sport, f.dport, f.seq, f.ack) == (GUEST_IP, HOST_IP, 40000,
                                                                   80, 7, 9)
    assert f.flags == TCP_SYN | TCP_ACK and f.data == b"hi"
    d = Frame(dhcp(1, 5))
    assert d.sport == 68 and d.dhcp_options()[53] == b"\x01"
