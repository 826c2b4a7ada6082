/* fuzzer.c - random syscalls from a container (tests/kernel/test_fuzz_guest.py).
 *
 * The main fiber takes its config (seed, budget) from handle 0 and starts a
 * worker fiber that makes random syscalls: every number of the table plus
 * out-of-range ones, arguments drawn from interesting values (0, 1, -1, 2^63,
 * 2^63-1, 2^64-1, small ints, its own handles, fiber ids and pids, kernel
 * addresses, unmapped user addresses, unaligned and page-crossing pointers
 * into its own arena, huge lengths) and random event arrays for sync.
 *
 * A call may block for ever (recv on a channel nobody sends on, a sync of
 * NEVERs, a join of itself): the main fiber looks at the count of calls every
 * CHECK_NS; when it has not moved since the last look it closes the handles
 * the workers made (a worker parked on one wakes with EPIPE) and starts
 * another worker (the blocked one may wake later and go on too).  It reports progress to the
 * supervisor on handle 0 at every look, and exits when the budget is done or
 * after MAX_WORKERS workers.  A call that ends the container (exit, a fault
 * of a fiber it spawned, a raw faulting instruction) ends it early: the
 * supervisor counts what was reported and starts another.
 *
 * FUZZ_KNOWN_BUGS (default 1) also draws the argument classes of bugs known
 * when this was written, so that a run without them finds the next ones:
 * EV_ALWAYS values >= 2^63, sleep/timeout/at-time values >= 2^63 (negative),
 * fiber_spawn at a wild entry (instruction fetch from unmapped or kernel
 * memory), int $0x41 from ring 3.
 */
#include "common.h"

#ifndef FUZZ_KNOWN_BUGS
#define FUZZ_KNOWN_BUGS 1
#endif

#define CTL 0
#define CHECK_NS 100000L         /* the main fiber's look at the workers (virtual ns) */
#define MAX_WORKERS 48
#define MAX_HANDLES 24
#define MAX_FIDS 32
#define MAX_PIDS 8

typedef unsigned long u64;

static u64 rng;
static u64 budget;
volatile u64 done;               /* syscalls made by the workers */
static long workers;

static long handles[MAX_HANDLES] = {0, 1, 2};
static int nhandles = 3;
static long fids[MAX_FIDS];
static int nfids;
static long pids[MAX_PIDS];
static int npids;

/* Pointers into the first ARENA bytes of this arena are ours to corrupt:
 * three pages, so that a buffer can cross a page boundary.  What a call
 * writes there is at most a message (4096 bytes) or an event array, so the
 * two pages after them keep it off the fuzzer's own state. */
#define ARENA (3 * 4096)
static unsigned char arena[ARENA + 2 * 4096] __attribute__((aligned(4096)));
static struct vmk_event events[72];
extern char _end[];

