/*
 * Ring 3 of the vmipc built-in test guest: one instance per vCPU.
 *
 * Runs at native speed under KVM (ring 0 is emulated there), so everything
 * that can be is done here: option parsing, the memory map, page tables above
 * 4 GiB, the LAPIC timer, starting the APs (LAPIC ICR), the UART, the work.
 * Ring 3 reaches the LAPIC (its page is mapped user-accessible), the UART and
 * the PIT (IOPL=3 plus an all-zero I/O bitmap in the TSS). It sleeps by
 * executing HLT, which the #GP handler in ring 0 turns into "sti; hlt".
 *
 * xmm8..xmm11 are reserved (-ffixed-xmm8..11): xmm8 holds the running mix
 * and xmm9 two per-vCPU constants for the whole run, so a snapshot that loses
 * the vCPU's SSE state prints wrong sums from then on. The page content and
 * the sums are a pure function of (seed, vcpu, pass, page); the Python twin
 * is vmipc.guest.expected_lines. See README.md.
 */
#include "guest.h"
#include "disk.h"

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef signed char s8;

#define PAGE 4096ul
#define GIB (1ul << 30)
#define MAX_GIB 64                      /* RAM above this is not used */
#define NS 1000000000ul

/* ---------------------------------------------------------------- shared with boot.S */

struct pvclock {
    u32 version, pad0;
    u64 tsc_timestamp, system_time;
    u32 mul;
    s8 shift;
    u8 flags, pad[2];
};

struct percpu {
    volatile u64 ticks;                 /* PC_TICKS */
    u64 id;                             /* PC_ID */
    u64 kvmclock;                       /* PC_KVMCLOCK */
    u64 pad0[5];
    volatile struct pvclock pvti;       /* PC_PVTI */
    u64 pad1[4];
    u8 tss[104];                        /* PC_TSS */
    u8 iobitmap[IOBITMAP_BYTES];        /* zero: ports allowed to ring 3 */
    u8 kstack[PERCPU_SIZE - PC_TSS - 104 - IOBITMAP_BYTES];     /* ring-0 stack, grows down */
};
_Static_assert(__builtin_offsetof(struct percpu, ticks) == PC_TICKS, "PC_TICKS");
_Static_assert(__builtin_offsetof(struct percpu, id) == PC_ID, "PC_ID");
_Static_assert(__builtin_offsetof(struct percpu, kvmclock) == PC_KVMCLOCK, "PC_KVMCLOCK");
_Static_assert(__builtin_offsetof(struct percpu, pvti) == PC_PVTI, "PC_PVTI");
_Static_assert(__builtin_offsetof(struct percpu, tss) == PC_TSS, "PC_TSS");
_Static_assert(sizeof(struct percpu) == PERCPU_SIZE, "PERCPU_SIZE");

struct percpu percpu[MAXCPU] __attribute__((aligned(PERCPU_SIZE)));
u8 ustack[MAXCPU][USTACK_SIZE] __attribute__((aligned(16)));
volatile u32 print_lock;

extern u64 mb_info;
extern u64 pdpt[512];
extern char tramp_start[], tramp_end[], _end[];

static u64 pd_high[MAX_GIB - 4][512] __attribute__((aligned(4096)));

/* ---------------------------------------------------------------- small helpers */

static inline void outb(u32 port, u8 v) { __asm__ volatile("outb %0, %w1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u32 port) { u8 v; __asm__ volatile("inb %w1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void sleep_until_interrupt(void) { __asm__ volatile("hlt" ::: "memory"); }
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi)::"memory");
    return ((u64)hi << 32) | lo;
}
static inline volatile u32 *lapic(u32 reg) { return (volatile u32 *)(u64)(LAPIC_BASE + reg); }

void *memcpy(void *d, const void *s, u64 n)
{
    void *r = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n)::"memory");
    return r;
}

void *memset(void *d, int c, u64 n)
{
    void *r = d;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return r;
}

/* ---------------------------------------------------------------- the pure functions */

