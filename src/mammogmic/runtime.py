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
float32's ``lean`` footprint, and huge pages there only made run-to-run times vary: :func:`default_allocator`),
which also keeps its heap once the models are loaded (:func:`keep_freed_heap`: no page is faulted in twice;
0.32-0.33x the official stand-in instead of 0.36-0.38x on a 2-vCPU Zen 4, at 433-452 MiB); the global
``--allocator`` option overrides it (with huge pages, heap as glibc manages it).

A third profile, ``"jemalloc"``, swaps glibc's allocator for jemalloc (a system library, not a Python package:
Debian/Ubuntu ``libjemalloc2``). It must be in place before the process allocates anything, so the command
starts itself again with it preloaded (:func:`ensure_jemalloc`), with ``MALLOC_CONF`` set to
:data:`JEMALLOC_CONF` unless the user set it. jemalloc reuses freed activations without glibc's fragmentation:
float32 inference at 2944x1920 ran at 0.59-0.60x the official stand-in's time at 439-442 MiB peak, where
``lean`` ran at 0.73-0.78x at 418 MiB (batch 1); ``predict`` on 24 full-size images took 4% less time (medians
of nine runs, within the VM's spread; ``benchmarks/README.md``, 2-vCPU Zen 5). Float32 inference commands (``predict``, ``visualize``,
``heatmaps``) therefore run on it by default where it is installed and the command can restart itself;
elsewhere they run ``lean`` (:func:`default_allocator`). bf16 stays on glibc's ``fast``: under jemalloc its
passes at ``predict``'s batch of 4 were slower.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final, NamedTuple

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOCATOR_PROFILES",
    "AllocatorChoice",
    "JEMALLOC_CONF",
    "AMP_MODES",
    "SCORING_AMP",
    "allocator_in_use",
    "cpu_has_fast_bf16",
    "default_allocator",
    "ensure_jemalloc",
    "jemalloc_available",
    "jemalloc_library",
    "keep_freed_heap",
    "resolve_amp",
    "tune_allocator",
]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
ALLOCATOR_PROFILES = ("lean", "fast", "jemalloc")
# Set on the process that ensure_jemalloc starts: the LD_PRELOAD the user had (restored for children), and
# whether MALLOC_CONF was ours (then removed for children).
_PRELOAD_MARK: Final = "MAMMOGMIC_PRELOAD_BEFORE"
_CONF_MARK: Final = "MAMMOGMIC_MALLOC_CONF_SET"
# jemalloc's settings for the restarted process (unless the user set MALLOC_CONF): no separate arena for
# blocks of 8 MiB and more, so the activations of a full-size pass are reused from the arenas' freed extents
# like smaller blocks. Float32 inference at 2944x1920 on Zen 5: 442 MiB peak instead of 460, within a few
# percent of the time (benchmarks/README.md, "jemalloc by default").
JEMALLOC_CONF: Final = "oversize_threshold:0"
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
        profile: ``"lean"`` (huge pages + mmap threshold fixed at ``mmap_threshold``), ``"fast"`` (huge
            pages only) or ``"jemalloc"`` (huge pages; the process must already run on jemalloc:
            :func:`ensure_jemalloc`).
        mmap_threshold: bytes; allocations at least this large get their own mapping (``lean`` only).
        huge_pages: ask PyTorch for transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``); False asks it not to.
            A value the user set in the environment wins either way.

    Returns:
        Whether the mmap threshold was fixed (always False for ``fast`` and ``jemalloc``).
    """
    if profile not in ALLOCATOR_PROFILES:
        raise ValueError(f"allocator profile must be one of {ALLOCATOR_PROFILES}, got {profile!r}")
    if not sys.platform.startswith("linux"):
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1" if huge_pages else "0")
    if profile != "lean":
        return False
    return _mallopt({_M_MMAP_THRESHOLD: mmap_threshold})


def _mallopt(settings: dict[int, int]) -> bool:
    """glibc's ``mallopt`` for each (parameter, value); False where there is no glibc or one call failed."""
    if not sys.platform.startswith("linux"):
        return False
    # Imported here: ctypes.util pulls in subprocess and friends, ~40 ms of every `mammogmic --help`.
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = all([bool(libc.mallopt(param, int(value))) for param, value in settings.items()])
    except (OSError, AttributeError):
        return False
    logger.debug("mallopt(%s) -> %s", settings, ok)
    return ok


