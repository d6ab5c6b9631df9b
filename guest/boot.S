/*
 * Ring-0 part of the vmipc built-in test guest.
 *
 * Everything here may run through KVM's instruction emulator (about 1 us per
 * instruction, integer instructions only), so it is kept short: no loops over
 * tables, everything that can be is a constant in the image (GDT, IDT, the
 * page tables for the first 4 GiB). The work runs in ring 3 (main.c).
 *
 * Path of every CPU: 32-bit protected mode (multiboot entry on the BSP, the
 * real-mode trampoline on an AP) -> common32 (PAE, CR3, EFER.LME, paging)
 * -> long64 (per-CPU stack and TSS, IDT, kvmclock) -> IRETQ to ring 3.
 */
#include "guest.h"

#define CR0_PE  (1 << 0)
#define CR0_MP  (1 << 1)
#define CR0_EM  (1 << 2)
#define CR0_TS  (1 << 3)
#define CR0_NE  (1 << 5)
#define CR0_WP  (1 << 16)
#define CR0_NW  (1 << 29)
#define CR0_CD  (1 << 30)
#define CR0_PG  (1 << 31)
#define CR4_PAE        (1 << 5)
#define CR4_OSFXSR     (1 << 9)
#define CR4_OSXMMEXCPT (1 << 10)

#define MB_MAGIC  0x1BADB002
#define MB_FLAGS  0x00000003        /* page-align modules, want mem_* and mmap */

/* ------------------------------------------------------------------ */
        .section .multiboot, "a"
        .balign 4
multiboot_header:
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

/* ------------------------------------------------------------------ */
        .section .boot, "ax"
        .code32
        .globl _start
_start:                                 /* EAX = 0x2BADB002, EBX = multiboot info */
        cli
        cmpl    $0x2BADB002, %eax
        jne     1f
        movl    %ebx, mb_info
        lgdt    gdt_ptr
        ljmp    $SEL_CODE32, $common32
1:      hlt                             /* not booted by a multiboot loader */
        jmp     1b

        .globl common32
common32:                               /* flat 32-bit ring 0, paging off; APs come here too */
        movl    $SEL_KDATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
        movl    %eax, %cr4
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    $MSR_EFER, %ecx
        rdmsr
        orl     $0x100, %eax            /* LME */
        wrmsr
        movl    %cr0, %eax
        andl    $~(CR0_EM | CR0_TS | CR0_NW | CR0_CD), %eax
        orl     $(CR0_PE | CR0_MP | CR0_NE | CR0_WP | CR0_PG), %eax
        movl    %eax, %cr0
        ljmp    $SEL_KCODE, $long64

        .code64