static inline u64 mix64(u64 z)
{
    z += 0x9e3779b97f4a7c15ul;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ul;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebul;
    return z ^ (z >> 31);
}

static u64 T[512];                      /* word j of a page is h ^ T[j] */
static u32 crc_tab[8][256];             /* CRC-32 (zlib), slicing by 8 */

static void tables_init(void)
{
    for (u64 j = 0; j < 512; j++)
        T[j] = mix64(0xa5a5a5a5a5a5a5a5ul ^ j);
    for (u32 i = 0; i < 256; i++) {
        u32 c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xedb88320u & -(c & 1));
        crc_tab[0][i] = c;
    }
    for (u32 i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_tab[t][i] = (crc_tab[t - 1][i] >> 8) ^ crc_tab[0][crc_tab[t - 1][i] & 0xff];
}

static u32 crc32_page(const u64 *p)
{
    u32 c = 0xffffffffu;
    for (u64 i = 0; i < PAGE / 8; i++) {
        u64 w = p[i] ^ c;
        c = crc_tab[7][w & 0xff] ^ crc_tab[6][(w >> 8) & 0xff] ^ crc_tab[5][(w >> 16) & 0xff] ^
            crc_tab[4][(w >> 24) & 0xff] ^ crc_tab[3][(w >> 32) & 0xff] ^ crc_tab[2][(w >> 40) & 0xff] ^
            crc_tab[1][(w >> 48) & 0xff] ^ crc_tab[0][w >> 56];
    }
    return ~c;
}

static void fill_page(u64 *p, u64 h)
{
    for (u64 j = 0; j < 512; j++)
        p[j] = h ^ T[j];
}

static int page_is(const u64 *p, u64 h)
{
    u64 acc = 0;
    for (u64 j = 0; j < 512; j++)
        acc |= p[j] ^ h ^ T[j];
    return acc == 0;
}

/* The running mix, two u64 lanes in xmm8, constants (k0, k1) in xmm9.
   update(v): lane_i = rotl64(((lane_i + v) ^ k_i), 13) for i = 0, 1; then swap the lanes. */
static inline void mix_init(u64 a, u64 b, u64 k0, u64 k1)
{
    __asm__ volatile("movq %0, %%xmm8\n\t"
                     "movq %1, %%xmm10\n\t"
                     "punpcklqdq %%xmm10, %%xmm8\n\t"
                     "movq %2, %%xmm9\n\t"
                     "movq %3, %%xmm10\n\t"
                     "punpcklqdq %%xmm10, %%xmm9\n\t" ::"r"(a), "r"(b), "r"(k0), "r"(k1));
}

static inline void mix_update(u64 v)
{
    __asm__ volatile("movq %0, %%xmm10\n\t"
                     "punpcklqdq %%xmm10, %%xmm10\n\t"
                     "paddq %%xmm10, %%xmm8\n\t"
                     "pxor %%xmm9, %%xmm8\n\t"
                     "movdqa %%xmm8, %%xmm11\n\t"
                     "psllq $13, %%xmm11\n\t"
                     "psrlq $51, %%xmm8\n\t"
                     "por %%xmm11, %%xmm8\n\t"
                     "pshufd $0x4e, %%xmm8, %%xmm8\n\t" ::"r"(v));
}

static inline u64 mix_fold(void)
{
    u64 a, b;
    __asm__ volatile("movq %%xmm8, %0\n\t"
                     "pshufd $0x4e, %%xmm8, %%xmm10\n\t"
                     "movq %%xmm10, %1\n\t" : "=r"(a), "=r"(b));
    return a ^ b;
}

/* ---------------------------------------------------------------- console */

struct line { char b[200]; u32 n; };

