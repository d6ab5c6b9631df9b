/* Constants shared by the ring-0 assembly (boot.S) and the C code. */
#ifndef GUEST_H
#define GUEST_H

#define MAXCPU          64          /* LAPIC IDs 0..63 */
#define LOAD_ADDR       0x100000    /* the image is linked and loaded at 1 MiB */
#define ISR_BASE        0x101000    /* interrupt stubs: vector v at ISR_BASE + 32*v */
#define ISR_SLOT        32
#define TRAMPOLINE      0x8000      /* AP real-mode entry; SIPI vector 0x08 */

/* GDT selectors */
#define SEL_KCODE       0x08        /* 64-bit ring 0 code */
#define SEL_KDATA       0x10        /* flat data, ring 0 */
#define SEL_CODE32      0x18        /* flat 32-bit ring 0 code */
#define SEL_UCODE32     0x20        /* 32-bit ring 3 code (unused; SYSEXIT layout) */
#define SEL_UCODE       0x28        /* 64-bit ring 3 code = SYSENTER_CS + 32 (use with RPL 3) */
#define SEL_UDATA       0x30        /* flat data, ring 3 = SYSENTER_CS + 40 (use with RPL 3) */
#define SEL_TSS0        0x38        /* 16-byte TSS descriptor of CPU i at SEL_TSS0 + 16*i */

/* Per-CPU block: PERCPU_SIZE bytes, aligned to PERCPU_SIZE. The ring-0 stack
   (TSS.RSP0) grows down from its end, so ring 0 finds the block as RSP & -PERCPU_SIZE. */
#define PERCPU_SIZE     0x2000
#define PC_TICKS        0x00        /* u64, incremented by the timer interrupt */
#define PC_ID           0x08        /* u64, LAPIC ID = vCPU index */
#define PC_KVMCLOCK     0x10        /* u64, 1 if ring 0 registered the kvmclock page below */
#define PC_PVTI         0x40        /* struct pvclock_vcpu_time_info (32 bytes) */
#define PC_TSS          0x80        /* 64-bit TSS (104 bytes), then its I/O bitmap */
#define IOBITMAP_BYTES  258         /* all zero: ring 3 may use ports 0..0x80f */
#define TSS_LIMIT       (104 + IOBITMAP_BYTES - 1)

#define USTACK_SIZE     0x4000      /* ring-3 stack per CPU */

#define LAPIC_BASE      0xfee00000
#define LAPIC_ID        0x020
#define LAPIC_EOI       0x0b0
#define LAPIC_TPR       0x080
#define LAPIC_SVR       0x0f0
#define LAPIC_ICR_LO    0x300
#define LAPIC_ICR_HI    0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_ERR   0x370
#define LAPIC_TIMER_ICR 0x380
#define LAPIC_TIMER_DCR 0x3e0

#define TIMER_VECTOR    0x20
#define SPURIOUS_VECTOR 0xff

#define MSR_EFER        0xc0000080
#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01

#define COM1            0x3f8
#define EXIT_PORT       0x501

#endif
