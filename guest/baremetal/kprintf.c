/* kprintf.c - minimal printf for bare-metal guests. */
#include <stdint.h>
#include "kprintf.h"
#include "io.h"

static void null_putc(char c) { (void)c; }
void (*console_putc)(char c) = null_putc;

static void put_uint(void (*putc)(char), uint64_t v, unsigned base, int upper,
                     int width, char pad, int neg)
{
    char tmp[24];
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    int n = 0;
    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);
    if (neg && pad == '0') {
        putc('-');
        width--;
    }
    for (int w = n + ((neg && pad != '0') ? 1 : 0); w < width; w++)
        putc(pad);
    if (neg && pad != '0')
        putc('-');
    while (n)
        putc(tmp[--n]);
}

void kvprintf(void (*putc)(char), const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            putc(*fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l' || *fmt == 'z') {
            lng++;
            fmt++;
        }
        switch (*fmt) {
        case 'c':
            putc((char)va_arg(ap, int));
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            int len = 0;
            while (s[len])
                len++;
            for (int w = len; w < width; w++)
                putc(' ');
            while (*s)
                putc(*s++);
            break;
        }
        case 'd':
        case 'i': {
            int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
            put_uint(putc, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, 0, width, pad, v < 0);
            break;
        }
        case 'u':
            put_uint(putc, lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, 0, width, pad, 0);
            break;
        case 'x':
        case 'X':
            put_uint(putc, lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, *fmt == 'X',
                     width, pad, 0);
            break;
        case 'p':
            putc('0');
            putc('x');
            put_uint(putc, (uintptr_t)va_arg(ap, void *), 16, 0, width, pad, 0);
            break;
        case '%':
            putc('%');
            break;
        case '\0':
            return;
        default:
            putc('%');
            putc(*fmt);
            break;
        }
    }
}

int console_crlf = 1;

static void console_putc_crlf(char c)
{
    if (c == '\n' && console_crlf)
        console_putc('\r');
    console_putc(c);
}

void kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvprintf(console_putc_crlf, fmt, ap);
    va_end(ap);
}

void kputs(const char *s)
{
    while (*s)
        console_putc_crlf(*s++);
}

static char *sn_buf;
static size_t sn_pos, sn_size;
static void sn_putc(char c)
{
    if (sn_pos + 1 < sn_size)
        sn_buf[sn_pos] = c;
    sn_pos++;
}

int ksnprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    sn_buf = buf;
    sn_pos = 0;
    sn_size = size;
    va_start(ap, fmt);
    kvprintf(sn_putc, fmt, ap);
    va_end(ap);
    if (size)
        buf[sn_pos < size ? sn_pos : size - 1] = '\0';
    return (int)sn_pos;
}
