"""tests/nested/hwvirt_in_qemu.py, the runner of the hwvirt tests under nested SVM (`make test`
runs it after the suite): its --if-needed decision (only where this host's KVM cannot boot Linux
itself), its watchdog for a stuck L1 and the retry, and what it reports when it cannot run.
(The nested run itself is not started from here; `make test` does that.)"""
import os
import sys
import time
from pathlib import Path

import kvmpy.doctor

sys.path.insert(0, str(Path(__file__).parent / "nested"))
import hwvirt_in_qemu  # noqa: E402


def test_if_needed_does_nothing_on_a_hardware_kvm_host(monkeypatch, capsys):
    monkeypatch.setattr(kvmpy.doctor, "kvm_flavour", lambda: ("hardware", "AMD-V (kvm_amd)"))
    monkeypatch.setattr(hwvirt_in_qemu, "build_l1_initramfs",
                        lambda: (_ for _ in ()).throw(AssertionError("must not build L1")))
    assert hwvirt_in_qemu.main(["--if-needed"]) == 0
    assert "ran natively" in capsys.readouterr().out


def test_if_needed_runs_on_a_software_kvm_host(monkeypatch, capsys):
    monkeypatch.setattr(kvmpy.doctor, "kvm_flavour", lambda: ("software", "PVM (kvm_pvm)"))
    monkeypatch.setattr(hwvirt_in_qemu, "build_l1_initramfs",
                        lambda: (_ for _ in ()).throw(RuntimeError("would build L1")))
    monkeypatch.setattr(hwvirt_in_qemu.subprocess, "run",
                        lambda *a, **k: type("P", (), {"returncode": 0})())   # qemu "found"
    try:
        hwvirt_in_qemu.main(["--if-needed"])
    except RuntimeError as e:
        assert "would build L1" in str(e)
    else:
        raise AssertionError("the nested run did not start")
    assert "running the hwvirt tests" in capsys.readouterr().out


