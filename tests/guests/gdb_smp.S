/* For the gdb stub's multi-vCPU tests (tests/test_gdbstub.py), entered in 64-bit long mode at
 * 0x100000 by two vCPUs; the test's setup puts the vCPU id in %rsi.
 *   +0x10 vCPU 0: waits for the byte at +0x200 ("flag"), then prints "smp ok" and exits 0x11
 *   +0x80 vCPU 1: counts forever in the quadword at +0x208 ("counter") */
        .code64
start:  test %rsi, %rsi
        jnz ap
        jmp bsp
        . = start + 0x10
bsp:    cmpb $0, flag(%rip)
        je bsp
        PUTS "smp ok\n"
        EXIT 0x11
        hlt
        . = start + 0x80
ap:     incq counter(%rip)
        jmp ap
        . = start + 0x200
flag:   .byte 0
        . = start + 0x208
counter: .quad 0
