/* io.h - port I/O, MMIO and CPU helpers for the vmk bare-metal guests. */
#ifndef BM_IO_H
#define BM_IO_H

#include <stdint.h>
#include <stddef.h>

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline uint32_t mmio_read32(uintptr_t addr) { return *(volatile uint32_t *)addr; }
static inline void mmio_write32(uintptr_t addr, uint32_t v) { *(volatile uint32_t *)addr = v; }

static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void pause(void) { __asm__ volatile("pause" ::: "memory"); }
/* A cheap delay step: a compiler barrier (emulators run it at full speed; `pause` exits the TCG loop). */
static inline void spin(void) { __asm__ volatile("" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
/* "sti; hlt": the STI shadow makes the pair atomic, so an interrupt that is
 * already pending wakes the HLT instead of being taken before it. */
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }

static inline uint64_t read_rflags(void) { uint64_t f; __asm__ volatile("pushfq; popq %0" : "=r"(f)); return f; }
/* Save IF and disable interrupts; restore with irq_restore(). */
static inline uint64_t irq_save(void) { uint64_t f = read_rflags(); cli(); return f; }
static inline void irq_restore(uint64_t f) { if (f & (1u << 9)) sti(); }

static inline uint64_t rdtsc(void) { uint32_t lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((uint64_t)hi << 32) | lo; }
static inline uint64_t read_cr2(void) { uint64_t v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }

/* Debug devices (QEMU: -device isa-debug-exit,iobase=0xf4,iosize=0x04 and -debugcon). */
#define DEBUG_EXIT_PORT 0xF4
#define DEBUGCON_PORT   0xE9

/* isa-debug-exit: the emulator exits with status (code << 1) | 1.
 * If no such device is present, fall back to halting forever. */
static inline __attribute__((noreturn)) void debug_exit(uint8_t code)
{
    outb(DEBUG_EXIT_PORT, code);
    for (;;) __asm__ volatile("cli; hlt");
}

static inline void debugcon_putc(char c) { outb(DEBUGCON_PORT, (uint8_t)c); }
static inline void debugcon_puts(const char *s) { while (*s) debugcon_putc(*s++); }

#endif
