"""One option vocabulary across commands (docs/cli.md): the new names parse, old ones still work and warn,
no two commands spell one concept differently, bad arguments exit 2 before an output folder exists, and the
default log level is WARNING."""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mammogmic.cli import DeprecatedAlias, show_progress
from mammogmic.cli.main import build_parser, log_level, main
from mammogmic.runtime import AMP_MODES

SRC = Path(__file__).resolve().parents[2] / "src"
DOCS_CLI = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


COMMANDS = _commands()


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options ``--help`` lists (deprecated aliases are hidden)."""
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]


def _aliases() -> list[tuple[str, DeprecatedAlias]]:
    return [(name, a) for name, p in COMMANDS.items() for a in p._actions if isinstance(a, DeprecatedAlias)]


# -- the new names --------------------------------------------------------------------------------------------
# argv per command using every renamed option; the namespace values each must give.
NEW_NAMES: dict[str, tuple[list[str], dict[str, Any]]] = {
    "prepare": (["vindr", "src", "--out", "o", "--overwrite"], {"out": Path("o"), "overwrite": True}),
    "preprocess": (
        ["m.csv", "--out", "o", "-j", "3", "--crop-iterations", "5", "--window-size", "64", "48"],
        {"workers": 3, "crop_iterations": 5, "window_size": [64, 48]},
    ),
    "synth": (
        ["--out", "o", "--workers", "2", "--image-size", "96", "64", "--overwrite", "--no-progress"],
        {"workers": 2, "image_size": [96, 64], "overwrite": True, "no_progress": True},
    ),
    "demo": (["--out", "o", "-j", "2", "--amp", "bf16"], {"workers": 2, "amp": "bf16"}),
    "train": (["tiny_cpu", "--out", "o", "--overwrite"], {"overwrite": True}),
    "predict": (
        [
            "x",
            "--model",
            "m",
            "--out",
            "o",
            "--amp",
            "auto",
            "-j",
            "0",
            "--overwrite",
            "--input-size",
            "64",
            "48",
        ],
        {"amp": "auto", "workers": 0, "overwrite": True, "input_size": [64, 48]},
    ),
    "visualize": (
        ["x", "--model", "m", "--out", "o", "--amp", "none", "--workers", "1", "--window-size", "64", "48"],
        {"amp": "none", "workers": 1, "window_size": [64, 48]},
    ),
    "heatmaps": (["x", "--model", "m", "--out", "o", "--amp", "auto"], {"amp": "auto"}),
    "smoke": (["--model", "m.p", "--input-size", "64", "48"], {"model": Path("m.p"), "input_size": [64, 48]}),
}


@pytest.mark.parametrize("command", sorted(NEW_NAMES))
def test_each_command_accepts_the_new_names(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv, expected = NEW_NAMES[command]
    args = build_parser().parse_args([command, *argv, "-v"])
    for dest, value in expected.items():
        assert getattr(args, dest) == value, dest
    assert args.verbose_after == 1  # -v after the command's name
    assert capsys.readouterr().err == ""  # no deprecation warning for the new names


# -- the old names --------------------------------------------------------------------------------------------
REQUIRED = {  # the least each command needs to parse
    "prepare": ["vindr", "src", "--out", "o"],
    "preprocess": ["m.csv", "--out", "o"],
    "synth": ["--out", "o"],
    "predict": ["x", "--model", "m", "--out", "o"],
    "visualize": ["x", "--model", "m", "--out", "o"],
    "smoke": [],
}
# Every alias there is, with its old value and what it must store: a new alias without a row here fails.
ALIASES = {
    ("prepare", "--force"): ([], True),
    ("preprocess", "--jobs"): (["3"], 3),
    ("preprocess", "--iterations"): (["5"], 5),
    ("preprocess", "--window"): (["64", "48"], [64, 48]),
    ("synth", "--size"): (["96", "64"], [96, 64]),
    ("predict", "--dtype"): (["fp32"], "none"),
    ("predict", "--overwrite-predictions"): ([], True),
    ("visualize", "--dtype"): (["bf16"], "bf16"),
    ("smoke", "--weights"): (["m.p"], Path("m.p")),
    ("smoke", "--height"): (["64"], 64),
    ("smoke", "--width"): (["48"], 48),
}


def test_every_deprecated_alias_is_tested_and_documented() -> None:
    found = {(name, alias.option_strings[0]) for name, alias in _aliases()}
    assert found == set(ALIASES)
    table = DOCS_CLI.read_text(encoding="utf-8")
    for name, alias in _aliases():
        old = alias.option_strings[0]
        row = re.search(rf"^\| `{name}` \| `{re.escape(old)}[ `].*$", table, re.MULTILINE)
        assert row is not None, f"docs/cli.md has no row for {name} {old}"
        assert f"`{alias.new}" in row.group(0), f"docs/cli.md: {name} {old} does not name {alias.new}"


@pytest.mark.parametrize("command, old", sorted(ALIASES), ids=lambda v: str(v))
def test_deprecated_alias_still_works_and_warns(
    command: str, old: str, capsys: pytest.CaptureFixture[str]
) -> None:
    value, stored = ALIASES[command, old]
    alias = next(a for name, a in _aliases() if name == command and old in a.option_strings)
    args = build_parser().parse_args([command, *REQUIRED[command], old, *value])
    assert getattr(args, alias.dest) == stored
    err = capsys.readouterr().err
    assert f"{old} is deprecated" in err and f"use {alias.new}" in err and command in err
    assert not re.search(rf"{re.escape(old)}(?![\w-])", COMMANDS[command].format_help())  # hidden from --help
    if alias.dest == COMMANDS[command]._option_string_actions[alias.new].dest:
        new_value = [] if alias.nargs == 0 else [str(stored)] if isinstance(stored, str) else value
        assert vars(build_parser().parse_args([command, *REQUIRED[command], alias.new, *new_value])) == vars(
            args
        )


def test_prepare_manifest_file_form_is_deprecated_but_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "rsna"
    (source / "train_images" / "1").mkdir(parents=True)
    (source / "train_images" / "1" / "10.dcm").write_bytes(b"")  # prepare lists files; it does not read them
    (source / "train.csv").write_text(
        "site_id,patient_id,image_id,laterality,view,age,cancer\n1,1,10,L,CC,50,0\n1,1,11,L,AT,50,0\n"
    )
    out = tmp_path / "lists" / "rsna.csv"
    assert main(["prepare", "rsna", str(source), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "(a manifest file) is deprecated" in err and "DIR/manifest.csv" in err
    assert out.is_file() and (tmp_path / "lists" / "rsna.skipped.csv").is_file()
    assert main(["prepare", "rsna", str(source), "--out", str(out)]) == 2  # not replaced without --overwrite
    assert main(["prepare", "rsna", str(source), "--out", str(out), "--force"]) == 0
    assert "use --overwrite" in capsys.readouterr().err
    folder = tmp_path / "new"
    assert main(["prepare", "rsna", str(source), "--out", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.csv", "skipped.csv"]
    assert "deprecated" not in capsys.readouterr().err


# -- one spelling per concept ---------------------------------------------------------------------------------
# concept -> (its spelling, spellings of the same concept that no command may use)
CONCEPTS: dict[str, tuple[str, frozenset[str]]] = {
    "parallel processes": (
        "--workers",
        frozenset({"--jobs", "--processes", "--num-workers", "--n-jobs", "--nproc"}),
    ),
    "replace earlier outputs": (
        "--overwrite",
        frozenset({"--overwrite-predictions", "--replace", "--clobber", "--redo", "--overwrite-outputs"}),
    ),
    "autocast precision": ("--amp", frozenset({"--dtype", "--precision", "--bf16", "--fp16", "--half"})),
    "model input size": (
        "--input-size",
        frozenset({"--size", "--height", "--width", "--input-shape", "--shape", "--resolution"}),
    ),
    "model window": ("--window-size", frozenset({"--window", "--window-shape"})),
    "breast-crop iterations": ("--crop-iterations", frozenset({"--iterations", "--erosion-iterations"})),
    "model file": ("--model", frozenset({"--weights", "--checkpoint", "--ckpt", "--models"})),
    "output folder": ("--out", frozenset({"--output", "--output-dir", "--out-dir", "--outdir", "-o"})),
    "no progress bar": ("--no-progress", frozenset({"--quiet", "-q", "--no-bar", "--progress"})),
    "verbosity": ("--verbose", frozenset({"--log-level", "--debug", "--loglevel"})),
    "seed": ("--seed", frozenset({"--random-seed", "--rng-seed"})),
    "device": ("--device", frozenset({"--gpu", "--cuda", "--cpu"})),
    "batch size": ("--batch-size", frozenset({"--batch", "--bs"})),
}
BATCH_COMMANDS = {  # commands that draw progress bars
    "preprocess", "synth", "predict", "visualize", "heatmaps", "train", "tune", "demo", "ablate",
}  # fmt: skip


def test_no_two_commands_spell_one_concept_differently() -> None:
    problems = []
    spelling_of_dest: dict[str, dict[str, set[str]]] = {}
    for name, parser in COMMANDS.items():
        for action in _visible(parser):
            for option in action.option_strings:
                for concept, (spelling, others) in CONCEPTS.items():
                    if option in others:
                        problems.append(f"{name} {option}: the {concept} option is spelled {spelling}")
            long = max(action.option_strings, key=len)
            spelling_of_dest.setdefault(action.dest, {}).setdefault(long, set()).add(name)
    for dest, spellings in spelling_of_dest.items():  # one setting, one name (e.g. dest 'workers')
        if len(spellings) > 1:
            problems.append(f"{dest} is spelled {sorted(spellings)} in {spellings}")
    assert problems == []


def test_shared_options_mean_the_same_everywhere() -> None:
    seen: set[str] = set()
    for name, parser in COMMANDS.items():
        options = {o: a for a in _visible(parser) for o in a.option_strings}
        seen |= set(options)
        assert "--verbose" in options and "-v" in options, name
        if "--workers" in options or "-j" in options:
            assert options.get("-j") is options.get("--workers"), f"{name}: -j and --workers are one option"
        if "--amp" in options:
            assert tuple(options["--amp"].choices or ()) == AMP_MODES, name
        for size in ("--input-size", "--window-size", "--image-size"):
            if size in options:
                assert options[size].nargs == 2 and options[size].metavar == ("H", "W"), (name, size)
        if "--out" in options:
            assert options["--out"].type is Path and "folder" in str(options["--out"].help), name
        if "--force" in options:  # not an overwrite: writes beside files we did not write
            assert "never overwriting" in str(options["--force"].help), name
        if name in BATCH_COMMANDS:
            assert "--no-progress" in options, name
    assert {"--workers", "--overwrite", "--amp", "--input-size", "--out"} <= seen


def test_top_level_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--version" in text and "-v, --verbose" in text


# -- bad arguments: exit 2, no output folder ------------------------------------------------------------------
def _bad_argument_cases(tmp_path: Path) -> dict[str, list[str]]:
    missing = str(tmp_path / "no_such_scans")
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not read: the input path is refused first")
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "0_L-CC.png").write_bytes(b"not read either")
    out = str(tmp_path / "out" / "sub")
    manifest = f"data.manifest={tmp_path / 'no_such.csv'}"
    return {
        "predict misspelled input": ["predict", missing, "--model", str(model), "--out", out],
        "predict missing model": ["predict", str(scans), "--model", str(tmp_path / "nope.p"), "--out", out],
        "predict unreadable model": ["predict", str(scans), "--model", str(model), "--out", out],
        "visualize misspelled input": ["visualize", missing, "--model", str(model), "--out", out],
        "heatmaps misspelled input": ["heatmaps", missing, "--model", str(model), "--out", out],
        "preprocess missing manifest": ["preprocess", str(tmp_path / "no_such.csv"), "--out", out],
        "prepare missing source": ["prepare", "vindr", missing, "--out", out],
        "train missing manifest": ["train", "tiny_cpu", "--set", manifest, "--out", out],
        "tune missing manifest": ["tune", "tiny_cpu", "--set", manifest, "--out", out],
        "ablate missing data": ["ablate", "--data", missing, "--out", out],
    }


CASES = [
    "predict misspelled input",
    "predict missing model",
    "predict unreadable model",
    "visualize misspelled input",
    "heatmaps misspelled input",
    "preprocess missing manifest",
    "prepare missing source",
    "train missing manifest",
    "tune missing manifest",
    "ablate missing data",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_argument_exits_2_and_leaves_no_output_folder(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _bad_argument_cases(tmp_path)[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists(), sorted(p.name for p in (tmp_path / "out").rglob("*"))


# -- logging and progress -------------------------------------------------------------------------------------
def test_log_level_is_warning_by_default() -> None:
    assert [log_level(n) for n in (0, 1, 2, 3)] == [
        logging.WARNING,
        logging.INFO,
        logging.DEBUG,
        logging.DEBUG,
    ]


def test_progress_bars_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    monkeypatch.setattr(sys, "stderr", Stream(False))
    assert not show_progress()
    monkeypatch.setattr(sys, "stderr", Stream(True))
    assert show_progress() and not show_progress(no_progress=True)


def _synth(out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    argv = [*flags, "synth", "--out", str(out), "--exams", "1", "--image-size", "96", "64", "--no-preview"]
    return subprocess.run(
        [sys.executable, "-m", "mammogmic.cli.main", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_summary_once_no_info_logs_and_no_bar_in_a_log(tmp_path: Path) -> None:
    quiet = _synth(tmp_path / "a")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.count("wrote 4 images") == 1
    assert quiet.stderr == ""  # no INFO lines, and no progress bar: stderr is a pipe here
    verbose = _synth(tmp_path / "b", "-v")
    assert "INFO mammogmic.data.synth.dataset: wrote 4 images" in verbose.stderr
    assert "DEBUG" not in verbose.stderr and "exam/s" not in verbose.stderr


def test_help_texts_render_their_percent_signs() -> None:
    """argparse %-formats option help but not descriptions, so a ``%%`` written for one shows up doubled in the
    other (ablate's description once said "top-t%%")."""
    texts = {"mammogmic": build_parser().format_help()}
    texts.update({name: parser.format_help() for name, parser in COMMANDS.items()})
    doubled = {name: re.findall(r".{0,20}%%.{0,20}", text) for name, text in texts.items()}
    assert not {name: hits for name, hits in doubled.items() if hits}
    assert "top-t% vs GAP" in " ".join(texts["ablate"].split())
