"""kvmpy boot on synthetic kernels: the real loader, zero page, e820, initrd and command line,
checked by guest code that prints what it was given."""
import re

import pytest

from conftest import GUESTS, LIB16, pvh_kernel, run_kvmpy
from synthetic import bzimage, zeropage_kernel


@pytest.fixture(scope="module")
def zp_kernel(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernels")
    path = d / "bzImage"
    path.write_bytes(zeropage_kernel(LIB16, (GUESTS / "zeropage64.S").read_text()))
    return path


def parse(out: bytes) -> dict:
    lines = out.decode().splitlines()
    res = {"cmdline": lines[0][len("cmdline:"):]}
    n = int(lines[1][len("e820:"):], 16)
    res["e820"] = [tuple(int(x, 16) for x in l.split()) for l in lines[2:2 + n]]
    init = lines[2 + n][len("initrd:"):].split()
    res["initrd"] = (int(init[0], 16), int(init[1], 16), init[2])
    m = re.match(r"loader:(\w+) flags:(\w+)", lines[3 + n])
    res["loader"], res["loadflags"] = int(m.group(1), 16), int(m.group(2), 16)
    return res


def test_bzimage_boot_protocol(zp_kernel, tmp_path):
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(bytes(range(1, 9)) + b"\xaa" * 5000)
    p = run_kvmpy("boot", "--kernel", str(zp_kernel), "--initrd", str(initrd),
                  "--append", "console=ttyS0 hello=world", "--mem", "256M")
    assert p.returncode == 0x21, p.stderr
    r = parse(p.stdout)
    assert r["cmdline"] == "console=ttyS0 hello=world"
    assert r["e820"] == [(0, 0x9FC00, 1), (0x9FC00, 0x100000 - 0x9FC00, 2),
                         (0x100000, (256 << 20) - 0x100000, 1)]
    addr, size, first = r["initrd"]
    assert size == 5008 and addr % 4096 == 0
    assert addr + size <= 256 << 20 and addr >= 0x200000      # above the kernel's init_size
    assert first == "0403020108070605"                          # LE dwords of 01..08
    assert r["loader"] == 0xFF and r["loadflags"] & 0x01        # undefined loader, LOADED_HIGH
    assert re.search(rb"kvmpy: guest boot time [\d.]+ ms since kvmpy started", p.stderr)


def test_bzimage_boot_high_memory(zp_kernel):
    p = run_kvmpy("boot", "--kernel", str(zp_kernel), "--mem", "5G", "--append", "x")
    assert p.returncode == 0x21, p.stderr
    r = parse(p.stdout)
    assert (0x1_0000_0000, 2 << 30, 1) in r["e820"]            # RAM above the MMIO hole
    assert (0x100000, 0xC000_0000 - 0x100000, 1) in r["e820"]
    assert r["initrd"][:2] == (0, 0)


def test_boot_default_cmdline(zp_kernel):
    p = run_kvmpy("boot", "--kernel", str(zp_kernel))
    assert p.returncode == 0x21, p.stderr
    assert parse(p.stdout)["cmdline"].startswith("console=ttyS0")


def test_boot_smp_starts_only_the_bsp(zp_kernel):
    # the APs wait for INIT/SIPI; the synthetic kernel never sends one, so only the BSP runs
    p = run_kvmpy("boot", "--kernel", str(zp_kernel), "--cpus", "2", "--stats")
    assert p.returncode == 0x21, p.stderr


def one_line(p, *words):
    err = p.stderr.decode()
    assert p.returncode == 2 and "Traceback" not in err and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)


