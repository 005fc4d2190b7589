"""kvmpy's pytest plugin (entry point ``pytest11``), for test rigs that launch VMs.

- ``kvm_vm``: a fixture factory. ``vm = kvm_vm(image="guest.S", mode="real")`` returns a started
  :class:`kvmpy.VM` (same keywords); every VM a test made is closed at teardown, whatever the
  test did. Each one records an exit trace.
- ``@pytest.mark.hwvirt``: the test needs hardware virtualization (VT-x/AMD-V); on any other
  host it is skipped with a reason naming the host's KVM flavour (e.g. PVM).
- When a test that used ``kvm_vm`` fails, its report gets a section per VM with the console
  output and the last exits of the trace.
"""
from __future__ import annotations

import os
import tempfile

import pytest

TRACE_TAIL = 40


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "hwvirt: needs hardware virtualization (VT-x/AMD-V); skipped on software "
        "KVM such as PVM, with the host's KVM flavour named")


def pytest_collection_modifyitems(config, items):
    marked = [i for i in items if i.get_closest_marker("hwvirt")]
    if not marked:
        return
    from kvmpy.doctor import kvm_flavour

    kind, desc = kvm_flavour()
    if kind == "hardware":
        return
    skip = pytest.mark.skip(reason=f"needs hardware virtualization (VT-x/AMD-V); this host's "
                                   f"KVM is {kind}: {desc}")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture
def kvm_vm(request):
    from kvmpy.api import VM

    made: list[tuple[VM, str]] = []
    request.node._kvmpy_vms = made
    tmpdir = tempfile.mkdtemp(prefix="kvmpy-vm-")

    def factory(**kwargs) -> VM:
        trace = kwargs.pop("trace", None) or os.path.join(tmpdir, f"vm{len(made)}.jsonl")
        vm = VM(trace=trace, **kwargs)
        made.append((vm, trace))
        return vm.start()

    yield factory
    for vm, _ in made:
        vm.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    vms = getattr(item, "_kvmpy_vms", None)
    if not vms or not report.failed:
        return
    for n, (vm, trace) in enumerate(vms):
        report.sections.append((f"kvmpy vm{n} console", vm.console.text() or "(no output)"))
        vm.flush_trace()
        try:
            with open(trace) as f:
                lines = f.readlines()[-TRACE_TAIL:]
        except OSError:
            lines = []
        result = vm._result
        head = f"ended: {result!r}\n" if result is not None else "still running\n"
        report.sections.append((f"kvmpy vm{n} exits (last {len(lines)} of the trace {trace})",
                                head + "".join(lines)))
