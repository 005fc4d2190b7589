"""Guest console output to a host fd (kvmpy.builder.StreamSink): it waits for a slow reader and
loses nothing, but a reader that stopped reading never keeps the VM from ending (--timeout,
Ctrl-C, Ctrl-A x)."""
import fcntl
import os
import pty
import signal
import subprocess
import sys
import threading
import time

import pytest

from kvmpy.builder import StreamSink

# COM1 output as fast as the guest can go, without waiting for THRE (the UART takes every byte)
SPAM = """
        .code16
        mov $COM1, %dx
1:      mov $'x', %al
        out %al, %dx
        jmp 1b
"""

DATA = bytes(range(256)) * 1024      # 256 KiB: four times a pipe's default capacity


def _reader(fd, delay, out):
    time.sleep(delay)                 # the writer fills the pipe and waits meanwhile
    while chunk := os.read(fd, 65536):
        out.append(chunk)
        time.sleep(0.001)             # a slow reader: the writer keeps waiting for room


@pytest.mark.parametrize("nonblocking", [False, True])
def test_a_slow_reader_gets_every_byte(nonblocking):
    """Partial writes are continued and, on an fd someone else made non-blocking, EAGAIN is
    waited out (the sink used to drop the rest of both)."""
    r, w = os.pipe()
    if nonblocking:
        fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
    got = []
    t = threading.Thread(target=_reader, args=(r, 0.3, got))
    t.start()
    try:
        sink = StreamSink(w)
        sink(DATA)
        sink(b"end")
        sink.close()                  # its own description of the pipe: EOF needs it closed
    finally:
        os.close(w)
        t.join(10)
        os.close(r)
    assert b"".join(got) == DATA + b"end"


def test_cancel_ends_a_write_that_waits_for_a_reader():
    r, w = os.pipe()
    sink = StreamSink(w)
    t = threading.Thread(target=sink, args=(DATA,))
    try:
        t.start()
        t.join(0.5)
        assert t.is_alive(), "the pipe is full: the write should be waiting"
        cancelled = time.monotonic()
        sink.cancel()
        t.join(5)
        assert not t.is_alive()
        assert time.monotonic() - cancelled < 1.0
        sink(b"more")                 # dropped at once: nobody waits after cancel
        sink.close()
    finally:
        os.close(w)
        os.close(r)


def test_a_closed_reader_drops_output_without_stopping_the_guest():
    r, w = os.pipe()
    os.close(r)
    sink = StreamSink(w)
    sink(DATA)                        # EPIPE (SIGPIPE is ignored by Python): dropped
    sink.close()
    os.close(w)


def _kvmpy_run(image, *extra, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
               stderr=subprocess.PIPE):
    """`kvmpy run IMAGE --mode real EXTRA...` in a child process."""
    return subprocess.Popen([sys.executable, "-m", "kvmpy", "run", image, "--mode", "real",
                             *extra], stdin=stdin, stdout=stdout, stderr=stderr)


@pytest.mark.parametrize("how", ["timeout", "ctrl-c"])
def test_a_stdout_nobody_reads_does_not_keep_the_vm_from_ending(build_guest, how):
    """``kvmpy run ... | less`` with less paging, or a harness that never reads stdout: the
    guest fills the pipe and its vCPU waits in the write. The VM used to hang there for good,
    --timeout and Ctrl-C included (each waits for the vCPU thread to leave)."""
    image = build_guest("stdout_spam", source=SPAM)
    r, w = os.pipe()
    extra = ["--timeout", "1"] if how == "timeout" else ["--timeout", "60"]
    p = _kvmpy_run(image, *extra, stdout=w)
    os.close(w)
    try:
        if how == "ctrl-c":
            time.sleep(1.5)           # started, pipe full, vCPU waiting in the write
            p.send_signal(signal.SIGINT)
        status = p.wait(timeout=20)
        err = p.stderr.read().decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
        os.close(r)
    assert status == (124 if how == "timeout" else 130), err


def _kvm_fds(pid):
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return [t for t in fds if "kvm" in t]


def test_a_trace_to_a_stderr_nobody_reads_does_not_keep_the_vm_from_ending(build_guest):
    """``--trace -`` writes a JSON line per exit to stderr from the vCPU thread (``kvmpy run
    ... --trace - 2>&1 | less``): the same wait as the console's, the same way out. kvmpy's own
    last message then waits for the reader like any program's output, but by then the VM is
    gone: no vCPU thread, no KVM fd."""
    image = build_guest("stdout_spam", source=SPAM)
    r, w = os.pipe()
    p = _kvmpy_run(image, "--trace", "-", "--timeout", "1", stderr=w)
    os.close(w)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.2)
            threads, kvm = len(os.listdir(f"/proc/{p.pid}/task")), _kvm_fds(p.pid)
            if threads == 1 and not kvm:
                break
        assert (threads, kvm) == (1, []), "the VM is still there after its --timeout"
        with os.fdopen(r, "rb") as f:
            r = None
            first = f.readline()
            f.read()                  # the last message: now the process can end
        assert p.wait(timeout=20) == 124
        assert first.startswith(b"{") and b'"IO"' in first
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if r is not None:
            os.close(r)


