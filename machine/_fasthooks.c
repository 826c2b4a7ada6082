/*
 * _fasthooks: the one piece of vmk that must run on every translation block,
 * so it is C rather than Python.
 *
 * The interrupt window.  An interrupt can become pending while RFLAGS.IF=0
 * (inside a handler, in a cli section).  It must be taken right after the
 * guest sets IF again (STI + its shadow, POPF, IRET), but Unicorn cannot hook
 * those instructions.  QEMU ends a translation block after each of them, so a
 * block hook sees the first block after IF went to 1.  While `armed` is set
 * the hook reads RFLAGS and stops the emulation when IF=1; the machine then
 * delivers at that exact instruction boundary.  Disarmed, it costs one load
 * and a branch per block.
 *
 * Unicorn's functions are passed in as addresses from the ctypes binding, so
 * this module does not link against libunicorn.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef int (*uc_reg_read_fn)(void *uc, int regid, void *value);
typedef int (*uc_emu_stop_fn)(void *uc);

static uc_reg_read_fn p_reg_read;
static uc_emu_stop_fn p_emu_stop;
static int rflags_id;

/* user_data points at the CPU's window, an int32[2] owned by Python: [0] armed, [1] fired. */
static void block_hook(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    volatile int32_t *window = (volatile int32_t *)user_data;
    (void)address; (void)size;
    if (!window[0])
        return;
    uint64_t rflags = 0;
    p_reg_read(uc, rflags_id, &rflags);
    if (rflags & 0x200) {
        window[0] = 0;
        window[1] = 1;
        p_emu_stop(uc);
    }
}

static PyObject *setup(PyObject *self, PyObject *args)
{
    unsigned long long rr, es;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKi", &rr, &es, &rflags_id))
        return NULL;
    p_reg_read = (uc_reg_read_fn)(uintptr_t)rr;
    p_emu_stop = (uc_emu_stop_fn)(uintptr_t)es;
    return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)&block_hook);
}

static PyMethodDef methods[] = {
    {"setup", setup, METH_VARARGS,
     "setup(uc_reg_read_addr, uc_emu_stop_addr, rflags_id) -> block_hook_addr"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fasthooks", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fasthooks(void) { return PyModule_Create(&module); }
