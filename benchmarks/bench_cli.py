"""Start-up time of the command line and of ``import mammogmic``, each in a fresh interpreter.

Every command runs ``--repeats`` times in its own process, after one untimed run that warms the page cache.
Reported: the minimum and median wall time, and the minimum CPU time (user + system of the child process),
which a machine shared with other work does not inflate the way it inflates wall time. The interpreter's own
start-up (``python -c pass``) is measured the same way for reference. A command that fails (e.g.
``--version`` on a version without it) is reported as n/a. Not a test: prints a table and writes JSON.

    python benchmarks/bench_cli.py [--repeats 5] [--json bench_cli.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

COMMANDS: dict[str, list[str]] = {
    "python -c pass": ["-c", "pass"],
    "import mammogmic": ["-c", "import mammogmic"],
    "mammogmic --version": ["-m", "mammogmic.cli.main", "--version"],
    "mammogmic --help": ["-m", "mammogmic.cli.main", "--help"],
    "mammogmic predict --help": ["-m", "mammogmic.cli.main", "predict", "--help"],
    "from mammogmic import GMIC (loads torch)": ["-c", "from mammogmic import GMIC"],
}


def time_command(args: list[str], repeats: int) -> tuple[list[float], list[float]] | None:
    """Wall and CPU seconds of each run, or None when the command fails."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    if subprocess.run([sys.executable, *args], env=env, capture_output=True).returncode != 0:
        return None
    wall, cpu = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], env=env, capture_output=True, check=True)
        wall.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows: dict[str, dict[str, float] | None] = {}
    print(f"{'command':45s} {'min s':>7s} {'median s':>9s} {'min CPU s':>10s}")
    for name, cmd in COMMANDS.items():
        measured = time_command(cmd, args.repeats)
        if measured is None:
            rows[name] = None
            print(f"{name:45s} {'n/a':>7s}")
            continue
        wall, cpu = measured
        rows[name] = {"min": min(wall), "median": statistics.median(wall), "min_cpu": min(cpu)}
        print(f"{name:45s} {min(wall):7.3f} {statistics.median(wall):9.3f} {min(cpu):10.3f}")
    if args.json:
        args.json.write_text(
            json.dumps({"repeats": args.repeats, "python": sys.version, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
