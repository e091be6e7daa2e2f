"""Host memory for a model's files: locking mappings in RAM, or reading files into
anonymous huge-page memory instead of mapping them.

``PackedModel`` maps its files by default (zero-copy, pages read as needed and
shared with the page cache). These two helpers serve its two alternatives, as
llama.cpp's ``--mlock`` and ``--no-mmap``:

- ``lock`` pins a mapping's pages so that the OS cannot page them out;
- ``read_into_memory`` copies a file into private anonymous memory advised as
  transparent huge pages: the kernels then stream the weights through 2 MiB
  pages, where a file mapping is mostly 4 KiB pages (the page cache was
  PMD-mapped for 0.3-1.2 of 2.7 GB per expert file here): one TLB entry then
  covers 512 times the bytes (docs/PERFORMANCE.md, section 3, session 29).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

import numpy as np
import psutil

HUGE_PAGE = 2 << 20        # the x86-64 transparent huge page: copies are aligned to it
READ_CHUNK = 64 << 20      # bytes per read(2) while copying a file


class HostMemoryError(OSError):
    """The host cannot hold a model's files in RAM as asked (not enough of it)."""


class MemoryLockError(HostMemoryError):
    """The OS refused to lock a model's files in RAM (``PackedModel.lock``)."""


def _mlock_fn(name: str = "mlock"):
    """libc's mlock (or munlock)(addr, len) -> 0, or -1 with errno set; None where
    there is none."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True), name)
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t), ctypes.c_int
    return fn


def lock(buf: np.ndarray, path: Path) -> None:
    """Lock a whole buffer's pages (a file's mapping or copy) in RAM: read in now,
    never paged out; MemoryLockError names the file, the OS's reason and the limit."""
    fn = _mlock_fn()
    if fn is None:
        raise MemoryLockError(f"{path}: cannot lock in memory: this platform's C library "
                              f"has no mlock")
    if fn(buf.ctypes.data, buf.nbytes) != 0:
        err = ctypes.get_errno()
        try:
            import resource
            soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
            limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"
        except (ImportError, OSError, ValueError):
            limit = "unknown"
        raise MemoryLockError(f"{path}: could not lock {buf.nbytes / 1e9:.2f} GB in memory "
                              f"({os.strerror(err)}); the memlock limit (ulimit -l) is {limit}: "
                              f"raise it, free RAM, or run without --mlock")


def unlock(bufs) -> None:
    """Undo ``lock`` (munlock(2)) on each buffer: the pages stay, but may be evicted."""
    fn = _mlock_fn("munlock")
    if fn is None:
        return
    for buf in bufs:
        fn(buf.ctypes.data, buf.nbytes)


def huge_page_buffer(nbytes: int) -> np.ndarray:
    """A zeroed, writable uint8 buffer of private anonymous memory, its start aligned
    to a huge page and the whole mapping advised MADV_HUGEPAGE (where the platform
    has it), so that transparent huge pages back it in THP's 'madvise' mode too."""
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        area.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no THP here: the same bytes in 4 KiB pages
        pass
    whole = np.frombuffer(area, np.uint8)                        # keeps ``area`` alive
    start = -whole.ctypes.data % HUGE_PAGE
    return whole[start:start + nbytes]


def check_available(nbytes: int, what) -> None:
    """HostMemoryError unless ``nbytes`` fit in the RAM available now (page cache that
    the OS can reclaim counts as available)."""
    free = psutil.virtual_memory().available
    if nbytes > free:
        raise HostMemoryError(f"{what}: reading it into memory needs {nbytes / 1e9:.2f} GB "
                              f"of RAM, {free / 1e9:.2f} GB is available: free RAM or run "
                              f"without --no-mmap (the files are then mapped)")


def read_into_memory(path: Path, nbytes: int) -> np.ndarray:
    """The first ``nbytes`` of a file copied into a read-only huge-page buffer
    (``huge_page_buffer``); EOFError names the file if it ends before."""
    buf = huge_page_buffer(nbytes)
    view = memoryview(buf)
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < nbytes:
            n = f.readinto(view[done:done + READ_CHUNK])
            if not n:
                raise EOFError(f"{path}: expected {nbytes} bytes, found {done} (the file "
                               f"shrank while it was read)")
            done += n
    buf.flags.writeable = False
    return buf
