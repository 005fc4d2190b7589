"""Proposed additions to tests/test_net_slirp.py (regressions for two findings in review)."""
import os
import socket
import time

from kvmpy.net.slirp import SlirpBackend
from test_net_frames import ETH_IP, GUEST_IP, GUEST_MAC, HOST_IP, Guest, eth, udp

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
    with SlirpBackend() as b:
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
        loaded = min(per_frame() for _ in range(3))
        assert loaded < 5 * alone, f"{loaded * 1e6:.0f} us per frame, {alone * 1e6:.0f} alone"