@pytest.mark.parametrize("typed_first", [b"", b"a"])
def test_ctrl_a_x_ends_a_vm_whose_terminal_is_not_read(build_guest, typed_first):
    """A pty whose other side is not reading (a terminal that stopped drawing): the guest's
    output fills it, and Ctrl-A x typed on it must still end the VM, also after other keys
    (the input thread feeding them used to wait for the UART lock, which the waiting output
    held)."""
    image = build_guest("stdout_spam", source=SPAM)
    master, slave = pty.openpty()
    p = _kvmpy_run(image, "--timeout", "60", stdin=slave, stdout=slave)
    try:
        time.sleep(1.5)               # raw mode set, output buffer full, vCPU waiting
        if typed_first:
            os.write(master, typed_first)
            time.sleep(0.5)
        os.write(master, b"\x01x")
        status = p.wait(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
        os.close(master)
        os.close(slave)
    assert status == 0


def test_a_socket_is_polled_before_each_write():
    """A socket cannot be opened again through /proc: the sink polls the fd itself."""
    import socket

    a, b = socket.socketpair()
    got = []
    t = threading.Thread(target=_reader, args=(b.fileno(), 0.3, got))
    t.start()
    try:
        sink = StreamSink(a.fileno())
        sink(DATA)
        sink.close()
        a.shutdown(socket.SHUT_WR)
        t.join(10)
    finally:
        a.close()
        b.close()
    assert b"".join(got) == DATA


def test_a_machine_closes_the_sinks_description_and_leaves_the_fd_as_it_was(build_guest):
    from kvmpy.builder import FlatConfig, build_flat
    from kvmpy.vcpu.modes import Mode

    image = build_guest("uart_hello")
    r, w = os.pipe()
    flags = fcntl.fcntl(w, fcntl.F_GETFL)
    try:
        fds = len(os.listdir("/proc/self/fd"))
        with build_flat(FlatConfig(image, Mode.REAL, console_sink=StreamSink(w))) as m:
            m.start(m.setup)
            assert m.wait(10).status == 0x21
            assert len(os.listdir("/proc/self/fd")) > fds   # KVM fds, and the sink's own
        assert len(os.listdir("/proc/self/fd")) == fds
        assert fcntl.fcntl(w, fcntl.F_GETFL) == flags          # still blocking
        os.close(w)
        w = None
        with os.fdopen(r, "rb") as f:
            r = None
            assert f.read() == b"hello from a real-mode guest\na5\n"
    finally:
        for fd in (r, w):
            if fd is not None:
                os.close(fd)


def test_writers_take_turns_on_a_full_pipe():
    """COM1 (a vCPU thread) and hvc0 (an I/O thread) share the sink: two writers waiting for
    room at once used to make the second one's poll() raise RuntimeError (one poll object)."""
    r, w = os.pipe()
    a, b = b"A" * len(DATA), b"B" * len(DATA)
    got, errors = [], []
    reader = threading.Thread(target=_reader, args=(r, 0.3, got))
    reader.start()
    sink = StreamSink(w)

    def write(data):
        try:
            sink(data)
        except Exception as e:
            errors.append(e)
    writers = [threading.Thread(target=write, args=(d,)) for d in (a, b)]
    try:
        for t in writers:
            t.start()
        for t in writers:
            t.join(10)
        sink.close()
    finally:
        os.close(w)
        reader.join(10)
        os.close(r)
    assert not errors
    assert b"".join(got) in (a + b, b + a)      # each writer's data in one piece


def test_a_pty_master_is_written_not_reopened():
    """/proc/self/fd/N of a pty master is /dev/ptmx: opening it makes a new pty, and the
    output went there."""
    master, slave = pty.openpty()
    try:
        sink = StreamSink(master)
        sink(b"through the master\n")
        sink.close()
        import select

        assert select.select([slave], [], [], 2)[0], "nothing reached the pty"
        assert os.read(slave, 100).replace(b"\r", b"") == b"through the master\n"
    finally:
        os.close(master)
        os.close(slave)


def test_an_fd_that_is_another_file_now_gets_nothing(tmp_path):
    """stdout closed, and its number reused by a file kvmpy (or the program) opened since:
    guest output must not land in that file."""
    r, w = os.pipe()
    sink = StreamSink(w)
    os.close(w)
    victim = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT)
    try:
        assert victim == w            # the lowest free number
        sink(b"guest output")
        sink.close()
        assert os.path.getsize(tmp_path / "data") == 0
    finally:
        os.close(victim)
        os.close(r)


def test_a_sink_serves_one_machine_after_another(build_guest):
    from kvmpy.builder import FlatConfig, build_flat
    from kvmpy.vcpu.modes import Mode

    image = build_guest("uart_hello")
    r, w = os.pipe()
    sink = StreamSink(w)
    try:
        for _ in range(2):
            with build_flat(FlatConfig(image, Mode.REAL, console_sink=sink)) as m:
                m.start(m.setup)
                assert m.wait(10).status == 0x21
        os.close(w)
        w = None
        with os.fdopen(r, "rb") as f:
            r = None
            assert f.read() == b"hello from a real-mode guest\na5\n" * 2
    finally:
        for fd in (r, w):
            if fd is not None:
                os.close(fd)
