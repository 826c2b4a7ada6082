/*
 * _fasthooks: the few pieces of vmk that run on every interrupt, every I/O
 * access or every translation block, so they are C rather than Python.
 *
 * 1. Hook gateways.  Unicorn's Python binding turns every callback into a
 *    ctypes callback (argument conversion, GIL re-entry, a Python wrapper
 *    that catches exceptions): 1.5-4 us per call on a slow host.  Here each
 *    hook is a small C function that calls the Python callable it was given
 *    as user_data with vectorcall.  `emu_start` runs Unicorn *holding the
 *    GIL* (ctypes would release it), so a gateway calls straight into
 *    Python.  The first exception a callable raises is kept, the emulation
 *    is stopped, and `emu_start` raises it.  Other Python threads wait for
 *    the end of the slice (slices are bounded by the machine's quantum).
 *
 * 2. The interrupt window.  An interrupt can become pending while RFLAGS.IF=0
 *    (inside a handler, in a cli section).  It must be taken right after the
 *    guest sets IF again (STI + its shadow, POPF, IRET), but Unicorn cannot
 *    hook those instructions.  QEMU ends a translation block after each of
 *    them, so a block hook sees the first block after IF went to 1.  While
 *    the window is armed the block counter's hook (below) reads RFLAGS and
 *    stops the emulation when IF=1; the machine then delivers at that exact
 *    instruction boundary.  Disarmed, it costs nothing.
 *
 * 3. Interrupt delivery, the common case.  `deliver64` delivers a hardware
 *    interrupt or exception in long mode through a 64-bit interrupt or trap
 *    gate whose handler runs at the current privilege on the current stack:
 *    it reads the IDT gate and the GDT code descriptor by linear address
 *    (4-level walk, A/D bits set as the CPU sets them), checks them as the
 *    SDM says, pushes SS:RSP, RFLAGS, CS:RIP (and the error code) and loads
 *    RIP/RSP/RFLAGS.  Anything else (a fault on the way, IST, a privilege
 *    change, legacy mode, a bad gate) returns SLOW without having changed
 *    the CPU, and x86.py's general path delivers it, faults included.
 *
 * Unicorn's functions are passed in as addresses from the ctypes binding, so
 * this module does not link against libunicorn.  The saved-context offsets
 * (Unicorn 2.1.4's CPUX86State) are passed in by cpu.py, which measures and
 * tests them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <stdlib.h>

typedef int (*uc_reg_read_fn)(void *uc, int regid, void *value);
typedef int (*uc_reg_batch_fn)(void *uc, int *regs, void **vals, int count);
typedef int (*uc_emu_stop_fn)(void *uc);
typedef int (*uc_emu_start_fn)(void *uc, uint64_t begin, uint64_t until, uint64_t timeout, size_t count);
typedef int (*uc_context_save_fn)(void *uc, void *context);
typedef int (*uc_vmem_read_fn)(void *uc, uint64_t address, int prot, void *bytes, size_t size);

static uc_reg_read_fn p_reg_read;
static uc_reg_batch_fn p_reg_write_batch;
static uc_emu_stop_fn p_emu_stop;
static uc_emu_start_fn p_emu_start;
static uc_context_save_fn p_context_save;
static uc_vmem_read_fn p_vmem_read;
static int rflags_id, rip_id, rsp_id;

/* Saved-context offsets (cpu.py's Ctx). */
static Py_ssize_t off_regs, off_rip, off_eflags, off_hflags, off_segs, off_gdt, off_idt, off_cr0, off_cr3;
#define SEG_SIZE 24
#define SEG_CS 1
#define SEG_SS 2

/* The first exception raised by a Python callable during emu_start. */
static PyObject *exc_type, *exc_value, *exc_tb;

static void hook_failed(void *uc)
{
    if (exc_type == NULL)
        PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
    else
        PyErr_Clear();
    p_emu_stop(uc);
}

static PyObject *call(void *uc, void *callable, PyObject *const *args, size_t n)
{
    PyObject *r = PyObject_Vectorcall((PyObject *)callable, args, n, NULL);
    if (r == NULL)
        hook_failed(uc);
    return r;
}

static void drop(PyObject **args, size_t n)
{
    for (size_t i = 0; i < n; i++)
        Py_XDECREF(args[i]);
}

/* ---------------------------------------------------------------- gateways */

static uint32_t gw_in(void *uc, uint32_t port, int size, void *ud)
{
    PyObject *a[2] = {PyLong_FromUnsignedLong(port), PyLong_FromLong(size)};
    PyObject *r = call(uc, ud, a, 2);
    drop(a, 2);
    if (r == NULL)
        return 0xFFFFFFFFu;
    uint32_t v = (uint32_t)PyLong_AsUnsignedLongLongMask(r);
    Py_DECREF(r);
    if (PyErr_Occurred())
        hook_failed(uc);
    return v;
}

static void gw_out(void *uc, uint32_t port, int size, uint32_t value, void *ud)
{
    PyObject *a[3] = {PyLong_FromUnsignedLong(port), PyLong_FromLong(size), PyLong_FromUnsignedLong(value)};
    PyObject *r = call(uc, ud, a, 3);
    drop(a, 3);
    Py_XDECREF(r);
}

static void gw_void(void *uc, void *ud)
{
    PyObject *r = call(uc, ud, NULL, 0);
    Py_XDECREF(r);
}

/* SYSCALL: callable(rax, rdi, rsi, rdx, r10, r8, r9) -> int (loaded into RAX) or None. */
static int sys_ids[7];
static int rax_id, rdx_id;
typedef int (*uc_reg_read_batch_fn)(void *uc, int *regs, void **vals, int count);
static uc_reg_read_batch_fn p_reg_read_batch;
typedef int (*uc_reg_write_fn)(void *uc, int regid, const void *value);
static uc_reg_write_fn p_reg_write;

/* last_n of the block counter running now (block mode), see bc_select: a
   syscall ends its block, and the door may switch to another context whose
   RIP lies in the same block; with last_n = 0 the time is the counter's. */
static uint32_t *cur_last_n;

static void gw_syscall(void *uc, void *ud)
{
    uint64_t v[7];
    if (cur_last_n != NULL)
        *cur_last_n = 0;
    void *ptrs[7];
    for (int i = 0; i < 7; i++)
        ptrs[i] = &v[i];
    p_reg_read_batch(uc, sys_ids, ptrs, 7);
    PyObject *a[7];
    for (int i = 0; i < 7; i++)
        a[i] = PyLong_FromUnsignedLongLong(v[i]);
    PyObject *r = call(uc, ud, a, 7);
    drop(a, 7);
    if (r == NULL)
        return;
    if (r != Py_None) {
        uint64_t rax = PyLong_AsUnsignedLongLongMask(r);   /* negative errno wraps, as in the ABI */
        if (PyErr_Occurred())
            hook_failed(uc);
        else
            p_reg_write(uc, rax_id, &rax);
    }
    Py_DECREF(r);
}

