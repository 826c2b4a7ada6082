/* The console demo's pid 1: a tiny shell on the serial channels it was handed.
 *
 * handle 0 = console.rx (one byte per message), handle 1 = console.tx.
 * Commands: help, echo TEXT, ps (pid and time), spawn NAME, sleep MS, exit.
 * Each command runs in a fiber of its own (fiber_spawn + fiber_join).
 */
#include "vmk.h"

enum { RX = 0, TX = 1 };

static long len(const char *s) { long n = 0; while (s[n]) n++; return n; }
static void puts_(const char *s) { vmk_send(TX, s, len(s)); }
static int starts(const char *s, const char *p) { while (*p) if (*s++ != *p++) return 0; return 1; }

static void putnum(long v)
{
    char buf[24]; int i = 23; buf[i] = 0;
    if (v == 0) buf[--i] = '0';
    int neg = v < 0; if (neg) v = -v;
    while (v) { buf[--i] = '0' + v % 10; v /= 10; }
    if (neg) buf[--i] = '-';
    puts_(buf + i);
}

static char line[128];

static void job(long arg)
{
    const char *cmd = (const char *)arg;
    if (starts(cmd, "echo ")) { puts_(cmd + 5); puts_("\r\n"); }
    else if (starts(cmd, "ps")) {
        puts_("pid "); putnum(vmk_getpid()); puts_(" fiber "); putnum(vmk_fiber_self());
        puts_(" time "); putnum(vmk_time()); puts_(" ns\r\n");
    }
    else if (starts(cmd, "sleep ")) {
        long ms = 0; for (const char *p = cmd + 6; *p >= '0' && *p <= '9'; p++) ms = ms * 10 + (*p - '0');
        vmk_sleep(ms * 1000000L); puts_("slept\r\n");
    }
    else if (starts(cmd, "spawn ")) {
        long handles[2] = {RX, TX};
        long pid = vmk_spawn(cmd + 6, len(cmd + 6), handles, 2);
        if (pid < 0) { puts_("spawn failed: "); putnum(pid); puts_("\r\n"); }
        else { puts_("started pid "); putnum(pid); puts_(", exit code ");
               putnum(vmk_wait(pid)); puts_("\r\n"); }
    }
    else if (starts(cmd, "help")) puts_("commands: help, echo TEXT, ps, sleep MS, spawn NAME, exit\r\n");
    else if (cmd[0]) { puts_("unknown command: "); puts_(cmd); puts_("\r\n"); }
    vmk_fiber_exit(0);
}

int main(void)
{
    puts_("vmk console: type help\r\n");
    for (;;) {
        puts_("> ");
        long n = 0;
        for (;;) {
            char c;
            if (vmk_recv(RX, &c, 1) != 1) return 1;
            if (c == '\r' || c == '\n') break;
            if ((c == 8 || c == 127) && n) { n--; puts_("\b \b"); continue; }
            if (n < (long)sizeof line - 1) { line[n++] = c; vmk_send(TX, &c, 1); }
        }
        line[n] = 0;
        puts_("\r\n");
        if (starts(line, "exit")) { puts_("bye\r\n"); return 0; }
        long fid = vmk_fiber_spawn((void *)job, 0, (long)line);
        if (fid < 0) { puts_("fiber_spawn failed\r\n"); continue; }
        vmk_fiber_join(fid);
    }
}
