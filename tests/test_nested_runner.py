"""tests/nested/hwvirt_in_qemu.py, the runner of the hwvirt tests under nested SVM (`make test`
runs it after the suite): its --if-needed decision (only where this host's KVM cannot boot Linux
itself), its watchdog for a stuck L1 and the retry, and what it reports when it cannot run.
(The nested run itself is not started from here; `make test` does that.)"""
import sys
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


def test_run_l1_kills_a_silent_l1_and_reads_the_status_of_a_live_one():
    import time
    t = time.monotonic()
    status, lost = hwvirt_in_qemu.run_l1(["sh", "-c", "echo booting; exec sleep 60"],
                                         lost_after=1)
    assert (status, lost) == (3, True) and time.monotonic() - t < 30
    status, lost = hwvirt_in_qemu.run_l1(
        ["sh", "-c", "echo 'L1: alive'; sleep 0.5; echo 'L1: command exit status 5'"],
        lost_after=5)
    assert (status, lost) == (5, False)


def _fake_run(monkeypatch, results):
    monkeypatch.setattr(kvmpy.doctor, "kvm_flavour", lambda: ("software", "PVM (kvm_pvm)"))
    monkeypatch.setattr(hwvirt_in_qemu, "build_l1_initramfs", lambda: ("bzImage", "initrd"))
    monkeypatch.setattr(hwvirt_in_qemu, "_mem_available", lambda: 64 << 30)
    monkeypatch.setattr(hwvirt_in_qemu.subprocess, "run",
                        lambda *a, **k: type("P", (), {"returncode": 0})())
    calls = []

    def run_l1(cmd):
        calls.append(cmd)
        return results[len(calls) - 1]
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