/* CPUID / RDTSC shape: nonzero return = the hook emulated the instruction. */
static int gw_int(void *uc, void *ud)
{
    PyObject *r = call(uc, ud, NULL, 0);
    if (r == NULL)
        return 0;
    int v = PyObject_IsTrue(r);
    Py_DECREF(r);
    return v > 0;
}

static bool gw_bool(void *uc, void *ud)
{
    return gw_int(uc, ud) != 0;
}

static void gw_intr(void *uc, uint32_t intno, void *ud)
{
    PyObject *a[1] = {PyLong_FromUnsignedLong(intno)};
    PyObject *r = call(uc, ud, a, 1);
    drop(a, 1);
    Py_XDECREF(r);
}

static bool gw_mem(void *uc, int type, uint64_t address, int size, int64_t value, void *ud)
{
    PyObject *a[4] = {PyLong_FromLong(type), PyLong_FromUnsignedLongLong(address), PyLong_FromLong(size),
                      PyLong_FromLongLong(value)};
    PyObject *r = call(uc, ud, a, 4);
    drop(a, 4);
    if (r == NULL)
        return false;
    int v = PyObject_IsTrue(r);
    Py_DECREF(r);
    return v > 0;
}

/* A UC_HOOK_MEM_READ/WRITE that does nothing: while one exists, Unicorn syncs
   RIP before every memory access, so an MMIO callback sees the instruction's
   own RIP (block mode needs it for the exact time; see CPU.map_mmio). */
static void gw_mem_noop(void *uc, int type, uint64_t address, int size, int64_t value, void *ud)
{
    (void)uc; (void)type; (void)address; (void)size; (void)value; (void)ud;
}

static uint64_t gw_mmio_read(void *uc, uint64_t offset, unsigned size, void *ud)
{
    PyObject *a[2] = {PyLong_FromUnsignedLongLong(offset), PyLong_FromUnsignedLong(size)};
    PyObject *r = call(uc, ud, a, 2);
    drop(a, 2);
    if (r == NULL)
        return 0;
    uint64_t v = PyLong_AsUnsignedLongLongMask(r);
    Py_DECREF(r);
    if (PyErr_Occurred())
        hook_failed(uc);
    return v;
}

/* 1 while a device's MMIO write callback runs (CPU.request_stop reads it through ctypes). */
static int32_t mmio_writing;

static void gw_mmio_write(void *uc, uint64_t offset, unsigned size, uint64_t value, void *ud)
{
    PyObject *a[3] = {PyLong_FromUnsignedLongLong(offset), PyLong_FromUnsignedLong(size),
                      PyLong_FromUnsignedLongLong(value)};
    mmio_writing = 1;
    PyObject *r = call(uc, ud, a, 3);
    mmio_writing = 0;
    drop(a, 3);
    Py_XDECREF(r);
}


/* ---------------------------------------------------------------- block counting (prototype)
 *
 * Unicorn's count mode calls a helper before every instruction.  In block mode
 * the CPU runs with count=0 and this UC_HOOK_BLOCK callback adds a whole
 * block's instruction count when the block is entered; the count comes from
 * a cache keyed by (address, size) and, on a miss, from decode(address, size)
 * in Python (capstone).  A block that would pass `limit` is not entered: the
 * hook calls emu_stop, which ends the run before the block (checked by
 * tests/machine/test_block_count.py), and cpu.py runs the rest of the budget
 * in count mode.  The layout is read and written by cpu.py through ctypes at
 * the BC_* offsets it declares: keep them in step.
 *
 * Self-modifying code: an entry also keeps which translation it was seen from
 * (the hook's return address, inside the translated block: Unicorn calls a
 * lone block hook directly) and a hash of the block's bytes.  A block
 * entered from another translation (Unicorn translates again after a write
 * to the block's page, or after a flush) has its bytes hashed again, in C:
 * the same bytes keep the count, other bytes are decoded again.  Before,
 * code rewritten in place with the same block size kept its old count:
 * Linux's alternatives patching put block mode 10 us behind count mode from
 * "Freeing SMP alternatives memory" on.
 *
 * With a second block hook Unicorn calls each through its dispatcher, and the
 * return address names no translation: it lies outside the translation
 * buffer (code_lo..code_hi), and then every entry of the block has its bytes
 * checked (exact, slower).  vmk installs no second block hook.
 *
 * The interrupt window: while armed, the first block entered with RFLAGS.IF=1
 * is not counted and ends the run before it (it was a second block hook).
 */
#define BC_SLOTS 65536
/* Entries per set, most recent first.  Direct-mapped (one way), two hot blocks
   of one loop that hashed to the same slot evicted each other on every entry:
   Linux's decompressor went to Python and capstone 2 x 127,640 times in its
   first 0.6 s (half the run's wall time). */
#define BC_WAYS 4
#define BC_PRECISE 0x80000000u    /* decode's flag: run this block in count mode */
typedef struct {
    uint64_t pc;
    uint64_t cr3;
    uint32_t size;
    uint32_t n;         /* instructions, | BC_PRECISE; 0: none (a free slot) */
    uint64_t host;      /* the translation it was last entered from (0: check the bytes) */
    uint64_t sum;       /* hash of its bytes */
} bc_entry;
typedef struct {
    uint64_t counter;   /*  0: instructions of the blocks entered */
    uint64_t limit;     /*  8: a block that would pass this is not entered */
    int32_t active;     /* 16: 0 = the hook does nothing (count mode) */
    int32_t hit;        /* 20: 1 the limit ended the run, 2 a BC_PRECISE block did */
    uint64_t last_pc;   /* 24: the block entered last */
    uint32_t last_size; /* 32 */
    uint32_t last_n;    /* 36 */
    uint64_t misses;    /* 40: decode calls */
    uint64_t last_cr3;  /* 48: CR3 when the last block was entered */
    const volatile uint64_t *cr3p;  /* 56: the live env->cr[3] (bc_new given 0: a zero, keys without it) */
    PyObject *decode;   /* 64 */
    bc_entry memo;      /* 72: the entry found last (a loop finds its block here, not in the
                           table); after hit 1, the block that was not entered */
    bc_entry table[BC_SLOTS];
    volatile int32_t *window;   /* the CPU's interrupt window, int32[2]: [0] armed, [1] fired
                                   (arming also clears memo.host: see block_count_hook) */
    const volatile uint64_t *eflagsp;  /* the live env->eflags */
    uint64_t code_lo, code_hi;  /* the translation buffer: a return address elsewhere names no translation */
    PyObject *insns;            /* the CPU's {(pc, size, cr3): instruction addresses} (borrowed: the CPU owns it) */
    const volatile uint64_t *ripp;  /* the live env->eip */
    PyObject *time_fn;          /* time_fn(owner, elapsed ns in the slice) -> virtual ns, the RDTSC value; */
    PyObject *time_owner;       /* a weakref to owner (C must not keep the machine alive); NULL: the hook */
    uint64_t ns_per_insn;
} blockcount;

