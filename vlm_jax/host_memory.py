"""Transparent huge pages for host memory, which glibc takes only from GLIBC_TUNABLES at process start.

XLA:CPU allocates a step's temporaries afresh on every execution, in chunks glibc maps with mmap and unmaps
when they are freed, so every step page-faults all of them again, 4 KiB at a time: ~440k faults (1.7 GB) and
~2 s of kernel time per `mllama_100m` step at batch 4 x 256. With `glibc.malloc.hugetlb=1` glibc advises the
kernel to back its mappings with 2 MiB pages (madvise), which takes that to ~1k faults and the step ~20% faster
(README, "The CPU step against PyTorch"). Entry points that train (`vlm-jax`, the demo, the training
benchmarks) re-execute themselves once with the tunable added; a user's own setting of it is kept
(glibc.malloc.hugetlb=0 opts out).
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


def requested(tunables: str) -> str | None:
    """The value GLIBC_TUNABLES (colon-separated name=value pairs) gives glibc.malloc.hugetlb, or None."""
    values = dict(pair.split("=", 1) for pair in tunables.split(":") if "=" in pair)
    return values.get(TUNABLE)


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


def exec_with_huge_pages():
    """Re-executes this process (same pid, command line and environment) with glibc.malloc.hugetlb=1 added to
    GLIBC_TUNABLES, unless the user set that tunable or `unavailable()`. Call it first in an entry point, before
    anything is imported or written: the process starts over."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if requested(tunables) is not None or unavailable():
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, f"{TUNABLE}=1"))))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def describe() -> str:
    """One line for a run's log: the pages this process's host memory gets, and how to change that."""
    value, reason = requested(os.environ.get("GLIBC_TUNABLES", "")), unavailable()
    if kernel_mode() == "always":
        return "host memory: transparent huge pages (the kernel's mode is 'always')"
    if reason:
        return f"host memory: {BASE_PAGES}, as {reason}"
    if value == "1":
        return f"host memory: glibc asks for transparent huge pages (GLIBC_TUNABLES {TUNABLE}=1)"
    return (f"host memory: {BASE_PAGES} (GLIBC_TUNABLES {TUNABLE}={value})" if value is not None else
            f"host memory: {BASE_PAGES}; start the process with GLIBC_TUNABLES={TUNABLE}=1 (as `vlm-jax` does) "
            "for a faster CPU step")