def _alive(marker: str) -> bool:
    """Whether a process whose command line holds ``marker`` is still running."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    return True
        except OSError:
            pass
    return False


def test_run_l1_kills_a_silent_l1_and_everything_it_started():
    # the real shape: QEMU under timeout(1). Killing timeout alone left QEMU running (and the
    # pipe open, so the runner hung): the whole process group must go.
    t = time.monotonic()
    run = hwvirt_in_qemu.run_l1(["timeout", "-k", "10", "120", "sh", "-c",
                                 "echo 'L1: /dev/kvm ready'; exec sleep 61.2345"],
                                lost_after=1, first_after=1)
    assert run.lost and run.status == 3 and run.kvm is True
    assert time.monotonic() - t < 20
    time.sleep(0.2)
    assert not _alive("61.2345")


def test_kernel_messages_are_no_sign_of_life():
    run = hwvirt_in_qemu.run_l1(
        ["sh", "-c", "echo 'L1: alive'; while :; do echo '[ 12.3] watchdog: BUG: soft lockup'; "
                     "sleep 0.2; done"], lost_after=1.5, first_after=1.5)
    assert run.lost and run.last_beat == "L1: alive"


def test_a_reported_status_is_kept_when_l1_then_hangs():
    t = time.monotonic()
    run = hwvirt_in_qemu.run_l1(
        ["sh", "-c", "echo 'tests/test_x.py::test_y FAILED'; echo '==== 1 failed, 2 passed in "
                     "3.0s ===='; echo 'L1: command exit status 1'; exec sleep 62.5432"],
        lost_after=30, done_grace=1)
    assert (run.status, run.lost, run.passed, run.last_test) == \
        (1, False, 2, "tests/test_x.py::test_y")
    assert time.monotonic() - t < 20 and not _alive("62.5432")


def test_run_l1_reads_the_status_of_a_live_one():
    run = hwvirt_in_qemu.run_l1(
        ["sh", "-c", "echo 'L1: alive'; sleep 0.5; echo '===== 6 passed in 221.6s ====='; "
                     "echo 'L1: command exit status 0'"], lost_after=5)
    assert (run.status, run.lost, run.passed) == (0, False, 6)


def _fake_run(monkeypatch, results):
    monkeypatch.setattr(kvmpy.doctor, "kvm_flavour", lambda: ("software", "PVM (kvm_pvm)"))
    monkeypatch.setattr(hwvirt_in_qemu, "build_l1_initramfs", lambda: ("bzImage", "initrd"))
    monkeypatch.setattr(hwvirt_in_qemu, "_mem_available", lambda: 64 << 30)
    monkeypatch.setattr(hwvirt_in_qemu.subprocess, "run",
                        lambda *a, **k: type("P", (), {"returncode": 0})())
    calls = []

    def run_l1(cmd):
        calls.append(cmd)
        status, lost = results[len(calls) - 1]
        return hwvirt_in_qemu.L1Run(status, lost, None if lost else True,
                                    0 if lost or status else 6, "tests/a.py::b", "L1: alive")
    monkeypatch.setattr(hwvirt_in_qemu, "run_l1", run_l1)
    return calls


def test_a_stuck_l1_is_tried_again_once(monkeypatch, capsys):
    calls = _fake_run(monkeypatch, [(3, True), (0, False)])
    assert hwvirt_in_qemu.main(["--if-needed"]) == 0 and len(calls) == 2
    assert "try 1 of 2" in capsys.readouterr().err
    calls = _fake_run(monkeypatch, [(3, True), (1, False)])
    assert hwvirt_in_qemu.main([]) == 1                       # a real failure stays one


def test_stuck_twice_is_reported_as_not_run(monkeypatch, capsys):
    _fake_run(monkeypatch, [(3, True), (3, True)])
    assert hwvirt_in_qemu.main([]) == 4
    assert "NOT RUN" in capsys.readouterr().err
    _fake_run(monkeypatch, [(3, True), (3, True)])
    assert hwvirt_in_qemu.main(["--if-needed"]) == 0          # make test: loud, not red
    assert "NOT RUN" in capsys.readouterr().err


def test_no_memory_or_no_l1_kernel_is_not_run_under_if_needed(monkeypatch, capsys):
    from kvmpy.errors import KvmpyError
    calls = _fake_run(monkeypatch, [(0, False)])
    monkeypatch.setattr(hwvirt_in_qemu, "_mem_available", lambda: 2 << 30)   # after _fake_run
    assert hwvirt_in_qemu.main(["--if-needed"]) == 0 and not calls
    assert "NOT RUN" in capsys.readouterr().err
    monkeypatch.setattr(hwvirt_in_qemu, "_mem_available", lambda: 64 << 30)

    def no_kernel():
        raise KvmpyError("apt-get download linux-image-amd64 failed: no network")
    monkeypatch.setattr(hwvirt_in_qemu, "build_l1_initramfs", no_kernel)
    assert hwvirt_in_qemu.main(["--if-needed"]) == 0 and not calls
    assert "NOT RUN: no L1 kernel" in capsys.readouterr().err
    try:
        hwvirt_in_qemu.main([])                                # asked for explicitly: an error
    except KvmpyError:
        pass
    else:
        raise AssertionError("the missing kernel was not reported")


def test_nothing_passed_or_no_kvm_in_l1_is_not_a_pass(monkeypatch, capsys):
    _fake_run(monkeypatch, [(0, False)])
    monkeypatch.setattr(hwvirt_in_qemu, "run_l1",
                        lambda cmd: hwvirt_in_qemu.L1Run(0, False, True, 0, "", ""))
    assert hwvirt_in_qemu.main(["--if-needed"]) == 5          # all skipped: not a pass
    monkeypatch.setattr(hwvirt_in_qemu, "run_l1",
                        lambda cmd: hwvirt_in_qemu.L1Run(0, False, False, 0, "", ""))
    assert hwvirt_in_qemu.main([]) == 4
    assert "no /dev/kvm" in capsys.readouterr().err


def test_no_retry_without_the_time_for_one(monkeypatch, capsys):
    calls = _fake_run(monkeypatch, [(3, True), (0, False)])
    clock = iter([0.0, 0.0, hwvirt_in_qemu.STEP_LIMIT_S - 10, hwvirt_in_qemu.STEP_LIMIT_S - 10])
    monkeypatch.setattr(hwvirt_in_qemu.time, "monotonic", lambda: next(clock))
    assert hwvirt_in_qemu.main(["--if-needed"]) == 0 and len(calls) == 1
    assert "no time for another try" in capsys.readouterr().err