def keep_freed_heap(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc keep the heap it frees (no ``madvise``/``brk`` shrinking below ``trim_threshold``), and carve
    blocks below ``mmap_threshold`` out of it, so that a loop of equal passes faults no page in twice.

    Call it once the model is built and prepared: set before, the heap keeps the build's freed blocks too
    (measured on Zen 4: 473-495 MiB peak instead of ~420). Returns whether both settings took.
    """
    return _mallopt({_M_MMAP_THRESHOLD: mmap_threshold, _M_TRIM_THRESHOLD: trim_threshold})


def jemalloc_library() -> str | None:
    """The jemalloc library to preload: ``$MAMMOGMIC_JEMALLOC`` when set, else the system's as the dynamic
    loader knows it (``libjemalloc.so.2`` from Debian/Ubuntu's ``libjemalloc2``), else None."""
    chosen = os.environ.get("MAMMOGMIC_JEMALLOC")
    if chosen:
        return chosen
    import ctypes.util

    return ctypes.util.find_library("jemalloc")


def jemalloc_available() -> bool:
    """Whether :func:`ensure_jemalloc` can restart a command on jemalloc: Linux, and a library found (a path in
    ``$MAMMOGMIC_JEMALLOC`` must exist)."""
    if not sys.platform.startswith("linux"):
        return False
    library = jemalloc_library()
    return library is not None and (os.sep not in library or Path(library).is_file())


def allocator_in_use() -> str:
    """``"jemalloc"`` when this process runs on jemalloc (a ``libjemalloc`` mapping in ``/proc/self/maps``, or the
    library ``$MAMMOGMIC_JEMALLOC`` names), else ``"glibc"`` (also off Linux, where nothing is checked)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    chosen = os.environ.get("MAMMOGMIC_JEMALLOC")
    names = ["/libjemalloc"] + ([os.path.realpath(chosen)] if chosen else [])
    return "jemalloc" if any(name in maps for name in names) else "glibc"


def ensure_jemalloc(restart: bool = True) -> str:
    """Make this process run on jemalloc: nothing to do when it already does, else (``restart``) replace it by
    the same command started again with jemalloc preloaded (``os.execve``: the same process id, arguments and
    environment, plus ``LD_PRELOAD``, and ``MALLOC_CONF`` = :data:`JEMALLOC_CONF` unless the user set one).
    Call it before torch is imported.

    Returns ``""`` when jemalloc is in use, else the reason it is not, for the user: not Linux, no jemalloc
    found, ``restart`` False (a library call cannot swap the allocator of a running interpreter), or, in the
    restarted process, the dynamic loader did not load it. The restarted process gets the user's own
    ``LD_PRELOAD`` (and ``MALLOC_CONF``) back, so that programs it starts see what the user gave.
    """
    before = os.environ.pop(_PRELOAD_MARK, None)
    if before is not None:  # the restarted process
        if before:
            os.environ["LD_PRELOAD"] = before
        else:
            os.environ.pop("LD_PRELOAD", None)
        if os.environ.pop(_CONF_MARK, None) is not None:  # jemalloc has read it by now
            os.environ.pop("MALLOC_CONF", None)
    if allocator_in_use() == "jemalloc":
        return ""
    library = jemalloc_library()
    if before is not None:
        return (
            f"the dynamic loader did not load {library} (its message is above); "
            "set MAMMOGMIC_JEMALLOC to jemalloc's .so, or use --allocator lean or fast"
        )
    if not sys.platform.startswith("linux"):
        return "preloading jemalloc is supported on Linux only"
    if library is None:
        return (
            "jemalloc is not installed (Debian/Ubuntu: apt-get install libjemalloc2; "
            "or set MAMMOGMIC_JEMALLOC to its .so), or use --allocator lean or fast"
        )
    if os.sep in library and not Path(library).is_file():
        return f"MAMMOGMIC_JEMALLOC={library}: no such file"
    if not restart:
        return (
            "jemalloc must be loaded when the process starts: run the mammogmic "
            f"command, or start Python with LD_PRELOAD={library}"
        )
    user = os.environ.get("LD_PRELOAD", "")
    env = {**os.environ, _PRELOAD_MARK: user, "LD_PRELOAD": f"{library} {user}".strip()}
    if "MALLOC_CONF" not in env:
        env.update({"MALLOC_CONF": JEMALLOC_CONF, _CONF_MARK: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    raise AssertionError("unreachable")  # pragma: no cover


class AllocatorChoice(NamedTuple):
    """What ``main`` applies to a command's process: a profile (:data:`ALLOCATOR_PROFILES`), whether PyTorch
    may back tensors with huge pages, and whether the heap is kept once the models are loaded
    (:func:`keep_freed_heap`)."""

    profile: str
    huge_pages: bool = True
    keep_heap: bool = False

    @property
    def label(self) -> str:
        """The choice in words, as ``run.json`` records it: ``"lean"``, ``"fast, 4 KiB pages, heap kept"``..."""
        return ", ".join(
            [self.profile]
            + ([] if self.huge_pages else ["4 KiB pages"])
            + (["heap kept"] if self.keep_heap else [])
        )


def default_allocator(
    command_default: str, amp: str | None, jemalloc: Callable[[], bool] = lambda: False
) -> AllocatorChoice:
    """The allocator choice of a command run without ``--allocator``: the command's own profile with huge
    pages, except that a command whose ``--amp`` gives bf16 on the CPU runs ``fast`` on 4 KiB pages and keeps its
    heap once the models are loaded, and a float32 inference command (a ``lean`` one with ``--amp``) runs
    ``jemalloc`` when ``jemalloc()`` says it can be had (asked only then: :func:`jemalloc_available` for a
    command that can restart itself).

    Measured at 2944x1920 on a 2-vCPU Zen 5 (``python benchmarks/bench_bf16.py --jemalloc``, three runs,
    2026-12-03), against the official stand-in's float32 time and peak RSS at batch 1: float32 ``jemalloc``
    0.59-0.60x at 439-442 MiB, ``lean`` 0.73-0.78x at 418 MiB. bf16 ``jemalloc`` was as quick at batch 1
    (0.27-0.33x against 0.28-0.38x) but its full-size passes at ``predict``'s batch of 4 took 15-40% longer
    than ``fast`` with the heap kept, so bf16 stays on glibc. See ``benchmarks/README.md``.
    """
    if amp is not None and amp in AMP_MODES:
        if resolve_amp(amp, "cpu") == "bf16":
            return AllocatorChoice("fast", huge_pages=False, keep_heap=True)
        if command_default == "lean" and jemalloc():
            return AllocatorChoice("jemalloc")
    return AllocatorChoice(command_default)