static void l_str(struct line *l, const char *s) { while (*s && l->n < sizeof l->b - 1) l->b[l->n++] = *s++; }
static void l_dec(struct line *l, u64 v)
{
    char t[24]; int n = 0;
    do { t[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n && l->n < sizeof l->b - 1) l->b[l->n++] = t[--n];
}
static void l_hex16(struct line *l, u64 v)
{
    for (int s = 60; s >= 0 && l->n < sizeof l->b - 1; s -= 4)
        l->b[l->n++] = "0123456789abcdef"[(v >> s) & 15];
}
static void l_vcpu(struct line *l, u64 id) { l->n = 0; l_str(l, "vcpu="); l_dec(l, id); }

static void uart_putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20))     /* LSR.THRE */
        cpu_relax();
    outb(COM1, (u8)c);
}

static void emit(struct line *l)        /* one whole line, under the console lock */
{
    l->b[l->n++] = '\n';
    u32 expected;
    do {
        expected = 0;
        while (print_lock) cpu_relax();
    } while (!__atomic_compare_exchange_n(&print_lock, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED));
    for (u32 i = 0; i < l->n; i++)
        uart_putc(l->b[i]);
    __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
}

static void power_off(u8 code) __attribute__((noreturn));
static void power_off(u8 code)
{
    while (!(inb(COM1 + 5) & 0x40))     /* LSR.TEMT: every byte is out */
        cpu_relax();
    outb(EXIT_PORT, code);
    for (;;)
        sleep_until_interrupt();
}

static void fail(struct line *l) __attribute__((noreturn));
static void fail(struct line *l)        /* error line, then power off with code 1 */
{
    emit(l);
    power_off(1);
}

/* ---------------------------------------------------------------- options */

static struct {
    u64 vcpus, ws, rate, passes, seed, hz, every, beat, beatonly;
} opt = {1, 1ul << 20, 4096, 0, 0, 100, 1, 0, 0};

static char cmdline[1024];

static int parse_num(const char *s, const char *e, int sizes, u64 *out)
{
    u64 v = 0, base = 10;
    if (e - s > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) { base = 16; s += 2; }
    if (s == e) return 0;
    for (; s < e; s++) {
        u64 d;
        char c = *s;
        if (c >= '0' && c <= '9') d = (u64)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f') d = (u64)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F') d = (u64)(c - 'A' + 10);
        else break;
        if (v > (~0ul - d) / base) return 0;
        v = v * base + d;
    }
    if (s < e && sizes && s + 1 == e) {
        u32 shift = 0;
        switch (*s) {
        case 'k': case 'K': shift = 10; break;
        case 'm': case 'M': shift = 20; break;
        case 'g': case 'G': shift = 30; break;
        default: return 0;
        }
        if (v >> (64 - shift)) return 0;
        v <<= shift;
        s++;
    }
    if (s != e) return 0;
    *out = v;
    return 1;
}

static int key_is(const char *s, const char *eq, const char *k)
{
    while (s < eq && *k && *s == *k) { s++; k++; }
    return s == eq && !*k;
}

