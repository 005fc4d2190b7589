"""What every virtio device has, whatever its transport: features, status, config space, queues.

:class:`VirtioDevice` holds the device status and enforces its state machine (virtio 1.2 2.1 and
3.1.1), negotiates features (2.2), owns the virtqueues and runs them: a notification for queue
``i`` becomes :meth:`VirtioDevice.notify`, which calls the ``process_queue`` hook. The default
hook pops requests, hands each to ``handle_request`` (what a concrete device such as
:mod:`kvmpy.virtio.blk` implements) and completes it with the byte count it returns.

The device boundary: a :class:`~kvmpy.virtio.queue.QueueError` (the driver broke the ring) or any
other exception from a handler (a device bug, or a host error the device did not expect) is
caught in :meth:`notify`, counted in ``errors``, reported once on stderr, and turns into
DEVICE_NEEDS_RESET with a configuration-change interrupt (2.1.2). The device then ignores its
queues until the driver resets it; the VMM goes on (shared/hostile-inputs.md item 13).

Status state machine (the driver's writes; 3.1.1 gives the order):

    0 --ACKNOWLEDGE--> 1 --DRIVER--> 3 --FEATURES_OK--> 11 --DRIVER_OK--> 15
    any --FAILED--> FAILED set (only a reset leaves it)      any --0--> reset

A write that clears a bit (other than by writing 0), sets a bit before its predecessor, sets an
undefined bit, or comes after FAILED is rejected: the status does not change. FEATURES_OK is
refused (left clear, as 3.1.1 step 6 expects the driver to check) when the driver accepted a
feature the device did not offer or did not accept VIRTIO_F_VERSION_1. DEVICE_NEEDS_RESET is the
device's bit: the driver's copy of it is ignored.

This module does not know about registers, MMIO or interrupts lines: a transport
(:mod:`kvmpy.virtio.mmio`) maps its registers onto these methods and gives the device an
``interrupt(bits)`` callable. It does not run threads either: whoever calls :meth:`notify` (a vCPU
thread, or the I/O thread) runs the request. One re-entrant lock serialises everything that
changes device state.
"""
from __future__ import annotations

import collections
import contextlib
import enum
import sys
import threading
from collections.abc import Callable, Sequence

from kvmpy.virtio.queue import DescriptorChain, Queue, QueueError


