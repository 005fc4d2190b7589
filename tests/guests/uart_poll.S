/* Real mode: poll LSR.DR (bit 0) and echo each received byte until 'q'. */
        .code16
1:      mov $0x3fd, %dx
        in %dx, %al
        test $0x01, %al
        jz 1b
        mov $0x3f8, %dx
        in %dx, %al
        mov %al, %ah
        PUTC_AL
        cmp $'q', %ah
        jne 1b
        EXIT 0x10
