"""Bad input: each is one line on stderr naming what was wrong, no traceback, status 2."""
import os
import subprocess
import sys

import pytest

from conftest import run_kvmpy


def one_line_error(p, *words):
    err = p.stderr.decode()
    assert p.returncode == 2, (p.returncode, err)
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("kvmpy: "), err
    for w in words:
        assert w in err, (w, err)
    assert p.stdout == b""


@pytest.fixture
def hello(build_guest):
    return build_guest("uart_hello")


def test_missing_image(tmp_path):
    one_line_error(run_kvmpy("run", str(tmp_path / "nope.bin"), "--mode", "real"),
                   "nope.bin", "does not exist")


def test_image_is_a_directory(tmp_path):
    one_line_error(run_kvmpy("run", str(tmp_path), "--mode", "real"), "directory")


def test_empty_image(tmp_path):
    (tmp_path / "e.bin").write_bytes(b"")
    one_line_error(run_kvmpy("run", str(tmp_path / "e.bin"), "--mode", "real"), "empty")


def test_unreadable_image(tmp_path, hello):
    img = tmp_path / "secret.bin"
    img.write_bytes(open(hello, "rb").read())
    img.chmod(0o000)
    cmd = ["run", str(img), "--mode", "real"]
    if os.getuid() == 0:
        # root reads any file: run kvmpy as root without the capabilities that allow it
        caps = "-dac_override,-dac_read_search"
        p = subprocess.run(["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}",
                            sys.executable, "-m", "kvmpy", *cmd], capture_output=True,
                           timeout=60, stdin=subprocess.DEVNULL)
    else:
        p = run_kvmpy(*cmd)
    one_line_error(p, "secret.bin", "not readable")


def test_image_larger_than_memory(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"\xf4" * (2 << 20))
    one_line_error(run_kvmpy("run", str(big), "--mode", "long", "--mem", "2M"),
                   "does not fit", "--mem")


def test_load_address_outside_memory(hello):
    one_line_error(run_kvmpy("run", hello, "--mode", "real", "--load", "0x40000000"),
                   "0x40000000", "outside guest memory")


def test_load_over_boot_tables(hello):
    one_line_error(run_kvmpy("run", hello, "--mode", "long", "--load", "0x9000"),
                   "overlaps", "page tables")


def test_bad_mode(hello):
    one_line_error(run_kvmpy("run", hello, "--mode", "virtual86"), "--mode", "virtual86")


@pytest.mark.parametrize("size,word", [("0", "zero"), ("abc", "bad size"), ("-5M", "bad size"),
                                       ("4K", "too small"), ("1.5G", "bad size")])
def test_bad_memory_size(hello, size, word):
    one_line_error(run_kvmpy("run", hello, "--mode", "real", f"--mem={size}"), word)


def test_bad_address(hello):
    one_line_error(run_kvmpy("run", hello, "--mode", "real", "--load", "zz"), "bad address")


def test_real_mode_entry_above_1m(hello):
    one_line_error(run_kvmpy("run", hello, "--mode", "real", "--load", "0x7c00",
                             "--entry", "0x200000"), "1 MiB")


def test_kvm_device_absent(hello, tmp_path):
    one_line_error(run_kvmpy("run", hello, "--mode", "real", "--kvm", str(tmp_path / "kvm")),
                   "does not exist", "doctor")
    one_line_error(run_kvmpy("run", hello, "--mode", "real",
                             env={"KVMPY_KVM_DEVICE": str(tmp_path / "kvm")}), "does not exist")


def test_kvm_device_not_kvm(hello):
    one_line_error(run_kvmpy("run", hello, "--mode", "real", "--kvm", "/dev/null"),
                   "not a KVM device")


def test_trace_file_unwritable(hello, tmp_path):
    one_line_error(run_kvmpy("run", hello, "--mode", "real", "--trace",
                             str(tmp_path / "no" / "dir" / "t.jsonl")), "trace file")