class DeviceType(enum.IntEnum):
    """Device IDs (virtio 1.2 section 5, "Device Types")."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4


class Status(enum.IntFlag):
    """Device status bits (2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class Feature(enum.IntFlag):
    """Device-independent feature bits (6, "Reserved Feature Bits"), as masks."""

    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    VERSION_1 = 1 << 32


class Interrupt(enum.IntFlag):
    """Why the device interrupts: virtio-mmio InterruptStatus bits (4.2.2), the same as the
    virtio-pci ISR status bits (4.1.4.5)."""

    USED_BUFFER = 1
    CONFIG_CHANGE = 2


# Plain ints: ``~`` on an IntFlag complements within the defined bits only, and the state
# machine must see undefined bits too.
_DRIVER_OK, _FEATURES_OK = int(Status.DRIVER_OK), int(Status.FEATURES_OK)
_NEEDS_RESET, _FAILED = int(Status.DEVICE_NEEDS_RESET), int(Status.FAILED)
# The driver-settable status bits in the order 3.1.1 sets them: each needs the one before it.
_ORDER = (int(Status.ACKNOWLEDGE), int(Status.DRIVER), _FEATURES_OK, _DRIVER_OK)
_DRIVER_BITS = sum(_ORDER) | _FAILED
# notify(poll=True): batches run back to back while polls find more, before the I/O thread's
# loop gets control back (each round is at most a batch and one poll window).
POLL_ROUNDS = 64


class VirtioDevice:
    """Base class of virtio devices. Subclasses set ``device_type`` and ``name``, pass their
    feature bits, config space and queue sizes, and implement :meth:`handle_request` (or, for
    devices that do not complete requests one at a time, :meth:`process_queue`)."""

    device_type: DeviceType
    name: str = "virtio"

    def __init__(self, memory, queue_sizes: Sequence[int], features: int = 0,
                 config: bytes = b"", indirect_desc: bool = True, event_idx: bool = True):
        self.memory = memory
        offered = int(features) | Feature.VERSION_1
        if indirect_desc:
            offered |= Feature.INDIRECT_DESC
        if event_idx:
            offered |= Feature.EVENT_IDX
        self.device_features = int(offered)
        self.driver_features = 0
        self.status = 0
        self.queues = [Queue(memory, i, size) for i, size in enumerate(queue_sizes)]
        self.config = bytearray(config)
        self.config_generation = 0
        self.lock = threading.RLock()
        #: set by the transport: called with Interrupt bits when the driver must be told
        self.interrupt: Callable[[int], None] | None = None
        #: contained errors by kind: "ring", "handler", "activate", "status" (rejected writes)
        self.errors: collections.Counter[str] = collections.Counter()
        self.last_error: str | None = None
        self._reported = False

    # -- state ---------------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        """DRIVER_OK, and neither DEVICE_NEEDS_RESET nor FAILED: queues may be processed."""
        s = self.status
        return bool(s & _DRIVER_OK) and not s & (_NEEDS_RESET | _FAILED)

    def has_feature(self, feature: int) -> bool:
        """Whether ``feature`` (a mask) was negotiated."""
        return self.driver_features & feature == feature

    # -- feature negotiation (2.2) -------------------------------------------------------------
    def device_features_word(self, word: int) -> int:
        """Bits 32*word .. 32*word+31 of the offered features (0 past the last)."""
        if not 0 <= word < 2:
            return 0
        return (self.device_features >> (32 * word)) & 0xFFFFFFFF

    def set_driver_features_word(self, word: int, value: int) -> bool:
        """The driver accepts features ``value`` in word ``word``. Ignored (False) unless the
        driver is between DRIVER and FEATURES_OK (3.1.1 steps 4-5: "MUST NOT accept new feature
        bits after" FEATURES_OK)."""
        with self.lock:
            s = self.status
            if not s & Status.DRIVER or s & (_FEATURES_OK | _FAILED) or not 0 <= word < 2:
                self.errors["status"] += 1
                return False
            shift = 32 * word
            mask = 0xFFFFFFFF << shift
            self.driver_features = (self.driver_features & ~mask) | ((value & 0xFFFFFFFF) << shift)
            return True

    def features_acceptable(self, features: int) -> bool:
        """Whether FEATURES_OK may be set for the driver's ``features``. Subclasses may refuse
        more combinations (calling this first)."""
        return features & ~self.device_features == 0 and bool(features & Feature.VERSION_1)

    # -- status (2.1, 3.1.1) -------------------------------------------------------------------
    def set_status(self, value: int) -> bool:
        """The driver writes ``value`` to the device status. Returns False if it was rejected."""
        with self.lock:
            value &= 0xFF
            if value == 0:
                self.reset()
                return True
            old = self.status
            current = old & _DRIVER_BITS
            wanted = value & ~_NEEDS_RESET          # the device's bit, not the driver's
            if old & _FAILED or wanted & ~_DRIVER_BITS:
                return self._reject_status()        # after FAILED, or an undefined bit
            if wanted & _FAILED:   # 3.1.1: the driver gives up; allowed at any point
                self.status = old | _FAILED
                return True
            if current & ~wanted:
                return self._reject_status()        # clears a bit without a reset
            for before, bit in zip(_ORDER, _ORDER[1:]):
                if wanted & bit and not wanted & before:
                    return self._reject_status()    # a step skipped
            new_bits = wanted & ~current
            if new_bits & _FEATURES_OK and not self.features_acceptable(self.driver_features):
                if wanted & _DRIVER_OK:
                    return self._reject_status()
                wanted &= ~_FEATURES_OK             # 3.1.1 step 6: the driver sees it clear
                self.errors["status"] += 1
            self.status = wanted | (old & _NEEDS_RESET)
            if new_bits & _DRIVER_OK:
                self._guarded(self.on_driver_ok)
            return True

    def _reject_status(self) -> bool:
        self.errors["status"] += 1
        return False

    def reset(self) -> None:
        """Device reset (2.4): status, features and queues back to their initial state."""
        with self.lock:
            self.status = 0
            self.driver_features = 0
            for q in self.queues:
                q.reset()
            self._guarded(self.on_reset)

    def queue_ready(self, index: int) -> bool:
        """The driver set QueueReady for queue ``index``: validate and start it. A queue that
        cannot be activated stays not ready and the device needs a reset (hostile-inputs 7)."""
        with self.lock:
            q = self.queues[index]
            try:
                q.activate(event_idx=self.has_feature(Feature.EVENT_IDX),
                           indirect=self.has_feature(Feature.INDIRECT_DESC))
            except QueueError as e:
                self.needs_reset(f"queue {index} cannot be activated: {e}", "activate")
                return False
            return True

    def needs_reset(self, reason: str, kind: str = "handler") -> None:
        """Enter the error state: DEVICE_NEEDS_RESET and a config-change interrupt (2.1.2)."""
        with self.lock:
            self.errors[kind] += 1
            self.last_error = reason
            if not self._reported:
                self._reported = True
                print(f"kvmpy: virtio device {self.name} needs a reset: {reason}",
                      file=sys.stderr)
            if self.status & _NEEDS_RESET:
                return
            self.status |= _NEEDS_RESET
            self._signal(Interrupt.CONFIG_CHANGE)

    # -- queues --------------------------------------------------------------------------------
    def notify(self, index: int, poll: bool = False) -> bool:
        """The driver notified queue ``index``. Processes a bounded batch of its requests and
        returns True if more may be waiting (the caller should call again later). ``poll``:
        the caller is an I/O thread that may be kept a little longer: after each batch
        :meth:`poll_queue` may watch the ring, and what it finds is run here at once."""
        for _ in range(POLL_ROUNDS if poll else 1):
            with self.lock:
                if not self.live or not 0 <= index < len(self.queues):
                    return False
                q = self.queues[index]
                if not q.ready:
                    return False
                more = False
                try:
                    more = bool(self.process_queue(q))
                except QueueError as e:
                    self.needs_reset(f"queue {index}: {e}", "ring")
                except Exception as e:   # the device boundary (hostile-inputs 13)
                    self.needs_reset(f"queue {index}: {type(e).__name__}: {e}", "handler")
                try:
                    if q.needs_interrupt():
                        self._signal(Interrupt.USED_BUFFER)
                except Exception as e:   # e.g. an interrupt callable that failed
                    self.needs_reset(f"queue {index}: interrupt: {type(e).__name__}: {e}",
                                     "handler")
                if more or not poll or not self.live:
                    return more and self.live
            # Polling happens without the lock: vCPU threads touching the device's registers
            # meanwhile are not held up by the busy-wait.
            try:
                more = self.poll_queue(q)
            except Exception as e:
                self.needs_reset(f"queue {index}: poll: {type(e).__name__}: {e}", "handler")
            if not more or not self.live:
                return False
            # The driver made more available: run it here rather than through the I/O
            # thread's loop (an epoll call and an eventfd read that finds nothing, since the
            # driver need not notify while we poll), up to POLL_ROUNDS times, after which the
            # thread's other fds (and its stop request) get their turn.
        return True

    def poll_queue(self, queue: Queue) -> bool:
        """Called when ``queue`` ran empty and its completions were signalled, without the
        device lock (take it to write anything, and cope with a concurrent reset): a device
        may watch the ring a little longer and return True if the driver made more available
        (notify then runs it at once). Default: no polling."""
        return False

    @contextlib.contextmanager
    def boundary(self, index: int):
        """For work a device does outside notify() (host input arriving on another thread):
        a bad ring or a device bug sets DEVICE_NEEDS_RESET instead of escaping."""
        try:
            yield
        except QueueError as e:
            self.needs_reset(f"queue {index}: {e}", "ring")
        except Exception as e:   # the device boundary (hostile-inputs 13)
            self.needs_reset(f"queue {index}: {type(e).__name__}: {e}", "handler")

    def process_queue(self, queue: Queue) -> bool:
        """Run requests of ``queue``: at most its size per call, so one notification costs
        bounded work however fast the driver refills (hostile-inputs 15). True if the budget ran
        out (more may be waiting)."""
        pop, handle, add_used = queue.pop, self.handle_request, queue.add_used
        try:
            for _ in range(queue.size):
                chain = pop()
                if chain is None:
                    return False
                add_used(chain.head, handle(queue, chain), False)
            return True
        finally:
            queue.publish_used()     # once per batch, also when a bad chain ends it

    def handle_request(self, queue: Queue, chain: DescriptorChain) -> int:
        """Do one request; return the number of bytes written into its writable buffers."""
        raise NotImplementedError

    # -- config space (2.5) --------------------------------------------------------------------
    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the device-specific config at ``offset`` (0xff beyond its end)."""
        data = bytes(self.config[offset:offset + size]) if offset >= 0 else b""
        return data + b"\xff" * (size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver writes config bytes. Default: every field is read-only, writes dropped."""

    def config_changed(self) -> None:
        """Call after changing ``config``: new generation (2.5) and a config interrupt."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            if self.status & _DRIVER_OK:
                self._signal(Interrupt.CONFIG_CHANGE)

    # -- hooks ---------------------------------------------------------------------------------
    def on_driver_ok(self) -> None:
        """The driver set DRIVER_OK (features are final, queues configured)."""

    def on_reset(self) -> None:
        """The device was reset (written 0 to the status)."""

    def close(self) -> None:
        """Release host resources (files). Called once the device can no longer be reached."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------
    def _signal(self, bits: int) -> None:
        cb = self.interrupt
        if cb is not None:
            cb(int(bits))

    def _guarded(self, hook: Callable[[], None]) -> None:
        try:
            hook()
        except Exception as e:
            self.needs_reset(f"{hook.__name__}: {type(e).__name__}: {e}", "handler")
