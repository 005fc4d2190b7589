"""The GDB remote stub (kvmpy/gdbstub.py): packet framing, a protocol-level client, and real
``gdb -batch`` sessions against tests/guests/gdb_long.S (long mode, loaded at 0x100000),
gdb_smp.S (two vCPUs) and gdb_real.S (real mode at 0x7c00).

Every test is bounded: sockets and gdb have timeouts, and a watchdog dumps the stacks and ends
the run if a test still hangs after WATCHDOG_S seconds."""
from __future__ import annotations

import faulthandler
import os
import socket
import subprocess
import threading
import time

import pytest

from kvmpy import gdbstub
from kvmpy.gdbstub import GdbStub, checksum, frame

LOAD = 0x100000
BP = LOAD + 0x0E          # mov $0x3333, %rcx
AFTER_BP = LOAD + 0x15    # nop
LOOP = LOAD + 0x16        # the wait loop
FLAG = LOAD + 0x200
STATUS = 0x21             # EXIT 0x10 -> (0x10 << 1) | 1
GDB = "/usr/bin/gdb"
WATCHDOG_S = 120
# tests/guests/gdb_smp.S
SMP_BSP = LOAD + 0x10
SMP_AP = LOAD + 0x80
SMP_COUNTER = LOAD + 0x208
SMP_STATUS = 0x23         # EXIT 0x11
# tests/guests/gdb_real.S
REAL_LOAD = 0x7C00
REAL_BP = REAL_LOAD + 0x06
REAL_FLAG = REAL_LOAD + 0x100
REAL_STATUS = 0x25        # EXIT 0x12
# registers the protocol test sets before the first instruction: g must carry them in order
PRESET = {"rsi": 0x5151, "rdi": 0xD1D1, "rbp": 0xB0B0, **{f"r{i}": 0x0808 + i for i in
                                                         range(8, 16)}}


def _kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


needs_kvm = pytest.mark.skipif(not _kvm_usable(), reason="needs /dev/kvm")
needs_gdb = pytest.mark.skipif(not os.access(GDB, os.X_OK), reason="needs /usr/bin/gdb")


@pytest.fixture(autouse=True)
def _watchdog():
    """A hang must not stall the suite: dump every thread's stack and end the run."""
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def run_gdb(port: int, *commands: str, timeout: float = 60) -> str:
    """``gdb -batch`` connected to the stub, running ``commands``; its stdout + stderr."""
    cmd = [GDB, "-nx", "-batch", "-ex", "set architecture i386:x86-64",
           "-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        cmd += ["-ex", c]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    out = p.stdout + p.stderr
    print(out)
    return out


# -- framing (no KVM) ----------------------------------------------------------------------
def test_checksum_and_frame():
    assert checksum(b"OK") == 0x9A
    assert frame(b"OK") == b"$OK#9a"
    assert frame(b"a$b") == b"$a}\x04b#" + b"%02x" % checksum(b"a}\x04b")
    assert gdbstub._unescape(b"a}\x04b") == b"a$b"


def test_parse_address():
    assert gdbstub.parse_address("tcp::1234") == ("127.0.0.1", 1234)
    assert gdbstub.parse_address("tcp:0.0.0.0:4321") == ("0.0.0.0", 4321)
    assert gdbstub.parse_address("1234") == ("127.0.0.1", 1234)


def test_target_xml_numbers_the_g_packet():
    xml = gdbstub.target_xml()
    assert "<architecture>i386:x86-64</architecture>" in xml
    for name in ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *[f"r{i}" for i in
                 range(8, 16)], "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs"]:
        assert f'name="{name}"' in xml
    assert 'name="rip" bitsize="64" type="code_ptr" regnum="16"' in xml
    assert '<feature name="org.gnu.gdb.i386.segments"><reg name="fs_base" bitsize="64"' in xml
    n = gdbstub._REG_INDEX["cr3"]
    assert f'name="cr3" bitsize="64" type="int64" regnum="{n}" group="system"' in xml


