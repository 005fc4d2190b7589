"""The initramfs writer, read back by GNU cpio, and the default guest built from Debian's kernel
and busybox-static: its contents, its module closure, its /init, and byte-identical rebuilds.
Where QEMU is installed, the guest is also booted (TCG, no ACPI, as on kvmpy) to a shell."""
import gzip
import io
import lzma
import os
import re
import select
import shutil
import stat
import subprocess
import time

import pytest

from kvmpy import debian, image
from kvmpy.errors import KvmpyError
from kvmpy.initramfs import CpioArchive, write_archive


@pytest.fixture(scope="session")
def cpio_tool():
    """GNU cpio, installed through apt-get when missing and we are root (make deps does too)."""
    if shutil.which("cpio") is None and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "cpio"], capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    path = shutil.which("cpio")
    if path is None:
        pytest.fail("GNU cpio is needed to read archives back: apt-get install cpio")
    return path


def cpio_list(cpio, data: bytes, verbose=False) -> str:
    p = subprocess.run([cpio, "-t", "--quiet"] + (["-v", "--numeric-uid-gid"] if verbose else []),
                       input=data, capture_output=True)
    assert p.returncode == 0, p.stderr
    return p.stdout.decode()


def cpio_extract(cpio, data: bytes, dest) -> None:
    p = subprocess.run([cpio, "-i", "-d", "--quiet", "--no-absolute-filenames",
                        "--preserve-modification-time", "--nonmatching", "dev/*"],
                       input=data, capture_output=True, cwd=dest)
    assert p.returncode == 0, p.stderr


def archive_bytes(a: CpioArchive, compress=False) -> bytes:
    buf = io.BytesIO()
    a.write(buf, compress=compress)
    return buf.getvalue()


def headers(data: bytes):
    """(offset, name, mode, rdev, size) of each entry: an independent reader of the layout."""
    out, off = [], 0
    while True:
        assert off % 4 == 0 and data[off:off + 6] == b"070701", off
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        namesize, size = f[11], f[6]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        assert data[off + 110 + namesize - 1] == 0
        out.append((off, name, f[1], (f[9], f[10]), size, f[0]))
        off += 110 + namesize
        off += -off % 4
        off += size + (-size % 4)
        if name == "TRAILER!!!":
            return out, off


def sample_archive(tmp_path) -> CpioArchive:
    src = tmp_path / "payload.bin"
    src.write_bytes(bytes(range(256)) * 40 + b"tail")
    a = CpioArchive()
    a.add_file("/etc/hostname", b"kvmpy\n")
    a.add_file("bin/tool", b"#!/bin/sh\necho hi\n", mode=0o755)
    a.add_file("data/payload.bin", source=str(src), mode=0o600)
    a.add_file("empty", b"")
    a.add_symlink("bin/sh", "busybox")
    a.add_symlink("lib64", "/lib")
    a.add_dir("tmp", 0o1777)
    for path, major, minor, mode in image.DEVICES:
        a.add_chardev(path, major, minor, mode)
    for n in range(1, 9):                    # names of every length mod 4, data of every size mod 4
        a.add_file("p/" + "x" * n, b"y" * n)
    return a


# ---- the cpio writer ------------------------------------------------------------------------

def test_newc_layout_is_aligned_and_ends_in_trailer(tmp_path):
    data = archive_bytes(sample_archive(tmp_path))
    entries, end = headers(data)
    assert end == len(data)
    names = [e[1] for e in entries]
    assert names[-1] == "TRAILER!!!"
    assert names[:-1] == sorted(names[:-1])
    assert [e[5] for e in entries[:-1]] == list(range(1, len(entries)))   # inodes in order
    # implied parents come before their children
    assert names.index("dev") < names.index("dev/console")
    assert names.index("p") < names.index("p/x")


def test_gnu_cpio_lists_names_modes_links_and_devices(tmp_path, cpio_tool):
    data = archive_bytes(sample_archive(tmp_path))
    names = cpio_list(cpio_tool, data).split()
    assert names == sorted(names)
    assert {"etc", "etc/hostname", "bin", "bin/tool", "bin/sh", "data/payload.bin", "empty",
            "lib64", "tmp", "dev/console", "dev/null", "dev/ttyS0", "dev/hvc0"} <= set(names)
    listing = {line.split()[-1] if "->" not in line else line.split()[-3]: line
               for line in cpio_list(cpio_tool, data, verbose=True).splitlines()}
    assert listing["dev/console"].startswith("crw-------")
    assert re.search(r"\b5,\s+1\b", listing["dev/console"])
    assert listing["dev/null"].startswith("crw-rw-rw-")
    assert re.search(r"\b1,\s+3\b", listing["dev/null"])
    assert re.search(r"\b4,\s+64\b", listing["dev/ttyS0"])
    assert re.search(r"\b229,\s+0\b", listing["dev/hvc0"])
    assert listing["bin/sh"].startswith("lrwxrwxrwx") and listing["bin/sh"].endswith("-> busybox")
    assert listing["lib64"].endswith("-> /lib")
    assert listing["bin/tool"].startswith("-rwxr-xr-x")
    assert listing["tmp"].startswith("drwxrwxrwt")
    assert " 0 " in listing["etc/hostname"]          # uid/gid 0 (numeric)


