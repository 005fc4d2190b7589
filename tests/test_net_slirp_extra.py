"""kvmpy.net.slirp beyond the basics of test_net_slirp.py: review regressions (fd reuse, send
cost with many sockets) and the cap on host sockets a guest can make slirp open."""
import os
import socket
import struct
import time

import pytest

from kvmpy.errors import KvmpyError

try:
    from kvmpy.net import slirp as _slirp
    _slirp.load()
except KvmpyError as e:   # pragma: no cover - depends on the machine
    pytest.skip(str(e), allow_module_level=True)

from kvmpy.net.slirp import SlirpBackend, _new_flow
from test_net_frames import (ETH_IP, GUEST_IP, GUEST_MAC, HOST_IP, TCP_ACK, TCP_RST, TCP_SYN,
                             Frame, Guest, csum, eth, ip4, ipv4, tcp, udp)

SLIRP_MAC = bytes.fromhex("52550a000202")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_reused_fd_number_is_watched_again():
    # libslirp calls unregister_poll_fd just before closesocket(); a socket it opens later may
    # get the same number and ask for the same events, and must still reach the epoll set.
    b = SlirpBackend(hostfwd=[("tcp", "127.0.0.1", _free_port(), 80)])
    a, c = socket.socketpair()
    try:
        (fd, _), = b._registered.items()          # the hostfwd listener
        with b._lock:
            b._cb_unregister_poll_fd(fd, None)    # what slirp does before it closes fd
            os.dup2(a.fileno(), fd)               # "close + socket()" landing on the same number
            b._refill()
        c.send(b"x")
        assert fd in {f for f, _ in b._epoll.poll(1.0) if f != b._timerfd}
    finally:
        b.close()
        a.close()
        c.close()


def test_send_cost_does_not_grow_with_open_sockets():
    # As in a VM, frames are sent from the thread that also serves the backend (the net
    # device's I/O thread): a batch of sends, then one service pass (the poll-set refill that
    # costs O(sockets), once per wakeup). A ratio within one run, not an absolute time: a frame
    # with 2000 flows open against one with a single flow. Work per open socket and frame (a
    # refill per send) would make it hundreds of times larger.
    with SlirpBackend(max_sockets=4000) as b:
        Guest(b)
        (fd, serve), = b.fds()
        frame = lambda p: eth(SLIRP_MAC, GUEST_MAC, ETH_IP,  # noqa: E731
                              udp(GUEST_IP, HOST_IP, p, 9, b"x"))

        def per_frame(n=500):
            t = time.monotonic()
            for _ in range(n):
                b.send(frame(10000))
            serve()
            return (time.monotonic() - t) / n
        b.send(frame(10000))
        serve()
        alone = min(per_frame() for _ in range(3))
        for p in range(1, 2000):                  # 2000 guest UDP flows = 2000 host sockets
            b.send(frame(10000 + p))
        serve()
        assert len(b._sockets) >= 2000
        loaded = min(per_frame() for _ in range(3))
        assert loaded < 5 * alone, f"{loaded * 1e6:.0f} us per frame, {alone * 1e6:.0f} alone"

def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _frames(g: Guest) -> list[Frame]:
    out = []
    while not g.frames.empty():
        out.append(g.frames.get())
    return out


def test_a_guest_cannot_make_slirp_open_more_than_max_sockets():
    # hostile guest: thousands of flows would each cost the VMM a host fd. With the cap full,
    # new flows are refused (a TCP SYN gets a RST at once), flows that have a socket go on.
    dgram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dgram.bind(("127.0.0.1", 0))
    dgram.settimeout(5)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    uport, tport = dgram.getsockname()[1], listener.getsockname()[1]
    try:
        with SlirpBackend(max_sockets=20) as b:
            g = Guest(b)
            (_, serve), = b.fds()
            base = _open_fds()
            for p in range(15):                 # 15 UDP flows: 15 sockets
                b.send(eth(SLIRP_MAC, GUEST_MAC, ETH_IP,
                           udp(GUEST_IP, HOST_IP, 20000 + p, uport, b"u%d" % p)))
            syn_seq = {}
            for p in range(15):                 # 15 connections: 5 fit, 10 refused
                syn_seq[30000 + p] = 1000 + p
                b.send(eth(SLIRP_MAC, GUEST_MAC, ETH_IP,
                           tcp(GUEST_IP, HOST_IP, 30000 + p, tport, 1000 + p, 0, TCP_SYN)))
            serve()
            assert _open_fds() - base == 20 == len(b._sockets)
            assert b.flows_refused == 10
            for p in range(15, 40):             # more UDP flows: all refused, no sockets
                b.send(eth(SLIRP_MAC, GUEST_MAC, ETH_IP,
                           udp(GUEST_IP, HOST_IP, 20000 + p, uport, b"late")))
            b.send(eth(SLIRP_MAC, GUEST_MAC, ETH_IP,                 # an existing flow: passes
                       udp(GUEST_IP, HOST_IP, 20003, uport, b"again")))
            serve()
            assert _open_fds() - base == 20
            assert b.flows_refused == 35
            got = {}
            while len(got) < 16:
                data, (_, port) = dgram.recvfrom(100)
                got.setdefault(data, port)
            assert b"late" not in got and got[b"again"] == got[b"u3"]
            time.sleep(0.2)
            serve()
            resets = [f for f in _frames(g) if f.proto == 6 and f.flags & TCP_RST]
            assert len(resets) == 10
            for f in resets:
                ip = f.payload[:20]
                assert csum(ip) == 0
                pseudo = ip4(f.ip_src) + ip4(f.ip_dst) + struct.pack("!BBH", 0, 6, len(f.l4))
                assert csum(pseudo + f.l4) == 0
                assert (f.ip_src, f.ip_dst, f.sport, f.dst, f.src) == \
                    (HOST_IP, GUEST_IP, tport, GUEST_MAC, SLIRP_MAC)
                assert f.flags == TCP_RST | TCP_ACK and f.ack == syn_seq.pop(f.dport) + 1
    finally:
        dgram.close()
        listener.close()


