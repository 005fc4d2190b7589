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
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 16384           # 2000 sockets within the backend's cap, a quarter of the soft limit
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {want}: cannot hold 2000 slirp sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        _send_cost_with_open_sockets()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _send_cost_with_open_sockets():
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


LOCAL = (ip4(HOST_IP), ip4("10.0.2.3"))


def _icmp_echo(dst: str, kind: int = 8, ident: int = 1) -> bytes:
    body = bytes([kind, 0, 0, 0, 0, ident, 0, 1]) + b"ping"
    body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    return eth(SLIRP_MAC, GUEST_MAC, ETH_IP, ipv4(GUEST_IP, dst, 1, body))


def test_which_frames_can_open_a_socket():
    syn = tcp(GUEST_IP, HOST_IP, 1234, 80, 1, 0, TCP_SYN)
    assert _new_flow(eth(SLIRP_MAC, GUEST_MAC, ETH_IP, syn), LOCAL)[0] == 6
    assert _new_flow(eth(SLIRP_MAC, GUEST_MAC, ETH_IP,
                         tcp(GUEST_IP, HOST_IP, 1234, 80, 1, 1, TCP_SYN | TCP_ACK)), LOCAL) is None
    assert _new_flow(eth(SLIRP_MAC, GUEST_MAC, ETH_IP,
                         tcp(GUEST_IP, HOST_IP, 1234, 80, 1, 1, TCP_ACK)), LOCAL) is None
    for dst in (HOST_IP, "255.255.255.255"):      # DHCP: slirp answers, no socket
        assert _new_flow(eth(SLIRP_MAC, GUEST_MAC, ETH_IP, udp(GUEST_IP, dst, 68, 67, b"")),
                         LOCAL) is None
    assert _new_flow(eth(SLIRP_MAC, GUEST_MAC, ETH_IP, udp(GUEST_IP, "192.0.2.1", 68, 67, b"")),
                     LOCAL)[0] == 17              # port 67 elsewhere: an ordinary socket
    assert _new_flow(_icmp_echo("192.0.2.1"), LOCAL)[0] == 1     # echo out: a socket each
    assert _new_flow(_icmp_echo(HOST_IP), LOCAL) is None          # slirp answers these
    assert _new_flow(_icmp_echo("10.0.2.3"), LOCAL) is None
    assert _new_flow(_icmp_echo("192.0.2.1", kind=0), LOCAL) is None   # echo reply
    assert _new_flow(eth(SLIRP_MAC, GUEST_MAC, 0x0806, b"\0" * 28), LOCAL) is None
    for n in range(0, 60):                        # truncated frames never raise
        _new_flow(eth(SLIRP_MAC, GUEST_MAC, ETH_IP, syn)[:n], LOCAL)


def test_repeated_pings_and_port_67_elsewhere_are_capped_too():
    with SlirpBackend(max_sockets=5) as b:
        g = Guest(b)
        (_, serve), = b.fds()
        base = _open_fds()
        for _ in range(20):                       # the same echo: a new socket each time
            b.send(_icmp_echo("192.0.2.1"))
        for p in range(20):
            b.send(eth(SLIRP_MAC, GUEST_MAC, ETH_IP,
                       udp(GUEST_IP, "192.0.2.1", 3000 + p, 67, b"x")))
        serve()
        assert len(b._sockets) <= 5 and _open_fds() - base <= 5
        refused = b.flows_refused
        assert refused >= 35
        _frames(g)
        b.send(_icmp_echo(HOST_IP, ident=9))      # the gateway still answers pings at the cap
        time.sleep(0.1)
        serve()
        assert b.flows_refused == refused
        assert any(f.proto == 1 and f.payload[20] == 0 for f in _frames(g))   # echo reply


def test_the_refusal_acks_the_whole_syn_and_comes_from_slirps_mac():
    from kvmpy.net.slirp import _tcp_refusal
    mac = bytes.fromhex("52550a000202")
    raw = eth(b"\xff" * 6, GUEST_MAC, ETH_IP,                       # sent to a broadcast MAC
              tcp(GUEST_IP, "192.0.2.1", 4000, 80, 0xFFFFFFF0, 0, TCP_SYN | 1, b"data"))
    f = Frame(_tcp_refusal(raw, mac))
    assert (f.src, f.dst, f.flags) == (mac, GUEST_MAC, TCP_RST | TCP_ACK)
    assert f.ack == (0xFFFFFFF0 + 4 + 1 + 1) & 0xFFFFFFFF        # data + SYN + FIN, wrapping
    assert (f.ip_src, f.ip_dst, f.sport, f.dport) == ("192.0.2.1", GUEST_IP, 80, 4000)


FRAGMENT_CRASHES = [                 # (offset in 8-byte units, more fragments), datagrams
    ([(2, False)], 0),               # a lone last fragment: SIGBUS in libslirp 4.7
    ([(0, False), (2, False)], 0),   # ... after an unfragmented datagram: SIGSEGV
    ([(0, True), (2, False), (2, False)], 1),   # the last fragment again after completion
    ([(2, False), (0, True)], 1),    # last before first (SIGBUS)
]


@pytest.mark.parametrize("seq, datagrams", FRAGMENT_CRASHES)
def test_fragments_that_crash_libslirp_never_reach_it(seq, datagrams):
    # In a fresh process: if one reached libslirp, the process would die of a signal.
    import subprocess
    import sys
    code = (
        "import struct\n"
        "from kvmpy.net.slirp import SlirpBackend\n"
        "from test_net_frames import ETH_IP, GUEST_IP, GUEST_MAC, HOST_IP, Guest, eth, ip4, csum\n"
        "def frag(off, mf, payload):\n"
        "    hdr = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(payload), 7,\n"
        "                      (0x2000 if mf else 0) | off, 64, 17, 0, ip4(GUEST_IP), ip4(HOST_IP))\n"
        "    hdr = hdr[:10] + struct.pack('!H', csum(hdr)) + hdr[12:]\n"
        "    return eth(bytes.fromhex('52550a000202'), GUEST_MAC, ETH_IP, hdr + payload)\n"
        "b = SlirpBackend(); Guest(b); (_, serve), = b.fds()\n"
        f"for off, mf in {seq!r}:\n"
        "    b.send(frag(off, mf, struct.pack('!HHHH', 20000, 9, 48, 0) + b'A' * 8)); serve()\n"
        "print(b._reasm.datagrams, b._reasm.pending); b.close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(__file__), timeout=60)
    assert out.returncode == 0, f"status {out.returncode}: {out.stderr[-500:]}"
    done, pending = map(int, out.stdout.split())
    assert done == datagrams and pending == (1 if datagrams == 0 or len(seq) == 3 else 0)


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


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_guest_frames_do_not_kill_the_vmm(seed):
    # tests/slirp_fuzz.py in its own process: libslirp crashing would end it with a signal
    import subprocess
    import sys
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__),
                                                       "slirp_fuzz.py"), str(seed), "4000"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"status {out.returncode}: {out.stderr[-800:]}"
    assert out.stdout.startswith(f"ok {seed} 4000")
