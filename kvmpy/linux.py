"""The Linux boot recipe (``kvmpy boot``): kvmpy is the boot loader, as in Firecracker.

    kvm -> vm (irqchip, PIT) -> RAM -> devices -> kernel, initrd, command line, zero page /
    start_info / multiboot info, MP table -> vCPU threads (BSP at the kernel entry, APs waiting
    for INIT/SIPI in the in-kernel LAPIC)

Guest-physical layout of the boot data (below 1 MiB, as Firecracker's arch/src/x86_64/layout.rs):

    0x00500  GDT (kvmpy/vcpu/modes.py: __BOOT_CS 0x10, __BOOT_DS 0x18), TSS at 0x580
    0x06000  PVH hvm_start_info, its memory map and module list (PVH boots)
    0x07000  zero page (struct boot_params, bzImage and ELF 64-bit boots); multiboot info
    0x08ff0  initial stack pointer
    0x09000  identity page tables (4 GiB, 2 MiB pages)
    0x20000  kernel command line
    0x9fc00  MP floating pointer + configuration table (in the e820-reserved EBDA)

Kernel formats (kvmpy/loader): a bzImage enters at its 64-bit entry (load address + 0x200) with
RSI = zero page; ``--fast-boot`` decompresses the bzImage's payload on the host and boots the
resulting vmlinux through PVH; a vmlinux ELF with a PVH note enters through PVH (32-bit, EBX =
hvm_start_info), one without at its ELF entry in 64-bit mode with a zero page; a multiboot v1
kernel enters in 32-bit mode with EAX = 0x2BADB002, EBX = multiboot info.
"""
from __future__ import annotations

import os
import sys
import time

from kvmpy.builder import MIB, Machine, read_image
from kvmpy.errors import ImageError, KvmpyError
from kvmpy.vcpu import modes

GDT_ADDR = modes.GDT_ADDR
START_INFO_ADDR = 0x6000
ZERO_PAGE_ADDR = 0x7000
MULTIBOOT_INFO_ADDR = 0x7000
BOOT_STACK = 0x8FF0
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000           # room reserved for the command line at CMDLINE_ADDR
MPTABLE_ADDR = 0x9FC00
PAGE = 4096
HIGH_MEMORY = 0x100000
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
DEFAULT_MEM = 512 * MIB
MIN_LINUX_MEM = 32 * MIB
# console=ttyS0: COM1; reboot=k: reset through the i8042 (kvmpy's reset, status 0; x86 would try
# ACPI first); panic=-1: a panic reboots at once instead of spinning (once the pvpanic-pci
# module is loaded, the panic ends the VM with status 12 before that); i8042.noaux: no mouse
# port; 8250.nr_uarts=1: one UART, so no probes of COM2-4.
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1 i8042.noaux 8250.nr_uarts=1"
BOOT_TIMER_PORT = 0x3F0
BOOT_TIMER_MMIO = 0xC000_0000
PVPANIC_BAR = 0xC000_1000       # the page after the boot timer's, below virtio-mmio's 0xD0000000

# Linux boot protocol: the 64-bit entry is 0x200 past the protected-mode kernel's start
# (Documentation/arch/x86/boot.rst, "64-bit boot protocol").
ENTRY64_OFFSET = 0x200
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002   # Multiboot 0.6.96, 3.2 "Machine state": EAX


class LinuxConfig:
    """What ``kvmpy boot`` takes."""

    def __init__(self, kernel: str, initrd: str | None = None, cmdline: str = DEFAULT_CMDLINE,
                 mem_size: int = DEFAULT_MEM, cpus: int = 1, fast_boot: bool = False,
                 kvm_path: str | None = None, console_sink=None, tracer=None,
                 devices: list | None = None, transport: str = "pci"):
        self.kernel, self.initrd, self.cmdline = kernel, initrd, cmdline
        self.devices, self.transport = devices or [], transport
        self.mem_size, self.cpus, self.fast_boot = mem_size, cpus, fast_boot
        self.kvm_path, self.console_sink, self.tracer = kvm_path, console_sink, tracer


