"""Transparent huge pages for host memory, which glibc takes only from GLIBC_TUNABLES at process start.

XLA:CPU allocates a step's temporaries afresh on every execution, in chunks glibc maps with mmap and unmaps
when they are freed, so every step page-faults all of them again, 4 KiB at a time: ~440k faults (1.7 GB) and
~2 s of kernel time per `mllama_100m` step at batch 4 x 256. With `glibc.malloc.hugetlb=1` glibc advises the
kernel to back its mappings with 2 MiB pages (madvise), which takes that to ~1k faults and the step ~20% faster
(README, "The CPU step against PyTorch"). Entry points that train (`vlm-jax`, the demo, the training
benchmarks) re-execute themselves once with the tunable added; a user's own setting of it is kept
(glibc.malloc.hugetlb=0 opts out).

Huge pages still come fresh from the kernel, zeroed, on every step (~0.2-0.3 s of kernel time a step).
`HOLD_FREED` makes glibc keep freed memory for the next step instead: the step then faults nothing, at the price
of a resident size that never shrinks (README, "Host memory: freed memory held"). It is a choice for CPU
training runs, not a default: on an accelerator host it would also keep every host buffer a checkpoint save or
the input pipeline ever freed.
"""
from __future__ import annotations

import mmap
import os
import re
import sys

TUNABLE = "glibc.malloc.hugetlb"
FIRST_GLIBC = (2, 35)  # the release that added the tunable
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
BASE_PAGES = f"{mmap.PAGESIZE >> 10} KiB pages"
# One arena: a thread's own arena maps any block over its 64 MiB heap afresh whatever mmap_max says, and XLA:CPU
# allocates a step's temporaries (one block of ~0.8 GB for mllama_100m at 2 x 128) on its worker threads. No
# mmap, so large blocks come from the one heap; no trimming, so a freed block stays there for the next step.
HOLD_FREED = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={1 << 40}")


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library, or None where it is not glibc (musl, macOS)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    return tuple(int(x) for x in version.split(".")[:2]) if name == "glibc" else None


def kernel_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise" or "never"); None without THP."""
    try:
        with open(THP_MODE) as f:
            selected = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return selected.group(1) if selected else None


def tunable_values(tunables: str) -> dict[str, str]:
    """GLIBC_TUNABLES (colon-separated name=value pairs) as a dict."""
    return dict(pair.split("=", 1) for pair in tunables.split(":") if "=" in pair)


def requested(tunables: str) -> str | None:
    """The value GLIBC_TUNABLES gives glibc.malloc.hugetlb, or None."""
    return tunable_values(tunables).get(TUNABLE)


def holds_freed(tunables: str) -> bool:
    """Whether GLIBC_TUNABLES sets every tunable of `HOLD_FREED` to its value there."""
    return tunable_values(":".join(HOLD_FREED)).items() <= tunable_values(tunables).items()


def unavailable() -> str | None:
    """Why glibc cannot be asked for huge pages here, or None when it can (and must be: the kernel's mode is
    madvise, so only mappings advised by their owner get them)."""
    glibc = glibc_version()
    if glibc is None:
        return "the C library is not glibc"
    if glibc < FIRST_GLIBC:
        return f"glibc {glibc[0]}.{glibc[1]} predates {TUNABLE} ({FIRST_GLIBC[0]}.{FIRST_GLIBC[1]})"
    mode = kernel_mode()
    if mode is None:
        return "the kernel has no transparent huge pages"
    if mode != "madvise":
        return f"the kernel's transparent huge page mode is '{mode}' ({THP_MODE})"
    return None


def exec_with_huge_pages(hold_freed: bool = False):
    """Re-executes this process (same pid, command line and environment) with glibc.malloc.hugetlb=1 added to
    GLIBC_TUNABLES, unless the user set that tunable or `unavailable()`, and with `hold_freed` the tunables of
    `HOLD_FREED` the user did not set (where the C library is glibc). Call it first in an entry point, before
    anything is written: the process starts over."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    chosen = tunable_values(tunables)
    added = [f"{TUNABLE}=1"] if TUNABLE not in chosen and not unavailable() else []
    if hold_freed and glibc_version() is not None:
        added += [t for t in HOLD_FREED if t.split("=")[0] not in chosen]
    if not added:
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, *added))))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def describe() -> str:
    """One line for a run's log: the pages this process's host memory gets, how to change that, and whether
    freed memory is held (`HOLD_FREED`)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    held = f"; freed memory held for reuse ({', '.join(HOLD_FREED)})" if holds_freed(tunables) else ""
    return _pages(tunables) + held


def _pages(tunables: str) -> str:
    value, reason = requested(tunables), unavailable()
    if kernel_mode() == "always":
        return "host memory: transparent huge pages (the kernel's mode is 'always')"
    if reason:
        return f"host memory: {BASE_PAGES}, as {reason}"
    if value == "1":
        return f"host memory: glibc asks for transparent huge pages (GLIBC_TUNABLES {TUNABLE}=1)"
    return (f"host memory: {BASE_PAGES} (GLIBC_TUNABLES {TUNABLE}={value})" if value is not None else
            f"host memory: {BASE_PAGES}; start the process with GLIBC_TUNABLES={TUNABLE}=1 (as `vlm-jax` does) "
            "for a faster CPU step")