# -- a protocol client --------------------------------------------------------------------
class Client:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.ack = True

    def close(self):
        self.sock.close()

    def _read(self, n=1) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError("stub closed the connection")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def raw(self, data: bytes):
        self.sock.sendall(data)

    def expect_ack(self) -> bytes:
        return self._read(1)

    def send(self, payload: bytes, reply: bool = True) -> bytes | None:
        self.raw(frame(payload))
        if self.ack:
            assert self.expect_ack() == b"+"
        return self.packet() if reply else None

    def packet(self) -> bytes:
        c = self._read(1)
        while c != b"$":
            assert c in (b"+",), c
            c = self._read(1)
        body = b""
        while (c := self._read(1)) != b"#":
            body += c
        cs = self._read(2)
        assert int(cs, 16) == checksum(body), (body, cs)
        if self.ack:
            self.raw(b"+")
        return gdbstub._unescape(body)


def regs_of(g: bytes) -> dict[str, int]:
    data = bytes.fromhex(g.decode())
    out, off = {}, 0
    for name, size, _ in gdbstub.REGISTERS:
        out[name] = int.from_bytes(data[off:off + size], "little")
        off += size
    assert off == len(data)
    return out


@pytest.fixture
def machine_factory(build_guest):
    """make(...) -> (machine, stub), started; closed at teardown, which must leave no stub or
    vCPU thread and no listening socket behind."""
    from kvmpy.builder import FlatConfig, build_flat
    from kvmpy.vcpu.modes import Mode

    made = []
    out = bytearray()

    def make(wait: bool = True, guest: str = "gdb_long", load: int = LOAD,
             mode: Mode = Mode.LONG, nr_vcpus: int = 1, after_setup=None):
        path = build_guest(guest, load)
        m = build_flat(FlatConfig(path, mode, console_sink=out.extend, mem_size=16 << 20))
        stub = GdbStub(m, port=0, wait=wait)
        m._stack.callback(stub.close)   # what the builder does with --gdb
        made.append((m, stub))

        def setup(vcpu, base=m.setup):
            base(vcpu)
            if after_setup is not None:
                after_setup(vcpu)

        m.start(stub.wrap_setup(setup), nr_vcpus)
        return m, stub

    make.console = out
    yield make
    for m, stub in made:
        m.close()
        port = stub.port
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
            t.name in ("kvmpy-gdbstub",) or t.name.startswith("kvmpy-vcpu")
            for t in threading.enumerate()):
        time.sleep(0.05)
    left = [t.name for t in threading.enumerate()
            if t.name == "kvmpy-gdbstub" or t.name.startswith("kvmpy-vcpu")]
    assert not left


def _preset(vcpu):
    regs = vcpu.get_regs()
    for name, value in PRESET.items():
        setattr(regs, name, value)
    vcpu.set_regs(regs)


def _vcpu_id_in_rsi(vcpu):
    regs = vcpu.get_regs()
    regs.rsi = vcpu.id
    vcpu.set_regs(regs)