def test_boot_errors(zp_kernel, tmp_path):
    k = str(zp_kernel)
    (tmp_path / "junk").write_bytes(b"\x13" * 5000)
    one_line(run_kvmpy("boot", "--kernel", str(tmp_path / "junk")), "not a Linux kernel")
    (tmp_path / "trunc").write_bytes(zp_kernel.read_bytes()[:700])
    one_line(run_kvmpy("boot", "--kernel", str(tmp_path / "trunc")), "truncated")
    (tmp_path / "old").write_bytes(bzimage(b"\xf4" * 0x300, version=0x0204))
    one_line(run_kvmpy("boot", "--kernel", str(tmp_path / "old")), "too old")
    one_line(run_kvmpy("boot", "--kernel", str(tmp_path / "nope")), "does not exist")
    one_line(run_kvmpy("boot", "--kernel", k, "--initrd", str(tmp_path / "no.img")),
             "initrd", "does not exist")
    one_line(run_kvmpy("boot", "--kernel", k, "--cpus", "0"), "--cpus 0")
    one_line(run_kvmpy("boot", "--kernel", k, "--cpus", "100000"), "--cpus 100000")
    one_line(run_kvmpy("boot", "--kernel", k, "--append", "x" * 3000), "command line", "2047")
    one_line(run_kvmpy("boot", "--kernel", k, "--mem", "8M"), "too small")
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(60 << 20)
    one_line(run_kvmpy("boot", "--kernel", k, "--mem", "40M", "--initrd", str(big)),
             "initrd", "does not fit")


def test_pvh_elf_boot(tmp_path):
    vmlinux = pvh_kernel("pvh32", tmp_path)
    (tmp_path / "initrd").write_bytes(b"\x11\x22\x33\x44" + b"\0" * 100)
    p = run_kvmpy("boot", "--kernel", str(vmlinux), "--initrd",
                  str(tmp_path / "initrd"), "--append", "pvh=yes", "--mem", "128M")
    assert p.returncode == 0x21, p.stderr
    lines = p.stdout.decode().splitlines()
    assert lines[0] == "magic:336ec578"                       # XEN_HVM_START_MAGIC_VALUE
    assert b"guest boot time" in p.stderr                     # the port 0x3f0 boot timer
    assert lines[1] == "cmdline:pvh=yes"
    mods = lines[2].split(":")[1].split()
    assert int(mods[0], 16) == 1 and int(mods[2], 16) == 104 and mods[3] == "44332211"
    n = int(lines[3].split(":")[1], 16)
    entries = [tuple(int(x, 16) for x in l.split()) for l in lines[4:4 + n]]
    assert (0x100000, (128 << 20) - 0x100000, 1) in entries and (0, 0x9FC00, 1) in entries


def test_multiboot_boot(tmp_path, build_guest):
    kernel = build_guest("multiboot", 0x100000)
    (tmp_path / "mod").write_bytes(b"m" * 3000)
    p = run_kvmpy("boot", "--kernel", kernel, "--initrd", str(tmp_path / "mod"),
                  "--append", "mb=1", "--mem", "64M")
    assert p.returncode == 0x21, p.stderr
    lines = p.stdout.decode().splitlines()
    assert lines[0] == "eax:2badb002"
    flags = int(lines[1].split()[0].split(":")[1], 16)
    assert flags & 0x1 and flags & 0x4 and flags & 0x8 and flags & 0x40   # mem, cmdline, mods, mmap
    lower = int(lines[1].split()[1].split(":")[1], 16)
    upper = int(lines[1].split()[2].split(":")[1], 16)
    assert lower == 639 and upper == (64 << 20) // 1024 - 1024
    assert lines[2] == "cmdline:mb=1"
    mods = lines[3].split(":")[1].split()
    assert int(mods[0], 16) == 1
    start, end = int(mods[1], 16), int(mods[2], 16)
    assert end - start == 3000 and start % 4096 == 0
    assert int(lines[4].split(":")[1], 16) % 24 == 0


