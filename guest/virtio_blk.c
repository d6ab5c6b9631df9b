/*
 * The built-in guest's virtio-blk driver and disk workload (ring 3, polling).
 *
 * A virtio 1.x driver over virtio-mmio with one split virtqueue of QSIZE entries; every
 * request uses three descriptors (header, data, status) of its slot s: 3s, 3s+1, 3s+2.
 * The driver polls the used ring (it sets VIRTQ_AVAIL_F_NO_INTERRUPT: the guest takes no
 * interrupt but the LAPIC timer's). The block layout and the lines are in README.md; the
 * Python twin is vmipc.guest.disk_lines / vmipc.guest.check_disk_image.
 */
#include "disk.h"

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct disk_options disk_opt = {0, 4, 64, DISK_MMIO, 1, 1000, 65536};

static u64 base;                        /* the registers of the device found */

#define QSIZE   64
#define BLOCK   4096ul
#define SECTORS_PER_BLOCK (BLOCK / 512)
#define MAGIC   0x4b4c424350494d56ul    /* "VMIPCBLK" */
#define DISK_KEY 0x6b736964ul           /* "disk" */

/* virtio-mmio registers */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC 0x080
#define R_QUEUE_AVAIL 0x090
#define R_QUEUE_USED 0x0a0
#define R_CAPACITY 0x100

#define ST_ACK 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8
#define ST_NEEDS_RESET 64

#define F_NEXT 1
#define F_WRITE 2

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4

struct desc { u64 addr; u32 len; u16 flags, next; };
struct avail { u16 flags, idx, ring[QSIZE], used_event; };
struct used_elem { u32 id, len; };
struct used { u16 flags, idx; struct used_elem ring[QSIZE]; u16 avail_event; };
struct header { u32 type, reserved; u64 sector; };

static struct desc dtab[QSIZE] __attribute__((aligned(4096)));
static struct avail avail_ring __attribute__((aligned(4096)));
static struct used used_ring __attribute__((aligned(4096)));
static u8 data[DISK_MAX_DEPTH][BLOCK] __attribute__((aligned(4096)));
static struct header hdr[DISK_MAX_DEPTH];
static volatile u8 status_byte[DISK_MAX_DEPTH];
static u64 slot_block[DISK_MAX_DEPTH];
static u16 avail_idx, used_seen;
static u32 free_slots[DISK_MAX_DEPTH], nfree;

static void (*say)(const char *);
static void (*die)(const char *);

static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

static inline u32 rd(u32 reg)
{
    u32 v;
    __asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(base + reg) : "memory");
    return v;
}

static inline void wr(u32 reg, u32 v)
{
    __asm__ volatile("movl %0, (%1)" ::"r"(v), "r"(base + reg) : "memory");
}

static inline u64 mix64(u64 z)
{
    z += 0x9e3779b97f4a7c15ul;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ul;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebul;
    return z ^ (z >> 31);
}

static u32 crc_table[256];

static u32 crc32(const u8 *p, u64 n)           /* zlib's CRC-32 */
{
    u32 c = 0xffffffffu;
    for (u64 i = 0; i < n; i++)
        c = crc_table[(c ^ p[i]) & 0xff] ^ (c >> 8);
    return ~c;
}

/* ---------------------------------------------------------------- lines */

struct text { char b[160]; u32 n; };

