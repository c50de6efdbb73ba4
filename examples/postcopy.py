"""Postcopy live migration in miniature: pages arrive on demand, one fault at a time.

The guest's memory is registered for MISSING faults; a handler thread
blocks in read() on the uffd, fetches each faulting page from the "source
host" (a dict here) and installs it with UFFDIO_COPY. The same function
runs on the emulator (``vmemu.Process``) and on the real kernel
(``vmemu.native.NativeProcess``): that is the point.

Run: ``python examples/postcopy.py`` (add ``--native`` on Linux as root).
"""

from __future__ import annotations

import sys
from typing import Any

from vmemu.constants import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from vmemu.uffd import uapi


def postcopy(proc: Any, npages: int = 8, order: list[int] | None = None) -> dict[str, Any]:
    """Migrate ``npages`` pages lazily; returns what the guest read and what the handler saw."""
    source = {i: bytes([0x40 + i]) * PAGE_SIZE for i in range(npages)}
    guest = proc.mmap(0, npages * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    staging = proc.mmap(0, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    uffd = proc.userfaultfd(uapi.O_CLOEXEC)
    uffd.api(0)
    uffd.register(guest, npages * PAGE_SIZE, uapi.UFFDIO_REGISTER_MODE_MISSING)
    order = order if order is not None else list(range(npages))

    def handler(task: Any) -> list[tuple[int, int]]:
        seen = []
        for _ in order:
            msg = uffd.read(32)[0]
            page = (msg.address - guest) // PAGE_SIZE
            seen.append((page, msg.flags))
            proc.write(staging, source[page])
            uffd.copy(guest + page * PAGE_SIZE, staging, PAGE_SIZE)
        return seen

    def vcpu(task: Any) -> list[bytes]:
        return [task.read(guest + i * PAGE_SIZE + 17, 4) for i in order]

    h = proc.spawn(handler, name="handler")
    v = proc.spawn(vcpu, name="vcpu0")
    result = {"guest_read": v.join(), "faults": h.join()}
    uffd.close()
    proc.munmap(guest, npages * PAGE_SIZE)
    proc.munmap(staging, PAGE_SIZE)
    return result


if __name__ == "__main__":
    if "--native" in sys.argv:
        from vmemu.native import NativeProcess

        proc: Any = NativeProcess()
    else:
        import vmemu

        proc = vmemu.Process()
    r = postcopy(proc, 4, [2, 0, 3, 1])
    for page, flags in r["faults"]:
        print(f"fault on page {page} (flags {flags:#x}) -> UFFDIO_COPY")
    print("guest read:", [b.hex() for b in r["guest_read"]])