static blockcount *cur_bc;      /* the counter of the block-mode run in progress (bc_select) */

static uint8_t bc_bytes[8192];

/* FNV-1a over the block's bytes, read through the current page tables (as
   the decode reads them); 0 when they cannot be read. */
static uint64_t block_sum(void *uc, uint64_t pc, uint32_t size)
{
    if (size > sizeof(bc_bytes) || p_vmem_read(uc, pc, 4 /* UC_PROT_EXEC */, bc_bytes, size) != 0)
        return 0;
    uint64_t h = 0xcbf29ce484222325ull;
    for (uint32_t i = 0; i < size; i++)
        h = (h ^ bc_bytes[i]) * 0x100000001b3ull;
    return h | 1;
}


/* The window is open (RFLAGS.IF=1): this block is not entered. */
static __attribute__((noinline)) int window_opens(void *uc, blockcount *b)
{
    /* IF from the live env->eflags (IF is never kept lazily, unlike the
       arithmetic flags): uc_reg_read(RFLAGS) computes them all, and Linux
       spends long stretches with the window armed (4% of its boot). */
    if (!(*b->eflagsp & 0x200))
        return 0;
    b->window[0] = 0;
    b->window[1] = 1;
    b->last_n = 0;
    p_emu_stop(uc);
    return 1;
}

/* The hook's table look-up, decode and stops (block_count_hook is the fast path). */
static __attribute__((noinline)) void block_count_slow(void *uc, blockcount *b, uint64_t pc, uint32_t size,
                                                       uint64_t cr3, uint64_t host)
{
    uint64_t k = pc ^ (pc >> 16) ^ (cr3 >> 12) ^ (cr3 >> 28);
    uint32_t h = (uint32_t)((k + ((uint64_t)size << 5)) * 0x9E3779B1u) >> 16;
    bc_entry *set = &b->table[h & ~(uint32_t)(BC_WAYS - 1)];
    if (b->window[0] && window_opens(uc, b))
        return;
    if (host < b->code_lo || host >= b->code_hi)
        host = 0;       /* called through Unicorn's dispatcher (another block hook exists): check the bytes */
    bc_entry *e = NULL;
    bc_entry fresh;
    uint32_t n;
    int i, stale = BC_WAYS - 1;
    for (i = 0; i < BC_WAYS; i++) {
        if (set[i].pc == pc && set[i].size == size && set[i].cr3 == cr3 && set[i].n)
            break;
    }
    if (i < BC_WAYS && (set[i].host != host || !host)) {
        /* Another translation of the block: the count holds if its bytes do. */
        uint64_t sum = block_sum(uc, pc, size);
        if (sum && sum == set[i].sum) {             /* 0: unreadable, not "the same" */
            set[i].host = host;
        } else {
            stale = i;                              /* its place goes to the new decode */
            i = BC_WAYS;
        }
    }
    if (i < BC_WAYS) {
        if (!b->active)
            return;
        if (i) {                                    /* to the front of its set */
            bc_entry hit = set[i];
            memmove(&set[1], &set[0], (size_t)i * sizeof(bc_entry));
            set[0] = hit;
        }
        e = &set[0];
        n = e->n;
    } else {
        if (!b->active && !PyGILState_Check())
            return;     /* a stock uc.emu_start (GIL released), not CPU.run */
        PyObject *a[3] = {PyLong_FromUnsignedLongLong(pc), PyLong_FromUnsignedLong(size),
                          PyLong_FromUnsignedLongLong(cr3)};
        PyObject *r = call(uc, b->decode, a, 3);
        drop(a, 3);
        if (r == NULL)
            return;
        n = (uint32_t)PyLong_AsUnsignedLong(r);
        Py_DECREF(r);
        if (PyErr_Occurred()) {
            hook_failed(uc);
            return;
        }
        b->misses++;
        fresh.pc = pc;
        fresh.cr3 = cr3;
        fresh.size = size;
        fresh.n = n;
        fresh.host = host;
        fresh.sum = block_sum(uc, pc, size);
        if (n) {                                    /* the stale or the least recent entry goes */
            memmove(&set[1], &set[0], (size_t)stale * sizeof(bc_entry));
            set[0] = fresh;
            e = &set[0];
        } else {
            e = &fresh;                             /* not counted: the block runs again, hooked */
        }
        if (!b->active)
            return;
    }
    b->memo = *e;
    if (b->window[0])
        b->memo.host = 0;                           /* armed: the next block comes here too */
    if (n & BC_PRECISE) {
        /* The block does port I/O: its hooks may need to stop right after
           their instruction (a #GP, an interrupt), which only count mode
           can do; end the block-mode run before it. */
        b->hit = 2;
        b->last_n = 0;
        p_emu_stop(uc);
        return;
    }
    if (b->counter + n > b->limit) {
        b->hit = 1;
        b->last_n = 0;
        p_emu_stop(uc);
        return;
    }
    b->counter += n;
    b->last_pc = pc;
    b->last_cr3 = cr3;
    b->last_size = size;
    b->last_n = n;
}

/* Discussion: this hook runs once per block executed (a direct call from the
   translated code when it is the only block hook), so in a tight loop its
   own cost is most of block mode's overhead: perf on benchloop put 46% of
   the process in it against 15% in the translated code.  The common case
   (the block entered last, or the one before it in a loop, under the budget)
   is a leaf with no stack frame: the memo of the entry used last instead of
   the hash and the table, and no stores but the counts.  (A call made from
   it would cost the frame: the window is checked in the slow path.  Arming
   clears memo.host, as no translation has address 0, and the slow path keeps
   it cleared while the window stays armed, so every block comes through it
   until the window opens.) */
static void block_count_hook(void *uc, uint64_t pc, uint32_t size, void *ud)
{
    blockcount *b = (blockcount *)ud;
    uint64_t host = (uint64_t)(uintptr_t)__builtin_return_address(0);
    uint64_t cr3 = *b->cr3p;
    uint32_t n = b->memo.n;
    if (b->memo.host == host && b->memo.pc == pc && b->memo.size == size && b->memo.cr3 == cr3 && n
            && !(n & BC_PRECISE) && b->counter + n <= b->limit && b->active) {
        b->counter += n;
        b->last_pc = pc;
        b->last_cr3 = cr3;
        b->last_size = size;
        b->last_n = n;
        return;
    }
    /* Inactive (count mode) the slow path still decodes each new block once:
       the decode finds the instructions cpu.py emulates (insn emulation block). */
    block_count_slow(uc, b, pc, size, cr3, host);
}

