/* Long mode: 32-bit MMIO read and write at 0xd0000000 (unclaimed unless the test maps a
 * device there) and at 0xd0001000. Prints the values read, in hex, one per line. */
        .code64
        mov $0xd0000000, %eax
        movl $0x12345678, (%rax)     /* dropped if unclaimed */
        mov (%rax), %edi
        PUTHEX32_EDI
        NEWLINE
        mov $0xd0001000, %eax
        movl $0xcafe0001, (%rax)
        mov (%rax), %edi
        PUTHEX32_EDI
        NEWLINE
        mov $0xd0001000, %eax
        movb $0x42, 4(%rax)          /* a 1-byte write at offset 4 */
        movzbl 4(%rax), %edi
        PUTHEX32_EDI
        NEWLINE
        EXIT 0x10
