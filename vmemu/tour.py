"""A narrated tour of the emulated address space (``vmemu tour``).

Each chapter is a small scenario that prints what happened and why, in the
kernel's terms. The tour is executable documentation: ``tests`` compare its
output with the expected text, so it never goes stale.
"""

from __future__ import annotations

from collections.abc import Callable

from vmemu.constants import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from vmemu.errors import Signal
from vmemu.process import Process

Say = Callable[[str], None]


def chapter_mmap_and_touch(say: Say) -> Process:
    """Map memory lazily, read it (zero page), write it (a real frame)."""
    p = Process(name="tour")
    addr = p.mmap(0, 4 * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    say(f"mmap(16 KiB, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS) = {addr:#x}")
    say("  /proc/self/maps: " + p.maps().strip())
    say(f"  frames in use: {p.kernel.memory_statistics().pages_in_use} "
        "(mapping memory allocates nothing)")
    data = p.read(addr, 8)
    say(f"read 8 bytes at {addr:#x} -> {data.hex()} (a read fault maps the shared zero page)")
    say(f"  pagemap: {p.pagemap(addr):#018x}, frames in use: "
        f"{p.kernel.memory_statistics().pages_in_use}")
    p.write(addr, b"vmemu!!\n")
    say(f"write b'vmemu!!\\n' at {addr:#x} -> a write fault on the zero page copies it "
        "into a fresh frame (do_wp_page)")
    say(f"  frames in use: {p.kernel.memory_statistics().pages_in_use}")
    say("the 4-level walk for that address (each level's index and entry):")
    for level in p.walk(addr):
        say(f"  {level}")
    return p


def chapter_fork_cow(say: Say, parent: Process) -> None:
    """Fork shares private pages copy-on-write; the first write copies."""
    addr = parent.mm.vmas.find_vma(0).vm_start  # type: ignore[union-attr]
    child = parent.fork(name="child")
    pte_parent = parent.walk(addr)[-1].entry
    pte_child = child.walk(addr)[-1].entry
    say("fork(): parent and child now map the same frame, both read-only (RW bit clear):")
    say(f"  parent pte {pte_parent:#018x}   child pte {pte_child:#018x}")
    child.write(addr, b"child!!\n")
    say("child writes -> write-protect fault -> COW copy (wp_page_copy):")
    say(f"  child pte  {child.walk(addr)[-1].entry:#018x} (new frame, RW|D)")
    say(f"  parent reads {parent.read(addr, 8)!r}, child reads {child.read(addr, 8)!r}")
    parent.write(addr, b"parent!\n")
    say("parent writes -> its frame is mapped once now, so it is reused in place "
        f"(wp_page_reuse): cow={parent.statistics().cow} reuse={parent.statistics().wp_reuse}")
    parent.check()
    child.exit()


def chapter_sigsegv(say: Say, p: Process) -> None:
    """Bad accesses raise signals carrying si_code and si_addr."""
    addr = p.mm.vmas.find_vma(0).vm_start  # type: ignore[union-attr]
    p.mprotect(addr, PAGE_SIZE, PROT_READ)
    try:
        p.write(addr, b"x")
    except Signal as sig:
        say(f"write to a PROT_READ page -> {sig.signal_name} {sig.code_name} "
            f"si_addr={sig.si_addr:#x}")
    p.munmap(addr, 4 * PAGE_SIZE)
    try:
        p.read(addr + 8, 1)
    except Signal as sig:
        say(f"read after munmap -> {sig.signal_name} {sig.code_name} si_addr={sig.si_addr:#x}")
    p.check()
    p.exit()
    say(f"exit: frames in use {p.kernel.memory_statistics().pages_in_use}, "
        f"page tables {p.kernel.memory_statistics().page_tables}; mm.check() passed")


def userfault_demo(seed: int = 1) -> tuple[list[str], str]:
    """A MISSING fault travelling to a handler task and back, under the deterministic runtime.

    Returns the handler's notes and the trace timeline (same seed, same text).
    """
    from vmemu.kernel import Kernel
    from vmemu.sched import SimRuntime
    from vmemu.uffd import uapi

    kernel = Kernel(runtime=SimRuntime(seed=seed, ncpus=2))
    p = kernel.spawn("demo")
    uffd = p.userfaultfd(uapi.O_CLOEXEC)
    uffd.api(uapi.UFFD_FEATURE_THREAD_ID)
    area = p.mmap(0, 2 * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    uffd.register(area, 2 * PAGE_SIZE, uapi.UFFDIO_REGISTER_MODE_MISSING)
    src = p.mmap(0, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    p.write(src, b"fetched from far memory".ljust(PAGE_SIZE, b"."))
    notes: list[str] = []

    def handler(task: object) -> None:
        msg = uffd.read_msgs()[0]
        assert isinstance(msg, uapi.PagefaultMsg)
        notes.append(f"handler read UFFD_EVENT_PAGEFAULT flags={msg.flags:#x} "
                     f"address={msg.address:#x} ptid={msg.ptid}")
        uffd.copy(msg.address & ~(PAGE_SIZE - 1), src, PAGE_SIZE)
        notes.append(f"handler: UFFDIO_COPY to {msg.address:#x} woke the faulting task")

    def worker(task: object) -> bytes:
        return p.thread("worker").read(area, 23)

    def main() -> None:
        h = p.spawn(handler, name="handler")
        w = p.spawn(worker, name="worker")
        notes.append(f"worker read {w.join()!r}")
        h.join()

    kernel.run(main)
    p.check()
    return notes, kernel.runtime.tracer.format_timeline()


def chapter_userfaultfd(say: Say) -> None:
    """A fault handled in userland: access -> walk -> handle_userfault -> read -> COPY -> wake."""
    notes, timeline = userfault_demo()
    say("a worker task touches a page registered with userfaultfd (MISSING); a handler task")
    say("blocked in read() gets the message, resolves it with UFFDIO_COPY, and the worker's")
    say("access is retried (VM_FAULT_RETRY) and completes. Deterministic simulation, seed 1:")
    for n in notes:
        say("  " + n)
    say("the trace (virtual time, CPU, task, event):")
    for line in timeline.splitlines():
        say("  " + line)


def run_tour(say: Say = print) -> None:
    """Run every chapter in order."""
    say("== 1. mapping and touching memory ==")
    p = chapter_mmap_and_touch(say)
    say("")
    say("== 2. fork and copy-on-write ==")
    chapter_fork_cow(say, p)
    say("")
    say("== 3. signals ==")
    chapter_sigsegv(say, p)
    say("")
    say("== 4. a page fault handled in userland ==")
    chapter_userfaultfd(say)
