/* Long mode: ud2 with an empty IDT: #UD cannot be delivered -> #DF -> triple fault. */
        .code64
        PUTS "faulting\n"
        ud2
        EXIT 1