def test_fast_boot_decompresses_on_the_host(tmp_path):
    import gzip

    vmlinux = pvh_kernel("pvh32", tmp_path, text=0x1000000)
    # a bzImage whose compressed payload is that vmlinux; its own 64-bit code just halts
    bz = bzimage(b"\xf4" * 0x300, payload=gzip.compress(vmlinux.read_bytes()))
    (tmp_path / "bzImage").write_bytes(bz)
    env = {"KVMPY_CACHE": str(tmp_path / "cache")}
    for expect_cached in (False, True):
        p = run_kvmpy("boot", "--kernel", str(tmp_path / "bzImage"), "--fast-boot",
                      "--append", "fast", env=env)
        assert p.returncode == 0x21, p.stderr
        assert p.stdout.decode().splitlines()[:2] == ["magic:336ec578", "cmdline:fast"]
        err = p.stderr.decode()
        assert "--fast-boot: gzip payload decompressed on the host" in err
        assert ("cached" in err) == expect_cached
    # without --fast-boot the same image enters its own 64-bit code, which halts (forever:
    # with the in-kernel irqchip KVM waits for an interrupt), so only the timeout ends it
    p = run_kvmpy("boot", "--kernel", str(tmp_path / "bzImage"), "--timeout", "1")
    assert p.returncode == 124 and p.stdout == b""


def test_fast_boot_errors_are_one_line(tmp_path):
    # The fast-boot loader maps the cached vmlinux; an error after its segments were parsed
    # (here: an initrd that does not fit) must reach the user as itself, not as the mapping's
    # "cannot close exported pointers exist".
    import gzip

    vmlinux = pvh_kernel("pvh32", tmp_path, text=0x1000000)
    (tmp_path / "bzImage").write_bytes(
        bzimage(b"\xf4" * 0x300, payload=gzip.compress(vmlinux.read_bytes())))
    (tmp_path / "initrd").write_bytes(b"\0" * (40 << 20))
    p = run_kvmpy("boot", "--kernel", str(tmp_path / "bzImage"), "--fast-boot", "--mem", "32M",
                  "--initrd", str(tmp_path / "initrd"), env={"KVMPY_CACHE": str(tmp_path)})
    err = p.stderr.decode()
    assert p.returncode not in (0, 0x21) and "Traceback" not in err, err
    assert "initrd" in err and "BufferError" not in err and len(err.strip().splitlines()) == 1


def test_smp_ap_started_by_the_guest_with_init_sipi(tmp_path):
    # --cpus 2: the MP table lists both CPUs, the AP waits in the in-kernel LAPIC until the
    # guest's INIT + STARTUP IPI, then runs real-mode code and sees its own APIC id in CPUID.
    vmlinux = str(pvh_kernel("smp32", tmp_path))
    p = run_kvmpy("boot", "--kernel", vmlinux, "--cpus", "2", "--mem", "64M")
    assert p.returncode == 0x21, (p.stdout, p.stderr)
    assert p.stdout.decode().splitlines() == ["mp cpus:00000002 bsp:00000000",
                                              "bsp apic:00000000", "ap apic:00000001"]
    one = run_kvmpy("boot", "--kernel", vmlinux, "--mem", "64M")
    assert one.returncode == 0x23                                 # --cpus 1: nobody answers
    assert one.stdout.decode().splitlines()[-1] == "ap:timeout"


def test_symbols_with_a_bzimage_turn_kaslr_off(zp_kernel, tmp_path):
    # A System.map only names traced RIPs if the decompressor did not move the kernel (KASLR).
    smap = tmp_path / "System.map"
    smap.write_text("ffffffff81000000 T _text\nffffffff81000200 T startup_64\n")
    trace = tmp_path / "t.jsonl"
    p = run_kvmpy("boot", "--kernel", str(zp_kernel), "--append", "quiet", "--trace", str(trace),
                  "--symbols", str(smap))
    assert p.returncode == 0x21, p.stderr
    assert parse(p.stdout)["cmdline"] == "quiet nokaslr"
    assert b"adding nokaslr" in p.stderr
    p = run_kvmpy("boot", "--kernel", str(zp_kernel), "--append", "kaslr", "--trace",
                  str(trace), "--symbols", str(smap))                 # the user's choice stands
    assert parse(p.stdout)["cmdline"] == "kaslr" and b"nokaslr" not in p.stderr
    p = run_kvmpy("boot", "--kernel", str(zp_kernel), "--append", "quiet")   # no symbols
    assert parse(p.stdout)["cmdline"] == "quiet"


