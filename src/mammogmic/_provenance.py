"""The code version recorded with results: the package version, plus the git commit when run from a checkout."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from mammogmic import __version__

__all__ = ["code_version"]


@functools.cache
def code_version() -> str:
    """``0.1.0``, or ``0.1.0+git.1a2b3c4`` (``.dirty`` with uncommitted changes) when the package's source lies in
    a git work tree and ``git`` is there to ask; an installed wheel gives the plain version."""
    source = Path(__file__).resolve().parent
    try:
        inside = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if inside.returncode != 0 or not inside.stdout.strip():
            return __version__
        status = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return __version__
    dirty = ".dirty" if status.returncode == 0 and status.stdout.strip() else ""
    return f"{__version__}+git.{inside.stdout.strip()}{dirty}"
