/* Real mode: accesses to ports nobody owns (floppy 0x3f2/0x3f4, 0x1234) read as all-ones,
 * writes are dropped; 16- and 32-bit accesses too. Prints the values read. */
        .code16
        mov $0x3f4, %dx
        in %dx, %al
        PUTHEX_AL
        NEWLINE
        mov $0x3f2, %dx
        mov $0x1c, %al
        out %al, %dx
        mov $0x1234, %dx
        in %dx, %ax
        mov %ah, %al
        PUTHEX_AL
        NEWLINE
        mov $0x1234, %dx             /* PUTHEX_AL clobbered %dx */
        in %dx, %eax
        mov %eax, %edi
        PUTHEX32_EDI
        NEWLINE
        EXIT 0x10
