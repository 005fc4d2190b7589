/* Real mode: read the CMOS clock in BCD (status B as reset: 24 h, BCD), then switch status B
 * to binary (DM, bit 2) and read it again. Prints "bcd ss mm hh DD MM YY CC" and
 * "bin ss mm hh" in hex. */
        .code16
.macro CMOS idx
        mov $\idx, %al
        out %al, $0x70
        in $0x71, %al
        PUTHEX_AL
        mov $' ', %al
        PUTC_AL
.endm
        PUTS "bcd "
        CMOS 0x00
        CMOS 0x02
        CMOS 0x04
        CMOS 0x07
        CMOS 0x08
        CMOS 0x09
        CMOS 0x32
        NEWLINE
        mov $0x0b, %al
        out %al, $0x70
        in $0x71, %al
        or $0x04, %al
        mov %al, %ah
        mov $0x0b, %al
        out %al, $0x70
        mov %ah, %al
        out %al, $0x71
        PUTS "bin "
        CMOS 0x00
        CMOS 0x02
        CMOS 0x04
        NEWLINE
        EXIT 0x10