@needs_kvm
def test_protocol_session(machine_factory):
    m, stub = machine_factory(wait=True, after_setup=_preset)
    c = Client(stub.port)
    try:
        # a corrupted packet is refused with '-', the stub waits for it again
        c.raw(b"$qC#00")
        assert c.expect_ack() == b"-"
        sup = c.send(b"qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386")
        assert b"PacketSize=" in sup and b"qXfer:features:read+" in sup
        assert c.send(b"QStartNoAckMode") == b"OK"
        c.ack = False
        assert c.send(b"vMustReplyEmpty") == b""
        xml = b""
        while True:
            part = c.send(b"qXfer:features:read:target.xml:%x,200" % len(xml))
            xml += part[1:]
            if part[:1] == b"l":
                break
        assert xml.decode() == gdbstub.target_xml()
        assert c.send(b"Hg0") == b"OK"
        assert c.send(b"?") == b"T05thread:01;"
        assert c.send(b"qC") == b"QC01"
        assert c.send(b"qAttached") == b"1"
        assert c.send(b"qfThreadInfo") == b"m01"
        assert c.send(b"qsThreadInfo") == b"l"
        assert c.send(b"vCont?").startswith(b"vCont;c")

        # stopped before the first instruction: the registers setup_mode and the test gave it,
        # each at its place in the g packet
        r = regs_of(c.send(b"g"))
        assert r["rip"] == LOAD
        assert {k: r[k] for k in PRESET} == PRESET
        assert (r["rsp"], r["eflags"]) == (0x8000, 2)   # kvmpy/vcpu/modes.py STACK_TOP
        assert (r["cs"], r["ss"], r["ds"]) == (0x18, 0x10, 0x10)
        assert (r["cr0"] >> 31, r["cr3"], r["efer"]) == (1, 0x9000, 0x500)   # PG, LME|LMA
        assert r["fctrl"] == 0x37F
        assert c.send(b"p10") == LOAD.to_bytes(8, "little").hex().encode()
        # VcpuThread.call (kvmpy.VM.registers) is still served while gdb holds the vCPU
        seen = threading.Event()
        m.vcpu_threads[0].call(lambda vcpu: seen.set() if vcpu.get_regs().rip == LOAD else None)
        assert seen.wait(5)
        assert c.send(b"p%x" % gdbstub._REG_INDEX["r15"]) == \
            PRESET["r15"].to_bytes(8, "little").hex().encode()
        assert c.send(b"p%x" % len(gdbstub.REGISTERS)) == b"E01"
        # P on a system register goes through KVM_SET_SREGS
        n = gdbstub._REG_INDEX["fs_base"]
        assert c.send(b"P%x=" % n + (0x7000).to_bytes(8, "little").hex().encode()) == b"OK"
        assert regs_of(c.send(b"g"))["fs_base"] == 0x7000

        # memory: reads through the page tables match guest RAM, writes land there
        code = m.memory.read(LOAD, 16)
        assert bytes.fromhex(c.send(b"m%x,10" % LOAD).decode()) == code
        assert c.send(b"m%x,4" % (m.memory.size + (1 << 40))) == b"E14"
        # a read across the end of RAM returns the part that exists
        top = m.memory.size
        assert c.send(b"m%x,8" % (top - 4)) == m.memory.read(top - 4, 4).hex().encode()
        assert c.send(b"M%x,2:0102" % (top - 1)) == b"E14"

        # breakpoints: Z0 and Z1 take debug registers; a fifth is refused
        assert c.send(b"Z0,%x,1" % BP) == b"OK"
        assert c.send(b"Z1,%x,1" % (LOAD + 0x30)) == b"OK"
        assert c.send(b"Z1,%x,1" % (LOAD + 0x31)) == b"OK"
        assert c.send(b"Z1,%x,1" % (LOAD + 0x32)) == b"OK"
        assert c.send(b"Z1,%x,1" % (LOAD + 0x33)) == b"E01"
        for a in (0x30, 0x31, 0x32):
            assert c.send(b"z1,%x,1" % (LOAD + a)) == b"OK"

        assert c.send(b"c") == b"T05hwbreak:;thread:01;"
        r = regs_of(c.send(b"g"))
        assert (r["rip"], r["rax"], r["rbx"]) == (BP, 0x1111, 0x2222)

        # P then single-step: the written register survives, rip moves one instruction
        assert c.send(b"P3=" + (0xABCDEF).to_bytes(8, "little").hex().encode()) == b"OK"
        assert c.send(b"vCont;s:1").startswith(b"T05")
        r = regs_of(c.send(b"g"))
        assert (r["rip"], r["rcx"], r["rdx"]) == (AFTER_BP, 0x3333, 0xABCDEF)
        assert c.send(b"z0,%x,1" % BP) == b"OK"
        assert c.send(b"s").startswith(b"T05")
        assert regs_of(c.send(b"g"))["rip"] == LOOP

        # G writes back what g read
        g = bytearray.fromhex(c.send(b"g").decode())
        g[8:16] = (0x4242).to_bytes(8, "little")   # rbx
        assert c.send(b"G" + g.hex().encode()) == b"OK"
        assert regs_of(c.send(b"g"))["rbx"] == 0x4242

        # M sets the flag the guest waits for; it then prints and exits: W<status>
        assert c.send(b"M%x,1:01" % FLAG) == b"OK"
        assert m.memory.read(FLAG, 1) == b"\x01"
        assert c.send(b"vCont;c") == b"W%02x" % STATUS
        outcome = m.wait(10)
        assert int(outcome.status) == STATUS
        assert b"gdb ok" in machine_factory.console
    finally:
        c.close()


