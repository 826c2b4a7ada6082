/*
 * _fastipc: pid 0's IPC fast path (L4's idea: the common case of a message
 * between two threads in a few hundred instructions, the kernel proper as
 * the slow path).
 *
 * A Door is the syscall entry the HAL gives the CPU.  Unicorn's SYSCALL
 * hook calls it (through machine/_fasthooks.c's gateway) with the Linux
 * registers.  Two cases are done here, in C, on pid 0's own Python objects:
 *
 *   send  to a channel whose first parked receiver is a plain recv (a
 *         kernel/pid0.py _Parked): the bytes go from the sender's page to the
 *         receiver's, the receiver commits (RUNNABLE, its result = the
 *         length) and is queued by the scheduler's policy; RAX = 0.
 *   recv  on a channel with no parked sender: the fiber parks as a _Parked
 *         and the HAL's `blocked` callable switches to the next fiber.
 *
 * Everything else, and any of these two that would take one step off the
 * common path (a type mismatch, a broken channel, a buffer across a page, a
 * choice parked on the channel, a dead receiver...), goes to the `slow`
 * callable (the HAL's syscall entry, pid 0's Python) before anything has
 * changed, so the slow path sees exactly what it would have seen without
 * the door.  What the fast path changes is what kernel/pid0.py's sys_send /
 * sys_recv, Channel.hand_over, _Parked.complete and Scheduler.committed /
 * park change, field by field; tests/kernel/test_switch_in_place.py runs the
 * demos and a ping-pong with the door on and off and compares output,
 * virtual time and instruction count.
 *
 * The kernel module owns this file (its objects, its rules); it touches no
 * Unicorn state: registers come in as arguments, RAX goes back as the
 * return value, guest memory is read through the containers' page dicts
 * (hal/aspace.py: virtual page -> (frame, writable)) in the RAM the HAL
 * handed over.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define PAGE 4096

static PyObject *zero;
static PyObject *s_current, *s_container, *s_handles, *s_objs, *s_recvq, *s_sendq, *s_q, *s_msg_size,
    *s_freed, *s_connected, *s_holders, *s_state, *s_party, *s_exit_code, *s_buf, *s_n, *s_fiber,
    *s_aspace, *s_pages, *s_sends, *s_winner, *s_sync_, *s_result, *s_error, *s_wakeups, *s_policy,
    *s_push, *s_tick, *s_running, *s_sched, *s_ch, *s_queue, *s_payload, *s_sync, *s_arm, *s_kind, *s_fast_ipc, *s_plain_park;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *slow;         /* callable(nr, a0..a5) -> int | None: the HAL's syscall entry */
    PyObject *blocked;      /* callable(): the current fiber parked; switch or stop */
    PyObject *kernel, *sched;
    PyObject *channel_type, *parked_type, *image;
    PyObject *waiting, *synced, *blocked_state, *runnable, *guest;
    uint8_t *ram;
    uint64_t ram_size;
    long nr_send, nr_recv;
    long long max_msg;
    unsigned long long fast, slowed;
} Door;

/* ------------------------------------------------------------------ helpers */

/* getattr that keeps no reference (the owner keeps the object alive for the call). */
static PyObject *peek(PyObject *o, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v != NULL)
        Py_DECREF(v);
    return v;
}

/* Host pointer to [va, va+size) of a container if it lies in one mapped page
 * (writable if asked), else NULL (no exception).  size 0 is fine. */
static uint8_t *user_ptr(Door *d, PyObject *container, uint64_t va, long long size, int write)
{
    if (size < 0 || (uint64_t)size > PAGE - (va & (PAGE - 1)))
        return NULL;
    PyObject *aspace = peek(container, s_aspace);
    if (aspace == NULL)
        return NULL;
    PyObject *pages = peek(aspace, s_pages);
    if (pages == NULL || !PyDict_CheckExact(pages))
        return NULL;
    PyObject *key = PyLong_FromUnsignedLongLong(va & ~(uint64_t)(PAGE - 1));
    if (key == NULL)
        return NULL;
    PyObject *got = PyDict_GetItemWithError(pages, key);
    Py_DECREF(key);
    if (got == NULL || !PyTuple_CheckExact(got) || PyTuple_GET_SIZE(got) != 2)
        return NULL;
    if (write && !PyObject_IsTrue(PyTuple_GET_ITEM(got, 1)))
        return NULL;
    uint64_t frame = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(got, 0));
    if (PyErr_Occurred())
        return NULL;
    uint64_t at = frame + (va & (PAGE - 1));
    if (at + (uint64_t)size > d->ram_size)
        return NULL;
    return d->ram + at;
}

