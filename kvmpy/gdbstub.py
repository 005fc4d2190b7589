"""A GDB remote serial protocol stub (gdb's ``target remote host:port``), all-stop, one gdb
thread per vCPU (thread N+1 is vCPU N).

One listening socket and one server thread. The server thread owns the connection: it reads
packets, acknowledges them and answers. Whatever touches a vCPU (registers, KVM_SET_GUEST_DEBUG)
runs in that vCPU's own thread: while gdb is in control every vCPU waits in
:meth:`GdbStub._park`, running the requests the server thread queues for it (``_on_cpu``).

How the guest comes to stop (all-stop: one vCPU's event stops them all):
- a hardware breakpoint or single-step (KVM_EXIT_DEBUG, through ``Dispatcher.debug_handler``);
- a Ctrl-C from gdb (0x03), or a new connection (attach) once it sends its first packet (a
  connection that never sends a valid packet, such as a port probe, neither stops the guest
  nor ends a ``wait=True`` hold);
- with ``wait=True``, before the first instruction (``wrap_setup``).
The vCPU that stops first parks and asks the others to park too (``VcpuThread.call``); the stop
reply goes out once every live vCPU is parked.

Breakpoints: gdb's ``Z0`` (software) and ``Z1`` (hardware) are both served with the debug
registers DR0-DR3 of every vCPU (KVM_GUESTDBG_USE_HW_BP): software breakpoints through
KVM_SET_GUEST_DEBUG do not work on every host (PVM), and an ``int3`` written into CPL0 code cannot
run there. A fifth breakpoint is refused with ``E01`` (gdb says "Cannot insert breakpoint N";
it does not fall back to writing int3, as it would if Z0 were unsupported). ``Z2``/``Z3``/``Z4`` watchpoints share
the four registers (x86 has no read-only watchpoint: ``Z3`` watches reads and writes).
Continuing from an instruction breakpoint first single-steps over it (as a debug register
breakpoint is a fault: it would fire again at once).

Not served: non-stop mode, ``X`` binary writes (gdb falls back to ``M``), the guest's own use of
the debug registers while gdb is attached (KVM owns them), x87 register writes, SSE registers.
In real mode gdb shows and uses IP and offsets as addresses, not CS:IP (as with QEMU).

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
from kvmpy._sigint import sigint_deferred
from kvmpy.outcome import ExitStatus, Outcome, StopReason, VmStop

PACKET_SIZE = 0x4000
_DR7_LE_GE = (1 << 8) | (1 << 9)
_WATCH_RW = {2: 0b01, 3: 0b11, 4: 0b11}          # Z type -> DR7 R/W bits
_WATCH_NAME = {2: "watch", 3: "rwatch", 4: "awatch"}
_WATCH_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}  # DR7 LEN encoding
_VCPU_TIMEOUT = 10.0                              # a parked vCPU answers a request within this
_STOP_TIMEOUT = 10.0                              # '?' waits this long for every vCPU to park
_REKICK_AFTER = 0.2

# Register numbers of the g packet: (name, size in bytes, gdb type), in target.xml order.
_GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
_SEGS = ["cs", "ss", "ds", "es", "fs", "gs"]
_X87_CTRL = ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
_SEG_BASES = ["fs_base", "gs_base"]              # feature org.gnu.gdb.i386.segments
_SYS = ["cr0", "cr2", "cr3", "cr4", "cr8", "efer"]  # kvmpy's own feature (as QEMU shows them)
REGISTERS: list[tuple[str, int, str]] = (
    [(r, 8, "int64") for r in _GPRS] + [("rip", 8, "code_ptr"), ("eflags", 4, "i386_eflags")]
    + [(s, 4, "int32") for s in _SEGS]
    + [(f"st{i}", 10, "i387_ext") for i in range(8)]
    + [(c, 4, "int") for c in _X87_CTRL]
    + [(b, 8, "int64") for b in _SEG_BASES]
    + [(c, 8, "int64") for c in _SYS])
_REG_INDEX = {name: i for i, (name, _, _) in enumerate(REGISTERS)}
_X87_FIRST, _X87_END = _REG_INDEX["st0"], _REG_INDEX["fop"] + 1   # read-only here

_EFLAGS_FLAGS = [(0, "CF"), (1, ""), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"),
                 (9, "IF"), (10, "DF"), (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"),
                 (18, "AC"), (19, "VIF"), (20, "VIP"), (21, "ID")]


def target_xml() -> str:
    """The target description: gdb/features/i386/64bit-core.xml's registers (gdb's amd64
    support requires the x87 ones in this feature), 64bit-segments.xml's fs_base/gs_base, and
    the control registers and EFER in a feature of kvmpy's own, numbered in g packet order."""
    flags = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for b, n in _EFLAGS_FLAGS)

    def reg(i: int) -> str:
        name, size, typ = REGISTERS[i]
        group = ' group="float"' if _X87_FIRST <= i < _X87_END else (
            ' group="system"' if name in _SYS else "")
        return f'<reg name="{name}" bitsize="{size * 8}" type="{typ}" regnum="{i}"{group}/>'

    core = "".join(reg(i) for i in range(_X87_END))
    segs = "".join(reg(_REG_INDEX[n]) for n in _SEG_BASES)
    sys_ = "".join(reg(_REG_INDEX[n]) for n in _SYS)
    return ('<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n'
            '<target version="1.0"><architecture>i386:x86-64</architecture>'
            '<feature name="org.gnu.gdb.i386.core">'
            f'<flags id="i386_eflags" size="4">{flags}</flags>{core}</feature>'
            f'<feature name="org.gnu.gdb.i386.segments">{segs}</feature>'
            f'<feature name="org.kvmpy.x86.sys">{sys_}</feature></target>')


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


