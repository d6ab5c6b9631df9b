/*
 * Ring 0: an unexpected exception. Print one error line on COM1 and
 * triple-fault, so that the VMM sees a crash rather than a hang.
 *
 * Compiled with -mgeneral-regs-only: it runs through KVM's instruction
 * emulator, which cannot do SSE in ring 0.
 */
#include "guest.h"

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned char u8;

struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rdi, rsi, rbp, rbx, rdx, rcx, rax;
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

extern volatile u32 print_lock;
extern void triple_fault(void) __attribute__((noreturn));

static inline void outb(u32 port, u8 v) { __asm__ volatile("outb %0, %w1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u32 port) { u8 v; __asm__ volatile("inb %w1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void putc0(char c)
{
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
        ;
    outb(COM1, (u8)c);
}

static void puts0(const char *s) { while (*s) putc0(*s++); }

static void putnum0(u64 v, u32 base)
{
    char buf[24];
    int n = 0;
    do {
        u32 d = (u32)(v % base);
        buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    while (n) putc0(buf[--n]);
}

void r0_fatal(struct frame *f) __attribute__((noreturn));
void r0_fatal(struct frame *f)
{
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    u64 id = *(volatile u64 *)(((u64)f & -(u64)PERCPU_SIZE) + PC_ID);
    /* take the console lock if we can; a wedged holder must not hide the error */
    for (int i = 0; i < 1000; i++) {
        u32 expected = 0;
        if (__atomic_compare_exchange_n(&print_lock, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            break;
    }
    puts0("vcpu=");
    putnum0(id, 10);
    puts0(" ERROR exception ");
    putnum0(f->vector, 10);
    puts0(" err=0x");
    putnum0(f->error, 16);
    puts0(" rip=0x");
    putnum0(f->rip, 16);
    puts0(" cs=0x");
    putnum0(f->cs, 16);
    puts0(" rflags=0x");
    putnum0(f->rflags, 16);
    puts0(" rsp=0x");
    putnum0(f->rsp, 16);
    puts0(" cr2=0x");
    putnum0(cr2, 16);
    putc0('\n');
    __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
    triple_fault();
}
