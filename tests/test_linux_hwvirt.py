"""Booting the default Linux guest (Debian's kernel + kvmpy's busybox initramfs) for real.

These need hardware virtualization: on a software KVM (PVM) a stock kernel cannot boot
(shared/pvm-host.md) and kvmpy's pytest plugin skips them, naming the host's KVM. They are
complete as written: run `make test` on a VT-x/AMD-V machine.
"""
import pytest

import kvmpy
from conftest import T

pytestmark = pytest.mark.hwvirt


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    from kvmpy.image import build_default_guest

    return build_default_guest(str(tmp_path_factory.mktemp("guest")))


PROMPT = rb"kvmpy:[^\n]*[#$] "


def boot(guest, cpus=1, **kw):
    return kvmpy.VM(kernel=guest.kernel, initrd=guest.initrd, append=guest.cmdline, mem="512M",
                    cpus=cpus, timeout=T(180), **kw)


def test_boot_to_shell_run_command_and_reboot(guest):
    with boot(guest, cpus=2) as vm:
        vm.console.expect(rb"kvmpy guest: Linux \S+ up, 2 CPUs", timeout=T(120))
        vm.console.expect(PROMPT, timeout=T(30))
        vm.console.sendline("nproc")
        vm.console.expect(rb"\n2\r?\n", timeout=T(10))
        vm.console.sendline("uname -sm")
        vm.console.expect(rb"Linux x86_64", timeout=T(10))
        vm.console.sendline("cat /proc/cmdline")
        vm.console.expect(rb"console=ttyS0", timeout=T(10))
        vm.console.sendline("reboot")
        result = vm.wait(T(60))
    assert result.status == 0 and result.reason == "reset", vm.console.text()[-2000:]


def test_poweroff_ends_the_vm(guest):
    with boot(guest) as vm:
        vm.console.expect(PROMPT, timeout=T(120))
        vm.console.sendline("poweroff")
        result = vm.wait(T(60))
    assert result.status == 0


def test_fast_boot_reaches_the_shell(guest):
    with boot(guest, fast_boot=True) as vm:
        vm.console.expect(rb"kvmpy guest: Linux", timeout=T(120))
        vm.console.expect(PROMPT, timeout=T(30))
        vm.console.sendline("exit")
        assert vm.wait(T(60)).status == 0


def test_rtc_and_clock(guest):
    import datetime

    with boot(guest) as vm:
        vm.console.expect(PROMPT, timeout=T(120))
        vm.console.sendline("date -u +%Y%m%d%H%M")
        m = vm.console.expect(rb"\n(\d{12})\r?\n", timeout=T(10))
        now = datetime.datetime.now(datetime.timezone.utc)
        guest_time = datetime.datetime.strptime(m.group(1).decode(), "%Y%m%d%H%M").replace(
            tzinfo=datetime.timezone.utc)
        assert abs((guest_time - now).total_seconds()) < 180
        vm.console.sendline("reboot")
        assert vm.wait(T(60)).status == 0


def test_kernel_panic_ends_the_vm_with_status_12(guest):
    # The guest's init loads pvpanic-pci; Linux's panic notifier then writes PVPANIC_PANICKED
    # before panic=-1 would reboot (which would look like a clean reboot, status 0).
    with boot(guest) as vm:
        vm.console.expect(PROMPT, timeout=T(120))
        vm.console.sendline("ls /sys/bus/pci/drivers/pvpanic-pci/")
        vm.console.expect(rb"0000:00:0\w\.0", timeout=T(10))    # the driver bound the device
        vm.console.sendline("echo c > /proc/sysrq-trigger")
        result = vm.wait(T(60))
    assert result.status == 12 and result.reason == "guest-panic", vm.console.text()[-2000:]
