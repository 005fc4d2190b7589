/* kvmpy's demo guest: starts in real mode at 0x7c00 and walks itself to 64-bit long mode,
 * saying on COM1 what it does at each step, then halts with interrupts off (exit status 0).
 *
 * Every `in`/`out` below is a VM exit that kvmpy handles in Python: `kvmpy demo --stats` counts
 * them and `kvmpy demo --trace -` prints each one. The steps are those of Intel SDM vol. 3A,
 * 10.9 "Mode switching" (protected mode) and 10.8.5 "Initializing IA-32e mode".
 */
        .set COM1, 0x3f8
        .set COM1_LSR, COM1 + 5
        .set LSR_THRE, 0x20          /* transmitter holding register empty (16550 LSR bit 5) */
        .set CMOS_INDEX, 0x70
        .set CMOS_DATA, 0x71
        .set PML4, 0x10000           /* page tables this guest builds for itself */
        .set PDPT, 0x11000
        .set PD, 0x12000
        .set MSR_EFER, 0xc0000080
        .set EFER_LME, 0x100

/* print the NUL-terminated string at (e/r)si; works in every mode (lodsb scales with it) */
.macro PUTS_BODY
1:      lodsb
        test %al, %al
        jz 3f
        mov %al, %bl
        mov $COM1_LSR, %dx
2:      in %dx, %al                  /* exit: read LSR until the UART can take a byte */
        test $LSR_THRE, %al
        jz 2b
        mov $COM1, %dx
        mov %bl, %al
        out %al, %dx                 /* exit: write THR, the byte appears on the console */
        jmp 1b
3:      ret
.endm

        .text
        .code16
start:
        cli
        xor %ax, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x7c00, %sp
        mov $msg_real, %si
        call puts16
        call print_rtc

        mov $msg_gdt, %si
        call puts16
        lgdtl gdtr                   /* the GDT below: null, code32, data, code64 */
        mov %cr0, %eax
        or $1, %eax                  /* CR0.PE */
        mov %eax, %cr0
        ljmpl $0x08, $prot32         /* reload CS: now in 32-bit protected mode */

puts16: PUTS_BODY

/* "RTC: hh:mm:ss UTC" from the CMOS clock (BCD, 24 h: status B as kvmpy sets it) */
print_rtc:
        mov $msg_rtc, %si
        call puts16
        mov $4, %al                  /* hours */
        call bcd16
        mov $':', %al
        call putc16
        mov $2, %al                  /* minutes */
        call bcd16
        mov $':', %al
        call putc16
        mov $0, %al                  /* seconds */
        call bcd16
        mov $msg_utc, %si
        jmp puts16
bcd16:  out %al, $CMOS_INDEX
        in $CMOS_DATA, %al
        mov %al, %cl
        shr $4, %al
        add $'0', %al
        call putc16
        mov %cl, %al
        and $0xf, %al
        add $'0', %al
putc16: mov %al, %bl
        mov $COM1_LSR, %dx
1:      in %dx, %al
        test $LSR_THRE, %al
        jz 1b
        mov $COM1, %dx
        mov %bl, %al
        out %al, %dx
        ret

        .code32
prot32:
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x7c00, %esp
        mov $msg_prot, %esi
        call puts32

        /* identity-map the first 1 GiB with 2 MiB pages: PML4[0] -> PDPT[0] -> PD[0..511] */
        mov $PML4, %edi
        xor %eax, %eax
        mov $(3 * 4096 / 4), %ecx
        rep stosl
        movl $(PDPT | 3), PML4       /* present | writable */
        movl $(PD | 3), PDPT
        mov $PD, %edi
        mov $0x83, %eax              /* present | writable | 2 MiB page */
        mov $512, %ecx
1:      mov %eax, (%edi)
        add $0x200000, %eax
        add $8, %edi
        loop 1b

        mov $msg_paging, %esi
        call puts32
        mov %cr4, %eax
        or $0x20, %eax               /* CR4.PAE */
        mov %eax, %cr4
        mov $PML4, %eax
        mov %eax, %cr3
        mov $MSR_EFER, %ecx
        rdmsr
        or $EFER_LME, %eax
        wrmsr
        mov %cr0, %eax
        or $0x80000000, %eax         /* CR0.PG: IA-32e mode becomes active (EFER.LMA=1) */
        mov %eax, %cr0
        ljmp $0x18, $long64          /* a 64-bit code segment: now in 64-bit mode */

puts32: PUTS_BODY

        .code64
long64:
        mov $msg_long, %esi
        call puts64
        movabs $0xfedcba9876543210, %rax  /* a 64-bit register, printed in hex */
        call hex64
        mov $msg_done, %esi
        call puts64
        cli
        hlt                          /* exit: HLT with IF=0 ends the VM, status 0 */

puts64: PUTS_BODY

hex64:  mov $16, %ecx
        mov %rax, %rdi
1:      rol $4, %rdi
        mov %edi, %eax
        and $0xf, %eax
        mov $hexdigits, %ebx
        movb (%rbx,%rax), %al
        mov %al, %bl
        mov $COM1_LSR, %dx
2:      in %dx, %al
        test $LSR_THRE, %al
        jz 2b
        mov $COM1, %dx
        mov %bl, %al
        out %al, %dx
        loop 1b
        ret

        .balign 8
gdt:    .quad 0
        .quad 0x00cf9b000000ffff     /* 0x08: 32-bit code, base 0, 4 GiB */
        .quad 0x00cf93000000ffff     /* 0x10: data, base 0, 4 GiB */
        .quad 0x00af9b000000ffff     /* 0x18: 64-bit code (L=1) */
gdtr:   .word gdtr - gdt - 1
        .long gdt

hexdigits: .ascii "0123456789abcdef"
msg_real:   .asciz "kvmpy demo: hello from real mode (16-bit, CS=0, IP=0x7c00)\r\n"
msg_rtc:    .asciz "kvmpy demo: CMOS RTC says "
msg_utc:    .asciz " UTC\r\n"
msg_gdt:    .asciz "kvmpy demo: loading a GDT and setting CR0.PE\r\n"
msg_prot:   .asciz "kvmpy demo: in 32-bit protected mode; building identity page tables\r\n"
msg_paging: .asciz "kvmpy demo: setting CR4.PAE, CR3, EFER.LME, then CR0.PG\r\n"
msg_long:   .asciz "kvmpy demo: in 64-bit long mode; a 64-bit register holds 0x"
msg_done:   .asciz "\r\nkvmpy demo: done, halting with interrupts off\r\n"