@needs_kvm
def test_ctrl_c_detach_and_attach_stop(machine_factory):
    m, stub = machine_factory(wait=False)
    c = Client(stub.port)
    try:
        assert c.send(b"?") == b"T02thread:01;"      # attaching stops the running guest
        rip = regs_of(c.send(b"g"))["rip"]
        assert LOAD <= rip < LOAD + 0x40
        assert c.send(b"c", reply=False) is None
        time.sleep(0.2)
        c.raw(b"\x03")
        assert c.packet() == b"T02thread:01;"
        assert LOOP <= regs_of(c.send(b"g"))["rip"] < LOOP + 10
        assert c.send(b"D") == b"OK"
        with pytest.raises((EOFError, OSError)):
            c.packet()
    finally:
        c.close()
    time.sleep(0.2)
    assert not m._done.is_set()                       # detached: it runs on
    m.memory.write(FLAG, b"\x01")
    assert int(m.wait(10).status) == STATUS


@needs_kvm
def test_kill(machine_factory):
    m, stub = machine_factory(wait=True)
    c = Client(stub.port)
    try:
        assert c.send(b"?") == b"T05thread:01;"
        c.send(b"k", reply=False)
        outcome = m.wait(10)
        assert "gdb" in outcome.detail
        with pytest.raises((EOFError, OSError)):
            c.packet()
    finally:
        c.close()


@needs_kvm
def test_wait_without_gdb_ends_with_the_vm(machine_factory):
    m, stub = machine_factory(wait=True)
    outcome = m.wait(0.5)
    assert outcome.reason.value == "timeout"


@needs_kvm
@needs_gdb
def test_real_gdb_session(machine_factory):
    m, stub = machine_factory(wait=True)
    out = run_gdb(stub.port, f"hbreak *{BP:#x}", "c", "info registers rip",
                  f"x/4xb {BP:#x}", "stepi", "p/x $rip", "p/x $rax", "p/x $cr3", "p/x $efer",
                  "set var $rbx = 0x77", "maint flush register-cache", "p/x $rbx",
                  "info threads", "kill")
    assert "rejected" not in out and "Remote failure" not in out, out
    assert "Could not" not in out and "error" not in out.lower(), out
    assert f"Hardware assisted breakpoint 1 at {BP:#x}" in out, out
    assert f"rip            {BP:#x}" in out, out
    assert f"{BP:#x}:\t0x48\t0xc7\t0xc1\t0x33" in out, out
    assert f"$1 = {AFTER_BP:#x}" in out, out
    assert "$2 = 0x1111" in out, out
    assert "$3 = 0x9000" in out and "$4 = 0x500" in out, out
    assert "$5 = 0x77" in out, out   # written with P/G, read back with g after the flush
    assert "Thread 1 (vCPU 0)" in out, out
    outcome = m.wait(10)
    assert "killed by gdb" in outcome.detail


@needs_kvm
def test_continue_from_a_breakpoint_steps_over_it(machine_factory):
    m, stub = machine_factory(wait=True)
    c = Client(stub.port)
    try:
        assert c.send(b"?") == b"T05thread:01;"
        assert c.send(b"Z0,%x,1" % LOOP) == b"OK"
        assert c.send(b"c").startswith(b"T05")
        assert regs_of(c.send(b"g"))["rip"] == LOOP
        # continuing with the breakpoint still at RIP runs one loop round, not zero
        assert c.send(b"c").startswith(b"T05")
        assert regs_of(c.send(b"g"))["rip"] == LOOP
        assert c.send(b"z0,%x,1" % LOOP) == b"OK"
        # a watchpoint takes a debug register too (whether it fires: see the hwvirt test)
        assert c.send(b"Z2,%x,3" % FLAG) == b"E01"          # no 3-byte watch
        assert c.send(b"Z4,%x,1" % FLAG) == b"OK"
        assert c.send(b"z4,%x,1" % FLAG) == b"OK"
    finally:
        c.close()


@needs_kvm
@pytest.mark.hwvirt   # KVM's emulator (all CPL0 code on PVM) does not check data breakpoints
def test_access_watchpoint(machine_factory):
    m, stub = machine_factory(wait=True)
    c = Client(stub.port)
    try:
        assert c.send(b"?") == b"T05thread:01;"
        assert c.send(b"Z4,%x,1" % FLAG) == b"OK"
        c.send(b"c", reply=False)
        c.sock.settimeout(5)
        try:
            reply = c.packet()
        except TimeoutError:
            c.sock.settimeout(10)
            c.raw(b"\x03")
            reply = c.packet()
        assert reply == b"T05awatch:%x;thread:01;" % FLAG, reply
    finally:
        c.close()


