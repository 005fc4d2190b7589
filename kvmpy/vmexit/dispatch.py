"""The exit dispatcher: what kvmpy does about each decoded exit.

``Dispatcher.handle(exit, vcpu)`` is one match on the exit reason. Port and MMIO accesses go to
the bus; an access nobody claims reads as all-ones and a write to it is dropped, both counted
(``stats``) and traced. A device that raises anything but :class:`VmStop` is contained here: the
access is completed as if unclaimed, the error counted and reported once per device, and the VM
goes on (shared/hostile-inputs.md item 13). Exits that end the VM return an :class:`Outcome`.

The dispatcher does not run the vCPU (kvmpy/vcpu/runner.py does) and does not decode kvm_run
(kvmpy/vmexit/exits.py does).
"""
from __future__ import annotations

import collections
import struct
import sys
import threading

from kvmpy._ffi import ffi
from kvmpy.outcome import ExitStatus, Outcome, StopReason, VmStop
from kvmpy.vmexit.bus import Mapping, MmioBus, PioBus
from kvmpy.vmexit.exits import Exit, ExitReason, InternalSuberror

_SIZE_FMT = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"),
             8: struct.Struct("<Q")}
_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
_RFLAGS_IF = 1 << 9  # Intel SDM vol. 1, 3.4.3.3: interrupt enable flag


class Stats:
    """Exit counts by reason, unclaimed accesses, and contained device errors."""

    def __init__(self) -> None:
        self.by_reason: collections.Counter[str] = collections.Counter()
        self.unclaimed_pio: collections.Counter[int] = collections.Counter()
        self.unclaimed_mmio: collections.Counter[int] = collections.Counter()
        self.device_errors: collections.Counter[str] = collections.Counter()


