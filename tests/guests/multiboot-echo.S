/* A multiboot (v1) ELF32 test kernel: prints the boot magic, its command line and the
   number of memory-map entries on COM1, then powers off through port 0x501.
   With "fault=hole" on the command line it jumps into the MMIO hole instead, which KVM
   cannot execute (an emulation failure on any host); with "fault=trip" it loads an
   empty interrupt table and divides by zero, so the CPU shuts down (triple fault). */
.set MB_MAGIC, 0x1BADB002
.set MB_FLAGS, 0x3
.section .multiboot, "a"
.align 4
.long MB_MAGIC
.long MB_FLAGS
.long -(MB_MAGIC + MB_FLAGS)

.text
.code32
.globl _start
_start:
    mov %eax, %esi              /* boot magic */
    mov %ebx, %edi              /* multiboot info */
    mov $stack_top, %esp
    mov $msg_magic, %ecx
    call puts
    mov %esi, %eax
    call puthex
    mov $msg_cmdline, %ecx
    call puts
    mov 16(%edi), %ecx          /* cmdline pointer */
    push %ecx
    call puts
    pop %ecx
    mov $msg_mmap, %ecx
    call puts
    mov 44(%edi), %eax          /* mmap_length / 24 */
    xor %edx, %edx
    mov $24, %ebx
    div %ebx
    call puthex
    mov $msg_nl, %ecx
    call puts
    /* fault=hole anywhere in the command line? look for "hole" */
    mov 16(%edi), %ecx
1:  movb (%ecx), %al
    test %al, %al
    jz poweroff
    cmpl $0x656c6f68, (%ecx)    /* "hole" */
    je jump_to_hole
    cmpl $0x70697274, (%ecx)    /* "trip" */
    je triple_fault
    inc %ecx
    jmp 1b
jump_to_hole:
    mov $0xd0000000, %eax
    jmp *%eax
triple_fault:
    lidt empty_idt
    xor %eax, %eax
    xor %ebx, %ebx
    div %ebx
poweroff:
    mov $0x501, %dx
    mov $0, %al
    out %al, %dx
2:  hlt
    jmp 2b

/* puts: print the NUL-terminated string at %ecx */
puts:
    push %eax
    push %edx
3:  movb (%ecx), %al
    test %al, %al
    jz 4f
    mov $0x3f8, %dx
    out %al, %dx
    inc %ecx
    jmp 3b
4:  pop %edx
    pop %eax
    ret

/* puthex: print %eax as 8 hex digits */
puthex:
    push %ecx
    push %edx
    push %ebx
    mov $8, %ecx
5:  rol $4, %eax
    mov %eax, %ebx
    and $0xf, %ebx
    movb hexdigits(%ebx), %bl
    push %eax
    mov %bl, %al
    mov $0x3f8, %dx
    out %al, %dx
    pop %eax
    dec %ecx
    jnz 5b
    pop %ebx
    pop %edx
    pop %ecx
    ret

.section .rodata
hexdigits: .ascii "0123456789abcdef"
msg_magic: .asciz "multiboot magic="
msg_cmdline: .asciz " cmdline="
msg_mmap: .asciz " mmap-entries="
msg_nl: .asciz "\n"
empty_idt: .word 0
    .long 0

.bss
.align 16
.space 4096
stack_top:
