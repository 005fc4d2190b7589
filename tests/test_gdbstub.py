"""The GDB remote stub (kvmpy/gdbstub.py): packet framing, a protocol-level client, and a real
``gdb -batch`` session against tests/guests/gdb_long.S (long mode, loaded at 0x100000)."""
from __future__ import annotations

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



def _kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


needs_kvm = pytest.mark.skipif(not _kvm_usable(), reason="needs /dev/kvm")


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
    from kvmpy.builder import FlatConfig, build_flat
    from kvmpy.vcpu.modes import Mode

    made = []
    out = bytearray()

    def make(wait: bool = True):
        path = build_guest("gdb_long", LOAD)
        m = build_flat(FlatConfig(path, Mode.LONG, console_sink=out.extend, mem_size=16 << 20))
        stub = GdbStub(m, port=0, wait=wait)
        m._stack.callback(stub.close)
        made.append((m, stub))
        m.start(stub.wrap_setup(m.setup))
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


@needs_kvm
def test_protocol_session(machine_factory):
    m, stub = machine_factory(wait=True)
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
        assert c.send(b"?") == b"S05"
        assert c.send(b"qC") == b"QC01"
        assert c.send(b"qAttached") == b"1"
        assert c.send(b"qfThreadInfo") == b"m01"
        assert c.send(b"qsThreadInfo") == b"l"
        assert c.send(b"vCont?").startswith(b"vCont;c")

        # stopped before the first instruction: the registers setup_mode gave it
        r = regs_of(c.send(b"g"))
        assert r["rip"] == LOAD
        assert r["cs"] == 0x18   # kvmpy's long-mode code segment (kvmpy/vcpu/modes.py)
        assert r["eflags"] & 2
        assert c.send(b"p10") == LOAD.to_bytes(8, "little").hex().encode()

        # memory: reads through the page tables match guest RAM, writes land there
        code = m.memory.read(LOAD, 16)
        assert bytes.fromhex(c.send(b"m%x,10" % LOAD).decode()) == code
        assert c.send(b"m%x,4" % (m.memory.size + (1 << 40))) == b"E14"

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
        assert c.send(b"?") == b"S05"
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
@pytest.mark.skipif(not os.access(GDB, os.X_OK), reason="needs /usr/bin/gdb")
def test_real_gdb_session(machine_factory):
    m, stub = machine_factory(wait=True)
    cmd = [GDB, "-nx", "-batch", "-ex", "set architecture i386:x86-64",
           "-ex", f"target remote 127.0.0.1:{stub.port}",
           "-ex", f"hbreak *{BP:#x}", "-ex", "c", "-ex", "info registers rip",
           "-ex", f"x/4xb {BP:#x}", "-ex", "stepi", "-ex", "p/x $rip",
           "-ex", "p/x $rax", "-ex", "kill"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    out = p.stdout + p.stderr
    print(out)
    assert "rejected" not in out, out
    assert f"Hardware assisted breakpoint 1 at {BP:#x}" in out, out
    assert f"rip            {BP:#x}" in out, out
    assert f"{BP:#x}:\t0x48\t0xc7\t0xc1\t0x33" in out, out
    assert f"$1 = {AFTER_BP:#x}" in out, out
    assert "$2 = 0x1111" in out, out
    outcome = m.wait(10)
    assert "killed by gdb" in outcome.detail


@needs_kvm
def test_continue_from_a_breakpoint_steps_over_it(machine_factory):
    m, stub = machine_factory(wait=True)
    c = Client(stub.port)
    try:
        assert c.send(b"?") == b"S05"
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
        assert c.send(b"?") == b"S05"
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
        assert c.send(b"?") == b"S05"
        t0 = time.monotonic()
        m.close()
        assert time.monotonic() - t0 < 5
        with pytest.raises((EOFError, OSError)):
            c.packet()
    finally:
        c.close()


@needs_kvm
@pytest.mark.skipif(not os.access(GDB, os.X_OK), reason="needs /usr/bin/gdb")
def test_real_gdb_break_memory_write_and_exit(machine_factory):
    m, stub = machine_factory(wait=True)
    cmd = [GDB, "-nx", "-batch", "-ex", "set architecture i386:x86-64",
           "-ex", f"target remote 127.0.0.1:{stub.port}",
           "-ex", f"break *{LOOP:#x}", "-ex", "c", "-ex", "p/x $rcx",
           "-ex", f"set {{char}}{FLAG:#x} = 1", "-ex", "delete", "-ex", "c"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    out = p.stdout + p.stderr
    assert f"Breakpoint 1 at {LOOP:#x}" in out, out
    assert "$1 = 0x3333" in out, out
    assert f"exited with code 0{STATUS:o}]" in out, out   # gdb prints it in octal
    assert int(m.wait(10).status) == STATUS
    assert b"gdb ok" in machine_factory.console


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
        g = _sp.run(["gdb", "-batch", "-nx", "-ex", "set architecture i386:x86-64",
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