/* Returns a pointer to the first bad token (its length in *len), or 0. */
static const char *parse_options(u32 *len)
{
    const char *p = cmdline;
    for (;;) {
        while (*p == ' ' || *p == '\t') p++;
        if (!*p) return 0;
        const char *s = p, *eq = 0, *slash = 0;
        while (*p && *p != ' ' && *p != '\t') {
            if (*p == '=' && !eq) eq = p;
            if (*p == '/' && !eq) slash = p;
            p++;
        }
        if (!eq || slash) continue;     /* the kernel path and other words: ignored */
        u64 v;
        int ok;
        if (key_is(s, eq, "vcpus")) ok = parse_num(eq + 1, p, 0, &v) && v >= 1 && v <= MAXCPU && (opt.vcpus = v, 1);
        else if (key_is(s, eq, "ws")) ok = parse_num(eq + 1, p, 1, &v) && v >= 1 && v <= (u64)MAX_GIB * GIB && (opt.ws = (v + PAGE - 1) & ~(PAGE - 1), 1);
        else if (key_is(s, eq, "rate")) ok = parse_num(eq + 1, p, 0, &v) && v <= NS && (opt.rate = v, 1);
        else if (key_is(s, eq, "passes")) ok = parse_num(eq + 1, p, 0, &v) && (opt.passes = v, 1);
        else if (key_is(s, eq, "seed")) ok = parse_num(eq + 1, p, 0, &v) && (opt.seed = v, 1);
        else if (key_is(s, eq, "hz")) ok = parse_num(eq + 1, p, 0, &v) && v >= 1 && v <= 10000 && (opt.hz = v, 1);
        else if (key_is(s, eq, "every")) ok = parse_num(eq + 1, p, 0, &v) && (opt.every = v, 1);
        else if (key_is(s, eq, "disk")) ok = parse_num(eq + 1, p, 0, &v) && v <= 3 && (disk_opt.mode = v, 1);
        else if (key_is(s, eq, "mmio")) ok = parse_num(eq + 1, p, 0, &v) && v >= 0x100000ul && v < 0x100000000ul && !(v & 0x1ff) && (disk_opt.mmio = v, 1);
        else if (key_is(s, eq, "mmios")) ok = parse_num(eq + 1, p, 0, &v) && v >= 1 && v <= DISK_MAX_MMIOS && (disk_opt.mmios = v, 1);
        else if (key_is(s, eq, "benchms")) ok = parse_num(eq + 1, p, 0, &v) && v >= 1 && v <= 600000 && (disk_opt.benchms = v, 1);
        else if (key_is(s, eq, "seqbs")) ok = parse_num(eq + 1, p, 1, &v) && v >= 4096 && v <= (1ul << 20) && !(v & 4095) && (disk_opt.seqbs = v, 1);
        else if (key_is(s, eq, "depth")) ok = parse_num(eq + 1, p, 0, &v) && v >= 1 && v <= DISK_MAX_DEPTH && (disk_opt.depth = v, 1);
        else if (key_is(s, eq, "blocks")) ok = parse_num(eq + 1, p, 0, &v) && v >= 1 && v <= DISK_MAX_BLOCKS && (disk_opt.blocks = v, 1);
        else if (key_is(s, eq, "beat")) ok = parse_num(eq + 1, p, 0, &v) && (v == 0 || (v >= 100 && v <= NS)) && (opt.beat = v, 1);
        else if (key_is(s, eq, "beatonly")) ok = parse_num(eq + 1, p, 0, &v) && v <= 1 && (opt.beatonly = v, 1);
        else if (key_is(s, eq, "BOOT_IMAGE")) ok = 1;
        else ok = 0;
        if (!ok) { *len = (u32)(p - s); return s; }
    }
}

/* ---------------------------------------------------------------- memory */

struct region { u64 base, end; };
static struct region ram[32];
static u32 nram;
static u64 ws_base[MAXCPU];

static void add_ram(u64 base, u64 len)
{
    u64 end = base + len;
    if (end < base) end = ~0ul;
    u64 lo = ((u64)_end + PAGE - 1) & ~(PAGE - 1);      /* above the image (>= 1 MiB) */
    if (base < lo) base = lo;
    if (end > (u64)MAX_GIB * GIB) end = (u64)MAX_GIB * GIB;
    base = (base + PAGE - 1) & ~(PAGE - 1);
    end &= ~(PAGE - 1);
    if (base >= end || nram == sizeof ram / sizeof ram[0]) return;
    /* keep sorted by base */
    u32 i = nram++;
    while (i && ram[i - 1].base > base) { ram[i] = ram[i - 1]; i--; }
    ram[i].base = base;
    ram[i].end = end;
}

static void read_multiboot(void)
{
    const u32 *mbi = (const u32 *)mb_info;
    u32 flags = mbi[0];
    if (flags & (1u << 2)) {
        const char *c = (const char *)(u64)mbi[4];
        u32 n = 0;
        while (c[n] && n < sizeof cmdline - 1) { cmdline[n] = c[n]; n++; }
        cmdline[n] = 0;
    }
    if (flags & (1u << 6)) {
        u64 p = mbi[12], end = p + mbi[11];
        while (p + 24 <= end) {
            u32 size = *(const u32 *)p;
            u64 base, len;
            u32 type;
            memcpy(&base, (const void *)(p + 4), 8);
            memcpy(&len, (const void *)(p + 12), 8);
            memcpy(&type, (const void *)(p + 20), 4);
            if (type == 1) add_ram(base, len);
            p += size + 4;
        }
    } else if (flags & 1u) {
        add_ram(1ul << 20, (u64)mbi[2] << 10);          /* mem_upper, KiB above 1 MiB */
    }
}

