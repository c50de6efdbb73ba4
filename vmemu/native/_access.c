/*
 * vmemu native access helper: user-mode memory accesses that survive the
 * signal they may end in, and a fork whose child runs a fixed list of
 * accesses without ever returning to Python.
 *
 * Why C: a userfault resolved as SIGBUS (UFFD_FEATURE_SIGBUS, a poisoned
 * page, ...) or a SIGSEGV (PROT_NONE) must happen in *this* mm and as a
 * *user-mode* access (a kernel access such as process_vm_readv gets EFAULT
 * instead). CPython cannot recover from a synchronous SIGBUS/SIGSEGV, so the
 * access loop runs here under sigsetjmp(), and the signal handler
 * siglongjmp()s back with si_signo, si_code and si_addr.
 *
 * The handler is installed process-wide on first use (and re-installed if
 * someone, e.g. faulthandler, replaced it). A signal that arrives on a
 * thread that is not inside vmemu_access() is not ours: the handler puts
 * the previous action back and returns, so the fault re-executes under it.
 *
 * vmemu_fork() uses the raw clone syscall rather than glibc's fork():
 * glibc's fork() takes the malloc arena locks around the syscall, and a
 * fork that blocks until its UFFD_EVENT_FORK is read would hold them and
 * deadlock every other thread of the parent. The child only uses raw
 * syscalls and never returns.
 *
 * Build: gcc -O1 -shared -fPIC -o libvmemu_access.so _access.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static __thread sigjmp_buf tls_jmp;
static __thread volatile int tls_active;
static __thread volatile int tls_signo;
static __thread volatile int tls_code;
static __thread void *volatile tls_addr;

static struct sigaction old_bus, old_segv;
static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;

static void vmemu_handler(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (tls_active) {
		tls_active = 0;
		tls_signo = sig;
		tls_code = si->si_code;
		tls_addr = si->si_addr;
		siglongjmp(tls_jmp, 1);
	}
	/* Not one of our accesses: hand the fault back to the previous owner. */
	sigaction(sig, sig == SIGBUS ? &old_bus : &old_segv, NULL);
}

static void ensure_one(int sig, struct sigaction *old)
{
	struct sigaction cur, sa;

	sigaction(sig, NULL, &cur);
	if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == vmemu_handler)
		return;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = vmemu_handler;
	/* SA_NODEFER: the mask is not changed on entry, so vmemu_copy() can skip restoring it. */
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigemptyset(&sa.sa_mask);
	sigaction(sig, &sa, old);
}

static volatile int installed;

static void ensure_handlers(void)
{
	pthread_mutex_lock(&install_lock);
	ensure_one(SIGBUS, &old_bus);
	ensure_one(SIGSEGV, &old_segv);
	installed = 1;
	pthread_mutex_unlock(&install_lock);
}

/*
 * Access [addr, addr+len) one byte at a time in increasing address order.
 * write == 0: read each byte (into buf when buf != NULL).
 * write != 0: store buf[i] at addr+i.
 * Returns 0 when every byte was accessed, 1 when a signal stopped the
 * access: then *done is the number of bytes completed before the faulting
 * byte, and *signo, *code, *si_addr come from the siginfo.
 */
int vmemu_access(unsigned char *addr, size_t len, int write, unsigned char *buf,
		 size_t *done, int *signo, int *code, void **out_addr)
{
	volatile unsigned char *p = addr;
	volatile size_t d = 0;
	size_t i;

	ensure_handlers();
	*done = 0;
	*signo = 0;
	*code = 0;
	*out_addr = NULL;
	if (sigsetjmp(tls_jmp, 1)) {
		*done = d;
		*signo = tls_signo;
		*code = tls_code;
		*out_addr = tls_addr;
		return 1;
	}
	tls_active = 1;
	for (i = 0; i < len; i++) {
		if (write) {
			p[i] = buf[i];
		} else {
			unsigned char c = p[i];
			if (buf)
				buf[i] = c;
		}
		d = i + 1;
	}
	tls_active = 0;
	*done = d;
	return 0;
}

/* Where a copy stopped: filled by vmemu_copy(). */
struct vmemu_stop {
	uint64_t done;
	int32_t signo;
	int32_t code;
	uint64_t addr;
};

/*
 * Copy len bytes between user memory at addr and buf (write != 0: buf to
 * addr), page by page with memcpy. Returns 0 when all was copied, 1 when a
 * signal stopped the copy. A fault only happens at the first byte touched
 * in a page, so *done (the bytes of the pages copied before the faulting
 * one) is what a byte-by-byte copy would report, at memcpy speed.
 */
int vmemu_copy(unsigned char *addr, unsigned char *buf, size_t len, int write,
	       struct vmemu_stop *stop)
{
	volatile size_t d = 0;

