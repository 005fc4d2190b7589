"""kvmpy's pytest plugin, tested with pytester (a pytest run inside the test)."""
import shutil


def test_fixture_marker_and_failure_report(pytester, build_guest):
    hello = build_guest("uart_hello")
    spin = build_guest("spin")
    pytester.makepyfile(f"""
        import pytest

        def test_passes(kvm_vm):
            vm = kvm_vm(image={hello!r}, mode="real")
            assert vm.wait(10).status == 0x21
            assert vm.console.output.startswith(b"hello")

        def test_fails(kvm_vm):
            vm = kvm_vm(image={spin!r}, mode="real")
            vm.console.expect("spinning")
            assert False, "deliberate"

        @pytest.mark.hwvirt
        def test_needs_hardware():
            pass
    """)
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider")
    from kvmpy.doctor import kvm_flavour

    kind, desc = kvm_flavour()
    if kind == "hardware":
        result.assert_outcomes(passed=2, failed=1)
    else:
        result.assert_outcomes(passed=1, failed=1, skipped=1)
        result.stdout.fnmatch_lines([f"*needs hardware virtualization*{kind}*"])
    result.stdout.fnmatch_lines(["*kvmpy vm0 console*", "spinning", "*kvmpy vm0 exits*",
                                 '*"reason":"IO"*'])
    assert shutil.which("python3")
