"""Typed VM exits, decoded from ``struct kvm_run`` (include/uapi/linux/kvm.h).

Decoding is separate from handling: :class:`ExitDecoder` turns the shared ``kvm_run`` page into
one of the exit objects below and does nothing else; kvmpy/vmexit/dispatch.py decides what to do.
A decoder works on any ``struct kvm_run *`` cdata, so tests build one with ``ffi.new`` and need
no /dev/kvm.

Exit objects are reused: the decoder owns one instance per kind and refills it on each exit, so
the per-exit path allocates no objects. Copy what you keep (``dataclasses.replace`` or
``exit.snapshot()``) before the next KVM_RUN.
"""
from __future__ import annotations

import enum
import struct

from kvmpy._ffi import ffi, lib

ExitReason = enum.IntEnum("ExitReason", {name[len("KVM_EXIT_"):]: getattr(lib, name)
                                         for name in (
    "KVM_EXIT_UNKNOWN", "KVM_EXIT_EXCEPTION", "KVM_EXIT_IO", "KVM_EXIT_HYPERCALL",
    "KVM_EXIT_DEBUG", "KVM_EXIT_HLT", "KVM_EXIT_MMIO", "KVM_EXIT_IRQ_WINDOW_OPEN",
    "KVM_EXIT_SHUTDOWN", "KVM_EXIT_FAIL_ENTRY", "KVM_EXIT_INTR", "KVM_EXIT_SET_TPR",
    "KVM_EXIT_TPR_ACCESS", "KVM_EXIT_NMI", "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_SYSTEM_EVENT")})
ExitReason.__doc__ = "kvm_run.exit_reason (include/uapi/linux/kvm.h KVM_EXIT_*)."


class InternalSuberror(enum.IntEnum):
    """kvm_run.internal.suberror (KVM_INTERNAL_ERROR_*)."""

    EMULATION = lib.KVM_INTERNAL_ERROR_EMULATION
    SIMUL_EX = lib.KVM_INTERNAL_ERROR_SIMUL_EX
    DELIVERY_EV = lib.KVM_INTERNAL_ERROR_DELIVERY_EV
    UNEXPECTED_EXIT_REASON = lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON


