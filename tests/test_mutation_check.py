"""``scripts/mutation_check.py`` stays runnable: every mutation still finds its line, and names tests that exist.

A mutation whose line was rewritten reports ``error`` only when someone runs the check; three had gone stale
that way (2026-12-03) before this test.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_mutation_finds_its_line_once_and_names_existing_tests() -> None:
    script = _script()
    problems = []
    names = [m.name for m in script.MUTATIONS]
    if len(set(names)) != len(names):
        problems.append("mutation names repeat")
    for mutation in script.MUTATIONS:
        count = (script.SRC / mutation.path).read_text(encoding="utf-8").count(mutation.old)
        if count != 1:
            problems.append(f"{mutation.name}: its line is in {mutation.path} {count} times")
        for node in mutation.tests:
            file, _, function = node.partition("::")
            if not (ROOT / file).is_file():
                problems.append(f"{mutation.name}: no test file {file}")
            elif function:
                name = re.sub(r"\[.*\]$", "", function.split("::")[-1])
                if not re.search(rf"^\s*def {re.escape(name)}\(", (ROOT / file).read_text(), re.MULTILINE):
                    problems.append(f"{mutation.name}: no test {name} in {file}")
    assert not problems, "\n".join(problems)
