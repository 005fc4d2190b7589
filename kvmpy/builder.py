"""The whole machine as one recipe: kvm -> vm -> memory -> irqchip -> devices -> image -> vCPUs.

:class:`Machine` owns every resource of one VM (fds, mmaps, threads) in a
``contextlib.ExitStack``, so whatever ends the VM (the guest, a timeout, an exception, Ctrl-C)
releases them in reverse order of creation. :func:`build_flat` is the recipe for
``kvmpy run``: a flat binary entered in real, protected or long mode with the legacy devices.

Legacy port map (a PC's, as QEMU and Firecracker place them):

    0x0060, 0x0064  i8042 keyboard controller (reset line)            window 0x60-0x64
    0x0070-0x0071   CMOS RTC index/data
    0x0080          POST code port (Linux's I/O delay; ignored)
    0x00f4          isa-debug-exit (QEMU: -device isa-debug-exit,iobase=0xf4)
    0x03f8-0x03ff   COM1 16550A UART, IRQ 4
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable

from kvmpy._sigint import sigint_deferred
from kvmpy.errors import ImageError, KvmpyError
from kvmpy.outcome import ExitStatus, Outcome, StopReason
from kvmpy.vcpu.modes import MMIO_HOLE_START, Mode, reserved_ranges, setup_mode
from kvmpy.vmexit.bus import MmioBus, PioBus

MIB = 1 << 20
MIN_MEM = 1 * MIB
DEFAULT_MEM = 256 * MIB
FOUR_GIB = 4 << 30
# Firecracker arch/src/x86_64/layout.rs: KVM_TSS_ADDRESS, and the identity map page below it.
TSS_ADDRESS = 0xFFFB_D000
IDENTITY_MAP_ADDRESS = 0xFFFB_C000

COM1_BASE, COM1_IRQ = 0x3F8, 4
PCI_CONFIG_PORT = 0xCF8
I8042_BASE, I8042_IRQ, I8042_AUX_IRQ = 0x60, 1, 12   # keyboard and AUX (mouse port) IRQs
CMOS_BASE = 0x70
POST_PORT = 0x80
DEBUG_EXIT_PORT = 0xF4
DEFAULT_LOAD = {Mode.REAL: 0x7C00, Mode.PROTECTED: 0x100000, Mode.LONG: 0x100000}


def ram_layout(mem_size: int) -> list[tuple[int, int]]:
    """RAM below the 32-bit MMIO hole (0xC0000000-0xFFFFFFFF), the rest above 4 GiB."""
    low = min(mem_size, MMIO_HOLE_START)
    layout = [(0, low)]
    if mem_size > low:
        layout.append((FOUR_GIB, mem_size - low))
    return layout


class Machine:
    """One VM and everything it owns. Use as a context manager, or call close()."""

    def __init__(self, mem_size: int = DEFAULT_MEM, irqchip: bool = False,
                 kvm_path: str | None = None, tracer=None):
        from kvmpy.kvm import Kvm
        from kvmpy.memory import GuestMemory
        from kvmpy.vmexit.dispatch import Dispatcher

        if mem_size < MIN_MEM or mem_size % 4096:
            raise KvmpyError(f"memory size {mem_size} is too small or not a multiple of 4 KiB; "
                             f"use at least 1M")
        self._stack = contextlib.ExitStack()
        self._threads = []
        self._all_set_up: threading.Barrier | None = None   # start(): vCPUs wait here to run
        self._done = threading.Event()
        self._outcome: Outcome | None = None
        self._outcome_lock = threading.Lock()
        # called once with the outcome when the guest ends (from the thread that ended it)
        self.on_finish: list[Callable[[Outcome], None]] = []
        # console output to host fds: cancelled when the machine finishes or closes, closed
        # once its threads have stopped (StreamSink)
        self._output_sinks: list[StreamSink] = []
        self._threads_stopped = False   # _stop_threads joined every vCPU thread
        try:
            self.kvm = self._stack.enter_context(Kvm(kvm_path))
            self.vm = self._stack.enter_context(self.kvm.create_vm())
            self.vm.set_tss_addr(TSS_ADDRESS)
            self.vm.set_identity_map_addr(IDENTITY_MAP_ADDRESS)
            try:
                self.memory = self._stack.enter_context(GuestMemory(ram_layout(mem_size)))
            except OSError as e:
                raise KvmpyError(f"cannot allocate {mem_size // MIB} MiB of guest memory: "
                                 f"{e.strerror}; use a smaller --mem") from None
            self.memory.register(self.vm)
            if irqchip:
                self.vm.create_irqchip()
                self.vm.create_pit2()
            self.pio = PioBus()
            self.mmio = MmioBus()
            self.tracer = tracer
            self.dispatcher = Dispatcher(self.pio, self.mmio, self.memory, tracer,
                                         has_irqchip=irqchip)
            self.devices: dict[str, object] = {}
            self.device_map: list[str] = []   # extra lines for --device-map (IRQs, PCI slots)
            self.pci = None
            self.console = None        # COM1, once add_legacy_devices() ran
            self.input_device = None   # where host stdin goes instead of COM1 (virtio-console)
            # threads stop before any fd closes (ExitStack unwinds last-in first-out)
            self._stack.callback(self._stop_threads)
        except BaseException:
            self._stack.close()
            raise

    # -- devices ---------------------------------------------------------------------------
    def add_pio_device(self, device, base: int, name: str | None = None):
        m = self.pio.insert(device, base, name)
        self.devices[m.name] = device
        return device

    def add_mmio_device(self, device, base: int, name: str | None = None):
        m = self.mmio.insert(device, base, name)
        self.devices[m.name] = device
        return device

    def ensure_pci(self):
        """PCI bus 0 with its host bridge at ports 0xCF8-0xCFF (created once)."""
        if self.pci is None:
            from kvmpy.devices.pci import HostBridge, PciBus, PciConfigIo

            self.pci = PciBus()
            self.pci.add(HostBridge(), 0)
            self.add_pio_device(PciConfigIo(self.pci), PCI_CONFIG_PORT, "PCI")
        return self.pci

    def describe(self) -> str:
        """The device map: ports, MMIO windows, PCI functions, IRQs (``--device-map``)."""
        lines = ["ports:"]
        lines += [f"  {m.base:#06x}-{m.end - 1:#06x}  {m.name}" for m in sorted(self.pio.mappings, key=lambda m: m.base)]
        lines.append("MMIO:")
        lines += [f"  {m.base:#012x}-{m.end - 1:#012x}  {m.name}" for m in self.mmio.mappings]
        if self.pci is not None:
            lines.append("PCI bus 0:")
            for (dev, fn), f in sorted(self.pci.functions.items()):
                vendor, device = f.config_read(0, 2), f.config_read(2, 2)
                lines.append(f"  00:{dev:02x}.{fn}  {vendor:04x}:{device:04x}  {f.name}")
        irqs = [f"  IRQ {COM1_IRQ}: COM1"] if self.vm.has_irqchip else []
        if self.vm.has_irqchip:
            irqs.append(f"  IRQ {I8042_IRQ}, {I8042_AUX_IRQ}: i8042 (keyboard, AUX)")
        lines += (["interrupts:"] + irqs) if irqs else []
        lines += self.device_map
        return "\n".join(lines)

    def irq_line(self, irq: int) -> Callable[[int], None] | None:
        """A callable setting GSI ``irq`` (None without an in-kernel irqchip)."""
        if not self.vm.has_irqchip:
            return None
        vm = self.vm
        return lambda level: vm.irq_line(irq, level)

    def add_legacy_devices(self, console_sink: Callable[[bytes], None] | None) -> None:
        from kvmpy.devices.cmos import CmosRtc
        from kvmpy.devices.debug_exit import DebugExit
        from kvmpy.devices.i8042 import I8042
        from kvmpy.devices.post import PostPort
        from kvmpy.devices.uart import Uart16550

        self.console = self.add_pio_device(
            Uart16550(name="COM1", sink=console_sink, irq=self.irq_line(COM1_IRQ)), COM1_BASE)
        if isinstance(console_sink, StreamSink):
            self.add_output_sink(console_sink)
        # IRQ 12 too, though no mouse is attached: Linux tests AUX IRQ delivery with the loopback
        # command and, when it does not come, waits 250 ms on every boot (no i8042.noaux)
        self.add_pio_device(I8042(irq_kbd=self.irq_line(I8042_IRQ),
                                  irq_aux=self.irq_line(I8042_AUX_IRQ)), I8042_BASE, "i8042")
        self.add_pio_device(CmosRtc(mem_size=self.memory.size), CMOS_BASE, "CMOS")
        self.add_pio_device(PostPort(), POST_PORT, "POST")
        self.add_pio_device(DebugExit(), DEBUG_EXIT_PORT, "debug-exit")

    def add_output_sink(self, sink: "StreamSink") -> None:
        """Output to a host fd that this machine's threads write (the console, ``--trace -``):
        a write waiting for its reader is cancelled when the machine finishes or closes, and
        the sink is closed once the threads have stopped."""
        sink.start()
        self._output_sinks.append(sink)

    def attach_console_input(self, fd: int, interactive: bool = False) -> None:
        """Feed host fd ``fd`` (stdin) to COM1 until the machine closes. ``interactive``: a
        terminal in raw mode with the Ctrl-A escape keys (Ctrl-A x ends the VM)."""
        try:
            st = os.fstat(fd)
        except OSError:
            return   # no standard input at all
        if os.path.samestat(st, _devnull_stat()):
            return   # /dev/null: nothing will ever arrive; spare the thread
        from kvmpy.console import ConsoleInput

        transform = None
        if interactive:
            from kvmpy.terminal import EscapeFilter, RawTerminal, stderr_echo

            self._stack.enter_context(RawTerminal(fd))
            transform = EscapeFilter(
                lambda: self._finish(Outcome(StopReason.STOPPED, ExitStatus.OK,
                                             "ended with Ctrl-A x")), stderr_echo)
        target = self.input_device or self.console
        with sigint_deferred():   # started and registered, or neither (kvmpy/_sigint.py)
            reader = ConsoleInput(fd, target, transform).start()
            self._stack.callback(reader.stop)

    # -- images ----------------------------------------------------------------------------
    def load_flat(self, image: str, load: int, mode: Mode, data: bytes | None = None) -> int:
        """Copy a flat binary (the file ``image``, or ``data`` read from it) to ``load``."""
        if data is None:
            data = read_image(image)
        end = load + len(data)
        if not self.memory.contains(load, len(data)):
            if not self.memory.contains(load):
                raise ImageError(f"load address {load:#x} is outside guest memory "
                                 f"(RAM is {self.memory.size // MIB} MiB); choose another --load")
            raise ImageError(f"{image} ({len(data)} bytes) does not fit in guest memory at "
                             f"{load:#x}; use a larger --mem or a lower --load")
        for start, stop, what in reserved_ranges(mode, self.memory.top):
            if load < stop and start < end:
                raise ImageError(f"{image} at {load:#x}-{end - 1:#x} overlaps kvmpy's {mode.value}"
                                 f"-mode {what} at {start:#x}-{stop - 1:#x}; load it elsewhere "
                                 f"(--load {DEFAULT_LOAD[mode]:#x})")
        self.memory.write(load, data)
        return len(data)

    # -- running ---------------------------------------------------------------------------
    def start(self, setup: Callable, nr_vcpus: int = 1) -> None:
        from kvmpy.vcpu.runner import VcpuThread

        self._all_set_up = threading.Barrier(nr_vcpus) if nr_vcpus > 1 else None
        for i in range(nr_vcpus):
            t = VcpuThread(self.vm, i, self.dispatcher, setup, self._vcpu_exited,
                           self._all_set_up)
            self._threads.append(t)
            t.start()

    def _vcpu_exited(self, outcome: Outcome | None) -> None:
        if outcome is not None:
            self._finish(outcome)

    def _finish(self, outcome: Outcome) -> None:
        with self._outcome_lock:
            first = self._outcome is None
            if first:
                self._outcome = outcome
        self._done.set()
        for sink in self._output_sinks:
            sink.cancel()
        for t in self._threads:
            t.stop()
        if first:
            for hook in self.on_finish:
                try:
                    hook(self._outcome)
                except Exception as e:     # a hook's bug must not keep the VM from ending
                    print(f"kvmpy: on_finish hook failed: {type(e).__name__}: {e}",
                          file=sys.stderr)

    def wait(self, timeout: float | None = None) -> Outcome:
        """Wait until the guest ends (or ``timeout`` seconds, then stop it)."""
        try:
            if not self._done.wait(timeout):
                self._finish(Outcome(StopReason.TIMEOUT, ExitStatus.TIMEOUT,
                                     f"the guest was still running after {timeout:g} s"))
        except KeyboardInterrupt:
            self._finish(Outcome(StopReason.INTERRUPTED, ExitStatus.INTERRUPTED,
                                 "interrupted (Ctrl-C)"))
        self._stop_threads()
        assert self._outcome is not None
        return self._outcome

    def stop(self) -> None:
        self._finish(Outcome(StopReason.STOPPED, ExitStatus.OK, "stopped by the host"))

    @property
    def vcpu_threads(self):
        return list(self._threads)

    def pause(self, timeout: float = 10.0, wait: bool = True) -> None:
        """Stop every vCPU outside KVM_RUN until resume(); returns once all are paused, or at
        once with ``wait=False`` (how a vCPU thread asks from inside an exit: it holds when the
        exit returns, before KVM_RUN)."""
        if getattr(self, "_resume", None) is not None:
            return
        self._resume = resume = threading.Event()
        paused = threading.Semaphore(0)

        def holder(thread):
            def hold(vcpu):
                paused.release()
                # while paused, still serve requests (registers(), a debugger) in this thread
                while not resume.wait(0.005):
                    outcome = thread._run_requests(vcpu)
                    if outcome is not None:
                        return outcome
            return hold

        live = [t for t in self._threads if t._thread.is_alive()]
        for t in live:
            t.call(holder(t))
        if not wait:
            return
        for _ in live:
            if not paused.acquire(timeout=timeout):
                break

    def resume(self) -> None:
        resume, self._resume = getattr(self, "_resume", None), None
        if resume is not None:
            resume.set()

    def _stop_threads(self) -> None:
        self.resume()
        if self._all_set_up is not None:
            self._all_set_up.abort()   # vCPUs still waiting for the others to be set up
        for t in self._threads:
            t.stop()
        me = threading.current_thread()
        for t in self._threads:
            if t._thread is me:      # stopped (it leaves when this exit returns); cannot join
                continue
            while not t.join(0.5):   # a vCPU in a long guest instruction: kick again
                t.stop()
        self._threads_stopped = all(t._thread is not me for t in self._threads)

    def close(self) -> None:
        # A Ctrl-C in the middle (a second one, while the first stops the VM) would leave
        # vCPU threads unjoined, or running, while their fds close and guest memory is unmapped
        # under them; it is raised when everything is released. Stopping is bounded: vCPUs are
        # kicked out of KVM_RUN every 0.5 s until they leave. One already pending is raised as
        # the section begins (sigint_deferred): then the release is still to do.
        for sink in self._output_sinks:   # a vCPU or I/O thread may wait in a write
            sink.cancel()
        interrupted = None
        while True:
            begun = False
            try:
                with sigint_deferred():
                    begun = True
                    try:
                        self._stack.close()
                    finally:
                        if self._threads_stopped:   # no thread can write any more
                            for sink in self._output_sinks:
                                sink.close()
            except KeyboardInterrupt as e:
                interrupted = e
                if not begun:
                    continue
            break
        if interrupted is not None:
            raise interrupted

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _devnull_stat():
    return os.stat(os.devnull)


def read_image(path: str, load: int = 0) -> bytes:
    """The bytes of a flat binary; GNU assembler source (``*.S``) is assembled for ``load``."""
    if path.endswith(".S") and os.path.isfile(path):
        from kvmpy.asm import assemble_file

        try:
            return assemble_file(path, load)
        except KvmpyError as e:
            raise ImageError(f"cannot assemble {path}: {str(e).splitlines()[0]}") from None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"image {path} is a directory, not a file") from None
    except PermissionError:
        raise ImageError(f"image {path} is not readable (permission denied)") from None
    except OSError as e:
        raise ImageError(f"cannot read image {path}: {e.strerror}") from None
    if not data:
        raise ImageError(f"image {path} is empty")
    return data


class FlatConfig:
    """What ``kvmpy run`` takes. (A plain class: dataclasses cost ~5 ms of startup.)"""

    def __init__(self, image: str, mode: Mode, load: int | None = None,
                 entry: int | None = None, mem_size: int = DEFAULT_MEM, irqchip: bool = False,
                 kvm_path: str | None = None,
                 console_sink: Callable[[bytes], None] | None = None, tracer=None,
                 devices: list | None = None, transport: str = "mmio"):
        self.image, self.mode, self.load, self.entry = image, mode, load, entry
        self.mem_size, self.irqchip, self.kvm_path = mem_size, irqchip, kvm_path
        self.console_sink, self.tracer = console_sink, tracer
        self.devices, self.transport = devices or [], transport   # [("disk", "path,ro"), ...]


def build_flat(cfg: FlatConfig) -> Machine:
    """The ``kvmpy run`` recipe. The returned machine is built, not started."""
    load = DEFAULT_LOAD[cfg.mode] if cfg.load is None else cfg.load
    entry = load if cfg.entry is None else cfg.entry
    data = read_image(cfg.image, load)   # the user's input first, before any KVM resource
    m = Machine(cfg.mem_size, irqchip=cfg.irqchip, kvm_path=cfg.kvm_path, tracer=cfg.tracer)
    try:
        m.add_legacy_devices(cfg.console_sink)
        if cfg.devices:
            from kvmpy.virtio.setup import add_virtio_devices

            if cfg.transport == "pci":
                m.ensure_pci()
            add_virtio_devices(m, cfg.devices, cfg.transport)
        size = m.load_flat(cfg.image, load, cfg.mode, data)
        if not m.memory.contains(entry):
            raise ImageError(f"entry point {entry:#x} is outside guest memory")
        if cfg.mode is Mode.REAL and entry >= 1 << 20:
            raise ImageError(f"entry point {entry:#x} is above 1 MiB, unreachable in real mode")
        m.image_range = (load, load + size)
        m.entry = entry
        m.mode = cfg.mode
        memory = m.memory
        m.setup = lambda vcpu: setup_vcpu(vcpu, memory, cfg.mode, entry)
    except BaseException:
        m.close()
        raise
    return m


def setup_vcpu(vcpu, memory, mode: Mode, entry: int) -> None:
    cpuid = vcpu.vm.kvm.get_supported_cpuid()
    vcpu.set_cpuid2(cpuid)
    setup_mode(vcpu, memory, mode, entry)


class StreamSink:
    """Guest console output (COM1, hvc0) to a host fd, normally stdout.

    Output waits for a reader that is slow, as a terminal's or a pipe's would: the guest's OUT
    to THR (or the virtio-console I/O thread) returns once its bytes are written. It never
    waits for good, though. A reader that stopped reading (``kvmpy boot | less`` paging, a
    harness that ignores stdout, a terminal that stopped drawing) used to block the vCPU
    thread inside write(2). Then ``--timeout``, Ctrl-C and Ctrl-A x could not end the VM,
    because each waits for the vCPU threads to leave.

    So the sink writes to a pipe or a terminal through a non-blocking open file description of
    its own, made by opening the fd's file again (/proc/self/fd/N). On EAGAIN it waits for
    POLLOUT in slices of POLL_SLICE seconds, and after :meth:`cancel` (the machine is ending)
    it drops what is left. The fd's own flags are never changed, because that description is
    shared with the shell: QEMU's stdio chardev sets O_NONBLOCK on it and leaves the terminal
    so.
    - Regular files never block and are written directly, keeping their offset and O_APPEND.
    - Other fds (a socket, a pty master, which opening again would turn into a new pty) are
      polled before each write. A write larger than the room the poll promised may still
      wait there.
    - A closed reader (EPIPE, EIO, EBADF) drops the output without stopping the guest, and so
      does an fd that is no longer the file it was when the sink was made (stdout closed, its
      number reused for /dev/kvm).
    Writers (vCPU threads, an I/O thread) take turns: one writes its whole data before the
    next. A machine uses the sink from :meth:`Machine.add_output_sink` on, and closes it once
    its threads have stopped. One machine at a time.
    """

    POLL_SLICE = 0.05
    CHUNK = 65536

    def __init__(self, fd: int = 1):
        self.fd = fd
        self.cancelled = False
        self._lock = threading.Lock()     # one writer at a time, in the order they came
        self._wfd: int | None = None      # the fd written through; opened on the first write
        self._poll = None                 # polls _wfd for POLLOUT
        self._poll_first = False          # not a description of our own: poll before writing
        self._slice_ms = int(self.POLL_SLICE * 1000)
        try:
            self._stat = os.fstat(fd)     # what the fd is now, before kvmpy opens anything
        except OSError:
            self._stat = None

    def _open(self) -> int | None:
        """The fd to write through; None: drop the output (the fd is not ours any more)."""
        import stat

        try:
            st = os.fstat(self.fd)
        except OSError:
            return None
        if self._stat is None or not os.path.samestat(st, self._stat):
            return None
        mode = st.st_mode
        if stat.S_ISREG(mode):
            return self.fd
        own = None
        if stat.S_ISFIFO(mode) or (stat.S_ISCHR(mode) and os.isatty(self.fd)
                                   and not _is_pty_master(self.fd)):
            own = self._reopen(st)
        self._poll_first = own is None
        return self.fd if own is None else own

    def _reopen(self, st: os.stat_result) -> int | None:
        """A non-blocking description of the fd's file of our own, or None."""
        try:
            new = os.open(f"/proc/self/fd/{self.fd}",
                          os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            return None                   # e.g. a FIFO whose reader is gone: EPIPE follows
        if not os.path.samestat(os.fstat(new), st):
            os.close(new)
            return None
        return new

    def _wait_for_room(self, wfd: int) -> bool:
        """poll(2) ``wfd`` for POLLOUT for up to POLL_SLICE seconds (writer lock held)."""
        if self._poll is None:            # first time the reader lags: not on the fast path
            import select

            self._poll = select.poll()
            self._poll.register(wfd, select.POLLOUT)
        return bool(self._poll.poll(self._slice_ms))

    def start(self) -> None:
        """A machine starts using the sink (after another one, perhaps): output flows."""
        self.cancelled = False

    def cancel(self) -> None:
        """The machine is ending: drop output from now on, including a write that waits."""
        self.cancelled = True

    def close(self) -> None:
        """Close the description of our own; called when no thread can write any more."""
        self.cancelled = True
        with self._lock:
            wfd, self._wfd, self._poll, self._poll_first = self._wfd, None, None, False
        if wfd is not None and wfd >= 0 and wfd != self.fd:   # (-1: output was dropped)
            os.close(wfd)

    def __call__(self, data: bytes) -> None:
        with self._lock:
            if self.cancelled:
                return
            wfd = self._wfd
            if wfd is None:
                opened = self._open()
                wfd = self._wfd = -1 if opened is None else opened
            if wfd < 0:
                return
            if not self._poll_first:   # the usual case: one write (per UART byte: keep it short)
                try:
                    n = os.write(wfd, data)
                except BlockingIOError:
                    n = 0
                except OSError:        # a closed stdout must not stop the guest
                    return
                if n == len(data):
                    return
                data = data[n:]
            self._write_rest(wfd, memoryview(data))

    def _write_rest(self, wfd: int, view: memoryview) -> None:
        """Write ``view``, waiting for room in POLL_SLICE slices until cancelled."""
        while view and not self.cancelled:
            if self._poll_first and not self._wait_for_room(wfd):
                continue
            try:
                n = os.write(wfd, view[:self.CHUNK])
            except BlockingIOError:           # the reader is not reading: wait for room
                if not self._poll_first:          # (otherwise the loop's top waits)
                    self._wait_for_room(wfd)
                continue
            except OSError:
                return
            view = view[n:]


def _is_pty_master(fd: int) -> bool:
    """TIOCGPTN (asm-generic/ioctls.h: _IOR('T', 0x30, unsigned int)) works on a pty master
    only. Opening a master's /proc/self/fd link opens /dev/ptmx: a new pty, not this one."""
    import fcntl

    try:
        fcntl.ioctl(fd, 0x80045430, b"\0\0\0\0")
    except OSError:
        return False
    return True


class SinkWriter:
    """A text file's write() over a :class:`StreamSink` (``--trace -`` to stderr)."""

    def __init__(self, sink: StreamSink):
        self.sink = sink

    def write(self, text: str) -> int:
        self.sink(text.encode())
        return len(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.sink.close()


def stdout_sink(fd: int = 1) -> StreamSink:
    return StreamSink(fd)