long64:
        movl    $SEL_KDATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    %eax, %fs
        movl    %eax, %gs
        movl    $LAPIC_BASE, %esi
        movl    LAPIC_ID(%rsi), %edi
        shrl    $24, %edi               /* EDI = LAPIC ID = vCPU index */
        cmpl    $MAXCPU, %edi
        jae     halt_forever
        movl    %edi, %ebx
        shll    $13, %ebx               /* * PERCPU_SIZE */
        addq    $percpu, %rbx           /* RBX = this CPU's block */
        leaq    PERCPU_SIZE(%rbx), %rsp
        movq    %rdi, PC_ID(%rbx)

        /* TSS: RSP0 = top of the per-CPU block. IOPL=3 is not enough on every
           hypervisor (PVM keeps the real IOPL at 0), so the TSS also carries an
           I/O bitmap, all zero (zeroed bss): ring 3 may use ports 0..0x80f. */
        movq    %rsp, PC_TSS+4(%rbx)
        movw    $104, PC_TSS+102(%rbx)
        /* its descriptor: base = RBX + PC_TSS (below 4 GiB), limit TSS_LIMIT, type 0x89 */
        leaq    PC_TSS(%rbx), %rax
        movq    %rax, %rdx
        shlq    $16, %rdx               /* base[23:0] -> bits 16..39 */
        movq    %rax, %rcx
        shrq    $24, %rcx
        shlq    $56, %rcx               /* base[31:24] -> bits 56..63 */
        orq     %rcx, %rdx
        movabsq $(0x0000890000000000 | TSS_LIMIT), %rcx
        orq     %rcx, %rdx
        movl    %edi, %eax
        shll    $4, %eax
        leaq    gdt+SEL_TSS0(%rax), %rcx
        movq    %rdx, (%rcx)
        movq    $0, 8(%rcx)
        addl    $SEL_TSS0, %eax
        ltr     %ax
        lidt    idt_ptr

        /* No legacy interrupts: mask both 8259s and LINT0 (ExtINT from a BIOS) */
        movb    $0xff, %al
        outb    %al, $0x21
        outb    %al, $0xa1
        movl    $0x10000, LAPIC_LVT_LINT0(%rsi)

        /* kvmclock: CPUID 0x40000000 = "KVMKVMKVM\0\0\0", 0x40000001 EAX bit 3 */
        movl    $0x40000000, %eax
        cpuid
        cmpl    $0x4b4d564b, %ebx
        jne     2f
        cmpl    $0x564b4d56, %ecx
        jne     2f
        cmpl    $0x0000004d, %edx
        jne     2f
        cmpl    $0x40000001, %eax
        jb      2f
        movl    $0x40000001, %eax
        cpuid
        testb   $8, %al
        jz      2f
        movl    %edi, %eax
        shll    $13, %eax
        leaq    percpu+PC_PVTI(%rax), %rax
        orl     $1, %eax                /* enable */
        xorl    %edx, %edx
        movl    $MSR_KVM_SYSTEM_TIME_NEW, %ecx
        wrmsr
        movl    %edi, %eax
        shll    $13, %eax
        movq    $1, percpu+PC_KVMCLOCK(%rax)
2:
        /* IRETQ to ring 3: r3_entry(id) on this CPU's user stack, IF=1, IOPL=3 */
        movl    %edi, %eax
        shll    $14, %eax               /* * USTACK_SIZE */
        leaq    ustack+USTACK_SIZE-8(%rax), %rax
        pushq   $(SEL_UDATA | 3)
        pushq   %rax
        pushq   $0x3202
        pushq   $(SEL_UCODE | 3)
        pushq   $r3_entry
        iretq

halt_forever:
        cli
        hlt
        jmp     halt_forever

/* ------------------------------------------------------------------ */
/* Interrupt entry points, at fixed addresses so that the IDT is a constant. */
        .section .isr, "ax"
        .code64
        .set    v, 0
        .rept   32
        .org    v * ISR_SLOT
        .if     v == 13
        jmp     isr_gp
        .elseif (v == 8) || (v == 10) || (v == 11) || (v == 12) || (v == 14) || (v == 17) || (v == 21) || (v == 29) || (v == 30)
        pushq   $v                      /* the CPU pushed an error code */
        jmp     isr_fatal
        .else
        pushq   $0
        pushq   $v
        jmp     isr_fatal
        .endif
        .set    v, v + 1
        .endr

        .org    32 * ISR_SLOT           /* vector 0x20: LAPIC timer */
isr_timer:
        pushq   %rax
        movq    %rsp, %rax
        andq    $-PERCPU_SIZE, %rax
        incq    PC_TICKS(%rax)
        movl    $(LAPIC_BASE + LAPIC_EOI), %eax
        movl    $0, (%rax)
        popq    %rax
        iretq

        .org    33 * ISR_SLOT           /* vector 0xff: LAPIC spurious, no EOI */
isr_spurious:
        iretq

/* #GP. A deliberate HLT in ring 3 faults here: skip it, sleep until the next
   interrupt, and return. Anything else is fatal. */
isr_gp:                                 /* [rsp] err, rip, cs, rflags, rsp, ss */
        testb   $3, 16(%rsp)
        jz      1f
        pushq   %rax
        movq    16(%rsp), %rax
        cmpb    $0xf4, (%rax)
        popq    %rax
        jne     1f
        incq    8(%rsp)
        addq    $8, %rsp
        sti
        hlt
        iretq
1:      pushq   $13
        jmp     isr_fatal

