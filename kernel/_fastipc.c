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
 *   recv  on a channel with a parked plain send: the message is taken (the
 *         sender commits with 0); with nobody there the fiber parks as a
 *         _Parked and pid 0's `switch` (VMKernel.switch_in_place) puts the
 *         next fiber on the CPU, or `stop` ends the CPU slice.  A send with
 *         nobody there parks the same way.
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

static PyObject *zero, *one;
/* attribute names of the objects that are not __slots__ classes (interned) */
static PyObject *s_current, *s_handles, *s_objs, *s_exit_code, *s_aspace, *s_pages, *s_wakeups, *s_policy,
    *s_running, *s_fast_ipc, *s_plain_park, *s_deferred, *s_switch_in_place;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *slow;         /* callable(nr, a0..a5) -> int | None: the HAL's syscall entry */
    PyObject *stop;         /* callable(): end the run after this syscall (pid 0 switches) */
    PyObject *kernel, *sched;
    PyObject *channel_type, *parked_type, *image;
    PyObject *waiting, *synced, *blocked_state, *runnable, *guest;
    uint8_t *ram;
    uint64_t ram_size;
    long nr_send, nr_recv;
    long long max_msg;
    unsigned long long fast, slowed;
    /* __slots__ offsets (resolved from the types when the door is made) */
    PyObject *fiber_type, *queue_type;
    Py_ssize_t f_state, f_kind, f_container, f_sync, f_result, f_error;
    Py_ssize_t p_state, p_party, p_fiber, p_sched, p_ch, p_queue, p_payload, p_buf, p_n, p_sync, p_arm,
        p_winner;
    Py_ssize_t c_msg_size, c_freed, c_connected, c_holders, c_recvq, c_sendq, c_sends;
    Py_ssize_t q_q;
} Door;

/* ------------------------------------------------------------------ helpers */

/* Fields of the __slots__ classes (Fiber, _Parked, Channel, WaitQueue) are read
 * and written at their slot's offset, as their member descriptors do (a slot
 * not yet set reads NULL); the other objects through getattr. */
#define SLOT(o, off) (*(PyObject **)((char *)(o) + (off)))

static void set_slot(PyObject *o, Py_ssize_t off, PyObject *v)
{
    PyObject *old = SLOT(o, off);
    Py_INCREF(v);
    SLOT(o, off) = v;
    Py_XDECREF(old);
}

static Py_ssize_t slot_offset(PyObject *type, const char *name)
{
    PyObject *descr = PyObject_GetAttrString(type, name);
    if (descr == NULL)
        return -1;
    Py_ssize_t off = -1;
    if (Py_TYPE(descr) == &PyMemberDescr_Type) {
        PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
        if (m->type == T_OBJECT_EX && !(m->flags & READONLY))
            off = m->offset;
    }
    Py_DECREF(descr);
    if (off < 0)
        PyErr_Format(PyExc_TypeError, "%R.%s is not an object slot", type, name);
    return off;
}

/* getattr that keeps no reference (the owner keeps the object alive for the call). */
static PyObject *peek(PyObject *o, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v != NULL)
        Py_DECREF(v);
    return v;
}

