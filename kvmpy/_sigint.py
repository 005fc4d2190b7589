"""SIGINT held off while kvmpy starts a thread.

``Thread.start()`` waits for the new thread to run. A KeyboardInterrupt raised during that wait
(Ctrl-C, or a test rig's ``pthread_kill``) leaves a thread that runs but that its ``Thread``
object says never started: ``join()`` raises RuntimeError, so its owner cannot stop it, and a
vCPU thread then runs its guest for ever with the VM's fds and memory (found under load: a
spinning guest's VM interrupted while it was starting). So kvmpy starts its threads inside
:func:`sigint_held`: SIGINT is blocked in the calling thread meanwhile, a Ctrl-C stays pending
and is raised right after, when the owner knows what it started and can clean up.

Python raises KeyboardInterrupt only in the main thread, so other threads need nothing. A thread
created meanwhile inherits the blocked mask: kvmpy's threads never take a process-directed
SIGINT, which the kernel then gives to the main thread, where Python handles it anyway.
"""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def sigint_held():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
