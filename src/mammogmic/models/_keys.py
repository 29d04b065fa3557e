"""State-dict key renaming shared by the official GMIC and DMV-CNN key maps."""

from __future__ import annotations

import re

__all__ = ["rename_key"]


def rename_key(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    """``key`` rewritten by the first regex rule ``(pattern, replacement)`` that matches it; ``None`` if none does."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None