@needs_kvm
def test_close_while_attached_and_stopped(machine_factory):
    m, stub = machine_factory(wait=True)
    c = Client(stub.port)
    try:
        assert c.send(b"?") == b"T05thread:01;"
        t0 = time.monotonic()
        m.close()
        assert time.monotonic() - t0 < 5
        with pytest.raises((EOFError, OSError)):
            c.packet()
    finally:
        c.close()


@needs_kvm
@needs_gdb
def test_real_gdb_break_memory_write_and_exit(machine_factory):
    m, stub = machine_factory(wait=True)
    out = run_gdb(stub.port, f"break *{LOOP:#x}", "c", "p/x $rcx",
                  f"set {{char}}{FLAG:#x} = 1", "delete", "c")
    assert f"Breakpoint 1 at {LOOP:#x}" in out, out
    assert f"Breakpoint 1, {LOOP:#018x} in" in out, out   # a Z0 breakpoint, served by DR0
    assert "$1 = 0x3333" in out, out
    assert f"exited with code 0{STATUS:o}]" in out, out   # gdb prints it in octal
    assert int(m.wait(10).status) == STATUS
    assert b"gdb ok" in machine_factory.console


@needs_kvm
@needs_gdb
def test_cli_gdb_wait_with_real_gdb(build_guest):
    """`kvmpy run --gdb tcp::PORT --gdb-wait` as a user types it, driven by a real gdb."""
    import socket as _socket
    import subprocess as _sp
    import sys as _sys

    s = _socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    vm = _sp.Popen([_sys.executable, "-m", "kvmpy", "run", build_guest("gdb_long", 0x100000),
                    "--mode", "long", "--gdb", f"tcp::{port}", "--gdb-wait", "--timeout", "60"],
                   stdin=_sp.DEVNULL, stdout=_sp.PIPE, stderr=_sp.PIPE)
    try:
        first = vm.stderr.readline()          # printed once the stub listens
        assert b"gdb stub on 127.0.0.1" in first, first
        g = _sp.run([GDB, "-batch", "-nx", "-ex", "set architecture i386:x86-64",
                     "-ex", f"target remote 127.0.0.1:{port}", "-ex", "hbreak *0x10000e",
                     "-ex", "c", "-ex", "p/x $rax", "-ex", "set {char}0x100200 = 1",
                     "-ex", "delete", "-ex", "c"], capture_output=True, text=True, timeout=60)
        out, err = vm.communicate(timeout=30)
    finally:
        if vm.poll() is None:
            vm.kill()
    assert "0x1111" in g.stdout, g.stdout + g.stderr
    assert vm.returncode == 0x21, err
    assert out == b"gdb ok\n"