def parse_address(spec: str) -> tuple[str, int]:
    """``tcp::1234``, ``tcp:HOST:PORT``, ``HOST:PORT`` or ``PORT`` -> (host, port); no host
    means 127.0.0.1 (a stub lets whoever connects read and write guest memory)."""
    s = spec[4:] if spec.startswith("tcp:") else spec
    host, sep, port = s.rpartition(":")
    if not sep:
        host = ""
    return (host or "127.0.0.1"), int(port)


class _Breakpoint:
    __slots__ = ("kind", "addr", "length")

    def __init__(self, kind: int, addr: int, length: int):
        self.kind, self.addr, self.length = kind, addr, length


class _Cpu:
    """What the stub knows of one vCPU. ``parked`` changes under GdbStub._lock."""

    __slots__ = ("id", "requests", "parked", "sregs", "stepping", "stepping_over")

    def __init__(self, vcpu_id: int):
        self.id = vcpu_id
        self.requests: queue.SimpleQueue = queue.SimpleQueue()   # for the parked vCPU
        self.parked = False          # in _park, serving requests (gdb may read it)
        self.sregs = None            # as of the last park: memory reads translate with them
        self.stepping = False        # resumed with a single-step gdb asked for
        self.stepping_over = False   # stepping over a breakpoint at RIP, then to continue