static PyObject *bc_new(PyObject *self, PyObject *args)
{
    PyObject *decode;
    unsigned long long cr3a, windowa, eflagsa, code_lo, code_hi;
    (void)self;
    if (!PyArg_ParseTuple(args, "OKKKKK", &decode, &cr3a, &windowa, &eflagsa, &code_lo, &code_hi))
        return NULL;
    blockcount *b = (blockcount *)calloc(1, sizeof(blockcount));
    if (b == NULL)
        return PyErr_NoMemory();
    Py_INCREF(decode);
    b->decode = decode;
    static const uint64_t no_cr3 = 0;
    static int32_t no_window[2];
    static const uint64_t no_eflags = 0;
    b->cr3p = cr3a ? (const volatile uint64_t *)(uintptr_t)cr3a : &no_cr3;
    b->window = windowa ? (volatile int32_t *)(uintptr_t)windowa : no_window;
    b->eflagsp = eflagsa ? (const volatile uint64_t *)(uintptr_t)eflagsa : &no_eflags;
    b->code_lo = code_lo;
    b->code_hi = code_hi;
    return PyLong_FromVoidPtr(b);
}

/* Instructions the running block-mode run has retired up to and including
   the one at `rip` (the hook that asks runs in it: IN/OUT/CPUID/RDTSC and MMIO
   sync RIP).  1: *out set; 0: the block's instruction addresses are not in
   `insns` (cpu.py decodes then); -1: a Python error. */
static int bc_retired_at(const blockcount *b, PyObject *insns, uint64_t rip, uint64_t *out)
{
    uint32_t n = b->last_n;
    uint64_t pc = b->last_pc;
    if (n <= 1 || rip < pc || rip >= pc + b->last_size) {
        *out = b->counter;
        return 1;
    }
    PyObject *key = Py_BuildValue("(KIK)", (unsigned long long)pc, (unsigned int)b->last_size,
                                  (unsigned long long)b->last_cr3);
    if (key == NULL)
        return -1;
    PyObject *addrs = PyDict_GetItemWithError(insns, key);      /* borrowed */
    Py_DECREF(key);
    if (addrs == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_Check(addrs)) {
        PyErr_SetString(PyExc_TypeError, "block instruction addresses must be a tuple");
        return -1;
    }
    Py_ssize_t lo = 0, hi = PyTuple_GET_SIZE(addrs);
    while (lo < hi) {                                            /* bisect_left */
        Py_ssize_t mid = (lo + hi) / 2;
        unsigned long long v = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(addrs, mid));
        if (v == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        if (v < rip)
            lo = mid + 1;
        else
            hi = mid;
    }
    *out = b->counter - n + (uint64_t)lo + 1;
    return 1;
}

/* bc_retired(bc, insns, rip_address) -> bc_retired_at, or None when the
   block's addresses are not known.  cpu.py's retired_in_slice, phase 1, in
   one call: it was 70% of an RDTSC. */
static PyObject *bc_retired(PyObject *self, PyObject *args)
{
    unsigned long long bca, ripa;
    PyObject *insns;
    uint64_t r;
    (void)self;
    if (!PyArg_ParseTuple(args, "KO!K", &bca, &PyDict_Type, &insns, &ripa))
        return NULL;
    switch (bc_retired_at((const blockcount *)(uintptr_t)bca, insns, *(const volatile uint64_t *)(uintptr_t)ripa, &r)) {
    case 1:
        return PyLong_FromUnsignedLongLong(r);
    case 0:
        Py_RETURN_NONE;
    default:
        return NULL;
    }
}

/* bc_timing(bc, insns, rip_address, fn, owner_weakref, ns_per_insn), or with
   fn None: no RDTSC in C.  What gw_rdtsc needs. */
static PyObject *bc_timing(PyObject *self, PyObject *args)
{
    unsigned long long bca, ripa, nspi;
    PyObject *insns, *fn, *owner;
    (void)self;
    if (!PyArg_ParseTuple(args, "KO!KOOK", &bca, &PyDict_Type, &insns, &ripa, &fn, &owner, &nspi))
        return NULL;
    if (fn != Py_None && !PyWeakref_CheckRef(owner)) {
        PyErr_SetString(PyExc_TypeError, "bc_timing: the owner must be a weakref");
        return NULL;
    }
    blockcount *b = (blockcount *)(uintptr_t)bca;
    b->insns = insns;
    b->ripp = (const volatile uint64_t *)(uintptr_t)ripa;
    b->ns_per_insn = nspi;
    Py_CLEAR(b->time_fn);
    Py_CLEAR(b->time_owner);
    if (fn != Py_None) {
        Py_INCREF(fn);
        Py_INCREF(owner);
        b->time_fn = fn;
        b->time_owner = owner;
    }
    Py_RETURN_NONE;
}

/* RDTSC (UC_HOOK_INSN; ud: the Python hook, as gw_int's).  In a block-mode
   run the time is computed here, without the hook: the instruction count from
   the block counter, the time from time_fn (one Python call instead of five
   frames and three register round trips; Linux's delay loops read the TSC
   millions of times). */
static int gw_rdtsc(void *uc, void *ud)
{
    blockcount *b = cur_bc;
    uint64_t retired;
    if (b == NULL || b->time_fn == NULL || b->insns == NULL)
        return gw_int(uc, ud);
    PyObject *owner = PyWeakref_GetObject(b->time_owner);          /* borrowed */
    if (owner == Py_None)
        return gw_int(uc, ud);
    int found = bc_retired_at(b, b->insns, *b->ripp, &retired);
    if (found < 0) {
        hook_failed(uc);
        return 0;
    }
    if (found == 0)
        return gw_int(uc, ud);                  /* the hook decodes the block */
    Py_INCREF(owner);
    PyObject *a[2] = {owner, PyLong_FromUnsignedLongLong(retired * b->ns_per_insn)};
    PyObject *r = call(uc, b->time_fn, a, 2);
    drop(a, 2);
    if (r == NULL)
        return 0;
    uint64_t t = PyLong_AsUnsignedLongLong(r);
    Py_DECREF(r);
    if (t == (uint64_t)-1 && PyErr_Occurred()) {
        hook_failed(uc);
        return 0;
    }
    uint64_t lo = t & 0xFFFFFFFFu, hi = t >> 32;
    p_reg_write(uc, rax_id, &lo);
    p_reg_write(uc, rdx_id, &hi);
    return 1;
}

/* After a flush of the translations: Unicorn places the new ones from the
   start of its buffer again, so a rewritten block could come back at the
   address its old translation had; every entry checks its bytes once. */
static PyObject *bc_forget_translations(PyObject *self, PyObject *arg)
{
    (void)self;
    blockcount *b = (blockcount *)PyLong_AsVoidPtr(arg);
    if (b == NULL)
        return NULL;
    for (size_t i = 0; i < BC_SLOTS; i++)
        b->table[i].host = 0;
    b->memo.host = 0;
    Py_RETURN_NONE;
}

