/* Counts forever: prints "count=XXXXXXXX\n" (hex) for 0, 1, 2, ... on COM1, with a short
   busy loop between lines. Its output is a pure function of its progress, so a pause,
   snapshot or migration that loses memory, registers or UART bytes shows up in it.
   The counter lives in memory at 0x600; the line is built in registers. */
.code16
.globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7000, %sp
    movl $0, 0x600
line:
    mov $prefix, %si
1:  lodsb
    test %al, %al
    jz 2f
    call putc
    jmp 1b
2:  movl 0x600, %ebx
    mov $8, %cx
3:  roll $4, %ebx
    mov %bl, %al
    and $0xf, %al
    add $'0', %al
    cmp $'9', %al
    jbe 4f
    add $('a' - '9' - 1), %al
4:  call putc
    loop 3b
    mov $'\n', %al
    call putc
    incl 0x600
    mov $200, %cx
5:  loop 5b
    jmp line

putc:
    mov $0x3f8, %dx
    out %al, %dx
    ret

prefix: .asciz "count="
.org 510
.byte 0x55, 0xaa
