"""The host side of the serial console: bytes from a host fd (stdin) into a UART's receive FIFO.

A thread waits on the fd and on a wakeup pipe (so stop() never waits on a blocking read), and
feeds the UART only as much as its FIFO has room for: host input is never dropped, the guest
paces it by reading RBR. (The UART itself still bounds its FIFO and drops what overflows, for
callers that flood it: shared/hostile-inputs.md item 20.)

Raw terminal mode and the Ctrl-A escape keys live in kvmpy/terminal.py (``transform``).
"""
from __future__ import annotations

import os
import selectors
import threading

from kvmpy._sigint import sigint_deferred


class ConsoleInput:
    POLL_FULL = 0.005   # seconds between retries while the guest has not drained the FIFO

    def __init__(self, fd: int, uart, transform=None):
        self.fd = fd
        self.uart = uart
        self.transform = transform   # e.g. kvmpy.terminal.EscapeFilter
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = False
        self._thread = threading.Thread(target=self._main, name="kvmpy-console-in", daemon=True)
        self._started = False

    def start(self) -> "ConsoleInput":
        with sigint_deferred():   # started and recorded, or neither (kvmpy/_sigint.py)
            self._thread.start()
            self._started = True
        return self

    def _main(self) -> None:
        pending = b""
        eof = False
        always_ready = False   # regular files cannot be polled (epoll: EPERM) but never block
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            try:
                sel.register(self.fd, selectors.EVENT_READ)
            except PermissionError:
                always_ready = True
            except (ValueError, OSError):
                eof = True   # a closed or invalid fd: no input
            while not self._stop:
                if pending:
                    room = self.uart.rx_free()
                    if room:
                        pending = pending[self.uart.feed(pending[:room]):]
                want_read = not pending and not eof
                if pending or (want_read and always_ready):
                    timeout = self.POLL_FULL if pending else 0
                else:
                    timeout = None
                ready = {key.fd for key, _ in sel.select(timeout)}
                if self._wake_r in ready:
                    return
                if want_read and (always_ready or self.fd in ready):
                    try:
                        data = os.read(self.fd, 4096)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if data:
                        pending = self.transform(data) if self.transform else data
                    else:
                        eof = True
                        if not always_ready:
                            sel.unregister(self.fd)

    def stop(self) -> None:
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._started:
            self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
