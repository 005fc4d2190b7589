"""What every host network backend shares: the bounded host -> guest queue and its wakeups.

A backend moves Ethernet frames. ``send(frame)`` is guest -> host. Host -> guest frames go to the
receiver the device installs with :meth:`set_receiver`; it returns False when the guest has posted
no receive buffer. The backend then keeps the frame (and later ones) in a bounded queue, stops
reading its host fds, and tries again when the device calls :meth:`rx_ready` (the guest posted
buffers). A full queue drops and counts (``rx_dropped``): memory stays bounded, and TCP recovers.

The I/O thread sees one fd per backend, a private epoll set (``fds()``): it holds an eventfd
for wakeups (rx_ready, frames queued from another thread) plus whatever the backend needs (host
sockets, a timerfd). Pausing is done by taking the host fds out of that set, so a paused backend
does not make the I/O thread spin on a readable fd it will not read.

Locking: the receiver is only ever called from :meth:`_deliver`, with no backend lock held but
``_rx_lock`` (which nothing else takes), so a device may hold its own lock while calling
``send()`` or ``rx_ready()``; ``rx_ready()`` only wakes the I/O thread, it never delivers.
"""
from __future__ import annotations

import os
import select
import sys
import threading
from collections import deque
from collections.abc import Callable

from kvmpy._sigint import sigint_deferred

RX_QUEUE_MAX = 256


class Backend:
    """Shared machinery; subclasses implement ``send``, ``_service`` and ``close``."""

    def __init__(self, rx_queue_max: int = RX_QUEUE_MAX):
        self.rx_queue_max = max(1, int(rx_queue_max))
        self.rx_frames = self.rx_dropped = self.tx_frames = self.tx_dropped = 0
        self.paused = False              # the guest had no RX buffer; host fds are not read
        self.errors = 0
        self._receiver: Callable[[bytes], bool] | None = None
        self._rxq: deque[bytes] = deque()
        self._qlock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._closed = False
        self._reported = False
        self._epoll = select.epoll()     # non-inheritable (O_CLOEXEC), as every fd Python makes
        try:
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            self._epoll.close()
            raise
        self._epoll.register(self._wake_fd, select.EPOLLIN)

    # -- the interface --------------------------------------------------------------------------
    def set_receiver(self, fn: Callable[[bytes], bool] | None) -> None:
        self._receiver = fn
        self._wake()

    def rx_ready(self) -> None:
        """The guest posted receive buffers: deliver what is held and read again (soon, from the
        I/O thread; this never calls the receiver itself)."""
        self._wake()

    def fds(self) -> list[tuple[int, Callable[[], object]]]:
        return [(self._epoll.fileno(), self._on_ready)]

    def timeout(self) -> float | None:
        return None

    def poll_timers(self) -> None:
        self._on_ready()

    @property
    def closed(self) -> bool:
        return self._closed

    def run_in_thread(self, name: str | None = None) -> "Runner":
        """Serve this backend from a private I/O thread (tests, tools); ``close()`` stops it."""
        with sigint_deferred():   # started and recorded, or neither (kvmpy/_sigint.py)
            self._runner = Runner(self, name or f"kvmpy-{type(self).__name__}")
        return self._runner

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- for subclasses -------------------------------------------------------------------------
    def _on_ready(self) -> bool:
        """The I/O thread's callback: our epoll set is readable (or a wakeup came)."""
        if self._closed:
            return False
        _drain(self._wake_fd)
        self._deliver()
        again = bool(self._service())
        self._deliver()
        self._paused_changed()
        return again

    def _service(self) -> bool:
        """Serve the host side (read fds, run timers); True asks to be called again."""
        return False

    def _paused_changed(self) -> None:
        """Called after delivery: update the epoll set if ``paused`` flipped."""

    def _enqueue(self, frame: bytes) -> None:
        with self._qlock:
            if len(self._rxq) >= self.rx_queue_max:
                self.rx_dropped += 1
                return
            self._rxq.append(frame)

    def _deliver(self) -> None:
        """Hand queued frames to the receiver until it refuses one (-> paused) or none is left."""
        with self._rx_lock:
            while True:
                with self._qlock:
                    if not self._rxq:
                        break
                    frame = self._rxq[0]
                rcv = self._receiver
                if rcv is None:
                    ok = True                  # nobody attached: drop, do not hold
                    self.rx_dropped += 1
                else:
                    try:
                        ok = rcv(frame)
                    except Exception as e:     # a device bug must not wedge the backend
                        self._error(f"receiver: {type(e).__name__}: {e}")
                        ok = True
                        self.rx_dropped += 1
                    else:
                        if ok:
                            self.rx_frames += 1
                if not ok:
                    self.paused = True
                    return
                with self._qlock:
                    if self._rxq and self._rxq[0] is frame:
                        self._rxq.popleft()
            self.paused = False

    def _wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except (BlockingIOError, OSError, ValueError):   # counter full, or closed
            pass

    def _error(self, what: str) -> None:
        self.errors += 1
        if not self._reported:
            self._reported = True
            print(f"kvmpy: {type(self).__name__}: {what}", file=sys.stderr)

    def _stop_runner(self) -> None:
        runner = getattr(self, "_runner", None)
        if runner is not None:
            self._runner = None
            runner.stop()

    def _close_base(self) -> None:
        self._closed = True
        self._stop_runner()
        with self._rx_lock:
            if self._wake_fd >= 0:
                os.close(self._wake_fd)
                self._wake_fd = -1
            self._epoll.close()
        with self._qlock:
            self._rxq.clear()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 8):
            pass
    except (BlockingIOError, OSError):
        pass


class Runner:
    """A private :class:`~kvmpy.virtio.iothread.IoThread` that serves one backend."""

    def __init__(self, backend: Backend, name: str):
        from kvmpy.virtio.iothread import IoThread

        self.backend = backend
        self.io = IoThread(name)
        self._fds = [fd for fd, _ in backend.fds()]
        for fd, cb in backend.fds():
            self.io.add_reader(fd, cb)
        self.io.start()

    def stop(self) -> None:
        if self.io is None:
            return
        for fd in self._fds:
            self.io.remove_reader(fd)
        self.io.close()
        self.io = None

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.backend.close()
