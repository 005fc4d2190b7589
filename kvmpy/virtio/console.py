"""virtio-console (virtio 1.2 section 5.3): one port, the guest's /dev/hvc0.

Two queues (5.3.2): receiveq 0 carries host -> guest bytes in buffers the driver posts;
transmitq 1 carries guest -> host bytes, handed to ``sink``. No feature bits are offered (no
MULTIPORT, SIZE or EMERG_WRITE), so the config space is not used (5.3.4).

Host input arrives through :meth:`feed` (another thread) into a bounded buffer (64 KiB; what
does not fit is refused, so a caller that must not lose input offers at most :meth:`rx_free`
bytes, as kvmpy/console.py does for the UART) and is delivered into receive buffers as soon as
the driver posts some. Guest output is not throttled beyond the sink's own pace.

Guest output is handed to the sink after the device lock is released, under a transmit lock
of its own and in ring order, and its buffers are used (given back, with an interrupt) only
once the sink has returned: as before, a driver that sees its buffer used knows its bytes are
out (Linux's put_chars spins on that before "reboot: Power down"; VM.wait() then finds them in
the console). A sink waiting for a slow reader therefore holds up this device's I/O work only:
host input still goes into receive buffers the driver already posted, and the host side of the
console (Ctrl-A x) is not held up at all; buffers the driver posts meanwhile wait. A round
takes buffers until TX_BATCH bytes are waiting (the rest of the ring is left for the next
round), so what kvmpy holds is bounded by TX_BATCH plus one buffer's TX_CHAIN_MAX.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from kvmpy.virtio.device import DeviceType, Interrupt, VirtioDevice
from kvmpy.virtio.queue import DescriptorChain, Queue

QUEUE_SIZE = 128
RX_BUFFER_MAX = 64 * 1024
TX_BATCH = 64 * 1024   # guest output taken per round before the sink gets it
TX_CHAIN_MAX = 1 << 20   # of one transmit buffer; the rest of a longer one is not sent
RECEIVEQ, TRANSMITQ = 0, 1


class VirtioConsole(VirtioDevice):
    device_type = DeviceType.CONSOLE
    name = "console"

    def __init__(self, memory, sink: Callable[[bytes], object] | None = None,
                 queue_size: int = QUEUE_SIZE):
        super().__init__(memory, [queue_size, queue_size], config=bytes(12))
        self.sink = sink
        self._pending = bytearray()
        self._pending_lock = threading.Lock()
        self.rx_dropped = 0
        self.tx_bytes = 0
        self._tx: list[tuple[int, bytes]] = []   # (head, data) taken, not yet sent and used
        self._tx_size = 0                    # bytes in _tx
        self._tx_lock = threading.Lock()     # around sink calls, without self.lock held
        self._generation = 0                 # reset count: heads taken before a reset are void

    # -- host side (any thread) ------------------------------------------------------------------
    def rx_free(self) -> int:
        with self._pending_lock:
            return RX_BUFFER_MAX - len(self._pending)

    def feed(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were taken."""
        with self._pending_lock:
            n = min(len(data), RX_BUFFER_MAX - len(self._pending))
            self._pending += data[:n]
            self.rx_dropped += len(data) - n
        self.deliver()
        return n

    def deliver(self) -> None:
        """Move pending input into receive buffers the driver posted, then interrupt."""
        with self.lock:
            q = self.queues[RECEIVEQ]
            if not self.live or not q.ready:
                return
            with self.boundary(RECEIVEQ):
                self._fill(q)
                if q.needs_interrupt():
                    self._signal(Interrupt.USED_BUFFER)

    def _fill(self, q: Queue) -> None:
        for _ in range(q.size):
            with self._pending_lock:
                if not self._pending:
                    return
            chain = q.pop()
            if chain is None:
                return
            with self._pending_lock:
                chunk = bytes(self._pending[:chain.write_len])
                written = chain.write(0, chunk) if chunk else 0
                del self._pending[:written]
            q.add_used(chain.head, written)

    # -- guest side ------------------------------------------------------------------------------
    def notify(self, index: int, poll: bool = False) -> bool:
        more = super().notify(index, poll)
        if self._tx:
            self._send()
        return more

    def _send(self) -> None:
        """Give the output taken so far to the sink, outside the device lock, then use its
        buffers (see the module docstring)."""
        with self._tx_lock:
            with self.lock:
                taken, generation = self._tx, self._generation
                self._tx, self._tx_size = [], 0
            if not taken:
                return
            if self.sink is not None:
                with self.boundary(TRANSMITQ):
                    self.sink(b"".join(data for _, data in taken))
            with self.lock:
                q = self.queues[TRANSMITQ]
                if generation != self._generation or not self.live or not q.ready:
                    return                # reset meanwhile: those heads mean nothing now
                with self.boundary(TRANSMITQ):
                    for head, _ in taken:
                        q.add_used(head, 0, False)
                    q.publish_used()
                    if q.needs_interrupt():
                        self._signal(Interrupt.USED_BUFFER)

    def process_queue(self, queue: Queue) -> bool:
        if queue.index == RECEIVEQ:   # new receive buffers: deliver what is waiting
            self._fill(queue)
            return False
        for _ in range(queue.size):
            if self._tx_size >= TX_BATCH:
                return True               # send these first; notify() comes back
            chain = queue.pop()
            if chain is None:
                return False
            data = chain.read(0, min(chain.read_len, TX_CHAIN_MAX))
            self.tx_bytes += len(data)
            self._tx.append((chain.head, data))
            self._tx_size += len(data)
        return True

    def handle_request(self, queue: Queue, chain: DescriptorChain) -> int:
        raise AssertionError("transmitq buffers are used by _send(), receiveq's by _fill()")

    def on_reset(self) -> None:
        with self._pending_lock:
            self._pending.clear()
        # (device lock held) output taken before the reset is still sent, but its heads
        # belong to the old ring
        self._generation += 1
