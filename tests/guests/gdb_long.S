/* For the gdb stub tests (tests/test_gdbstub.py), entered in 64-bit long mode at 0x100000.
 * Fixed offsets the tests rely on:
 *   +0x00 mov $0x1111, %rax   (7 bytes)
 *   +0x07 mov $0x2222, %rbx   (7 bytes)
 *   +0x0e mov $0x3333, %rcx   (7 bytes; "bp": the breakpoint target)
 *   +0x15 nop
 *   +0x16 the loop that waits for the byte at +0x200 ("flag") to become nonzero
 * then prints "gdb ok" and exits through isa-debug-exit with 0x10 (status 0x21). */
        .code64
start:  mov $0x1111, %rax
        mov $0x2222, %rbx
bp:     mov $0x3333, %rcx
        nop
wait:   cmpb $0, flag(%rip)
        je wait
        PUTS "gdb ok\n"
        EXIT 0x10
        hlt
        . = start + 0x200
flag:   .byte 0
