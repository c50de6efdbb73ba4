/*
 * vmemu thread parking: a binary permit per task, with an adaptive spin
 * before the sleep (the idea of the kernel's mutex optimistic spinning and
 * of KVM's halt polling).
 *
 * Why C: a Python thread can only wait without holding the GIL inside a
 * call that releases it, and every such call that waits (read, poll,
 * futex) puts the CPU to sleep. Waking a sleeping CPU of a VM costs an
 * IPI and a host reschedule: tens of microseconds per hand-off, more than
 * the emulated fault costs. Here the waiting thread spins on its permit
 * word with the GIL released while the thread it waits for runs on
 * another CPU, so a hand-off between two CPUs is a store and a load.
 *
 * Protocol (one struct vmemu_park per task):
 *   vmemu_unpark() - called with the GIL held (ctypes.PyDLL): sets the
 *     permit; returns 1 when the task sleeps in read() on its pipe, and the
 *     caller must then write one byte to wfd (after letting go of the GIL).
 *   vmemu_park() - called with the GIL released (ctypes.CDLL): consumes the
 *     permit, spinning up to spin_ns first when the task that will run next
 *     is known to be on another CPU (a task that never parked yet is on no
 *     known CPU: no spinning for it), then sleeping on the pipe.
 * The permit/state exchanges are sequentially consistent, so a waker that
 * sets the permit either is seen by the parker or sees it SLEEPING (the
 * store-load pair of Dekker's algorithm). A byte is written only for a
 * SLEEPING -> WAKING transition and always read by the parker before it
 * returns, so the pipe never holds a stale byte.
 *
 * Build: gcc -O2 -shared -fPIC -o libpark.so _park.c
 */
#define _GNU_SOURCE
#include <errno.h>
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

struct vmemu_park {
	_Atomic int permit;
	_Atomic int state;
	int rfd;
	int wfd;
	_Atomic int cpu;	/* where the task last ran: where it will run when woken */
	int pad;
	_Atomic long spun;	/* statistics: wake-ups taken while spinning */
	_Atomic long slept;	/* and while asleep on the pipe */
	_Atomic long wake_gen;	/* `parks` when the last unpark came */
};

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

int vmemu_unpark(struct vmemu_park *p)
{
	int s = SLEEPING;

	atomic_store(&p->wake_gen, atomic_load(&parks));
	if (atomic_exchange(&p->permit, 1))
		return 0;
	atomic_store(&next_cpu, atomic_load(&p->cpu));
	return atomic_compare_exchange_strong(&p->state, &s, WAKING);
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

static int spin(struct vmemu_park *p, long spin_ns)
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
int vmemu_park(struct vmemu_park *p, long spin_ns, int timeout_ms)
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
