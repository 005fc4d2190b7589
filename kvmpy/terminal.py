"""The host terminal as a serial console: raw mode while the guest runs, restored on every exit.

In raw mode every key goes to the guest (Ctrl-C included, as with QEMU's -nographic); the
escape key Ctrl-A then a letter talks to kvmpy instead: ``Ctrl-A x`` ends the VM,
``Ctrl-A Ctrl-A`` sends one Ctrl-A, ``Ctrl-A h`` lists the keys (QEMU's character-device mux
keys). Restoring is done by a context manager and, for the exits it cannot see (SIGTERM,
SIGHUP), by signal handlers that restore and then re-raise.
"""
from __future__ import annotations

import os
import signal
import sys
import termios
import tty
from collections.abc import Callable

ESCAPE = 0x01  # Ctrl-A
HELP = (b"\r\nkvmpy escape keys (after Ctrl-A):\r\n"
        b"  x   end the VM\r\n  h   this help\r\n  C-a send Ctrl-A to the guest\r\n")


class EscapeFilter:
    """Bytes typed by the user -> bytes for the guest, acting on Ctrl-A sequences."""

    def __init__(self, on_quit: Callable[[], None], echo: Callable[[bytes], None]):
        self.on_quit = on_quit
        self.echo = echo
        self._pending_escape = False

    def __call__(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            if self._pending_escape:
                self._pending_escape = False
                if b in (ord("x"), ord("X")):
                    self.on_quit()
                    break
                if b in (ord("h"), ord("H"), ord("?")):
                    self.echo(HELP)
                elif b == ESCAPE:
                    out.append(ESCAPE)
                continue
            if b == ESCAPE:
                self._pending_escape = True
                continue
            out.append(b)
        return bytes(out)


class RawTerminal:
    """``with RawTerminal(fd):`` puts a TTY in raw mode and always restores it."""

    def __init__(self, fd: int = 0):
        self.fd = fd
        self.saved = None
        self._old_handlers = {}

    def __enter__(self) -> "RawTerminal":
        if not os.isatty(self.fd):
            return self
        self.saved = termios.tcgetattr(self.fd)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:   # not the main thread: the context manager alone restores
                pass
        tty.setraw(self.fd)
        return self

    def restore(self) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.saved = None
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    def _on_signal(self, signum, frame) -> None:
        self.restore()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __exit__(self, *exc) -> None:
        self.restore()


def is_interactive(fd: int = 0) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def stderr_echo(data: bytes) -> None:
    try:
        os.write(sys.stderr.fileno(), data)
    except OSError:
        pass
