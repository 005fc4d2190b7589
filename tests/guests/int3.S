/* Long mode: int3. On a software KVM (PVM) the emulator cannot run it: KVM_EXIT_INTERNAL_ERROR,
 * which kvmpy reports. On hardware there is no IDT, so it ends in a triple fault. */
        .code64
        PUTS "before int3\n"
        nop
        int3
        PUTS "after int3\n"
        EXIT 1