/* Channel.broken_for(party) is certainly False (1), or it may be True (0). */
static int surely_whole(Door *d, PyObject *ch, PyObject *party)
{
    PyObject *freed = peek(ch, s_freed);
    if (freed != Py_False)
        return 0;
    PyObject *connected = peek(ch, s_connected);
    if (connected == Py_False)
        return 1;
    if (connected != Py_True)
        return 0;
    PyObject *h = peek(ch, s_holders);
    if (h == NULL || !PyDict_CheckExact(h))
        return 0;
    Py_ssize_t parties = PyDict_GET_SIZE(h) - (PyDict_GetItemWithError(h, d->image) != NULL);
    if (PyErr_Occurred())
        return 0;
    if (parties != 1)
        return 1;
    return PyDict_GetItemWithError(h, party) == NULL && !PyErr_Occurred();
}

/* The channel behind handle `h` of the current fiber's container (borrowed), or NULL. */
static PyObject *channel_of(Door *d, PyObject *c, PyObject *h)
{
    if (!PyLong_CheckExact(h))
        return NULL;
    PyObject *handles = peek(c, s_handles);
    if (handles == NULL)
        return NULL;
    PyObject *objs = peek(handles, s_objs);
    if (objs == NULL || !PyDict_CheckExact(objs))
        return NULL;
    PyObject *ch = PyDict_GetItemWithError(objs, h);
    if (ch == NULL || Py_TYPE(ch) != (PyTypeObject *)d->channel_type)
        return NULL;
    return ch;
}

static int add_long(PyObject *o, PyObject *name, long delta)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return -1;
    long long x = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred())
        return -1;
    PyObject *nv = PyLong_FromLongLong(x + delta);
    if (nv == NULL)
        return -1;
    int r = PyObject_SetAttr(o, name, nv);
    Py_DECREF(nv);
    return r;
}

/* ------------------------------------------------------------------ rendezvous */

/* The first waiter of `queue` (a WaitQueue) if it is a _Parked of a blocked
 * guest fiber whose container lives (new reference), else NULL: not the fast
 * case.  Also gives the waiter's fiber and container (borrowed). */
static PyObject *first_parked(Door *d, PyObject *queue, PyObject **fiber, PyObject **party)
{
    PyObject *q = peek(queue, s_q);
    if (q == NULL || PyObject_Length(q) <= 0)
        return NULL;
    PyObject *it = PyObject_GetIter(q);
    if (it == NULL)
        return NULL;
    PyObject *w = PyIter_Next(it);
    Py_DECREF(it);
    if (w == NULL)
        return NULL;
    PyObject *rf, *rc;
    if (Py_TYPE(w) == (PyTypeObject *)d->parked_type && peek(w, s_state) == d->waiting
        && peek(w, s_queue) == queue && (rf = peek(w, s_fiber)) != NULL && (rc = peek(w, s_party)) != NULL
        && peek(rf, s_state) == d->blocked_state && peek(rf, s_kind) == d->guest
        && peek(rc, s_exit_code) == Py_None) {
        *fiber = rf;
        *party = rc;
        return w;
    }
    Py_DECREF(w);
    return NULL;
}

/* Take waiter `w` off `queue` and commit it with `result`: Channel.hand_over /
 * take (sends += 1), _Parked.complete, Scheduler.committed (the fiber becomes
 * RUNNABLE with its result and the policy queues it).  0 or -1 (error set). */
static int commit(Door *d, PyObject *ch, PyObject *queue, PyObject *w, PyObject *fiber, long long result)
{
    PyObject *q = peek(queue, s_q);
    PyObject *res = PyLong_FromLongLong(result);
    if (q == NULL || res == NULL) {
        Py_XDECREF(res);
        return -1;
    }
    Py_INCREF(fiber);
    int ok = PyObject_DelItem(q, w) == 0 && add_long(ch, s_sends, 1) == 0
        && PyObject_SetAttr(w, s_state, d->synced) == 0 && PyObject_SetAttr(w, s_winner, zero) == 0
        && PyObject_SetAttr(fiber, s_sync_, Py_None) == 0 && PyObject_SetAttr(fiber, s_result, res) == 0
        && PyObject_SetAttr(fiber, s_error, Py_None) == 0 && PyObject_SetAttr(fiber, s_state, d->runnable) == 0
        && add_long(d->sched, s_wakeups, 1) == 0;
    Py_DECREF(res);
    if (ok) {
        PyObject *policy = PyObject_GetAttr(d->sched, s_policy);
        PyObject *tick = policy ? PyObject_GetAttr(d->sched, s_tick) : NULL;
        PyObject *r = tick ? PyObject_CallMethodObjArgs(policy, s_push, fiber, tick, NULL) : NULL;
        Py_XDECREF(policy);
        Py_XDECREF(tick);
        ok = r != NULL;
        Py_XDECREF(r);
    }
    Py_DECREF(fiber);
    return ok ? 0 : -1;
}