class Exit:
    __slots__ = ()
    reason: ExitReason

    def fields(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        inner = " ".join(f"{k}={v:#x}" if isinstance(v, int) and not isinstance(v, bool)
                         else f"{k}={v!r}" for k, v in self.fields().items())
        return f"<{type(self).__name__} {inner}>"


class IoExit(Exit):
    """KVM_EXIT_IO: IN/OUT (and string INS/OUTS) to ``port``.

    ``count`` elements of ``size`` bytes live in the kvm_run page at ``data_offset``; for IN the
    handler writes them there before the next KVM_RUN.
    """

    __slots__ = ("port", "size", "is_write", "count", "data_offset")
    reason = ExitReason.IO

    def __init__(self) -> None:
        self.port = self.size = self.count = self.data_offset = 0
        self.is_write = False


class MmioExit(Exit):
    """KVM_EXIT_MMIO: a load/store to a guest-physical address not backed by a memory slot.

    ``data`` is the kvm_run.mmio.data cdata array (8 bytes): the value written, or where the
    handler puts the value read.
    """

    __slots__ = ("address", "length", "is_write", "data")
    reason = ExitReason.MMIO

    def __init__(self, data) -> None:
        self.address = self.length = 0
        self.is_write = False
        self.data = data


class HltExit(Exit):
    __slots__ = ()
    reason = ExitReason.HLT


class ShutdownExit(Exit):
    """KVM_EXIT_SHUTDOWN: triple fault (or a shutdown the CPU would do)."""

    __slots__ = ()
    reason = ExitReason.SHUTDOWN


class InternalErrorExit(Exit):
    """KVM_EXIT_INTERNAL_ERROR: KVM could not go on, e.g. its emulator failed on an instruction.

    For EMULATION with KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES in data[0], data[1..]
    start with ``insn_size`` and up to 15 instruction bytes (struct emulation_failure).
    """

    __slots__ = ("suberror", "data", "insn_bytes")
    reason = ExitReason.INTERNAL_ERROR

    def __init__(self) -> None:
        self.suberror = 0
        self.data: tuple[int, ...] = ()
        self.insn_bytes: bytes | None = None


class FailEntryExit(Exit):
    __slots__ = ("hardware_reason", "cpu")
    reason = ExitReason.FAIL_ENTRY

    def __init__(self) -> None:
        self.hardware_reason = self.cpu = 0


class SystemEventExit(Exit):
    __slots__ = ("type", "data")
    reason = ExitReason.SYSTEM_EVENT

    def __init__(self) -> None:
        self.type = 0
        self.data: tuple[int, ...] = ()


class DebugExit(Exit):
    """KVM_EXIT_DEBUG: single-step or a hardware breakpoint (KVM_SET_GUEST_DEBUG)."""

    __slots__ = ("exception", "pc", "dr6", "dr7")
    reason = ExitReason.DEBUG

    def __init__(self) -> None:
        self.exception = self.pc = self.dr6 = self.dr7 = 0


class IrqWindowOpenExit(Exit):
    __slots__ = ()
    reason = ExitReason.IRQ_WINDOW_OPEN


class IntrExit(Exit):
    """KVM_EXIT_INTR: a signal interrupted the guest (kvmpy's stop request, usually)."""

    __slots__ = ()
    reason = ExitReason.INTR


class UnknownExit(Exit):
    __slots__ = ("code", "hardware_reason")
    reason = ExitReason.UNKNOWN

    def __init__(self) -> None:
        self.code = self.hardware_reason = 0


_IO = struct.Struct("<BBHIQ")  # struct kvm_run.io: direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8xIB")  # struct kvm_run.mmio: phys_addr, data[8], len, is_write


class ExitDecoder:
    """Decodes the ``struct kvm_run`` at ``run`` (cdata) into typed exits."""

    def __init__(self, run, buffer: memoryview | None = None):
        self.run = run
        self.buffer = buffer if buffer is not None else memoryview(ffi.buffer(run))
        self._union = lib.KVMPY_RUN_UNION_OFFSET  # offset of the exit-specific union
        union = ffi.cast("char *", run) + self._union
        self._internal = ffi.cast("struct kvmpy_exit_internal *", union)
        self._fail = ffi.cast("struct kvmpy_exit_fail_entry *", union)
        self._event = ffi.cast("struct kvmpy_exit_system_event *", union)
        self._debug = ffi.cast("struct kvmpy_exit_debug *", union)
        self._hw = ffi.cast("struct kvmpy_exit_hw *", union)
        mmio = ffi.cast("struct kvmpy_exit_mmio *", union)
        self.io = IoExit()
        self.mmio = MmioExit(mmio.data)
        self.hlt = HltExit()
        self.shutdown = ShutdownExit()
        self.internal = InternalErrorExit()
        self.fail_entry = FailEntryExit()
        self.system_event = SystemEventExit()
        self.debug = DebugExit()
        self.irq_window = IrqWindowOpenExit()
        self.intr = IntrExit()
        self.unknown = UnknownExit()

    def decode(self) -> Exit:
        reason = self.run.exit_reason
        if reason == 2:  # KVM_EXIT_IO, the hot path: one unpack, no allocation besides ints
            e = self.io
            d, e.size, e.port, e.count, e.data_offset = _IO.unpack_from(self.buffer, self._union)
            e.is_write = d == 1  # KVM_EXIT_IO_OUT
            return e
        if reason == 6:  # KVM_EXIT_MMIO
            e = self.mmio
            e.address, e.length, w = _MMIO.unpack_from(self.buffer, self._union)
            e.is_write = w != 0
            return e
        return self._decode_other(reason)

    def _decode_other(self, reason: int) -> Exit:
        if reason == ExitReason.HLT:
            return self.hlt
        if reason == ExitReason.SHUTDOWN:
            return self.shutdown
        if reason == ExitReason.INTR:
            return self.intr
        if reason == ExitReason.INTERNAL_ERROR:
            e = self.internal
            e.suberror = self._internal.suberror
            n = min(self._internal.ndata, 16)
            e.data = tuple(self._internal.data[i] for i in range(n))
            e.insn_bytes = None
            if (e.suberror == lib.KVM_INTERNAL_ERROR_EMULATION and n >= 3
                    and e.data[0] & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES):
                # struct emulation_failure: u64 flags, then u8 insn_size, u8 insn_bytes[15]
                raw = b"".join(v.to_bytes(8, "little") for v in e.data[1:3])
                e.insn_bytes = raw[1:1 + min(raw[0], 15)]
            return e
        if reason == ExitReason.FAIL_ENTRY:
            e = self.fail_entry
            e.hardware_reason = self._fail.hardware_entry_failure_reason
            e.cpu = self._fail.cpu
            return e
        if reason == ExitReason.SYSTEM_EVENT:
            e = self.system_event
            e.type = self._event.type
            e.data = tuple(self._event.data[i] for i in range(min(self._event.ndata, 16)))
            return e
        if reason == ExitReason.DEBUG:
            e = self.debug
            a = self._debug.arch
            e.exception, e.pc, e.dr6, e.dr7 = a.exception, a.pc, a.dr6, a.dr7
            return e
        if reason == ExitReason.IRQ_WINDOW_OPEN:
            return self.irq_window
        e = self.unknown
        e.code = reason
        e.hardware_reason = self._hw.hardware_exit_reason
        return e
