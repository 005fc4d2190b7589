"""Exit decoding and the run loop, without /dev/kvm: a kvm_run struct from ffi.new, and a fake
vCPU that 'runs' by filling it in the way KVM would."""
import struct

import pytest

from kvmpy._ffi import ffi, lib
from kvmpy.outcome import ExitStatus, Outcome, StopReason, VmStop
from kvmpy.vcpu.runner import run_loop
from kvmpy.vmexit.bus import BusDevice, MmioBus, PioBus
from kvmpy.vmexit.dispatch import Dispatcher
from kvmpy.vmexit.exits import ExitDecoder, ExitReason, InternalErrorExit, IoExit, MmioExit

UNION = lib.KVMPY_RUN_UNION_OFFSET
DATA = 1024  # where our fake KVM puts I/O data in the kvm_run page


class FakeRegs:
    rip = 0x7C00
    rflags = 0x2


class FakeVcpu:
    """Plays KVM: each run() applies the next scripted exit to a kvm_run buffer."""

    id = 0

    def __init__(self, script):
        self.buf = ffi.new("char[]", 4096)
        self.run_struct = ffi.cast("struct kvm_run *", self.buf)
        self.run_buffer = memoryview(ffi.buffer(self.buf))
        self.script = list(script)
        self.after = []   # callbacks to check what the handler left in kvm_run

    def run(self):
        step = self.script.pop(0)
        if step is None:
            return False   # EINTR
        step(self)
        return True

    def get_regs(self):
        return FakeRegs()

    def get_sregs(self):
        raise RuntimeError("no sregs in the fake")


def io(port, size, out, values):
    def apply(v):
        v.run_struct.exit_reason = lib.KVM_EXIT_IO
        struct.pack_into("<BBHIQ", v.run_buffer, UNION, 1 if out else 0, size, port, len(values), DATA)
        fmt = {1: "B", 2: "H", 4: "I"}[size]
        for i, val in enumerate(values):
            struct.pack_into("<" + fmt, v.run_buffer, DATA + i * size, val)
    return apply


def mmio(addr, length, write, value=0):
    def apply(v):
        v.run_struct.exit_reason = lib.KVM_EXIT_MMIO
        struct.pack_into("<QQIB", v.run_buffer, UNION, addr, value, length, 1 if write else 0)
    return apply


def reason(r):
    def apply(v):
        v.run_struct.exit_reason = r
    return apply


class Recorder(BusDevice):
    def __init__(self, window=8, value=0x5A):
        self.window, self.name, self.value, self.writes = window, "rec", value, []

    def read(self, offset, size):
        return self.value + offset

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))
        if value == 0xDEAD:
            raise VmStop(Outcome(StopReason.RESET, 0, "dead"))
        if value == 0xB0B:
            raise ZeroDivisionError("device bug")


def make(script, dev=None, mmio_dev=None):
    pio, mm = PioBus(), MmioBus()
    if dev:
        pio.insert(dev, 0x100)
    if mmio_dev:
        mm.insert(mmio_dev, 0xD000_0000)
    return FakeVcpu(script), Dispatcher(pio, mm)


def test_decode_io_and_mmio():
    v = FakeVcpu([])
    d = ExitDecoder(v.run_struct, v.run_buffer)
    io(0x3F8, 2, True, [0x1234, 0x5678])(v)
    e = d.decode()
    assert isinstance(e, IoExit) and (e.port, e.size, e.is_write, e.count, e.data_offset) == \
        (0x3F8, 2, True, 2, DATA)
    mmio(0xFEE0_0000, 4, False)(v)
    e = d.decode()
    assert isinstance(e, MmioExit) and (e.address, e.length, e.is_write) == (0xFEE0_0000, 4, False)


def test_decode_internal_error_instruction_bytes():
    v = FakeVcpu([])
    v.run_struct.exit_reason = lib.KVM_EXIT_INTERNAL_ERROR
    ie = ffi.cast("struct kvmpy_exit_internal *", ffi.cast("char *", v.run_struct) + UNION)
    ie.suberror, ie.ndata = lib.KVM_INTERNAL_ERROR_EMULATION, 4
    ie.data[0] = lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    # insn_size 2, bytes 0f 0b (ud2) packed after the flags word
    ie.data[1] = int.from_bytes(bytes([2, 0x0F, 0x0B, 0, 0, 0, 0, 0]), "little")
    e = ExitDecoder(v.run_struct).decode()
    assert isinstance(e, InternalErrorExit)
    assert e.insn_bytes == b"\x0f\x0b" and e.suberror == 1


