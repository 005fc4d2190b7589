"""The ``kvmpy`` command line: run, demo, doctor.

Imports are lazy: ``kvmpy run`` pays only for what it uses (startup time is measured against
QEMU's in benchmarks/startup).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

EXIT_STATUS_HELP = """\
exit status (run, demo):
  0              the guest halted with interrupts off, reset through the i8042 (0xfe to port
                 0x64), or was stopped by the host
  (v << 1) | 1   the guest wrote v to isa-debug-exit (port 0xf4), as QEMU does; always odd
  2              kvmpy could not start the VM (bad argument, image or /dev/kvm); one-line error
  4              the guest triple-faulted (KVM_EXIT_SHUTDOWN); a report goes to stderr
  6              KVM could not emulate an instruction (KVM_EXIT_INTERNAL_ERROR); report with
                 RIP, CPU mode and instruction bytes on stderr
  8              KVM could not enter the guest, or an exit kvmpy does not handle
  10             an internal kvmpy error (a bug: please report it)
  12             the guest kernel panicked and said so through pvpanic (boot)
  124            --timeout elapsed
  130            interrupted (Ctrl-C)
"""

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'512M', '1G', '64k' (binary units); a bare number is MiB, as QEMU's -m."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use a number with K, M or G, "
                                         "e.g. 512M or 1G")
    n = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if n == 0:
        raise argparse.ArgumentTypeError(f"size {text!r} is zero")
    return n


def parse_addr(text: str) -> int:
    """A guest-physical address in hex (0x...) or decimal."""
    try:
        value = int(text.replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad address {text!r}: use hex (0x100000) or "
                                         "decimal") from None
    if value < 0 or value >= 1 << 64:
        raise argparse.ArgumentTypeError(f"address {text!r} is out of range")
    return value


class _Formatter(argparse.RawDescriptionHelpFormatter):
    # argparse's formatter imports shutil for the terminal width whenever a parser is built;
    # os.get_terminal_size is enough and keeps `kvmpy run` startup lean.
    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            try:
                width = os.get_terminal_size(sys.stderr.fileno()).columns - 2
            except OSError:
                width = 78
        super().__init__(prog, indent_increment, max_help_position, width)


class _DeviceAction(argparse.Action):
    """--disk/--rng/--net append (kind, value) to one list, keeping command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        devices = list(getattr(namespace, self.dest, None) or [])
        devices.append((option_string.lstrip("-"), values if values != [] else None))
        setattr(namespace, self.dest, devices)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2 (ExitStatus.ERROR)
        self.exit(2, f"kvmpy: {message} (see `{self.prog} --help`)\n")


def _common(sp) -> None:
    sp.add_argument("--mem", type=parse_size, default=None, metavar="SIZE",
                    help="guest RAM, e.g. 512M or 1G (default 256M)")
    sp.add_argument("--trace", metavar="FILE",
                    help="write every exit as one JSON line to FILE ('-' for stderr)")
    sp.add_argument("--stats", action="store_true",
                    help="print exits by reason and by device when the VM ends")
    sp.add_argument("--timeout", type=float, metavar="SECONDS",
                    help="stop the guest after SECONDS (status 124)")
    sp.add_argument("--kvm", metavar="PATH", help="KVM device node (default /dev/kvm, or "
                    "$KVMPY_KVM_DEVICE)")
    sp.add_argument("--disk", action=_DeviceAction, dest="devices", metavar="PATH[,ro]",
                    help="virtio-blk disk backed by a raw image file (repeatable; ',ro' for "
                    "read-only)")
    sp.add_argument("--rng", action=_DeviceAction, dest="devices", nargs=0,
                    help="virtio-rng fed from the host's getrandom")
    sp.add_argument("--net", action=_DeviceAction, dest="devices", metavar="SPEC",
                    help="virtio-net: user[,hostfwd=tcp::HOSTPORT-:GUESTPORT] (libslirp, "
                    "no root) or tap=NAME; ,mac=52:54:00:... (repeatable)")
    sp.add_argument("--virtio-console", action=_DeviceAction, dest="devices", nargs=0,
                    help="virtio-console (the guest's hvc0); host input goes to it instead "
                    "of COM1 (use console=hvc0 for Linux)")
    sp.add_argument("--transport", choices=["mmio", "pci"], default=None,
                    help="virtio transport (default: pci for boot, mmio for run)")
    sp.add_argument("--device-map", action="store_true",
                    help="print the device map (ports, MMIO, PCI, IRQs) before the guest "
                    "starts")
    sp.add_argument("--gdb", metavar="tcp::PORT", help="serve the GDB remote protocol "
                    "(localhost only unless tcp:HOST:PORT names an address)")
    sp.add_argument("--gdb-wait", action="store_true", help="stop before the first "
                    "instruction until gdb connects and continues (implies --gdb tcp::1234)")
    sp.add_argument("--symbols", metavar="FILE", help="System.map or ELF with symbols: name "
                    "RIPs in --trace (default: the kernel's own symbols when it is an ELF "
                    "that has them; with a bzImage, boot adds nokaslr to the command line)")