/* Each vCPU's working set is contiguous, in the first region with room. 0 if they do not fit. */
static int place_working_sets(void)
{
    u32 r = 0;
    u64 cur = nram ? ram[0].base : 0;
    for (u64 i = 0; i < opt.vcpus; i++) {
        for (; r < nram; r++) {         /* each working set is contiguous within one region */
            u64 start = cur > ram[r].base ? cur : ram[r].base;
            if (start < ram[r].end && ram[r].end - start >= opt.ws) { cur = start; break; }
        }
        if (r == nram) return 0;
        ws_base[i] = cur;
        cur += opt.ws;
    }
    return 1;
}

static void map_high(void)              /* 2 MiB identity pages for RAM above 4 GiB */
{
    u64 top = 0;
    for (u64 i = 0; i < opt.vcpus; i++)
        if (ws_base[i] + opt.ws > top) top = ws_base[i] + opt.ws;
    for (u64 g = 4; g * GIB < top && g < MAX_GIB; g++) {
        u64 *pd = pd_high[g - 4];
        for (u64 k = 0; k < 512; k++)
            pd[k] = (g * GIB + (k << 21)) | 0x87;
        __asm__ volatile("" ::: "memory");
        ((volatile u64 *)pdpt)[g] = (u64)pd | 0x7;      /* was not present: no flush needed */
    }
}

/* ---------------------------------------------------------------- clock */

static struct pvclock tsc_clock;        /* fallback without kvmclock: TSC calibrated with the PIT */
static volatile struct pvclock *clock_of[MAXCPU];
static const char *clock_name = "kvmclock";

static u64 clock_ns(volatile struct pvclock *p)
{
    u32 v;
    u64 ns;
    do {
        v = p->version;
        __asm__ volatile("" ::: "memory");
        u64 d = rdtsc() - p->tsc_timestamp;
        s8 sh = p->shift;
        d = sh < 0 ? d >> -sh : d << sh;
        ns = p->system_time + (u64)(((unsigned __int128)d * p->mul) >> 32);
        __asm__ volatile("" ::: "memory");
    } while ((v & 1) || v != p->version);
    return ns;
}

static void clock_setup(void)
{
    if (percpu[0].kvmclock && percpu[0].pvti.version) {
        for (u64 i = 0; i < MAXCPU; i++)
            clock_of[i] = &percpu[i].pvti;
        return;
    }
    /* PIT channel 2, mode 0, 50 ms; gate on, speaker off */
    const u32 count = 59659;            /* 1193182 Hz * 0.05 s */
    u64 hz = 0;
    outb(0x61, (u8)((inb(0x61) & ~0x02) | 0x01));
    outb(0x43, 0xb0);
    outb(0x42, count & 0xff);
    outb(0x42, count >> 8);
    u64 t0 = rdtsc();
    for (u64 i = 0; i < 50000000 && !(inb(0x61) & 0x20); i++)
        ;
    u64 t1 = rdtsc();
    if (inb(0x61) & 0x20)
        hz = (t1 - t0) * 1193182ul / count;
    if (hz < 1000000) {
        hz = 1000000000;
        clock_name = "tsc-uncalibrated";
    } else {
        clock_name = "tsc";
    }
    s8 shift = 0;
    while ((hz << shift) <= NS) shift++;
    tsc_clock.mul = (u32)(((unsigned __int128)NS << 32) / (hz << shift));
    tsc_clock.shift = shift;
    tsc_clock.tsc_timestamp = rdtsc();
    tsc_clock.system_time = 0;
    for (u64 i = 0; i < MAXCPU; i++)
        clock_of[i] = &tsc_clock;
}