static PyObject *bc_select(PyObject *self, PyObject *arg)
{
    (void)self;
    blockcount *b = (blockcount *)PyLong_AsVoidPtr(arg);
    if (PyErr_Occurred())
        return NULL;
    cur_last_n = b != NULL ? &b->last_n : NULL;
    cur_bc = b;
    Py_RETURN_NONE;
}

static PyObject *bc_free(PyObject *self, PyObject *arg)
{
    (void)self;
    blockcount *b = (blockcount *)PyLong_AsVoidPtr(arg);
    if (b == NULL)
        return NULL;
    if (cur_last_n == &b->last_n)
        cur_last_n = NULL;
    if (cur_bc == b)
        cur_bc = NULL;
    Py_XDECREF(b->decode);
    Py_XDECREF(b->time_fn);
    Py_XDECREF(b->time_owner);
    free(b);
    Py_RETURN_NONE;
}


/* ---------------------------------------------------------------- running */

/* run(uc, count, until) -> (uc_err, RFLAGS after): emu_start from the current RIP, GIL held. */
static PyObject *run(PyObject *self, PyObject *args)
{
    unsigned long long uc, count, until;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKK", &uc, &count, &until))
        return NULL;
    void *h = (void *)(uintptr_t)uc;
    uint64_t rip = 0;
    p_reg_read(h, rip_id, &rip);
    int status = p_emu_start(h, rip, until, 0, (size_t)count);
    if (exc_type != NULL) {
        PyErr_Restore(exc_type, exc_value, exc_tb);
        exc_type = exc_value = exc_tb = NULL;
        return NULL;
    }
    uint64_t rflags = 0;
    p_reg_read(h, rflags_id, &rflags);
    return Py_BuildValue("iK", status, (unsigned long long)rflags);
}

/* ---------------------------------------------------------------- registers */

/* regs_read(uc, ids_addr, n) -> list of n uint64 (ids_addr: a C int array). */
static PyObject *regs_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "regs_read(uc, ids, n)");
        return NULL;
    }
    void *uc = PyLong_AsVoidPtr(args[0]);
    int *ids = (int *)PyLong_AsVoidPtr(args[1]);
    Py_ssize_t n = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (n < 0 || n > 64) {
        PyErr_SetString(PyExc_ValueError, "regs_read: at most 64 registers");
        return NULL;
    }
    uint64_t vals[64];
    void *ptrs[64];
    for (Py_ssize_t i = 0; i < n; i++) {
        vals[i] = 0;
        ptrs[i] = &vals[i];
    }
    p_reg_read_batch(uc, ids, ptrs, (int)n);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(vals[i]);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    return out;
}

/* regs_write(uc, ids_addr, values): values is a list or tuple of ints (masked to 64 bits). */
static PyObject *regs_write(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "regs_write(uc, ids, values)");
        return NULL;
    }
    void *uc = PyLong_AsVoidPtr(args[0]);
    int *ids = (int *)PyLong_AsVoidPtr(args[1]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *seq = PySequence_Fast(args[2], "regs_write: values must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > 64) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "regs_write: at most 64 registers");
        return NULL;
    }
    uint64_t vals[64];
    void *ptrs[64];
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        vals[i] = PyLong_AsUnsignedLongLongMask(items[i]);
        ptrs[i] = &vals[i];
    }
    Py_DECREF(seq);
    if (PyErr_Occurred())
        return NULL;
    p_reg_write_batch(uc, ids, ptrs, (int)n);
    Py_RETURN_NONE;
}

/* regs_swap(uc, ids_addr, old, new, rip_index, delta): one context switch.
   Reads the registers into list ``old`` (in place; old[rip_index] += delta) and
   loads list ``new`` (new[rip_index] - delta goes to the CPU; ``new`` is not
   changed).  Both lists have one entry per id.  A switch inside the SYSCALL
   hook passes delta 2: Unicorn adds 2 to RIP after the hook. */
static PyObject *regs_swap(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6 || !PyList_CheckExact(args[2]) || !PyList_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "regs_swap(uc, ids, old: list, new: list, rip_index, delta)");
        return NULL;
    }
    void *uc = PyLong_AsVoidPtr(args[0]);
    int *ids = (int *)PyLong_AsVoidPtr(args[1]);
    Py_ssize_t rip = PyLong_AsSsize_t(args[4]);
    long long delta = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *old = args[2], *new = args[3];
    Py_ssize_t n = PyList_GET_SIZE(new);
    if (n > 64 || PyList_GET_SIZE(old) != n || rip < 0 || rip >= n) {
        PyErr_SetString(PyExc_ValueError, "regs_swap: lists of equal length <= 64, rip_index inside");
        return NULL;
    }
    uint64_t vals[64];
    void *ptrs[64];
    for (Py_ssize_t i = 0; i < n; i++) {
        vals[i] = PyLong_AsUnsignedLongLongMask(PyList_GET_ITEM(new, i));
        ptrs[i] = &vals[i];
    }
    if (PyErr_Occurred())
        return NULL;
    vals[rip] -= (uint64_t)delta;
    uint64_t outv[64];
    void *outp[64];
    for (Py_ssize_t i = 0; i < n; i++) {
        outv[i] = 0;
        outp[i] = &outv[i];
    }
    p_reg_read_batch(uc, ids, outp, (int)n);
    outv[rip] += (uint64_t)delta;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(outv[i]);
        if (v == NULL)
            return NULL;
        PyList_SetItem(old, i, v);          /* steals v, drops the old item */
    }
    p_reg_write_batch(uc, ids, ptrs, (int)n);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- delivery */

#define PTE_P 1ull
#define PTE_W 2ull
#define PTE_A 0x20ull
#define PTE_D 0x40ull
#define PTE_PS 0x80ull
#define ADDR52 0x000FFFFFFFFFF000ull
#define CR0_WP (1ull << 16)
#define CR0_PG (1ull << 31)
#define HF_CPL 3u
#define HF_INHIBIT_IRQ (1u << 3)
#define HF_LMA (1u << 14)
#define EFL_IF 0x200ull
#define EFL_TF 0x100ull
#define EFL_NT 0x4000ull
#define EFL_RF 0x10000ull
#define EFL_VM 0x20000ull

enum { OK = 0, SLOW = 1 };

static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* A supervisor access through 4-level paging; returns the physical address or
 * -1 (not present, not writable with CR0.WP, tables outside RAM, ...: the
 * general walk in Python decides which fault that is).  Sets A on every level
 * and D on the leaf of a write, as the CPU does. */