def test_gnu_cpio_extracts_contents_and_modes(tmp_path, cpio_tool):
    a = sample_archive(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    cpio_extract(cpio_tool, archive_bytes(a), out)
    assert (out / "etc/hostname").read_bytes() == b"kvmpy\n"
    assert (out / "data/payload.bin").read_bytes() == (tmp_path / "payload.bin").read_bytes()
    assert (out / "empty").read_bytes() == b""
    for n in range(1, 9):
        assert (out / "p" / ("x" * n)).read_bytes() == b"y" * n
    assert stat.S_IMODE(os.lstat(out / "bin/tool").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(out / "data/payload.bin").st_mode) == 0o600
    assert os.readlink(out / "bin/sh") == "busybox"
    assert os.lstat(out / "etc/hostname").st_mtime == 0


def test_output_is_deterministic_and_gzip_header_fixed(tmp_path, cpio_tool):
    one = archive_bytes(sample_archive(tmp_path), compress=True)
    two = archive_bytes(sample_archive(tmp_path), compress=True)
    assert one == two
    assert one[:4] == b"\x1f\x8b\x08\x00"            # gzip, deflate, no FNAME flag
    assert one[4:8] == b"\0\0\0\0"                     # mtime 0
    assert gzip.decompress(one) == archive_bytes(sample_archive(tmp_path))
    # insertion order does not matter
    a = CpioArchive()
    a.add_file("b", b"2")
    a.add_file("a", b"1")
    b = CpioArchive()
    b.add_file("a", b"1")
    b.add_file("b", b"2")
    assert archive_bytes(a) == archive_bytes(b)
    path = tmp_path / "x.cpio.gz"
    write_archive(sample_archive(tmp_path), str(path), compress=True)
    assert path.read_bytes() == one and sorted(os.listdir(tmp_path)) == ["payload.bin", "x.cpio.gz"]


def test_writer_refuses_bad_entries(tmp_path):
    a = CpioArchive()
    a.add_file("etc/passwd", b"")
    with pytest.raises(ValueError):
        a.add_file("/etc/passwd", b"again")
    with pytest.raises(ValueError):
        a.add_file("etc/passwd/x", b"")               # a file is no directory
    with pytest.raises(ValueError):
        a.add_file("x", b"a", source="/etc/hostname")
    with pytest.raises(ValueError):
        a.add_dir("/")
    with pytest.raises(ValueError):
        a.add_symlink("l", "")
    a.add_dir("etc", 0o700)                            # an explicit mode replaces the implied one
    assert [e.mode & 0o777 for e in a.entries() if e.name == "etc"] == [0o700]
    assert "../../etc/passwd" in a                     # normalized, never escapes the root
    a.add_file("gone", source=str(tmp_path / "missing"))
    with pytest.raises(KvmpyError, match="missing"):
        archive_bytes(a)


# ---- kernel modules -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def kernel():
    return debian.debian_kernel()


@pytest.fixture(scope="session")
def busybox():
    return debian.busybox_static()


def test_modinfo_reads_depends_and_vermagic(kernel):
    path = image.scan_modules(kernel.modules)["virtio_pci"]
    info = dict(image.modinfo(image.read_module(path)))
    assert info["name"] == "virtio_pci"
    assert info["vermagic"].split()[0] == kernel.version
    assert {"virtio", "virtio_ring"} <= set(info["depends"].split(","))


def test_closure_skips_builtins_and_decompresses_xz(tmp_path, kernel):
    """A module tree of .ko.xz files where virtio_ring is built in: the closure of virtio_mmio
    is virtio then virtio_mmio, read back as the original ELF."""
    files = image.scan_modules(kernel.modules)
    moddir = tmp_path / "lib/modules/test"
    (moddir / "kernel/drivers/virtio").mkdir(parents=True)
    for name in ("virtio", "virtio_mmio"):
        raw = open(files[name], "rb").read()
        (moddir / f"kernel/drivers/virtio/{name}.ko.xz").write_bytes(lzma.compress(raw))
    (moddir / "modules.builtin").write_text("kernel/drivers/virtio/virtio_ring.ko\n")
    mods = image.module_closure(str(moddir), ["virtio_mmio"])
    assert [m.name for m in mods] == ["virtio", "virtio_mmio"]
    assert mods[1].path == "kernel/drivers/virtio/virtio_mmio.ko"
    assert image.read_module(mods[1].source) == open(files["virtio_mmio"], "rb").read()
    assert image.modules_dep(mods) == ("kernel/drivers/virtio/virtio.ko:\n"
                                       "kernel/drivers/virtio/virtio_mmio.ko: "
                                       "kernel/drivers/virtio/virtio.ko\n")
    with pytest.raises(KvmpyError, match="virtio_blk"):
        image.module_closure(str(moddir), ["virtio_blk"])


# ---- the default guest ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def guest(tmp_path_factory, kernel, busybox):
    out = tmp_path_factory.mktemp("guest")
    return image.build_default_guest(str(out), kernel=kernel, busybox=busybox)


@pytest.fixture(scope="session")
def guest_tree(guest, tmp_path_factory, cpio_tool):
    """The default initramfs, extracted (device nodes left out), and its `cpio -tv` listing."""
    data = gzip.decompress(open(guest.initrd, "rb").read())
    root = tmp_path_factory.mktemp("initramfs")
    cpio_extract(cpio_tool, data, root)
    return root, cpio_list(cpio_tool, data, verbose=True)


def test_guest_files_and_cmdline(guest, kernel):
    assert os.path.basename(guest.kernel) == "bzImage"
    assert open(guest.kernel, "rb").read() == open(kernel.bzimage, "rb").read()
    assert guest.initrd.endswith("initramfs.cpio.gz")
    assert guest.cmdline.split()[0] == "console=ttyS0"
    assert {"reboot=k", "panic=-1"} <= set(guest.cmdline.split())


def test_guest_has_init_busybox_applets_and_devices(guest_tree, busybox):
    root, listing = guest_tree
    init = root / "init"
    assert os.stat(init).st_mode & 0o111
    assert init.read_text().startswith("#!/bin/sh\n")
    assert os.stat(root / "bin/busybox").st_mode & 0o111
    assert (root / "bin/busybox").read_bytes() == open(busybox, "rb").read()
    have = set(subprocess.run([busybox, "--list"], capture_output=True, text=True,
                              check=True).stdout.split())
    assert set(image.APPLETS) <= have, set(image.APPLETS) - have
    for applet in ("sh", "mount", "insmod", "modprobe", "poweroff", "reboot", "cttyhack",
                   "setsid", "init", "udhcpc", "ip", "hexdump", "nproc", "uname"):
        assert os.readlink(root / "bin" / applet) == "busybox"
    assert os.readlink(root / "sbin") == "bin"
    assert os.path.realpath(root / "sbin/init") == os.path.realpath(root / "bin/busybox")
    for path, major, minor, _ in image.DEVICES:
        line = next(ln for ln in listing.splitlines() if ln.endswith(" " + path))
        assert line.startswith("c") and re.search(rf"\b{major},\s+{minor}\b", line), line
    inittab = (root / "etc/inittab").read_text()
    assert "cttyhack" in inittab and "poweroff" in inittab and "reboot -f" in inittab


def test_guest_modules_closure_decompressed_and_loaded_in_order(guest_tree, kernel):
    root, _ = guest_tree
    moddir = root / "lib/modules" / kernel.version
    builtin = image.builtin_modules(kernel.modules)
    wanted = {"virtio", "virtio_ring", "virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net",
              "net_failover", "failover", "virtio_console", "virtio_rng", "rng_core", "ext4",
              "crc16", "mbcache", "jbd2", "crc32c_generic", "pvpanic_pci", "pvpanic"}
    optional = {"virtio_pci_modern_dev", "virtio_pci_legacy_dev"}
    files = image.scan_modules(kernel.modules)
    expected = {n for n in wanted | optional if n in files and n not in builtin}
    assert wanted - builtin <= expected                # every module wanted exists here

    kos = {image.module_name(p.name): p for p in moddir.rglob("*.ko")}
    assert set(kos) == expected
    assert not list(moddir.rglob("*.ko.*"))
    for name, path in kos.items():
        assert path.read_bytes()[:4] == b"\x7fELF", name
        assert path.read_bytes() == image.read_module(files[name])

    init = (root / "init").read_text()
    loads = re.findall(r"^load (\S+) (\S+)$", init, re.M)
    assert {n for n, _ in loads} == expected
    order = [n for n, _ in loads]
    rel = {n: p for n, p in loads}
    for name, path in kos.items():
        assert path.relative_to(moddir).as_posix() == rel[name]
    dep = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, deps = line.partition(":")
        dep[image.module_name(mod)] = [image.module_name(d) for d in deps.split()]
    assert set(dep) == expected
    for name, deps in dep.items():
        for d in deps:
            assert order.index(d) < order.index(name), (d, name)
        # modules.dep lists the last to load first, as busybox modprobe expects
        assert [order.index(d) for d in deps] == sorted((order.index(d) for d in deps),
                                                         reverse=True)
    assert order.index("crc32c_generic") < order.index("jbd2")   # softdep pre: crypto-crc32c
    assert set(dep["virtio_net"]) >= {"virtio", "virtio_ring", "net_failover", "failover"}
    assert set(dep["ext4"]) >= {"jbd2", "mbcache", "crc16"}
    aliases = (moddir / "modules.alias").read_text()
    assert "alias crypto-crc32c crc32c_generic\n" in aliases
    assert "alias virtio:d00000002v* virtio_blk\n" in aliases
    assert f"insmod \"/lib/modules/{kernel.version}/$2\"" in init
    assert 'echo "kvmpy guest: Linux $(uname -r) up, $(nproc) CPUs"' in init


def test_init_script_is_valid_sh(guest_tree, busybox):
    root, _ = guest_tree
    for script in ("init", "etc/udhcpc/default.script", "etc/profile"):
        p = subprocess.run([busybox, "sh", "-n", str(root / script)], capture_output=True)
        assert p.returncode == 0, (script, p.stderr)


def test_rebuild_is_byte_identical_and_cached(guest, tmp_path, kernel, busybox):
    again = image.build_default_guest(str(tmp_path), kernel=kernel, busybox=busybox)
    assert open(again.initrd, "rb").read() == open(guest.initrd, "rb").read()
    assert open(again.kernel, "rb").read() == open(guest.kernel, "rb").read()
    # same inputs, same directory: nothing is rewritten
    before = os.stat(again.initrd).st_mtime_ns
    image.build_default_guest(str(tmp_path), kernel=kernel, busybox=busybox)
    assert os.stat(again.initrd).st_mtime_ns == before
    # a lost output is rebuilt, identically
    os.unlink(again.initrd)
    image.build_default_guest(str(tmp_path), kernel=kernel, busybox=busybox)
    assert open(again.initrd, "rb").read() == open(guest.initrd, "rb").read()
    # another command line is another build, of the same files
    other = image.build_default_guest(str(tmp_path), kernel=kernel, busybox=busybox,
                                      cmdline="console=ttyS0")
    assert other.cmdline == "console=ttyS0"
    assert open(other.initrd, "rb").read() == open(guest.initrd, "rb").read()
    assert sorted(os.listdir(tmp_path)) == ["bzImage", "guest.json", "initramfs.cpio.gz"]


# ---- booting it (QEMU, TCG) -----------------------------------------------------------------

QEMU = shutil.which("qemu-system-x86_64")


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed: the guest is "
                                          "checked by inspection only")
