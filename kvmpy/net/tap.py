"""A tap device as a network backend: frames go to and come from the host kernel's interface.

``TapBackend(name)`` opens /dev/net/tun non-blocking and close-on-exec and attaches it to the
tap device ``name`` with TUNSETIFF (IFF_TAP | IFF_NO_PI: bare Ethernet frames, no packet-info
header), creating the device if it does not exist (that needs CAP_NET_ADMIN; a persistent tap
made by root with ``ip tuntap add NAME mode tap user USER`` can be attached by USER). A tap the
backend created disappears when it is closed. Configuring the host side (addresses, bridge,
``ip link set NAME up``) is left to the user.

Host -> guest: the tun fd sits in the backend's epoll set (kvmpy.net.base); when the guest has
no receive buffer the fd is taken out of the set and the kernel queues (and eventually drops)
frames until ``rx_ready()``. Guest -> host: a write per frame; a full or down interface drops
and counts (``tx_dropped``).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import struct

from ioctl_opt import IOW

from kvmpy.errors import KvmpyError
from kvmpy.net.base import RX_QUEUE_MAX, Backend

TUN_PATH = "/dev/net/tun"
TUNSETIFF = IOW(ord("T"), 202, ctypes.c_int)     # <linux/if_tun.h>
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")        # struct ifreq: name + ifr_flags, 40 bytes
READ_SIZE = 65536 + 14
BUDGET = 64                                      # frames per callback before yielding


class TapBackend(Backend):
    def __init__(self, name: str, rx_queue_max: int = RX_QUEUE_MAX):
        raw = name.encode() if isinstance(name, str) else b""
        if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or any(c <= 32 for c in raw):
            raise KvmpyError(f"tap {name!r}: a network interface name is 1 to 15 characters, "
                             "without '/' or spaces")
        super().__init__(rx_queue_max)
        self.fd = -1
        try:
            try:
                self.fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                raise KvmpyError(f"tap {name}: {TUN_PATH} does not exist: load the tun "
                                 "module (modprobe tun) or create the node "
                                 "(mknod /dev/net/tun c 10 200)") from None
            except PermissionError:
                raise KvmpyError(f"tap {name}: {TUN_PATH}: permission denied: run as root, "
                                 "or give your user access to /dev/net/tun") from None
            except OSError as e:
                raise KvmpyError(f"tap {name}: cannot open {TUN_PATH}: {e.strerror}") from None
            try:
                out = fcntl.ioctl(self.fd, TUNSETIFF, IFREQ.pack(raw, IFF_TAP | IFF_NO_PI))
            except OSError as e:
                raise KvmpyError(_setiff_error(name, e)) from None
            self.name = IFREQ.unpack(out)[0].rstrip(b"\0").decode()
            self._epoll.register(self.fd, select.EPOLLIN)
            self._watching = True
        except BaseException:
            self.close()
            raise

    def send(self, frame: bytes) -> None:
        if self._closed or self.fd < 0 or len(frame) < 14:
            self.tx_dropped += 1
            return
        try:
            os.write(self.fd, frame)
        except OSError:   # EAGAIN: the kernel's queue is full; EIO: the interface is down
            self.tx_dropped += 1
        else:
            self.tx_frames += 1

    def _service(self) -> bool:
        for _ in range(BUDGET):
            if self.paused or self._closed:
                return False
            try:
                frame = os.read(self.fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as e:
                self._error(f"read {self.name}: {e.strerror}")
                return False
            if not frame:
                return False
            self._enqueue(frame)
            self._deliver()
        return True     # more may be waiting: the I/O thread calls again after the others

    def _paused_changed(self) -> None:
        want = not self.paused
        if want != self._watching and not self._closed:
            self._epoll.modify(self.fd, select.EPOLLIN if want else 0)
            self._watching = want

    def close(self) -> None:
        if self._closed and self.fd < 0:
            return
        self._closed = True
        self._stop_runner()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._close_base()


def _setiff_error(name: str, e: OSError) -> str:
    if e.errno == errno.EPERM or e.errno == errno.EACCES:
        return (f"tap {name}: permission denied: creating a tap device needs CAP_NET_ADMIN "
                f"(run as root, or have root create it: ip tuntap add {name} mode tap "
                "user $USER)")
    if e.errno == errno.EBUSY:
        return f"tap {name}: busy: another process has it open (or it is not a tap device)"
    if e.errno == errno.EINVAL:
        return f"tap {name}: exists but is not a tap device (it may be a tun device)"
    return f"tap {name}: TUNSETIFF failed: {errno.errorcode.get(e.errno, e.errno)} ({e.strerror})"
