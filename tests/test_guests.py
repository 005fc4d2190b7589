"""End to end: guests assembled from tests/guests/*.S, run by the `kvmpy run` command as a user
runs it (a new process), checked on their console output and exit status."""
import datetime
import json
import re

import pytest

from conftest import run_kvmpy
from kvmpy.doctor import kvm_flavour

LONG = 0x100000


def kvmpy_run(guest_path, mode, *extra, **kw):
    return run_kvmpy("run", guest_path, "--mode", mode, *extra, **kw)


def test_uart_hello_and_debug_exit_status(build_guest):
    p = kvmpy_run(build_guest("uart_hello"), "real")
    assert p.stdout == b"hello from a real-mode guest\na5\n"
    assert p.returncode == (0x10 << 1) | 1
    assert p.stderr == b""


def test_rtc_matches_host_clock(build_guest):
    p = kvmpy_run(build_guest("rtc"), "real")
    assert p.returncode == 0x21, p.stderr
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = p.stdout.decode().splitlines()
    bcd = lines[0].split()[1:]
    binary = lines[1].split()[1:]
    # BCD: each hex byte reads as the decimal value
    ss, mm, hh, dd, mo, yy, cc = (int(x) for x in bcd)
    guest = datetime.datetime(cc * 100 + yy, mo, dd, hh, mm, ss, tzinfo=datetime.timezone.utc)
    assert abs((guest - now).total_seconds()) < 5, (lines, now)
    s2, m2, h2 = (int(x, 16) for x in binary)
    assert (h2, m2) == (hh, mm) or abs((h2 * 3600 + m2 * 60 + s2) - (hh * 3600 + mm * 60 + ss)) < 5


def test_i8042_reset_ends_vm_with_status_0(build_guest):
    p = kvmpy_run(build_guest("reset"), "real", "--stats")
    assert p.stdout == b"resetting\n"
    assert p.returncode == 0
    assert b"reset" in p.stderr


def test_string_io(build_guest, tmp_path):
    trace = tmp_path / "t.jsonl"
    p = kvmpy_run(build_guest("strio"), "real", "--trace", str(trace))
    assert p.stdout == b"string io\nZZZZ\n"
    assert p.returncode == 0x21
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    ins = [r for r in recs if r["reason"] == "IO" and r["dir"] == "in" and r["port"] == 0x3FF]
    # rep insb of 4 bytes is one exit with count 4, all from the scratch register
    assert ins and ins[0]["count"] == 4 and ins[0]["data"] == [0x5A] * 4
    assert ins[0]["device"] == "COM1" and ins[0].get("register") == "SCR"


def test_unclaimed_ports_read_all_ones(build_guest):
    p = kvmpy_run(build_guest("unclaimed"), "real", "--stats")
    assert p.stdout == b"ff\nff\nffffffff\n"
    assert p.returncode == 0x21
    assert re.search(rb"unassigned\s+port 0x3f4\s+1", p.stderr)
    assert re.search(rb"unassigned\s+port 0x1234\s+2", p.stderr)


def test_long_mode_entry(build_guest):
    p = kvmpy_run(build_guest("long", LONG), "long")
    assert p.returncode == 0x21, p.stderr
    lines = p.stdout.decode().splitlines()
    assert lines[0] == "long mode"
    efer, cs, cr0, wide = (int(x, 16) for x in lines[1:5])
    assert efer & 0x500 == 0x500        # LME | LMA
    assert cs == 0x18
    assert cr0 & 0x80000001 == 0x80000001  # PG | PE
    assert wide == 0x12345678


def test_long_mode_with_more_than_4g_of_ram(build_guest):
    p = kvmpy_run(build_guest("long", LONG), "long", "--mem", "5G")
    assert p.returncode == 0x21, p.stderr


def test_protected_mode_entry(build_guest):
    p = kvmpy_run(build_guest("prot", LONG), "protected")
    assert p.returncode == 0x21, p.stderr
    lines = p.stdout.decode().splitlines()
    assert lines[0] == "protected mode"
    cr0, cs, ds = (int(x, 16) for x in lines[1:4])
    assert cr0 & 1 and not cr0 & 0x80000000
    assert (cs, ds) == (0x08, 0x10)


