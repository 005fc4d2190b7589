"""The lessons in examples/ run as their comments say."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import run_kvmpy

EX = Path(__file__).parent.parent / "examples"


def test_lesson1_real_mode_hello():
    p = run_kvmpy("run", str(EX / "01-real-mode-hello" / "hello.S"), "--mode", "real", "--stats")
    msg = b"Hello from real mode! Each character cost two VM exits.\n"
    assert p.stdout == msg and p.returncode == 0
    err = p.stderr.decode()
    assert any(line.split() == ["IO", str(len(msg) * 2)] for line in err.splitlines()), err
    assert any(line.split() == ["HLT", "1"] for line in err.splitlines())


def test_lesson2_port_io_device():
    env = dict(os.environ, PYTHONPATH=str(EX.parent))
    p = subprocess.run([sys.executable, str(EX / "02-port-io-device" / "adder.py")],
                       capture_output=True, timeout=60, env=env)
    assert p.returncode == 85, p.stderr
    err = p.stderr.decode()
    assert "wrote 40 at offset 0" in err and "wrote 2 at offset 1" in err
    assert "reads the sum 42" in err


def test_lesson3_long_mode():
    p = run_kvmpy("run", str(EX / "03-long-mode" / "long.S"), "--mode", "long", "--trace", "-")
    assert p.stdout == b"64\n" and p.returncode == 3
    recs = [json.loads(line) for line in p.stderr.decode().splitlines() if line.startswith("{")]
    assert [r["reason"] for r in recs] == ["IO", "IO", "IO", "MMIO", "IO"]
    assert recs[3]["addr"] == 0xD0000000 and recs[3]["data"] == 0xFFFFFFFF
    assert all(r["rip"] >= 0x100000 for r in recs)


def _lesson(*parts):
    env = dict(os.environ, PYTHONPATH=str(EX.parent))
    return subprocess.run([sys.executable, str(EX.joinpath(*parts))], capture_output=True,
                          timeout=90, env=env)


def test_lesson4_real_to_long():
    p = _lesson("04-real-to-long", "walk.py")
    assert p.returncode == 0, p.stderr
    err = p.stderr.decode().splitlines()
    assert "PE=0, PG=0" in err[0] and "CS=0x0" in err[0]
    assert "PE=1, PG=0" in err[1] and "CS=0x8" in err[1]
    assert "PE=1, PG=1" in err[2] and "CR4.PAE=1" in err[2] and "EFER=0x500" in err[2]
    assert b"halting with interrupts off" in p.stdout


def test_lesson5_mmio_device():
    p = _lesson("05-mmio-device", "counter.py")
    assert p.returncode == 31, p.stderr
    err = p.stderr.decode()
    assert err.count("write TICK") == 3 and "read COUNT -> 15" in err


def test_lesson6_virtqueue_by_hand():
    p = _lesson("06-virtqueue-by-hand", "virtqueue.py")
    assert p.returncode == 0, p.stderr
    assert b"used.idx=1 head=0 written=16" in p.stdout


def test_lesson7_reading_a_trace():
    p = _lesson("07-reading-a-trace", "trace.py")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    assert "COM1.LSR read -> 0x60" in out and "COM1.THR write 0x48 'H'" in out
    assert "exits by reason" in out and "KVM_EXIT_IO" in out
