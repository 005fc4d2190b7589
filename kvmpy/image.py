"""The default Linux guest: Debian's stock kernel and a busybox initramfs built for kvmpy.

:func:`build_default_guest` copies Debian's bzImage into a directory and writes beside it an
initramfs (``initramfs.cpio.gz``) holding:

- busybox-static at /bin/busybox, with a symlink per applet in :data:`APPLETS` (/sbin, /usr/bin
  and /usr/sbin are symlinks to /bin);
- the device nodes the kernel needs before devtmpfs is mounted (/dev/console for init's stdio);
- the virtio drivers and ext4 (:data:`MODULES`) and the modules they depend on, decompressed
  (busybox insmod may not read .ko.xz) at their usual /lib/modules/VERSION/ paths, with a
  modules.dep and modules.alias for busybox modprobe;
- /init (:data:`INIT_SCRIPT`), which mounts /proc, /sys and /dev, loads the modules in dependency
  order, prints ``kvmpy guest: Linux VERSION up, N CPUs`` and hands PID 1 to busybox init,
  whose /etc/inittab gives a shell on the console and ends the VM when the shell exits.

Dependencies come from each module's ``.modinfo`` section: ``depends=``, which modpost derives
from the same symbol references depmod reads (Debian's package ships no modules.dep: its
postinst runs depmod), and ``softdep=pre:`` for load order. Modules built into the kernel
(modules.builtin) are skipped.

The output is a pure function of the inputs: a second build with the same kernel, busybox and
kvmpy writes byte-identical files, and a build whose inputs match the directory's stamp writes
nothing at all.

What this module does not do: download packages (kvmpy/debian.py), boot anything, or build
root filesystem images for virtio-blk.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import posixpath
import shutil
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from kvmpy import debian
from kvmpy.errors import KvmpyError
from kvmpy.initramfs import CpioArchive, write_archive

#: The default kernel command line, each parameter for a reason:
#:   console=ttyS0     kernel messages and /dev/console (init's stdio) on COM1, kvmpy's 16550A
#:   reboot=k          reboot through the i8042 (0xfe to port 0x64), the reset kvmpy implements
#:                     and reports as the end of the run; without it x86 tries ACPI first
#:   panic=-1          reboot at once on a panic, so a dying guest ends the run instead of
#:                     spinning until --timeout (the panic is on the console)
#:   i8042.noaux       no mouse sits on kvmpy's i8042 AUX port: do not probe for one
#:   8250.nr_uarts=1   kvmpy has one UART: do not probe COM2-COM4 (each probe is a VM exit
#:                     to an unclaimed port)
from kvmpy.linux import DEFAULT_CMDLINE  # noqa: E402  (one definition, explained there)

#: Modules the guest loads (their dependencies come along): virtio over PCI and over MMIO,
#: the virtio block, net, console and entropy devices, and ext4 for disk images.
#: Debian's kernel is built without VIRTIO_MMIO_CMDLINE_DEVICES: it finds virtio-mmio devices
#: only through ACPI (LNRO0005) or a device tree, never "virtio_mmio.device=" on the command line.
#: crc32c_generic backs the "crc32c" hash that jbd2 and ext4 request through a softdep, which
#: only modprobe would resolve (the alias "crypto-crc32c"). pvpanic_pci drives kvmpy's pvpanic
#: device, so that a kernel panic ends the VM with its own status.
MODULES = ("virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net", "virtio_console",
           "virtio_rng", "crc32c_generic", "ext4", "pvpanic_pci")

#: busybox applets linked in /bin: a shell session, module loading, networking, disks.
APPLETS = (
    "[", "ash", "awk", "basename", "blkdiscard", "blockdev", "cat", "chmod", "chown", "clear",
    "cp", "cpio", "cttyhack", "cut", "date", "dd", "devmem", "df", "dirname", "dmesg", "du",
    "echo", "env", "expr", "false", "fdisk", "find", "free", "fstrim", "grep", "gunzip", "gzip",
    "halt", "head",
    "hexdump", "hostname", "hwclock", "ifconfig", "init", "insmod", "ip", "kill", "less", "ln",
    "losetup", "ls", "lsmod", "md5sum", "mkdir", "mke2fs", "mknod", "mktemp", "modinfo",
    "modprobe", "more", "mount", "mv", "nc", "nproc", "nslookup", "od", "ping", "poweroff",
    "printf", "ps", "readlink", "realpath", "reboot", "reset", "rm", "rmdir", "rmmod", "route",
    "sed", "seq", "setsid", "sh", "sha256sum", "sleep", "sort", "stat", "stty", "sync", "tail",
    "tar", "test", "time", "timeout", "top", "touch", "tr", "true", "tty", "udhcpc", "umount",
    "uname", "uniq", "uptime", "usleep", "vi", "watch", "wc", "wget", "which", "xargs", "xxd",
    "zcat",
)

#: Character devices present before devtmpfs is mounted over /dev (Linux
#: Documentation/admin-guide/devices.txt). The kernel opens /dev/console for init's stdio
#: from the initramfs itself, so that node must exist in it.
DEVICES = (
    ("dev/console", 5, 1, 0o600),
    ("dev/null", 1, 3, 0o666),
    ("dev/ttyS0", 4, 64, 0o660),
    ("dev/hvc0", 229, 0, 0o660),
)

INITRAMFS_NAME = "initramfs.cpio.gz"
KERNEL_NAME = "bzImage"
STAMP_NAME = "guest.json"

#: /init, run by the kernel as PID 1. @VERSION@ and @LOAD_MODULES@ are filled in by
#: :func:`init_script`.
INIT_SCRIPT = r"""#!/bin/sh
# kvmpy guest /init: run by the kernel as PID 1 from the initramfs (written by kvmpy/image.py).
# Mounts the kernel's filesystems, loads the virtio drivers, says hello on the console, then
# hands PID 1 to busybox init (/etc/inittab): a shell on the console, and the VM ends when that
# shell exits or someone runs poweroff, reboot or halt.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
set -f

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts

