"""Command-line interface: the only place that parses argv and sets up logging, tqdm and matplotlib.

Option spellings are one vocabulary across commands (docs/cli.md): ``-j/--workers``, ``--overwrite``,
``--amp {auto,bf16,none}``, ``--input-size H W``, ``--out DIR`` (always a folder), ``--no-progress``... An old
spelling stays accepted for one release through :func:`deprecated_alias`, which warns and names the new one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "DeprecatedAlias",
    "deprecated_alias",
    "non_negative_int",
    "positive_int",
    "progress_bar",
    "show_progress",
    "warn_deprecated",
]


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer >= 1 (a count of exams, epochs, processes...); else a usage error (exit 2)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse ``type=``: an integer >= 0 (a seed); else a usage error (exit 2)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def warn_deprecated(prog: str, old: str, new: str) -> None:
    """The one deprecation warning of the command line (stderr, whatever the log level): ``old`` works for this
    release only; ``new`` replaces it."""
    print(
        f"warning: {prog}: {old} is deprecated and will be removed in the next release; use {new}",
        file=sys.stderr,
    )


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: hidden from ``--help``; stores like the new one after a warning on stderr.

    Attributes:
        new: the spelling that replaces it (shown in the warning, and in docs/cli.md's table).
        note: extra words for the warning (how old values map to new ones).
        value_map: old value -> new value, for options whose values were renamed too.
    """

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        *,
        new: str,
        note: str = "",
        value_map: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new
        self.note = note
        self.value_map = value_map

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        warn_deprecated(parser.prog, str(option_string), self.new + (f" ({self.note})" if self.note else ""))
        if self.nargs == 0:
            value = self.const
        elif self.value_map is not None:
            value = self.value_map[values]
        else:
            value = values
        setattr(namespace, self.dest, value)


def deprecated_alias(
    parser: argparse.ArgumentParser,
    old: str,
    new: str,
    *,
    note: str = "",
    value_map: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> None:
    """Keep ``old`` working for one release as a hidden, deprecated spelling of ``parser``'s option ``new``.

    The alias takes the values the new option takes and stores them in its ``dest``, after a warning that names
    ``new``. ``value_map`` translates old values (``--dtype fp32`` -> ``--amp none``); ``overrides`` (``dest``,
    ``type``, ``nargs``, ``default``...) describe an old option that does not take the new one's values (smoke's
    ``--height``, one half of ``--input-size``).

    Raises:
        KeyError: ``new`` is not an option of ``parser`` (a mistake in the command's definition).
    """
    target = parser._option_string_actions[new]
    spec: dict[str, Any] = {
        "dest": target.dest,
        "nargs": target.nargs,
        "const": target.const,
        "type": target.type,
        "choices": tuple(value_map) if value_map is not None else target.choices,
        "metavar": target.metavar,
        "default": argparse.SUPPRESS,  # the new option's default stands
    }
    spec.update(overrides)
    parser.add_argument(
        old, action=DeprecatedAlias, new=new, note=note, value_map=value_map, help=argparse.SUPPRESS, **spec
    )


def allocator_record(args: argparse.Namespace) -> dict[str, str]:
    """For a command's JSON output: the allocator profile ``main`` applied (``--allocator`` or the command's
    default) and the malloc this process really runs on (``"glibc"`` or ``"jemalloc"``, read from its maps)."""
    from mammogmic.runtime import allocator_in_use

    choice = getattr(args, "allocator_choice", None)
    return {"profile": choice.label if choice else "not set", "malloc": allocator_in_use()}


def show_progress(no_progress: bool = False) -> bool:
    """Whether to draw progress bars: not with ``--no-progress``, and only when stderr is a terminal (never
    into log files or pipes)."""
    return not no_progress and sys.stderr.isatty()


def progress_bar(total: int, *, no_progress: bool = False, **options: Any) -> Any:
    """A tqdm bar on stderr, drawn only when :func:`show_progress` says so (else a no-op with the same API)."""
    from tqdm import tqdm

    return tqdm(total=total, disable=not show_progress(no_progress) or total == 0, **options)
