"""What each KVM exit reason means: ``kvmpy explain REASON``.

For every ``KVM_EXIT_*`` reason kvmpy decodes (kvmpy/vmexit/exits.py ``ExitReason``) this says in
plain words what the exit is, what the CPU did in hardware to cause it (the Intel VT-x basic exit
reason, Intel SDM vol. 3C appendix C "VMX basic exit reasons", and the AMD-V #VMEXIT code, AMD
APM vol. 2 appendix C "SVM intercept exit codes"), and what kvmpy does about it. Where a software
KVM such as PVM (no VT-x/AMD-V: KVM's instruction emulator runs the guest's CPL0 code) behaves
differently, a note says so.

Reasons are accepted case-insensitively, with or without the ``KVM_EXIT_`` prefix, or as numbers
(``io``, ``KVM_EXIT_IO``, ``2``, ``0x2``).

Not here: exits kvmpy never asks for and does not decode (Xen, Hyper-V, MSR, memory-fault and
the s390/PowerPC/arm reasons), and KVM's in-kernel exits that never reach userspace (CPUID, MSR
accesses, CR accesses...), except where they explain a userspace exit.
"""
from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass

from kvmpy.errors import KvmpyError
from kvmpy.vmexit.exits import ExitReason, InternalSuberror

_WIDTH = 96


class UnknownExitReason(KvmpyError):
    """A name or number that is not a KVM exit reason kvmpy knows."""


@dataclass(frozen=True)
class Explanation:
    title: str         # one line, after "KVM_EXIT_X (n): "
    what: str          # what the exit is, in plain words
    vmx: str           # Intel VT-x
    svm: str           # AMD-V
    kvmpy: str         # what kvmpy does, and where
    pvm: str = ""      # software KVM (PVM), where it differs
    details: tuple[tuple[str, str], ...] = ()   # (label, text) paragraphs, e.g. suberrors


_SUBERRORS: dict[InternalSuberror, str] = {
    InternalSuberror.EMULATION: (
        "KVM's x86 instruction emulator (arch/x86/kvm/emulate.c) could not decode or execute an "
        "instruction it had to emulate: the instruction behind an MMIO access, a string I/O "
        "instruction, a task switch, real-mode code on a CPU without unrestricted guest, or an "
        "instruction the emulator does not implement. When data[0] has "
        "KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, data[1..] carry the instruction "
        "length and up to 15 instruction bytes."),
    InternalSuberror.SIMUL_EX: (
        "an intercepted exception happened while the CPU was delivering another event (the "
        "VT-x IDT-vectoring information was valid), and it was not an ordinary page fault KVM "
        "could resolve: two exceptions at once that KVM cannot sort out. data[] holds the "
        "vectoring information, the exit's interruption information and error code."),
    InternalSuberror.DELIVERY_EV: (
        "the CPU exited while delivering an event (interrupt or exception) for a reason KVM "
        "cannot handle in the middle of a delivery, typically an EPT misconfiguration (MMIO): "
        "the guest's IDT, GDT, TSS or stack lies in MMIO or unbacked memory. data[] holds the "
        "vectoring information, the exit reason and qualification, and the GPA."),
    InternalSuberror.UNEXPECTED_EXIT_REASON: (
        "the hardware reported an exit reason KVM has no handler for (a KVM bug or a new CPU "
        "feature); data[0] is the hardware exit reason, data[1] the host CPU. KVM also dumps "
        "the VMCS/VMCB to the host's kernel log."),
}

