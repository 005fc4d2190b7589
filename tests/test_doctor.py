"""kvmpy doctor: names the KVM flavour and explains missing or inaccessible /dev/kvm."""
import os

from conftest import run_kvmpy
from kvmpy.doctor import kvm_flavour


def test_doctor_names_the_flavour():
    p = run_kvmpy("doctor")
    out = p.stdout.decode()
    assert p.returncode == 0, out
    kind, desc = kvm_flavour()
    assert f"KVM flavour: {kind}: {desc}" in out
    assert "API version 12" in out
    if os.path.isdir("/sys/module/kvm_pvm"):
        assert "PVM" in out and "cannot boot" in out


def test_doctor_missing_device(tmp_path):
    p = run_kvmpy("doctor", "--kvm", str(tmp_path / "kvm"))
    assert p.returncode == 1
    assert "does not exist" in p.stdout.decode() and "Traceback" not in p.stderr.decode()


def test_flavour_from_module_tree(tmp_path):
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu vme sse2\n")
    (tmp_path / "mod" / "kvm").mkdir(parents=True)
    (tmp_path / "mod" / "kvm_pvm").mkdir()
    assert kvm_flavour(str(tmp_path / "mod"), str(tmp_path / "cpuinfo"))[0] == "software"
    (tmp_path / "mod" / "kvm_pvm").rmdir()
    (tmp_path / "mod" / "kvm_intel").mkdir()
    assert kvm_flavour(str(tmp_path / "mod"), str(tmp_path / "cpuinfo")) == \
        ("hardware", "Intel VT-x (kvm_intel)")
    (tmp_path / "mod" / "kvm_intel").rmdir()
    assert kvm_flavour(str(tmp_path / "mod"), str(tmp_path / "cpuinfo"))[0] == "software"