# -- several vCPUs: all-stop ---------------------------------------------------------------
@needs_kvm
def test_all_stop_with_two_vcpus(machine_factory):
    m, stub = machine_factory(wait=True, guest="gdb_smp", nr_vcpus=2,
                              after_setup=_vcpu_id_in_rsi)
    c = Client(stub.port)
    try:
        assert c.send(b"?") == b"T05thread:01;"
        assert c.send(b"qfThreadInfo") == b"m01,02"
        assert c.send(b"qsThreadInfo") == b"l"
        assert c.send(b"T2") == b"OK" and c.send(b"T3") == b"E01"
        assert bytes.fromhex(c.send(b"qThreadExtraInfo,2").decode()) == b"vCPU 1"
        assert c.send(b"Hg2") == b"OK"
        assert (regs_of(c.send(b"g"))["rsi"], regs_of(c.send(b"g"))["rip"]) == (1, LOAD)
        assert c.send(b"Hg1") == b"OK"
        assert regs_of(c.send(b"g"))["rsi"] == 0
        assert c.send(b"Hg5") == b"E01"

        # both run; Ctrl-C stops both: vCPU 1's counter stands still while gdb holds them
        c.send(b"vCont;c", reply=False)
        time.sleep(0.3)
        c.raw(b"\x03")
        assert c.packet() == b"T02thread:01;"
        count = int.from_bytes(bytes.fromhex(c.send(b"m%x,8" % SMP_COUNTER).decode()),
                               "little")
        assert count > 0
        time.sleep(0.3)
        assert m.memory.read_u64(SMP_COUNTER) == count
        assert c.send(b"Hg2") == b"OK"
        assert SMP_AP <= regs_of(c.send(b"g"))["rip"] < SMP_AP + 0x10

        # a breakpoint in vCPU 1's loop: the stop names thread 2; vCPU 0 is stopped as well
        assert c.send(b"Z0,%x,1" % SMP_AP) == b"OK"
        assert c.send(b"vCont;c") == b"T05hwbreak:;thread:02;"
        assert regs_of(c.send(b"g"))["rip"] == SMP_AP   # Hg follows the stop's thread
        assert c.send(b"Hg1") == b"OK"
        assert SMP_BSP <= regs_of(c.send(b"g"))["rip"] < SMP_BSP + 0x10

        # vCont;s:2 steps vCPU 1 alone (no action for thread 1: it stays stopped)
        count = m.memory.read_u64(SMP_COUNTER)
        rip0 = regs_of(c.send(b"g"))["rip"]
        assert c.send(b"vCont;s:2") == b"T05thread:02;"
        assert m.memory.read_u64(SMP_COUNTER) == count + 1
        assert regs_of(c.send(b"g"))["rip"] == SMP_AP + 7   # after incq, at jmp
        assert c.send(b"Hg1") == b"OK"
        assert regs_of(c.send(b"g"))["rip"] == rip0

        # breakpoint off, the flag set: vCPU 0 ends the VM while vCPU 1 counts
        assert c.send(b"z0,%x,1" % SMP_AP) == b"OK"
        assert c.send(b"M%x,1:01" % (LOAD + 0x200)) == b"OK"
        assert c.send(b"c") == b"W%02x" % SMP_STATUS
        assert int(m.wait(10).status) == SMP_STATUS
        assert b"smp ok" in machine_factory.console
    finally:
        c.close()


@needs_kvm
@needs_gdb
def test_real_gdb_threads(machine_factory):
    m, stub = machine_factory(wait=True, guest="gdb_smp", nr_vcpus=2,
                              after_setup=_vcpu_id_in_rsi)
    out = run_gdb(stub.port, "info threads", f"hbreak *{SMP_AP:#x}", "c", "p/x $rsi",
                  "thread 1", "p/x $rsi", "kill")
    assert "Thread 1 (vCPU 0)" in out and "Thread 2 (vCPU 1)" in out, out
    assert "Thread 2" in out and f"hit Breakpoint 1, {SMP_AP:#018x}" in out, out
    assert "$1 = 0x1" in out and "$2 = 0x0" in out, out
    assert "killed by gdb" in m.wait(10).detail


# -- real mode -----------------------------------------------------------------------------
@needs_kvm
@needs_gdb
def test_real_mode_with_real_gdb(machine_factory):
    from kvmpy.vcpu.modes import Mode

    m, stub = machine_factory(wait=True, guest="gdb_real", load=REAL_LOAD, mode=Mode.REAL)
    out = run_gdb(stub.port, "p/x $rip", "p/x $cs", f"hbreak *{REAL_BP:#x}", "c",
                  "p/x $rip", "p/x $rax", f"x/3xb {REAL_BP:#x}", "stepi", "p/x $rip",
                  "p/x $rcx", "p/x $cr0", f"set {{char}}{REAL_FLAG:#x} = 1", "delete", "c")
    assert "$1 = 0x7c00" in out and "$2 = 0x0" in out, out
    assert f"$3 = {REAL_BP:#x}" in out and "$4 = 0x1111" in out, out
    assert f"{REAL_BP:#x}:\t0xb9\t0x33\t0x33" in out, out
    assert f"$5 = {REAL_BP + 3:#x}" in out and "$6 = 0x3333" in out, out
    assert "$7 = 0x" in out and "$7 = 0x1\n" not in out, out   # CR0.PE clear
    assert f"exited with code 0{REAL_STATUS:o}]" in out, out
    assert int(m.wait(10).status) == REAL_STATUS
    assert b"real ok" in machine_factory.console