EXPLANATIONS: dict[ExitReason, Explanation] = {
    ExitReason.IO: Explanation(
        "the guest accessed an I/O port that KVM does not handle in the kernel",
        "The guest executed IN, OUT, INS or OUTS on a port that no in-kernel device (PIC, PIT, "
        "ioeventfd...) claims. kvm_run.io says the port, the access size (1, 2 or 4), the "
        "direction, how many elements (count > 1 for string I/O, rep ins/outs) and where in the "
        "kvm_run page the data lies. For IN, userspace writes the value there and KVM completes "
        "the instruction (loads the register, advances RIP) on the next KVM_RUN.",
        "basic exit reason 30, \"I/O instruction\" (KVM sets \"unconditional I/O exiting\"). "
        "The exit qualification gives the size (bits 2:0, size - 1), the direction (bit 3, 1 = "
        "IN), string instruction (bit 4), REP prefix (bit 5), operand encoding (bit 6, DX or "
        "immediate) and the port (bits 31:16). KVM takes a fast path for plain IN/OUT; string "
        "I/O goes through its instruction emulator.",
        "#VMEXIT IOIO (0x7b), from the I/O permission map. EXITINFO1 holds the port (bits "
        "31:16), the operand size (SZ8/SZ16/SZ32), REP (bit 3), STR (bit 2) and the direction "
        "(bit 0, 1 = IN); EXITINFO2 is the RIP of the next instruction.",
        "kvmpy/vmexit/dispatch.py (Dispatcher.handle_io) looks the port up in the PIO bus "
        "(kvmpy/vmexit/bus.py, one list index per port) and calls the owning device's read or "
        "write with the offset from its base (kvmpy/devices/: uart.py is COM1, cmos.py the RTC, "
        "i8042.py, debug_exit.py, post.py, pci.py). A port nobody owns reads as all-ones and "
        "drops writes (counted in --stats, traced as `unassigned`).",
        "Guest CPL0 code runs in KVM's emulator, so the same exit comes from the emulated IN/OUT "
        "rather than a hardware intercept; `rep outsb` exits once per byte there."),
    ExitReason.MMIO: Explanation(
        "the guest read or wrote a guest-physical address with no memory behind it",
        "A load or store hit a guest-physical address (GPA) that is not in any memory slot "
        "(KVM_SET_USER_MEMORY_REGION) and that no in-kernel device (LAPIC, IOAPIC, ioeventfd, "
        "coalesced MMIO) handles. The hardware reports only the faulting address, so KVM decodes "
        "the instruction at RIP with its emulator to learn the size, direction and value. "
        "kvm_run.mmio gives phys_addr, len, is_write and data (the value written, or where "
        "userspace puts the value read; KVM completes the load on the next KVM_RUN). An "
        "instruction the emulator cannot decode ends as KVM_EXIT_INTERNAL_ERROR instead.",
        "basic exit reason 48, \"EPT violation\", on the first access to the GPA (no EPT "
        "entry; the exit qualification says read/write/fetch, and the guest-physical-address "
        "field has the GPA). KVM finds no memslot there, and installs a deliberately "
        "misconfigured EPT entry (an \"MMIO SPTE\") so that later accesses exit with reason 49, "
        "\"EPT misconfiguration\", and take a faster path. Without EPT (shadow paging) it is a "
        "page-fault exit instead (reason 0, vector 14).",
        "#VMEXIT NPF (0x400), nested page fault: EXITINFO1 is the page-fault error code, "
        "EXITINFO2 the faulting GPA; with decode assists the VMCB also holds the guest's "
        "instruction bytes, which saves KVM a fetch.",
        "kvmpy/vmexit/dispatch.py (Dispatcher.handle_mmio) looks the address up in the MMIO bus "
        "(kvmpy/vmexit/bus.py, a bisect over sorted windows) and calls the device with the "
        "offset; only 1, 2, 4 and 8-byte accesses reach devices. An address nobody owns reads "
        "as all-ones and drops writes (traced as `MMIO 0x... (unassigned)`).",
        "There is no EPT or NPT: the exit comes from KVM's shadow page tables and its emulator."),
    ExitReason.HLT: Explanation(
        "the guest executed HLT and KVM left the waiting to userspace",
        "The guest executed HLT (\"wait for an interrupt\"). With an in-kernel irqchip "
        "(KVM_CREATE_IRQCHIP) KVM handles HLT itself: the vCPU thread sleeps in the kernel until "
        "an interrupt is pending and userspace never sees it. Without one, KVM cannot know when "
        "an interrupt will come and returns KVM_EXIT_HLT. (With KVM_CAP_X86_DISABLE_EXITS HLT "
        "runs natively and does not exit at all.)",
        "basic exit reason 12, \"HLT\" (KVM sets \"HLT exiting\"). KVM advances RIP past the "
        "HLT before it returns to userspace.",
        "#VMEXIT HLT (0x78).",
        "Without an in-kernel irqchip nothing can wake the vCPU, so kvmpy/vmexit/dispatch.py "
        "(Dispatcher.on_hlt) ends the VM with status 0 and says whether interrupts were enabled. "
        "`kvmpy run --irqchip` and `kvmpy boot` create the irqchip, so HLT waits in the kernel "
        "and is not traced."),
    ExitReason.SHUTDOWN: Explanation(
        "the vCPU shut down: a triple fault",
        "The CPU entered the shutdown state, almost always a triple fault: an exception while "
        "delivering a double fault, usually because the IDT, GDT or stack is missing or broken "
        "(e.g. an exception before the guest loaded an IDT). On bare metal the chipset resets "
        "the machine; some guests (Linux reboot=t) triple-fault on purpose to reboot. KVM also "
        "raises it itself when an exception it injects or emulates faults twice.",
        "basic exit reason 2, \"triple fault\".",
        "#VMEXIT SHUTDOWN (0x7f) (KVM intercepts shutdown events so that the host survives).",
        "kvmpy/vmexit/dispatch.py ends the VM with status 4 and kvmpy/vcpu/report.py "
        "(describe_stop) prints RIP, the CPU mode, the registers and the bytes at RIP."),
    ExitReason.INTERNAL_ERROR: Explanation(
        "KVM could not go on: an emulation failure or an exit it cannot handle",
        "KVM handled an exit in the kernel and failed. kvm_run.internal.suberror says how "
        "(below); data[0..ndata] add details. The guest cannot continue as is: userspace reports "
        "and stops, or fixes the state and re-enters.",
        "not one exit reason: the exit behind it was handled by KVM and went wrong. For "
        "EMULATION it is usually an EPT violation or misconfiguration (48, 49: MMIO), an I/O "
        "instruction (30: string I/O), an invalid-opcode exception (reason 0, vector 6) for an "
        "instruction KVM emulates, a task switch (9) or invalid guest state in real mode; for "
        "SIMUL_EX an exception exit (0) with valid IDT-vectoring information; for DELIVERY_EV "
        "an exit such as 49 during event delivery; for UNEXPECTED_EXIT_REASON any reason KVM "
        "has no handler for.",
        "the same through the SVM exit codes: NPF (0x400) for MMIO, IOIO (0x7b), exception "
        "intercepts (0x40 + vector), TASK_SWITCH (0x7d), or an exit code with no handler "
        "(UNEXPECTED_EXIT_REASON).",
        "kvmpy/vmexit/dispatch.py ends the VM with status 6 and kvmpy/vcpu/report.py "
        "(describe_internal_error) prints the suberror, RIP, the CPU mode, the instruction bytes "
        "(from KVM, or read through the guest's page tables) and the instruction's name when it "
        "is one a software KVM cannot emulate.",
        "KVM's emulator runs all guest code at CPL0 and some "
        "instructions are not implemented there: int3, int n and icebp in protected/long mode, "
        "32-bit iret, rdtscp, xgetbv/xsetbv, xsave*, x87/SSE arithmetic, popcnt, crc32, "
        "cmpxchg16b, lar/lsl, stac/clac, monitor/mwait... Each ends as INTERNAL_ERROR "
        "EMULATION (about 1.2 ms each) even though the same guest runs on VT-x/AMD-V; this is "
        "why a Linux kernel cannot boot on such a host (kvmpy doctor, README \"On software KVM "
        "hosts\").",
        tuple((f"{s.name} ({int(s)})", text) for s, text in _SUBERRORS.items())),
    ExitReason.FAIL_ENTRY: Explanation(
        "the CPU refused to enter the guest",
        "VM entry failed: the guest state KVM loaded is one the CPU considers invalid, most "
        "often an inconsistent KVM_SET_SREGS (CR0.PG without CR0.PE, long mode with a CS that "
        "is not a 64-bit code segment, segment limits or access rights that do not fit, EFER.LMA "
        "not matching CR0.PG and EFER.LME). kvm_run.fail_entry gives "
        "hardware_entry_failure_reason and the host cpu.",
        "the VM-entry checks of guest state failed: the exit reason has bit 31 set with basic "
        "reason 33 \"VM-entry failure due to invalid guest state\" (0x80000021), 34 "
        "\"...due to MSR loading\" or 41 \"...due to machine-check event\". If VMLAUNCH/VMRESUME "
        "failed outright, hardware_entry_failure_reason is the VM-instruction error number "
        "instead (e.g. 7, invalid control fields).",
        "VMRUN failed its consistency checks: #VMEXIT INVALID (exit code -1, "
        "0xffffffffffffffff), which is the hardware_entry_failure_reason.",
        "kvmpy/vmexit/dispatch.py ends the VM with status 8 and the hardware reason. The "
        "registers come from kvmpy/vcpu/modes.py (flat binaries) or kvmpy/vcpu/boot.py "
        "(kernels): look there for the state that was refused."),
    ExitReason.SYSTEM_EVENT: Explanation(
        "KVM reports a platform event: shutdown, reset, crash...",
        "Not a CPU exit but an event KVM recognised in something the guest did. "
        "kvm_run.system_event.type is SHUTDOWN (1), RESET (2), CRASH (3), WAKEUP (4), SUSPEND "
        "(5) or SEV_TERM (6); data[] adds details. On x86 it comes from a Hyper-V guest writing "
        "its crash MSRs (CRASH) or an SEV-ES/SNP guest asking to be terminated through the GHCB "
        "(SEV_TERM); on arm64 and RISC-V from PSCI/SBI calls (SHUTDOWN, RESET, SUSPEND).",
        "the exit that carried the request: WRMSR (basic exit reason 32) for the Hyper-V crash "
        "MSRs.",
        "MSR (0x7c) for the Hyper-V crash MSRs; VMGEXIT (0x403) for an SEV-ES/SNP termination "
        "request.",
        "kvmpy/vmexit/dispatch.py ends the VM: SHUTDOWN and RESET with status 0, other types "
        "with status 8."),
    ExitReason.DEBUG: Explanation(
        "a debug event userspace asked for: single-step or a breakpoint",
        "Userspace enabled guest debugging with KVM_SET_GUEST_DEBUG: single-step "
        "(KVM_GUESTDBG_SINGLESTEP, KVM sets RFLAGS.TF), hardware breakpoints "
        "(KVM_GUESTDBG_USE_HW_BP, debug registers DR0-DR3/DR7) or software breakpoints "
        "(KVM_GUESTDBG_USE_SW_BP, an int3 placed by the debugger), and one fired. "
        "kvm_run.debug.arch gives the exception (1 = #DB, 3 = #BP), pc, dr6 and dr7. Debug "
        "exceptions that are the guest's own are reinjected into the guest instead.",
        "basic exit reason 0, \"exception or non-maskable interrupt\", with vector 1 (#DB) or "
        "3 (#BP) in the VM-exit interruption information (KVM sets those bits in the exception "
        "bitmap); for #DB the exit qualification has the DR6 bits.",
        "#VMEXIT of the exception intercepts: 0x41 (#DB) or 0x43 (#BP).",
        "kvmpy/vmexit/dispatch.py passes it to the debug handler a tool installed "
        "(Dispatcher.debug_handler), or ignores it and re-enters the guest.",
        "Single-step and hardware breakpoints work; software breakpoints do not (int3 is an "
        "emulation failure there)."),
    ExitReason.IRQ_WINDOW_OPEN: Explanation(
        "the guest can now take an interrupt, as userspace asked",
        "Userspace set kvm_run.request_interrupt_window because it has an interrupt to inject "
        "(KVM_INTERRUPT) and no in-kernel irqchip; KVM returns as soon as the guest can accept "
        "one (RFLAGS.IF = 1 and no interrupt shadow after sti or mov ss). With an in-kernel "
        "irqchip KVM injects interrupts itself and this exit does not happen.",
        "basic exit reason 7, \"interrupt window\" (the \"interrupt-window exiting\" control).",
        "#VMEXIT VINTR (0x64): KVM queues a virtual interrupt (V_IRQ) and intercepts its "
        "delivery.",
        "kvmpy injects interrupts through the in-kernel irqchip (KVM_IRQ_LINE), so it never asks "
        "for this window; kvmpy/vmexit/dispatch.py ignores the exit and re-enters the guest."),
    ExitReason.INTR: Explanation(
        "KVM_RUN returned because a signal is pending for the vCPU thread",
        "KVM returns to userspace, KVM_RUN failing with EINTR, when a signal arrives for the "
        "vCPU thread or when kvm_run.immediate_exit is set, so that the VMM can stop or pause "
        "the vCPU, or change its state, from another thread.",
        "the guest was interrupted by a host interrupt, typically the IPI the signalling "
        "thread sends to kick the vCPU out: basic exit reason 1, \"external interrupt\". KVM "
        "sees the pending signal before re-entering and returns instead.",
        "#VMEXIT INTR (0x60), a physical interrupt.",
        "kvmpy/vcpu/runner.py stops a vCPU exactly this way (immediate_exit plus a SIGRTMIN "
        "kick, as Firecracker does); it handles the EINTR itself and checks why it was kicked, "
        "and kvmpy/vmexit/dispatch.py ignores the exit if one reaches it."),
    ExitReason.EXCEPTION: Explanation(
        "a guest exception KVM intercepted and hands to userspace",
        "An exception in the guest that KVM intercepted but neither handled nor reinjected; "
        "kvm_run.ex gives the vector and the error code. On x86 today it is how KVM reports an "
        "alignment check (#AC, vector 17) from a split-locked access in the guest when the host "
        "runs with split_lock_detect=fatal; other exceptions are the guest's own and go back to "
        "it.",
        "basic exit reason 0, \"exception or non-maskable interrupt\", with the vector in the "
        "VM-exit interruption information.",
        "#VMEXIT of an exception intercept, 0x40 + vector (0x51 for #AC).",
        "kvmpy does not handle it: kvmpy/vmexit/dispatch.py ends the VM with status 8 "
        "(\"unexpected exit\")."),
    ExitReason.HYPERCALL: Explanation(
        "the guest made a hypercall that KVM forwards to userspace",
        "The guest executed VMCALL or VMMCALL with a hypercall number userspace asked to "
        "handle. On x86 that is KVM_HC_MAP_GPA_RANGE (12), which confidential guests (SEV, TDX) "
        "use to convert memory between private and shared, once userspace enabled "
        "KVM_CAP_EXIT_HYPERCALL; kvm_run.hypercall gives nr, args and a ret field to fill in. "
        "Other KVM hypercalls (kick a CPU, send IPIs...) are handled in the kernel, and unknown "
        "ones return -KVM_ENOSYS to the guest.",
        "basic exit reason 18, \"VMCALL\".",
        "#VMEXIT VMMCALL (0x81).",
        "kvmpy does not enable it: kvmpy/vmexit/dispatch.py ends the VM with status 8.",
        "vmcall and vmmcall hang the vCPU instead of exiting."),
    ExitReason.UNKNOWN: Explanation(
        "an exit KVM could not classify",
        "KVM returned to userspace without a more specific reason; kvm_run.hw.hardware_exit_"
        "reason holds the hardware's exit reason. Current x86 KVM reports this only for an "
        "unexpected ENCLS exit (SGX); unhandled hardware exit reasons are reported as "
        "KVM_EXIT_INTERNAL_ERROR with suberror UNEXPECTED_EXIT_REASON since 2019 (before that "
        "they were KVM_EXIT_UNKNOWN). Other architectures also preset this reason at every "
        "KVM_RUN, so a KVM_RUN that failed with an errno may leave it.",
        "the basic exit reason is in hardware_exit_reason, e.g. 60 \"ENCLS\".",
        "the SVM exit code is in hardware_exit_reason (older kernels).",
        "kvmpy/vmexit/dispatch.py ends the VM with status 8, naming the exit."),
    ExitReason.NMI: Explanation(
        "defined by the KVM API but not produced by x86 KVM today",
        "Reserved for reporting non-maskable interrupts to userspace. NMIs that arrive while "
        "the guest runs belong to the host and are handled in the kernel; NMIs for the guest "
        "are injected by the VMM (KVM_NMI) or the in-kernel LAPIC. A VMM seeing this exit has a "
        "kernel that does something unusual.",
        "an NMI taken during guest execution is basic exit reason 0 with interruption type "
        "NMI (\"NMI exiting\"); KVM handles it in the kernel.",
        "#VMEXIT NMI (0x61), handled in the kernel.",
        "kvmpy does not handle it: kvmpy/vmexit/dispatch.py ends the VM with status 8."),
    ExitReason.TPR_ACCESS: Explanation(
        "a guest access to the local APIC's task-priority register, on request",
        "Userspace enabled KVM_TPR_ACCESS_REPORTING (QEMU's kvmvapic did, to patch Windows XP's "
        "TPR accesses on CPUs without a TPR shadow); KVM then reports every emulated access to "
        "the in-kernel LAPIC's TPR (offset 0x80 of the APIC page). kvm_run.tpr_access gives "
        "the RIP and whether it was a write.",
        "the access arrives as an APIC-access exit (basic exit reason 44) or an EPT violation "
        "(48) on the APIC page, emulated by KVM; with a TPR shadow (\"use TPR shadow\") most "
        "accesses do not exit at all, only \"TPR below threshold\" (43).",
        "an NPF (0x400) on the APIC page, or CR8 accesses (read 0x08, write 0x18) when "
        "intercepted.",
        "kvmpy never enables TPR access reporting; kvmpy/vmexit/dispatch.py ends the VM with "
        "status 8 if one appears."),
    ExitReason.SET_TPR: Explanation(
        "defined by the KVM API but not produced by current KVM",
        "A leftover of early KVM (before the in-kernel LAPIC), which asked userspace to update "
        "the task-priority register when the guest wrote CR8. Today the TPR lives in the kernel "
        "(in-kernel LAPIC, or CR8 state kept by KVM).",
        "a CR8 write is a control-register-access exit (basic exit reason 28) or, with a TPR "
        "shadow, \"TPR below threshold\" (43); KVM handles both.",
        "CR8 write (0x18) when intercepted, or the virtual TPR (V_TPR) without an exit.",
        "kvmpy does not handle it: kvmpy/vmexit/dispatch.py ends the VM with status 8."),
}


