/* For the gdb stub's real-mode test (tests/test_gdbstub.py), entered in real mode at 0x7c00
 * (CS = 0, so gdb's addresses, which are IP, are also linear).
 *   +0x00 mov $0x1111, %ax    (3 bytes)
 *   +0x03 mov $0x2222, %bx    (3 bytes)
 *   +0x06 mov $0x3333, %cx    (3 bytes; the breakpoint target)
 *   +0x09 nop
 *   +0x0a the loop that waits for the byte at +0x100 ("flag")
 * then prints "real ok" and exits through isa-debug-exit with 0x12 (status 0x25). */
        .code16
start:  mov $0x1111, %ax
        mov $0x2222, %bx
bp:     mov $0x3333, %cx
        nop
wait:   cmpb $0, flag
        je wait
        PUTS "real ok\n"
        EXIT 0x12
        hlt
        . = start + 0x100
flag:   .byte 0
