"""Fetch Debian packages kvmpy builds guests from: the stock kernel and busybox-static.

Packages come through ``apt-get download`` (the machine's configured Debian mirror, no other
network), are unpacked with ``dpkg-deb -x`` and cached under ``~/.cache/kvmpy/debian`` (or
``$KVMPY_CACHE``), keyed by package file name, so a second call is free.

This module only fetches and unpacks; kvmpy/image.py decides what goes into a guest.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
from dataclasses import dataclass

from kvmpy.errors import KvmpyError

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"


def cache_dir() -> str:
    base = os.environ.get("KVMPY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvmpy")
    path = os.path.join(base, "debian")
    os.makedirs(path, exist_ok=True)
    return path


def _run(cmd: list[str], cwd: str | None = None) -> str:
    if shutil.which(cmd[0]) is None:
        raise KvmpyError(f"`{cmd[0]}` is not installed: building the guest needs a Debian host "
                         "(apt-get, dpkg-deb)")
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise KvmpyError(f"{' '.join(cmd)} failed: {last}")
    return p.stdout


def resolve(package: str) -> str:
    """The real package behind a meta-package (linux-image-amd64 -> linux-image-6.1.0-N-amd64)."""
    out = _run(["apt-cache", "depends", package])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    return package


def download(package: str) -> str:
    """Path of the .deb of ``package`` in the cache, downloading it if needed."""
    d = cache_dir()
    found = glob.glob(os.path.join(d, f"{package}_*.deb"))
    if found:
        return sorted(found)[-1]
    try:
        _run(["apt-get", "download", package], cwd=d)
    except KvmpyError:
        # a fresh machine may have no package lists yet
        _run(["apt-get", "update", "-q"])
        _run(["apt-get", "download", package], cwd=d)
    found = glob.glob(os.path.join(d, f"{package}_*.deb"))
    if not found:
        raise KvmpyError(f"apt-get download {package} produced no .deb")
    return sorted(found)[-1]


def unpack(deb: str) -> str:
    """Directory holding the unpacked contents of ``deb`` (cached next to it)."""
    dest = deb[:-len(".deb")]
    if not os.path.isdir(dest):
        tmp = dest + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _run(["dpkg-deb", "-x", deb, tmp])
        os.replace(tmp, dest)
    return dest


@dataclass(frozen=True)
class DebianKernel:
    version: str        # e.g. 6.1.0-50-amd64
    bzimage: str        # /boot/vmlinuz-VERSION inside the unpacked package
    modules: str        # /lib/modules/VERSION
    config: str | None  # /boot/config-VERSION


def debian_kernel() -> DebianKernel:
    """Debian's stock amd64 kernel (the package linux-image-amd64 points at), unpacked."""
    root = unpack(download(resolve(KERNEL_META_PACKAGE)))
    images = glob.glob(os.path.join(root, "boot", "vmlinuz-*"))
    if not images:
        raise KvmpyError(f"no /boot/vmlinuz-* in {root}")
    bz = sorted(images)[-1]
    version = os.path.basename(bz)[len("vmlinuz-"):]
    config = os.path.join(root, "boot", f"config-{version}")
    return DebianKernel(version, bz, os.path.join(root, "lib", "modules", version),
                        config if os.path.exists(config) else None)


def busybox_static() -> str:
    """Path of Debian's statically linked busybox binary."""
    root = unpack(download(BUSYBOX_PACKAGE))
    path = os.path.join(root, "bin", "busybox")
    if not os.path.exists(path):
        raise KvmpyError(f"no bin/busybox in {root}")
    return path