class GdbStub:
    """Serve gdb on ``host:port`` for every vCPU of ``machine`` (port 0: any free port; see
    ``.port``). ``wait=True``: vCPUs started with ``wrap_setup(setup)`` stop before their first
    instruction until gdb connects and lets them run. Installs itself as the machine's
    ``dispatcher.debug_handler``; ``close()`` undoes everything."""

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
        # the stop state, shared by the server thread and the vCPU threads
        self._lock = threading.Lock()
        self._cpus: dict[int, _Cpu] = {}
        self._gen = 0                        # +1 at every resume: stale park requests see it
        self._stop_wanted = wait             # every running vCPU is to park
        self._halted = False                 # every live vCPU is parked: gdb is in control
        self._stop_reply = b"T05thread:01;"
        self._stop_thread = 0                # the vCPU the stop reply names
        self._stop_asked_at = 0.0
        self._awaiting_stop = False          # gdb resumed the guest and waits for a stop reply
        self._g_thread = 0                   # Hg: the vCPU registers and memory are read on
        self._c_thread = -1                  # Hc: the vCPU 's' steps (-1: the stop thread)
        self._bps: list[_Breakpoint | None] = [None] * 4
        self._attached = False
        self._killed = False
        machine.dispatcher.debug_handler = self.debug_handler
        self._thread = threading.Thread(target=self._serve, name="kvmpy-gdbstub", daemon=True)
        with sigint_deferred():   # (kvmpy/_sigint.py)
            self._thread.start()

    # -- lifecycle -------------------------------------------------------------------------
    def wrap_setup(self, setup: Callable) -> Callable:
        """``setup`` followed, with ``wait=True``, by a stop before the first instruction."""
        def wrapped(vcpu):
            setup(vcpu)
            self._apply_debug(vcpu, step=False)
            if self.wait:   # parks unless gdb has already let the guest run (generation 0)
                outcome = self._park(vcpu, 0)
                if outcome is not None:
                    raise VmStop(outcome)
        return wrapped

    def close(self) -> None:
        """Close the connection and the socket, release parked vCPUs, end the thread."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self.machine.dispatcher.debug_handler == self.debug_handler:
            self.machine.dispatcher.debug_handler = None
        self._release_all()
        for t in self._live_threads():   # running vCPUs: debug registers off too
            t.call(lambda vcpu: self._apply_debug(vcpu, step=False))
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

    def _live_threads(self) -> list:
        """The VcpuThreads still running (started and not ended)."""
        out = []
        for t in self.machine.vcpu_threads:
            th = getattr(t, "_thread", None)
            if th is None or th.is_alive() or th.ident is None:
                out.append(t)
        return out

    def _cpu(self, vcpu_id: int) -> _Cpu:
        cpu = self._cpus.get(vcpu_id)
        if cpu is None:
            cpu = self._cpus.setdefault(vcpu_id, _Cpu(vcpu_id))
        return cpu

    def _all_parked_locked(self) -> bool:
        live = self._live_threads()
        return bool(live) and all(self._cpu(t.vcpu_id).parked for t in live)

    # -- the vCPU side ---------------------------------------------------------------------
    def debug_handler(self, exit, vcpu) -> Outcome | None:
        """Dispatcher.debug_handler: KVM_EXIT_DEBUG (a debug register hit or a single-step)."""
        if self._closing.is_set():
            self._apply_debug(vcpu, step=False)   # off, so the hit does not repeat
            return None
        cpu = self._cpu(vcpu.id)
        dr6 = exit.dr6
        hit = next((bp for i, bp in enumerate(self._bps) if dr6 & (1 << i) and bp is not None),
                   None)
        kick = False
        with self._lock:
            gen = self._gen
            if not self._attached:       # nobody to tell: breakpoints off, run on
                cpu.stepping = cpu.stepping_over = False
                rearm = True
            elif cpu.stepping_over and (hit is None or hit.kind < 2):
                cpu.stepping_over = False   # stepped over a breakpoint: arm it again, go on
                rearm = True
            elif hit is None and not (cpu.stepping or cpu.stepping_over):
                rearm = True             # a breakpoint gdb has removed since: ignore it
            else:
                rearm = False
                cpu.stepping = cpu.stepping_over = False
                if not self._stop_wanted and not self._halted:
                    tid = vcpu.id + 1
                    if hit is None:
                        self._stop_reply = b"T05thread:%02x;" % tid
                    elif hit.kind >= 2:
                        self._stop_reply = b"T05%s:%x;thread:%02x;" % (
                            _WATCH_NAME[hit.kind].encode(), hit.addr, tid)
                    else:
                        self._stop_reply = b"T05hwbreak:;thread:%02x;" % tid
                    self._stop_thread = vcpu.id
                    self._stop_wanted = kick = True
                # else: another vCPU's stop is being reported; this breakpoint fires again
                # when the vCPU resumes (only the reported vCPU steps over its breakpoint)
        if rearm:
            self._apply_debug(vcpu, step=False)
            return None
        if kick:
            self._kick_running()
        return self._park(vcpu, gen)

    def _park(self, vcpu, gen: int) -> Outcome | None:
        """A vCPU stays here while gdb is in control, running queued requests, until resumed.

        It parks only if the stop of generation ``gen`` still holds: decided under the lock
        that resume and detach take, so a vCPU never parks with nobody left to resume it."""
        cpu = self._cpu(vcpu.id)
        try:
            sregs = vcpu.get_sregs()
        except Exception:
            sregs = None
        with self._lock:
            if gen != self._gen or not (self._stop_wanted or self._halted) or cpu.parked:
                return None
            cpu.sregs = sregs
            cpu.parked = True
            report = self._stop_wanted and not self._halted and self._all_parked_locked()
            if report:
                self._halt_locked()
                awaiting, self._awaiting_stop = self._awaiting_stop, False
        if report and awaiting and self._attached:
            self._send(self._stop_reply)   # gdb waits for it after c/s/vCont
        thread = next((t for t in self.machine.vcpu_threads if t.vcpu_id == vcpu.id), None)
        try:
            while True:
                if self._closing.is_set() or self._vm_done():
                    self._apply_debug(vcpu, step=False)   # off: nobody handles a hit now
                    return None
                if thread is not None:
                    # VcpuThread.call requests (kvmpy.VM.registers()) are served while parked,
                    # as Machine.pause does
                    outcome = thread._run_requests(vcpu)
                    if outcome is not None:
                        return outcome
                try:
                    kind, arg = cpu.requests.get(timeout=0.02)
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
                    self._resume_cpu(vcpu, cpu, *arg)
                    return None
                elif kind == "kill":
                    return arg
        finally:
            with self._lock:
                cpu.parked = False

    def _halt_locked(self) -> None:
        self._halted = True
        self._stop_wanted = False
        self._g_thread = self._stop_thread

    def _kick_running(self) -> None:
        """Ask every running vCPU to park (Ctrl-C, attach, another vCPU's stop)."""
        with self._lock:
            gen = self._gen
            running = [t for t in self._live_threads() if not self._cpu(t.vcpu_id).parked]
            self._stop_asked_at = time.monotonic()
        for t in running:
            t.call(lambda vcpu, gen=gen: self._park(vcpu, gen))

    def _request_stop(self, reply: bytes, vcpu_id: int) -> None:
        with self._lock:
            if self._halted or self._stop_wanted or self._vm_done():
                return
            self._stop_wanted = True
            self._stop_reply, self._stop_thread = reply, vcpu_id
        self._kick_running()

    def _rekick(self) -> None:
        """Ask again for a stop still pending (a vCPU between exits and requests, or one that
        started after the others stopped)."""
        with self._lock:
            again = ((self._stop_wanted or self._halted) and not self._all_parked_locked()
                     and time.monotonic() - self._stop_asked_at > _REKICK_AFTER)
        if again and not self._vm_done():
            self._kick_running()

    def _resume_cpu(self, vcpu, cpu: _Cpu, step: bool, reported: bool) -> None:
        """Load the debug registers and leave _park: ``step`` one instruction, or continue
        (stepping over an instruction breakpoint at RIP first if this vCPU was reported)."""
        at = None
        try:
            regs = vcpu.get_regs()
            linear = regs.rip + (cpu.sregs.cs.base if cpu.sregs is not None else 0)
            if any(bp is not None and bp.kind < 2 and bp.addr in (regs.rip, linear)
                   for bp in self._bps):
                at = {regs.rip, linear}
        except Exception:
            pass
        if at and not step and reported:
            cpu.stepping_over = True
            self._apply_debug(vcpu, step=True, skip=at)
        else:
            cpu.stepping = step
            self._apply_debug(vcpu, step=step, skip=at if step else None)

    def _apply_debug(self, vcpu, step: bool, skip: set[int] | None = None) -> None:
        """KVM_SET_GUEST_DEBUG with the breakpoints in DR0-DR3 (less those at ``skip``)."""
        dr = [0] * 8
        dr7 = 0
        if self._attached and not self._closing.is_set():
            for i, bp in enumerate(self._bps):
                if bp is None or (skip and bp.kind < 2 and bp.addr in skip):
                    continue
                dr[i] = bp.addr
                dr7 |= 2 << (i * 2)   # G0..G3
                if bp.kind >= 2:
                    dr7 |= (_WATCH_RW[bp.kind] | _WATCH_LEN[bp.length] << 2) << (16 + i * 4)
                    dr7 |= _DR7_LE_GE
        else:
            step = False
        dr[7] = dr7
        control = 0
        if dr7 or step:
            control = lib.KVM_GUESTDBG_ENABLE
            if dr7:
                control |= lib.KVM_GUESTDBG_USE_HW_BP
            if step:
                control |= lib.KVM_GUESTDBG_SINGLESTEP
        vcpu.set_guest_debug(control, dr)

    def _on_cpu(self, vcpu_id: int, fn: Callable):
        """Run ``fn(vcpu)`` in the parked vCPU's thread; its result (or raises)."""
        with self._lock:
            cpu = self._cpus.get(vcpu_id)
            if cpu is None or not cpu.parked:
                raise RuntimeError(f"vCPU {vcpu_id} is not stopped")
            box: list = []
            done = threading.Event()
            cpu.requests.put(("call", (fn, box, done)))
        if not done.wait(_VCPU_TIMEOUT) or not box:
            raise RuntimeError(f"vCPU {vcpu_id} did not answer")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _resume(self, actions: list[tuple[str, int]]) -> bytes | None:
        """vCont semantics: each vCPU takes the first action naming it (-1: any); vCPUs no
        action names stay stopped. The stop reply follows when they stop again."""
        with self._lock:
            if not self._halted:
                return b"E01"
            plan = {}
            for cpu in self._cpus.values():
                if cpu.parked:
                    act = next((a for a, tid in actions if tid in (-1, cpu.id)), None)
                    if act is not None:
                        plan[cpu] = act
            if not plan:
                return b"E01"
            self._halted = False
            self._gen += 1
            self._awaiting_stop = True
            for cpu, act in plan.items():
                cpu.parked = False
                cpu.requests.put(("resume", (act == "s", cpu.id == self._stop_thread)))
        return None

    def _release_all(self) -> None:
        """Every vCPU runs on without breakpoints (detach, gdb gone, close)."""
        with self._lock:
            self._bps = [None] * 4
            self._gen += 1
            self._stop_wanted = self._halted = self._awaiting_stop = False
            for cpu in self._cpus.values():
                if cpu.parked:
                    cpu.parked = False
                    cpu.requests.put(("resume", (False, False)))

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
            spoke = True   # unless the session says otherwise: an error leaves the guest free
            try:
                spoke = self._session(conn)
            except OSError:
                pass
            except Exception:
                import traceback

                traceback.print_exc(file=sys.stderr)
            finally:
                self._conn = None
                self._attached = False
                conn.close()
                if spoke and not self._killed:
                    self._release_all()
        try:
            self._sock.close()
        except OSError:
            pass

    def _session(self, conn: socket.socket) -> bool:
        """Serve one connection; True if a debugger spoke on it (then, unless it killed the VM,
        the guest runs on freely afterwards). A connection that never sends a packet with a
        valid checksum nor a Ctrl-C (a port probe, an HTTP request) changes nothing: it does not
        stop a running guest and does not end --gdb-wait."""
        self._ack = True
        self._killed = False
        self._attached = True
        spoke = False

        def begin() -> None:
            nonlocal spoke
            if not spoke:
                spoke = True
                self._request_stop(b"T02thread:01;", 0)   # gdb expects a stopped target
        buf = bytearray()
        # poll, not select: select() cannot watch an fd numbered 1024 or more, which the
        # debugger's connection gets in a VMM with a raised RLIMIT_NOFILE and many fds open
        # (slirp sockets, disks, eventfds).
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        while not self._closing.is_set():
            if self._vm_done():
                # the guest ended: tell gdb if it waits for a stop, then hang up
                with self._lock:
                    awaiting = self._awaiting_stop
                if awaiting and not self._killed:
                    self._send(self._exit_reply())
                return spoke
            if not poller.poll(100):
                if spoke:
                    self._rekick()
                continue
            data = conn.recv(65536)
            if not data:
                return spoke
            buf += data
            while buf:
                c = buf[0]
                if c == 0x2B:   # '+'
                    del buf[0]
                elif c == 0x2D:   # '-': resend
                    del buf[0]
                    if self._last_sent:
                        self._write(self._last_sent)
                elif c == 0x03:   # Ctrl-C
                    del buf[0]
                    begin()
                    self._request_stop(b"T02thread:%02x;" % (self._g_thread + 1), self._g_thread)
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
                        begin()
                        reply = self._handle(_unescape(payload))
                        if reply is not None:
                            self._send(reply)
                        if self._killed or payload[:1] == b"D":
                            return spoke
                else:
                    del buf[0]   # noise between packets
        return spoke

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
            # swbreak+: gdb then never moves the PC back after a stop (it would for an int3;
            # our Z0 breakpoints are debug register faults, reported as hwbreak)
            return (b"PacketSize=%x;qXfer:features:read+;QStartNoAckMode+;swbreak+;hwbreak+;"
                    b"vContSupported+" % PACKET_SIZE)
        if p == b"QStartNoAckMode":
            self._send(b"OK")   # acknowledged with acks still on
            self._ack = False
            return None
        if p.startswith(b"qXfer:features:read:"):
            return self._qxfer(p[len(b"qXfer:features:read:"):])
        if p == b"?":
            return self._stop_status()
        if p == b"qAttached":
            return b"1"
        if p == b"qC":
            return b"QC%02x" % (self._stop_thread + 1)
        if p == b"qfThreadInfo":
            ids = sorted(self._vcpu_ids()) or [0]
            return b"m" + b",".join(b"%02x" % (i + 1) for i in ids)
        if p == b"qsThreadInfo":
            return b"l"
        if p.startswith(b"qThreadExtraInfo,"):
            vcpu_id = self._thread_arg(p.split(b",")[1])
            return f"vCPU {vcpu_id}".encode().hex().encode()
        if cmd == b"H":
            which, tid = p[1:2], int(p[2:] or b"0", 16)
            if tid > 0 and tid - 1 not in self._vcpu_ids():
                return b"E01"
            if which == b"g":
                self._g_thread = tid - 1 if tid > 0 else self._stop_thread
            elif which == b"c":
                self._c_thread = tid - 1 if tid > 0 else -1
            return b"OK"
        if cmd == b"T":
            return b"OK" if int(p[1:], 16) - 1 in self._vcpu_ids() else b"E01"
        if p == b"vCont?":
            return b"vCont;c;C;s;S"
        if p.startswith(b"vCont;"):
            actions = []
            for part in p[6:].split(b";"):
                act, _, tid = part.partition(b":")
                if act[:1] not in (b"c", b"C", b"s", b"S"):
                    return b"E01"
                actions.append((act[:1].lower().decode(), self._thread_arg(tid or b"-1")))
            return self._resume(actions)
        if p == b"vMustReplyEmpty" or cmd == b"v":
            return b""
        if cmd == b"g":
            return self._on_cpu(self._g_thread, self._read_all).hex().encode()
        if cmd == b"G":
            data = bytes.fromhex(p[1:].decode())
            self._on_cpu(self._g_thread, lambda v: self._write_all(v, data))
            return b"OK"
        if cmd == b"p":
            n = int(p[1:], 16)
            if n >= len(REGISTERS):
                return b"E01"
            return self._on_cpu(self._g_thread, lambda v: self._read_reg(v, n)).hex().encode()
        if cmd == b"P":
            reg, _, val = p[1:].partition(b"=")
            n = int(reg, 16)
            if n >= len(REGISTERS):
                return b"E01"
            data = bytes.fromhex(val.decode())
            self._on_cpu(self._g_thread, lambda v: self._set(v, {n: data}))
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
            # c/C: every vCPU continues; s/S: the Hc vCPU steps, the others stay stopped
            args = p[1:].split(b";")
            addr = args[0] if cmd in (b"c", b"s") else (args[1] if len(args) > 1 else b"")
            target = self._stop_thread if self._c_thread < 0 else self._c_thread
            if addr:
                rip = int(addr, 16)
                self._on_cpu(target, lambda v: self._set(v, {_REG_INDEX["rip"]:
                                                             rip.to_bytes(8, "little")}))
            if cmd in (b"s", b"S"):
                return self._resume([("s", target)])
            return self._resume([("c", -1)])
        if cmd in (b"Z", b"z"):
            return self._breakpoint(cmd == b"Z", p[1:])
        if cmd == b"k":
            self._kill()
            return None
        if cmd == b"D":
            self._attached = False
            self._release_all()
            return b"OK"
        return b""   # unsupported

    def _vcpu_ids(self) -> set[int]:
        return {t.vcpu_id for t in self._live_threads()}

    def _thread_arg(self, tid: bytes) -> int:
        """A thread-id of a packet -> vCPU id, or -1 for 'all' (-1) and 'any' (0)."""
        if tid.startswith(b"p"):   # multiprocess form pPID.TID
            tid = tid.partition(b".")[2] or b"-1"
        n = int(tid, 16)
        return -1 if n <= 0 else n - 1

    def _stop_status(self) -> bytes:
        """'?': the last stop reply, once every vCPU has stopped (attach stops them)."""
        deadline = time.monotonic() + _STOP_TIMEOUT
        while time.monotonic() < deadline:
            if self._vm_done():
                return self._exit_reply()
            with self._lock:
                all_parked = self._all_parked_locked()
                if not self._halted and self._stop_wanted and all_parked:
                    self._halt_locked()
                if self._halted and all_parked:
                    self._awaiting_stop = False
                    return self._stop_reply
                wanted = self._stop_wanted or self._halted
            if wanted:
                self._rekick()
            else:
                self._request_stop(b"T02thread:01;", 0)
            time.sleep(0.01)
        return b"E01"

    def _qxfer(self, args: bytes) -> bytes:
        annex, _, span = args.partition(b":")
        if annex != b"target.xml":
            return b"E00"
        off, _, length = span.partition(b",")
        off, length = int(off, 16), int(length, 16)
        xml = target_xml().encode()
        chunk = xml[off:off + length]
        return (b"l" if off + length >= len(xml) else b"m") + chunk

    def _kill(self) -> None:
        self._killed = True
        outcome = Outcome(StopReason.STOPPED, ExitStatus.OK, "killed by gdb")
        with self._lock:
            for cpu in self._cpus.values():
                if cpu.parked:
                    cpu.parked = False
                    cpu.requests.put(("kill", outcome))
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
                return b"E01"   # four debug registers, all taken
            self._bps[free[0]] = _Breakpoint(kind, addr, length)
        else:
            for i, bp in enumerate(self._bps):
                if bp is not None and (bp.kind, bp.addr) == (kind, addr):
                    self._bps[i] = None
        # the debug registers are loaded when each vCPU resumes (in its own thread)
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
        out += sregs.fs.base.to_bytes(8, "little") + sregs.gs.base.to_bytes(8, "little")
        for c in _SYS:
            out += getattr(sregs, c).to_bytes(8, "little")
        return bytes(out)

    @staticmethod
    def _x87(vcpu) -> bytes:
        try:
            f = vcpu.get_fpu()
        except Exception:   # the reset state: FCW 0x37f, every register empty
            return bytes(80) + (0x37F).to_bytes(4, "little") + bytes(4) + \
                (0xFFFF).to_bytes(4, "little") + bytes(16)
        out = bytearray()
        for i in range(8):
            out += bytes(f.fpr[i][0:10])
        ftag = 0
        for i in range(8):   # abridged FXSAVE tag (1 = valid) -> full tag (3 = empty)
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
        for i, (name, size, _) in enumerate(REGISTERS):
            if off + size > len(data):
                break
            values[i] = data[off:off + size]
            off += size
        self._set(vcpu, values)

    def _set(self, vcpu, values: dict[int, bytes]) -> None:
        """Write registers by g-packet number; unchanged ones are left alone (gdb writes back
        whole g packets), x87 writes are ignored (KVM_SET_FPU is not honoured everywhere)."""
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        regs_changed = sregs_changed = False
        for n, raw in values.items():
            name = REGISTERS[n][0]
            v = int.from_bytes(raw, "little")
            if _X87_FIRST <= n < _X87_END:
                continue
            if name == "eflags":
                new = (regs.rflags & ~0xFFFFFFFF) | v | 2
                if new != regs.rflags:
                    regs.rflags, regs_changed = new, True
            elif name in _SEGS:
                seg = getattr(sregs, name)
                if seg.selector != v & 0xFFFF:
                    # only the selector changes; the cached descriptor stays (as after a load
                    # from a flat GDT)
                    seg.selector, sregs_changed = v & 0xFFFF, True
            elif name in _SEG_BASES:
                seg = getattr(sregs, name[:2])
                if seg.base != v:
                    seg.base, sregs_changed = v, True
            elif name in _SYS:
                if getattr(sregs, name) != v:
                    setattr(sregs, name, v)
                    sregs_changed = True
            elif getattr(regs, name) != v:
                setattr(regs, name, v)
                regs_changed = True
        if regs_changed:
            vcpu.set_regs(regs)
        if sregs_changed:
            vcpu.set_sregs(sregs)
            self._cpu(vcpu.id).sregs = sregs

    # -- memory (server thread; the vCPUs are stopped) --------------------------------------
    def _gpa_chunks(self, addr: int, length: int):
        """(gpa, n) pieces of the virtual range, page by page; stops at the first unmapped.
        Translated with the Hg vCPU's page tables (physical when its paging is off)."""
        from kvmpy.vcpu.report import translate

        memory = self.machine.memory
        cpu = self._cpus.get(self._g_thread)
        sregs = cpu.sregs if cpu is not None else None
        while length > 0:
            n = min(length, 0x1000 - (addr & 0xFFF))
            try:
                gpa = translate(memory, sregs, addr) if sregs is not None else addr
            except Exception:   # a page table outside RAM
                return
            if gpa is None or not memory.contains(gpa, n):
                return
            yield gpa, n
            addr, length = addr + n, length - n

    def _read_memory(self, addr: int, length: int) -> bytes:
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
