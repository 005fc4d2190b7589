"""``kvmpy.VM``: a VM for scripts and test rigs, disposable and scriptable.

    with kvmpy.VM(image="guest.S", mode="real") as vm:
        vm.console.expect(rb"login:", timeout=30)
        vm.console.sendline("uname -a")
        result = vm.wait(timeout=10)        # ExitResult: status, reason, detail, exits

Keywords mirror the CLI: ``kernel=, initrd=, append=, cpus=`` boot Linux (``kvmpy boot``);
``image=, mode=, load=, entry=, irqchip=`` run a flat binary (``kvmpy run``); ``mem=`` is a size
('512M') or bytes; ``disks=["rootfs.ext4", "data.img,ro"]``, ``nets=["user"]``, ``rng=True``,
``virtio_console=True`` and ``transport=`` add virtio devices as ``--disk``/``--net``/``--rng``/
``--virtio-console`` do (with a virtio console, ``vm.console.send`` types into hvc0, as the
CLI's stdin does; boot Linux with ``console=hvc0`` to have its shell there). The VM starts on ``__enter__`` (or ``start()``), and ``close()`` / ``__exit__``
release every fd, mmap and thread whatever happened, KeyboardInterrupt included (a second one
while it closes is raised once all is released). A VM that nobody holds any more, started or not,
is closed when it is collected, or at exit. Many VMs may run in one process, from several threads.
"""
from __future__ import annotations

import collections
import re
import threading
import time
import weakref
from collections.abc import Callable

from kvmpy.errors import KvmpyError
from kvmpy.outcome import ExitStatus, Outcome, StopReason


class ConsoleTimeout(KvmpyError):
    """expect() did not see its pattern in time."""


class GuestEnded(ConsoleTimeout):
    """expect() cannot see its pattern any more: the guest ended without writing it (a
    ConsoleTimeout that does not wait out the timeout). ``outcome`` says how it ended."""

    def __init__(self, message: str, outcome):
        super().__init__(message)
        self.outcome = outcome