def test_guest_boots_to_a_shell_under_qemu(guest):
    """Boot as kvmpy will: no ACPI, console on ttyS0, i8042 reset ends the VM (-no-reboot).
    The shell gets a controlling tty, the modules are loaded, and exiting the shell resets."""
    p = subprocess.Popen([QEMU, "-machine", "pc,acpi=off", "-accel", "tcg", "-m", "256",
                          "-nographic", "-no-reboot", "-kernel", guest.kernel,
                          "-initrd", guest.initrd, "-append", guest.cmdline],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = b""

    def read_until(marker: bytes, timeout: float) -> bool:
        nonlocal out
        end = time.monotonic() + timeout
        while marker not in out and time.monotonic() < end:
            if select.select([p.stdout], [], [], 0.2)[0]:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
        return marker in out

    try:
        assert read_until(b"kvmpy:/# ", 180), out.decode(errors="replace")[-3000:]
        # the terminal echoes the command: its output is told apart by "END-$((1+1))"
        p.stdin.write(b"tty; cut -d' ' -f1 /proc/modules | tr '\\n' ' '; echo; echo END-$((1+1))\n")
        p.stdin.flush()
        assert read_until(b"END-2\r\n", 60), out.decode(errors="replace")[-3000:]
        p.stdin.write(b"exit\n")
        p.stdin.flush()
        p.wait(timeout=60)
        out += p.stdout.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = out.decode(errors="replace")
    assert re.search(r"^kvmpy guest: Linux \S+ up, \d+ CPUs\r?$", text, re.M), text[-3000:]
    assert "could not load" not in text
    assert "\n/dev/ttyS0\r\n" in text                  # the shell's controlling tty
    modules = text[text.index("\n/dev/ttyS0\r\n"):text.index("END-2\r\n")]
    for name in ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng",
                 "ext4"):
        assert name in modules
    assert "reboot: Restarting system" in text
    assert p.returncode == 0
