"""The default Linux guest driving kvmpy's virtio devices for real (virtio-pci, as Debian's
kernel finds them). Hardware virtualization only: skipped on software KVM (PVM), naming it."""
import http.server
import re
import shutil
import subprocess
import threading

import pytest

import kvmpy
from conftest import T

pytestmark = pytest.mark.hwvirt
PROMPT = rb"kvmpy:[^\n]*[#$] "


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    from kvmpy.image import build_default_guest

    return build_default_guest(str(tmp_path_factory.mktemp("guest")))


def sh(vm, cmd, expect, timeout=30):
    vm.console.sendline(cmd)
    return vm.console.expect(expect, timeout=T(timeout))


def test_blk_ext4_rng_and_user_net(guest, tmp_path):
    if shutil.which("mkfs.ext4") is None:
        pytest.fail("mkfs.ext4 missing: apt-get install e2fsprogs")
    disk = tmp_path / "disk.ext4"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk)], check=True)
    ro_disk = tmp_path / "ro.img"                  # a read-only second disk: /dev/vdb
    ro_disk.write_bytes(b"read-only!" * 52428 + b"\0" * 8)   # 512 KiB
    ro_before = ro_disk.read_bytes()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("served by the host\n")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=str(tmp_path / "www"), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        with kvmpy.VM(kernel=guest.kernel, initrd=guest.initrd, append=guest.cmdline,
                      mem="512M", disks=[str(disk), f"{ro_disk},ro"], nets=["user"],
                      rng=True, timeout=T(240)) as vm:
            vm.console.expect(PROMPT, timeout=T(120))
            sh(vm, "mkdir -p /mnt && mount /dev/vda /mnt && echo mounted", rb"\nmounted")
            sh(vm, "echo kvmpy-was-here > /mnt/f && sync && cat /mnt/f", rb"kvmpy-was-here")
            # discard: a file's blocks, freed and trimmed, are holes in the image again
            sh(vm, "dd if=/dev/urandom of=/mnt/big bs=1M count=4 2>/dev/null && sync && "
                   "echo written", rb"\nwritten", 60)
            allocated = disk.stat().st_blocks * 512
            sh(vm, "rm /mnt/big && sync && fstrim /mnt && echo trimmed", rb"\ntrimmed", 60)
            assert allocated - disk.stat().st_blocks * 512 >= 3 << 20
            sh(vm, "umount /mnt && echo done", rb"\ndone")
            # the read-only disk: the guest sees it read-only, and a write is refused
            sh(vm, "cat /sys/block/vdb/ro; head -c 10 /dev/vdb; echo", rb"1\r?\nread-only!")
            sh(vm, "blockdev --setrw /dev/vdb; dd if=/dev/zero of=/dev/vdb bs=512 count=1 "
                   "oflag=direct; echo dd=$?",
               rb"error writing '/dev/vdb': Operation not permitted[\s\S]*dd=1")
            sh(vm, "udhcpc -i eth0 -q -n && ip -4 addr show eth0", rb"10\.0\.2\.15", 60)
            sh(vm, f"wget -q -O - http://10.0.2.2:{port}/hello.txt", rb"served by the host")
            sh(vm, "head -c 16 /dev/hwrng | hexdump | head -1", rb"0000000 ")
            vm.console.sendline("reboot")
            assert vm.wait(T(60)).status == 0
    finally:
        server.shutdown()
    out = subprocess.run(["debugfs", "-R", "cat /f", str(disk)], capture_output=True, text=True)
    assert "kvmpy-was-here" in out.stdout
    assert ro_disk.read_bytes() == ro_before


def test_virtio_console_is_the_guests_console(guest):
    # console=hvc0: the kernel's console and the shell are on kvmpy's virtio-console; what the
    # test types goes to hvc0 (vm.console follows the CLI's stdin there).
    append = guest.cmdline.replace("console=ttyS0", "console=hvc0")
    with kvmpy.VM(kernel=guest.kernel, initrd=guest.initrd, append=append, mem="512M",
                  virtio_console=True, timeout=T(240)) as vm:
        vm.console.expect(PROMPT, timeout=T(120))
        sh(vm, "tty; cat /proc/consoles", rb"/dev/hvc0[\s\S]*hvc0")
        sh(vm, "echo $((6 * 7))-via-hvc0", rb"\n42-via-hvc0")
        vm.console.sendline("reboot")
        assert vm.wait(T(60)).status == 0


def test_pci_intx_and_i8042_aux_interrupts(guest, tmp_path):
    # pci=nomsi: no MSI-X, so virtio-pci falls back to INTA#, which Linux (no ACPI here) finds
    # through the MP table's PCI entries; without them it said "can't find IRQ for PCI INT A;
    # probably buggy MP table" and had no working interrupt for the device.
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"intx-disk!" * 6553 + b"\0" * 6)    # 64 KiB
    # Without i8042.noaux too: Linux tests the i8042's AUX IRQ 12, which kvmpy wires (it used
    # not to: the test waited 250 ms and Linux dropped the port).
    append = guest.cmdline.replace("i8042.noaux", "") + " pci=nomsi"
    with kvmpy.VM(kernel=guest.kernel, initrd=guest.initrd, append=append,
                  mem="512M", disks=[str(disk)], rng=True, timeout=T(240)) as vm:
        vm.console.expect(PROMPT, timeout=T(120))
        routes = vm.machine.pci.intx_routes
        sh(vm, "dmesg | grep -c \"can't find IRQ\"", rb"\n0\r?\n")
        sh(vm, "dmesg | grep 'i8042 AUX'", rb"serio: i8042 AUX port at 0x60,0x64 irq 12")
        for slot, _, gsi in routes:
            # the kernel asked the MP table and got the line kvmpy wired
            sh(vm, f"cat /sys/bus/pci/devices/0000:00:{slot:02x}.0/irq", rf"\n{gsi}\r?\n".encode())
        out = sh(vm, "grep virtio /proc/interrupts; echo end-of-list",
                 rb"(?s)\n(.*)\nend-of-list")
        lines = out.group(1).decode(errors="replace")
        for _, _, gsi in routes:
            assert re.search(rf"\s{gsi}:\s+[1-9]\d*\s.*IO-APIC\s+{gsi}-fasteoi", lines), lines
        sh(vm, "head -c 10 /dev/vda; echo; head -c 16 /dev/hwrng | wc -c",
           rb"intx-disk!\r?\n16")
        vm.console.sendline("reboot")
        assert vm.wait(T(60)).status == 0
