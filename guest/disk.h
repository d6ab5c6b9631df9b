/* The built-in guest's disk workload (virtio_blk.c), called from main.c. */
#ifndef DISK_H
#define DISK_H

#define DISK_MMIO       0xd0000000ul    /* virtio-mmio registers of the block device (vmipc) */
#define DISK_MMIO_STRIDE 0x200ul        /* between transports probed with `mmios=N` (QEMU microvm) */
#define DISK_MAX_MMIOS  64
#define DISK_MAX_DEPTH  16              /* requests in flight at most */
#define DISK_MAX_BLOCKS 65536           /* 4 KiB blocks: 256 MiB */

struct disk_options {
    unsigned long mode;                 /* 0 off, 1 the workload, 2 bad requests first, 3 bench */
    unsigned long depth;                /* requests kept in flight, 1..DISK_MAX_DEPTH */
    unsigned long blocks;               /* 4 KiB blocks written per pass (bench: the span) */
    unsigned long mmio;                 /* where the first transport probed is */
    unsigned long mmios;                /* transports probed, DISK_MMIO_STRIDE apart */
    unsigned long benchms;              /* bench: guest milliseconds measured per test */
    unsigned long seqbs;                /* bench: bytes per sequential request */
};

extern struct disk_options disk_opt;

/* Runs `passes` passes (0: forever) of the disk workload on this vCPU, printing one line
   per pass whose number is a multiple of `every` through `print` (a whole line, without
   its newline). Returns after the last pass; on a fatal error calls `fail`. */
void disk_workload(unsigned long seed, unsigned long passes, unsigned long every,
                   void (*print)(const char *line), void (*fail)(const char *line));

/* mode 3: times each I/O test for `benchms` ms of guest time (`now`: ns) with `depth`
   requests in flight, their buffers in `buf` (`len` bytes: vCPU 0's unused working set),
   and prints one line per test. */
void disk_bench(unsigned long (*now)(void), unsigned char *buf, unsigned long len,
                void (*print)(const char *line), void (*fail)(const char *line));

#endif