struct watch {                          /* the timer and clock checks of one vCPU */
    u64 id;
    volatile struct pvclock *clk;
    u64 last_t, ticks, quiet;
    int backwards_told, stall_told, disarmed_told;
    u64 beat_step, beat_next, beats;    /* the heartbeat (vCPU 0 with beat=N): ns, due, count */
};

/* Longer steps between two readings are a pause, a restore or the host not running us:
   the timer cannot be blamed for them (after a restore, the next tick may legitimately
   come a full period after a big step of the clock). */
#define WATCH_GAP (250 * 1000000ul)

/* The current time. Reports (once each) time going backwards, and 2 s of guest time,
   counted in steps of at most WATCH_GAP, without a timer tick. */
static u64 watch_now(struct watch *w)
{
    volatile u64 *ticks = &percpu[w->id].ticks;
    u64 k, t;
    do {                                /* a (ticks, time) pair with no tick in between */
        k = *ticks;
        t = clock_ns(w->clk);
    } while (k != *ticks);
    if (t < w->last_t) {
        if (!w->backwards_told) {
            struct line l;
            l_vcpu(&l, w->id); l_str(&l, " ERROR clock went backwards by "); l_dec(&l, w->last_t - t); l_str(&l, " ns");
            emit(&l);
            w->backwards_told = 1;
        }
    } else if (k != w->ticks) {
        w->ticks = k;
        w->quiet = 0;
    } else if (t - w->last_t <= WATCH_GAP) {
        w->quiet += t - w->last_t;
        if (w->quiet > 2 * NS && !w->stall_told) {
            struct line l;
            l_vcpu(&l, w->id); l_str(&l, " ERROR no timer tick for "); l_dec(&l, w->quiet / 1000000); l_str(&l, " ms");
            emit(&l);
            w->stall_told = 1;
        }
    }
    w->ticks = k;
    w->last_t = t;
    /* The heartbeat rides on the clock readings the work makes anyway (every page written,
       every 64 pages read back, every wake-up while pacing), so it needs no vCPU of its
       own. Beats are numbered as printed, so a lost or repeated line shows; the schedule
       keeps its phase unless a whole period was missed (a pause, a slow host), and then
       restarts from now rather than bursting to catch up. */
    if (w->beat_step && t >= w->beat_next) {
        struct line l;
        l_vcpu(&l, w->id); l_str(&l, " beat="); l_dec(&l, ++w->beats);
        emit(&l);
        w->beat_next += w->beat_step;
        if (w->beat_next <= t)
            w->beat_next = t + w->beat_step;
    }
    return t;
}

/* Sleeping (HLT) needs the timer to wake us: check that it is still armed
   (a lost LAPIC state masks it) and has not stalled. If not, say so once and
   pace by spinning, so that the lines (and the error) keep coming. */
static int may_sleep(struct watch *w)
{
    u32 lvt = *lapic(LAPIC_LVT_TIMER);
    if ((lvt & 0x700ff) != ((1u << 17) | TIMER_VECTOR) || !(*lapic(LAPIC_SVR) & 0x100)) {
        if (!w->disarmed_told) {
            struct line l;
            l_vcpu(&l, w->id); l_str(&l, " ERROR LAPIC timer not armed, lvt=0x"); l_hex16(&l, lvt);
            emit(&l);
            w->disarmed_told = 1;
        }
        return 0;
    }
    return !w->stall_told;
}

/* ---------------------------------------------------------------- the work */

static u64 now_ns0(void) { return clock_ns(clock_of[0]); }
static void print_text(const char *s) { struct line l; l.n = 0; l_str(&l, s); emit(&l); }
static void fail_text(const char *s) { struct line l; l.n = 0; l_str(&l, s); fail(&l); }

static volatile u32 cpus_up, cpus_running;

