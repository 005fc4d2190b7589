"""Readable reports of a stopped vCPU: CPU mode, RIP, the instruction bytes there.

Used when the guest ends in a way a person must debug: an emulation failure
(KVM_EXIT_INTERNAL_ERROR, common on software-KVM hosts such as PVM, where KVM's instruction
emulator runs all CPL0 code and cannot run some instructions) or a triple fault.
"""
from __future__ import annotations

from kvmpy.errors import GuestMemoryError

# Intel SDM vol. 3A, 2.5 (control registers) and 2.2.1 (EFER)
CR0_PE = 1 << 0
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LMA = 1 << 10

# Instructions that KVM's emulator cannot run on software-KVM hosts (shared/pvm-host.md)
_KNOWN = [
    (b"\xcc", "int3"), (b"\xcd", "int n"), (b"\xf1", "icebp"), (b"\xcf", "iret"),
    (b"\x0f\x01\xd0", "xgetbv"), (b"\x0f\x01\xd1", "xsetbv"), (b"\x0f\x01\xf9", "rdtscp"),
    (b"\x0f\xae", "xsave/xrstor/fxsave family"), (b"\xf3\x0f\xb8", "popcnt"),
    (b"\x0f\xc7", "cmpxchg8b/16b"), (b"\x0f\x01\xc8", "monitor"), (b"\x0f\x01\xc9", "mwait"),
    (b"\x0f\x01\xca", "clac"), (b"\x0f\x01\xcb", "stac"), (b"\x0f\x01\xc1", "vmcall"),
]


def cpu_mode(sregs) -> str:
    """The x86 operating mode from CR0/EFER/CS (Intel SDM vol. 3A, 2.2 'modes of operation')."""
    if not sregs.cr0 & CR0_PE:
        return "real mode (16-bit)"
    if sregs.efer & EFER_LMA:
        return "long mode (64-bit)" if sregs.cs.l else "compatibility mode (32-bit in long mode)"
    bits = 32 if sregs.cs.db else 16
    paging = ", paging" if sregs.cr0 & CR0_PG else ""
    return f"protected mode ({bits}-bit{paging})"


def translate(memory, sregs, linear: int) -> int | None:
    """Guest-physical address of ``linear`` through the guest's 4-level page tables (or itself
    when paging is off); None if unmapped. Only long-mode (4-level) paging is walked."""
    if not sregs.cr0 & CR0_PG:
        return linear & 0xFFFFFFFF
    if not (sregs.efer & EFER_LMA and sregs.cr4 & CR4_PAE):
        return None
    table = sregs.cr3 & 0x000FFFFFFFFFF000
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        entry = memory.read_u64(table + ((linear >> shift) & 0x1FF) * 8)
        if not entry & 1:  # P
            return None
        if level in (3, 2) and entry & (1 << 7):  # PS: 1 GiB or 2 MiB page
            mask = (1 << shift) - 1
            return (entry & 0x000FFFFFFFFFF000 & ~mask) | (linear & mask)
        table = entry & 0x000FFFFFFFFFF000
    return table | (linear & 0xFFF)


def read_code(vcpu, memory, sregs, rip: int, n: int = 15) -> bytes | None:
    if memory is None:
        return None
    linear = (sregs.cs.base + rip) & 0xFFFFFFFFFFFFFFFF
    try:
        out = bytearray()
        for i in range(n):   # byte by byte: the instruction may cross a page
            gpa = translate(memory, sregs, linear + i)
            if gpa is None or not memory.contains(gpa):
                break
            out.append(memory.read_u8(gpa))
        return bytes(out) or None
    except GuestMemoryError:
        return None


def guess_instruction(code: bytes) -> str | None:
    # skip legacy/REX prefixes
    i = 0
    while i < len(code) and (code[i] in (0x66, 0x67, 0xF0, 0xF2, 0x2E, 0x3E, 0x26, 0x36, 0x64, 0x65)
                             or 0x40 <= code[i] <= 0x4F):
        i += 1
    for pattern, name in _KNOWN:
        if code.startswith(pattern) or code[i:].startswith(pattern):
            return name
    return None


def describe_stop(vcpu, memory, what: str, insn: bytes | None = None) -> str:
    lines = []
    try:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    except Exception as e:  # the vCPU may not be readable any more
        return f"  (registers unavailable: {e})"
    lines.append(f"  mode: {cpu_mode(sregs)}, CPL {sregs.cs.selector & 3 if sregs.cr0 & CR0_PE else 0}")
    lines.append(f"  rip: {regs.rip:#x}  cs: {sregs.cs.selector:#06x} (base {sregs.cs.base:#x})"
                 f"  rflags: {regs.rflags:#x}")
    lines.append(f"  cr0: {sregs.cr0:#x}  cr3: {sregs.cr3:#x}  cr4: {sregs.cr4:#x}"
                 f"  efer: {sregs.efer:#x}")
    code = insn if insn else read_code(vcpu, memory, sregs, regs.rip)
    if code:
        src = "from KVM" if insn else "read from guest memory"
        lines.append(f"  instruction bytes ({src}): {code.hex(' ')}")
        name = guess_instruction(code)
        if name:
            lines.append(f"  looks like: {name}")
    else:
        lines.append("  instruction bytes: unavailable (RIP not in guest RAM)")
    return "\n".join(lines)


def describe_internal_error(vcpu, memory, exit) -> str:
    head = describe_stop(vcpu, memory, "emulation failure", exit.insn_bytes)
    data = " ".join(f"{d:#x}" for d in exit.data)
    tail = [f"  suberror: {exit.suberror}, data: [{data}]"]
    if exit.suberror == 1:  # KVM_INTERNAL_ERROR_EMULATION
        tail.append("  KVM's instruction emulator could not run this instruction. On a software "
                    "KVM (e.g. PVM, see `kvmpy doctor`) all CPL0 code is emulated and some "
                    "instructions (int3, int n, xsave, SSE arithmetic, ...) cannot be.")
    return head + "\n" + "\n".join(tail)
