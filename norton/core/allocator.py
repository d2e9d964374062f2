"""The C library's allocator, set up for training: freed memory is kept for the next step.

A training step allocates and frees the same large buffers every step —
activations, their gradients, recomposed CPDBlock kernels.  glibc's malloc,
left at its defaults, serves every buffer above a threshold (dynamic, at most
32 MiB) by a fresh ``mmap`` and gives the top of its heap back to the system
whenever enough of it is free, so each step touches hundreds of MB of fresh
pages: 76–94 k page faults per VGG-16-BN step at batch 128 on a 2-core CPU,
and the step takes 6–7 % longer than with the memory kept
(``benchmarks/allocator.py`` times both settings).  ``tune_allocator`` raises
the mmap threshold and trims the heap only past 2 GiB free, so a step reuses
the memory of the one before.  The price is memory the process keeps
after its peak until it exits, which a training process needs again anyway
(ResNet-50 at batch 16, 224×224: 6–7 % more peak memory, 11–12 % faster steps).

``norton``'s training (``fit``, ``train_detector``) and its command line call
it; a training loop of one's own can call ``norton.tune_allocator()`` once.
``NORTON_ALLOCATOR=default`` keeps the C library's settings.
"""
from __future__ import annotations

import ctypes
import os
import sys
import warnings

from norton.errors import NortonError

#: the environment variable choosing the setting, and the values it accepts
ENV = "NORTON_ALLOCATOR"
CHOICES = ("tuned", "default")
#: mallopt parameters (glibc's malloc.h) and the values tune_allocator sets (mallopt takes a C int)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = (
    ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, 256 << 20),  # buffers up to 256 MiB come from the heap
    ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, (1 << 31) - 1),  # the heap's top goes back only past 2 GiB free
    ("M_TOP_PAD", M_TOP_PAD, 256 << 20),  # grows by 256 MiB at a time and keeps that much when it trims
)


def allocator_choice() -> str:
    """``NORTON_ALLOCATOR`` (``tuned`` when unset), checked."""
    choice = os.environ.get(ENV, "tuned")
    if choice not in CHOICES:
        raise NortonError(f"{ENV} must be one of {CHOICES}, got {choice!r}")
    return choice


def glibc() -> ctypes.CDLL | None:
    """The running process's C library when it is glibc (it has ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # e.g. musl: no mallopt tunables of this kind
    return libc


def tune_allocator() -> bool:
    """Set glibc's malloc up for training (see the module's text); safe to call again.

    Returns True when the settings are in place; False when ``NORTON_ALLOCATOR=default``
    asks to leave the C library as it is, or the C library is not glibc (nothing
    changed: other allocators have no such settings).  A setting glibc refuses is
    reported in a warning and the others stay."""
    if allocator_choice() == "default":
        return False
    libc = glibc()
    if libc is None:
        return False
    refused = [name for name, param, value in SETTINGS if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1]
    if refused:
        warnings.warn(f"the C library refused the allocator settings {refused}; training steps may touch fresh "
                      "memory every step", RuntimeWarning, stacklevel=2)
    return len(refused) < len(SETTINGS)