# -- virtio-mmio on a kernel that cannot see it ----------------------------------------------

@pytest.fixture
def versioned_kernel(tmp_path):
    """A synthetic bzImage with a version string, and a /boot-style config beside it."""
    path = tmp_path / "vmlinuz-6.1.0-test"
    path.write_bytes(bzimage(zeropage_kernel_code(), kernel_version="6.1.0-test (kvmpy@tests) #1"))
    return path


def zeropage_kernel_code() -> bytes:
    from kvmpy.asm import assemble
    return assemble(LIB16 + "\n" + (GUESTS / "zeropage64.S").read_text(), 0x100000)


def test_mmio_warning_from_the_kernels_config(tmp_path):
    from kvmpy.linux import virtio_mmio_cmdline_problem as problem

    kernel = tmp_path / "vmlinuz-6.1.0-50-amd64"
    assert problem(str(kernel), "6.1.0-50-amd64 (debian-kernel@lists.debian.org) #1") is None
    config = tmp_path / "config-6.1.0-50-amd64"
    config.write_text("CONFIG_VIRTIO_MMIO=m\n# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set\n")
    msg = problem(str(kernel), "6.1.0-50-amd64 (debian-kernel@lists.debian.org) #1")
    assert "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES" in msg and "--transport pci" in msg
    assert str(config) in msg and "\n" not in msg
    config.write_text("CONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y\n")
    assert problem(str(kernel), "6.1.0-50-amd64 #1") is None
    assert problem(str(kernel), "") is None                    # no version string: no guess


@pytest.mark.parametrize("transport, warned", [("mmio", True), ("pci", False)])
def test_boot_warns_when_the_kernel_cannot_see_mmio_devices(versioned_kernel, transport, warned):
    (versioned_kernel.parent / "config-6.1.0-test").write_text(
        "CONFIG_VIRTIO_MMIO=y\n# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set\n")
    p = run_kvmpy("boot", "--kernel", str(versioned_kernel), "--mem", "64M", "--rng",
                  "--transport", transport)
    assert p.returncode == 0x21, p.stderr
    assert (b"built without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES" in p.stderr) == warned, p.stderr


def test_mp_table_routes_the_pci_interrupt_pins(zp_kernel, tmp_path):
    """A Linux machine with virtio-pci devices tells the guest where their INTA# pins go: a
    guest without ACPI otherwise finds no IRQ for them ("can't find IRQ for PCI INT A")."""
    import struct

    import kvmpy
    from test_mptable import parse as parse_mptable

    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    vm = kvmpy.VM(kernel=str(zp_kernel), disks=[str(disk)], rng=True, append="x")
    try:
        routes = vm.machine.pci.intx_routes
        assert [(d, pin) for d, pin, _ in routes] == [(1, 1), (2, 1)]
        assert all(16 <= gsi < 24 for _, _, gsi in routes)
        _, _, _, entries = parse_mptable(vm.read_memory(0x9FC00, 0x400))
        ints = [struct.unpack_from("<BBHBBBB", e) for e in entries if e[0] == 3]
        pci = [(i[4] >> 2, (i[4] & 3) + 1, i[6]) for i in ints if i[3] == 0]   # bus 0: PCI
        assert pci == routes
        for d, _, gsi in routes:     # Interrupt Line says the same
            assert vm.machine.pci.functions[(d, 0)].config[0x3C] == gsi
    finally:
        vm.close()