class BootPlan:
    """Where the kernel enters and how the BSP must be set up (filled in by a loader below)."""

    def __init__(self):
        self.protocol = ""      # "linux64", "pvh", "multiboot"
        self.entry = 0
        self.rsi = 0
        self.eax = 0
        self.ebx = 0
        self.notes: list[str] = []


def _read_optional(path: str, what: str) -> bytes:
    try:
        return read_image(path)
    except ImageError as e:
        raise ImageError(str(e).replace("image ", f"{what} ", 1)) from None


def build_linux(cfg: LinuxConfig) -> Machine:
    """Build (not start) a machine that boots ``cfg.kernel``."""
    from kvmpy.loader import load

    kernel_data = _read_optional(cfg.kernel, "kernel")
    kind, image = load(kernel_data, cfg.kernel)
    del kernel_data      # the image holds what it needs (a vmlinux: its segments)
    initrd = _read_optional(cfg.initrd, "initrd") if cfg.initrd else b""
    if cfg.mem_size < MIN_LINUX_MEM:
        raise KvmpyError(f"--mem {cfg.mem_size // MIB}M is too small to boot Linux; use at least "
                         f"{MIN_LINUX_MEM // MIB}M (256M or more for a distribution kernel)")
    m = Machine(cfg.mem_size, irqchip=True, kvm_path=cfg.kvm_path, tracer=cfg.tracer)
    try:
        _check_cpus(m, cfg.cpus)
        add_boot_devices(m, cfg.console_sink)
        if cfg.devices and cfg.transport == "mmio" and kind == "bzimage":
            problem = virtio_mmio_cmdline_problem(cfg.kernel, image.kernel_version)
            if problem:
                stderr_note(problem)
        if cfg.devices:
            import copy

            from kvmpy.virtio.setup import add_virtio_devices

            extra = add_virtio_devices(m, cfg.devices, cfg.transport)
            if extra:   # virtio-mmio devices are announced on the command line
                cfg = copy.copy(cfg)
                cfg.cmdline = " ".join([cfg.cmdline, *extra])
        add_panic_device(m)   # after virtio: their PCI slots stay 1, 2, ... as documented
        plan = BootPlan()
        if kind == "bzimage":
            if cfg.fast_boot:
                _load_fast_boot(m, cfg, image, initrd, plan)
            else:
                _load_bzimage(m, cfg, image, initrd, plan)
        elif kind == "elf":
            _load_elf(m, cfg, image, initrd, plan)
        else:
            _load_multiboot(m, cfg, image, initrd, plan)
        _write_mptable(m, cfg.cpus)
        m.boot_plan = plan
        m.nr_vcpus = cfg.cpus
        m.setup = _vcpu_setup(m, plan, cfg.cpus)
    except BaseException:
        m.close()
        raise
    return m


def virtio_mmio_cmdline_problem(kernel_path: str, kernel_version: str) -> str | None:
    """Why the kernel will not see virtio-mmio devices announced on its command line, if the
    build configuration installed beside it says so; else None.

    Linux reads ``virtio_mmio.device=`` only when built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES
    (drivers/virtio/Kconfig); Debian's kernels are not, so with ``--transport mmio`` the guest
    silently has no disk, network or rng. Distributions install the configuration as
    ``/boot/config-<release>`` next to ``vmlinuz-<release>`` (so does the default guest's
    package); the release is the first word of the bzImage's version string."""
    release = kernel_version.split()[0] if kernel_version.strip() else ""
    if not release or "/" in release:
        return None
    config = os.path.join(os.path.dirname(os.path.abspath(kernel_path)), f"config-{release}")
    try:
        with open(config, errors="replace") as f:
            options = set(f.read().splitlines())
    except OSError:
        return None
    if "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y" in options:
        return None
    return (f"warning: {config} says this kernel was built without "
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so it will not find the --transport mmio "
            "devices; use --transport pci")


