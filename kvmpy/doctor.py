"""``kvmpy doctor``: can this host run kvmpy's guests, and what kind of KVM is it?

Checks, in order: the /dev/kvm node (found through pyudev/sysfs, with its owner, group and mode),
whether this user can open it (and the fix when not), the KVM API version and the capabilities
kvmpy uses, and the KVM flavour: hardware (Intel VT-x through kvm_intel, AMD-V through kvm_amd)
or software (PVM through kvm_pvm), with what that means for guests. Exit status 0 when kvmpy can
run guests here, 1 when it cannot.

It only reads: it changes nothing on the host.
"""
from __future__ import annotations

import grp
import os
import pwd
import stat
import sys

from kvmpy.kvm import Cap, Kvm, kvm_path
from kvmpy.errors import KvmpyError

# (capability, what kvmpy uses it for)
KEY_CAPS = [
    ("USER_MEMORY", "guest RAM from host mmaps"),
    ("IRQCHIP", "in-kernel PIC/IOAPIC/LAPIC"),
    ("PIT2", "in-kernel i8254 timer"),
    ("IOEVENTFD", "virtio notifications without an exit"),
    ("IRQFD", "interrupts from the I/O thread"),
    ("IRQ_ROUTING", "MSI routes for virtio-pci"),
    ("SIGNAL_MSI", "MSI injection"),
    ("IMMEDIATE_EXIT", "stopping a vCPU cleanly"),
    ("SET_GUEST_DEBUG", "single-step and breakpoints (gdb stub)"),
    ("INTERNAL_ERROR_DATA", "instruction bytes in emulation-failure reports"),
    ("NR_VCPUS", "recommended vCPUs per VM"),
    ("MAX_VCPUS", "maximum vCPUs per VM"),
]

FLAVOURS = {  # checked in this order: a PVM host may have other kvm modules loaded too
    "kvm_pvm": ("software", "PVM (kvm_pvm), a software KVM without VT-x/AMD-V"),
    "kvm_intel": ("hardware", "Intel VT-x (kvm_intel)"),
    "kvm_amd": ("hardware", "AMD-V (kvm_amd)"),
}


def cpu_virt_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return {fl for fl in line.split(":", 1)[1].split() if fl in ("vmx", "svm")}
    except OSError:
        pass
    return set()


def kvm_flavour(sys_module: str = "/sys/module", cpuinfo: str = "/proc/cpuinfo"):
    """('hardware'|'software'|'unknown', description) from loaded modules and CPU flags."""
    for module, (kind, desc) in FLAVOURS.items():
        if os.path.isdir(os.path.join(sys_module, module)):
            return kind, desc
    if cpu_virt_flags(cpuinfo):
        return "hardware", "hardware virtualization (" + ", ".join(sorted(cpu_virt_flags(cpuinfo))) + ")"
    if os.path.isdir(os.path.join(sys_module, "kvm")):
        return "software", "a KVM without VT-x/AMD-V (no vmx/svm CPU flag)"
    return "unknown", "no KVM module found"


def can_boot_linux(flavour: str) -> bool:
    return flavour == "hardware"


def _node_info(path: str) -> tuple[list[str], bool]:
    lines, ok = [], True
    try:
        import pyudev

        dev = pyudev.Devices.from_device_file(pyudev.Context(), path)
        lines.append(f"ok    {path}: {dev.subsystem} device {dev.sys_name} "
                     f"(major {dev.properties.get('MAJOR')}, minor {dev.properties.get('MINOR')})")
    except Exception as e:  # not a device node, or udev/sysfs unavailable
        if not os.path.exists(path):
            return [f"FAIL  {path} does not exist: load kvm_intel or kvm_amd (modprobe), and "
                    "enable VT-x/AMD-V in the firmware"], False
        lines.append(f"warn  {path}: not known to udev/sysfs ({type(e).__name__}: {e})")
    st = os.stat(path)
    if not stat.S_ISCHR(st.st_mode):
        return lines + [f"FAIL  {path} is not a character device"], False
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    lines.append(f"ok    owner {owner}, group {group}, mode {stat.filemode(st.st_mode)}")
    if not os.access(path, os.R_OK | os.W_OK):
        ok = False
        lines.append(f"FAIL  you ({pwd.getpwuid(os.getuid()).pw_name}) cannot open {path} "
                     f"read-write: sudo usermod -aG {group} $USER and log in again "
                     f"(or a udev rule: KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\")")
    return lines, ok


def report(path: str | None = None) -> tuple[list[str], bool]:
    path = kvm_path(path)
    out, ok = _node_info(path)
    if not ok:
        return out, False
    try:
        with Kvm(path) as kvm:
            out.append(f"ok    KVM API version {kvm.get_api_version()}")
            out.append("      capabilities:")
            for name, why in KEY_CAPS:
                value = kvm.check_extension(Cap[name])
                mark = "yes" if value else "NO "
                extra = f" = {value}" if name in ("NR_VCPUS", "MAX_VCPUS") else ""
                out.append(f"        {mark} {name:<21}{extra:<7} {why}")
    except KvmpyError as e:
        return out + [f"FAIL  {e}"], False
    kind, desc = kvm_flavour()
    out.append(f"ok    KVM flavour: {kind}: {desc}")
    if kind == "hardware":
        out.append("      guests run natively: `kvmpy boot` can boot a stock Linux kernel")
    else:
        out.append("      guest code at CPL0 runs through KVM's instruction emulator (about 1M "
                   "instructions/s) and some instructions cannot be emulated (int3/int n outside "
                   "real mode, xsave, SSE arithmetic, cmpxchg16b, popcnt, ...): a stock Linux "
                   "kernel cannot boot here. Small guests (`kvmpy run`, `kvmpy demo`) work; "
                   "emulation failures are reported with RIP, mode and instruction bytes.")
    return out, True


def main(kvm_path: str | None = None) -> int:
    lines, ok = report(kvm_path)
    print("kvmpy doctor")
    for line in lines:
        print("  " + line)
    print("  => kvmpy can run guests on this host" if ok else "  => kvmpy cannot run guests here")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