def test_mmio_unclaimed_reads_all_ones(build_guest, tmp_path):
    trace = tmp_path / "t.jsonl"
    p = kvmpy_run(build_guest("mmio", LONG), "long", "--trace", str(trace))
    assert p.returncode == 0x21, p.stderr
    assert p.stdout == b"ffffffff\nffffffff\n000000ff\n"
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    mm = [r for r in recs if r["reason"] == "MMIO"]
    assert mm[0] == {**mm[0], "addr": 0xD0000000, "size": 4, "dir": "out", "data": 0x12345678,
                     "device": "unassigned"}
    assert all(isinstance(r["rip"], int) for r in recs)


def test_triple_fault(build_guest):
    p = kvmpy_run(build_guest("triple", LONG), "long")
    assert p.stdout == b"faulting\n"
    assert p.returncode == 4
    assert b"triple" in p.stderr and b"rip:" in p.stderr


def test_emulation_failure_is_reported(build_guest):
    kind, _ = kvm_flavour()
    if kind == "hardware":
        pytest.skip("hardware KVM runs int3 natively (it triple-faults instead); the report path "
                    "is covered by test_report.py")
    p = kvmpy_run(build_guest("int3", LONG), "long")
    assert p.stdout == b"before int3\n"
    assert p.returncode == 6
    err = p.stderr.decode()
    assert "KVM_EXIT_INTERNAL_ERROR" in err
    assert "long mode (64-bit)" in err
    m = re.search(r"rip: (0x[0-9a-f]+)", err)
    assert m and int(m.group(1), 16) > LONG
    assert "cc" in err.split("instruction bytes")[1].splitlines()[0]
    assert "int3" in err
    assert "Traceback" not in err


def test_timeout_stops_a_spinning_guest(build_guest):
    p = kvmpy_run(build_guest("spin"), "real", "--timeout", "0.5")
    assert p.stdout == b"spinning\n"
    assert p.returncode == 124
    assert b"still running" in p.stderr


def test_demo_walks_to_long_mode_and_halts(tmp_path):
    p = run_kvmpy("demo", "--stats")
    out = p.stdout.decode()
    assert p.returncode == 0, p.stderr
    for step in ("real mode", "CR0.PE", "32-bit protected mode", "EFER.LME",
                 "64-bit long mode; a 64-bit register holds 0xfedcba9876543210", "halting"):
        assert step in out
    assert re.search(r"RTC says \d\d:\d\d:\d\d UTC", out)
    err = p.stderr.decode()
    assert re.search(r"IO\s+\d{3,}", err) and re.search(r"HLT\s+1", err)
    assert re.search(r"COM1\s+0x3f8-0x3ff\s+\d+\s+\d+", err)


def test_uart_interrupt_through_irqchip(build_guest):
    p = kvmpy_run(build_guest("uart_irq"), "real", "--irqchip", "--timeout", "20",
                  input=b"abq")
    assert p.returncode == 0x21, p.stderr
    assert p.stdout == b"waiting\nrx:a\nrx:b\n"


def test_i8042_aux_interrupt_through_irqchip(build_guest):
    """IRQ 12 is wired: Linux's AUX IRQ test passes, instead of costing every boot without
    i8042.noaux 250 ms and the AUX port."""
    p = kvmpy_run(build_guest("i8042_aux_irq"), "real", "--irqchip", "--timeout", "10")
    assert p.returncode == 0x21, p.stderr
    assert p.stdout == b"aux irq:a5\n"


def test_console_input_without_interrupts(build_guest, tmp_path):
    # polling guest: stdin from a regular file (cannot be polled by epoll) reaches RBR too
    (tmp_path / "in.txt").write_bytes(b"abq")
    with open(tmp_path / "in.txt", "rb") as f:
        p = run_kvmpy("run", build_guest("uart_poll"), "--mode", "real", "--timeout", "20",
                      input=None, stdin=f)
    assert p.returncode == 0x21, p.stderr
    assert p.stdout == b"abq"