def _add_run(sub) -> None:
    r = sub.add_parser("run", help="run a flat binary in real, protected or long mode",
                       formatter_class=_Formatter,
                       epilog=EXIT_STATUS_HELP,
                       description="Load a flat binary image into guest RAM and start one vCPU "
                       "at its entry point in the given CPU mode. COM1 (port 0x3f8) goes to "
                       "stdout. Real mode: CS=0, IP=entry, default load 0x7c00. Protected mode:"
                       " flat 32-bit segments (CS=0x08, DS=0x10), no paging, default load "
                       "0x100000. Long mode: the first 4 GiB (or all RAM) identity-mapped, "
                       "CS=0x18, default load 0x100000. Interrupts are off; SP is 0x7c00 (real) "
                       "or 0x8000.")
    r.add_argument("image", metavar="IMAGE", help="flat binary to load, or GNU assembler source "
                   "(*.S), assembled for the load address with as/ld")
    r.add_argument("--mode", required=True, choices=["real", "protected", "long"],
                   help="CPU mode at the first instruction")
    r.add_argument("--load", type=parse_addr, metavar="ADDR", help="guest-physical load address")
    r.add_argument("--entry", type=parse_addr, metavar="ADDR",
                   help="entry point (default: the load address)")
    r.add_argument("--irqchip", action="store_true",
                   help="create the in-kernel PIC/IOAPIC/LAPIC and PIT (HLT then waits for "
                   "interrupts instead of ending the guest)")
    _common(r)