isr_fatal:                              /* [rsp] vector, err, rip, cs, rflags, rsp, ss */
        pushq   %rax
        pushq   %rcx
        pushq   %rdx
        pushq   %rbx
        pushq   %rbp
        pushq   %rsi
        pushq   %rdi
        pushq   %r8
        pushq   %r9
        pushq   %r10
        pushq   %r11
        pushq   %r12
        pushq   %r13
        pushq   %r14
        pushq   %r15
        movq    %rsp, %rdi
        andq    $-16, %rsp
        call    r0_fatal                /* prints a line, then triple-faults */
        jmp     halt_forever

        .globl triple_fault
triple_fault:
        lidt    null_idt_ptr
        ud2
        jmp     halt_forever

/* ------------------------------------------------------------------ */
/* AP trampoline, copied to TRAMPOLINE (below 1 MiB) by the BSP. Real mode, CS = TRAMPOLINE >> 4. */
        .section .rodata, "a"
        .code16
        .globl tramp_start, tramp_end
tramp_start:
        cli
        lgdtl   %cs:(tramp_gdt_ptr - tramp_start)
        movl    %cr0, %eax
        orl     $1, %eax
        movl    %eax, %cr0
        ljmpl   $SEL_CODE32, $common32
        .balign 4
tramp_gdt_ptr:
        .word   gdt_end - gdt - 1
        .long   gdt
tramp_end:
        .code64

/* ------------------------------------------------------------------ */
        .section .data, "aw"
        .globl mb_info
        .balign 8
mb_info:
        .quad   0

        .balign 16
gdt:
        .quad   0
        .quad   0x00AF9A000000FFFF      /* 0x08 code 64, DPL 0 */
        .quad   0x00CF92000000FFFF      /* 0x10 data, DPL 0 */
        .quad   0x00CF9A000000FFFF      /* 0x18 code 32, DPL 0 */
        .quad   0x00CFFA000000FFFF      /* 0x20 code 32, DPL 3 (unused) */
        .quad   0x00AFFA000000FFFF      /* 0x28 code 64, DPL 3 */
        .quad   0x00CFF2000000FFFF      /* 0x30 data, DPL 3 */
        .fill   2 * MAXCPU, 8, 0        /* 0x30: one TSS descriptor per CPU */
gdt_end:

        .balign 8
        .word   0
gdt_ptr:
        .word   gdt_end - gdt - 1
        .quad   gdt
        .word   0
idt_ptr:
        .word   256 * 16 - 1
        .quad   idt
        .word   0
null_idt_ptr:
        .word   0
        .quad   0

/* IDT: vectors 0..31 and 0x20 -> slots 0..32, 0xff -> slot 33; the rest not present. */
        .balign 16
idt:
        .set    v, 0
        .rept   256
        .if     v <= 32
        .set    off, ISR_BASE + v * ISR_SLOT
        .elseif v == 255
        .set    off, ISR_BASE + 33 * ISR_SLOT
        .else
        .set    off, 0
        .endif
        .if     off
        .word   off & 0xffff, SEL_KCODE
        .byte   0, 0x8e                 /* present, DPL 0, 64-bit interrupt gate */
        .word   (off >> 16) & 0xffff
        .long   0, 0
        .else
        .quad   0, 0
        .endif
        .set    v, v + 1
        .endr

/* Identity paging of the first 4 GiB with 2 MiB pages, user-accessible; the
   LAPIC's page is uncached. main.c maps RAM above 4 GiB (PDPT entries 4..). */
        .balign 4096
        .globl pml4, pdpt
pml4:
        .quad   pdpt + 0x7
        .fill   511, 8, 0
pdpt:
        .quad   pd + 0x0000 + 0x7
        .quad   pd + 0x1000 + 0x7
        .quad   pd + 0x2000 + 0x7
        .quad   pd + 0x3000 + 0x7
        .fill   508, 8, 0
pd:
        .set    i, 0
        .rept   2048
        .if     i == (LAPIC_BASE >> 21)
        .quad   (i << 21) | 0x9f        /* P RW US PWT PCD PS */
        .else
        .quad   (i << 21) | 0x87        /* P RW US PS */
        .endif
        .set    i, i + 1
        .endr