static void lapic_timer_start(void)
{
    *lapic(LAPIC_TPR) = 0;
    *lapic(LAPIC_SVR) = 0x100 | SPURIOUS_VECTOR;
    *lapic(LAPIC_LVT_LINT0) = 0x10000;
    *lapic(LAPIC_LVT_LINT1) = 0x10000;
    *lapic(LAPIC_LVT_ERR) = 0x10000;
    *lapic(LAPIC_TIMER_DCR) = 0xb;                      /* divide by 1 */
    *lapic(LAPIC_LVT_TIMER) = (1u << 17) | TIMER_VECTOR; /* periodic */
    *lapic(LAPIC_TIMER_ICR) = (u32)(NS / opt.hz);       /* KVM and QEMU: 1 GHz timer clock */
}

static void run(u64 id) __attribute__((noreturn));
static void run(u64 id)
{
    lapic_timer_start();
    struct watch w = {.id = id, .clk = clock_of[id], .ticks = percpu[id].ticks};
    w.last_t = clock_ns(w.clk);
    u64 now = watch_now(&w);
    if (id == 0 && opt.beat) {
        w.beat_step = opt.beat * 1000;
        w.beat_next = now + w.beat_step;
    }

    const u64 vbase = mix64(mix64(opt.seed) ^ id);
    mix_init(mix64(vbase ^ 0x1111111111111111ul), mix64(vbase ^ 0x2222222222222222ul),
             mix64(vbase ^ 0x3333333333333333ul), mix64(vbase ^ 0x4444444444444444ul));
    __atomic_add_fetch(&cpus_up, 1, __ATOMIC_RELEASE);

    if (id == 0 && opt.beat && opt.beatonly) {
        /* a heartbeat vCPU: no work, no pass lines; it wakes at every timer tick */
        for (;;) {
            watch_now(&w);
            if (may_sleep(&w))
                sleep_until_interrupt();
            else
                cpu_relax();
        }
    }

    u64 *const ws = (u64 *)ws_base[id];
    const u64 npages = opt.ws / PAGE;
    const u64 step = opt.rate ? NS / opt.rate : 0;
    u64 next = now;
    struct line l;

    const int disk = id == 0 && disk_opt.mode;  /* vCPU 0 runs the disk workload instead */
    if (disk && disk_opt.mode == 3)
        disk_bench(now_ns0, (u8 *)ws_base[0], opt.ws, print_text, fail_text);
    else if (disk)
        disk_workload(opt.seed, opt.passes, opt.every, print_text, fail_text);
    for (u64 pass = 1; !disk && (opt.passes == 0 || pass <= opt.passes); pass++) {
        const u64 hpass = mix64(vbase ^ pass), hprev = mix64(vbase ^ (pass - 1));
        int told = 0;
        for (u64 p = 0; p < npages; p++) {
            u64 *pg = ws + p * (PAGE / 8);
            now = watch_now(&w);
            if (step) {                 /* pace: page p not before `next` */
                if (next > now + step + 100000000ul)
                    next = now;         /* the clock went back: do not wait for it */
                while (now < next) {
                    if (may_sleep(&w))
                        sleep_until_interrupt();
                    else
                        cpu_relax();
                    now = watch_now(&w);
                }
                if (now > next + 100000000ul)
                    next = now;         /* after a stall, do not burst to catch up */
                next += step;
            }
            if (pass > 1 && !told && !page_is(pg, mix64(hprev ^ p))) {
                l_vcpu(&l, id); l_str(&l, " ERROR pass="); l_dec(&l, pass); l_str(&l, " page=");
                l_dec(&l, p); l_str(&l, " does not hold pass "); l_dec(&l, pass - 1);
                emit(&l);
                told = 1;
            }
            const u64 h = mix64(hpass ^ p);
            fill_page(pg, h);
            mix_update(h);
        }
        for (u64 p = 0; p < npages; p++) {
            if ((p & 63) == 0)
                watch_now(&w);
            mix_update((p << 32) | crc32_page(ws + p * (PAGE / 8)));
        }
        const u64 sum = mix_fold();
        if (opt.every && pass % opt.every == 0) {
            l_vcpu(&l, id); l_str(&l, " pass="); l_dec(&l, pass); l_str(&l, " sum="); l_hex16(&l, sum);
            emit(&l);
        }
    }
    l_vcpu(&l, id); l_str(&l, " done");
    emit(&l);
    if (__atomic_sub_fetch(&cpus_running, 1, __ATOMIC_ACQ_REL) == 0)
        power_off(0);
    *lapic(LAPIC_LVT_TIMER) = 0x10000;                  /* idle for good */
    for (;;)
        sleep_until_interrupt();
}