def resolve(reason: str | int) -> ExitReason:
    """``ExitReason`` for a name (any case, ``KVM_EXIT_`` optional) or a number."""
    if isinstance(reason, ExitReason):
        return reason
    if isinstance(reason, int) and not isinstance(reason, bool):
        number = reason
    else:
        text = str(reason).strip()
        name = text.upper()
        if name.startswith("KVM_EXIT_"):
            name = name[len("KVM_EXIT_"):]
        if name in ExitReason.__members__:
            return ExitReason[name]
        try:
            number = int(text, 0)
        except ValueError:
            raise UnknownExitReason(_unknown(text)) from None
    try:
        return ExitReason(number)
    except ValueError:
        raise UnknownExitReason(_unknown(str(number))) from None


def _unknown(text: str) -> str:
    valid = ", ".join(f"{r.name} ({int(r)})" for r in sorted(ExitReason))
    return f"unknown exit reason {text!r}: use one of {valid} (any case, KVM_EXIT_ optional)"


def explain(reason: str | int) -> str:
    """The explanation of one exit reason, as text (several wrapped paragraphs)."""
    r = resolve(reason)
    e = EXPLANATIONS[r]
    out = [f"KVM_EXIT_{r.name} ({int(r)}): {e.title}", ""]

    def section(head: str, paragraphs) -> None:
        if out[-1]:
            out.append("")
        out.append(head)
        for label, text in paragraphs:
            if label:
                out.append(textwrap.fill(text, _WIDTH, initial_indent=f"  {label}: ",
                                         subsequent_indent="      "))
            else:
                out.append(textwrap.fill(text, _WIDTH, initial_indent="  ",
                                         subsequent_indent="  "))

    section("What it is", [("", e.what)])
    if e.details:
        section("Suberrors (kvm_run.internal.suberror)", e.details)
    section("What the CPU did", [("Intel VT-x", e.vmx), ("AMD-V (SVM)", e.svm)])
    section("What kvmpy does", [("", e.kvmpy)])
    if e.pvm:
        section("On a software KVM (PVM: no VT-x/AMD-V)", [("", e.pvm)])
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``kvmpy explain REASON``: print the explanation; 0, or 2 with a one-line error."""
    import argparse

    p = argparse.ArgumentParser(prog="kvmpy explain",
                                description="Explain a KVM exit reason: what it is, what the "
                                "CPU did (VT-x and AMD-V), and what kvmpy does about it.")
    p.add_argument("reason", metavar="REASON", help="an exit reason: a name such as io, "
                   "KVM_EXIT_MMIO or internal_error, or its number")
    args = p.parse_args(argv)
    try:
        sys.stdout.write(explain(args.reason))
    except UnknownExitReason as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