def _check_cpus(m: Machine, cpus: int) -> None:
    from kvmpy.kvm import Cap

    limit = m.kvm.check_extension(Cap.MAX_VCPUS) or m.kvm.check_extension(Cap.NR_VCPUS) or 1
    limit = min(limit, 254)   # MP table APIC ids are 8-bit; 0xff is the broadcast id
    if not 1 <= cpus <= limit:
        raise KvmpyError(f"--cpus {cpus} is out of range: this KVM allows 1 to {limit}")


def add_boot_devices(m: Machine, console_sink) -> None:
    from kvmpy.devices.boot_timer import BootTimer

    m.add_legacy_devices(console_sink)
    m.ensure_pci()
    timer = BootTimer()
    m.boot_timer = timer
    m.add_pio_device(timer, BOOT_TIMER_PORT, "boot-timer")
    m.add_mmio_device(BootTimer(window=PAGE, log=timer._log), BOOT_TIMER_MMIO, "boot-timer-mmio")


def add_panic_device(m: Machine) -> None:
    """pvpanic-pci on the next free PCI slot, its BAR at PVPANIC_BAR: a guest kernel panic ends
    the VM with ExitStatus.GUEST_PANIC instead of looking like a reboot."""
    from kvmpy.devices.pvpanic import BAR_SIZE, PvPanic

    panic = PvPanic(mmio=m.mmio)
    slot = m.ensure_pci().add(panic)
    panic.place(PVPANIC_BAR)
    m._stack.callback(panic.unmap)
    m.devices[panic.name] = panic
    m.device_map.append(f"pvpanic-pci 00:{slot:02x}.0: BAR0 {PVPANIC_BAR:#x}-"
                        f"{PVPANIC_BAR + BAR_SIZE - 1:#x} (a guest panic ends the VM, status "
                        f"12)")


def _e820(m: Machine):
    from kvmpy.bootinfo import e820_for

    return e820_for([(r.gpa, r.size) for r in m.memory.regions])


def _low_ram_end(m: Machine) -> int:
    return m.memory.regions[0].end


def _place_initrd(m: Machine, initrd: bytes, lowest: int, highest_end: int) -> int:
    """Page-aligned address for the initrd, as high as allowed (like boot loaders do)."""
    if not initrd:
        return 0
    top = min(highest_end, _low_ram_end(m)) & ~(PAGE - 1)
    addr = (top - len(initrd)) & ~(PAGE - 1)
    if addr < lowest:
        raise ImageError(f"the initrd ({len(initrd) / MIB:.1f} MiB) does not fit in guest memory "
                         f"between the kernel's end ({lowest:#x}) and {top:#x}; give the guest "
                         "more memory (--mem)")
    m.memory.write(addr, initrd)
    return addr


def _write_cmdline(m: Machine, cmdline: str, bz=None) -> int:
    from kvmpy.bootinfo import check_cmdline

    raw = check_cmdline(cmdline, bz)
    if len(raw) > CMDLINE_MAX:
        raise ImageError(f"the kernel command line is {len(raw) - 1} bytes; at most "
                         f"{CMDLINE_MAX - 1} fit; shorten it")
    m.memory.write(CMDLINE_ADDR, raw)
    return len(raw) - 1


def _load_bzimage(m: Machine, cfg: LinuxConfig, bz, initrd: bytes, plan: BootPlan) -> None:
    from kvmpy.bootparams import build_boot_params

    load = bz.load_address(_low_ram_end(m))
    if not m.memory.contains(load, len(bz.kernel)):
        raise ImageError(f"{cfg.kernel} ({len(bz.kernel) / MIB:.1f} MiB) does not fit in guest "
                         f"memory at {load:#x}; give the guest more memory (--mem)")
    m.memory.write(load, bz.kernel)
    kernel_end = max(load, bz.pref_address) + max(bz.init_size, len(bz.kernel))
    cmdline_size = _write_cmdline(m, cfg.cmdline, bz)
    initrd_addr = _place_initrd(m, initrd, kernel_end, bz.initrd_end_max)
    m.memory.write(ZERO_PAGE_ADDR, build_boot_params(
        bz, cmdline_addr=CMDLINE_ADDR, cmdline_size=cmdline_size, e820=_e820(m),
        initrd_addr=initrd_addr, initrd_size=len(initrd)))
    plan.protocol, plan.entry, plan.rsi = "linux64", load + ENTRY64_OFFSET, ZERO_PAGE_ADDR
    plan.notes.append(f"bzImage {bz.kernel_version or ''} protocol {bz.version >> 8}."
                      f"{bz.version & 0xff:02d} loaded at {load:#x}")


