"""User-mode networking through libslirp, as QEMU's ``-netdev user``.

The guest sees 10.0.2.0/24: the host (gateway) is 10.0.2.2, the DNS forwarder 10.0.2.3, DHCP
hands out 10.0.2.15 onwards. TCP/UDP the guest sends to 10.0.2.2 reaches the host's 127.0.0.1;
other addresses are reached through ordinary host sockets. ``hostfwd`` forwards host ports to
guest ports. No root needed.

cffi in ABI mode (``ffi.dlopen("libslirp.so.0")``): the cdef below is transcribed from
``<slirp/libslirp.h>`` of libslirp 4.7.0 (Debian bookworm's libslirp-dev), whose structs are
append-only: SlirpConfig carries a version (we fill version 1, which every libslirp 4.x reads)
and SlirpCb is read only as far as that version says.

libslirp is not thread-safe: every call into it is made under ``self._lock``; its callbacks run
inside those calls. Its file descriptors change as connections come and go, so after every call
that may change them the backend runs ``slirp_pollfds_fill`` and mirrors the result (with
POLLOUT where slirp wants it) in its private epoll set; slirp's timeouts and its timers (kept
in Python) arm a timerfd in the same set. The I/O thread therefore needs only ``add_reader``.

The guest is hostile, and libslirp opens a host socket for every flow the guest starts (a UDP
source port, a TCP SYN, each ICMP echo to the outside) with no limit of its own: a guest could
use up the VMM's file descriptors (and with them every later open, eventfd or accept of the
process). The backend counts slirp's sockets exactly (libslirp announces each one through
``register_poll_fd`` and each close through ``unregister_poll_fd``) and, while ``max_sockets``
are open, refuses frames that would open another: a new TCP connection gets a RST (the guest
sees "connection refused" at once instead of retrying for minutes), a UDP datagram from a new
source port and an ICMP echo to the outside are dropped. Flows that already have a socket keep
working; what slirp answers itself (DHCP, pings of the gateway and the DNS address) is never
refused. Counted in ``flows_refused``. A UDP socket lives 240 s after its last datagram, so a
guest that sends from many random source ports (some QUIC or DNS clients) can meet the cap.

IPv4 fragments from the guest never reach libslirp: its reassembly crashes the process
(SIGBUS/SIGSEGV in libslirp 4.7) on a last fragment that arrives with no fragment of its
datagram queued. kvmpy.net.ipfrag reassembles them and libslirp gets each datagram whole
(``fragments_dropped`` counts what that refused: overlaps, timeouts, malformed ones).
"""
from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time

from cffi import FFI

from kvmpy.errors import KvmpyError
from kvmpy.net.base import RX_QUEUE_MAX, Backend, _drain
from kvmpy.net.ipfrag import Reassembler, internet_checksum, is_fragment

