"""Keeping freed memory for reuse during a long CPU computation (glibc's ``malloc``).

On CPU, PyTorch takes every tensor from the C library's ``malloc``. glibc serves large
blocks (above a threshold that starts at 128 KB and grows to at most 32 MB) with fresh
``mmap`` pages and returns them to the kernel when the tensor is freed, so an iterative
method that allocates full-volume temporaries in every iteration pays a page fault per
4 KB, every iteration. Measured on the OASIS pair (160×192×144, 2 threads, idle 2-core
machine): SyN's ``accurate`` preset took 62 s wall / 105 CPU s with glibc's defaults and
33 s / 58 CPU s with freed memory kept for reuse (a VoxelMorph training step at 96³:
~210 000 page faults and 0.55 s of system time per step with the defaults, a handful with the
setting in place from the process's start). glibc still faults some pages in on reuse (a
quarter of them in the test's loop of 32 MB temporaries), so the gain is partial.

:func:`kept_freed_memory` keeps freed blocks inside the process for the duration of a
``with`` block (``mallopt``: no ``mmap`` below 1 GB, no trimming) and afterwards restores
glibc's default thresholds and hands the kept memory back (``malloc_trim``). The process's
peak resident memory can grow by what fragmentation keeps. glibc has no way to read its
thresholds back, so "restored" means set to their initial 128 KB, which also leaves glibc's
own dynamic adjustment of the mmap threshold off for the rest of the process. Nothing happens
where the C library is not glibc, or when the user set ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` (their choice stands).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["kept_freed_memory", "GLIBC_KEEP_ENV"]

#: The kept-memory thresholds: no ``mmap`` for blocks below 1 GB, (practically) no trimming.
_KEEP_MMAP_THRESHOLD = 2**30
_KEEP_TRIM_THRESHOLD = 2**31 - 1

#: The same setting as environment variables, read by glibc when a process starts (the
#: performance harness gives it to every measured process alike).
GLIBC_KEEP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(_KEEP_MMAP_THRESHOLD),
                  "MALLOC_TRIM_THRESHOLD_": str(_KEEP_TRIM_THRESHOLD)}

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DEFAULT_THRESHOLD = 128 * 1024  # glibc's initial mmap and trim thresholds
_lock = threading.Lock()
_depth = 0
_libc: ctypes.CDLL | None | bool = False  # False: not looked up yet


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is False:
        lib = None
        try:
            name = ctypes.util.find_library("c")
            cand = ctypes.CDLL(name) if name else None
            if cand is not None and hasattr(cand, "mallopt") and hasattr(cand, "malloc_trim") \
                    and hasattr(cand, "gnu_get_libc_version"):
                lib = cand
        except OSError:
            lib = None
        _libc = lib
    return _libc or None


def _user_chose() -> bool:
    return any(k in os.environ for k in GLIBC_KEEP_ENV)


@contextmanager
def kept_freed_memory() -> Iterator[bool]:
    """Keep freed heap memory for reuse inside the block; restore glibc's defaults after.

    Yields whether the setting is active (``False`` off glibc or when the user chose the
    thresholds). Nested and concurrent blocks share one setting, undone by the last to leave.
    """
    global _depth
    lib = None if _user_chose() else _glibc()
    if lib is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            lib.mallopt(_M_MMAP_THRESHOLD, _KEEP_MMAP_THRESHOLD)
            lib.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                lib.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
                lib.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
                lib.malloc_trim(0)