# Modules, each after those it needs. A driver whose device is absent still loads; a failure
# is reported and the boot goes on. busybox insmod does not read the kernel command line, so
# load() passes it the words MODULE.PARAM=VALUE (e.g. virtio_net.napi_tx=1), as modprobe would.
read -r cmdline < /proc/cmdline
failed=
load() {
    params=
    for word in $cmdline; do
        case "$word" in "$1".*) params="$params ${word#"$1".}" ;; esac
    done
    insmod "/lib/modules/@VERSION@/$2" $params 2>/dev/null || failed="$failed $1"
}
@LOAD_MODULES@
[ -z "$failed" ] || echo "kvmpy guest: could not load:$failed"

hostname kvmpy
ip link set lo up
# From here on only kernel errors (and panics) reach the console: informational messages, such
# as the one exec'ing init prints, would land in the middle of the banner or the shell's lines
# (`dmesg` still has them all).
dmesg -n 4
echo "kvmpy guest: Linux $(uname -r) up, $(nproc) CPUs"
exec /sbin/init
"""

#: busybox init's table. Without it busybox init would start askfirst shells on tty1..tty4.
INITTAB = """\
# busybox init in the kvmpy guest (written by kvmpy/image.py).
# One shell on the console. cttyhack opens the console's real device (/dev/ttyS0, /dev/hvc0)
# as the shell's controlling tty, which job control and Ctrl-C need; /dev/console cannot be one.
# When the shell exits, power off.
::once:/bin/sh -c 'setsid cttyhack sh -l; poweroff'
# kvmpy has no ACPI, so the kernel cannot power off: it turns poweroff into halt
# (kernel/reboot.c) and the vCPUs would sleep for ever. A reset through the keyboard controller
# (reboot=k on the command line) is what ends a kvmpy VM, so every shutdown ends in one.
::shutdown:/bin/sync
::shutdown:/bin/reboot -f
"""

PROFILE = """\
# /etc/profile of the kvmpy guest: login shells read it.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PS1='kvmpy:\\w\\$ '
"""

#: udhcpc runs this on each lease event (busybox's compiled-in default path); without it
#: ``udhcpc -i eth0`` gets a lease but configures nothing.
UDHCPC_SCRIPT = """\
#!/bin/sh
# udhcpc hook (kvmpy guest): apply the lease. udhcpc sets $interface, $ip, $mask, $router, $dns.
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route replace default via "$r" dev "$interface"; done
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    ;;
esac
"""


@dataclass(frozen=True)
class GuestImage:
    kernel: str         # bzImage
    initrd: str         # gzip-compressed newc cpio
    cmdline: str


@dataclass(frozen=True)
class KernelModule:
    name: str           # "virtio_pci": the file's base name with "-" as "_"
    path: str           # relative to lib/modules/VERSION, always ending in ".ko"
    source: str         # the (maybe compressed) file in the kernel package
    depends: tuple[str, ...]
    softdeps_pre: tuple[str, ...]   # names or aliases to load first, if present
    aliases: tuple[str, ...]


# ---- kernel modules -------------------------------------------------------------------------

_COMPRESSED = (".ko.xz", ".ko.gz", ".ko.zst")


def module_name(filename: str) -> str:
    """Module name of a file: kmod's rule, base name up to ".ko", with "-" read as "_"."""
    base = posixpath.basename(filename)
    return base[:base.index(".ko")].replace("-", "_")


