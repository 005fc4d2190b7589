"""An interactive console on a real pseudo-terminal: raw mode, Ctrl-A x, terminal restored."""
import os
import pty
import subprocess
import sys
import termios
import time

from kvmpy.terminal import EscapeFilter


def test_escape_filter():
    quits, echoed = [], []
    f = EscapeFilter(lambda: quits.append(1), echoed.append)
    assert f(b"ab\x01\x01c") == b"ab\x01c"
    assert f(b"\x01h") == b"" and echoed and b"end the VM" in echoed[0]
    assert f(b"z\x01") == b"z" and f(b"x") == b"" and quits == [1]


def test_ctrl_a_x_ends_vm_and_restores_terminal(build_guest):
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    p = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", build_guest("uart_poll"),
                          "--mode", "real", "--timeout", "30"],
                         stdin=slave, stdout=slave, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        during = termios.tcgetattr(slave)
        os.write(master, b"hi")        # echoed by the guest, raw: no line buffering needed
        time.sleep(0.5)
        os.write(master, b"\x01x")
        assert p.wait(timeout=20) == 0
    finally:
        if p.poll() is None:
            p.kill()
    assert during[3] & termios.ICANON == 0, "not in raw mode while the guest ran"
    assert termios.tcgetattr(slave) == before, "terminal not restored"
    out = os.read(master, 1000)
    assert b"hi" in out
    os.close(master)
    os.close(slave)