class Console:
    """The guest's COM1: everything it wrote (``output``), expect(), send()."""

    def __init__(self):
        self._buf = bytearray()
        self._pos = 0          # expect() searches from here: the end of the previous match
        self._cond = threading.Condition()
        self.uart = None
        self._pause_rx = None  # pause_on()'s pattern, until the output matches it
        self._pause_vm: Callable[[], None] | None = None   # set by VM: ask all vCPUs to hold
        self._ended = None     # the VM's Outcome once the guest ended: no more output will come

    # sink for the UART (vCPU thread, inside the exit of the guest's write)
    def _write(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            rx = self._pause_rx
            if rx is not None and rx.search(self._buf, self._pos):
                self._pause_rx = None
                # Asked from inside the guest's OUT exit: this vCPU holds before it re-enters
                # KVM_RUN, so the guest runs no instruction past the write that matched.
                self._pause_vm()
            self._cond.notify_all()

    def pause_on(self, pattern) -> None:
        """Pause the VM the moment its output matches ``pattern`` (from where the next expect()
        searches), before the guest runs another instruction; resume() lets it go on. Arm it
        before the output can appear: before start(), or while the VM is paused. One match."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        with self._cond:
            self._pause_rx = re.compile(pattern) if isinstance(pattern, bytes) else pattern

    def _guest_ended(self, outcome) -> None:
        with self._cond:
            self._ended = outcome
            self._cond.notify_all()

    @property
    def output(self) -> bytes:
        with self._cond:
            return bytes(self._buf)

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def expect(self, pattern, timeout: float = 10.0) -> re.Match:
        """Wait until ``pattern`` (regex, str or bytes) matches output not yet consumed by an
        earlier expect(); returns the match (against bytes). ConsoleTimeout after ``timeout``,
        or at once GuestEnded (a ConsoleTimeout) if the guest ended without writing it."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        rx = re.compile(pattern) if isinstance(pattern, bytes) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._buf, self._pos)
                if m:
                    self._pos = m.end()
                    return m
                tail = bytes(self._buf[-200:]).decode(errors="replace")
                if self._ended is not None:
                    o = self._ended
                    raise GuestEnded(f"the guest ended ({o.reason.value}, status {int(o.status)}: "
                                     f"{o.detail}) before the console showed {rx.pattern!r}; "
                                     f"last output: {tail!r}", o)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConsoleTimeout(f"console did not show {rx.pattern!r} within "
                                         f"{timeout:g} s; last output: {tail!r}")
                self._cond.wait(left)

    def send(self, data: bytes | str, timeout: float = 10.0) -> None:
        """Type ``data`` into the guest's console input (COM1's FIFO, or hvc0's receive
        buffers with a virtio console), as fast as the guest drains it."""
        if isinstance(data, str):
            data = data.encode()
        deadline = time.monotonic() + timeout
        while data:
            room = self.uart.rx_free()
            if room:
                data = data[self.uart.feed(data[:room]):]
            elif time.monotonic() > deadline:
                raise ConsoleTimeout(f"guest did not read its console input within {timeout:g} s")
            else:
                time.sleep(0.001)

    def sendline(self, line: str | bytes = b"", timeout: float = 10.0) -> None:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\n", timeout)


class ExitResult:
    """How the VM ended: ``status`` (what `kvmpy run` would return), ``reason`` (StopReason
    value, e.g. 'debug-exit', 'halt', 'timeout'), ``detail``, ``report`` and ``exits``
    (counts by KVM exit reason)."""

    def __init__(self, outcome: Outcome, exits: collections.Counter):
        self.outcome = outcome
        self.status = int(outcome.status)
        self.reason = outcome.reason.value
        self.detail = outcome.detail
        self.report = outcome.report
        self.exits = exits

    def __repr__(self) -> str:
        return f"<ExitResult status={self.status} reason={self.reason} ({self.detail})>"


def _size(mem) -> int:
    if isinstance(mem, int):
        return mem
    from kvmpy.cli import parse_size

    try:
        return parse_size(str(mem))
    except Exception as e:
        raise KvmpyError(str(e)) from None


class VM:
    def __init__(self, *, kernel: str | None = None, initrd: str | None = None,
                 append: str | None = None, image: str | None = None, mode: str | None = None,
                 load: int | None = None, entry: int | None = None, mem="256M", cpus: int = 1,
                 irqchip: bool = False, disks=(), nets=(), rng: bool = False,
                 virtio_console: bool = False, transport: str | None = None, timeout: float | None = None,
                 trace: str | None = None, kvm_path: str | None = None, fast_boot: bool = False):
        if (kernel is None) == (image is None):
            raise KvmpyError("kvmpy.VM needs either kernel= (Linux) or image= and mode= "
                             "(a flat binary)")
        devices = ([("disk", d) for d in disks] + [("net", n) for n in nets]
                   + ([("rng", None)] if rng else [])
                   + ([("virtio-console", None)] if virtio_console else []))
        self.console = Console()
        self.timeout = timeout
        self._trace_file = None
        self._machine = None
        self._release = None
        self._started = False
        self._result: ExitResult | None = None
        tracer = None
        if trace:
            from kvmpy.vmexit.trace import Tracer

            self._trace_file = open(trace, "w")
            tracer = Tracer(self._trace_file)
        try:
            if kernel is not None:
                from kvmpy.linux import DEFAULT_CMDLINE, LinuxConfig, build_linux

                self._machine = build_linux(LinuxConfig(
                    kernel, initrd, DEFAULT_CMDLINE if append is None else append,
                    mem_size=_size(mem), cpus=cpus, fast_boot=fast_boot, kvm_path=kvm_path,
                    console_sink=self.console._write, tracer=tracer, devices=devices,
                    transport=transport or "pci"))
                self._nr_vcpus = cpus
            else:
                from kvmpy.builder import FlatConfig, build_flat
                from kvmpy.vcpu.modes import Mode

                if mode not in ("real", "protected", "long"):
                    raise KvmpyError(f"mode={mode!r}: use 'real', 'protected' or 'long'")
                self._machine = build_flat(FlatConfig(
                    image, Mode(mode), load, entry, _size(mem), irqchip, kvm_path,
                    console_sink=self.console._write, tracer=tracer, devices=devices,
                    transport=transport or "mmio"))
                self._nr_vcpus = 1
            # A VM nobody holds any more (dropped before __enter__, or never closed) is closed
            # when it is collected, or at interpreter exit: its I/O threads run from here on,
            # and they hold the machine, not this object. Nothing the machine owns may refer
            # back to this object, or it would never be collected.
            self._release = weakref.finalize(self, _collected, self._machine, self._trace_file)
            machine = self._machine
            # where typed input goes: COM1, or the guest's hvc0 when there is a virtio console
            self.console.uart = machine.input_device or machine.console
            self.console._pause_vm = lambda: machine.pause(wait=False)
            machine.on_finish.append(self.console._guest_ended)
        except BaseException:     # Ctrl-C included: nobody gets this VM to close it
            self.close()
            raise

    @property
    def machine(self):
        return self._machine

    def start(self) -> "VM":
        if not self._started:
            self._started = True
            self._machine.start(self._machine.setup, self._nr_vcpus)
        return self

    def __enter__(self) -> "VM":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def wait(self, timeout: float | None = None) -> ExitResult:
        """Wait for the guest to end; after ``timeout`` (or the VM's) it is stopped and the result
        says 'timeout' (status 124). A KeyboardInterrupt stops the VM, then propagates."""
        if self._result is not None:
            return self._result
        self.start()
        timeout = self.timeout if timeout is None else timeout
        try:
            outcome = self._machine.wait(timeout)
        except KeyboardInterrupt:
            self.close()
            raise
        if outcome.reason is StopReason.INTERRUPTED:
            self.close()
            raise KeyboardInterrupt
        self._result = ExitResult(outcome, self._machine.dispatcher.exit_counts())
        return self._result

    def stop(self) -> ExitResult:
        self._machine.stop()
        return self.wait()

    def pause(self) -> None:
        self._machine.pause()

    def resume(self) -> None:
        self._machine.resume()

    def read_memory(self, gpa: int, size: int) -> bytes:
        return self._machine.memory.read(gpa, size)

    def write_memory(self, gpa: int, data: bytes) -> None:
        self._machine.memory.write(gpa, data)

    def registers(self, vcpu: int = 0, timeout: float = 5.0) -> dict:
        """General and control registers of ``vcpu``, read in its own thread."""
        threads = self._machine.vcpu_threads
        if not 0 <= vcpu < len(threads):
            raise KvmpyError(f"no vCPU {vcpu} (the VM has {len(threads)})")
        done = threading.Event()
        box: dict = {}

        def read(v):
            r, s = v.get_regs(), v.get_sregs()
            for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9",
                         "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"):
                box[name] = getattr(r, name)
            for name in ("cr0", "cr2", "cr3", "cr4", "efer"):
                box[name] = getattr(s, name)
            box["cs"] = s.cs.selector
            done.set()

        threads[vcpu].call(read)
        if not done.wait(timeout):
            raise KvmpyError(f"vCPU {vcpu} did not answer within {timeout:g} s (has it ended?)")
        return box

    def flush_trace(self) -> None:
        f = self._trace_file
        if f is not None:
            try:
                f.flush()
            except ValueError:   # closed meanwhile
                pass

    def close(self) -> None:
        m = self._machine
        try:
            if m is not None and self._result is None and self._started:
                m.stop()
                outcome = m.wait(5)
                self._result = ExitResult(outcome, m.dispatcher.exit_counts())
        finally:                             # a second Ctrl-C in wait() releases all the same
            # detach() hands over the finalizer's work once, whoever comes first
            args = self._release.detach() if self._release is not None else None
            if args is not None:
                _release(*args[2])
            elif self._release is None:      # the machine was never built
                _release(m, self._trace_file)
            self._trace_file = None


def _collected(machine, trace_file) -> None:
    """The finalizer of a VM nobody holds. The cyclic garbage collector runs it in whichever
    thread allocates at the time, often one of this very VM's vCPU or I/O threads, which cannot
    join itself and whose guest memory must not be unmapped under it: off the main thread the
    release runs in a thread of its own."""
    if threading.current_thread() is threading.main_thread():
        _release(machine, trace_file)
    else:
        threading.Thread(target=_release, args=(machine, trace_file), name="kvmpy-release",
                         daemon=True).start()


def _release(machine, trace_file) -> None:
    try:
        if machine is not None:
            machine.close()     # raises a Ctrl-C that came meanwhile, once all is released
    finally:
        if trace_file is not None:
            trace_file.close()


__all__ = ["VM", "ExitResult", "Console", "ConsoleTimeout", "ExitStatus"]