static void start_aps(void)
{
    memcpy((void *)TRAMPOLINE, tramp_start, (u64)(tramp_end - tramp_start));
    for (u64 i = 1; i < opt.vcpus; i++) {
        static const u32 icr[3] = {0x4500, 0x4600 | (TRAMPOLINE >> 12), 0x4600 | (TRAMPOLINE >> 12)};
        for (int k = 0; k < 3; k++) {   /* INIT, SIPI, SIPI */
            *lapic(LAPIC_ICR_HI) = (u32)i << 24;
            *lapic(LAPIC_ICR_LO) = icr[k];
            while (*lapic(LAPIC_ICR_LO) & (1u << 12))   /* delivery pending */
                cpu_relax();
        }
    }
    /* Give up after 5 s of timer ticks (a paused VM gets one tick on resume, however
       long the pause), or 60 s of clock time should the timer not run at all. */
    const u64 k0 = percpu[0].ticks, t0 = clock_ns(clock_of[0]);
    while (cpus_up < opt.vcpus - 1) {
        if (percpu[0].ticks - k0 > 5 * opt.hz || clock_ns(clock_of[0]) - t0 > 60 * NS) {
            struct line l;
            l_vcpu(&l, 0); l_str(&l, " ERROR only "); l_dec(&l, cpus_up + 1); l_str(&l, " of ");
            l_dec(&l, opt.vcpus); l_str(&l, " vcpus started");
            fail(&l);
        }
        cpu_relax();
    }
}

void r3_entry(u64 id) __attribute__((noreturn));
void r3_entry(u64 id)
{
    if (id != 0)
        run(id);

    read_multiboot();
    u32 badlen = 0;
    const char *bad = parse_options(&badlen);
    tables_init();
    clock_setup();
    struct line l;
    l.n = 0;
    l_str(&l, "vmipc-guest 1 vcpus="); l_dec(&l, opt.vcpus);
    l_str(&l, " ws="); l_dec(&l, opt.ws);
    l_str(&l, " rate="); l_dec(&l, opt.rate);
    l_str(&l, " passes="); l_dec(&l, opt.passes);
    l_str(&l, " seed="); l_dec(&l, opt.seed);
    l_str(&l, " hz="); l_dec(&l, opt.hz);
    l_str(&l, " every="); l_dec(&l, opt.every);
    l_str(&l, " clock="); l_str(&l, clock_name);
    if (opt.beat) {                     /* only then: the banner without it stays as it was */
        l_str(&l, " beat="); l_dec(&l, opt.beat);
        if (opt.beatonly) l_str(&l, " beatonly=1");
    }
    emit(&l);
    if (bad) {
        l_vcpu(&l, 0); l_str(&l, " ERROR bad option '");
        for (u32 i = 0; i < badlen && i < 60; i++) l.b[l.n++] = bad[i];
        l_str(&l, "'");
        fail(&l);
    }
    if (!place_working_sets()) {
        u64 usable = 0;
        for (u32 i = 0; i < nram; i++) usable += ram[i].end - ram[i].base;
        l_vcpu(&l, 0); l_str(&l, " ERROR not enough RAM: "); l_dec(&l, opt.vcpus);
        l_str(&l, " working sets of "); l_dec(&l, opt.ws); l_str(&l, " bytes, ");
        l_dec(&l, usable); l_str(&l, " bytes usable above the image");
        fail(&l);
    }
    map_high();
    cpus_running = (u32)opt.vcpus - (opt.beat && opt.beatonly);  /* a heartbeat vCPU never ends */
    lapic_timer_start();                /* for the start-up timeout; run() starts it afresh */
    start_aps();
    run(0);
}
