/* supervisor.c - keeps FUZZ_PAR fuzzer containers running until FUZZ_TOTAL
 * syscalls are done (tests/kernel/test_fuzz_guest.py).
 *
 * Handles (manifest): 0 console.tx, 1 pool, 2 console.rx.  Each fuzzer gets a
 * control channel of its own (handle 0 there), "pool" and console.rx; its
 * seed is FUZZ_SEED mixed with its serial number, its budget FUZZ_BATCH
 * calls.  The supervisor syncs on every control channel (and a timeout):
 * a progress report updates that fuzzer's count; -EPIPE means one of them is
 * gone (its last holder of the channel ended), found by a non-blocking probe
 * of each, counted (by exit code) and replaced.  At the end it prints
 *   "fuzz done: calls N fuzzers F exits: ok A fault B other C stalled D\n"
 * and exits; the fuzzers still running see EPIPE on their next report and end.
 */
#include "common.h"

#ifndef FUZZ_SEED
#define FUZZ_SEED 1
#endif
#ifndef FUZZ_TOTAL
#define FUZZ_TOTAL 10000
#endif
#ifndef FUZZ_BATCH
#define FUZZ_BATCH 2000
#endif
#ifndef FUZZ_PAR
#define FUZZ_PAR 3
#endif

#define CONSOLE 0
#define POOL 1
#define CONRX 2
#define STALL_NS 20000000L

struct slot {
    long ctl, pid;
    unsigned long done;
    struct fuzz_msg in;
};

static struct slot slots[FUZZ_PAR];
static unsigned long finished, spawned, exits_ok, exits_fault, exits_other, stalls;

static void say(const char *s)
{
    char buf[160];
    int n = put_s(buf, s);
    vmk_send(CONSOLE, buf, n);
}

static unsigned long mix(unsigned long x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdUL;
    x ^= x >> 33;
    return x;
}

static void start(struct slot *s)
{
    for (int tries = 0; tries < 1000; tries++) {
        long ctl = vmk_chan_create(FUZZ_MSG, 0);
        if (ctl < 0) {                      /* the fuzzers filled the channel table: wait */
            vmk_sleep(100000);
            continue;
        }
        long hs[3] = {ctl, POOL, CONRX};
        long pid = vmk_spawn("fuzz", 4, hs, 3);
        if (pid < 0) {
            vmk_chan_close(ctl);
            vmk_sleep(100000);
            continue;
        }
        spawned++;
        s->ctl = ctl;
        s->pid = pid;
        s->done = 0;
        struct fuzz_msg cfg = {CFG_MAGIC, mix(FUZZ_SEED * 0x9E3779B97F4A7C15UL + spawned), FUZZ_BATCH};
        struct vmk_event e[2] = {
            {.kind = EV_SEND, .handle = ctl, .arg0 = (uint64_t)&cfg, .arg1 = FUZZ_MSG},
            {.kind = EV_TIMEOUT, .arg0 = STALL_NS},
        };
        vmk_sync(e, 2);                     /* a fuzzer that does not take it is found dead below */
        return;
    }
    say("fuzz supervisor: cannot start a fuzzer\n");
    vmk_exit(1);
}

static unsigned long total(void)
{
    unsigned long t = finished;
    for (int i = 0; i < FUZZ_PAR; i++)
        t += slots[i].done;
    return t;
}

static void take(struct slot *s)
{
    if (s->in.magic == PROG_MAGIC && s->in.a > s->done && s->in.a <= FUZZ_BATCH + 1000000UL)
        s->done = s->in.a;
}

static void reap(struct slot *s)
{
    long code = vmk_wait(s->pid);
    if (code == 0)
        exits_ok++;
    else if (code <= -128 && code > -128 - 32)
        exits_fault++;
    else
        exits_other++;
    finished += s->done;
    vmk_chan_close(s->ctl);
    start(s);
}

int main(void)
{
    for (int i = 0; i < FUZZ_PAR; i++)
        start(&slots[i]);
    while (total() < FUZZ_TOTAL) {
        struct vmk_event e[FUZZ_PAR + 1];
        for (int i = 0; i < FUZZ_PAR; i++)
            e[i] = (struct vmk_event){.kind = EV_RECV, .handle = slots[i].ctl,
                                      .arg0 = (uint64_t)&slots[i].in, .arg1 = FUZZ_MSG};
        e[FUZZ_PAR] = (struct vmk_event){.kind = EV_TIMEOUT, .arg0 = STALL_NS};
        long r = vmk_sync(e, FUZZ_PAR + 1);
        if (r >= 0 && r < FUZZ_PAR) {
            if (e[r].result == FUZZ_MSG)
                take(&slots[r]);
            continue;
        }
        if (r == FUZZ_PAR) {
            stalls++;                       /* nobody reported for STALL_NS: keep waiting */
            continue;
        }
        /* an arm failed (EPIPE: a fuzzer is gone): probe each without blocking */
        for (int i = 0; i < FUZZ_PAR; i++) {
            struct slot *s = &slots[i];
            struct vmk_event p[2] = {
                {.kind = EV_RECV, .handle = s->ctl, .arg0 = (uint64_t)&s->in, .arg1 = FUZZ_MSG},
                {.kind = EV_ALWAYS},
            };
            long q = vmk_sync(p, 2);
            if (q == 0 && p[0].result == FUZZ_MSG)
                take(s);
            else if (q < 0)
                reap(s);
        }
    }
    char buf[200];
    int n = put_s(buf, "fuzz done: calls ");
    n += fmt_u(buf + n, total());
    n += put_s(buf + n, " fuzzers ");
    n += fmt_u(buf + n, spawned);
    n += put_s(buf + n, " exits: ok ");
    n += fmt_u(buf + n, exits_ok);
    n += put_s(buf + n, " fault ");
    n += fmt_u(buf + n, exits_fault);
    n += put_s(buf + n, " other ");
    n += fmt_u(buf + n, exits_other);
    n += put_s(buf + n, " stalled ");
    n += fmt_u(buf + n, stalls);
    buf[n++] = '\n';
    vmk_send(CONSOLE, buf, n);
    return 0;
}