/* Park the current fiber `f` of `c` as _Parked(sched, f, ch, queue, payload, c, buf, n)
 * (Scheduler.park), then let the HAL switch.  1 or -1 (error set). */
static int park(Door *d, PyObject *f, PyObject *c, PyObject *ch, PyObject *queue, PyObject *payload,
                PyObject *buf, PyObject *n)
{
    PyObject *q = peek(queue, s_q);
    if (q == NULL)
        return -1;
    PyTypeObject *t = (PyTypeObject *)d->parked_type;
    PyObject *p = t->tp_alloc(t, 0);
    if (p == NULL)
        return -1;
    int ok = PyObject_SetAttr(p, s_state, d->waiting) == 0 && PyObject_SetAttr(p, s_party, c) == 0
        && PyObject_SetAttr(p, s_fiber, f) == 0 && PyObject_SetAttr(p, s_sched, d->sched) == 0
        && PyObject_SetAttr(p, s_ch, ch) == 0 && PyObject_SetAttr(p, s_queue, queue) == 0
        && PyObject_SetAttr(p, s_payload, payload) == 0 && PyObject_SetAttr(p, s_buf, buf) == 0
        && PyObject_SetAttr(p, s_n, n) == 0 && PyObject_SetAttr(p, s_sync, p) == 0
        && PyObject_SetAttr(p, s_arm, zero) == 0 && PyObject_SetAttr(p, s_winner, Py_None) == 0
        && PyObject_SetItem(q, p, Py_None) == 0
        && PyObject_SetAttr(f, s_state, d->blocked_state) == 0 && PyObject_SetAttr(f, s_sync_, p) == 0
        && PyObject_SetAttr(d->sched, s_running, Py_None) == 0;
    Py_DECREF(p);
    if (!ok)
        return -1;
    PyObject *r = PyObject_CallNoArgs(d->blocked);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 1;
}

/* ------------------------------------------------------------------ send and recv */

/* Each: 1 done, 0 not the fast case (nothing changed, no error set), -1 error
 * (set; the syscall raises into the run loop, as a bug in pid 0 would). */

static int fast_send(Door *d, PyObject *f, PyObject *c, PyObject *const *args, long long *rax)
{
    PyObject *ch = channel_of(d, c, args[1]);
    if (ch == NULL)
        return 0;
    uint64_t buf = PyLong_AsUnsignedLongLong(args[2]);
    long long n = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred())
        return 0;
    PyObject *ms = peek(ch, s_msg_size);
    long long msg_size = ms ? PyLong_AsLongLong(ms) : -1;
    if (!(msg_size == n || (msg_size == 0 && n >= 0 && n <= d->max_msg)) || !surely_whole(d, ch, c))
        return 0;
    uint8_t *src = user_ptr(d, c, buf, n, 0);
    PyObject *recvq = peek(ch, s_recvq);
    if (src == NULL || recvq == NULL)
        return 0;
    PyObject *rq = peek(recvq, s_q);
    if (rq == NULL)
        return 0;
    if (PyObject_Length(rq) == 0) {                 /* nobody there: park with the message */
        PyObject *sendq = peek(ch, s_sendq);
        PyObject *data = sendq ? PyBytes_FromStringAndSize((const char *)src, (Py_ssize_t)n) : NULL;
        if (data == NULL)
            return 0;
        int r = park(d, f, c, ch, sendq, data, zero, zero);
        Py_DECREF(data);
        *rax = -1;
        return r;
    }
    PyObject *rf, *rc;
    PyObject *w = first_parked(d, recvq, &rf, &rc);
    if (w == NULL)
        return 0;
    int done = 0;
    PyObject *wb = peek(w, s_buf), *wn = peek(w, s_n);
    uint64_t rbuf = wb ? PyLong_AsUnsignedLongLong(wb) : 0;
    long long rn = wn ? PyLong_AsLongLong(wn) : -1;
    long long m = n < rn ? n : rn;
    uint8_t *dst = PyErr_Occurred() ? NULL : user_ptr(d, rc, rbuf, m, 1);
    if (dst != NULL) {
        memmove(dst, src, (size_t)m);               /* _Parked.complete's _deliver */
        done = commit(d, ch, recvq, w, rf, m) == 0 ? 1 : -1;
        *rax = 0;
    }
    Py_DECREF(w);
    return done;
}