static u64 next(void)           /* splitmix64 */
{
    u64 z = (rng += 0x9E3779B97F4A7C15UL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
    return z ^ (z >> 31);
}

static u64 below(u64 n)
{
    return n ? next() % n : 0;
}

static long raw6(u64 nr, u64 a, u64 b, u64 c, u64 d, u64 e, u64 f)
{
    register u64 r10 __asm__("r10") = d;
    register u64 r8 __asm__("r8") = e;
    register u64 r9 __asm__("r9") = f;
    long ret = (long)nr;
    __asm__ volatile("syscall"
                     : "+a"(ret)
                     : "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

/* ------------------------------------------------------------------ values */
static u64 heap_ptr(void)
{
    u64 base = ((u64)_end + 4095) & ~4095UL;
    return base + below(16 * 4096);        /* far below the fiber stacks at the heap's top */
}

static u64 own_ptr(void)
{
    switch (below(8)) {
    case 0: return (u64)arena;
    case 1: return (u64)arena + 4096 - below(17);          /* across the first page boundary */
    case 2: return (u64)arena + 2 * 4096 - below(33);
    case 3: return (u64)arena + ARENA - below(9);
    case 4: return heap_ptr();
    default: return (u64)arena + below(ARENA);      /* unaligned as it comes */
    }
}

static u64 len_val(void)
{
    static const u64 lens[] = {0, 1, 7, 8, 9, 16, 24, 40, 4095, 4096, 4097, 8192, 65536, 65537,
                               1UL << 31, 1UL << 40, 1UL << 63, ~0UL, ~0UL - 7};
    if (below(2))
        return below(65);
    return lens[below(sizeof lens / sizeof lens[0])];
}

static u64 handle_val(void)
{
    if (below(4))
        return (u64)handles[below(nhandles)];
    return below(2) ? below(40) : (u64)(long)-1 - below(3);
}

static u64 fid_val(void)
{
    if (nfids && below(4))
        return (u64)fids[below(nfids)];
    return below(64);
}

static u64 val(void)
{
    static const u64 special[] = {
        0, 1, 2, ~0UL, 1UL << 63, (1UL << 63) - 1, ~0UL - 1, 0x80000000UL, 0xFFFFFFFFUL, 0x100000000UL,
        0xffff800000000000UL, 0xffffffff80000000UL, 0xFEE00000UL, 0xFEC00000UL, 0xB8000UL,
        0x1000UL, 0x10000UL, 0x3FF000UL, 0x400000UL, 0x7FFFF000UL, 0x7FFFFFF8UL, 0x800000000000UL,
        0x7FFFFFFFF000UL, 0x7FFFFFFFFFF8UL, 0x40000000UL,
    };
    switch (below(10)) {
    case 0: case 1: case 2: return special[below(sizeof special / sizeof special[0])];
    case 3: return below(64);
    case 4: return handle_val();
    case 5: return fid_val();
    case 6: return npids ? (u64)pids[below(npids)] : below(8);
    case 7: return own_ptr();
    case 8: return next();
    default: return len_val();
    }
}

/* A time value (sleep, timeout, at-time): small mostly. */
static u64 time_val(void)
{
    u64 v;
    switch (below(6)) {
    case 0: v = val(); break;
    case 1: v = (u64)vmk_time() + below(200000); break;
    default: v = below(50000); break;
    }
#if !FUZZ_KNOWN_BUGS
    v &= ~(1UL << 63);          /* known: negative sleeps and timeouts hang */
#endif
    return v;
}

/* ------------------------------------------------------------------ fibers it spawns */
/* The fiber's stack may be anywhere writable (the arena, which other calls
 * overwrite): this leaf uses registers only. */
static void __attribute__((noinline)) child(long arg)
{
    vmk_sleep(arg & 0x3FFF);
    if (arg & 0x10000)
        vmk_yield();
    vmk_fiber_exit(arg);
}

static void __attribute__((noinline)) child_fault(long arg)
{
    (void)arg;
    *(volatile long *)0x10 = 1;            /* a page fault: ends this container */
    vmk_fiber_exit(0);
}

static u64 entry_val(void)
{
    if (below(256))
        return (u64)child;
    if (below(2))
        return (u64)child_fault;
#if FUZZ_KNOWN_BUGS
    return val();               /* known: a wild instruction fetch hangs */
#else
    return (u64)child;
#endif
}

static void remember_handle(long h)
{
    if (h < 0)
        return;
    if (nhandles < MAX_HANDLES)
        handles[nhandles++] = h;
}

/* ------------------------------------------------------------------ one call */
static void fill_events(int n)
{
    for (int i = 0; i < n; i++) {
        struct vmk_event *e = &events[i];
        u64 k = below(12);
        e->kind = below(16) ? (uint32_t)k : (uint32_t)next();
        e->flags = below(8) ? 0 : (uint32_t)next();
        e->handle = (long)val();
        e->arg0 = val();
        e->arg1 = val();
        e->result = (long)next();
        switch (e->kind) {
        case EV_SEND: case EV_RECV:
            e->handle = (long)handle_val();
            e->arg0 = own_ptr();
            e->arg1 = below(2) ? below(41) : len_val();
            break;
        case EV_TIMEOUT: case EV_AT_TIME:
            e->arg0 = time_val();
            break;
        case EV_IRQ:
            e->handle = below(2) ? 5 : (long)val();
            break;
        case EV_JOIN:
            e->handle = (long)fid_val();
            break;
        case EV_COND:
            e->handle = (long)handle_val();
            break;
        case EV_ALWAYS:
#if !FUZZ_KNOWN_BUGS
            e->arg0 &= ~(1UL << 63);        /* known: struct.error in pid 0 */
#endif
            break;
        }
    }
}

static void raw_instruction(void)
{
    switch (below(FUZZ_KNOWN_BUGS ? 8 : 6)) {
    case 0: __asm__ volatile("int3"); break;
    case 1: __asm__ volatile("int $0x80"); break;
    case 2: __asm__ volatile("ud2"); break;
    case 3: __asm__ volatile("hlt"); break;
    case 4: __asm__ volatile("cli"); break;
    case 5: __asm__ volatile("inb %%dx, %%al" : : "d"(0x3F8) : "rax"); break;
#if FUZZ_KNOWN_BUGS
    case 6: __asm__ volatile("int $0x41"); break;                  /* known: fires IRQ 1 */
    case 7: __asm__ volatile("jmp *%0" : : "r"(val())); break;     /* known: a wild fetch hangs */
#endif
    }
}

static void one_call(void)
{
    u64 nr, a = val(), b = val(), c = val(), d = val(), e = val(), f = val();
    u64 pick = below(1000);
    if (pick < 40) {                       /* out of the table */
        static const u64 bad[] = {20, 21, 31, 63, 64, 255, 256, 0x100000000UL + SYS_SEND,
                                  0x100000000UL + SYS_RECV, 0x100000000UL, 1UL << 63, ~0UL, ~0UL - 9};
        nr = below(2) ? bad[below(sizeof bad / sizeof bad[0])] : next();
        raw6(nr, a, b, c, d, e, f);
        return;
    }
    if (pick == 40 && below(2)) {
        raw_instruction();
        return;
    }
    nr = below(20);
    switch (nr) {
    case SYS_EXIT:
        if (below(100))                    /* rare: it ends the container */
            return;
        break;
    case SYS_FIBER_EXIT:
        if (below(20))                     /* ends this worker */
            return;
        break;
    case SYS_FIBER_SPAWN:
        if (!FUZZ_KNOWN_BUGS || below(4))
            a = entry_val();
        if (below(4)) {
            b = below(2) ? 0 : below(2) ? ((u64)arena + below(ARENA)) : val();
            c = next() & 0x13FFF;
        }
        break;
    case SYS_FIBER_JOIN:
        if (below(4))
            a = fid_val();
        break;
    case SYS_CHAN_CREATE:
        if (nhandles >= MAX_HANDLES) {    /* make room: close one we made */
            int i = 3 + (int)below(nhandles - 3);
            vmk_chan_close(handles[i]);
            handles[i] = handles[--nhandles];
        }
        if (below(4)) {
            static const u64 sizes[] = {0, 8, 16, 24, 40, 4096, 4097};
            a = sizes[below(7)];
            b = below(2) ? 0 : val();
        }
        break;
    case SYS_CHAN_CLOSE:
        a = below(4) ? handle_val() : a;
        if (a == CTL)                      /* the supervisor's line stays */
            return;
        break;
    case SYS_SEND: case SYS_RECV:
        if (below(8)) {
            a = handle_val();
            b = own_ptr();
            c = below(2) ? below(41) : len_val();
        }
        break;
    case SYS_SYNC: {
        int n = (int)below(71);
        fill_events(n > 64 ? 64 : n);
        if (below(8)) {
            a = (u64)events;
            if (below(4) == 0) {           /* unaligned / page-crossing: copy into the arena */
                unsigned char *p = arena + 4096 - below(40 * 3);
                unsigned char *s = (unsigned char *)events;
                for (int i = 0; i < n * 40 && p + i < arena + ARENA; i++)
                    p[i] = s[i];
                a = (u64)p;
            }
            b = (u64)n;
        }
        break;
    }
    case SYS_SLEEP:
        a = time_val();
        break;
    case SYS_SPAWN:
        if (below(4)) {
            static const char names[] = "dudwitnesx";
            a = below(4) ? (u64)names : own_ptr();
            b = below(2) ? 3 : val();
            long *hs = (long *)(arena + below(8) * 8);
            for (int i = 0; i < 17; i++)
                hs[i] = below(2) ? handles[below(nhandles)] : (long)val();
            c = below(4) ? (u64)hs : val();
            d = below(4) ? below(5) : val();
        }
        break;
    case SYS_WAIT:
        if (below(2))
            a = npids ? (u64)pids[below(npids)] : below(8);
        break;
    case SYS_CONSOLE_WRITE:
        if (below(64)) {                   /* keep the console readable: few, short writes */
            a = own_ptr();
            b = below(9);
        }
        break;
    case SYS_HANDLE_DUP: case SYS_COND_SIGNAL:
        if (below(2))
            a = handle_val();
        break;
    }
    long r = raw6(nr, a, b, c, d, e, f);
    if (r >= 0) {
        if (nr == SYS_CHAN_CREATE || nr == SYS_HANDLE_DUP || nr == SYS_COND_CREATE)
            remember_handle(r);
        else if (nr == SYS_FIBER_SPAWN && nfids < MAX_FIDS)
            fids[nfids++] = r;
        else if (nr == SYS_SPAWN) {
            if (npids < MAX_PIDS)
                pids[npids++] = r;
            else
                pids[below(MAX_PIDS)] = r;
        }
    }
}

static void worker(long arg)
{
    (void)arg;
    for (;;) {
        one_call();
        done++;
    }
}

static void start_worker(void)
{
    long fid = vmk_fiber_spawn((void *)worker, 0, 0);
    workers++;
    if (fid >= 0 && nfids < MAX_FIDS)
        fids[nfids++] = fid;
}

/* Close every handle the workers made (a worker parked on one of them wakes
 * with EPIPE when this was its last holder) and signal each (conditions). */
static void unblock(void)
{
    for (int i = 3; i < nhandles; i++) {
        vmk_cond_signal(handles[i]);
        vmk_chan_close(handles[i]);
    }
    nhandles = 3;
}

static void report(void)
{
    struct fuzz_msg m = {PROG_MAGIC, done, (u64)workers};
    if (vmk_send(CTL, &m, FUZZ_MSG) < 0)
        vmk_exit(2);                       /* the supervisor is gone */
}

int main(void)
{
    struct fuzz_msg cfg;
    if (vmk_recv(CTL, &cfg, FUZZ_MSG) != FUZZ_MSG || cfg.magic != CFG_MAGIC)
        return 3;
    rng = cfg.a;
    budget = cfg.b;
    fids[nfids++] = vmk_fiber_self();
    pids[npids++] = vmk_getpid();
    start_worker();
    u64 last = ~0UL;
    int still = 0;
    for (;;) {
        vmk_sleep(CHECK_NS);
        u64 now = done;
        report();
        if (now >= budget)
            return 0;
        still = now == last ? still + 1 : 0;
        last = now;
        if (still >= 1) {
            if (workers >= MAX_WORKERS)
                return 1;
            unblock();
            start_worker();
            still = 0;
        }
    }
}
