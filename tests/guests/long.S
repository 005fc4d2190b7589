/* Entered in 64-bit long mode by `kvmpy run --mode long`: print EFER, CS, CR0 and a result
 * that needs 64-bit registers. */
        .code64
        PUTS "long mode\n"
        mov $0xc0000080, %ecx        /* IA32_EFER */
        rdmsr
        mov %eax, %edi
        PUTHEX32_EDI
        NEWLINE
        mov %cs, %edi
        PUTHEX32_EDI
        NEWLINE
        mov %cr0, %rdi
        PUTHEX32_EDI
        NEWLINE
        movabs $0x123456789a, %rdi
        shr $8, %rdi                 /* 0x12345678 only if the upper half was there */
        PUTHEX32_EDI
        NEWLINE
        EXIT 0x10