static int fast_recv(Door *d, PyObject *f, PyObject *c, PyObject *const *args, long long *rax)
{
    PyObject *ch = channel_of(d, c, args[1]);
    if (ch == NULL)
        return 0;
    uint64_t buf = PyLong_AsUnsignedLongLong(args[2]);
    long long n = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred())
        return 0;
    uint8_t *dst = user_ptr(d, c, buf, n, 1);
    PyObject *sendq = peek(ch, s_sendq);
    PyObject *sq = sendq ? peek(sendq, s_q) : NULL;
    if (dst == NULL || sq == NULL || !surely_whole(d, ch, c))
        return 0;
    if (PyObject_Length(sq) == 0) {                 /* nobody there: park */
        PyObject *recvq = peek(ch, s_recvq);
        *rax = -1;
        return recvq ? park(d, f, c, ch, recvq, Py_None, args[2], args[3]) : 0;
    }
    PyObject *sf, *sc;
    PyObject *w = first_parked(d, sendq, &sf, &sc);
    if (w == NULL)
        return 0;
    int done = 0;
    PyObject *msg = peek(w, s_payload);
    if (msg != NULL && PyBytes_CheckExact(msg)) {
        Py_INCREF(msg);
        long long m = PyBytes_GET_SIZE(msg) < n ? PyBytes_GET_SIZE(msg) : n;
        done = commit(d, ch, sendq, w, sf, 0) == 0 ? 1 : -1;
        if (done == 1) {
            memcpy(dst, PyBytes_AS_STRING(msg), (size_t)m);     /* sys_recv's _deliver */
            *rax = m;
        }
        Py_DECREF(msg);
    }
    Py_DECREF(w);
    return done;
}

/* ------------------------------------------------------------------ the door */

static PyObject *door_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Door *d = (Door *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs >= 4 && kwnames == NULL && PyLong_CheckExact(args[0])) {
        long nr = PyLong_AsLong(args[0]);
        if (nr == -1 && PyErr_Occurred())
            PyErr_Clear();
        else if ((nr == d->nr_send || nr == d->nr_recv) && peek(d->kernel, s_fast_ipc) == Py_True
                 && peek(d->kernel, s_plain_park) == Py_True) {
            PyObject *f = peek(d->kernel, s_current);
            PyObject *c = (f != NULL && f != Py_None) ? peek(f, s_container) : NULL;
            int r = 0;
            long long rax = -1;
            if (c != NULL && c != Py_None) {
                Py_INCREF(f);
                Py_INCREF(c);
                r = nr == d->nr_send ? fast_send(d, f, c, args, &rax) : fast_recv(d, f, c, args, &rax);
                Py_DECREF(c);
                Py_DECREF(f);
            }
            if (r < 0)
                return NULL;
            if (r > 0) {
                d->fast++;
                if (rax >= 0)
                    return PyLong_FromLongLong(rax);
                Py_RETURN_NONE;                     /* parked: RAX is set when it commits */
            }
            if (PyErr_Occurred())
                PyErr_Clear();
        }
    }
    if (PyErr_Occurred())
        PyErr_Clear();
    d->slowed++;
    return PyObject_Vectorcall(d->slow, args, nargsf, kwnames);
}

