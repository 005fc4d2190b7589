/* The 64-bit part of a synthetic bzImage (entered at startup_64 = load address + 0x200 per the
 * x86 boot protocol, with %rsi = the zero page). Prints what the boot loader (kvmpy) gave it:
 *   cmdline:<the command line>
 *   e820:<count>
 *   <addr hi><addr lo> <size hi><size lo> <type>       (one line per entry)
 *   initrd:<addr> <size> <first 8 bytes>
 *   loader:<type_of_loader> flags:<loadflags>
 * Offsets are from Documentation/arch/x86/zero-page.rst. The code before startup_64 (the 32-bit
 * entry, unused by a 64-bit boot) is a hlt. */
        .code64
        hlt
        .org 0x200
startup_64:
        mov %rsi, %r15                  /* keep the zero page */
        PUTS "cmdline:"
        mov 0x228(%r15), %esi           /* hdr.cmd_line_ptr */
        mov 0x0c8(%r15), %eax           /* ext_cmd_line_ptr: bits 32-63 */
        shl $32, %rax
        or %rax, %rsi
1:      lodsb
        test %al, %al
        jz 2f
        PUTC_AL
        jmp 1b
2:      NEWLINE
        PUTS "e820:"
        movzbl 0x1e8(%r15), %edi        /* e820_entries */
        mov %edi, %r14d
        PUTHEX32_EDI
        NEWLINE
        lea 0x2d0(%r15), %r13           /* e820_table: 20-byte entries addr, size, type */
3:      test %r14d, %r14d
        jz 4f
        E820_LINE %r13
        add $20, %r13
        dec %r14d
        jmp 3b
4:      PUTS "initrd:"
        mov 0x218(%r15), %edi           /* hdr.ramdisk_image */
        mov %edi, %r12d
        PUTHEX32_EDI
        mov $' ', %al
        PUTC_AL
        mov 0x21c(%r15), %edi           /* hdr.ramdisk_size */
        PUTHEX32_EDI
        mov $' ', %al
        PUTC_AL
        mov (%r12), %edi                /* the initrd's first 8 bytes, as two LE dwords */
        PUTHEX32_EDI
        mov 4(%r12), %edi
        PUTHEX32_EDI
        NEWLINE
        PUTS "loader:"
        movzbl 0x210(%r15), %edi        /* hdr.type_of_loader */
        PUTHEX32_EDI
        PUTS " flags:"
        movzbl 0x211(%r15), %edi        /* hdr.loadflags */
        PUTHEX32_EDI
        NEWLINE
        mov $0xc0000000, %eax
        movb $123, (%rax)               /* boot timer (Firecracker's magic), MMIO */
        EXIT 0x10
