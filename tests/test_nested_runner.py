"""tests/nested/hwvirt_in_qemu.py, the runner of the hwvirt tests under nested SVM (`make
test-nested`): its --if-needed decision (only where this host's KVM cannot boot Linux itself),
its watchdog for a stuck L1 and the retry, and what it reports when it cannot run. (The nested
run itself is not started from here.)"""
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
    assert run.lost and run.status is None and run.kvm is True
    assert time.monotonic() - t < 20
    time.sleep(0.2)
    assert not _alive("61.2345")


def test_kernel_messages_are_no_sign_of_life_even_in_a_flood():
    run = hwvirt_in_qemu.run_l1(
        ["sh", "-c", "echo 'L1: alive'; while :; do echo '[ 12.3] watchdog: BUG: soft lockup'; "
                     "done"], lost_after=1.5, first_after=1.5)
    assert run.lost and run.last_beat == "L1: alive" and "no sign of life" in run.why


def test_at_the_deadline_an_alive_l1_has_timed_out():
    alive = hwvirt_in_qemu.run_l1(
        ["sh", "-c", "while :; do echo 'L1: alive, load 1'; sleep 0.2; done"],
        deadline=time.monotonic() + 2)
    assert alive.timed_out and not alive.lost and alive.last_beat == "L1: alive, load 1"


def test_a_reported_status_is_kept_when_l1_then_hangs():
    t = time.monotonic()
    run = hwvirt_in_qemu.run_l1(
        ["sh", "-c", "printf 'tests/test_x.py::test_y L1: alive, load 2\\n'; "
                     "echo 'FAILED [100%]'; echo '==== 1 failed, 2 passed in 3.0s ===='; "
                     "echo 'L1: command exit status 1'; exec sleep 62.5432"],
        lost_after=30, done_grace=1)
    assert (run.status, run.lost, run.passed, run.last_test, run.last_beat) == \
        (1, False, 2, "tests/test_x.py::test_y", "L1: alive, load 2")
    assert time.monotonic() - t < 20 and not _alive("62.5432")


def test_run_l1_reads_the_status_of_a_live_one():
    run = hwvirt_in_qemu.run_l1(
        ["sh", "-c", "echo 'L1: cpu has svm'; echo '== 9 passed in 1.0s =='; echo 'L1: alive'; "
                     "sleep 0.5; echo '===== 1 skipped, 6 passed in 221.6s ====='; "
                     "echo 'L1: command exit status 0'"], lost_after=5)
    assert (run.status, run.lost, run.passed, run.svm) == (0, False, 6, True)


def _fake_run(monkeypatch, results):
    monkeypatch.setattr(kvmpy.doctor, "kvm_flavour", lambda: ("software", "PVM (kvm_pvm)"))
    monkeypatch.setattr(hwvirt_in_qemu, "build_l1_initramfs", lambda: ("bzImage", "initrd"))
    monkeypatch.setattr(hwvirt_in_qemu, "_mem_available", lambda: 64 << 30)
    monkeypatch.setattr(hwvirt_in_qemu.subprocess, "run",
                        lambda *a, **k: type("P", (), {"returncode": 0})())
    calls = []

    def run_l1(cmd, deadline=None):
        calls.append(cmd)
        r = results[len(calls) - 1]
        if isinstance(r, hwvirt_in_qemu.L1Run):
            return r
        status, lost, *test = r
        return L1(status=None if lost else status, lost=lost, kvm=None if lost else True,
                  passed=0 if lost or status else 6,
                  last_test=test[0] if test else f"tests/a.py::t{len(calls)}")
    monkeypatch.setattr(hwvirt_in_qemu, "run_l1", run_l1)
    return calls


def L1(**kw):
    fields = dict(status=0, lost=False, timed_out=False, why="", svm=True, kvm=True, passed=6,
                  last_test="tests/a.py::b", last_beat="L1: alive")
    fields.update(kw)
    return hwvirt_in_qemu.L1Run(**fields)


def test_a_stuck_l1_is_tried_again_once(monkeypatch, capsys):
    calls = _fake_run(monkeypatch, [(3, True), (0, False)])
    assert hwvirt_in_qemu.main(["--if-needed"]) == 0 and len(calls) == 2
    assert "try 1 of 2" in capsys.readouterr().err
    calls = _fake_run(monkeypatch, [(3, True), (1, False)])
    assert hwvirt_in_qemu.main([]) == 1                       # a real failure stays one


def test_stuck_twice_is_not_run_unless_in_the_same_test(monkeypatch, capsys):
    _fake_run(monkeypatch, [(3, True), (3, True)])            # two different tests
    assert hwvirt_in_qemu.main([]) == hwvirt_in_qemu.NOT_RUN
    assert "NOT RUN" in capsys.readouterr().err
    _fake_run(monkeypatch, [(3, True), (3, True)])
    assert hwvirt_in_qemu.main(["--if-needed"]) == 0          # --if-needed: loud, not red
    assert "NOT RUN" in capsys.readouterr().err
    same = "tests/test_linux_hwvirt.py::test_poweroff_ends_the_vm"
    _fake_run(monkeypatch, [(3, True, same), (3, True, same)])
    assert hwvirt_in_qemu.main(["--if-needed"]) == hwvirt_in_qemu.STALLED   # kvmpy's doing?
    assert "same test" in capsys.readouterr().err


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


def test_what_l1_says_decides_the_outcome(monkeypatch, capsys):
    cases = [
        (L1(passed=0), hwvirt_in_qemu.NOTHING_PASSED),         # all skipped: not a pass
        (L1(svm=False, kvm=False, status=5, passed=0), 0),      # no SVM emulated: not run
        (L1(svm=True, kvm=False, status=5, passed=0), hwvirt_in_qemu.NO_KVM),   # broken L1
        (L1(status=None, timed_out=True), hwvirt_in_qemu.OUT_OF_TIME),
        (L1(status=None), hwvirt_in_qemu.NO_STATUS),
        (L1(status=2, passed=0), 2),                            # pytest's own status
    ]
    for run, expect in cases:
        _fake_run(monkeypatch, [run])
        assert hwvirt_in_qemu.main(["--if-needed"]) == expect, run


def test_no_retry_without_the_time_for_one(monkeypatch, capsys):
    calls = _fake_run(monkeypatch, [(3, True), (0, False)])
    clock = iter([0.0, 0.0, 0.0, hwvirt_in_qemu.STEP_LIMIT_S - 10,
                  hwvirt_in_qemu.STEP_LIMIT_S - 10])
    monkeypatch.setattr(hwvirt_in_qemu, "_clock", lambda: next(clock))
    assert hwvirt_in_qemu.main(["--if-needed"]) == 0 and len(calls) == 1
    err = capsys.readouterr().err
    assert "no time for another try" in err and "(1 try;" in err


def test_sigterm_kills_qemu_too(tmp_path):
    # a cancelled CI job: the runner gets SIGTERM; QEMU, in its own session, must still go
    import signal
    import subprocess
    code = (
        "import sys; sys.path.insert(0, 'tests/nested'); import hwvirt_in_qemu as h\n"
        "h._main = lambda argv: h.run_l1(['sh', '-c', \"echo 'L1: x'; exec sleep 63.4321\"])"
        " and 0\n"
        "h.main([])\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=str(Path(__file__).parent.parent),
                         stdout=subprocess.PIPE)
    assert p.stdout.readline().startswith(b"L1: x")
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 128 + signal.SIGTERM
    time.sleep(0.2)
    assert not _alive("63.4321")
