"""Ctrl-C held back while kvmpy starts a thread and records it.

``Thread.start()`` waits for the new thread to run. A KeyboardInterrupt raised during that wait
(Ctrl-C, ``kill -INT``, a test rig's ``pthread_kill``) leaves a thread that runs but that its
``Thread`` object says never started: ``join()`` raises RuntimeError, so its owner cannot stop
it, and a vCPU thread then runs its guest for ever with the VM's fds and memory (a review
helper's test run hung so; under load, interrupts at random points of a VM's start did it every
time). An interrupt right after ``start()`` but before the owner registered the thread for
cleanup leaks it the same way. So kvmpy starts a thread *and records it* inside
:func:`sigint_deferred`.

How: Python runs signal handlers, and so raises KeyboardInterrupt, only in the main thread,
whichever thread the kernel gave the signal to. So blocking SIGINT in the main thread is not
enough (a process-directed SIGINT then goes to any other thread, and Python still raises in the
main one), and ``pthread_sigmask`` can itself raise a pending interrupt after it has blocked the
signal, leaving it blocked for good. Instead the main thread's SIGINT *handler* is swapped, for
the critical section, for one that only notes the signal; the original handler is put back and
called afterwards. ``signal.signal`` runs pending handlers before it installs a new one, so an
interrupt is neither lost nor raised inside the section. Other threads need nothing: no handler
runs there.
"""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def sigint_deferred():
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is None):   # a handler Python cannot put back
        yield
        return
    caught: list = []
    # An interrupt pending now is raised here, by the old handler, before anything started.
    old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)    # one noted meanwhile was taken by the lambda
        if caught:
            if callable(old):
                old(signal.SIGINT, caught[0])   # default_int_handler: KeyboardInterrupt
            elif old == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)