static int is_int(PyObject *v, long long *out)
{
    if (v == NULL || !PyLong_CheckExact(v))
        return 0;
    *out = PyLong_AsLongLong(v);
    if (*out == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* Host pointer to [va, va+size) of a container if it lies in one mapped page
 * (writable if asked), else NULL (no exception).  size 0 is fine. */
static uint8_t *user_ptr(Door *d, PyObject *container, uint64_t va, long long size, int write)
{
    if (size < 0 || (uint64_t)size > PAGE - (va & (PAGE - 1)))
        return NULL;
    PyObject *aspace = peek(container, s_aspace);
    PyObject *pages = aspace ? peek(aspace, s_pages) : NULL;
    if (pages == NULL || !PyDict_CheckExact(pages))
        return NULL;
    PyObject *key = PyLong_FromUnsignedLongLong(va & ~(uint64_t)(PAGE - 1));
    if (key == NULL)
        return NULL;
    PyObject *got = PyDict_GetItemWithError(pages, key);
    Py_DECREF(key);
    if (got == NULL || !PyTuple_CheckExact(got) || PyTuple_GET_SIZE(got) != 2)
        return NULL;
    if (write && PyTuple_GET_ITEM(got, 1) != Py_True)
        return NULL;
    long long frame;
    if (!is_int(PyTuple_GET_ITEM(got, 0), &frame) || frame < 0)
        return NULL;
    uint64_t at = (uint64_t)frame + (va & (PAGE - 1));
    if (at + (uint64_t)size > d->ram_size)
        return NULL;
    return d->ram + at;
}

/* Channel.broken_for(party) is certainly False (1), or it may be True (0). */
static int surely_whole(Door *d, PyObject *ch, PyObject *party)
{
    if (SLOT(ch, d->c_freed) != Py_False)
        return 0;
    PyObject *connected = SLOT(ch, d->c_connected);
    if (connected == Py_False)
        return 1;
    PyObject *h = SLOT(ch, d->c_holders);
    if (connected != Py_True || h == NULL || !PyDict_CheckExact(h))
        return 0;
    Py_ssize_t parties = PyDict_GET_SIZE(h) - (PyDict_GetItemWithError(h, d->image) != NULL);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (parties != 1)
        return 1;
    return PyDict_GetItemWithError(h, party) == NULL && !PyErr_Occurred();
}

/* The channel behind handle args[1] of container `c`, with buf = args[2] and
 * n = args[3] (sys_send / sys_recv's arguments); NULL if not the fast case. */
static PyObject *channel_args(Door *d, PyObject *c, PyObject *const *args, uint64_t *buf, long long *n)
{
    PyObject *h = args[1];
    if (!PyLong_CheckExact(h))
        return NULL;
    PyObject *handles = peek(c, s_handles);
    PyObject *objs = handles ? peek(handles, s_objs) : NULL;
    if (objs == NULL || !PyDict_CheckExact(objs))
        return NULL;
    PyObject *ch = PyDict_GetItemWithError(objs, h);
    if (ch == NULL || Py_TYPE(ch) != (PyTypeObject *)d->channel_type)
        return NULL;
    *buf = PyLong_AsUnsignedLongLong(args[2]);
    *n = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *sq = SLOT(ch, d->c_sendq), *rq = SLOT(ch, d->c_recvq);
    if (sq == NULL || rq == NULL || Py_TYPE(sq) != (PyTypeObject *)d->queue_type
        || Py_TYPE(rq) != (PyTypeObject *)d->queue_type || SLOT(sq, d->q_q) == NULL || SLOT(rq, d->q_q) == NULL)
        return NULL;
    return ch;
}

static int add_one(PyObject **slot)
{
    PyObject *nv = PyNumber_Add(*slot, one);
    if (nv == NULL)
        return -1;
    Py_SETREF(*slot, nv);
    return 0;
}

static int add_one_attr(PyObject *o, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return -1;
    int r = add_one(&v);
    if (r == 0)
        r = PyObject_SetAttr(o, name, v);
    Py_DECREF(v);
    return r;
}

/* ------------------------------------------------------------------ rendezvous */

/* The first waiter of `queue` (a WaitQueue) if it is a _Parked of a blocked
 * guest fiber whose container lives (new reference), else NULL: not the fast
 * case.  Also gives the waiter's fiber and container (borrowed). */
static PyObject *first_parked(Door *d, PyObject *queue, PyObject **fiber, PyObject **party)
{
    PyObject *q = SLOT(queue, d->q_q);
    if (PyObject_Length(q) <= 0)
        return NULL;
    PyObject *it = PyObject_GetIter(q);
    PyObject *w = it ? PyIter_Next(it) : NULL;
    Py_XDECREF(it);
    if (w == NULL)
        return NULL;
    PyObject *rf, *rc;
    if (Py_TYPE(w) == (PyTypeObject *)d->parked_type && SLOT(w, d->p_state) == d->waiting
        && SLOT(w, d->p_queue) == queue && (rf = SLOT(w, d->p_fiber)) != NULL
        && Py_TYPE(rf) == (PyTypeObject *)d->fiber_type && (rc = SLOT(w, d->p_party)) != NULL
        && SLOT(rf, d->f_state) == d->blocked_state && SLOT(rf, d->f_kind) == d->guest
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
 * RUNNABLE with its result; its queueing is deferred).  0 or -1 (error set). */
static int commit(Door *d, PyObject *ch, PyObject *queue, PyObject *w, PyObject *fiber, long long result)
{
    PyObject *res = PyLong_FromLongLong(result);
    if (res == NULL)
        return -1;
    Py_INCREF(fiber);
    int ok = PyObject_DelItem(SLOT(queue, d->q_q), w) == 0 && add_one(&SLOT(ch, d->c_sends)) == 0;
    if (ok) {
        set_slot(w, d->p_state, d->synced);
        set_slot(w, d->p_winner, zero);
        set_slot(fiber, d->f_sync, Py_None);
        set_slot(fiber, d->f_result, res);
        set_slot(fiber, d->f_error, Py_None);
        set_slot(fiber, d->f_state, d->runnable);
        ok = add_one_attr(d->sched, s_wakeups) == 0;
    }
    Py_DECREF(res);
    if (ok) {
        /* Queued by the scheduler at its next look at the run queues, or taken by
         * the next switch (Scheduler.policy, Scheduler.next_guest).  A fiber
         * deferred earlier is queued first (that look). */
        PyObject *earlier = PyObject_GetAttr(d->sched, s_deferred);
        if (earlier != NULL && earlier != Py_None) {
            PyObject *policy = PyObject_GetAttr(d->sched, s_policy);
            Py_XDECREF(policy);
            ok = policy != NULL;
        }
        ok = ok && earlier != NULL && PyObject_SetAttr(d->sched, s_deferred, fiber) == 0;
        Py_XDECREF(earlier);
    }
    Py_DECREF(fiber);
    return ok ? 0 : -1;
}

/* Park the current fiber `f` of `c` as _Parked(sched, f, ch, queue, payload, c, buf, n)
 * (Scheduler.park), then let the HAL switch.  1 or -1 (error set). */
static int park(Door *d, PyObject *f, PyObject *c, PyObject *ch, PyObject *queue, PyObject *payload,
                PyObject *buf, PyObject *n)
{
    PyTypeObject *t = (PyTypeObject *)d->parked_type;
    PyObject *p = t->tp_alloc(t, 0);
    if (p == NULL)
        return -1;
    set_slot(p, d->p_state, d->waiting);
    set_slot(p, d->p_party, c);
    set_slot(p, d->p_fiber, f);
    set_slot(p, d->p_sched, d->sched);
    set_slot(p, d->p_ch, ch);
    set_slot(p, d->p_queue, queue);
    set_slot(p, d->p_payload, payload);
    set_slot(p, d->p_buf, buf);
    set_slot(p, d->p_n, n);
    set_slot(p, d->p_sync, p);
    set_slot(p, d->p_arm, zero);
    set_slot(p, d->p_winner, Py_None);
    int ok = PyObject_SetItem(SLOT(queue, d->q_q), p, Py_None) == 0;
    if (ok) {
        set_slot(f, d->f_state, d->blocked_state);
        set_slot(f, d->f_sync, p);
        ok = PyObject_SetAttr(d->sched, s_running, Py_None) == 0;
    }
    Py_DECREF(p);
    if (!ok)
        return -1;
    /* as the HAL's syscall_blocked (looked up at each call: tests replace it) */
    PyObject *r = PyObject_CallMethodNoArgs(d->kernel, s_switch_in_place);
    if (r == NULL)
        return -1;
    if (r == Py_False) {
        Py_DECREF(r);
        r = PyObject_CallNoArgs(d->stop);
        if (r == NULL)
            return -1;
    }
    Py_DECREF(r);
    return 1;
}

/* ------------------------------------------------------------------ send and recv */

/* Each: 1 done, 0 not the fast case (nothing changed, no error set), -1 error
 * (set; the syscall raises into the run loop, as a bug in pid 0 would). */

static int fast_send(Door *d, PyObject *f, PyObject *c, PyObject *const *args, long long *rax)
{
    uint64_t buf;
    long long n, msg_size;
    PyObject *ch = channel_args(d, c, args, &buf, &n);
    if (ch == NULL || !is_int(SLOT(ch, d->c_msg_size), &msg_size)
        || !(msg_size == n || (msg_size == 0 && n >= 0 && n <= d->max_msg)) || !surely_whole(d, ch, c))
        return 0;
    uint8_t *src = user_ptr(d, c, buf, n, 0);
    if (src == NULL)
        return 0;
    PyObject *recvq = SLOT(ch, d->c_recvq);
    if (PyObject_Length(SLOT(recvq, d->q_q)) == 0) {     /* nobody there: park with the message */
        PyObject *data = PyBytes_FromStringAndSize((const char *)src, (Py_ssize_t)n);
        if (data == NULL)
            return -1;
        int r = park(d, f, c, ch, SLOT(ch, d->c_sendq), data, zero, zero);
        Py_DECREF(data);
        *rax = -1;
        return r;
    }
    PyObject *rf, *rc;
    PyObject *w = first_parked(d, recvq, &rf, &rc);
    if (w == NULL)
        return 0;
    int done = 0;
    long long rbuf, rn;
    if (is_int(SLOT(w, d->p_buf), &rbuf) && is_int(SLOT(w, d->p_n), &rn)) {
        long long m = n < rn ? n : rn;
        uint8_t *dst = user_ptr(d, rc, (uint64_t)rbuf, m, 1);
        if (dst != NULL) {
            memmove(dst, src, (size_t)m);           /* _Parked.complete's _deliver */
            done = commit(d, ch, recvq, w, rf, m) == 0 ? 1 : -1;
            *rax = 0;
        }
    }
    Py_DECREF(w);
    return done;
}

static int fast_recv(Door *d, PyObject *f, PyObject *c, PyObject *const *args, long long *rax)
{
    uint64_t buf;
    long long n;
    PyObject *ch = channel_args(d, c, args, &buf, &n);
    if (ch == NULL)
        return 0;
    uint8_t *dst = user_ptr(d, c, buf, n, 1);
    if (dst == NULL || !surely_whole(d, ch, c))
        return 0;
    PyObject *sendq = SLOT(ch, d->c_sendq);
    if (PyObject_Length(SLOT(sendq, d->q_q)) == 0) {     /* nobody there: park */
        *rax = -1;
        return park(d, f, c, ch, SLOT(ch, d->c_recvq), Py_None, args[2], args[3]);
    }
    PyObject *sf, *sc;
    PyObject *w = first_parked(d, sendq, &sf, &sc);
    if (w == NULL)
        return 0;
    int done = 0;
    PyObject *msg = SLOT(w, d->p_payload);
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
            PyObject *c = (f != NULL && Py_TYPE(f) == (PyTypeObject *)d->fiber_type) ? SLOT(f, d->f_container) : NULL;
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
    Py_CLEAR(d->stop);
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
    Py_CLEAR(d->fiber_type);
    Py_CLEAR(d->queue_type);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

static int door_traverse(Door *d, visitproc visit, void *arg)
{
    Py_VISIT(d->slow);
    Py_VISIT(d->stop);
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
    Py_CLEAR(d->stop);
    Py_CLEAR(d->kernel);
    Py_CLEAR(d->sched);
    return 0;
}

static PyObject *door_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *names[] = {"slow", "stop", "kernel", "sched", "channel_type", "parked_type", "image",
                            "waiting", "synced", "blocked_state", "runnable", "guest", "fiber_type", "queue_type",
                            "ram", "ram_size", "nr_send", "nr_recv", "max_msg", NULL};
    PyObject *o[14];
    unsigned long long ram, ram_size;
    long nr_send, nr_recv;
    long long max_msg;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$OOOOOOOOOOOOOOKKllL", names, &o[0], &o[1], &o[2], &o[3], &o[4],
                                     &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &o[11], &o[12], &o[13], &ram, &ram_size,
                                     &nr_send, &nr_recv, &max_msg))
        return NULL;
    if (!PyType_Check(o[4]) || !PyType_Check(o[5]) || !PyType_Check(o[12]) || !PyType_Check(o[13])) {
        PyErr_SetString(PyExc_TypeError, "channel_type, parked_type, fiber_type and queue_type must be types");
        return NULL;
    }
    Door *d = (Door *)type->tp_alloc(type, 0);
    if (d == NULL)
        return NULL;
    PyObject **slots[14] = {&d->slow, &d->stop, &d->kernel, &d->sched, &d->channel_type, &d->parked_type,
                            &d->image, &d->waiting, &d->synced, &d->blocked_state, &d->runnable, &d->guest,
                            &d->fiber_type, &d->queue_type};
    for (int i = 0; i < 14; i++) {
        Py_INCREF(o[i]);
        *slots[i] = o[i];
    }
    struct { Py_ssize_t *off; PyObject *type; const char *name; } offs[] = {
        {&d->f_state, o[12], "state"}, {&d->f_kind, o[12], "kind"}, {&d->f_container, o[12], "container"},
        {&d->f_sync, o[12], "_sync"}, {&d->f_result, o[12], "result"}, {&d->f_error, o[12], "error"},
        {&d->p_state, o[5], "state"}, {&d->p_party, o[5], "party"}, {&d->p_fiber, o[5], "fiber"},
        {&d->p_sched, o[5], "sched"}, {&d->p_ch, o[5], "ch"}, {&d->p_queue, o[5], "queue"},
        {&d->p_payload, o[5], "payload"}, {&d->p_buf, o[5], "buf"}, {&d->p_n, o[5], "n"},
        {&d->p_sync, o[5], "sync"}, {&d->p_arm, o[5], "arm"}, {&d->p_winner, o[5], "winner"},
        {&d->c_msg_size, o[4], "msg_size"}, {&d->c_freed, o[4], "freed"}, {&d->c_connected, o[4], "connected"},
        {&d->c_holders, o[4], "_holders"}, {&d->c_recvq, o[4], "recvq"}, {&d->c_sendq, o[4], "sendq"},
        {&d->c_sends, o[4], "sends"}, {&d->q_q, o[13], "_q"},
    };
    for (size_t i = 0; i < sizeof offs / sizeof offs[0]; i++)
        if ((*offs[i].off = slot_offset(offs[i].type, offs[i].name)) < 0) {
            Py_DECREF(d);
            return NULL;
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
    .tp_doc = "Door(*, slow, switch, stop, kernel, ...): pid 0's syscall entry with the IPC fast path",
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
        {&s_current, "current"}, {&s_handles, "handles"}, {&s_objs, "_objs"},
        {&s_exit_code, "exit_code"}, {&s_aspace, "aspace"}, {&s_pages, "pages"}, {&s_wakeups, "wakeups"},
        {&s_policy, "policy"}, {&s_running, "running"}, {&s_fast_ipc, "fast_ipc"},
        {&s_plain_park, "plain_park"}, {&s_deferred, "deferred"}, {&s_switch_in_place, "switch_in_place"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*names[i].p = PyUnicode_InternFromString(names[i].s)) == NULL)
            return NULL;
    if ((zero = PyLong_FromLong(0)) == NULL || (one = PyLong_FromLong(1)) == NULL)
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