def _load_segments(m: Machine, elf, path: str) -> int:
    end = 0
    for seg in elf.segments:
        if not m.memory.contains(seg.paddr, seg.memsz):
            raise ImageError(f"{path}: segment at {seg.paddr:#x}+{seg.memsz:#x} is outside guest "
                             "memory; give the guest more memory (--mem)")
        m.memory.write(seg.paddr, seg.data)
        if seg.memsz > len(seg.data):
            m.memory.fill(seg.paddr + len(seg.data), seg.memsz - len(seg.data))
        end = max(end, seg.paddr + seg.memsz)
    return end


def _load_elf(m: Machine, cfg: LinuxConfig, elf, initrd: bytes, plan: BootPlan) -> None:
    kernel_end = _load_segments(m, elf, cfg.kernel)
    if elf.pvh_entry is not None:
        _pvh(m, cfg, elf, initrd, kernel_end, plan)
        return
    from kvmpy.bootparams import build_boot_params

    if elf.bits != 64:
        raise ImageError(f"{cfg.kernel} is a 32-bit ELF without a PVH note or multiboot header; "
                         "kvmpy cannot tell how to enter it")
    cmdline_size = _write_cmdline(m, cfg.cmdline)
    initrd_addr = _place_initrd(m, initrd, kernel_end, 1 << 32)
    m.memory.write(ZERO_PAGE_ADDR, build_boot_params(
        None, cmdline_addr=CMDLINE_ADDR, cmdline_size=cmdline_size, e820=_e820(m),
        initrd_addr=initrd_addr, initrd_size=len(initrd)))
    plan.protocol, plan.entry, plan.rsi = "linux64", elf.entry, ZERO_PAGE_ADDR


def _pvh(m: Machine, cfg: LinuxConfig, elf, initrd: bytes, kernel_end: int,
         plan: BootPlan) -> None:
    from kvmpy.loader import pvh

    cmdline_size = _write_cmdline(m, cfg.cmdline)
    initrd_addr = _place_initrd(m, initrd, kernel_end, 1 << 32)
    del cmdline_size
    blob = pvh.build_start_info(START_INFO_ADDR, cmdline_addr=CMDLINE_ADDR, e820=_e820(m),
                                initrd_addr=initrd_addr, initrd_size=len(initrd))
    if len(blob) > ZERO_PAGE_ADDR - START_INFO_ADDR:
        raise KvmpyError("PVH start info does not fit below the zero page")
    m.memory.write(START_INFO_ADDR, blob)
    plan.protocol, plan.entry, plan.ebx = "pvh", elf.pvh_entry, START_INFO_ADDR


def _load_fast_boot(m: Machine, cfg: LinuxConfig, bz, initrd: bytes, plan: BootPlan) -> None:
    from kvmpy.loader.decompress import cached_vmlinux
    from kvmpy.loader.elf import ElfImage

    import mmap

    t0 = time.monotonic()
    cache = os.path.join(os.environ.get("KVMPY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvmpy"), "vmlinux")
    os.makedirs(cache, exist_ok=True)
    from kvmpy.loader.decompress import payload_format

    path, hit = cached_vmlinux(bz, cache)    # refuses an image without payload_offset
    # the format from the payload's first bytes; bz.payload would copy all of it again
    fmt = payload_format(bz.kernel[bz.payload_offset:bz.payload_offset + 8])
    # The cached vmlinux is mapped, not read: its segments (tens of MiB) are copied once, from
    # the page cache straight into guest RAM (benchmarks/boot: --fast-boot's host-side time).
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    view = memoryview(mm)
    try:
        elf = ElfImage.parse(view, path)
        if elf.pvh_entry is None:
            raise ImageError(f"{cfg.kernel}: its vmlinux has no PVH entry note (kernel built "
                             "without CONFIG_PVH); boot it without --fast-boot")
        kernel_end = _load_segments(m, elf, path)
        _pvh(m, cfg, elf, initrd, kernel_end, plan)
    finally:
        elf = None          # its segments are views of the mapping: drop them, then unmap
        view.release()
        try:
            mm.close()
        except BufferError:
            # An exception is on its way out, and its traceback's frames still hold segment
            # views: the mapping goes when they do. Raising here would hide the real error.
            pass
    spent = time.monotonic() - t0
    plan.notes.append(f"--fast-boot: {fmt} payload decompressed on the host "
                      f"({'cached' if hit else f'{spent * 1000:.0f} ms'}); the guest skips its "
                      "decompressor")


