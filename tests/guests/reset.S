/* Real mode: pulse the reset line through the i8042 (command 0xfe to port 0x64). */
        .code16
        PUTS "resetting\n"
        mov $0xfe, %al
        out %al, $0x64
        PUTS "still here\n"
        EXIT 1
