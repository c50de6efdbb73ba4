/*
 * vmemu thread parking: a binary permit per task, with an adaptive spin
 * before the sleep (the idea of the kernel's mutex optimistic spinning and
 * of KVM's halt polling). A CPython extension module: `Parker` objects.
 *
 * Why C: a Python thread can only wait without holding the GIL inside a
 * call that releases it, and every such call that waits (read, poll,
 * futex) puts the CPU to sleep. Waking a sleeping CPU of a VM costs an
 * IPI and a host reschedule: tens of microseconds per hand-off, more than
 * the emulated fault costs. Here the waiting thread spins on its permit
 * word with the GIL released while the thread it waits for runs on
 * another CPU, so a hand-off between two CPUs is a store and a load.
 * Why an extension module rather than ctypes: every hand-off between two
 * threads calls unpark and park, and a ctypes call costs ~0.3-0.7 us where
 * a built-in method costs ~0.03 us (a round trip of a fault to a handler
 * thread and back makes four of them).
 *
 * Protocol (one Parker per task):
 *   unpark() - called with the GIL held: sets the permit and the woken
 *     flag, and returns whether the flag was clear (the first wake-up since
 *     clear(): try_to_wake_up's answer); when the task sleeps in read() on
 *     its pipe, writes one byte to wfd (with the GIL let go of first, so
 *     the woken thread does not find it held).
 *   clear() - clears both: set_current_state. A park consumes the permit
 *     but leaves the flag, which tells an observer that a wake-up reached
 *     the task until it arms itself for its next sleep.
 *   park([timeout_s]) - consumes the permit with the GIL released,
 *     spinning up to spin_ns first when the task that will run next is
 *     known to be on another CPU (a task that never parked yet is on no
 *     known CPU: no spinning for it), then sleeping on the pipe.
 * The permit/state exchanges are sequentially consistent, so a waker that
 * sets the permit either is seen by the parker or sees it SLEEPING (the
 * store-load pair of Dekker's algorithm). A byte is written only for a
 * SLEEPING -> WAKING transition and always read by the parker before it
 * returns, so the pipe never holds a stale byte.
 *
 * Built by vmemu.cbuild.load_module against this interpreter's headers.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() atomic_signal_fence(memory_order_seq_cst)
#endif

enum { RUNNING = 0, SPINNING = 1, SLEEPING = 2, WAKING = 3 };

typedef struct {
	PyObject_HEAD
	_Atomic int permit;
	_Atomic int state;
	int rfd;
	int wfd;
	_Atomic int cpu;	/* where the task last ran: where it will run when woken */
	_Atomic int woken;	/* unparked since the last clear() (a park does not reset it) */
	int released;		/* set by the owner's release(): unparks do nothing */
	long spin_ns;
	_Atomic long spun;	/* statistics: wake-ups taken while spinning */
	_Atomic long slept;	/* and while asleep on the pipe */
	_Atomic long wake_gen;	/* `parks` when the last unpark came */
} Parker;

/* The CPU of the task woken last: the one that will hold the GIL next. */
static _Atomic int next_cpu = -1;
/* Bumped by every park: the GIL was just let go of. */
static _Atomic long parks;

static long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/*
 * Woken while spinning: the waker still holds the GIL until it parks in
 * turn, and a thread that asks for a held GIL sleeps on a condition
 * variable (and needs another wake-up). Wait, briefly, for a park after
 * the unpark (`seen` is the count of parks when it came).
 */
static void await_waker_park(long seen)
{
	long deadline = now_ns() + 20000;
	unsigned i = 0;

	while (atomic_load_explicit(&parks, memory_order_relaxed) == seen) {
		cpu_relax();
		if (!(++i & 63) && now_ns() > deadline)
			break;
	}
}

