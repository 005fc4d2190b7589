/* Real mode: print over COM1 polling LSR.THRE, round-trip the scratch register, exit 0x10. */
        .code16
        PUTS "hello from a real-mode guest\n"
        mov $0x3ff, %dx              /* SCR, the 16550 scratch register */
        mov $0xa5, %al
        out %al, %dx
        in %dx, %al
        PUTHEX_AL
        NEWLINE
        EXIT 0x10
