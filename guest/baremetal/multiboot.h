/* multiboot.h - multiboot v1 information structure (the fields we use). */
#ifndef BM_MULTIBOOT_H
#define BM_MULTIBOOT_H

#include <stdint.h>

#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002u

#define MBI_FLAG_MEM      (1u << 0)
#define MBI_FLAG_BOOTDEV  (1u << 1)
#define MBI_FLAG_CMDLINE  (1u << 2)
#define MBI_FLAG_MODS     (1u << 3)
#define MBI_FLAG_MMAP     (1u << 6)
#define MBI_FLAG_LOADER   (1u << 9)

struct multiboot_info {
    uint32_t flags;
    uint32_t mem_lower;         /* KiB below 1 MiB */
    uint32_t mem_upper;         /* KiB above 1 MiB (to the first hole) */
    uint32_t boot_device;
    uint32_t cmdline;           /* physical address of a C string */
    uint32_t mods_count;
    uint32_t mods_addr;
    uint32_t syms[4];
    uint32_t mmap_length;
    uint32_t mmap_addr;
    uint32_t drives_length;
    uint32_t drives_addr;
    uint32_t config_table;
    uint32_t boot_loader_name;  /* physical address of a C string */
} __attribute__((packed));

struct multiboot_mmap_entry {
    uint32_t size;              /* of the rest of the entry (normally 20) */
    uint64_t addr;
    uint64_t len;
    uint32_t type;              /* 1 = available RAM */
} __attribute__((packed));

#endif