static void door_dealloc(Door *d)
{
    PyObject_GC_UnTrack(d);
    Py_CLEAR(d->slow);
    Py_CLEAR(d->blocked);
    Py_CLEAR(d->kernel);
    Py_CLEAR(d->sched);
    Py_CLEAR(d->channel_type);
    Py_CLEAR(d->parked_type);
    Py_CLEAR(d->image);
    Py_CLEAR(d->waiting);
    Py_CLEAR(d->synced);
    Py_CLEAR(d->blocked_state);
    Py_CLEAR(d->runnable);
    Py_CLEAR(d->guest);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

static int door_traverse(Door *d, visitproc visit, void *arg)
{
    Py_VISIT(d->slow);
    Py_VISIT(d->blocked);
    Py_VISIT(d->kernel);
    Py_VISIT(d->sched);
    Py_VISIT(d->channel_type);
    Py_VISIT(d->parked_type);
    Py_VISIT(d->image);
    return 0;
}

static int door_clear(Door *d)
{
    Py_CLEAR(d->slow);
    Py_CLEAR(d->blocked);
    Py_CLEAR(d->kernel);
    Py_CLEAR(d->sched);
    return 0;
}

static PyObject *door_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *names[] = {"slow", "blocked", "kernel", "sched", "channel_type", "parked_type", "image",
                            "waiting", "synced", "blocked_state", "runnable", "guest",
                            "ram", "ram_size", "nr_send", "nr_recv", "max_msg", NULL};
    PyObject *o[12];
    unsigned long long ram, ram_size;
    long nr_send, nr_recv;
    long long max_msg;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$OOOOOOOOOOOOKKllL", names, &o[0], &o[1], &o[2], &o[3], &o[4],
                                     &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &o[11], &ram, &ram_size,
                                     &nr_send, &nr_recv, &max_msg))
        return NULL;
    if (!PyType_Check(o[4]) || !PyType_Check(o[5])) {
        PyErr_SetString(PyExc_TypeError, "channel_type and parked_type must be types");
        return NULL;
    }
    Door *d = (Door *)type->tp_alloc(type, 0);
    if (d == NULL)
        return NULL;
    PyObject **slots[12] = {&d->slow, &d->blocked, &d->kernel, &d->sched, &d->channel_type, &d->parked_type,
                            &d->image, &d->waiting, &d->synced, &d->blocked_state, &d->runnable, &d->guest};
    for (int i = 0; i < 12; i++) {
        Py_INCREF(o[i]);
        *slots[i] = o[i];
    }
    d->ram = (uint8_t *)(uintptr_t)ram;
    d->ram_size = ram_size;
    d->nr_send = nr_send;
    d->nr_recv = nr_recv;
    d->max_msg = max_msg;
    d->vectorcall = door_call;
    return (PyObject *)d;
}

static PyMemberDef door_members[] = {
    {"fast", T_ULONGLONG, offsetof(Door, fast), READONLY, "syscalls done by the fast path"},
    {"slowed", T_ULONGLONG, offsetof(Door, slowed), READONLY, "syscalls passed to the slow path"},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(Door, vectorcall), READONLY},
    {NULL},
};

static PyTypeObject DoorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vmk.kernel._fastipc.Door",
    .tp_basicsize = sizeof(Door),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Door(*, slow, blocked, kernel, ...): pid 0's syscall entry with the IPC fast path",
    .tp_new = door_new,
    .tp_dealloc = (destructor)door_dealloc,
    .tp_traverse = (traverseproc)door_traverse,
    .tp_clear = (inquiry)door_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Door, vectorcall),
    .tp_members = door_members,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastipc", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__fastipc(void)
{
    struct { PyObject **p; const char *s; } names[] = {
        {&s_current, "current"}, {&s_container, "container"}, {&s_handles, "handles"}, {&s_objs, "_objs"},
        {&s_recvq, "recvq"}, {&s_sendq, "sendq"}, {&s_q, "_q"}, {&s_msg_size, "msg_size"},
        {&s_freed, "freed"}, {&s_connected, "connected"}, {&s_holders, "_holders"}, {&s_state, "state"},
        {&s_party, "party"}, {&s_exit_code, "exit_code"}, {&s_buf, "buf"}, {&s_n, "n"}, {&s_fiber, "fiber"},
        {&s_aspace, "aspace"}, {&s_pages, "pages"}, {&s_sends, "sends"}, {&s_winner, "winner"},
        {&s_sync_, "_sync"}, {&s_result, "result"}, {&s_error, "error"}, {&s_wakeups, "wakeups"},
        {&s_policy, "policy"}, {&s_push, "push"}, {&s_tick, "tick"}, {&s_running, "running"},
        {&s_sched, "sched"}, {&s_ch, "ch"}, {&s_queue, "queue"}, {&s_payload, "payload"}, {&s_sync, "sync"},
        {&s_arm, "arm"}, {&s_kind, "kind"}, {&s_fast_ipc, "fast_ipc"},
        {&s_plain_park, "plain_park"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*names[i].p = PyUnicode_InternFromString(names[i].s)) == NULL)
            return NULL;
    if ((zero = PyLong_FromLong(0)) == NULL)
        return NULL;
    if (PyType_Ready(&DoorType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&DoorType);
    if (PyModule_AddObject(m, "Door", (PyObject *)&DoorType) < 0) {
        Py_DECREF(&DoorType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