class Dispatcher:
    def __init__(self, pio: PioBus, mmio: MmioBus, memory=None, tracer=None,
                 has_irqchip: bool = False, debug_handler=None):
        self.pio = pio
        self.mmio = mmio
        self.memory = memory
        self.tracer = tracer
        self.has_irqchip = has_irqchip
        self.debug_handler = debug_handler
        self.stats = Stats()
        self._pio_slots = pio.slots
        self._io_exits = 0   # counted apart from by_reason: the hot path avoids the Counter
        self._mmio_exits = 0
        self._lock = threading.Lock()
        self._reported: set[str] = set()

    # -- the match -------------------------------------------------------------------------
    def handle(self, exit: Exit, vcpu) -> Outcome | None:
        """Handle one exit; an Outcome means the VM ends."""
        reason = exit.reason
        if reason is ExitReason.IO:
            self._io_exits += 1
            return self.handle_io(exit, vcpu)
        if reason is ExitReason.MMIO:
            self._mmio_exits += 1
            return self.handle_mmio(exit, vcpu)
        self.stats.by_reason[reason.name] += 1
        if self.tracer is not None:
            self.tracer.record(vcpu, {"reason": reason.name, **_trace_fields(exit)})
        match reason:
            case ExitReason.HLT:
                return self.on_hlt(vcpu)
            case ExitReason.INTR | ExitReason.IRQ_WINDOW_OPEN:
                return None
            case ExitReason.SHUTDOWN:
                from kvmpy.vcpu.report import describe_stop

                return Outcome(StopReason.TRIPLE_FAULT, ExitStatus.TRIPLE_FAULT,
                               "the guest triple-faulted (KVM_EXIT_SHUTDOWN)",
                               describe_stop(vcpu, self.memory, "triple fault"))
            case ExitReason.INTERNAL_ERROR:
                from kvmpy.vcpu.report import describe_internal_error

                return Outcome(StopReason.EMULATION_FAILURE, ExitStatus.EMULATION_FAILURE,
                               _internal_detail(exit),
                               describe_internal_error(vcpu, self.memory, exit))
            case ExitReason.DEBUG:
                if self.debug_handler is not None:
                    return self.debug_handler(exit, vcpu)
                return None
            case ExitReason.SYSTEM_EVENT:
                return Outcome(StopReason.SYSTEM_EVENT,
                               ExitStatus.OK if exit.type in (1, 2) else ExitStatus.FAIL_ENTRY,
                               f"system event {exit.type} (KVM_SYSTEM_EVENT_*)")
            case ExitReason.FAIL_ENTRY:
                return Outcome(StopReason.FAIL_ENTRY, ExitStatus.FAIL_ENTRY,
                               f"KVM could not enter the guest (hardware entry failure reason "
                               f"{exit.hardware_reason:#x} on cpu {exit.cpu})")
            case _:
                return Outcome(StopReason.FAIL_ENTRY, ExitStatus.FAIL_ENTRY,
                               f"unexpected exit {reason.name} ({int(reason)}) that kvmpy "
                               "does not handle")

    def exit_counts(self) -> collections.Counter[str]:
        c = collections.Counter(self.stats.by_reason)
        if self._io_exits:
            c["IO"] = self._io_exits
        if self._mmio_exits:
            c["MMIO"] = self._mmio_exits
        return c

    # -- port I/O ---------------------------------------------------------------------------
    def handle_io(self, e, vcpu) -> Outcome | None:
        if self.tracer is None and e.count == 1:
            # The hot path (one IN/OUT to a device, no trace), inlined: this is most exits.
            m = self._pio_slots[e.port]
            fmt = _SIZE_FMT.get(e.size)
            if m is not None and fmt is not None:
                try:
                    if e.is_write:
                        m.writes += 1
                        m.device.write(e.port - m.base, e.size,
                                       fmt.unpack_from(vcpu.run_buffer, e.data_offset)[0])
                    else:
                        m.reads += 1
                        fmt.pack_into(vcpu.run_buffer, e.data_offset,
                                      int(m.device.read(e.port - m.base, e.size)) & _ONES[e.size])
                except VmStop:
                    raise
                except Exception as err:   # the device boundary, as in _call_read/_call_write
                    self._device_error(m, err)
                    if not e.is_write:
                        fmt.pack_into(vcpu.run_buffer, e.data_offset, _ONES[e.size])
                return None
        if self.tracer is None:
            self._io(e, vcpu.run_buffer, None)
            return None
        values: list[int] = []
        try:   # trace the access even when the device ends the VM with it
            self._io(e, vcpu.run_buffer, values)
        finally:
            self._trace_access(vcpu, "IO", "port", e.port, e.size, e.is_write, values,
                               self.pio.slots[e.port])
        return None

    def _io(self, e, buf, values: list[int] | None) -> None:
        size = e.size
        fmt = _SIZE_FMT.get(size)
        if fmt is None:   # KVM only produces 1, 2 and 4; anything else is ignored, not trusted
            return
        m = self.pio.slots[e.port]
        off = e.data_offset
        for _ in range(e.count):   # count > 1 for string I/O (rep ins/outs)
            if e.is_write:
                value = fmt.unpack_from(buf, off)[0]
                if values is not None:
                    values.append(value)
                if m is None:
                    self.stats.unclaimed_pio[e.port] += 1
                else:
                    m.writes += 1
                    self._call_write(m, e.port - m.base, size, value)
            else:
                if m is None:
                    self.stats.unclaimed_pio[e.port] += 1
                    value = _ONES[size]
                else:
                    m.reads += 1
                    value = self._call_read(m, e.port - m.base, size) & _ONES[size]
                fmt.pack_into(buf, off, value)
                if values is not None:
                    values.append(value)
            off += size

    # -- MMIO -------------------------------------------------------------------------------
    def handle_mmio(self, e, vcpu) -> Outcome | None:
        if self.tracer is None:
            self._mmio(e, None)
            return None
        values: list[int] = []
        try:
            self._mmio(e, values)
        finally:
            self._trace_access(vcpu, "MMIO", "addr", e.address, e.length, e.is_write, values,
                               self.mmio.lookup(e.address))
        return None

    def _mmio(self, e, values: list[int] | None) -> None:
        length = e.length
        if length not in _ONES:
            # Only 1/2/4/8 reach devices; other widths read as all-ones, writes are dropped.
            n = min(length, 8)
            if not e.is_write:
                ffi.memmove(e.data, b"\xff" * n, n)
            self.stats.unclaimed_mmio[e.address] += 1
            return
        m = self.mmio.lookup(e.address)
        if e.is_write:
            value = int.from_bytes(ffi.buffer(e.data, length), "little")
            if values is not None:
                values.append(value)
            if m is None:
                self.stats.unclaimed_mmio[e.address] += 1
            else:
                m.writes += 1
                self._call_write(m, e.address - m.base, length, value)
        else:
            if m is None:
                self.stats.unclaimed_mmio[e.address] += 1
                value = _ONES[length]
            else:
                m.reads += 1
                value = self._call_read(m, e.address - m.base, length) & _ONES[length]
            ffi.memmove(e.data, value.to_bytes(length, "little"), length)
            if values is not None:
                values.append(value)

    # -- the device boundary ----------------------------------------------------------------
    def _call_read(self, m: Mapping, offset: int, size: int) -> int:
        try:
            return int(m.device.read(offset, size))
        except VmStop:
            raise
        except Exception as err:
            self._device_error(m, err)
            return _ONES[size]

    def _call_write(self, m: Mapping, offset: int, size: int, value: int) -> None:
        try:
            m.device.write(offset, size, value)
        except VmStop:
            raise
        except Exception as err:
            self._device_error(m, err)

    def _device_error(self, m: Mapping, err: Exception) -> None:
        with self._lock:
            self.stats.device_errors[m.name] += 1
            first = m.name not in self._reported
            self._reported.add(m.name)
        if first:
            print(f"kvmpy: device {m.name} failed on a guest access and was contained: "
                  f"{type(err).__name__}: {err}", file=sys.stderr)

    def _trace_access(self, vcpu, reason: str, key: str, where: int, size: int,
                      is_write: bool, values: list[int], m: Mapping | None) -> None:
        entry = {"reason": reason, key: where, "size": size,
                 "dir": "out" if is_write else "in"}
        if reason == "IO":
            entry["count"] = len(values)
        entry["data"] = values[0] if len(values) == 1 else values   # [] if a device failed
        if m is None:
            entry["device"] = "unassigned"
        else:
            entry["device"] = m.name
            reg = m.device.register_name(where - m.base, is_write)
            if reg:
                entry["register"] = reg
        self.tracer.record(vcpu, entry)

    # -- HLT --------------------------------------------------------------------------------
    def on_hlt(self, vcpu) -> Outcome:
        # Without an in-kernel irqchip nothing can wake a halted vCPU, so HLT ends the guest.
        # (With one, KVM handles HLT itself and this exit does not happen.)
        rflags = vcpu.get_regs().rflags
        if rflags & _RFLAGS_IF:
            detail = "guest halted with interrupts enabled, and no interrupt source can wake it"
        else:
            detail = "guest halted with interrupts disabled"
        return Outcome(StopReason.HALT, ExitStatus.OK, detail)


def _internal_detail(e) -> str:
    try:
        sub = InternalSuberror(e.suberror).name
    except ValueError:
        sub = str(e.suberror)
    return f"KVM_EXIT_INTERNAL_ERROR (suberror {sub})"


def _trace_fields(e: Exit) -> dict:
    out = {}
    for k, v in e.fields().items():
        if isinstance(v, (int, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, bytes):
            out[k] = v.hex(" ")
        elif isinstance(v, tuple):
            out[k] = list(v)
    return out