static int64_t walk(uint8_t *ram, uint64_t ram_size, uint64_t cr0, uint64_t cr3, uint64_t linear, int write)
{
    static const int shifts[4] = {39, 30, 21, 12};
    uint64_t table = cr3 & ADDR52;
    uint64_t touched[4];
    int n = 0;
    int writable = 1;
    for (int depth = 0; depth < 4; depth++) {
        uint64_t a = table + ((linear >> shifts[depth]) & 0x1FF) * 8;
        if (a + 8 > ram_size)
            return -1;
        uint64_t e = ld64(ram + a);
        if (!(e & PTE_P))
            return -1;
        writable &= (e & PTE_W) != 0;
        touched[n++] = a;
        int large = depth > 0 && depth < 3 && (e & PTE_PS);
        if (depth == 3 || large) {
            if (write && !writable && (cr0 & CR0_WP))
                return -1;
            uint64_t size = 1ull << shifts[depth];
            uint64_t frame = e & ADDR52 & ~(size - 1);
            for (int i = 0; i < n; i++) {
                uint64_t v = ld64(ram + touched[i]) | PTE_A;
                if (write && i == n - 1)
                    v |= PTE_D;
                st64(ram + touched[i], v);
            }
            return (int64_t)(frame | (linear & (size - 1)));
        }
        table = e & ADDR52;
    }
    return -1;
}

/* Read `len` (<= 16) bytes at a linear address that does not cross a page. */
static int read_linear(uint8_t *ram, uint64_t ram_size, uint64_t cr0, uint64_t cr3, uint64_t linear,
                       uint8_t *out, unsigned len)
{
    if ((linear & 0xFFF) + len > 0x1000)
        return -1;
    int64_t pa = walk(ram, ram_size, cr0, cr3, linear, 0);
    if (pa < 0 || (uint64_t)pa + len > ram_size)
        return -1;
    memcpy(out, ram + pa, len);
    return 0;
}

/*
 * deliver64(uc, ctx, ram, ram_size, vector, error_code, has_ec, fresh) -> 0 delivered / 1 slow
 * ctx: the uc_context buffer cpu.py reads (fresh=1: it already holds the
 * current state; otherwise it is saved here first and then holds it).
 */
static PyObject *deliver64(PyObject *self, PyObject *args)
{
    unsigned long long uc, ctxa, rama, ram_size, ec;
    unsigned int vector;
    int has_ec, fresh;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKIKii", &uc, &ctxa, &rama, &ram_size, &vector, &ec, &has_ec, &fresh))
        return NULL;
    void *h = (void *)(uintptr_t)uc;
    uint8_t *ctx = (uint8_t *)(uintptr_t)ctxa;
    uint8_t *ram = (uint8_t *)(uintptr_t)rama;
    if (!fresh)
        p_context_save(h, ctx);
    uint32_t hflags = ld32(ctx + off_hflags);
    uint64_t cr0 = ld64(ctx + off_cr0), cr3 = ld64(ctx + off_cr3);
    unsigned cpl = hflags & HF_CPL;
    if (!(hflags & HF_LMA) || !(cr0 & CR0_PG) || cpl == 3 || vector > 255)
        return PyLong_FromLong(SLOW);
    uint64_t idt_base = ld64(ctx + off_idt + 8);
    uint32_t idt_limit = ld32(ctx + off_idt + 16);
    if ((uint64_t)vector * 16 + 15 > idt_limit)
        return PyLong_FromLong(SLOW);
    uint8_t gate[16];
    if (read_linear(ram, ram_size, cr0, cr3, idt_base + vector * 16, gate, 16))
        return PyLong_FromLong(SLOW);
    uint32_t lo = ld32(gate), hi = ld32(gate + 4);
    unsigned gtype = (hi >> 8) & 0xF, ist = gate[4] & 7, sel = lo >> 16;
    if ((gtype != 0xE && gtype != 0xF) || !(hi & 0x8000) || ist)
        return PyLong_FromLong(SLOW);
    uint64_t offset = (lo & 0xFFFF) | (hi & 0xFFFF0000u) | ((uint64_t)ld32(gate + 8) << 32);
    uint64_t gdt_base = ld64(ctx + off_gdt + 8);
    uint32_t gdt_limit = ld32(ctx + off_gdt + 16);
    if ((sel & ~3u) == 0 || (sel & 4) || (sel | 7) > gdt_limit)
        return PyLong_FromLong(SLOW);
    uint8_t desc[8];
    if (read_linear(ram, ram_size, cr0, cr3, gdt_base + (sel & ~7u), desc, 8))
        return PyLong_FromLong(SLOW);
    uint32_t d_hi = ld32(desc + 4);
    /* present, S=1, code, L=1 */
    if (!(d_hi & (1u << 15)) || !(d_hi & (1u << 12)) || !(d_hi & (1u << 11)) || !(d_hi & (1u << 21)))
        return PyLong_FromLong(SLOW);
    unsigned dpl = (d_hi >> 13) & 3;
    unsigned new_cpl = (d_hi & (1u << 10)) ? cpl : dpl;
    if (dpl > cpl || new_cpl != cpl)
        return PyLong_FromLong(SLOW);
    uint32_t cs_sel = ld32(ctx + off_segs + SEG_SIZE * SEG_CS);
    uint32_t ss_sel = ld32(ctx + off_segs + SEG_SIZE * SEG_SS);
    if (((sel & ~3u) | new_cpl) != cs_sel)
        return PyLong_FromLong(SLOW);
    uint64_t rip = ld64(ctx + off_rip);
    uint64_t rsp = ld64(ctx + off_regs + 8 * 4);
    uint64_t rflags = 0;
    p_reg_read(h, rflags_id, &rflags);          /* the arithmetic flags are lazy in the context */
    uint64_t frame[6];
    unsigned n = 0;
    if (has_ec)
        frame[n++] = ec;
    frame[n++] = rip;
    frame[n++] = cs_sel;
    frame[n++] = rflags;
    frame[n++] = rsp;
    frame[n++] = ss_sel;
    uint64_t new_rsp = (rsp & ~0xFull) - 8 * n;
    /* Translate top-down (the CPU pushes SS first); a frame spans at most two pages. */
    uint64_t top = new_rsp + 8 * n - 1;
    int64_t pa_top = walk(ram, ram_size, cr0, cr3, top, 1);
    if (pa_top < 0)
        return PyLong_FromLong(SLOW);
    uint64_t split = (top & ~0xFFFull);
    if (split <= new_rsp) {
        uint64_t pa = (uint64_t)pa_top - (top - new_rsp);
        if (pa + 8 * n > ram_size)
            return PyLong_FromLong(SLOW);
        memcpy(ram + pa, frame, 8 * n);
    } else {
        int64_t pa_low = walk(ram, ram_size, cr0, cr3, new_rsp, 1);
        if (pa_low < 0)
            return PyLong_FromLong(SLOW);
        uint64_t low_len = split - new_rsp, high_len = 8 * n - low_len;
        uint64_t pa_high = (uint64_t)pa_top - (high_len - 1);
        if ((uint64_t)pa_low + low_len > ram_size || pa_high + high_len > ram_size)
            return PyLong_FromLong(SLOW);
        memcpy(ram + pa_low, frame, low_len);
        memcpy(ram + pa_high, (uint8_t *)frame + low_len, high_len);
    }
    uint64_t new_flags = rflags & ~(EFL_TF | EFL_NT | EFL_RF | EFL_VM);
    if (gtype == 0xE)
        new_flags &= ~EFL_IF;
    int ids[3] = {rip_id, rsp_id, rflags_id};
    uint64_t vals[3] = {offset, new_rsp, new_flags};
    void *ptrs[3] = {&vals[0], &vals[1], &vals[2]};
    p_reg_write_batch(h, ids, ptrs, 3);
    return PyLong_FromLong(OK);
}

