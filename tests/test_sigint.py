"""kvmpy/_sigint.py: Ctrl-C deferred while kvmpy starts a thread and records it."""
import os
import signal
import threading

import pytest

from kvmpy._sigint import sigint_deferred


def test_an_interrupt_inside_is_raised_after_the_section():
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            for _ in range(1000):      # bytecodes: the handler had every chance to run
                pass
            ran.append("the whole section")
    assert ran == ["the whole section"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_process_directed_interrupt_taken_by_another_thread_is_deferred_too():
    """The kernel may give a process-directed SIGINT to any thread; Python still runs the
    handler in the main thread (why blocking the signal there would not do)."""
    idle = threading.Event()
    t = threading.Thread(target=idle.wait, daemon=True)
    t.start()
    ran = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigint_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):
                    pass
                ran.append(1)
    finally:
        idle.set()
        t.join()
    assert ran == [1] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nothing_happens_without_an_interrupt_and_other_handlers_are_kept():
    calls = []
    old = signal.signal(signal.SIGINT, lambda s, f: calls.append(s))
    try:
        with sigint_deferred():
            pass
        assert calls == [] and signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        with sigint_deferred():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            for _ in range(1000):
                pass
            assert calls == []          # not yet
        assert calls == [signal.SIGINT]  # the program's own handler, once, afterwards
    finally:
        signal.signal(signal.SIGINT, old)


def test_outside_the_main_thread_it_does_nothing():
    out = []

    def body():
        with sigint_deferred():
            out.append(signal.getsignal(signal.SIGINT))
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert out == [signal.default_int_handler]