static int spin(Parker *p, long spin_ns)
{
	long deadline = now_ns() + spin_ns;
	unsigned i = 0;

	atomic_store(&p->state, SPINNING);
	for (;;) {
		if (atomic_load_explicit(&p->permit, memory_order_relaxed)) {
			long seen = atomic_load(&p->wake_gen);

			atomic_store(&p->state, RUNNING);
			atomic_exchange(&p->permit, 0);
			atomic_fetch_add_explicit(&p->spun, 1, memory_order_relaxed);
			await_waker_park(seen);
			return 1;
		}
		cpu_relax();
		if (!(++i & 255) && now_ns() > deadline)
			return 0;
	}
}

/*
 * Returns 0 when woken, 1 when timeout_ms passed (or the pipe was closed),
 * 2 when a signal arrived (Python runs its handlers, then parks again),
 * -errno when reading the pipe failed otherwise.
 */
static int do_park(Parker *p, long spin_ns, int timeout_ms)
{
	int me = sched_getcpu();
	int next, s;
	char c;

	atomic_fetch_add(&parks, 1);
	if (atomic_exchange(&p->permit, 0))
		goto woken;
	next = atomic_load(&next_cpu);
	if (spin_ns > 0 && next >= 0 && next != me && spin(p, spin_ns))
		goto woken;
	atomic_store(&p->state, SLEEPING);
	if (atomic_exchange(&p->permit, 0)) {
		s = SLEEPING;
		if (!atomic_compare_exchange_strong(&p->state, &s, RUNNING))
			while (read(p->rfd, &c, 1) < 0 && errno == EINTR)
				;	/* a waker saw us SLEEPING: take its byte */
		goto woken;
	}
	for (;;) {
		int r;

		if (timeout_ms < 0) {
			r = read(p->rfd, &c, 1);
		} else {
			struct pollfd pfd = { .fd = p->rfd, .events = POLLIN };

			r = poll(&pfd, 1, timeout_ms);
			if (r > 0)
				r = read(p->rfd, &c, 1);
		}
		if (r > 0)
			break;
		if (r < 0 && errno != EINTR) {
			int err = errno;	/* a broken pipe: nothing to wait for */

			atomic_store(&p->state, RUNNING);
			return -err;
		}
		/* timed out, or a signal for Python's handlers: unless a byte is on its way */
		s = SLEEPING;
		if (atomic_compare_exchange_strong(&p->state, &s, RUNNING))
			return r == 0 ? 1 : 2;
		timeout_ms = -1;
	}
	atomic_exchange(&p->permit, 0);
	atomic_fetch_add_explicit(&p->slept, 1, memory_order_relaxed);
woken:
	atomic_store(&p->state, RUNNING);
	atomic_store(&p->cpu, me);
	return 0;
}

static int Parker_init(Parker *p, PyObject *args, PyObject *kw)
{
	int rfd, wfd;
	long spin_ns;
	static char *names[] = {"rfd", "wfd", "spin_ns", NULL};

	if (!PyArg_ParseTupleAndKeywords(args, kw, "iil", names, &rfd, &wfd, &spin_ns))
		return -1;
	p->rfd = rfd;
	p->wfd = wfd;
	p->spin_ns = spin_ns;
	atomic_store(&p->cpu, -1);
	return 0;
}

static PyObject *Parker_clear(Parker *p, PyObject *unused)
{
	atomic_store(&p->woken, 0);
	atomic_store(&p->permit, 0);
	Py_RETURN_NONE;
}

static PyObject *Parker_unpark(Parker *p, PyObject *unused)
{
	int s = SLEEPING, fd = p->wfd, fresh;
	ssize_t r;

	if (p->released)
		Py_RETURN_FALSE;
	atomic_store(&p->wake_gen, atomic_load(&parks));
	fresh = !atomic_exchange(&p->woken, 1);
	if (atomic_exchange(&p->permit, 1))
		Py_RETURN_FALSE;	/* merged with the pending one */
	atomic_store(&next_cpu, atomic_load(&p->cpu));
	if (atomic_compare_exchange_strong(&p->state, &s, WAKING)) {
		Py_BEGIN_ALLOW_THREADS
		do
			r = write(fd, "", 1);
		while (r < 0 && errno == EINTR);
		Py_END_ALLOW_THREADS
		if (r < 0)
			return PyErr_SetFromErrno(PyExc_OSError);
	}
	return PyBool_FromLong(fresh);
}

