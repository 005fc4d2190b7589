"""A GDB remote serial protocol stub for vCPU 0 (gdb's ``target remote host:port``).

One listening socket and one server thread. The server thread owns the connection: it reads
packets, acknowledges them and answers. Whatever must touch the vCPU (registers,
KVM_SET_GUEST_DEBUG) runs in the vCPU's own thread: while the guest is stopped for gdb,
vCPU 0's thread waits in :meth:`GdbStub._stopped` and runs the requests the server thread
queues (``_on_vcpu``).

How the guest comes to stop: a hardware breakpoint or single-step (KVM_EXIT_DEBUG, through
``Dispatcher.debug_handler``), a Ctrl-C from gdb (0x03: ``VcpuThread.call``), a new connection
(attach) or, with ``wait=True``, before vCPU 0's first instruction (``wrap_setup``).

Breakpoints: gdb's ``Z0`` (software) and ``Z1`` (hardware) are both served with the debug registers
DR0-DR3 (KVM_GUESTDBG_USE_HW_BP): software breakpoints through KVM_SET_GUEST_DEBUG do not work on
every host (PVM), and an ``int3`` written into CPL0 code cannot run there. A fifth breakpoint is
refused with ``E01``. ``Z2``/``Z3``/``Z4`` watchpoints use the same four registers (x86 has no
read-only watchpoint: ``Z3`` watches reads and writes).

Protocol references: gdb/doc/gdb.texinfo, "Remote Protocol" (Packets, Stop Reply Packets,
General Query Packets, Target Descriptions); Intel SDM vol. 3B, 17.2 (debug registers).
"""
from __future__ import annotations

import queue
import select
import socket
import sys
import threading
import time
from collections.abc import Callable

from kvmpy._ffi import lib
from kvmpy.outcome import ExitStatus, Outcome, StopReason, VmStop

PACKET_SIZE = 0x4000
_DR7_LE_GE = (1 << 8) | (1 << 9)
_WATCH_RW = {2: 0b01, 3: 0b11, 4: 0b11}          # Z type -> DR7 R/W bits
_WATCH_NAME = {2: "watch", 3: "rwatch", 4: "awatch"}
_WATCH_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}  # DR7 LEN encoding
_VCPU_TIMEOUT = 10.0

# g packet layout: (name, size in bytes, gdb type, group)
_GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
_SEGS = ["cs", "ss", "ds", "es", "fs", "gs"]
_X87_CTRL = ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
REGISTERS: list[tuple[str, int, str]] = (
    [(r, 8, "int64") for r in _GPRS] + [("rip", 8, "code_ptr"), ("eflags", 4, "i386_eflags")]
    + [(s, 4, "int32") for s in _SEGS]
    + [(f"st{i}", 10, "i387_ext") for i in range(8)]
    + [(c, 4, "int") for c in _X87_CTRL])
_REG_INDEX = {name: i for i, (name, _, _) in enumerate(REGISTERS)}
_NUM_CORE = 24   # rax..gs: what G/P can change (x87 state is read-only here)

_EFLAGS_FLAGS = [(0, "CF"), (1, ""), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"),
                 (9, "IF"), (10, "DF"), (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"),
                 (18, "AC"), (19, "VIF"), (20, "VIP"), (21, "ID")]


def target_xml() -> str:
    """The target description (gdb/features/i386/64bit-core.xml's registers, numbered in the
    order of the g packet). gdb's amd64 support requires the x87 registers in this feature."""
    flags = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for b, n in _EFLAGS_FLAGS)
    regs = []
    for i, (name, size, typ) in enumerate(REGISTERS):
        group = ' group="float"' if name.startswith("st") or name in _X87_CTRL else ""
        regs.append(f'<reg name="{name}" bitsize="{size * 8}" type="{typ}" regnum="{i}"{group}/>')
    return ('<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n'
            '<target version="1.0"><architecture>i386:x86-64</architecture>'
            '<feature name="org.gnu.gdb.i386.core">'
            f'<flags id="i386_eflags" size="4">{flags}</flags>'
            + "".join(regs) + "</feature></target>")


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def frame(payload: bytes) -> bytes:
    """``$payload#cs`` with gdb's escapes for ``$ # } *``."""
    out = bytearray()
    for b in payload:
        if b in b"$#}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return b"$" + bytes(out) + b"#%02x" % checksum(out)