static void t_str(struct text *t, const char *s) { while (*s && t->n < sizeof t->b - 1) t->b[t->n++] = *s++; }
static void t_dec(struct text *t, u64 v)
{
    char d[24]; int n = 0;
    do { d[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n && t->n < sizeof t->b - 1) t->b[t->n++] = d[--n];
}
static void t_hex16(struct text *t, u64 v)
{
    for (int s = 60; s >= 0 && t->n < sizeof t->b - 1; s -= 4)
        t->b[t->n++] = "0123456789abcdef"[(v >> s) & 15];
}
static const char *t_end(struct text *t) { t->b[t->n] = 0; return t->b; }

/* ---------------------------------------------------------------- the device */

/* The first of `mmios` transports from `mmio` that is a virtio 1.x block device. */
static int probe(void)
{
    for (u64 i = 0; i < disk_opt.mmios; i++) {
        base = disk_opt.mmio + i * DISK_MMIO_STRIDE;
        if (rd(R_MAGIC) == 0x74726976 && rd(R_VERSION) == 2 && rd(R_DEVICE_ID) == 2)
            return 1;
    }
    base = disk_opt.mmio;
    return 0;
}

static int device_init(void)
{
    if (rd(R_MAGIC) != 0x74726976 || rd(R_VERSION) != 2 || rd(R_DEVICE_ID) != 2)
        return 0;
    wr(R_STATUS, 0);
    wr(R_STATUS, ST_ACK | ST_DRIVER);
    wr(R_DEVICE_FEATURES_SEL, 1);
    u32 hi = rd(R_DEVICE_FEATURES);
    wr(R_DEVICE_FEATURES_SEL, 0);
    u32 lo = rd(R_DEVICE_FEATURES);
    if (!(hi & 1))                      /* VIRTIO_F_VERSION_1 */
        return 0;
    wr(R_DRIVER_FEATURES_SEL, 1);
    wr(R_DRIVER_FEATURES, 1);
    wr(R_DRIVER_FEATURES_SEL, 0);
    wr(R_DRIVER_FEATURES, lo & (1u << 9));      /* VIRTIO_BLK_F_FLUSH if offered */
    wr(R_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK);
    if (!(rd(R_STATUS) & ST_FEATURES_OK))
        return 0;
    wr(R_QUEUE_SEL, 0);
    if (rd(R_QUEUE_NUM_MAX) < QSIZE)
        return 0;
    for (u64 i = 0; i < sizeof avail_ring; i++) ((volatile u8 *)&avail_ring)[i] = 0;
    for (u64 i = 0; i < sizeof used_ring; i++) ((volatile u8 *)&used_ring)[i] = 0;
    avail_ring.flags = 1;               /* VIRTQ_AVAIL_F_NO_INTERRUPT: we poll */
    avail_idx = used_seen = 0;
    wr(R_QUEUE_NUM, QSIZE);
    wr(R_QUEUE_DESC, (u32)(u64)dtab);
    wr(R_QUEUE_DESC + 4, 0);
    wr(R_QUEUE_AVAIL, (u32)(u64)&avail_ring);
    wr(R_QUEUE_AVAIL + 4, 0);
    wr(R_QUEUE_USED, (u32)(u64)&used_ring);
    wr(R_QUEUE_USED + 4, 0);
    wr(R_QUEUE_READY, 1);
    wr(R_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    nfree = 0;
    for (u32 s = 0; s < disk_opt.depth; s++)
        free_slots[nfree++] = s;
    return 1;
}

/* Queue request `slot`: header, an optional data buffer (`len` bytes at `buf`, written
   by the device if `into`), status. Not yet notified. */
static void submit(u32 slot, u32 type, u64 sector, u64 buf, u32 len, int into)
{
    u32 d = 3 * slot;
    hdr[slot].type = type;
    hdr[slot].reserved = 0;
    hdr[slot].sector = sector;
    status_byte[slot] = 0xff;
    dtab[d].addr = (u64)&hdr[slot];
    dtab[d].len = sizeof hdr[slot];
    dtab[d].flags = F_NEXT;
    dtab[d].next = (u16)(len ? d + 1 : d + 2);
    if (len) {
        dtab[d + 1].addr = buf;
        dtab[d + 1].len = len;
        dtab[d + 1].flags = F_NEXT | (into ? F_WRITE : 0);
        dtab[d + 1].next = (u16)(d + 2);
    }
    dtab[d + 2].addr = (u64)&status_byte[slot];
    dtab[d + 2].len = 1;
    dtab[d + 2].flags = F_WRITE;
    dtab[d + 2].next = 0;
    avail_ring.ring[avail_idx % QSIZE] = (u16)d;
    barrier();
    avail_idx++;
    ((volatile struct avail *)&avail_ring)->idx = avail_idx;
}

static void notify(void) { barrier(); wr(R_QUEUE_NOTIFY, 0); }

/* The slot of the next completed request; 0xffffffff if the device needs a reset. The
   used ring is polled in memory; the status register (an exit to the VMM) only every
   1024 spins, so that polling does not load the VMM it waits for. */
static u32 reap(void)
{
    volatile struct used *u = &used_ring;
    for (u32 spins = 0; u->idx == used_seen; spins++) {
        if (!(spins & 1023) && rd(R_STATUS) & ST_NEEDS_RESET)
            return 0xffffffffu;
        cpu_relax();
    }
    barrier();
    u32 id = u->ring[used_seen % QSIZE].id;
    used_seen++;
    return id / 3;
}

/* ---------------------------------------------------------------- blocks */

static u64 block_key(u64 seed, u64 pass, u64 block)
{
    return mix64(mix64(mix64(seed ^ DISK_KEY) ^ pass) ^ block);
}

static void stamp(u8 *p, u64 seed, u64 pass, u64 block)
{
    u64 *w = (u64 *)p;
    const u64 h = block_key(seed, pass, block);
    w[0] = MAGIC;
    w[1] = pass;
    w[2] = block;
    w[3] = seed;
    for (u64 j = 0; j < 507; j++)
        w[4 + j] = mix64(h ^ j);
    *(u32 *)(p + 4088) = 0;
    *(u32 *)(p + 4092) = crc32(p, 4092);
}

/* 0 if the block read back is the one `stamp` wrote, else what is wrong. */
static const char *check(const u8 *p, u64 seed, u64 pass, u64 block)
{
    const u64 *w = (const u64 *)p;
    if (w[0] != MAGIC) return "bad magic";
    if (w[2] != block) return "wrong block number";
    if (w[1] != pass) return "wrong sequence number";
    if (w[3] != seed) return "wrong seed";
    if (*(const u32 *)(p + 4092) != crc32(p, 4092)) return "bad checksum";
    const u64 h = block_key(seed, pass, block);
    for (u64 j = 0; j < 507; j++)
        if (w[4 + j] != mix64(h ^ j)) return "wrong content";
    return 0;
}

/* ---------------------------------------------------------------- bad requests */

static void bad_requests(void)
{
    static const struct { const char *name; u32 type; u64 sector; u64 buf; u32 len; } bad[] = {
        {"outside-ram", T_IN, 0, 0xf0000000ul, 512},
        {"length", T_IN, 0, 0, 100},
        {"past-end", T_IN, ~0ul, 0, 512},
        {"type", 99, 0, 0, 512},
    };
    struct text t;
    const u64 cap = (u64)rd(R_CAPACITY) | ((u64)rd(R_CAPACITY + 4) << 32);
    for (u32 i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        u32 slot = free_slots[--nfree];
        u64 sector = bad[i].sector == ~0ul ? cap : bad[i].sector;
        submit(slot, bad[i].type, sector, bad[i].buf ? bad[i].buf : (u64)data[slot], bad[i].len, 1);
        notify();
        u32 done = reap();
        t.n = 0;
        t_str(&t, "vcpu=0 disk bad="); t_str(&t, bad[i].name); t_str(&t, " status=");
        if (done == 0xffffffffu) {
            t_str(&t, "reset");
            say(t_end(&t));
            if (!device_init()) die("vcpu=0 ERROR disk: no virtio block device after a reset");
            continue;
        }
        t_dec(&t, status_byte[done]);
        say(t_end(&t));
        free_slots[nfree++] = done;
    }
    /* a descriptor chain that loops: the device must stop and ask for a reset */
    u32 d = 0;
    hdr[0].type = T_IN; hdr[0].reserved = 0; hdr[0].sector = 0;
    dtab[d].addr = (u64)&hdr[0]; dtab[d].len = 16; dtab[d].flags = F_NEXT; dtab[d].next = 1;
    dtab[1].addr = (u64)data[0]; dtab[1].len = 512; dtab[1].flags = F_NEXT | F_WRITE; dtab[1].next = 0;
    avail_ring.ring[avail_idx % QSIZE] = 0;
    barrier();
    avail_idx++;
    ((volatile struct avail *)&avail_ring)->idx = avail_idx;
    notify();
    t.n = 0;
    t_str(&t, "vcpu=0 disk bad=loop status=");
    if (reap() == 0xffffffffu) {
        t_str(&t, "reset");
        if (!device_init()) die("vcpu=0 ERROR disk: no virtio block device after a reset");
    } else {
        t_str(&t, "completed");
    }
    say(t_end(&t));
}

/* ---------------------------------------------------------------- the workload */

static void need(u32 slot, const char *what, u64 pass, u64 block)
{
    if (slot != 0xffffffffu && status_byte[slot] == 0)
        return;
    struct text t;
    t.n = 0;
    t_str(&t, "vcpu=0 ERROR disk pass="); t_dec(&t, pass); t_str(&t, " block="); t_dec(&t, block);
    t_str(&t, " "); t_str(&t, what);
    if (slot == 0xffffffffu) t_str(&t, ": device needs reset");
    else { t_str(&t, " status="); t_dec(&t, status_byte[slot]); }
    die(t_end(&t));
}

void disk_workload(u64 seed, u64 passes, u64 every, void (*print)(const char *), void (*fail)(const char *))
{
    say = print;
    die = fail;
    for (u32 i = 0; i < 256; i++) {
        u32 c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xedb88320u & -(c & 1));
        crc_table[i] = c;
    }
    probe();
    if (!device_init())
        fail("vcpu=0 ERROR disk: no virtio block device at 0xd0000000");
    const u64 blocks = disk_opt.blocks;
    const u64 cap = (u64)rd(R_CAPACITY) | ((u64)rd(R_CAPACITY + 4) << 32);
    if (cap < blocks * SECTORS_PER_BLOCK) {
        struct text t;
        t.n = 0;
        t_str(&t, "vcpu=0 ERROR disk: "); t_dec(&t, cap); t_str(&t, " sectors, "); t_dec(&t, blocks);
        t_str(&t, " blocks need "); t_dec(&t, blocks * SECTORS_PER_BLOCK);
        fail(t_end(&t));
    }
    if (disk_opt.mode == 2)
        bad_requests();

    for (u64 pass = 1; passes == 0 || pass <= passes; pass++) {
        /* write every block, `depth` requests in flight */
        u64 next = 0, done = 0;
        while (done < blocks) {
            while (nfree && next < blocks) {
                u32 slot = free_slots[--nfree];
                stamp(data[slot], seed, pass, next);
                slot_block[slot] = next;
                submit(slot, T_OUT, next * SECTORS_PER_BLOCK, (u64)data[slot], BLOCK, 0);
                next++;
            }
            notify();
            u32 slot = reap();
            need(slot, "write", pass, slot == 0xffffffffu ? done : slot_block[slot]);
            free_slots[nfree++] = slot;
            done++;
        }
        {
            u32 slot = free_slots[--nfree];
            submit(slot, T_FLUSH, 0, 0, 0, 0);
            notify();
            u32 got = reap();
            need(got, "flush", pass, 0);
            free_slots[nfree++] = got;
        }
        /* read every block back and check it */
        u64 sum = mix64(seed ^ pass);
        next = done = 0;
        while (done < blocks) {
            while (nfree && next < blocks) {
                u32 slot = free_slots[--nfree];
                slot_block[slot] = next;
                submit(slot, T_IN, next * SECTORS_PER_BLOCK, (u64)data[slot], BLOCK, 1);
                next++;
            }
            notify();
            u32 slot = reap();
            need(slot, "read", pass, slot == 0xffffffffu ? done : slot_block[slot]);
            const u64 block = slot_block[slot];
            const char *wrong = check(data[slot], seed, pass, block);
            if (wrong) {
                struct text t;
                t.n = 0;
                t_str(&t, "vcpu=0 ERROR disk pass="); t_dec(&t, pass); t_str(&t, " block=");
                t_dec(&t, block); t_str(&t, " "); t_str(&t, wrong);
                print(t_end(&t));
            }
            sum += mix64((block << 32) | *(const u32 *)(data[slot] + 4092));
            free_slots[nfree++] = slot;
            done++;
        }
        if (every && pass % every == 0) {
            struct text t;
            t.n = 0;
            t_str(&t, "vcpu=0 disk pass="); t_dec(&t, pass); t_str(&t, " sum="); t_hex16(&t, sum);
            print(t_end(&t));
        }
    }
}

/* ---------------------------------------------------------------- the I/O benchmark */

/* One test: `type` requests of `bs` bytes over the first `blocks` 4 KiB blocks, at random
   `bs`-aligned offsets or in order (wrapping), `depth` in flight, each slot's buffer at
   buf + slot * bs. A warm-up of a tenth of the time is not counted; then requests
   completed in `benchms` ms of guest time are counted, and those still in flight at the
   end are reaped but not counted. */
static void bench_one(const char *name, u32 type, int random, u64 bs, u64 (*now)(void), u8 *buf)
{
    if (type == T_OUT)                  /* not zeros (reads left what they read) */
        for (u64 i = 0; i < disk_opt.depth * bs; i += 8)
            *(u64 *)(buf + i) = mix64(i ^ bs);
    const u64 units = disk_opt.blocks * BLOCK / bs;
    const u64 span = disk_opt.benchms * 1000000ul;
    u64 rng = 0x2545f4914f6cdd1dul ^ bs ^ type, pos = 0, ops = 0, inflight = 0;
    u64 start = now(), stop = start + span / 10;
    int measuring = 0, ending = 0;
    for (;;) {
        int queued = 0;
        while (nfree && !ending) {
            u32 slot = free_slots[--nfree];
            u64 unit;
            if (random) {
                rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;    /* xorshift64 */
                unit = rng % units;
            } else {
                unit = pos++ % units;
            }
            slot_block[slot] = unit;
            submit(slot, type, unit * (bs / 512), (u64)(buf + slot * bs), (u32)bs, type == T_IN);
            inflight++;
            queued = 1;
        }
        if (queued)
            notify();
        if (!inflight)
            break;
        u32 slot = reap();
        need(slot, name, 0, slot == 0xffffffffu ? 0 : slot_block[slot]);
        free_slots[nfree++] = slot;
        inflight--;
        if (ending)
            continue;
        ops++;
        const u64 t = now();
        if (t < stop)
            continue;
        if (!measuring) {               /* the warm-up is over */
            measuring = 1;
            ops = 0;
            start = t;
            stop = t + span;
        } else {
            ending = 1;
            stop = t;
        }
    }
    const u64 ns = stop - start ? stop - start : 1;
    struct text t;
    t.n = 0;
    t_str(&t, "vcpu=0 disk bench="); t_str(&t, name);
    t_str(&t, " bs="); t_dec(&t, bs);
    t_str(&t, " depth="); t_dec(&t, disk_opt.depth);
    t_str(&t, " ops="); t_dec(&t, ops);
    t_str(&t, " ns="); t_dec(&t, ns);
    t_str(&t, " iops="); t_dec(&t, ops * 1000000000ul / ns);
    t_str(&t, " kib_s="); t_dec(&t, ops * (bs / 1024) * 1000000ul / (ns / 1000 ? ns / 1000 : 1));
    say(t_end(&t));
}

void disk_bench(u64 (*now)(void), u8 *buf, u64 len, void (*print)(const char *), void (*fail)(const char *))
{
    say = print;
    die = fail;
    if (!probe() || !device_init())
        fail("vcpu=0 ERROR disk: no virtio block device");
    const u64 cap = (u64)rd(R_CAPACITY) | ((u64)rd(R_CAPACITY + 4) << 32);
    const u64 seqbs = disk_opt.seqbs;
    struct text t;
    t.n = 0;
    if (cap < disk_opt.blocks * SECTORS_PER_BLOCK) {
        t_str(&t, "vcpu=0 ERROR disk: "); t_dec(&t, cap); t_str(&t, " sectors, the span needs ");
        t_dec(&t, disk_opt.blocks * SECTORS_PER_BLOCK);
        fail(t_end(&t));
    }
    if (disk_opt.blocks * BLOCK < seqbs || len < disk_opt.depth * seqbs) {
        t_str(&t, "vcpu=0 ERROR disk: bench needs blocks*4096 >= seqbs and ws >= depth*seqbs");
        fail(t_end(&t));
    }
    bench_one("randread", T_IN, 1, BLOCK, now, buf);
    bench_one("randwrite", T_OUT, 1, BLOCK, now, buf);
    bench_one("seqread", T_IN, 0, seqbs, now, buf);
    bench_one("seqwrite", T_OUT, 0, seqbs, now, buf);
}