/*
 * window(uc, ctx) -> 0 IF clear / 1 IF set but the STI/MOV SS shadow holds / 2 open
 * Saves the context into ctx (cpu.py then treats it as fresh).
 */
static PyObject *window(PyObject *self, PyObject *args)
{
    unsigned long long uc, ctxa;
    (void)self;
    if (!PyArg_ParseTuple(args, "KK", &uc, &ctxa))
        return NULL;
    uint8_t *ctx = (uint8_t *)(uintptr_t)ctxa;
    p_context_save((void *)(uintptr_t)uc, ctx);
    if (!(ld32(ctx + off_eflags) & EFL_IF))
        return PyLong_FromLong(0);
    return PyLong_FromLong(ld32(ctx + off_hflags) & HF_INHIBIT_IRQ ? 1 : 2);
}

/* ---------------------------------------------------------------- setup */

static PyObject *setup(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *names[] = {"reg_read", "reg_write_batch", "emu_stop", "emu_start", "context_save",
                            "reg_read_batch", "reg_write", "rip_id", "rsp_id", "rflags_id", "offsets",
                            "syscall_regs", "vmem_read", NULL};
    unsigned long long rr, rwb, es, est, cs, rrb, rw, vr;
    PyObject *offs, *sregs;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KKKKKKKiiiOOK", names, &rr, &rwb, &es, &est, &cs, &rrb, &rw,
                                     &rip_id, &rsp_id, &rflags_id, &offs, &sregs, &vr))
        return NULL;
    if (!PyArg_ParseTuple(sregs, "iiiiiii", &sys_ids[0], &sys_ids[1], &sys_ids[2], &sys_ids[3], &sys_ids[4],
                          &sys_ids[5], &sys_ids[6]))
        return NULL;
    rax_id = sys_ids[0];
    rdx_id = sys_ids[3];                            /* the syscall convention's third argument */
    p_reg_read_batch = (uc_reg_read_batch_fn)(uintptr_t)rrb;
    p_reg_write = (uc_reg_write_fn)(uintptr_t)rw;
    if (!PyArg_ParseTuple(offs, "nnnnnnnnn", &off_regs, &off_rip, &off_eflags, &off_hflags, &off_segs,
                          &off_gdt, &off_idt, &off_cr0, &off_cr3))
        return NULL;
    p_reg_read = (uc_reg_read_fn)(uintptr_t)rr;
    p_reg_write_batch = (uc_reg_batch_fn)(uintptr_t)rwb;
    p_emu_stop = (uc_emu_stop_fn)(uintptr_t)es;
    p_emu_start = (uc_emu_start_fn)(uintptr_t)est;
    p_context_save = (uc_context_save_fn)(uintptr_t)cs;
    p_vmem_read = (uc_vmem_read_fn)(uintptr_t)vr;
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}",
                         "blockcount", (unsigned long long)(uintptr_t)&block_count_hook,
                         "syscall", (unsigned long long)(uintptr_t)&gw_syscall,
                         "in", (unsigned long long)(uintptr_t)&gw_in,
                         "out", (unsigned long long)(uintptr_t)&gw_out,
                         "void", (unsigned long long)(uintptr_t)&gw_void,
                         "int", (unsigned long long)(uintptr_t)&gw_int,
                         "bool", (unsigned long long)(uintptr_t)&gw_bool,
                         "intr", (unsigned long long)(uintptr_t)&gw_intr,
                         "mem", (unsigned long long)(uintptr_t)&gw_mem,
                         "mem_noop", (unsigned long long)(uintptr_t)&gw_mem_noop,
                         "mmio_read", (unsigned long long)(uintptr_t)&gw_mmio_read,
                         "mmio_write", (unsigned long long)(uintptr_t)&gw_mmio_write,
                         "mmio_writing", (unsigned long long)(uintptr_t)&mmio_writing,
                         "rdtsc", (unsigned long long)(uintptr_t)&gw_rdtsc);
}

static PyObject *insn_gateways(PyObject *self, PyObject *unused);   /* insn emulation block, below */
static PyObject *iret_filter_new(PyObject *self, PyObject *args);
static PyObject *iret_filter_free(PyObject *self, PyObject *arg);

