"""Keep freed memory in the process while a CPU model trains: no page-fault storm per step (glibc only).

glibc's ``malloc`` serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB at start) with
a fresh ``mmap`` and returns them to the system on ``free``, and trims the heap
top above ``M_TRIM_THRESHOLD``. A training step frees and re-allocates the same
activations and gradients every step, so each step pays the kernel to map and
zero those pages again: measured on this repository's benchmark model M (batch
64, 1 thread), ~320 minor page faults per step in fp32, more with bf16 autocast,
whose casts make more short-lived buffers. ``train()`` of a model on the CPU
therefore raises both thresholds for the duration of the run (32 MiB, glibc's
upper limit for mmap on 64-bit; 1 GiB of heap top kept), which brings the faults
to 0, and sets them back when it returns (to glibc's initial 128 KiB: glibc
cannot report the previous values, and once set they no longer adapt, as they
would not after ``MALLOC_MMAP_THRESHOLD_`` either), then hands the kept memory
back with ``malloc_trim(0)``.

These settings are process-wide. Nothing is changed when the process is not on
glibc, when the user already set ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` (theirs stand), or when
``TORCHSLIM_KEEP_FREED_MEMORY=0`` is in the environment (the opt-out).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import threading
from collections.abc import Iterator
from typing import Any

OPT_OUT = "TORCHSLIM_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
KEEP_MMAP_BELOW = 32 * 2**20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)
KEEP_HEAP_TOP = 2**30
GLIBC_INITIAL = 128 * 2**10  # DEFAULT_MMAP_THRESHOLD_MIN and DEFAULT_TRIM_THRESHOLD

_lock = threading.Lock()  # process-wide settings need a process-wide count of the runs that asked for them
_users = 0


def _glibc() -> Any:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def should_keep() -> bool:
    """Whether :func:`keep_freed_memory` will change anything in this process."""
    if os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    return _glibc() is not None


@contextlib.contextmanager
def keep_freed_memory(active: bool = True) -> Iterator[bool]:
    """Within the block, freed memory stays in the process (see the module docstring); yields whether it does."""
    global _users
    libc = _glibc() if active and should_keep() else None
    if libc is None:
        yield False
        return
    with _lock:
        _users += 1
        if _users == 1:
            libc.mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_BELOW)
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_HEAP_TOP)
    try:
        yield True
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                libc.mallopt(M_MMAP_THRESHOLD, GLIBC_INITIAL)
                libc.mallopt(M_TRIM_THRESHOLD, GLIBC_INITIAL)
                libc.malloc_trim(0)
