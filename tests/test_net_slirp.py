"""kvmpy.net.slirp: libslirp user networking driven with hand-built frames (tests/net_frames.py).

Everything stays on the host: the TCP peer is a server this test runs on 127.0.0.1, which the
"guest" reaches as 10.0.2.2, and hostfwd listens on 127.0.0.1 only."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from kvmpy.errors import KvmpyError

try:
    from kvmpy.net import slirp as _slirp
    _slirp.load()
except KvmpyError as e:   # pragma: no cover - depends on the machine
    pytest.skip(str(e), allow_module_level=True)

from kvmpy.net.slirp import SlirpBackend
from test_net_frames import (DNS_IP, ETH_ARP, ETH_IP, GUEST_IP, GUEST_MAC, HOST_IP, TCP_ACK,
                              TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, Guest, arp, dhcp, eth, tcp)

SLIRP_MAC = bytes.fromhex("52550a000202")   # libslirp: 52:55 + the host's IPv4 address



@pytest.fixture
def net():
    b = SlirpBackend()
    g = Guest(b)
    b.run_in_thread()
    yield b, g
    b.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_arp_for_the_gateway(net):
    b, g = net
    b.send(eth(b"\xff" * 6, GUEST_MAC, ETH_ARP, arp(1, GUEST_MAC, GUEST_IP, b"\0" * 6, HOST_IP)))
    f = g.expect(lambda f: f.etype == ETH_ARP and f.arp_op == 2, what="ARP reply")
    assert f.arp_sip == HOST_IP and f.arp_smac == SLIRP_MAC and f.arp_tip == GUEST_IP
    assert f.dst == GUEST_MAC


def test_dhcp_discover_offer_request_ack(net):
    b, g = net
    is_dhcp = lambda f: f.etype == ETH_IP and f.proto == 17 and f.sport == 67  # noqa: E731
    b.send(dhcp(1, 0x1234))
    offer = g.expect(is_dhcp, what="DHCPOFFER")
    opts = offer.dhcp_options()
    assert opts[53] == b"\x02"
    assert offer.data[4:8] == (0x1234).to_bytes(4, "big")
    assert socket.inet_ntoa(offer.data[16:20]) == GUEST_IP          # yiaddr
    assert socket.inet_ntoa(opts[3]) == HOST_IP                      # router
    assert socket.inet_ntoa(opts[6][:4]) == DNS_IP                   # DNS
    assert socket.inet_ntoa(opts[1]) == "255.255.255.0"
    server = socket.inet_ntoa(opts[54])

    b.send(dhcp(3, 0x1235, requested=GUEST_IP, server=server))
    ack = g.expect(is_dhcp, what="DHCPACK")
    assert ack.dhcp_options()[53] == b"\x05"
    assert socket.inet_ntoa(ack.data[16:20]) == GUEST_IP


def test_outbound_tcp_to_the_host_echo_and_fin(net):
    b, g = net
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(10)
    port = srv.getsockname()[1]
    got = {}

    def echo():
        try:
            c, _ = srv.accept()
            with c:
                c.settimeout(10)
                data = b""
                while chunk := c.recv(4096):
                    data += chunk
                    c.sendall(chunk)
                got["data"] = data         # EOF: the guest's FIN arrived
        except OSError as e:
            got["error"] = e

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    try:
        sport, seq = 40000, 1000
        seg = lambda s, a, fl, d=b"": eth(SLIRP_MAC, GUEST_MAC, ETH_IP,  # noqa: E731
                                          tcp(GUEST_IP, HOST_IP, sport, port, s, a, fl, d))
        ours = lambda f: (f.etype == ETH_IP and f.proto == 6  # noqa: E731
                          and f.dport == sport and f.sport == port)
        b.send(seg(seq, 0, TCP_SYN))
        synack = g.expect(ours, what="SYN-ACK")
        assert synack.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
        assert synack.ack == seq + 1 and synack.ip_src == HOST_IP and synack.dst == GUEST_MAC
        seq += 1
        rseq = synack.seq + 1
        b.send(seg(seq, rseq, TCP_ACK))

        msg = b"hello from the guest"
        b.send(seg(seq, rseq, TCP_PSH | TCP_ACK, msg))
        seq += len(msg)
        echoed = b""
        while len(echoed) < len(msg):
            f = g.expect(ours, what="echoed data")
            assert not f.flags & TCP_RST
            if f.data:
                assert f.seq == rseq
                echoed += f.data
                rseq += len(f.data)
                b.send(seg(seq, rseq, TCP_ACK))
        assert echoed == msg

        b.send(seg(seq, rseq, TCP_FIN | TCP_ACK))
        seq += 1
        f = g.expect(lambda f: ours(f) and f.flags & TCP_FIN, what="FIN from the host side")
        assert f.ack == seq
        b.send(seg(seq, f.seq + 1, TCP_ACK))
        t.join(10)
        assert got.get("data") == msg, got
    finally:
        srv.close()


def test_hostfwd_reaches_the_guest():
    hp, gp = _free_port(), 8080
    with SlirpBackend(hostfwd=[("tcp", "127.0.0.1", hp, gp)]) as b:
        g = Guest(b)
        b.run_in_thread()
        c = socket.create_connection(("127.0.0.1", hp), timeout=5)
        try:
            f = g.expect(lambda f: f.etype == ETH_IP and f.proto == 6 and f.dport == gp,
                         what="forwarded SYN")
            assert f.flags & TCP_SYN and f.ip_dst == GUEST_IP and f.dst == GUEST_MAC
        finally:
            c.close()


def test_hostfwd_port_in_use_is_one_line_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(KvmpyError) as e:
            SlirpBackend(hostfwd=[("tcp", "127.0.0.1", port, 80)])
        assert "\n" not in str(e.value) and str(port) in str(e.value)


def test_no_rx_buffer_holds_a_bounded_queue_and_resumes_on_rx_ready():
    hp = _free_port()
    with SlirpBackend(hostfwd=[("tcp", "127.0.0.1", hp, 80)], rx_queue_max=4) as b:
        g = Guest(b)
        g.accept = False
        b.run_in_thread()
        assert b._registered            # the hostfwd listener is watched
        req = eth(b"\xff" * 6, GUEST_MAC, ETH_ARP, arp(1, GUEST_MAC, GUEST_IP, b"\0" * 6,
                                                       HOST_IP))
        for _ in range(7):
            b.send(req)
        deadline = time.monotonic() + 5
        while not (b.paused and b.rx_dropped == 3) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.paused and len(b._rxq) == 4 and b.rx_dropped == 3
        time.sleep(0.05)
        assert not b._registered        # paused: host sockets are not read
        assert g.frames.empty()

        g.accept = True
        b.rx_ready()
        for _ in range(4):
            g.expect(lambda f: f.etype == ETH_ARP and f.arp_op == 2, what="held ARP reply")
        deadline = time.monotonic() + 5
        while (b.paused or not b._registered) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not b.paused and b._registered and not b._rxq
        b.send(req)                     # and traffic flows again
        g.expect(lambda f: f.etype == ETH_ARP and f.arp_op == 2, what="ARP reply after resume")
        assert b.rx_frames == 5


def test_timeout_and_bad_frames(net):
    b, g = net
    t = b.timeout()
    assert t is not None and 0 <= t <= 1.0
    b.send(b"")                       # runt: dropped, counted
    b.send(b"\0" * 13)
    assert b.tx_dropped == 2
    b.send(os.urandom(60))            # garbage is slirp's problem; it must not crash
    b.poll_timers()


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_close_releases_everything():
    before, threads = _fds(), threading.active_count()
    for _ in range(3):
        b = SlirpBackend(hostfwd=[("tcp", "127.0.0.1", _free_port(), 22)])
        Guest(b)
        b.run_in_thread()
        b.send(dhcp(1, 7))
        time.sleep(0.05)
        b.close()
        b.close()                     # idempotent
        b.send(dhcp(1, 8))            # after close: dropped, no crash
    assert _fds() == before
    assert threading.active_count() == threads