def test_a_closed_socket_frees_its_place():
    # a SYN to a closed host port: slirp's connect fails, it answers RST and closes the socket,
    # which must leave the count (or a guest would fill the cap with dead connections).
    with SlirpBackend(max_sockets=2) as b:
        Guest(b)
        (_, serve), = b.fds()
        b.send(eth(SLIRP_MAC, GUEST_MAC, ETH_IP, udp(GUEST_IP, HOST_IP, 20000, 9, b"x")))
        b.send(eth(SLIRP_MAC, GUEST_MAC, ETH_IP,
                   tcp(GUEST_IP, HOST_IP, 30000, _free_port(), 1, 0, TCP_SYN)))
        assert len(b._sockets) == 2
        end = time.monotonic() + 5
        while len(b._sockets) > 1 and time.monotonic() < end:
            serve()
            time.sleep(0.01)
        assert len(b._sockets) == 1
        b.send(eth(SLIRP_MAC, GUEST_MAC, ETH_IP, udp(GUEST_IP, HOST_IP, 20001, 9, b"y")))
        assert len(b._sockets) == 2 and b.flows_refused == 0


def test_which_frames_can_open_a_socket():
    def icmp(kind):
        body = bytes([kind, 0, 0, 0, 0, 1, 0, 1]) + b"ping"
        body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
        return eth(SLIRP_MAC, GUEST_MAC, ETH_IP, ipv4(GUEST_IP, "192.0.2.1", 1, body))

    syn = tcp(GUEST_IP, HOST_IP, 1234, 80, 1, 0, TCP_SYN)
    assert _new_flow(eth(SLIRP_MAC, GUEST_MAC, ETH_IP, syn))[0] == 6
    assert _new_flow(eth(SLIRP_MAC, GUEST_MAC, ETH_IP,
                         tcp(GUEST_IP, HOST_IP, 1234, 80, 1, 1, TCP_SYN | TCP_ACK))) is None
    assert _new_flow(eth(SLIRP_MAC, GUEST_MAC, ETH_IP,
                         tcp(GUEST_IP, HOST_IP, 1234, 80, 1, 1, TCP_ACK))) is None
    assert _new_flow(eth(SLIRP_MAC, GUEST_MAC, ETH_IP, udp(GUEST_IP, HOST_IP, 68, 67, b"")))\
        is None                                   # DHCP: slirp answers, no socket
    assert _new_flow(icmp(8))[0] == 1             # echo request: a socket each
    assert _new_flow(icmp(0)) is None             # echo reply
    later = bytearray(eth(SLIRP_MAC, GUEST_MAC, ETH_IP, syn))
    later[20:22] = b"\x00\x10"                   # fragment offset 16: no TCP header
    assert _new_flow(bytes(later)) is None
    assert _new_flow(eth(SLIRP_MAC, GUEST_MAC, 0x0806, b"\0" * 28)) is None
    for n in range(0, 60):                        # truncated frames never raise
        _new_flow(eth(SLIRP_MAC, GUEST_MAC, ETH_IP, syn)[:n])


def test_a_flow_opened_before_the_first_poll_lives():
    # libslirp's clock is a process-wide global set only by slirp_pollfds_poll: a UDP socket
    # opened before any poll in the process expired at once. Needs a fresh process.
    import subprocess
    import sys
    code = (
        "from kvmpy.net.slirp import SlirpBackend\n"
        "from test_net_frames import ETH_IP, GUEST_IP, GUEST_MAC, HOST_IP, Guest, eth, udp\n"
        "b = SlirpBackend(); Guest(b); (_, serve), = b.fds()\n"
        "b.send(eth(bytes.fromhex('52550a000202'), GUEST_MAC, ETH_IP,"
        " udp(GUEST_IP, HOST_IP, 20000, 9, b'x')))\n"
        "serve(); serve(); print(len(b._sockets)); b.close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(__file__), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1"]