CDEF = r"""
/* <netinet/in.h>, glibc x86-64/aarch64 layout */
struct in_addr { uint32_t s_addr; };
struct in6_addr {
    union { uint8_t __u6_addr8[16]; uint16_t __u6_addr16[8]; uint32_t __u6_addr32[4]; } __in6_u;
};
struct sockaddr_in;
struct sockaddr_in6;

/* <slirp/libslirp.h> 4.7.0 */
typedef struct Slirp Slirp;
enum {
    SLIRP_POLL_IN = 1,
    SLIRP_POLL_OUT = 2,
    SLIRP_POLL_PRI = 4,
    SLIRP_POLL_ERR = 8,
    SLIRP_POLL_HUP = 16,
};
typedef ssize_t (*SlirpReadCb)(void *buf, size_t len, void *opaque);
typedef ssize_t (*SlirpWriteCb)(const void *buf, size_t len, void *opaque);
typedef void (*SlirpTimerCb)(void *opaque);
typedef int (*SlirpAddPollCb)(int fd, int events, void *opaque);
typedef int (*SlirpGetREventsCb)(int idx, void *opaque);
typedef enum SlirpTimerId { SLIRP_TIMER_RA, SLIRP_TIMER_NUM } SlirpTimerId;

typedef struct SlirpCb {
    SlirpWriteCb send_packet;
    void (*guest_error)(const char *msg, void *opaque);
    int64_t (*clock_get_ns)(void *opaque);
    void *(*timer_new)(SlirpTimerCb cb, void *cb_opaque, void *opaque);
    void (*timer_free)(void *timer, void *opaque);
    void (*timer_mod)(void *timer, int64_t expire_time, void *opaque);
    void (*register_poll_fd)(int fd, void *opaque);
    void (*unregister_poll_fd)(int fd, void *opaque);
    void (*notify)(void *opaque);
    /* SlirpConfig version 4 */
    void (*init_completed)(Slirp *slirp, void *opaque);
    void *(*timer_new_opaque)(SlirpTimerId id, void *cb_opaque, void *opaque);
} SlirpCb;

typedef struct SlirpConfig {
    uint32_t version;
    /* version 1 */
    int restricted;
    bool in_enabled;
    struct in_addr vnetwork;
    struct in_addr vnetmask;
    struct in_addr vhost;
    bool in6_enabled;
    struct in6_addr vprefix_addr6;
    uint8_t vprefix_len;
    struct in6_addr vhost6;
    const char *vhostname;
    const char *tftp_server_name;
    const char *tftp_path;
    const char *bootfile;
    struct in_addr vdhcp_start;
    struct in_addr vnameserver;
    struct in6_addr vnameserver6;
    const char **vdnssearch;
    const char *vdomainname;
    size_t if_mtu;
    size_t if_mru;
    bool disable_host_loopback;
    bool enable_emu;
    /* version 2 */
    struct sockaddr_in *outbound_addr;
    struct sockaddr_in6 *outbound_addr6;
    /* version 3 */
    bool disable_dns;
    /* version 4 */
    bool disable_dhcp;
} SlirpConfig;

Slirp *slirp_new(const SlirpConfig *cfg, const SlirpCb *callbacks, void *opaque);
void slirp_cleanup(Slirp *slirp);
void slirp_pollfds_fill(Slirp *slirp, uint32_t *timeout, SlirpAddPollCb add_poll, void *opaque);
void slirp_pollfds_poll(Slirp *slirp, int select_error, SlirpGetREventsCb get_revents,
                        void *opaque);
void slirp_input(Slirp *slirp, const uint8_t *pkt, int pkt_len);
int slirp_add_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port,
                      struct in_addr guest_addr, int guest_port);
int slirp_remove_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port);
const char *slirp_version_string(void);

/* libc: a timerfd for slirp's timeouts (os.timerfd_* is Python 3.13+) */
struct timespec { long tv_sec; long tv_nsec; };
struct itimerspec { struct timespec it_interval; struct timespec it_value; };
int timerfd_create(int clockid, int flags);
int timerfd_settime(int fd, int flags, const struct itimerspec *new_value,
                    struct itimerspec *old_value);
"""

CONFIG_VERSION = 1
CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
MAX_FRAME = 65536 + 14
# Host sockets one guest network may hold open through slirp. QEMU and libslirp have no limit;
# 512 is far above what a guest's normal traffic holds at once. Never more than a quarter of
# the process's soft RLIMIT_NOFILE (with the usual 1024: 256), which the rest of the VMM and
# any other --net user share.
MAX_SOCKETS = 512

ETH_P_IP = 0x0800                # IEEE 802 ethertype of IPv4
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
TCP_SYN, TCP_RST, TCP_ACK = 0x02, 0x04, 0x10    # RFC 9293 3.1 control bits
BOOTP_SERVER_PORT = 67           # RFC 951: slirp answers DHCP itself, no socket
ICMP_ECHO = 8                    # RFC 792
TCP_FIN = 0x01                   # RFC 9293 3.1
BROADCAST_IP = b"\xff\xff\xff\xff"

