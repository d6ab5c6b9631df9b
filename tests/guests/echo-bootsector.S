/* Echoes COM1 input back, polling the line status register; '.' powers off.
   Proves the UART accepts input from the console. */
.code16
.globl _start
_start:
    cli
    mov $'>', %al
    mov $0x3f8, %dx
    out %al, %dx
1:  mov $0x3fd, %dx          /* LSR */
    in %dx, %al
    test $1, %al             /* DR: a byte is waiting */
    jz 1b
    mov $0x3f8, %dx
    in %dx, %al
    cmp $'.', %al
    je 2f
    out %al, %dx
    jmp 1b
2:  mov $0x501, %dx
    xor %al, %al
    out %al, %dx
    hlt
.org 510
.byte 0x55, 0xaa
