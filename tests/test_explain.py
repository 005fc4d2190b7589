"""`kvmpy explain REASON` (kvmpy/explain.py): every exit reason kvmpy decodes is explained, with
the VT-x and AMD-V exits behind it and what kvmpy does; names and numbers are accepted."""
import subprocess
import sys

import pytest

from kvmpy.errors import KvmpyError
from kvmpy.explain import EXPLANATIONS, UnknownExitReason, explain, main, resolve
from kvmpy.vmexit.exits import ExitReason, InternalSuberror


@pytest.mark.parametrize("reason", list(ExitReason), ids=lambda r: r.name)
def test_every_reason_is_explained(reason):
    text = explain(reason.name)
    assert text.startswith(f"KVM_EXIT_{reason.name} ({int(reason)}): ")
    for section in ("What it is", "What the CPU did", "Intel VT-x:", "AMD-V (SVM):",
                    "What kvmpy does"):
        assert section in text, (reason, section)
    assert "kvmpy/" in text.split("What kvmpy does")[1]     # names the module that acts
    assert max(len(line) for line in text.splitlines()) <= 100


def test_every_decoded_reason_has_an_entry():
    assert set(EXPLANATIONS) == set(ExitReason)


@pytest.mark.parametrize("spelling", ["io", "IO", "Io", "KVM_EXIT_IO", "kvm_exit_io", " io ",
                                      "2", "0x2", 2, ExitReason.IO])
def test_names_any_case_with_or_without_prefix_and_numbers(spelling):
    assert resolve(spelling) is ExitReason.IO
    assert explain(spelling) == explain("IO")


def test_unknown_reason_is_a_one_line_error_listing_the_names():
    for bad in ("bogus", "KVM_EXIT_", "99", 13, "s390_sieic"):
        with pytest.raises(UnknownExitReason) as e:
            explain(bad)
        msg = str(e.value)
        assert "\n" not in msg and isinstance(e.value, KvmpyError)
        for r in ExitReason:
            assert r.name in msg


@pytest.mark.parametrize("reason, facts", [
    ("IO", ["exit reason 30", "I/O instruction", "exit qualification", "port", "string",
            "REP", "IOIO (0x7b)", "kvmpy/vmexit/dispatch.py", "kvmpy/devices/"]),
    ("MMIO", ["48", "EPT violation", "49", "EPT misconfiguration", "memory slot", "emulator",
              "NPF (0x400)", "MMIO bus"]),
    ("HLT", ["exit reason 12", "in-kernel irqchip", "HLT (0x78)", "status 0"]),
    ("SHUTDOWN", ["triple fault", "exit reason 2,", "SHUTDOWN (0x7f)", "status 4",
                  "kvmpy/vcpu/report.py"]),
    ("INTERNAL_ERROR", ["status 6", "kvmpy/vcpu/report.py", "PVM", "emulat"]),
    ("FAIL_ENTRY", ["33", "invalid guest state", "0x80000021", "VMEXIT INVALID", "status 8"]),
    ("SYSTEM_EVENT", ["SHUTDOWN (1)", "RESET (2)", "CRASH (3)", "SEV_TERM (6)", "VMGEXIT"]),
    ("DEBUG", ["KVM_SET_GUEST_DEBUG", "exit reason 0", "#DB", "0x41", "0x43"]),
    ("IRQ_WINDOW_OPEN", ["request_interrupt_window", "exit reason 7", "VINTR (0x64)"]),
    ("INTR", ["signal", "immediate_exit", "exit reason 1", "INTR (0x60)",
              "kvmpy/vcpu/runner.py"]),
    ("EXCEPTION", ["kvm_run.ex", "split", "0x40 + vector"]),
    ("HYPERCALL", ["VMCALL", "exit reason 18", "VMMCALL (0x81)", "KVM_HC_MAP_GPA_RANGE"]),
    ("UNKNOWN", ["hardware_exit_reason", "UNEXPECTED_EXIT_REASON"]),
    ("NMI", ["NMI (0x61)", "KVM_NMI"]),
    ("TPR_ACCESS", ["KVM_TPR_ACCESS_REPORTING", "exit reason 44", "0x80"]),
    ("SET_TPR", ["CR8", "exit reason 28", "0x18"]),
])
def test_the_hardware_behind_each_exit(reason, facts):
    text = " ".join(explain(reason).split())    # unwrapped
    for fact in facts:
        assert fact in text, (reason, fact)


def test_internal_error_explains_its_suberrors_and_software_kvm():
    text = explain("internal_error")
    for sub in InternalSuberror:
        assert f"{sub.name} ({int(sub)}):" in text
    pvm = text.split("On a software KVM (PVM")[1]
    assert "int3" in " ".join(pvm.split()) and "INTERNAL_ERROR EMULATION" in pvm


def test_command(capsys):
    assert main(["MMIO"]) == 0
    assert capsys.readouterr().out == explain("MMIO")
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvmpy: unknown exit reason 'nope'") and err.count("\n") == 1


def test_command_as_a_user_runs_it():
    p = subprocess.run([sys.executable, "-m", "kvmpy.explain", "kvm_exit_hlt"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("KVM_EXIT_HLT (5): ")
