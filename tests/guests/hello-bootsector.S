.code16
.globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov $msg, %si
1:  lodsb
    test %al, %al
    jz 2f
    mov $0x3f8, %dx
    out %al, %dx
    jmp 1b
2:  mov $0x501, %dx
    mov $0, %al
    out %al, %dx
    hlt
msg: .asciz "hello from the boot sector\n"
.org 510
.byte 0x55, 0xaa