static PyMethodDef methods[] = {
    {"setup", (PyCFunction)(void (*)(void))setup, METH_VARARGS | METH_KEYWORDS,
     "setup(reg_read, reg_write_batch, emu_stop, emu_start, context_save, reg_read_batch, reg_write, "
     "rip_id, rsp_id, rflags_id, offsets, syscall_regs)"
     " -> {gateway name: C function address}"},
    {"run", run, METH_VARARGS, "run(uc, count, until) -> (uc_err, rflags): emu_start from RIP holding the GIL"},
    {"regs_swap", (PyCFunction)(void (*)(void))regs_swap, METH_FASTCALL,
     "regs_swap(uc, ids_addr, old, new, rip_index, delta): save into old, load new (one switch)"},
    {"regs_read", (PyCFunction)(void (*)(void))regs_read, METH_FASTCALL,
     "regs_read(uc, ids_addr, n) -> [uint64] (uc_reg_read_batch)"},
    {"regs_write", (PyCFunction)(void (*)(void))regs_write, METH_FASTCALL,
     "regs_write(uc, ids_addr, values) (uc_reg_write_batch; values masked to 64 bits)"},
    {"deliver64", deliver64, METH_VARARGS,
     "deliver64(uc, ctx, ram, ram_size, vector, ec, has_ec, fresh) -> 0 delivered / 1 take the general path"},
    {"window", window, METH_VARARGS, "window(uc, ctx) -> 0 IF=0 / 1 shadow / 2 open (saves the context)"},
    {"bc_new", bc_new, METH_VARARGS, "bc_new(decode, cr3_address or 0, window_address or 0, eflags_address or 0, code_lo, code_hi) -> address of a block counter (decode(pc, size, cr3) -> count)"},
    {"bc_retired", bc_retired, METH_VARARGS, "bc_retired(bc, insns, rip_address) -> instructions retired in the block-mode run, or None"},
    {"bc_timing", bc_timing, METH_VARARGS, "bc_timing(bc, insns, rip_address, fn or None, owner_weakref, ns_per_insn): for the RDTSC gateway"},
    {"bc_forget_translations", bc_forget_translations, METH_O, "bc_forget_translations(address): after a flush, every entry checks its bytes once"},
    {"bc_select", bc_select, METH_O, "bc_select(address or 0): the counter a SYSCALL door's context switch resets"},
    {"bc_free", bc_free, METH_O, "bc_free(address)"},
    {"insn_gateways", insn_gateways, METH_NOARGS, "insn_gateways() -> {name: C function address} (insn emulation)"},
    {"iret_filter_new", iret_filter_new, METH_VARARGS,
     "iret_filter_new(callback, &fs_sel, &gs_sel, &hflags, &rsp, uc_vmem_read) -> user data for the iret gateway"},
    {"iret_filter_free", iret_filter_free, METH_O, "iret_filter_free(address): release what iret_filter_new made"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fasthooks", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fasthooks(void) { return PyModule_Create(&module); }

/* ---------------------------------------------------------------- insn emulation
 *
 * Instructions Unicorn gets wrong (RDMSR/WRMSR of IA32_APIC_BASE and IA32_TSC,
 * IRET to an outer privilege level with FS/GS) are found by cpu.py when it
 * decodes a new block, and get a single-address UC_HOOK_CODE through this
 * gateway: callable(address, size) runs before the instruction (see
 * machine/insnemu.py).
 */
static void gw_code(void *uc, uint64_t address, uint32_t size, void *ud)
{
    PyObject *a[2] = {PyLong_FromUnsignedLongLong(address), PyLong_FromUnsignedLong(size)};
    PyObject *r = call(uc, ud, a, 2);
    drop(a, 2);
    Py_XDECREF(r);
}

/* CMPXCHG8B/16B: a code hook that hands the instruction the flags before it.
 * Quirk of Unicorn 2.1.4 (measured): the instruction's helper computes the
 * flags it keeps (all but ZF) from env->cc_op and env->cc_src.  With count=0
 * and no hook, cc_op is stale in the middle of a block (the previous block's
 * cc_op with this block's operands: after a POPF the "flags" were the last ALU
 * source, a pointer); with a code hook Unicorn syncs them first, yet CF=1 is
 * lost after ADD/SUB/SBB/NEG/CMP.  RFLAGS read here is right; loaded as
 * cc_op = CC_OP_EFLAGS, cc_src = the flags, every preceding ALU instruction
 * tried gives the native result (tests/machine/test_lazy_flags.py) except the
 * LOGIC ones (cc_src dead: Unicorn's own sync is right there, and this store
 * is lost).  ud: the live &env->eflags; cc_dst, cc_src, cc_src2, cc_op follow. */
#define ENV_CC_SRC 16
#define ENV_CC_OP 32
#define CC_OP_EFLAGS 1
#define CC_OP_LOGICB 22             /* LOGICB..LOGICQ: QEMU 5's enum CCOp */
#define CC_OP_LOGICQ 25
#define ARITH_FLAGS 0x8D5u          /* OF SF ZF AF PF CF */

static void gw_flags_sync(void *uc, uint64_t address, uint32_t size, void *ud)
{
    (void)address; (void)size;
    uint8_t *env_eflags = (uint8_t *)ud;
    uint32_t op;
    memcpy(&op, env_eflags + ENV_CC_OP, 4);
    if (op >= CC_OP_LOGICB && op <= CC_OP_LOGICQ)
        return;
    uint64_t rflags = 0;
    p_reg_read(uc, rflags_id, &rflags);
    uint64_t src = rflags & ARITH_FLAGS;
    op = CC_OP_EFLAGS;
    memcpy(env_eflags + ENV_CC_SRC, &src, 8);
    memcpy(env_eflags + ENV_CC_OP, &op, 4);
}

/* IRET / far RET hooks run on every interrupt return, so they are filtered
 * here: Python is called only when the instruction can go to an outer
 * privilege level with a non-null FS or GS (the case Unicorn gets wrong).
 * The checks are the ones cpu.py's _hook_emulated_insn makes first: FS and
 * GS selectors, CPL, and the new CS's RPL in the frame at RSP + one slot. */
typedef int (*vmem_read_fn)(void *uc, uint64_t addr, int prot, void *buf, size_t n);

typedef struct {
    PyObject *cb;
    const volatile uint32_t *fs_sel, *gs_sel, *hflags;
    const volatile uint64_t *rsp;
    vmem_read_fn vmem_read;
} iret_filter;

#define HF_CS64 (1u << 15)

static void gw_iret(void *uc, uint64_t address, uint32_t size, void *ud)
{
    iret_filter *f = (iret_filter *)ud;
    if (!((*f->fs_sel | *f->gs_sel) & 0xFFFC))
        return;
    uint32_t hf = *f->hflags;
    uint8_t code[16], cs[2];
    if (size >= 1 && size <= 15 && f->vmem_read(uc, address, 4, code, size) == 0) {
        uint8_t last = code[size - 1];
        if (last == 0xCF || last == 0xCB || (size >= 3 && code[size - 3] == 0xCA)) {
            int rex_w = size >= 2 && code[size - 2] >= 0x48 && code[size - 2] <= 0x4F && (code[size - 2] & 8);
            unsigned slot = ((hf & HF_CS64) && rex_w) ? 8 : (memchr(code, 0x66, size - 1) ? 2 : 4);
            if (f->vmem_read(uc, *f->rsp + slot, 1, cs, 2) != 0)
                return;                         /* Unicorn raises the fault */
            if ((uint32_t)(cs[0] & 3) <= (hf & 3))
                return;                         /* same or inner level: nothing to do */
        }
    }
    gw_code(uc, address, size, f->cb);
}

static PyObject *iret_filter_new(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cb;
    unsigned long long fs, gs, hflags, rsp, vmem_read;
    if (!PyArg_ParseTuple(args, "OKKKKK", &cb, &fs, &gs, &hflags, &rsp, &vmem_read))
        return NULL;
    iret_filter *f = PyMem_Calloc(1, sizeof *f);
    if (f == NULL)
        return PyErr_NoMemory();
    Py_INCREF(cb);
    f->cb = cb;
    f->fs_sel = (const volatile uint32_t *)(uintptr_t)fs;
    f->gs_sel = (const volatile uint32_t *)(uintptr_t)gs;
    f->hflags = (const volatile uint32_t *)(uintptr_t)hflags;
    f->rsp = (const volatile uint64_t *)(uintptr_t)rsp;
    f->vmem_read = (vmem_read_fn)(uintptr_t)vmem_read;
    return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)f);
}

static PyObject *iret_filter_free(PyObject *self, PyObject *arg)
{
    (void)self;
    iret_filter *f = (iret_filter *)PyLong_AsVoidPtr(arg);
    if (f == NULL)
        return NULL;
    Py_XDECREF(f->cb);
    PyMem_Free(f);
    Py_RETURN_NONE;
}

static PyObject *insn_gateways(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("{s:K,s:K,s:K}", "code", (unsigned long long)(uintptr_t)&gw_code,
                         "iret", (unsigned long long)(uintptr_t)&gw_iret,
                         "flags_sync", (unsigned long long)(uintptr_t)&gw_flags_sync);
}
