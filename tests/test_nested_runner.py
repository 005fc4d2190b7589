"""tests/nested/hwvirt_in_qemu.py's --if-needed decision (`make test-nested`): run the hwvirt
tests under nested SVM only where this host's KVM cannot boot Linux itself. (The nested run
itself is not started from here.)"""
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
