/* kprintf.h - minimal formatted output to a pluggable console. */
#ifndef BM_KPRINTF_H
#define BM_KPRINTF_H

#include <stdarg.h>
#include <stddef.h>

/* Console sink; serial_init() points it at COM1 (polled) by default. */
extern void (*console_putc)(char c);
/* If set (default), kprintf/kputs send "\r\n" for "\n". */
extern int console_crlf;

/* Supports %c %s %d %i %u %x %X %p %%, flag '0', a width, and l/ll/z lengths. */
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void kvprintf(void (*putc)(char), const char *fmt, va_list ap);
int ksnprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void kputs(const char *s);               /* no newline added */

#endif