/* park([timeout_s]) -> True when woken, False when timeout_s passed first. */
static PyObject *Parker_park(Parker *p, PyObject *const *args, Py_ssize_t nargs)
{
	long spin = p->spin_ns;
	int timeout_ms = -1, timed = 0, r;

	if (nargs > 1) {
		PyErr_SetString(PyExc_TypeError, "park() takes at most one argument (timeout_s)");
		return NULL;
	}
	if (nargs == 1 && args[0] != Py_None) {
		double t = PyFloat_AsDouble(args[0]);

		if (t == -1.0 && PyErr_Occurred())
			return NULL;
		if (!(t > 0))
			t = 0;
		if (t > 2e6)
			t = 2e6;	/* ~23 days: poll's int milliseconds */
		timed = 1;
		if (t * 1e9 < spin)
			spin = (long)(t * 1e9);
		timeout_ms = (int)ceil(t * 1000);
	}
	for (;;) {
		Py_BEGIN_ALLOW_THREADS
		r = do_park(p, spin, timeout_ms);
		Py_END_ALLOW_THREADS
		if (r == 0)
			Py_RETURN_TRUE;
		if (r < 0) {
			errno = -r;
			return PyErr_SetFromErrno(PyExc_OSError);
		}
		/* a signal: its Python handler runs here; then park again, unless timed
		   (the caller's wait_event loop recomputes what is left of its deadline) */
		if (r == 2 && PyErr_CheckSignals() < 0)
			return NULL;
		if (r == 1 || timed)
			Py_RETURN_FALSE;
	}
}

static PyMethodDef Parker_methods[] = {
	{"clear", (PyCFunction)Parker_clear, METH_NOARGS,
	 "Forget a pending unpark and the woken flag (no byte is ever left behind in the pipe)."},
	{"unpark", (PyCFunction)Parker_unpark, METH_NOARGS,
	 "Give the permit; True if the first since clear(); write the pipe if the thread sleeps on it."},
	{"park", (PyCFunction)(void (*)(void))Parker_park, METH_FASTCALL,
	 "Wait for the permit and take it; False when timeout_s passed first."},
	{NULL}
};

static PyMemberDef Parker_members[] = {
	{"rfd", T_INT, offsetof(Parker, rfd), READONLY, "the pipe's read end"},
	{"wfd", T_INT, offsetof(Parker, wfd), READONLY, "the pipe's write end"},
	{"woken", T_INT, offsetof(Parker, woken), READONLY, "nonzero: unparked since the last clear()"},
	{"released", T_INT, offsetof(Parker, released), 0, "nonzero: unparks do nothing"},
	{"spin_ns", T_LONG, offsetof(Parker, spin_ns), 0, "how long a park may spin"},
	{"spun", T_LONG, offsetof(Parker, spun), READONLY, "parks that ended while spinning"},
	{"slept", T_LONG, offsetof(Parker, slept), READONLY, "parks that ended asleep on the pipe"},
	{NULL}
};

static PyTypeObject ParkerType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "_park.Parker",
	.tp_basicsize = sizeof(Parker),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Parker(rfd, wfd, spin_ns): a binary permit, spun for, then slept for on a pipe",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Parker_init,
	.tp_methods = Parker_methods,
	.tp_members = Parker_members,
};

static struct PyModuleDef park_module = {
	PyModuleDef_HEAD_INIT, "_park", "vmemu's thread parker (see vmemu/sched/park.py)", -1, NULL
};

PyMODINIT_FUNC PyInit__park(void)
{
	PyObject *m;

	if (PyType_Ready(&ParkerType) < 0)
		return NULL;
	m = PyModule_Create(&park_module);
	if (m == NULL)
		return NULL;
	Py_INCREF(&ParkerType);
	if (PyModule_AddObject(m, "Parker", (PyObject *)&ParkerType) < 0) {
		Py_DECREF(&ParkerType);
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
