"""The vCPU run loop, one thread per vCPU.

A vCPU is created, set up and run in the same thread (KVM expects a vCPU's ioctls from the thread
that runs it). Stopping from another thread: set ``kvm_run.immediate_exit`` (so a KVM_RUN that is
about to start returns at once) and send the thread a signal whose no-op handler makes a KVM_RUN
in progress return EINTR (Documentation/virt/kvm/api.rst, KVM_CAP_IMMEDIATE_EXIT).

:func:`run_loop` is the loop itself: run, decode, handle, until the handler returns an Outcome.
It takes any object with ``run()``/``run_buffer``/``run_struct`` and so can be tested without
/dev/kvm.
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

from kvmpy._ffi import lib
from kvmpy._sigint import sigint_deferred
from kvmpy.errors import KvmpyError
from kvmpy.outcome import ExitStatus, Outcome, StopReason, VmStop
from kvmpy.vmexit.exits import ExitDecoder

KICK_SIGNAL = signal.SIGRTMIN  # as Firecracker's vcpu kick (SIGRTMIN + 0)
_kick_installed = False
_kick_lock = threading.Lock()


def install_kick_handler() -> None:
    global _kick_installed
    with _kick_lock:
        if not _kick_installed:
            if lib.kvmpy_install_kick_handler(int(KICK_SIGNAL)) < 0:
                raise KvmpyError("cannot install the vCPU kick signal handler")
            _kick_installed = True


def run_loop(vcpu, dispatcher, stopping: Callable[[], bool],
             interrupted: Callable | None = None) -> Outcome | None:
    """Run ``vcpu`` until an exit handler ends the VM (an Outcome) or ``stopping()`` (None).

    ``interrupted(vcpu)``, if given, is called (in this thread, outside KVM_RUN) whenever
    KVM_RUN was interrupted by a kick; pause requests and debuggers act there. It may return an
    Outcome to end the VM."""
    decode = ExitDecoder(vcpu.run_struct, vcpu.run_buffer).decode
    handle = dispatcher.handle
    run = vcpu.run
    while True:
        if not run():                 # EINTR: a kick, or a stray signal
            if stopping():
                return None
            if interrupted is not None:
                try:
                    outcome = interrupted(vcpu)
                except VmStop as stop:
                    return stop.outcome
                if outcome is not None:
                    return outcome
            continue
        try:
            outcome = handle(decode(), vcpu)
        except VmStop as stop:
            return stop.outcome
        if outcome is not None:
            return outcome


class VcpuThread:
    """Creates vCPU ``vcpu_id`` of ``vm`` in a new thread, runs ``setup(vcpu)``, then the loop.

    ``on_exit(outcome)`` is called once from the thread when the loop ends, with None when the
    thread was stopped by :meth:`stop`.
    """

    def __init__(self, vm, vcpu_id: int, dispatcher, setup: Callable, on_exit: Callable,
                 all_set_up: threading.Barrier | None = None):
        self.vm = vm
        self.all_set_up = all_set_up
        self.vcpu_id = vcpu_id
        self.dispatcher = dispatcher
        self.setup = setup
        self.on_exit = on_exit
        self.vcpu = None
        self.outcome: Outcome | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._requests: list[Callable] = []   # run in this vCPU's thread at the next kick
        self._thread = threading.Thread(target=self._main, name=f"kvmpy-vcpu{vcpu_id}",
                                        daemon=True)
        self._started = False    # set with Ctrl-C deferred, right after Thread.start() (_sigint)

    def start(self) -> None:
        install_kick_handler()
        with sigint_deferred():
            self._thread.start()
            self._started = True

    def _main(self) -> None:
        outcome = None
        try:
            try:
                vcpu = self.vm.create_vcpu(self.vcpu_id)
            except BaseException:
                self._abort_start()
                raise
            with self._lock:
                self.vcpu = vcpu
                if self._stopping or self._requests:   # asked for before the vCPU existed
                    vcpu.run_struct.immediate_exit = 1
            try:
                try:
                    self.setup(vcpu)
                    go = self._all_ready()
                except BaseException:
                    self._abort_start()
                    raise
                if go:
                    outcome = run_loop(vcpu, self.dispatcher, lambda: self._stopping,
                                       self._run_requests)
            finally:
                with self._lock:
                    self.vcpu = None
                    vcpu.close()
        except VmStop as stop:
            outcome = stop.outcome
        except KvmpyError as e:
            outcome = Outcome(StopReason.VMM_ERROR, ExitStatus.ERROR, str(e))
        except BaseException as e:  # a kvmpy bug: report it, never leave the VM hanging
            import traceback

            traceback.print_exc(file=sys.stderr)
            outcome = Outcome(StopReason.VMM_ERROR, ExitStatus.VMM_ERROR,
                              f"internal error in kvmpy: {type(e).__name__}: {e}")
        self.outcome = outcome
        self.on_exit(outcome)

    def _all_ready(self) -> bool:
        """Wait until every vCPU of the machine exists and is set up; False if one failed or
        the machine stopped meanwhile. No vCPU runs before: an INIT/SIPI that the BSP sends to
        an AP not yet created (or whose LAPIC its setup is still writing) would be lost. QEMU
        and Firecracker create all vCPUs before running any too."""
        if self.all_set_up is None:
            return True
        try:
            self.all_set_up.wait()
        except threading.BrokenBarrierError:
            return False
        return True

    def _abort_start(self) -> None:
        """This vCPU will not run: the others must not wait for it."""
        if self.all_set_up is not None:
            self.all_set_up.abort()

    def _run_requests(self, vcpu) -> Outcome | None:
        with self._lock:
            if not self._stopping:   # a stop that raced with this keeps its immediate_exit
                vcpu.run_struct.immediate_exit = 0
        # One at a time, taken from the shared list: a request that blocks (a pause holding the
        # vCPU) serves the ones queued after it by calling this again, including those that
        # were already waiting when it started.
        while True:
            with self._lock:
                if not self._requests:
                    return None
                fn = self._requests.pop(0)
            outcome = fn(vcpu)
            if outcome is not None:
                return outcome

    def call(self, fn: Callable) -> None:
        """Run ``fn(vcpu)`` in this vCPU's thread as soon as it is out of KVM_RUN (pause,
        debugger stops, register reads). ``fn`` may block; it may return an Outcome."""
        with self._lock:
            self._requests.append(fn)
        self._kick()

    def _kick(self) -> None:
        """immediate_exit + a signal: KVM_RUN returns EINTR now or at its next entry."""
        with self._lock:
            if self.vcpu is not None:
                self.vcpu.run_struct.immediate_exit = 1
                ident = self._thread.ident
                if ident is not None and self._thread.is_alive():
                    try:
                        signal.pthread_kill(ident, KICK_SIGNAL)
                    except ProcessLookupError:
                        pass

    def stop(self) -> None:
        """Ask the loop to end; returns at once (join() waits)."""
        with self._lock:
            self._stopping = True
        self._kick()

    def join(self, timeout: float | None = None) -> bool:
        if not self._started:    # interrupted before start(): there is no thread
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()
