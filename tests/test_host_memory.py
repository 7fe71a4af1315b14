"""Huge pages for host memory: entry points start over with glibc.malloc.hugetlb=1 unless the user chose."""
import mmap
import os
import subprocess
import sys

import pytest

from vlm_jax import host_memory

# A child that starts the way `vlm-jax` does, then page-faults a fresh 256 MiB malloc (not numpy's allocator,
# which advises huge pages itself) and reports the faults and its tunables.
CHILD = """
import ctypes, os, resource
from vlm_jax import host_memory
host_memory.exec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(size), 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, os.environ.get("GLIBC_TUNABLES", ""))
"""
SMALL_PAGES = (256 << 20) // mmap.PAGESIZE

# A child that, on a worker thread as XLA:CPU runs a step, touches a fresh 256 MiB block, frees it, and
# touches a second one: the faults of each.
CHILD_REUSE = """
import ctypes, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 256 << 20, []
def step():
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    libc.free(block)
def two_steps():
    step()
    step()
worker = threading.Thread(target=two_steps)
worker.start()
worker.join()
print(*faults)
"""


def run(child: str, tunables: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    return subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def run_child(tunables: str | None) -> tuple[int, str]:
    faults, _, seen = run(CHILD, tunables).partition(" ")
    return int(faults), seen


@pytest.mark.skipif(host_memory.unavailable() is not None, reason=f"no huge pages here: {host_memory.unavailable()}")
@pytest.mark.skipif(mmap.PAGESIZE != 4096, reason="sized for 4 KiB base pages and 2 MiB huge pages")
def test_entry_point_restarts_with_huge_pages_and_faults_far_less():
    faults, seen = run_child("glibc.malloc.arena_max=4")
    assert seen == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"  # the user's tunables kept
    opted_out, seen_out = run_child("glibc.malloc.hugetlb=0")
    assert seen_out == "glibc.malloc.hugetlb=0"  # the user's choice is not overridden
    assert opted_out > 0.9 * SMALL_PAGES
    assert faults < 0.1 * SMALL_PAGES  # 2 MiB pages: 128 faults where 4 KiB pages take 65,536


@pytest.mark.skipif(host_memory.glibc_version() is None, reason="the C library is not glibc")
def test_held_freed_memory_is_reused_without_faults():
    first, second = map(int, run(CHILD_REUSE, "").split())
    held_first, held_second = map(int, run(CHILD_REUSE, ":".join(host_memory.HOLD_FREED)).split())
    assert second > 0.9 * first  # freed back to the kernel: the next block faults in again
    assert held_second < 0.01 * held_first  # the freed block is handed out again, already resident


def test_hold_freed_adds_only_what_the_user_left(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(host_memory, "unavailable", lambda: None)
    monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 36))
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    host_memory.exec_with_huge_pages(hold_freed=True)
    (_, _, env), = calls
    assert env["GLIBC_TUNABLES"] == ":".join(("glibc.malloc.arena_max=4", "glibc.malloc.hugetlb=1",
                                              *host_memory.HOLD_FREED[1:]))
    monkeypatch.setenv("GLIBC_TUNABLES", ":".join(("glibc.malloc.hugetlb=1", *host_memory.HOLD_FREED)))
    host_memory.exec_with_huge_pages(hold_freed=True)  # all there already: no second start
    assert len(calls) == 1


def test_no_restart_where_unavailable_or_chosen(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(host_memory, "unavailable", lambda: "the C library is not glibc")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    host_memory.exec_with_huge_pages()
    monkeypatch.setattr(host_memory, "unavailable", lambda: None)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    host_memory.exec_with_huge_pages()
    assert calls == []
    monkeypatch.delenv("GLIBC_TUNABLES")
    host_memory.exec_with_huge_pages()
    (path, argv, env), = calls
    assert (path, argv, env["GLIBC_TUNABLES"]) == (sys.executable, sys.orig_argv, "glibc.malloc.hugetlb=1")


@pytest.mark.parametrize("mode,glibc,tunables,expected", [
    ("madvise", (2, 36), "glibc.malloc.hugetlb=1", "glibc asks for transparent huge pages"),
    ("madvise", (2, 36), "glibc.malloc.hugetlb=0", "pages (GLIBC_TUNABLES glibc.malloc.hugetlb=0)"),
    ("madvise", (2, 36), "", "start the process with GLIBC_TUNABLES=glibc.malloc.hugetlb=1"),
    ("madvise", (2, 31), "", "glibc 2.31 predates glibc.malloc.hugetlb (2.35)"),
    ("never", (2, 36), "", "transparent huge page mode is 'never'"),
    ("always", (2, 36), "", "transparent huge pages (the kernel's mode is 'always')"),
    ("madvise", (2, 36), ":".join(("glibc.malloc.hugetlb=1", *host_memory.HOLD_FREED)),
     "glibc asks for transparent huge pages (GLIBC_TUNABLES glibc.malloc.hugetlb=1); freed memory held for reuse"),
])
def test_describe_says_which_pages_and_why(monkeypatch, mode, glibc, tunables, expected):
    monkeypatch.setattr(host_memory, "kernel_mode", lambda: mode)
    monkeypatch.setattr(host_memory, "glibc_version", lambda: glibc)
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    assert expected in host_memory.describe()