def test_run_loop_routes_io_to_device_offsets_and_ends_on_vmstop():
    dev = Recorder()
    v, d = make([io(0x102, 1, True, [7]), io(0x105, 1, False, [0]), None,
                 io(0x100, 2, True, [0xDEAD])], dev)
    out = run_loop(v, d, stopping=lambda: False)
    assert out.reason is StopReason.RESET
    assert dev.writes == [(2, 1, 7), (0, 2, 0xDEAD)]


def test_in_writes_result_and_string_io():
    dev = Recorder(value=0x40)
    v, d = make([io(0x101, 1, False, [0, 0, 0])], dev)
    v.script.append(reason(lib.KVM_EXIT_HLT))
    out = run_loop(v, d, stopping=lambda: False)
    assert out.reason is StopReason.HALT and out.status == ExitStatus.OK
    assert bytes(v.run_buffer[DATA:DATA + 3]) == bytes([0x41] * 3)
    assert d.exit_counts() == {"IO": 1, "HLT": 1}


def test_unclaimed_reads_all_ones_and_is_counted():
    v, d = make([io(0x3F2, 4, False, [0]), io(0x3F2, 1, True, [1]), reason(lib.KVM_EXIT_HLT)])
    run_loop(v, d, stopping=lambda: False)
    assert d.stats.unclaimed_pio[0x3F2] == 2


def test_unclaimed_in_value():
    v, d = make([io(0x3F2, 4, False, [0]), reason(lib.KVM_EXIT_HLT)])
    run_loop(v, d, stopping=lambda: False)
    assert bytes(v.run_buffer[DATA:DATA + 4]) == b"\xff" * 4


def test_device_exception_is_contained(capsys):
    dev = Recorder()
    v, d = make([io(0x100, 2, True, [0xB0B]), io(0x100, 2, True, [0xB0B]),
                 reason(lib.KVM_EXIT_HLT)], dev)
    out = run_loop(v, d, stopping=lambda: False)
    assert out.reason is StopReason.HALT
    assert d.stats.device_errors["rec"] == 2
    assert capsys.readouterr().err.count("ZeroDivisionError") == 1  # reported once


def test_mmio_read_and_write():
    dev = Recorder(window=0x1000, value=0x11223344)
    v, d = make([mmio(0xD000_0010, 4, True, 0xAABBCCDD), mmio(0xD000_0000, 4, False),
                 reason(lib.KVM_EXIT_HLT)], mmio_dev=dev)
    run_loop(v, d, stopping=lambda: False)
    assert dev.writes == [(0x10, 4, 0xAABBCCDD)]
    assert bytes(ffi.buffer(v.run_struct))[UNION + 8:UNION + 12] == (0x11223344).to_bytes(4, "little")


def test_stop_request_ends_loop_without_outcome():
    v, d = make([None])
    assert run_loop(v, d, stopping=lambda: True) is None


@pytest.mark.parametrize("r,status", [
    (lib.KVM_EXIT_SHUTDOWN, ExitStatus.TRIPLE_FAULT),
    (lib.KVM_EXIT_FAIL_ENTRY, ExitStatus.FAIL_ENTRY),
    (lib.KVM_EXIT_INTERNAL_ERROR, ExitStatus.EMULATION_FAILURE),
    (12345, ExitStatus.FAIL_ENTRY),
])
def test_fatal_exits(r, status):
    v, d = make([reason(r)])
    if r == 12345:
        v.run_struct.exit_reason = 0  # KVM_EXIT_UNKNOWN
    out = run_loop(v, d, stopping=lambda: False)
    assert out.status == status


def test_exit_reason_names_match_header():
    assert ExitReason.IO == lib.KVM_EXIT_IO == 2
    assert ExitReason.MMIO == 6 and ExitReason.INTERNAL_ERROR == 17
