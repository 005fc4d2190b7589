"""The default Linux guest driving kvmpy's virtio devices for real (virtio-pci, as Debian's
kernel finds them). Hardware virtualization only: skipped on software KVM (PVM), naming it."""
import http.server
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
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("served by the host\n")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=str(tmp_path / "www"), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        with kvmpy.VM(kernel=guest.kernel, initrd=guest.initrd, append=guest.cmdline,
                      mem="512M", disks=[str(disk)], nets=["user"], rng=True,
                      timeout=T(240)) as vm:
            vm.console.expect(PROMPT, timeout=T(120))
            sh(vm, "mkdir -p /mnt && mount /dev/vda /mnt && echo mounted", rb"\nmounted")
            sh(vm, "echo kvmpy-was-here > /mnt/f && sync && cat /mnt/f", rb"kvmpy-was-here")
            sh(vm, "umount /mnt && echo done", rb"\ndone")
            sh(vm, "udhcpc -i eth0 -q -n && ip -4 addr show eth0", rb"10\.0\.2\.15", 60)
            sh(vm, f"wget -q -O - http://10.0.2.2:{port}/hello.txt", rb"served by the host")
            sh(vm, "head -c 16 /dev/hwrng | hexdump | head -1", rb"0000000 ")
            vm.console.sendline("reboot")
            assert vm.wait(T(60)).status == 0
    finally:
        server.shutdown()
    out = subprocess.run(["debugfs", "-R", "cat /f", str(disk)], capture_output=True, text=True)
    assert "kvmpy-was-here" in out.stdout
