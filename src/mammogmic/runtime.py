"""Process-level settings the command-line tools apply (never on library import): memory, and the precision of
``--amp auto`` (:func:`resolve_amp`).

Two things decide how fast and how big a full-size GMIC run is on the CPU, both outside the model:

* **Huge pages.** PyTorch backs tensors of 2 MiB and more with transparent huge pages when the environment
  variable ``THP_MEM_ALLOC_ENABLE=1`` is set before its first allocation. Fresh activations then cost one page
  fault per 2 MiB instead of per 4 KiB (measured: fp32 inference at 2944x1920 about 20% faster, training
  about 10%, same peak memory). :func:`tune_allocator` sets it unless the user set it.
* **glibc's mmap threshold.** glibc raises it each time a large block is freed (up to 32 MiB), so after the
  first forward pass the tens-of-megabyte activations are carved out of the heap, which fragments: resident
  memory ends ~120-160 MiB above what is live. Profile ``"lean"`` fixes the threshold at 1 MiB, so big
  activations live in their own mappings and go back to the OS when freed, at the price of faulting them in
  again on every pass. Profile ``"fast"`` leaves glibc alone.

``benchmarks/README.md`` has the measured trade-off (inference: ``lean`` meets the 450 MiB target, ``fast`` is
about 25% quicker at ~580 MiB). The CLI uses ``lean`` for float32 inference, ``fast`` for training, and ``fast``
on 4 KiB pages for bf16 inference on the CPU (bf16 activations are half the size, so ``fast`` stays at
float32's ``lean`` footprint, and huge pages there only made run-to-run times vary: :func:`default_allocator`);
the global ``--allocator`` option overrides it (with huge pages).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOCATOR_PROFILES",
    "AMP_MODES",
    "SCORING_AMP",
    "cpu_has_fast_bf16",
    "default_allocator",
    "resolve_amp",
    "tune_allocator",
]

_M_MMAP_THRESHOLD = -3  # from <malloc.h>
ALLOCATOR_PROFILES = ("lean", "fast")
AMP_MODES = ("auto", "bf16", "none")  # every command's --amp
# The precision a model is scored in unless the user asks otherwise: ``mammogmic predict``'s default, and the
# trainer's and the demo's for validation and test whatever they train in, so that the figures a run reports
# are the ones ``predict`` gives its model (bf16 rounding can move a patch pick on a flat saliency map).
SCORING_AMP: Final = "none"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: str) -> str:
    """The autocast of ``--amp`` on ``device``: ``"bf16"`` or ``"none"`` (float32).

    ``auto`` is bf16 where the device computes it natively (a CUDA GPU with bf16 support, a CPU with
    AVX512-BF16/AMX) and float32 elsewhere; ``bf16`` and ``none`` are taken as given.

    Raises:
        ValueError: ``amp`` is not one of :data:`AMP_MODES`.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp != "auto":
        return amp
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "none"
    return "bf16" if device == "cpu" and cpu_has_fast_bf16() else "none"


def tune_allocator(profile: str = "lean", mmap_threshold: int = 1 << 20, huge_pages: bool = True) -> bool:
    """Apply an allocator profile to this process (Linux only; elsewhere nothing happens).

    Call it before the first tensor is allocated: PyTorch reads ``THP_MEM_ALLOC_ENABLE`` once.

    Args:
        profile: ``"lean"`` (huge pages + mmap threshold fixed at ``mmap_threshold``) or ``"fast"`` (huge
            pages only).
        mmap_threshold: bytes; allocations at least this large get their own mapping (``lean`` only).
        huge_pages: ask PyTorch for transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``); False asks it not to.
            A value the user set in the environment wins either way.

    Returns:
        Whether the mmap threshold was fixed (always False for ``fast``).
    """
    if profile not in ALLOCATOR_PROFILES:
        raise ValueError(f"allocator profile must be one of {ALLOCATOR_PROFILES}, got {profile!r}")
    if not sys.platform.startswith("linux"):
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1" if huge_pages else "0")
    if profile == "fast":
        return False
    # Imported here: ctypes.util pulls in subprocess and friends, ~40 ms of every `mammogmic --help`.
    import ctypes
    import ctypes.util

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


def default_allocator(command_default: str, amp: str | None) -> tuple[str, bool]:
    """The allocator profile, and whether to use huge pages, for a command run without ``--allocator``: the
    command's own profile with huge pages, except that an inference command whose ``--amp`` gives bf16 on the
    CPU runs ``fast`` on 4 KiB pages.

    Measured at 2944x1920 on a 2-vCPU Zen 5 (``python benchmarks/bench_bf16.py``, three runs): bf16 ``fast``
    without huge pages 0.098-0.102 s per image at 416 MiB peak, with them 0.094-0.109 s at 441-458 MiB (huge
    pages vary from run to run), ``lean`` 0.142-0.143 s at 415 MiB; float32 ``lean`` 0.25-0.26 s at 418 MiB.
    """
    if amp is not None and amp in AMP_MODES and resolve_amp(amp, "cpu") == "bf16":
        return "fast", False
    return command_default, True
