/* Real mode string I/O: `rep outsb` to THR, then `rep insb` of 4 bytes from the scratch
 * register (one exit with count 4) echoed back with `rep outsb`. Prints "string io\nZZZZ\n". */
        .code16
        cld
        mov $msg, %si
        mov $(msg_end - msg), %cx
        mov $0x3f8, %dx
        rep outsb
        mov $0x3ff, %dx
        mov $'Z', %al
        out %al, %dx
        mov $buf, %di
        mov $4, %cx
        rep insb
        mov $buf, %si
        mov $4, %cx
        mov $0x3f8, %dx
        rep outsb
        NEWLINE
        EXIT 0x10
msg:    .ascii "string io\n"
msg_end:
buf:    .space 4
