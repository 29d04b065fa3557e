"""``mammogmic`` console script: one subcommand per module in :mod:`mammogmic.cli`.

Each command module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and sets
``func=run`` on the parser, where ``run(args) -> int`` returns the process exit code.
Building the parser imports the command modules, so they import only the standard library at module level
and ``add_parser`` too: torch, numpy, pandas and the rest are imported inside each ``run``. That keeps
``mammogmic --help`` and ``--version`` well under half a second (``benchmarks/bench_cli.py``;
``tests/cli/test_cli_startup.py`` checks that parsing imports none of them).

Exit codes: each ``run`` returns its own (0 success, 2 bad input); a missing optional extra
(:class:`mammogmic.errors.MissingExtraError`) is exit 2 with the ``pip install`` line that fixes it.
Logging: WARNING by default, ``-v`` INFO, ``-vv`` DEBUG (before or after the command's name). Option names are
one vocabulary across commands (:mod:`mammogmic.cli`, docs/cli.md).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from mammogmic import __version__
from mammogmic.errors import MissingExtraError
from mammogmic.runtime import (
    ALLOCATOR_PROFILES,
    AllocatorChoice,
    default_allocator,
    ensure_jemalloc,
    jemalloc_available,
    tune_allocator,
)

_VERBOSE_HELP = "more log output: -v info, -vv debug (default: warnings and errors only)"

# Order is the order shown by ``mammogmic --help``.
COMMAND_MODULES: tuple[str, ...] = (
    "mammogmic.cli.train_cmds",
    "mammogmic.cli.synth_cmd",
    "mammogmic.cli.data_cmds",
    "mammogmic.cli.eval_cmds",
    "mammogmic.cli.model_cmds",
    "mammogmic.cli.dmv_cmds",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mammogmic",
        description="GMIC for screening mammography: data preparation, training, prediction, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"mammogmic {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help=_VERBOSE_HELP)
    parser.add_argument(
        "--allocator",
        choices=ALLOCATOR_PROFILES,
        default=None,
        help="memory profile: jemalloc (the default of float32 inference where the system's jemalloc is "
        "installed, apt-get install libjemalloc2: the command restarts itself on it; measured: full-size "
        "float32 passes about 20%% quicker than lean for ~25 MiB more), lean (less resident memory; float32 "
        "inference without jemalloc) or fast (measured 10-50%% quicker full-size passes for ~30-300 MiB more; "
        "the default of training and of bf16 inference on the CPU). See mammogmic.runtime",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    for command in sub.choices.values():  # -v also after the command's name: mammogmic predict ... -v
        command.add_argument(
            "-v", "--verbose", dest="verbose_after", action="count", default=0, help=_VERBOSE_HELP
        )
    return parser


def log_level(verbosity: int) -> int:
    """WARNING by default (warnings and errors only: a command's own summary is printed once, on stdout);
    INFO with ``-v``, DEBUG with ``-vv``."""
    return logging.WARNING - 10 * min(verbosity, 2)


def allocator_choice(args: argparse.Namespace, restartable: bool = False) -> AllocatorChoice:
    """The allocator a parsed command line runs on: ``--allocator`` as given (huge pages on), else the
    command's default (:func:`mammogmic.runtime.default_allocator`; jemalloc only where the command can
    restart itself on it: ``restartable``)."""
    if args.allocator:
        return AllocatorChoice(args.allocator)
    return default_allocator(
        getattr(args, "allocator_profile", "lean"),
        getattr(args, "amp", None),
        jemalloc=lambda: restartable and jemalloc_available(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = ["mammogmic", *(sys.argv[1:] if argv is None else argv)]  # provenance (run.json)
    choice = allocator_choice(args, restartable=argv is None)
    if choice.profile == "jemalloc" and (problem := ensure_jemalloc(restart=argv is None)):
        if args.allocator:  # asked for: say why it cannot be had
            print(f"error: --allocator jemalloc: {problem}", file=sys.stderr)
            return 2
        # Chosen by default: the command runs on glibc, as where jemalloc is not installed.
        print(f"warning: jemalloc: {problem}; running on lean instead", file=sys.stderr)
        choice = AllocatorChoice("lean")
    tune_allocator(choice.profile, huge_pages=choice.huge_pages)
    args.allocator_choice = choice  # the model loaders apply keep_heap; run.json records the label
    level = log_level(args.verbose + getattr(args, "verbose_after", 0))
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MissingExtraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