def read_module(path: str) -> bytes:
    """The ELF image of a module file, decompressed (.ko.xz, .ko.gz, .ko.zst) if needed."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise KvmpyError(f"cannot read module {path}: {e.strerror}") from e
    try:
        if path.endswith(".ko.xz"):
            raw = lzma.decompress(raw)
        elif path.endswith(".ko.gz"):
            raw = gzip.decompress(raw)
        elif path.endswith(".ko.zst"):
            raw = _unzstd(path)
    except (lzma.LZMAError, OSError, EOFError) as e:
        raise KvmpyError(f"cannot decompress module {path}: {e}") from e
    if not raw.startswith(b"\x7fELF"):
        raise KvmpyError(f"module {path} is not an ELF file")
    return raw


def _unzstd(path: str) -> bytes:
    if shutil.which("zstd") is None:
        raise KvmpyError(f"module {path} is zstd-compressed: install zstd (apt-get install zstd)")
    p = subprocess.run(["zstd", "-dc", path], capture_output=True)
    if p.returncode != 0:
        raise KvmpyError(f"zstd -dc {path} failed: {p.stderr.decode(errors='replace').strip()}")
    return p.stdout


def modinfo(elf: bytes) -> list[tuple[str, str]]:
    """The key=value pairs of a module's .modinfo section (what modinfo(8) prints), in order.

    ELF64 little-endian only (x86-64): the section header table is found through e_shoff,
    e_shentsize, e_shnum and e_shstrndx (System V gABI, "ELF Header").
    """
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise KvmpyError("not a 64-bit little-endian ELF module")
    e_shoff, = struct.unpack_from("<Q", elf, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:      # sh_name, sh_offset, sh_size
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, e_shoff + i * e_shentsize)
        return name, offset, size

    _, stroff, strsize = section(e_shstrndx)
    strtab = elf[stroff:stroff + strsize]
    for i in range(e_shnum):
        name, offset, size = section(i)
        if strtab[name:strtab.index(b"\0", name)] == b".modinfo":
            pairs = []
            for item in elf[offset:offset + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode(errors="replace").split("=", 1)
                    pairs.append((k, v))
            return pairs
    return []


def _parse_softdep_pre(values: Iterable[str]) -> tuple[str, ...]:
    """"pre: a b post: c" -> ("a", "b") (modprobe.d(5), softdep)."""
    out: list[str] = []
    for value in values:
        section = None
        for word in value.split():
            if word in ("pre:", "post:"):
                section = word
            elif section == "pre:":
                out.append(word)
    return tuple(out)


def scan_modules(moddir: str) -> dict[str, str]:
    """Module name -> file path, for every module file under ``moddir`` (lib/modules/VERSION)."""
    found: dict[str, str] = {}
    for root, dirs, files in os.walk(moddir):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".ko") or f.endswith(_COMPRESSED):
                found.setdefault(module_name(f), os.path.join(root, f))
    return found


def builtin_modules(moddir: str) -> set[str]:
    """Names of the modules built into the kernel image (modules.builtin)."""
    path = os.path.join(moddir, "modules.builtin")
    try:
        with open(path) as f:
            return {module_name(line.strip()) for line in f if ".ko" in line}
    except FileNotFoundError:
        return set()


def load_module(moddir: str, path: str) -> KernelModule:
    info = modinfo(read_module(path))
    values: dict[str, list[str]] = {}
    for k, v in info:
        values.setdefault(k, []).append(v)
    rel = os.path.relpath(path, moddir)
    for ext in _COMPRESSED:
        if rel.endswith(ext):
            rel = rel[:-len(ext)] + ".ko"
    depends = tuple(module_name(d + ".ko") for dep in values.get("depends", [])
                    for d in dep.split(",") if d)
    return KernelModule(module_name(path), rel.replace(os.sep, "/"), path, depends,
                        _parse_softdep_pre(values.get("softdep", [])),
                        tuple(values.get("alias", [])))


def module_closure(moddir: str, wanted: Iterable[str]) -> list[KernelModule]:
    """The modules in ``wanted`` and all they depend on, each after its dependencies.

    Names built into the kernel are left out; a name that is neither a module nor built in is an
    error. A ``softdep pre:`` naming a module of the set (by name or alias) also orders it first.
    Ties keep the order of ``wanted``, then of names, so the result is deterministic.
    """
    files = scan_modules(moddir)
    builtin = builtin_modules(moddir)
    mods: dict[str, KernelModule] = {}
    todo = [module_name(n + ".ko") for n in wanted]
    roots = [n for n in dict.fromkeys(todo) if n not in builtin]
    while todo:
        name = todo.pop()
        if name in mods or name in builtin:
            continue
        if name not in files:
            raise KvmpyError(f"kernel module {name} is neither in {moddir} nor built in "
                             "(modules.builtin): this kernel cannot drive kvmpy's devices")
        mods[name] = m = load_module(moddir, files[name])
        todo.extend(m.depends)

    by_alias: dict[str, list[str]] = {}
    for m in mods.values():
        for a in (m.name, *m.aliases):
            by_alias.setdefault(module_name(a + ".ko"), []).append(m.name)

    def before(m: KernelModule) -> list[str]:
        soft = [n for s in m.softdeps_pre for n in by_alias.get(module_name(s + ".ko"), [])]
        return sorted(set(m.depends) - builtin) + sorted(set(soft) - set(m.depends) - {m.name})

    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            raise KvmpyError(f"kernel modules depend on each other in a loop: "
                             f"{' -> '.join(path + (name,))}")
        state[name] = "active"
        for dep in before(mods[name]):
            visit(dep, path + (name,))
        state[name] = "done"
        order.append(name)

    for name in roots:
        visit(name, ())
    return [mods[n] for n in order]


def modules_dep(modules: list[KernelModule]) -> str:
    """modules.dep for ``modules`` (in load order): each module with all it needs, transitively,
    listed so that the last is loaded first, as depmod writes it and busybox modprobe reads it."""
    by_name = {m.name: m for m in modules}
    index = {m.name: i for i, m in enumerate(modules)}
    lines = []
    for m in modules:
        need: set[str] = set()
        todo = list(m.depends)
        while todo:
            d = todo.pop()
            if d in by_name and d not in need:
                need.add(d)
                todo.extend(by_name[d].depends)
        deps = sorted(need, key=index.__getitem__, reverse=True)
        lines.append(f"{m.path}:" + "".join(f" {by_name[d].path}" for d in deps))
    return "".join(line + "\n" for line in sorted(lines))


def modules_alias(modules: list[KernelModule]) -> str:
    """modules.alias: "alias PATTERN NAME" for every alias of ``modules``, as depmod writes it."""
    lines = sorted({f"alias {a} {m.name}" for m in modules for a in m.aliases})
    return "".join(line + "\n" for line in lines)


# ---- the initramfs --------------------------------------------------------------------------

def init_script(version: str, modules: list[KernelModule]) -> str:
    loads = "\n".join(f"load {m.name} {m.path}" for m in modules)
    return INIT_SCRIPT.replace("@VERSION@", version).replace("@LOAD_MODULES@", loads)


def default_initramfs(kernel: debian.DebianKernel, busybox: str,
                      modules: list[KernelModule]) -> CpioArchive:
    """The default guest's initramfs, as an archive ready to write."""
    a = CpioArchive()
    for d in ("bin", "dev", "etc", "lib", "mnt", "proc", "root", "sys", "run"):
        a.add_dir(d)
    a.add_dir("tmp", 0o1777)
    a.add_symlink("sbin", "bin")
    a.add_symlink("usr/bin", "../bin")
    a.add_symlink("usr/sbin", "../bin")

    a.add_file("bin/busybox", source=busybox, mode=0o755)
    for applet in APPLETS:
        a.add_symlink(f"bin/{applet}", "busybox")
    for path, major, minor, mode in DEVICES:
        a.add_chardev(path, major, minor, mode)

    moddir = f"lib/modules/{kernel.version}"
    a.add_dir(moddir)
    for m in modules:
        a.add_file(f"{moddir}/{m.path}", read_module(m.source), mode=0o644)
    a.add_file(f"{moddir}/modules.dep", modules_dep(modules).encode())
    a.add_file(f"{moddir}/modules.alias", modules_alias(modules).encode())

    a.add_file("init", init_script(kernel.version, modules).encode(), mode=0o755)
    a.add_file("etc/inittab", INITTAB.encode())
    a.add_file("etc/profile", PROFILE.encode())
    a.add_file("etc/udhcpc/default.script", UDHCPC_SCRIPT.encode(), mode=0o755)
    return a