@needs_kvm
@needs_gdb
def test_real_gdb_ctrl_c_stops_every_vcpu(machine_factory):
    """Ctrl-C in gdb (SIGINT to gdb while it waits in `continue`) sends 0x03: both vCPUs
    stop, and vCPU 1's counter stands still until gdb kills the VM."""
    import signal

    m, stub = machine_factory(wait=True, guest="gdb_smp", nr_vcpus=2,
                              after_setup=_vcpu_id_in_rsi)
    cmd = [GDB, "-nx", "-batch", "-ex", "set architecture i386:x86-64",
           "-ex", f"target remote 127.0.0.1:{stub.port}", "-ex", "c", "-ex", "info threads",
           "-ex", f"x/gx {SMP_COUNTER:#x}", "-ex", "shell sleep 0.3",
           "-ex", f"x/gx {SMP_COUNTER:#x}", "-ex", "kill"]
    g = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while m.memory.read_u64(SMP_COUNTER) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)   # gdb has connected and continued: vCPU 1 counts
        g.send_signal(signal.SIGINT)
        out, _ = g.communicate(timeout=30)
    finally:
        if g.poll() is None:
            g.kill()
            g.wait()
    print(out)
    assert "received signal SIGINT" in out, out
    assert "Thread 1 (vCPU 0)" in out and "Thread 2 (vCPU 1)" in out, out
    counts = [line.split(":")[1].strip() for line in out.splitlines()
              if line.startswith(f"{SMP_COUNTER:#x}:")]
    assert len(counts) == 2 and counts[0] == counts[1] and int(counts[0], 16) > 0, out
    assert "killed by gdb" in m.wait(10).detail


@needs_kvm
@needs_gdb
def test_real_gdb_fifth_breakpoint_and_detach(machine_factory):
    """Four debug registers: gdb's fifth breakpoint is refused (gdb must not fall back to
    writing int3 into guest code); after `detach` the guest runs on without breakpoints."""
    m, stub = machine_factory(wait=True)
    code = m.memory.read(LOAD, 0x20)
    bps = [LOAD + 0x07, BP, AFTER_BP, LOOP, LOOP + 7]
    out = run_gdb(stub.port, *[f"break *{a:#x}" for a in bps], "c", "delete 5", "c",
                  "p/x $rip", "delete", "detach")
    assert "Cannot insert breakpoint 5" in out, out
    assert f"Breakpoint 1, {LOAD + 7:#018x}" in out and f"$1 = {LOAD + 7:#x}" in out, out
    assert "detached" in out, out
    assert m.memory.read(LOAD, 0x20) == code
    time.sleep(0.2)
    assert not m._done.is_set()
    m.memory.write(FLAG, b"\x01")
    assert int(m.wait(10).status) == STATUS


@needs_kvm
def test_a_port_probe_does_not_end_the_wait(machine_factory):
    # A bare connect + close (a port scanner, an IDE checking the port) is not a gdb session:
    # with --gdb-wait the guest must still be at its first instruction for the real gdb.
    m, stub = machine_factory(wait=True)
    for _ in range(3):
        socket.create_connection(("127.0.0.1", stub.port), timeout=5).close()
        time.sleep(0.1)
    c = Client(stub.port)
    try:
        assert c.send(b"?") == b"T05thread:01;"
        assert regs_of(c.send(b"g"))["rip"] == LOAD
        c.send(b"k", reply=False)
        assert "gdb" in m.wait(10).detail
    finally:
        c.close()


@needs_kvm
def test_a_connection_on_a_high_fd_number(machine_factory):
    # select() cannot watch fds >= 1024 (FD_SETSIZE); a guest with hundreds of slirp sockets
    # pushes the debugger's connection up there. The stub must serve it all the same.
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1200")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    fillers = []
    try:
        while not fillers or fillers[-1] < 1040:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        m, stub = machine_factory(wait=True)
        c = Client(stub.port)
        try:
            assert c.send(b"?") == b"T05thread:01;"
            c.send(b"k", reply=False)
            assert "gdb" in m.wait(10).detail
        finally:
            c.close()
    finally:
        for fd in fillers:
            os.close(fd)
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
