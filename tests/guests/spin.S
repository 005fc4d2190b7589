/* Spins forever: only --timeout ends it. */
        .code16
        PUTS "spinning\n"
1:      jmp 1b