ffi = FFI()
ffi.cdef(CDEF)
_lib = None
_libc = None
_load_lock = threading.Lock()

_SLIRP_TO_POLL = ((1, select.POLLIN), (2, select.POLLOUT), (4, select.POLLPRI),
                  (8, select.POLLERR), (16, select.POLLHUP))


def load():
    """The libslirp library (loaded once), or a one-line KvmpyError saying what to install."""
    global _lib, _libc
    with _load_lock:
        if _lib is None:
            try:
                lib = ffi.dlopen("libslirp.so.0")
            except OSError:
                raise KvmpyError("user networking needs libslirp (libslirp.so.0 not found): "
                                 "install it, e.g. apt-get install libslirp0") from None
            _libc = ffi.dlopen(None)
            _lib = lib
    return _lib


def version() -> str:
    return ffi.string(load().slirp_version_string()).decode()


def _in_addr(ip: str):
    try:
        packed = socket.inet_aton(ip)
    except OSError:
        raise KvmpyError(f"user networking: {ip!r} is not an IPv4 address") from None
    a = ffi.new("struct in_addr *")
    a.s_addr = struct.unpack("=I", packed)[0]   # network byte order, as in memory
    return a[0]


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class SlirpBackend(Backend):
    """libslirp user networking; see the module docstring.

    ``hostfwd``: ``[(proto, host_addr, host_port, guest_port)]`` with proto "tcp" or "udp",
    forwarded to the guest's DHCP address (``dhcp_start``).
    """

    def __init__(self, hostfwd=(), net: str = "10.0.2.0", netmask: str = "255.255.255.0",
                 host: str = "10.0.2.2", dhcp_start: str = "10.0.2.15", dns: str = "10.0.2.3",
                 hostname: str | None = None, restricted: bool = False,
                 host_loopback: bool = True, mtu: int = 1500,
                 rx_queue_max: int = RX_QUEUE_MAX, max_sockets: int = MAX_SOCKETS):
        lib = load()
        super().__init__(rx_queue_max)
        self._lock = threading.RLock()
        self._lib = lib
        self._slirp = ffi.NULL
        self._timerfd = -1
        self._timers: dict[int, list] = {}        # id -> [cb, cb_opaque, expire_ms or None]
        self._next_timer = 1
        self._pollfds: list[tuple[int, int]] = []  # (fd, slirp events) of the last fill
        self._registered: dict[int, int] = {}     # fd -> epoll mask in our epoll set
        self._slirp_deadline: int | None = None   # ms: when slirp wants pollfds_poll again
        self._armed: int | None = None
        self._revents: list[int] = []
        self._registered_paused = False
        self.guest_errors: list[str] = []
        self.guest_error_count = 0
        self.max_sockets = max(1, min(int(max_sockets), _fd_budget()))
        self.flows_refused = 0
        self._reasm = Reassembler()
        # what slirp answers itself, without a socket: pings of these, DHCP to the first or
        # to the broadcast address (libslirp ip_icmp.c icmp_input, udp.c udp_input)
        self._local = (socket.inet_aton(host), socket.inet_aton(dns))
        self._mac = bytes.fromhex("5255") + socket.inet_aton(host)   # slirp's own MAC
        self._sockets: dict[int, tuple | None] = {}   # fd -> the guest flow that opened it
        self._flows: dict[tuple, int] = {}           # guest flow -> fd
        self._opening: tuple | None = None           # the flow of the frame slirp is reading
        try:
            self._timerfd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
            if self._timerfd < 0:
                raise OSError(ffi.errno, os.strerror(ffi.errno))
            self._epoll.register(self._timerfd, select.EPOLLIN)
            self._make_callbacks()
            self._keep = []                        # C strings the config points to
            cfg = ffi.new("SlirpConfig *")
            cfg.version = CONFIG_VERSION
            cfg.restricted = int(restricted)
            cfg.in_enabled = True
            cfg.vnetwork = _in_addr(net)
            cfg.vnetmask = _in_addr(netmask)
            cfg.vhost = _in_addr(host)
            cfg.in6_enabled = False
            cfg.vdhcp_start = _in_addr(dhcp_start)
            cfg.vnameserver = _in_addr(dns)
            if hostname:
                s = ffi.new("char[]", hostname.encode())
                self._keep.append(s)
                cfg.vhostname = s
            cfg.if_mtu = mtu
            cfg.if_mru = mtu
            cfg.disable_host_loopback = not host_loopback
            cfg.enable_emu = False
            self._cfg = cfg
            with self._lock:
                self._slirp = lib.slirp_new(cfg, self._cb, ffi.NULL)
                if self._slirp == ffi.NULL:
                    raise KvmpyError("user networking: libslirp refused its configuration "
                                     f"(net {net}/{netmask}, host {host}, dhcp {dhcp_start}, "
                                     f"dns {dns})")
                # libslirp reads its clock ("curtime") only in slirp_pollfds_poll, and a UDP
                # socket opened before the first poll expires 240 s after time 0, that is at
                # once: one poll with select_error set (timers only, no sockets) sets it.
                lib.slirp_pollfds_poll(self._slirp, 1, self._get_revents_cb, ffi.NULL)
                self.guest_addr = dhcp_start
                for fwd in hostfwd:
                    self.add_hostfwd(*fwd)
                self._refill()
        except BaseException:
            self.close()
            raise

    # -- callbacks (run inside libslirp calls, under self._lock) ---------------------------------
    def _make_callbacks(self) -> None:
        def onerror(exc, val, tb):
            self._error(f"callback: {getattr(exc, '__name__', exc)}: {val}")

        cb = ffi.new("SlirpCb *")
        self._callbacks = cbs = {
            "send_packet": ffi.callback("SlirpWriteCb", self._cb_send_packet, error=-1,
                                        onerror=onerror),
            "guest_error": ffi.callback("void(const char *, void *)", self._cb_guest_error,
                                        onerror=onerror),
            "clock_get_ns": ffi.callback("int64_t(void *)", self._cb_clock_get_ns,
                                         onerror=onerror),
            "timer_new": ffi.callback("void *(SlirpTimerCb, void *, void *)",
                                      self._cb_timer_new, onerror=onerror),
            "timer_free": ffi.callback("void(void *, void *)", self._cb_timer_free,
                                       onerror=onerror),
            "timer_mod": ffi.callback("void(void *, int64_t, void *)", self._cb_timer_mod,
                                      onerror=onerror),
            "register_poll_fd": ffi.callback("void(int, void *)", self._cb_poll_fd,
                                             onerror=onerror),
            "unregister_poll_fd": ffi.callback("void(int, void *)", self._cb_unregister_poll_fd,
                                               onerror=onerror),
            "notify": ffi.callback("void(void *)", self._cb_notify, onerror=onerror),
        }
        for name, fn in cbs.items():
            setattr(cb, name, fn)
        self._cb = cb
        self._add_poll_cb = ffi.callback("SlirpAddPollCb", self._cb_add_poll, error=-1,
                                         onerror=onerror)
        self._get_revents_cb = ffi.callback("SlirpGetREventsCb", self._cb_get_revents,
                                            error=0, onerror=onerror)

    def _cb_send_packet(self, buf, length, opaque):
        if length > MAX_FRAME:
            self.rx_dropped += 1
        else:
            self._enqueue(ffi.buffer(buf, length)[:])
        return length

    def _cb_guest_error(self, msg, opaque):
        self.guest_error_count += 1
        if len(self.guest_errors) < 16:
            self.guest_errors.append(ffi.string(msg).decode(errors="replace"))

    def _cb_clock_get_ns(self, opaque):
        return time.monotonic_ns()

    def _cb_timer_new(self, cb, cb_opaque, opaque):
        tid = self._next_timer
        self._next_timer += 1
        self._timers[tid] = [cb, cb_opaque, None]
        return ffi.cast("void *", tid)

    def _cb_timer_free(self, timer, opaque):
        self._timers.pop(int(ffi.cast("uintptr_t", timer)), None)

    def _cb_timer_mod(self, timer, expire_ms, opaque):
        t = self._timers.get(int(ffi.cast("uintptr_t", timer)))
        if t is not None:
            t[2] = int(expire_ms)

    def _cb_poll_fd(self, fd, opaque):
        # A new slirp socket. Which fds to poll comes from slirp_pollfds_fill; this only counts.
        old = self._sockets.get(fd)
        if old is not None:
            self._flows.pop(old, None)
        flow = self._opening
        self._sockets[fd] = flow
        if flow is not None:
            self._flows[flow] = fd

    def _cb_unregister_poll_fd(self, fd, opaque):
        # libslirp calls this just before it closes fd; forget it now, or a new socket that
        # gets the same number with the same mask would never be added to the epoll set.
        if fd in self._sockets:
            flow = self._sockets.pop(fd)
            if flow is not None and self._flows.get(flow) == fd:
                del self._flows[flow]
        if self._registered.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass

    def _cb_notify(self, opaque):
        self._wake()

    def _cb_add_poll(self, fd, events, opaque):
        self._pollfds.append((fd, events))
        return len(self._pollfds) - 1

    def _cb_get_revents(self, idx, opaque):
        if 0 <= idx < len(self._revents):
            return self._revents[idx]
        return 0

    @property
    def fragments_dropped(self) -> int:
        """Guest IPv4 fragments refused by the reassembly (kvmpy.net.ipfrag)."""
        return self._reasm.dropped

    # -- the interface -------------------------------------------------------------------------
    def send(self, frame: bytes) -> None:
        """Guest -> host: one Ethernet frame. Replies that slirp makes at once (ARP, DHCP) are
        queued and delivered from the I/O thread."""
        if self._closed or not 14 <= len(frame) <= MAX_FRAME:
            self.tx_dropped += 1
            return
        if is_fragment(frame):
            with self._lock:
                whole = self._reasm.add(frame)
            if whole is None:        # held until the rest comes, or refused (counted there)
                return
            frame = whole
        flow = _new_flow(frame, self._local)
        with self._lock:
            if self._slirp == ffi.NULL:
                self.tx_dropped += 1
                return
            # An ICMP echo is never an existing flow: libslirp opens a socket for each one.
            if flow is not None and (flow[0] == IPPROTO_ICMP or flow not in self._flows):
                if len(self._sockets) >= self.max_sockets:
                    self.flows_refused += 1
                    self.tx_dropped += 1
                    if flow[0] == IPPROTO_TCP and _unicast(frame[30:34]):
                        self._enqueue(_tcp_refusal(frame, self._mac))
                        self._wake()
                    return
                self._opening = flow
            try:
                self._lib.slirp_input(self._slirp, frame, len(frame))
            finally:
                self._opening = None
            self.tx_frames += 1
        # The I/O thread refills the poll set (sockets this frame opened) and delivers replies
        # once per wakeup, not once per frame: slirp_pollfds_fill costs O(sockets).
        self._wake()

    def add_hostfwd(self, proto: str, host_addr: str, host_port: int, guest_port: int,
                    guest_addr: str | None = None) -> None:
        if proto not in ("tcp", "udp"):
            raise KvmpyError(f"hostfwd: protocol must be tcp or udp, not {proto!r}")
        with self._lock:
            rc = self._lib.slirp_add_hostfwd(self._slirp, int(proto == "udp"),
                                             _in_addr(host_addr or "0.0.0.0"), int(host_port),
                                             _in_addr(guest_addr or self.guest_addr),
                                             int(guest_port))
            if rc < 0:
                raise KvmpyError(f"hostfwd {proto} {host_addr}:{host_port} -> guest port "
                                 f"{guest_port}: cannot listen there (port in use, or not a "
                                 "local address?)")
            self._refill()

    def timeout(self) -> float | None:
        with self._lock:
            d = self._deadline()
        return None if d is None else max(0.0, (d - _now_ms()) / 1000)

    def close(self) -> None:
        if getattr(self, "_closing", False):
            return
        self._closing = True
        self._closed = True
        self._stop_runner()
        with self._lock:
            if self._slirp != ffi.NULL:
                self._lib.slirp_cleanup(self._slirp)    # closes its sockets, frees timers
                self._slirp = ffi.NULL
            self._timers.clear()
            self._registered.clear()
            self._sockets.clear()
            self._flows.clear()
            self._pollfds = []
            if self._timerfd >= 0:
                os.close(self._timerfd)
                self._timerfd = -1
        self._close_base()

    # -- the loop ------------------------------------------------------------------------------
    def _service(self) -> bool:
        with self._lock:
            if self._slirp == ffi.NULL:
                return False
            _drain(self._timerfd)
            self._armed = None
            now = _now_ms()
            for t in list(self._timers.values()):
                if t[2] is not None and t[2] <= now:
                    t[2] = None
                    t[0](t[1])
            if self._pollfds and not self.paused:
                p = select.poll()
                for fd, ev in self._pollfds:
                    p.register(fd, _to_poll(ev))
                ready = dict(p.poll(0))
                self._revents = [_from_poll(ready.get(fd, 0)) for fd, _ in self._pollfds]
            else:
                self._revents = [0] * len(self._pollfds)   # paused: timeouts only, no I/O
            self._lib.slirp_pollfds_poll(self._slirp, 0, self._get_revents_cb, ffi.NULL)
            self._revents = []
            self._refill()
        return False

    def _paused_changed(self) -> None:
        with self._lock:
            if self._slirp != ffi.NULL and self._registered_paused != self.paused:
                self._sync_epoll()

    def _refill(self) -> None:
        """Ask slirp which fds it wants polled and when; mirror that in the epoll set."""
        self._pollfds = []
        timeout = ffi.new("uint32_t *", 0xFFFFFFFF)
        self._lib.slirp_pollfds_fill(self._slirp, timeout, self._add_poll_cb, ffi.NULL)
        self._slirp_deadline = _now_ms() + min(int(timeout[0]), 1000)
        self._sync_epoll()
        self._arm()

    def _sync_epoll(self) -> None:
        want: dict[int, int] = {}
        if not self.paused:
            for fd, ev in self._pollfds:
                mask = ((select.EPOLLIN if ev & 1 else 0) | (select.EPOLLOUT if ev & 2 else 0)
                        | (select.EPOLLPRI if ev & 4 else 0))
                if mask:
                    want[fd] = want.get(fd, 0) | mask
        for fd in list(self._registered):
            if fd not in want:
                try:
                    self._epoll.unregister(fd)
                except OSError:          # closed by slirp already (and so gone from the set)
                    pass
                del self._registered[fd]
        for fd, mask in want.items():
            if self._registered.get(fd) == mask:
                continue
            try:
                self._epoll.modify(fd, mask)
            except FileNotFoundError:
                try:
                    self._epoll.register(fd, mask)
                except OSError as e:
                    self._error(f"epoll register fd {fd}: {e}")
                    continue
            except OSError as e:
                self._error(f"epoll modify fd {fd}: {e}")
                continue
            self._registered[fd] = mask
        self._registered_paused = self.paused

    def _deadline(self) -> int | None:
        ds = [t[2] for t in self._timers.values() if t[2] is not None]
        if self._slirp_deadline is not None:
            ds.append(self._slirp_deadline)
        return min(ds) if ds else None

    def _arm(self) -> None:
        d = self._deadline()
        if d == self._armed or self._timerfd < 0:
            return
        spec = ffi.new("struct itimerspec *")
        if d is not None:
            delay_ns = max(1, (d - _now_ms()) * 1_000_000)
            spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(delay_ns, 1_000_000_000)
        if _libc.timerfd_settime(self._timerfd, 0, spec, ffi.NULL) < 0:
            self._error(f"timerfd_settime: {os.strerror(ffi.errno)}")
        self._armed = d