# ---- the guest directory --------------------------------------------------------------------

def default_guest_dir() -> str:
    """Where ``kvmpy image`` builds by default: beside the package cache (~/.cache/kvmpy/guest)."""
    return os.path.join(os.path.dirname(debian.cache_dir()), "guest")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inputs_key(kernel: debian.DebianKernel, busybox: str, modules: list[KernelModule],
                cmdline: str) -> dict:
    """Everything the output depends on: the input files' contents and this code."""
    code = hashlib.sha256()
    for mod in ("initramfs.py", "image.py"):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), mod), "rb") as f:
            code.update(f.read())
    return {
        "kernel_version": kernel.version,
        "bzimage": _sha256_file(kernel.bzimage),
        "busybox": _sha256_file(busybox),
        "modules": {m.path: _sha256_file(m.source) for m in modules},
        "cmdline": cmdline,
        "code": code.hexdigest(),
    }


def build_default_guest(out_dir: str | None = None, *, kernel: debian.DebianKernel | None = None,
                        busybox: str | None = None, cmdline: str = DEFAULT_CMDLINE,
                        ) -> GuestImage:
    """Build (or find already built) the default guest in ``out_dir``: bzImage and
    initramfs.cpio.gz, from Debian's kernel and busybox-static unless others are given."""
    out_dir = os.path.abspath(out_dir or default_guest_dir())
    kernel = kernel or debian.debian_kernel()
    busybox = busybox or debian.busybox_static()
    image = GuestImage(os.path.join(out_dir, KERNEL_NAME), os.path.join(out_dir, INITRAMFS_NAME),
                       cmdline)
    modules = module_closure(kernel.modules, MODULES)
    key = _inputs_key(kernel, busybox, modules, cmdline)

    stamp = os.path.join(out_dir, STAMP_NAME)
    try:
        with open(stamp) as f:
            if (json.load(f) == key and os.path.exists(image.kernel)
                    and os.path.exists(image.initrd)):
                return image
    except (OSError, ValueError):
        pass

    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise KvmpyError(f"cannot create {out_dir}: {e.strerror}") from e
    tmp = f"{image.kernel}.tmp{os.getpid()}"
    shutil.copyfile(kernel.bzimage, tmp)
    os.replace(tmp, image.kernel)
    write_archive(default_initramfs(kernel, busybox, modules), image.initrd, compress=True)
    tmp = f"{stamp}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(key, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, stamp)
    return image