def _add_boot(sub) -> None:
    b = sub.add_parser("boot", help="boot a Linux kernel (bzImage, vmlinux ELF, multiboot)",
                       formatter_class=_Formatter, epilog=EXIT_STATUS_HELP,
                       description="Boot a kernel with kvmpy as the boot loader: COM1 (ttyS0) is "
                       "the console on this terminal (Ctrl-A x quits), the guest's reboot or "
                       "poweroff ends the VM with status 0, a kernel panic (reported through "
                       "the pvpanic-pci device) with status 12.")
    b.add_argument("--kernel", required=True, metavar="FILE",
                   help="bzImage, vmlinux ELF (PVH entry) or multiboot kernel")
    b.add_argument("--initrd", metavar="FILE", help="initial ramdisk")
    b.add_argument("--append", metavar="CMDLINE", default=None,
                   help="kernel command line (default: console=ttyS0 reboot=k panic=-1 "
                   "i8042.noaux)")
    b.add_argument("--cpus", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    b.add_argument("--fast-boot", action="store_true",
                   help="decompress a bzImage on the host (cached) and boot it through PVH")
    _common(b)


def _add_image(sub) -> None:
    im = sub.add_parser("image", formatter_class=_Formatter,
                        help="build the default Linux guest (Debian's kernel + a busybox "
                        "initramfs)")
    im.add_argument("--out", metavar="DIR", help="where to write bzImage and initramfs.cpio.gz "
                    "(default ~/.cache/kvmpy/guest)")


def _add_up(sub) -> None:
    up = sub.add_parser("up", formatter_class=_Formatter,
                        help="the main job: build and boot the default Linux guest; on a host "
                        "whose KVM cannot boot Linux, say so and run the demo instead")
    up.add_argument("--cpus", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    _common(up)


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="run the bundled guest that walks from real to long mode",
                       formatter_class=_Formatter,
                       epilog=EXIT_STATUS_HELP)
    _common(d)


def _add_trace(sub) -> None:
    t = sub.add_parser("trace", help="work with exit traces (--trace FILE)",
                       formatter_class=_Formatter)
    tsub = t.add_subparsers(dest="trace_command", metavar="SUBCOMMAND", parser_class=_Parser)
    tsub.required = True
    ts = tsub.add_parser("summarize", formatter_class=_Formatter,
                         help="exits by reason, device and register, with time shares")
    ts.add_argument("file", metavar="FILE")
    ts.add_argument("--plot", metavar="PNG",
                    help="also draw a timeline and histogram (needs kvmpy[plot])")
    ts.add_argument("--explain", action="store_true",
                    help="append `kvmpy explain` for each reason present")


def _add_explain(sub) -> None:
    ex = sub.add_parser("explain", formatter_class=_Formatter,
                        help="what a KVM exit reason means (VT-x, AMD-V, kvmpy)")
    ex.add_argument("reason", metavar="REASON", help="e.g. io, KVM_EXIT_MMIO, 17")


def _add_doctor(sub) -> None:
    doc = sub.add_parser("doctor", help="check /dev/kvm and say what kind of KVM this host has",
                         formatter_class=_Formatter)
    doc.add_argument("--kvm", metavar="PATH", help="KVM device node (default /dev/kvm)")


# Subcommands in `kvmpy --help` order, each with the function that adds its parser.
_SUBCOMMANDS = {"run": _add_run, "boot": _add_boot, "image": _add_image, "up": _add_up,
                "demo": _add_demo, "trace": _add_trace, "explain": _add_explain,
                "doctor": _add_doctor}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``kvmpy`` parser with every subcommand, or with ``command``'s alone.

    main() passes the subcommand named first on the command line: building the other
    subcommands' parsers (about 100 options) would cost `kvmpy boot` milliseconds of startup
    (benchmarks/boot), and a subcommand's own parser, help and errors do not depend on them.
    """
    p = _Parser(prog="kvmpy", description="A virtual machine monitor in Python over Linux KVM.",
                formatter_class=_Formatter, epilog=EXIT_STATUS_HELP)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, add in _SUBCOMMANDS.items():
        if command is None or name == command:
            add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from kvmpy._lazy import defer_for_cli

    defer_for_cli()   # before anything imports construct or ioctl_opt (see kvmpy/_lazy.py)
    if argv is None:
        argv = sys.argv[1:]
    # Only a known subcommand as the first word narrows the parser: `kvmpy`, `kvmpy --help` and
    # `kvmpy bogus` (its error lists the commands) need them all.
    command = argv[0] if argv and argv[0] in _SUBCOMMANDS else None
    args = build_parser(command).parse_args(argv)
    from kvmpy.errors import KvmpyError

    try:
        if args.command == "boot":
            return _boot(args)
        if args.command == "image":
            from kvmpy.image import build_default_guest

            g = build_default_guest(args.out)
            print(f"kernel {g.kernel}\ninitrd {g.initrd}\ncmdline {g.cmdline}")
            return 0
        if args.command == "up":
            return _up(args)
        if args.command == "trace":
            from kvmpy.tracetools import run_summarize

            return run_summarize(args.file, args.plot, args.explain)
        if args.command == "explain":
            from kvmpy.explain import main as explain_main

            return explain_main([args.reason])
        if args.command == "doctor":
            from kvmpy.doctor import main as doctor_main

            return doctor_main(kvm_path=args.kvm)
        return _run(args)
    except KvmpyError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(args) -> int:
    from kvmpy.builder import DEFAULT_MEM, FlatConfig, build_flat, stdout_sink
    from kvmpy.vcpu.modes import Mode

    if args.command == "demo":
        from kvmpy.guests import demo_image

        image, mode, load, entry, irqchip = demo_image(), Mode.REAL, 0x7C00, None, False
    else:
        image, mode, load, entry = args.image, Mode(args.mode), args.load, args.entry
        irqchip = args.irqchip
    tracer, trace_file = _open_tracer(args)
    cfg = FlatConfig(image=image, mode=mode, load=load, entry=entry,
                     mem_size=args.mem or DEFAULT_MEM, irqchip=irqchip, kvm_path=args.kvm,
                     console_sink=stdout_sink(), tracer=tracer, devices=args.devices,
                     transport=args.transport or "mmio")
    return _run_machine(lambda: build_flat(cfg), 1, args, tracer, trace_file)


def _run_machine(build, nr_vcpus: int, args, tracer, trace_file, on_built=None) -> int:
    """Build, run to the end and tear down one machine; the process status for its outcome."""
    from kvmpy.outcome import StopReason

    try:
        with build() as machine:
            if hasattr(trace_file, "sink"):      # --trace -: cancelled when the VM ends
                machine.add_output_sink(trace_file.sink)
            if on_built is not None:
                on_built(machine)
            if args.device_map:
                print(machine.describe(), file=sys.stderr)
            setup = machine.setup
            if getattr(args, "gdb", None) or getattr(args, "gdb_wait", False):
                setup = _attach_gdb(machine, args, setup)
            machine.attach_console_input(0, interactive=_isatty(0))
            machine.start(setup, nr_vcpus)
            outcome = machine.wait(args.timeout)
            if args.stats:
                print_stats(machine, outcome)
    finally:
        if tracer is not None:
            tracer.close()
            trace_file.close()
    if outcome.reason not in (StopReason.DEBUG_EXIT, StopReason.HALT, StopReason.RESET,
                              StopReason.STOPPED):
        print(f"kvmpy: {outcome.detail}", file=sys.stderr)
        if outcome.report:
            print(outcome.report, file=sys.stderr)
    return outcome.status


def _attach_gdb(machine, args, setup):
    from kvmpy._sigint import sigint_deferred
    from kvmpy.errors import KvmpyError
    from kvmpy.gdbstub import GdbStub, parse_address

    with sigint_deferred():   # the stub's thread started and registered, or neither
        try:
            host, port = parse_address(args.gdb or "tcp::1234")
            stub = GdbStub(machine, host, port, wait=args.gdb_wait)
        except OSError as e:
            raise KvmpyError(f"--gdb {args.gdb or 'tcp::1234'}: cannot listen: {e.strerror}; "
                             "choose another port") from None
        except ValueError as e:
            raise KvmpyError(f"--gdb {args.gdb}: {e}") from None
        machine._stack.callback(stub.close)
    print(f"kvmpy: gdb stub on {host}:{stub.port}"
          + (" (waiting for gdb before the first instruction)" if args.gdb_wait else ""),
          file=sys.stderr)
    return stub.wrap_setup(setup)


def _open_tracer(args):
    if not args.trace:
        return None, None
    from kvmpy.vmexit.trace import Tracer

    symbols = getattr(args, "symbols", None)
    if symbols is None and getattr(args, "kernel", None):
        from kvmpy.symbols import from_image

        symbols = from_image(args.kernel)        # None for a bzImage
    if args.trace == "-":   # stderr through a StreamSink: a stalled reader cannot hang the VM
        from kvmpy.builder import SinkWriter, stdout_sink

        out = SinkWriter(stdout_sink(2))
        return Tracer(out, symbols=symbols), out
    try:
        f = open(args.trace, "w")
    except OSError as e:
        from kvmpy.errors import KvmpyError

        raise KvmpyError(f"cannot write trace file {args.trace}: {e.strerror}") from None
    try:
        return Tracer(f, symbols=symbols), f
    except BaseException:
        f.close()
        raise


def _up(args) -> int:
    from kvmpy.doctor import can_boot_linux, kvm_flavour

    kind, desc = kvm_flavour()
    if not can_boot_linux(kind):
        print(f"kvmpy: this host's KVM is {kind} ({desc}): a Linux kernel cannot boot here; "
              "running `kvmpy demo` instead", file=sys.stderr)
        args.command = "demo"
        return _run(args)
    from kvmpy.image import build_default_guest

    g = build_default_guest()
    args.kernel, args.initrd, args.append, args.fast_boot = g.kernel, g.initrd, g.cmdline, False
    return _boot(args)   # (its tracer picks up args.kernel's symbols, when it has any)


def _boot(args) -> int:
    from kvmpy.builder import stdout_sink
    from kvmpy.linux import DEFAULT_CMDLINE, DEFAULT_MEM, LinuxConfig, build_linux
    tracer, trace_file = _open_tracer(args)
    cmdline = DEFAULT_CMDLINE if args.append is None else args.append
    if getattr(args, "symbols", None) and args.trace and not args.fast_boot:
        cmdline = _without_kaslr(args.kernel, cmdline)
    cfg = LinuxConfig(args.kernel, args.initrd, cmdline,
                      mem_size=args.mem or DEFAULT_MEM, cpus=args.cpus, fast_boot=args.fast_boot,
                      kvm_path=args.kvm, console_sink=stdout_sink(), tracer=tracer,
                      devices=args.devices, transport=args.transport or "pci")

    def notes(machine):
        for note in machine.boot_plan.notes:
            if note.startswith("--fast-boot"):
                print(f"kvmpy: {note}", file=sys.stderr)

    return _run_machine(lambda: build_linux(cfg), cfg.cpus, args, tracer, trace_file, notes)


def _without_kaslr(kernel: str, cmdline: str) -> str:
    """A bzImage's own decompressor moves the kernel to a random address (KASLR), and the RIPs
    in a trace would then match no symbol of the System.map given with --symbols: ask it not to
    (``nokaslr``) unless the command line says otherwise. (--fast-boot and ELF kernels are
    entered where they are linked: no decompressor, no KASLR.)"""
    words = cmdline.split()
    if "nokaslr" in words or "kaslr" in words:
        return cmdline
    try:
        with open(kernel, "rb") as f:
            head = f.read(0x206)
    except OSError:
        return cmdline          # build_linux reports the unreadable kernel
    if head[0x202:0x206] != b"HdrS":   # Documentation/arch/x86/boot.rst: the setup header magic
        return cmdline
    print("kvmpy: --symbols with a bzImage: adding nokaslr to the command line so that traced "
          "RIPs match the symbols", file=sys.stderr)
    return f"{cmdline} nokaslr"


def print_stats(machine, outcome, out=sys.stderr) -> None:
    d = machine.dispatcher
    w = out.write
    w(f"kvmpy: guest ended: {outcome.reason.value} ({outcome.detail}); status {outcome.status}\n")
    counts = d.exit_counts()
    w(f"exits by reason ({sum(counts.values())} in all):\n")
    for reason, n in counts.most_common():
        w(f"  {reason:<18}{n:>10}\n")
    w("exits by device:\n")
    w(f"  {'device':<14}{'where':<16}{'reads':>10}{'writes':>10}\n")
    for bus, kind in ((machine.pio, "port"), (machine.mmio, "mmio")):
        for m in bus.mappings:
            where = f"{m.base:#x}-{m.end - 1:#x}"
            w(f"  {m.name:<14}{where:<16}{m.reads:>10}{m.writes:>10}\n")
    s = d.stats
    for port, n in sorted(s.unclaimed_pio.items()):
        w(f"  {'unassigned':<14}{'port ' + hex(port):<16}{n:>20}\n")
    for addr, n in sorted(s.unclaimed_mmio.items()):
        w(f"  {'unassigned':<14}{hex(addr):<16}{n:>20}\n")
    for name, n in s.device_errors.items():
        w(f"  device errors contained in {name}: {n}\n")


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def entry() -> None:
    """The console script: main(), then exit without the interpreter's teardown (every VM
    resource is already released by then; skipping teardown saves ~5 ms per run)."""
    status = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


if __name__ == "__main__":
    entry()
