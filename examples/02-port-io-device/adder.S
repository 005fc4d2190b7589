/* Lesson 2, the guest half: drives the "adder" device that adder.py puts at ports 0x100-0x103.
 * The guest writes two operands and reads their sum; each access is a KVM_EXIT_IO that kvmpy
 * routes to the Python device with the offset into its window (0, 1, 2), never the port.
 */
        .code16
        .set ADDER, 0x100
        mov $ADDER, %dx
        mov $40, %al
        out %al, %dx            /* offset 0: operand A = 40 */
        inc %dx
        mov $2, %al
        out %al, %dx            /* offset 1: operand B = 2 */
        inc %dx
        in %dx, %al             /* offset 2: A + B, computed in Python */
        out %al, $0xf4          /* isa-debug-exit: the process exits with (42 << 1) | 1 = 85 */