	/*
	 * Installed once: this runs on every NativeTask access and the check
	 * costs two system calls. (vmemu_access() checks on every call, and
	 * puts the handlers back if someone replaced them since.)
	 */
	if (!installed)
		ensure_handlers();
	stop->done = 0;
	stop->signo = 0;
	stop->code = 0;
	stop->addr = 0;
	if (sigsetjmp(tls_jmp, 0)) {
		stop->done = d;
		stop->signo = tls_signo;
		stop->code = tls_code;
		stop->addr = (uint64_t)(uintptr_t)tls_addr;
		return 1;
	}
	tls_active = 1;
	while (d < len) {
		uintptr_t a = (uintptr_t)addr + d;
		size_t n = 4096 - (a & 4095);

		if (n > len - d)
			n = len - d;
		if (write)
			memcpy((void *)a, buf + d, n);
		else
			memcpy(buf + d, (const void *)a, n);
		d += n;
	}
	tls_active = 0;
	stop->done = d;
	return 0;
}

/* One step of a forked child's program. */
struct vmemu_child_op {
	int32_t kind;		/* VMEMU_CHILD_* */
	int32_t value;		/* byte stored by TOUCH_WRITE */
	uint64_t addr;
	uint64_t len;
};

enum {
	VMEMU_CHILD_PEEK = 0,		/* read len bytes, report them */
	VMEMU_CHILD_TOUCH_READ = 1,	/* read len bytes */
	VMEMU_CHILD_TOUCH_WRITE = 2,	/* store value into len bytes */
	VMEMU_CHILD_WAIT = 3,		/* block until the parent releases us */
};

/* Result record written to result_fd after each completed op, then data. */
struct vmemu_child_rec {
	uint32_t index;
	uint32_t kind;
	uint64_t datalen;
};

static int write_all(int fd, const void *b, size_t n)
{
	const char *c = b;

	while (n) {
		ssize_t r = syscall(SYS_write, fd, c, n);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		c += r;
		n -= (size_t)r;
	}
	return 0;
}

static void close_other_fds(int a, int b)
{
	int lo = a < b ? a : b, hi = a < b ? b : a;

	if (lo > 3)
		syscall(SYS_close_range, 3, lo - 1, 0);
	if (hi - lo > 1)
		syscall(SYS_close_range, lo + 1, hi - 1, 0);
	syscall(SYS_close_range, hi + 1, ~0U, 0);
}

static void child_main(const struct vmemu_child_op *ops, int nops, int result_fd,
		       int release_fd)
{
	struct sigaction dfl;
	unsigned char chunk[4096];
	int i;

	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	sigemptyset(&dfl.sa_mask);
	sigaction(SIGBUS, &dfl, NULL);
	sigaction(SIGSEGV, &dfl, NULL);
	close_other_fds(result_fd, release_fd);

	for (i = 0; i < nops; i++) {
		const struct vmemu_child_op *op = &ops[i];
		volatile unsigned char *p = (volatile unsigned char *)(uintptr_t)op->addr;
		struct vmemu_child_rec rec = { (uint32_t)i, (uint32_t)op->kind, 0 };
		uint64_t j;

		switch (op->kind) {
		case VMEMU_CHILD_PEEK:
			rec.datalen = op->len;
			/* Access everything first, so a fatal signal leaves no record. */
			for (j = 0; j < op->len; j++)
				(void)p[j];
			if (write_all(result_fd, &rec, sizeof(rec)))
				syscall(SYS_exit_group, 2);
			for (j = 0; j < op->len; j += sizeof(chunk)) {
				uint64_t n = op->len - j < sizeof(chunk) ? op->len - j : sizeof(chunk);
				uint64_t k;

				for (k = 0; k < n; k++)
					chunk[k] = p[j + k];
				if (write_all(result_fd, chunk, n))
					syscall(SYS_exit_group, 2);
			}
			continue;
		case VMEMU_CHILD_TOUCH_READ:
			for (j = 0; j < op->len; j++)
				(void)p[j];
			break;
		case VMEMU_CHILD_TOUCH_WRITE:
			for (j = 0; j < op->len; j++)
				p[j] = (unsigned char)op->value;
			break;
		case VMEMU_CHILD_WAIT: {
			char c;

			while (syscall(SYS_read, release_fd, &c, 1) < 0 && errno == EINTR)
				;
			break;
		}
		default:
			syscall(SYS_exit_group, 3);
		}
		if (write_all(result_fd, &rec, sizeof(rec)))
			syscall(SYS_exit_group, 2);
	}
	syscall(SYS_exit_group, 0);
}

/*
 * fork() the calling process with the raw clone syscall; the child runs
 * ops[0..nops) and exits 0 (or dies from a signal). Returns the child's pid
 * in the parent, or -1 with *err = errno.
 */
long vmemu_fork(const struct vmemu_child_op *ops, int nops, int result_fd, int release_fd,
		int *err)
{
	long pid = syscall(SYS_clone, (long)SIGCHLD, 0L, 0L, 0L, 0L);

	if (pid == 0) {
		child_main(ops, nops, result_fd, release_fd);
		syscall(SYS_exit_group, 4);
	}
	if (pid < 0)
		*err = errno;
	return pid;
}
