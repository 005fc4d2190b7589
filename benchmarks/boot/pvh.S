/*
 * The boot benchmark's PVH kernel (assembled after tests/guests/lib16.inc, linked at 0x100000
 * into an ELF like tests/guests/pvh32.S): an ELF note XEN_ELFNOTE_PHYS32_ENTRY (18) points at
 * pvh_start, which the VMM (kvmpy's loader, or QEMU's firmware qboot for -M microvm -kernel)
 * enters in 32-bit protected mode, paging off, %ebx = hvm_start_info. It prints one line on
 * COM1 (port 0x3f8, polling LSR.THRE before each byte):
 *
 *     boot-bench pvh magic:336ec578
 *
 * (the start_info magic XEN_HVM_START_MAGIC_VALUE, read through %ebx: only a PVH boot prints
 * it) and ends through isa-debug-exit (port 0xf4) with value 0: process status 1.
 */
        .section .note.Xen, "a"
        .balign 4
        .long 4, 4, 18                  /* namesz, descsz, type */
        .asciz "Xen"
        .long pvh_start
        .text
        .code32
        .globl pvh_start
pvh_start:
        mov %ebx, %ebp
        PUTS "boot-bench pvh magic:"
        mov 0(%ebp), %edi               /* hvm_start_info.magic */
        PUTHEX32_EDI
        NEWLINE
        EXIT 0
