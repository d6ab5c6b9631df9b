/* The built-in guest's disk workload (virtio_blk.c), called from main.c. */
#ifndef DISK_H
#define DISK_H

#define DISK_MMIO       0xd0000000ul    /* virtio-mmio registers of the block device */
#define DISK_MAX_DEPTH  16              /* requests in flight at most */
#define DISK_MAX_BLOCKS 65536           /* 4 KiB blocks: 256 MiB */

struct disk_options {
    unsigned long mode;                 /* 0 off, 1 the workload, 2 bad requests first */
    unsigned long depth;                /* requests kept in flight, 1..DISK_MAX_DEPTH */
    unsigned long blocks;               /* 4 KiB blocks written per pass, 1..DISK_MAX_BLOCKS */
};

extern struct disk_options disk_opt;

/* Runs `passes` passes (0: forever) of the disk workload on this vCPU, printing one line
   per pass whose number is a multiple of `every` through `print` (a whole line, without
   its newline). Returns after the last pass; on a fatal error calls `fail`. */
void disk_workload(unsigned long seed, unsigned long passes, unsigned long every,
                   void (*print)(const char *line), void (*fail)(const char *line));

#endif