def _load_multiboot(m: Machine, cfg: LinuxConfig, image, initrd: bytes,
                    plan: BootPlan) -> None:
    from kvmpy.loader import multiboot

    kernel_end = _load_segments(m, image, cfg.kernel)
    cmdline_size = _write_cmdline(m, cfg.cmdline)
    initrd_addr = _place_initrd(m, initrd, kernel_end, 1 << 32)
    del cmdline_size
    info = multiboot.build_multiboot_info(MULTIBOOT_INFO_ADDR, e820=_e820(m),
                                          cmdline_addr=CMDLINE_ADDR, initrd_addr=initrd_addr,
                                          initrd_size=len(initrd))
    if MULTIBOOT_INFO_ADDR + len(info) > BOOT_STACK - 0x400:
        raise KvmpyError("the multiboot information does not fit below the boot stack")
    m.memory.write(MULTIBOOT_INFO_ADDR, info)
    plan.protocol, plan.entry = "multiboot", image.entry
    plan.eax, plan.ebx = MULTIBOOT_BOOTLOADER_MAGIC, MULTIBOOT_INFO_ADDR


def _write_mptable(m: Machine, cpus: int) -> None:
    from kvmpy.mptable import build_mptable

    # irq0_pin=0: KVM's default GSI routing sends GSI 0 (the PIT) to IOAPIC pin 0, not pin 2 as
    # on PC chipsets; the MP table must say what the (virtual) wiring does (as Firecracker).
    table = build_mptable(MPTABLE_ADDR, cpus, ioapic_id=cpus, ioapic_addr=IOAPIC_ADDR,
                          lapic_addr=LAPIC_ADDR, irq0_pin=0,
                          pci_intx=m.pci.intx_routes if m.pci is not None else None)
    if MPTABLE_ADDR + len(table) > HIGH_MEMORY:
        raise KvmpyError(f"the MP table for {cpus} vCPUs does not fit below 1 MiB")
    m.memory.write(MPTABLE_ADDR, table)


def _vcpu_setup(m: Machine, plan: BootPlan, cpus: int):
    from kvmpy.doctor import kvm_flavour
    from kvmpy.vcpu.boot import set_boot_msrs, set_lint
    from kvmpy.vcpu.cpuid import filtered_cpuid

    software = kvm_flavour()[0] == "software"
    supported = m.kvm.get_supported_cpuid()
    memory = m.memory

    def setup(vcpu) -> None:
        vcpu.set_cpuid2(filtered_cpuid(supported, vcpu.id, cpus, software_kvm=software))
        set_boot_msrs(vcpu)
        set_lint(vcpu)
        if vcpu.id != 0:
            return   # an AP: the in-kernel LAPIC holds it until the BSP sends INIT/SIPI
        if plan.protocol == "linux64":
            modes.setup_long_mode(vcpu, memory, plan.entry, linux=True)
            regs = vcpu.get_regs()
            regs.rsi, regs.rsp = plan.rsi, BOOT_STACK
        else:
            modes.setup_protected_mode(vcpu, memory, plan.entry, linux=True)
            regs = vcpu.get_regs()
            regs.rax, regs.rbx, regs.rsp = plan.eax, plan.ebx, BOOT_STACK
        vcpu.set_regs(regs)

    return setup


def stderr_note(msg: str) -> None:
    print(f"kvmpy: {msg}", file=sys.stderr)


