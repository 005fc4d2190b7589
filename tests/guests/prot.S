/* Entered in flat 32-bit protected mode by `kvmpy run --mode protected`: print CR0 and CS. */
        .code32
        PUTS "protected mode\n"
        mov %cr0, %edi
        PUTHEX32_EDI
        NEWLINE
        mov %cs, %edi
        PUTHEX32_EDI
        NEWLINE
        mov %ds, %edi
        PUTHEX32_EDI
        NEWLINE
        EXIT 0x10
