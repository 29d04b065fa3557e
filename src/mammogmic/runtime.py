"""Process-level runtime settings, applied by the command-line tools (never on library import).

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB). After the first
forward pass, the tens-of-megabyte activations of a full-size mammogram are then carved out of the heap,
which fragments and keeps the process's resident memory ~80-100 MiB above what is live. Fixing the
threshold at 1 MiB keeps big activations in their own mappings, returned to the OS when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # from <malloc.h>


def tune_allocator(mmap_threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold (Linux only). Returns whether the setting was applied."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
    except (OSError, AttributeError):
        return False
    logger.debug("mallopt(M_MMAP_THRESHOLD, %d) -> %s", mmap_threshold, ok)
    return ok