def _fd_budget() -> int:
    """A quarter of the soft RLIMIT_NOFILE: the most sockets one slirp backend may hold."""
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_SOCKETS if soft == resource.RLIM_INFINITY else max(16, soft // 4)


def _unicast(ip: bytes) -> bool:
    return ip != BROADCAST_IP and not 224 <= ip[0] <= 239      # RFC 5771: 224/4 is multicast


def _new_flow(frame: bytes, local: tuple[bytes, bytes]) -> tuple | None:
    """The guest flow an unfragmented IPv4 frame may open a host socket for, or None for frames
    that never do (ARP, DHCP to slirp, pings of slirp's own addresses ``local``, TCP segments
    other than a SYN, ...). UDP flows are keyed by the guest's source address and port, as
    libslirp's udp_input looks its sockets up; TCP by the 4-tuple; ICMP echoes by their header
    (libslirp opens a socket for each echo, so the key only names it)."""
    if len(frame) < 34 or frame[12] != ETH_P_IP >> 8 or frame[13] != ETH_P_IP & 0xFF:
        return None
    ihl = (frame[14] & 0x0F) * 4
    if ihl < 20:
        return None
    proto, dst, l4 = frame[23], frame[30:34], 14 + ihl
    if proto == IPPROTO_TCP:
        if len(frame) < l4 + 14 or (frame[l4 + 13] & (TCP_SYN | TCP_ACK | TCP_RST)) != TCP_SYN:
            return None
        return (IPPROTO_TCP, frame[26:34], frame[l4:l4 + 4])
    if proto == IPPROTO_UDP:
        if len(frame) < l4 + 4:
            return None
        if (frame[l4 + 2:l4 + 4] == BOOTP_SERVER_PORT.to_bytes(2, "big")
                and (dst == local[0] or dst == BROADCAST_IP)):
            return None
        return (IPPROTO_UDP, frame[26:30], frame[l4:l4 + 2])
    if proto == IPPROTO_ICMP:
        if len(frame) < l4 + 1 or frame[l4] != ICMP_ECHO or dst in local:
            return None
        return (IPPROTO_ICMP, frame[26:34], frame[l4:l4 + 8])
    return None


def _tcp_refusal(syn: bytes, mac: bytes) -> bytes:
    """The RST|ACK a closed port answers a SYN with (RFC 9293 3.10.7.1: SEQ 0, ACK the SYN's
    sequence number plus its length, SYN and FIN counting one each), from the address the SYN
    went to and from slirp's MAC ``mac``."""
    ihl = (syn[14] & 0x0F) * 4
    l4 = 14 + ihl
    total = int.from_bytes(syn[16:18], "big")
    src, dst = syn[30:34], syn[26:30]
    sport, dport, seq = struct.unpack_from("!HHI", syn, l4)
    flags = syn[l4 + 13]
    seg_len = max(0, total - ihl - (syn[l4 + 12] >> 4) * 4) + (1 if flags & TCP_SYN else 0) \
        + (1 if flags & TCP_FIN else 0)
    tcp = struct.pack("!HHIIBBHHH", dport, sport, 0, (seq + seg_len) & 0xFFFFFFFF, 5 << 4,
                      TCP_RST | TCP_ACK, 0, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", internet_checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, IPPROTO_TCP, 0, src,
                     dst)
    ip = ip[:10] + struct.pack("!H", internet_checksum(ip)) + ip[12:]
    return syn[6:12] + mac + syn[12:14] + ip + tcp


def _to_poll(ev: int) -> int:
    return sum(p for s, p in _SLIRP_TO_POLL if ev & s)


def _from_poll(rev: int) -> int:
    return sum(s for s, p in _SLIRP_TO_POLL if rev & p)
