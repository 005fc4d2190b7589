"""One host thread that serves virtio notifications: an epoll loop over eventfds.

A transport registers each queue's ioeventfd here with :meth:`IoThread.add_reader`; when the
guest writes QueueNotify, KVM signals the eventfd without leaving KVM_RUN (no vCPU exit), this
thread wakes up and calls the callback, which runs the queue. A callback returning True means
"I stopped because of my work budget, call me again": it is called again after every other ready
fd has had its turn, so one busy queue cannot starve the others (hostile-inputs 15).

A callback that raises is contained: counted in ``errors``, reported once on stderr, and the loop
goes on (devices already turn their own errors into DEVICE_NEEDS_RESET; this is the last net).
:meth:`stop` wakes the loop through a pipe and joins it; it is idempotent, and :meth:`close` also
releases the epoll fd and the pipe. Registering and unregistering are safe from any thread: after
:meth:`remove_reader` returns, the callback is not running and will not run again, so its fd may
be closed.

This module knows nothing about virtio; it does not own the eventfds it watches.
"""
from __future__ import annotations

import os
import selectors
import sys
import threading
from collections.abc import Callable

from kvmpy._sigint import sigint_deferred


class IoThread:
    def __init__(self, name: str = "kvmpy-io"):
        self.name = name
        self._selector = selectors.DefaultSelector()   # epoll on Linux
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._callbacks: dict[int, Callable[[], object]] = {}
        self._again: dict[int, None] = {}     # fds whose callback asked to be called again
        self._lock = threading.RLock()   # held while a callback runs (which may add/remove fds)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.errors = 0
        self._reported = False

    # -- registration --------------------------------------------------------------------------
    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        """Call ``callback()`` in this thread whenever ``fd`` is readable. The callback must
        consume what made the fd readable (read the eventfd)."""
        with self._lock:
            self._callbacks[fd] = callback
            self._selector.register(fd, selectors.EVENT_READ, None)
        self._wake()

    def remove_reader(self, fd: int) -> None:
        with self._lock:   # waits for a running callback to return
            if self._callbacks.pop(fd, None) is not None and self._wake_r >= 0:
                self._selector.unregister(fd)
            self._again.pop(fd, None)

    # -- lifetime ------------------------------------------------------------------------------
    def start(self) -> "IoThread":
        if self._thread is None:
            t = threading.Thread(target=self._run, name=self.name, daemon=True)
            with sigint_deferred():   # started and recorded, or neither (kvmpy/_sigint.py)
                t.start()
                self._thread = t
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def close(self) -> None:
        self.stop()
        if self._wake_r >= 0:
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def __enter__(self) -> "IoThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop ------------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):   # pipe full (a wakeup is pending anyway) or closed
            pass

    def _run(self) -> None:
        while not self._stopping:
            events = self._selector.select(0 if self._again else None)
            ready = [key.fd for key, _ in events]
            if self._wake_r in ready:
                self._drain_wakeups()
            again, self._again = list(self._again), {}
            for fd in dict.fromkeys(ready + again):
                if self._stopping:
                    break
                if fd != self._wake_r:
                    self._dispatch(fd)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _dispatch(self, fd: int) -> None:
        with self._lock:
            callback = self._callbacks.get(fd)
            if callback is None:       # removed after select() returned
                return
            try:
                if callback():
                    self._again[fd] = None
            except Exception as e:     # contained: the loop must outlive any one device
                self.errors += 1
                if not self._reported:
                    self._reported = True
                    print(f"kvmpy: I/O thread callback failed and was contained: "
                          f"{type(e).__name__}: {e}", file=sys.stderr)