class _Breakpoint:
    __slots__ = ("kind", "addr", "length")

    def __init__(self, kind: int, addr: int, length: int):
        self.kind, self.addr, self.length = kind, addr, length


class GdbStub:
    """Serve gdb on ``host:port`` for vCPU 0 of ``machine`` (port 0: any free port, see .port).

    ``wait=True``: vCPU 0 (started with ``wrap_setup(setup)``) stops before its first
    instruction until gdb connects and lets it run."""

    def __init__(self, machine, host: str = "127.0.0.1", port: int = 1234, wait: bool = False):
        self.machine = machine
        self.wait = wait
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(1)
        except BaseException:
            self._sock.close()
            raise
        self.host, self.port = self._sock.getsockname()[:2]
        self._conn: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._closing = threading.Event()
        self._ack = True
        self._last_sent = b""
        # stop state (vCPU 0)
        self._state_lock = threading.Lock()
        self._requests: queue.Queue = queue.Queue()
        self._is_stopped = threading.Event()
        self._stop_pending = False            # a Ctrl-C / attach stop is on its way
        self._stop_reply_pending = b"T02thread:01;"
        self._stop_requested_at = 0.0
        self._stop_reply = b"S05"
        self._sregs = None
        self._bps: list[_Breakpoint | None] = [None] * 4
        self._stepping_over = False
        self._awaiting_stop = False           # gdb resumed the guest and waits for a stop reply
        self._attached = False
        self._exit_sent = False
        self._killed = False
        machine.dispatcher.debug_handler = self.debug_handler
        self._thread = threading.Thread(target=self._serve, name="kvmpy-gdbstub", daemon=True)
        self._thread.start()

    # -- lifecycle -------------------------------------------------------------------------
    def wrap_setup(self, setup: Callable) -> Callable:
        def wrapped(vcpu):
            setup(vcpu)
            if vcpu.id == 0:
                self._apply_debug(vcpu, step=False)
                if self.wait:
                    outcome = self._stopped(vcpu, b"S05")
                    if outcome is not None:
                        raise VmStop(outcome)
        return wrapped

    def close(self) -> None:
        """Close the connection and the socket, release a stopped vCPU, end the thread."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self.machine.dispatcher.debug_handler == self.debug_handler:
            self.machine.dispatcher.debug_handler = None
        self._requests.put(("resume", None))
        try:
            self._sock.close()
        except OSError:
            pass
        conn = self._conn
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)

    def __enter__(self) -> "GdbStub":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _vm_done(self) -> bool:
        done = getattr(self.machine, "_done", None)
        return done is not None and done.is_set()

    def _vcpu_thread(self):
        threads = self.machine.vcpu_threads
        return threads[0] if threads else None

    # -- the vCPU side ---------------------------------------------------------------------
    def debug_handler(self, exit, vcpu) -> Outcome | None:
        """Dispatcher.debug_handler: KVM_EXIT_DEBUG (hardware breakpoint or single-step)."""
        if vcpu.id != 0 or self._closing.is_set():
            return None
        dr6 = exit.dr6
        if self._stepping_over:
            self._stepping_over = False
            hit = [i for i in range(4) if dr6 & (1 << i) and self._bps[i] is not None
                   and self._bps[i].kind >= 2]
            if not hit:   # the step over a breakpoint is done: arm it again, go on
                self._apply_debug(vcpu, step=False)
                return None
        if not self._attached:   # nobody to report to: breakpoints off, run on
            self._apply_debug(vcpu, step=False)
            return None
        reply = b"T05thread:01;"
        for i in range(4):
            bp = self._bps[i]
            if dr6 & (1 << i) and bp is not None:
                if bp.kind >= 2:
                    reply = b"T05%s:%x;thread:01;" % (_WATCH_NAME[bp.kind].encode(), bp.addr)
                else:
                    reply = b"T05hwbreak:;thread:01;"
                break
        return self._stopped(vcpu, reply)

    def _stopped(self, vcpu, reply: bytes) -> Outcome | None:
        """vCPU 0 stays here while stopped for gdb, running queued requests, until resumed."""
        try:
            self._sregs = vcpu.get_sregs()
        except Exception:
            self._sregs = None
        # drop resume requests left from an earlier stop
        pending = []
        while True:
            try:
                item = self._requests.get_nowait()
            except queue.Empty:
                break
            if item[0] == "call":
                pending.append(item)
        for item in pending:
            self._requests.put(item)
        with self._state_lock:
            self._stop_reply = reply
            self._stop_pending = False
            self._is_stopped.set()
            awaiting, self._awaiting_stop = self._awaiting_stop, False
        if awaiting and self._attached and self._conn is not None:
            self._send(reply)   # gdb waits for it after c/s/vCont (a stop on attach: it asks '?')
        try:
            while True:
                if self._closing.is_set() or self._vm_done():
                    return None
                try:
                    kind, arg = self._requests.get(timeout=0.1)
                except queue.Empty:
                    continue
                if kind == "call":
                    fn, box, done = arg
                    try:
                        box.append(fn(vcpu))
                    except BaseException as e:   # answered as an error packet
                        box.append(e)
                    done.set()
                elif kind == "resume":
                    step = arg
                    if self._closing.is_set() or step is None:
                        try:
                            vcpu.set_guest_debug(0)
                        except Exception:
                            pass
                        return None
                    return self._resume(vcpu, step)
                elif kind == "kill":
                    return arg
        finally:
            self._is_stopped.clear()

    def _resume(self, vcpu, step: bool) -> None:
        at_bp = False
        try:
            regs = vcpu.get_regs()
            linear = regs.rip + (self._sregs.cs.base if self._sregs is not None else 0)
            at_bp = any(bp is not None and bp.kind < 2 and bp.addr in (regs.rip, linear)
                        for bp in self._bps)
        except Exception:
            pass
        if at_bp and not step:
            # an instruction breakpoint at RIP would fire again at once: step over it first
            self._stepping_over = True
            self._apply_debug(vcpu, step=True, skip_exec_at=True)
        else:
            self._apply_debug(vcpu, step=step, skip_exec_at=at_bp)
        return None

    def _apply_debug(self, vcpu, step: bool, skip_exec_at: bool = False) -> None:
        dr = [0] * 8
        dr7 = 0
        for i, bp in enumerate(self._bps):
            if bp is None or (skip_exec_at and bp.kind < 2):
                continue
            dr[i] = bp.addr
            dr7 |= 2 << (i * 2)   # G0..G3
            if bp.kind >= 2:
                dr7 |= (_WATCH_RW[bp.kind] | _WATCH_LEN[bp.length] << 2) << (16 + i * 4)
                dr7 |= _DR7_LE_GE
        dr[7] = dr7
        control = lib.KVM_GUESTDBG_ENABLE
        if dr7:
            control |= lib.KVM_GUESTDBG_USE_HW_BP
        if step:
            control |= lib.KVM_GUESTDBG_SINGLESTEP
        if control == lib.KVM_GUESTDBG_ENABLE:
            control = 0
        vcpu.set_guest_debug(control, dr)

    def _on_vcpu(self, fn: Callable):
        """Run ``fn(vcpu)`` in the stopped vCPU 0's thread; its result (or raises)."""
        if not self._is_stopped.is_set():
            raise RuntimeError("the vCPU is running")
        box: list = []
        done = threading.Event()
        self._requests.put(("call", (fn, box, done)))
        if not done.wait(_VCPU_TIMEOUT) or not box:
            raise RuntimeError("the vCPU did not answer")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _request_stop(self, reply: bytes) -> bool:
        """Ask vCPU 0 to stop (Ctrl-C, attach); the stop reply goes out when it has."""
        with self._state_lock:
            if self._is_stopped.is_set() or self._stop_pending:
                return True
            t = self._vcpu_thread()
            if t is None or self._vm_done():
                return False
            self._stop_pending = True
            self._stop_reply_pending = reply
        self._stop_requested_at = time.monotonic()
        t.call(lambda vcpu: self._stop_if_pending(vcpu, reply))
        return True

    def _rekick(self) -> None:
        """Ask again for a stop still pending: VcpuThread.call cannot kick a vCPU whose thread
        has not created it yet, and its request would wait for the next interruption."""
        with self._state_lock:
            if not self._stop_pending or self._is_stopped.is_set():
                return
            reply = self._stop_reply_pending
        if time.monotonic() - self._stop_requested_at < 0.2:
            return
        t = self._vcpu_thread()
        if t is not None and not self._vm_done():
            self._stop_requested_at = time.monotonic()
            t.call(lambda vcpu: self._stop_if_pending(vcpu, reply))

    def _stop_if_pending(self, vcpu, reply: bytes) -> Outcome | None:
        with self._state_lock:   # the vCPU may have stopped otherwise since (a breakpoint)
            if not self._stop_pending:
                return None
        return self._stopped(vcpu, reply)

    # -- the server thread -----------------------------------------------------------------
    def _serve(self) -> None:
        self._sock.settimeout(0.1)
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
            try:
                self._session(conn)
            except OSError:
                pass
            except Exception:
                import traceback

                traceback.print_exc(file=sys.stderr)
            finally:
                self._conn = None
                was_attached, self._attached = self._attached, False
                conn.close()
                if was_attached and not self._killed:
                    self._detach()
        try:
            self._sock.close()
        except OSError:
            pass

    def _session(self, conn: socket.socket) -> None:
        self._ack = True
        self._attached = True
        self._exit_sent = False
        if not self._vm_done() and not self._is_stopped.is_set():
            self._request_stop(b"T02thread:01;")   # gdb expects a stopped target
        buf = bytearray()
        while not self._closing.is_set():
            if self._vm_done() and not self._exit_sent and not self._is_stopped.is_set():
                self._exit_sent = True
                if not self._killed:
                    self._send(self._exit_reply())
            r, _, _ = select.select([conn], [], [], 0.1)
            if not r:
                self._rekick()
                continue
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while buf:
                c = buf[0]
                if c == 0x2B:   # '+'
                    del buf[0]
                elif c == 0x2D:   # '-': resend
                    del buf[0]
                    if self._last_sent:
                        self._write(self._last_sent)
                elif c == 0x03:
                    del buf[0]
                    self._request_stop(b"T02thread:01;")
                elif c == 0x24:   # '$'
                    end = buf.find(b"#")
                    if end < 0 or len(buf) < end + 3:
                        break
                    payload = bytes(buf[1:end])
                    cs = bytes(buf[end + 1:end + 3])
                    del buf[:end + 3]
                    try:
                        good = int(cs, 16) == checksum(payload)
                    except ValueError:
                        good = False
                    if self._ack:
                        self._write(b"+" if good else b"-")
                    if good:
                        reply = self._handle(_unescape(payload))
                        if reply is not None:
                            self._send(reply)
                        if self._killed or payload[:1] == b"D":
                            return
                else:
                    del buf[0]   # noise between packets

    def _write(self, data: bytes) -> None:
        conn = self._conn
        if conn is None:
            return
        with self._send_lock:
            try:
                conn.sendall(data)
            except OSError:
                pass

    def _send(self, payload: bytes) -> None:
        pkt = frame(payload)
        self._last_sent = pkt
        self._write(pkt)

    def _exit_reply(self) -> bytes:
        outcome = getattr(self.machine, "_outcome", None)
        status = int(outcome.status) if outcome is not None else 0
        return b"W%02x" % (status & 0xFF)

    def _detach(self) -> None:
        """Breakpoints off, the vCPU runs on (gdb detached or went away)."""
        self._bps = [None] * 4
        with self._state_lock:
            self._awaiting_stop = False
            if self._is_stopped.is_set():
                self._is_stopped.clear()
                self._requests.put(("resume", None))

    # -- packets ---------------------------------------------------------------------------
    def _handle(self, p: bytes) -> bytes | None:
        try:
            return self._dispatch(p)
        except Exception:
            return b"E01"

    def _dispatch(self, p: bytes) -> bytes | None:
        if not p:
            return b""
        cmd = p[:1]
        if p.startswith(b"qSupported"):
            return (b"PacketSize=%x;qXfer:features:read+;QStartNoAckMode+;hwbreak+;"
                    b"vContSupported+" % PACKET_SIZE)
        if p == b"QStartNoAckMode":
            self._send(b"OK")   # acknowledged with acks still on
            self._ack = False
            return None
        if p.startswith(b"qXfer:features:read:"):
            return self._qxfer(p[len(b"qXfer:features:read:"):])
        if p == b"?":
            if self._vm_done() and not self._is_stopped.is_set():
                self._exit_sent = True
                return self._exit_reply()
            if self._is_stopped.is_set():
                return self._stop_reply
            deadline = time.monotonic() + _VCPU_TIMEOUT
            while time.monotonic() < deadline and not self._vm_done():
                if self._is_stopped.wait(0.1):
                    return self._stop_reply
                self._rekick()
            return b"E01"
        if p == b"qAttached":
            return b"1"
        if p == b"qC":
            return b"QC01"
        if p == b"qfThreadInfo":
            return b"m01"
        if p == b"qsThreadInfo":
            return b"l"
        if cmd == b"H":
            return b"OK"
        if cmd == b"T":
            return b"OK" if int(p[1:] or b"1", 16) in (1, -1, 0) else b"E01"
        if p == b"vCont?":
            return b"vCont;c;C;s;S"
        if p.startswith(b"vCont;"):
            action = p[6:].split(b";")[0].split(b":")[0]
            if action[:1] in (b"c", b"C"):
                return self._continue(False)
            if action[:1] in (b"s", b"S"):
                return self._continue(True)
            return b"E01"
        if p == b"vMustReplyEmpty" or cmd == b"v":
            return b""
        if cmd == b"g":
            return self._on_vcpu(self._read_all).hex().encode()
        if cmd == b"G":
            data = bytes.fromhex(p[1:].decode())
            self._on_vcpu(lambda v: self._write_all(v, data))
            return b"OK"
        if cmd == b"p":
            n = int(p[1:], 16)
            if n >= len(REGISTERS):
                return b"E01"
            return self._on_vcpu(lambda v: self._read_reg(v, n)).hex().encode()
        if cmd == b"P":
            reg, _, val = p[1:].partition(b"=")
            n = int(reg, 16)
            if n >= len(REGISTERS):
                return b"E01"
            data = bytes.fromhex(val.decode())
            self._on_vcpu(lambda v: self._write_reg(v, n, data))
            return b"OK"
        if cmd == b"m":
            addr, _, length = p[1:].partition(b",")
            data = self._read_memory(int(addr, 16), int(length, 16))
            return data.hex().encode() if data else b"E14"
        if cmd == b"M":
            head, _, hexdata = p[1:].partition(b":")
            addr, _, length = head.partition(b",")
            data = bytes.fromhex(hexdata.decode())
            if len(data) != int(length, 16):
                return b"E01"
            return b"OK" if self._write_memory(int(addr, 16), data) else b"E14"
        if cmd in (b"c", b"s", b"C", b"S"):
            args = p[1:].split(b";")
            addr = args[-1] if cmd in (b"c", b"s") else (args[1] if len(args) > 1 else b"")
            if addr:
                rip = int(addr, 16)
                self._on_vcpu(lambda v: self._set_rip(v, rip))
            return self._continue(cmd in (b"s", b"S"))
        if cmd in (b"Z", b"z"):
            return self._breakpoint(cmd == b"Z", p[1:])
        if cmd == b"k":
            self._kill()
            return None
        if cmd == b"D":
            self._attached = False
            self._detach()
            return b"OK"
        return b""   # unsupported

    def _qxfer(self, args: bytes) -> bytes:
        annex, _, span = args.partition(b":")
        if annex != b"target.xml":
            return b"E00"
        off, _, length = span.partition(b",")
        off, length = int(off, 16), int(length, 16)
        xml = target_xml().encode()
        chunk = xml[off:off + length]
        return (b"l" if off + length >= len(xml) else b"m") + chunk

    def _continue(self, step: bool) -> bytes | None:
        if not self._is_stopped.is_set():
            return b"E01"
        with self._state_lock:
            self._is_stopped.clear()
            self._awaiting_stop = True
            self._requests.put(("resume", step))
        return None   # the stop reply comes when the vCPU stops again

    def _kill(self) -> None:
        self._killed = True
        outcome = Outcome(StopReason.STOPPED, ExitStatus.OK, "killed by gdb")
        with self._state_lock:
            if self._is_stopped.is_set():
                self._is_stopped.clear()
                self._requests.put(("kill", outcome))
        self.machine._finish(outcome)

    def _breakpoint(self, insert: bool, args: bytes) -> bytes:
        kind, addr, length = (int(x, 16) for x in args.split(b";")[0].split(b",")[:3])
        if kind > 4:
            return b""
        if kind >= 2:
            if length not in _WATCH_LEN or addr % length:
                return b"E01"
        if insert:
            for bp in self._bps:
                if bp is not None and (bp.kind, bp.addr, bp.length) == (kind, addr, length):
                    return b"OK"
            free = [i for i, bp in enumerate(self._bps) if bp is None]
            if not free:
                return b"E01"
            self._bps[free[0]] = _Breakpoint(kind, addr, length)
        else:
            for i, bp in enumerate(self._bps):
                if bp is not None and (bp.kind, bp.addr) == (kind, addr):
                    self._bps[i] = None
        # the debug registers are loaded at the next resume (from the vCPU thread)
        return b"OK"

    # -- registers (vCPU thread) -------------------------------------------------------------
    def _read_all(self, vcpu) -> bytes:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        out = bytearray()
        for name in _GPRS:
            out += getattr(regs, name).to_bytes(8, "little")
        out += regs.rip.to_bytes(8, "little")
        out += (regs.rflags & 0xFFFFFFFF).to_bytes(4, "little")
        for s in _SEGS:
            out += getattr(sregs, s).selector.to_bytes(4, "little")
        out += self._x87(vcpu)
        return bytes(out)

    @staticmethod
    def _x87(vcpu) -> bytes:
        try:
            f = vcpu.get_fpu()
        except Exception:
            return bytes(80) + (0x37F).to_bytes(4, "little") + bytes(4) + \
                (0xFFFF).to_bytes(4, "little") + bytes(16)
        out = bytearray()
        for i in range(8):
            out += bytes(f.fpr[i][0:10])
        ftag = 0
        for i in range(8):
            if not f.ftwx & (1 << i):
                ftag |= 3 << (2 * i)
        for v in (f.fcw, f.fsw, ftag, 0, f.last_ip & 0xFFFFFFFF, 0, f.last_dp & 0xFFFFFFFF,
                  f.last_opcode):
            out += (v & 0xFFFFFFFF).to_bytes(4, "little")
        return bytes(out)

    def _read_reg(self, vcpu, n: int) -> bytes:
        data = self._read_all(vcpu)
        off = sum(size for _, size, _ in REGISTERS[:n])
        return data[off:off + REGISTERS[n][1]]

    def _write_all(self, vcpu, data: bytes) -> None:
        off = 0
        values = {}
        for i, (name, size, _) in enumerate(REGISTERS[:_NUM_CORE]):
            if off + size > len(data):
                break
            values[i] = data[off:off + size]
            off += size
        self._set(vcpu, values)

    def _write_reg(self, vcpu, n: int, data: bytes) -> None:
        if n < _NUM_CORE:
            self._set(vcpu, {n: data})
        # x87 registers: accepted and ignored (KVM_SET_FPU is not honoured everywhere)

    def _set(self, vcpu, values: dict[int, bytes]) -> None:
        regs = vcpu.get_regs()
        sregs = None
        for n, raw in values.items():
            name = REGISTERS[n][0]
            v = int.from_bytes(raw, "little")
            if name == "eflags":
                regs.rflags = (regs.rflags & ~0xFFFFFFFF) | v | 2
            elif name in _SEGS:
                if sregs is None:
                    sregs = vcpu.get_sregs()
                seg = getattr(sregs, name)
                if seg.selector != v & 0xFFFF:
                    # only the selector changes; the cached descriptor stays (as after a load
                    # from a flat GDT): gdb writes segments back unchanged in practice
                    seg.selector = v & 0xFFFF
                else:
                    continue
            else:
                setattr(regs, name, v)
        vcpu.set_regs(regs)
        if sregs is not None:
            vcpu.set_sregs(sregs)

    @staticmethod
    def _set_rip(vcpu, rip: int) -> None:
        regs = vcpu.get_regs()
        regs.rip = rip
        vcpu.set_regs(regs)

    # -- memory (server thread; the guest is stopped) ---------------------------------------
    def _gpa_chunks(self, addr: int, length: int):
        """(gpa, n) pieces of the virtual range, page by page; stops at the first unmapped."""
        from kvmpy.vcpu.report import translate

        memory = self.machine.memory
        sregs = self._sregs
        while length > 0:
            n = min(length, 0x1000 - (addr & 0xFFF))
            gpa = translate(memory, sregs, addr) if sregs is not None else addr
            if gpa is None or not memory.contains(gpa, n):
                return
            yield gpa, n
            addr, length = addr + n, length - n

    def _read_memory(self, addr: int, length: int) -> bytes:
        if not self._is_stopped.is_set() and self._sregs is None:
            return b""
        out = bytearray()
        try:
            for gpa, n in self._gpa_chunks(addr, min(length, PACKET_SIZE // 2 - 16)):
                out += self.machine.memory.read(gpa, n)
        except Exception:
            pass
        return bytes(out)

    def _write_memory(self, addr: int, data: bytes) -> bool:
        chunks = list(self._gpa_chunks(addr, len(data)))
        if sum(n for _, n in chunks) != len(data):
            return False
        off = 0
        for gpa, n in chunks:
            self.machine.memory.write(gpa, data[off:off + n])
            off += n
        return True


def _unescape(p: bytes) -> bytes:
    if b"}" not in p:
        return p
    out = bytearray()
    it = iter(p)
    for b in it:
        if b == 0x7D:
            out.append(next(it, 0) ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def parse_address(spec: str) -> tuple[str, int]:
    """``tcp::1234``, ``tcp:HOST:PORT``, ``HOST:PORT`` or ``PORT`` -> (host, port)."""
    s = spec[4:] if spec.startswith("tcp:") else spec
    host, sep, port = s.rpartition(":")
    if not sep:
        host = ""
    return (host or "127.0.0.1"), int(port)
