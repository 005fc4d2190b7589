"""kvmpy.net.tap: a tap device this test creates (and that vanishes on close), seen from the host
through an AF_PACKET socket bound to it. Skipped where tap devices cannot be created."""
from __future__ import annotations

import fcntl
import os
import socket
import struct
import threading
import time

import pytest

from kvmpy.errors import KvmpyError
from kvmpy.net import tap as tapmod
from kvmpy.net.tap import TapBackend
from test_net_frames import GUEST_MAC, Guest

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
ETH_P_ALL = 0x0003
ETYPE = 0x88B5                     # IEEE 802 local experimental ethertype
HOST_MAC = bytes.fromhex("02aabbccddee")


def _name() -> str:
    return f"kvmpyt{os.getpid() % 100000}"


def _set_up(name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", name.encode(), 0))
        flags = struct.unpack("16sH22x", ifr)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), flags | IFF_UP))


@pytest.fixture
def tap():
    try:
        b = TapBackend(_name())
    except KvmpyError as e:
        pytest.skip(str(e))
    try:
        _set_up(b.name)
        yield b
    finally:
        b.close()


@pytest.fixture
def packet_sock(tap):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((tap.name, ETH_P_ALL))
    s.settimeout(5)
    yield s
    s.close()


def _frame(payload: bytes, dst: bytes = HOST_MAC, src: bytes = GUEST_MAC) -> bytes:
    return (dst + src + struct.pack("!H", ETYPE) + payload).ljust(60, b"\0")


def _recv_ours(s: socket.socket, payload: bytes) -> bytes:
    end = time.monotonic() + 5
    while time.monotonic() < end:
        data = s.recv(65536)
        if data[12:14] == struct.pack("!H", ETYPE) and payload in data:
            return data
    raise AssertionError("frame not seen on the tap")


def test_guest_frame_reaches_the_host_interface(tap, packet_sock):
    assert tap.name == _name() and os.path.exists(f"/sys/class/net/{tap.name}")
    flags = os.get_blocking(tap.fd), os.get_inheritable(tap.fd)
    assert flags == (False, False)            # O_NONBLOCK, O_CLOEXEC
    frame = _frame(b"guest->host")
    tap.send(frame)
    assert _recv_ours(packet_sock, b"guest->host") == frame
    assert tap.tx_frames == 1


def test_host_frame_reaches_the_receiver_with_backpressure(tap, packet_sock):
    g = Guest(tap)
    tap.run_in_thread()
    packet_sock.send(_frame(b"host->guest 1", dst=GUEST_MAC, src=HOST_MAC))
    f = g.expect(lambda f: f.etype == ETYPE and b"host->guest 1" in f.raw, what="tap frame")
    assert f.dst == GUEST_MAC

    g.accept = False                          # the guest has no receive buffer
    packet_sock.send(_frame(b"host->guest 2", dst=GUEST_MAC, src=HOST_MAC))
    end = time.monotonic() + 5
    while not tap.paused and time.monotonic() < end:
        time.sleep(0.01)
    assert tap.paused and not tap._watching
    packet_sock.send(_frame(b"host->guest 3", dst=GUEST_MAC, src=HOST_MAC))
    time.sleep(0.1)
    assert len(tap._rxq) == 1                 # frame 3 waits in the kernel, not in Python
    g.accept = True
    tap.rx_ready()
    for n in (2, 3):
        g.expect(lambda f, n=n: f.etype == ETYPE and f"host->guest {n}".encode() in f.raw,
                 what=f"held frame {n}")
    end = time.monotonic() + 5
    while (tap.paused or not tap._watching) and time.monotonic() < end:
        time.sleep(0.01)
    assert not tap.paused and tap._watching


def test_close_removes_the_device_and_fds():
    before, threads = set(os.listdir("/proc/self/fd")), threading.active_count()
    try:
        b = TapBackend(_name())
    except KvmpyError as e:
        pytest.skip(str(e))
    b.run_in_thread()
    b.close()
    b.close()
    b.send(b"\0" * 60)                        # after close: dropped
    assert not os.path.exists(f"/sys/class/net/{_name()}")
    assert set(os.listdir("/proc/self/fd")) == before
    assert threading.active_count() == threads


def test_errors_are_one_line(monkeypatch):
    with pytest.raises(KvmpyError, match="1 to 15 characters"):
        TapBackend("x" * 16)
    monkeypatch.setattr(tapmod, "TUN_PATH", "/nonexistent/net/tun")
    with pytest.raises(KvmpyError) as e:
        TapBackend("kvmpyt0")
    assert "does not exist" in str(e.value) and "\n" not in str(e.value)


def test_permission_denied_is_one_line():
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root to drop privileges")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                              # child: an unprivileged user without caps
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                TapBackend("kvmpyt-denied")
                msg = "no error"
            except KvmpyError as e:
                msg = str(e)
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    os.waitpid(pid, 0)
    assert "permission denied" in msg and "\n" not in msg, msg
