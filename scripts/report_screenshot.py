"""Screenshot of an exam report for the docs: the notice, the tool bar and one exam, as headless Chromium shows them.

Usage::

    python scripts/report_screenshot.py OUT/report.html docs/img/NAME.png [--exam EXAM_ID] [--window 1280 1000]
        [--max-kb 300]

A copy of the page (next to it, removed afterwards) hides everything but the research-use notice, the tool bar
and the exam's section, so the window shows that exam at the size a reader sees it in a window of ``--window``
pixels (the views scale with the window height). The PNG is cut below the section and reduced to a palette
(fewer colours, then a smaller width) until it is at most ``--max-kb`` kilobytes. Needs Debian's ``chromium``.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

_HIDE = """<style>
main > *:not(section.exam) { display: none !important; }
main > section.exam:not([data-exam="{exam}"]) { display: none !important; }
main > section.exam { margin-top: .6em; }
</style></head>"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--exam", help="exam id (default: the first exam drawn, the highest score)")
    parser.add_argument("--window", type=int, nargs=2, default=(1280, 1000), metavar=("W", "H"))
    parser.add_argument("--max-kb", type=int, default=300)
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: chromium not found (Debian: apt-get install -y chromium)", file=sys.stderr)
        return 2
    text = args.report.read_text(encoding="utf-8")
    exam = args.exam
    if exam is None:
        marker = 'class="exam" id="'
        if marker not in text:
            print(f"error: {args.report}: no exam section", file=sys.stderr)
            return 2
        exam = text.split(marker, 1)[1].split('data-exam="', 1)[1].split('"', 1)[0]
    elif f'data-exam="{exam}"' not in text:
        print(f"error: {args.report}: no section for exam {exam!r}", file=sys.stderr)
        return 2
    page = text.replace("</head>", _HIDE.replace("{exam}", exam), 1)
    with tempfile.TemporaryDirectory() as tmp:
        # Next to the report, so that its relative links stay valid.
        copy = args.report.parent / f".screenshot-{Path(tmp).name}.html"
        shot = Path(tmp) / "shot.png"
        try:
            copy.write_text(page, encoding="utf-8")
            subprocess.run(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--hide-scrollbars",
                    f"--user-data-dir={Path(tmp) / 'profile'}",
                    f"--window-size={args.window[0]},{args.window[1]}",
                    f"--screenshot={shot}",
                    copy.resolve().as_uri(),
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
        finally:
            copy.unlink(missing_ok=True)
        image = Image.open(shot).convert("RGB")
    pixels = np.asarray(image)
    background = pixels[-1, -1]
    rows = np.flatnonzero((np.abs(pixels.astype(int) - background).sum(axis=2) > 8).any(axis=1))
    if rows.size:
        image = image.crop((0, 0, image.width, min(image.height, int(rows[-1]) + 12)))
    for colors, scale in ((256, 1.0), (128, 1.0), (128, 0.85), (96, 0.75), (64, 0.6)):
        shown = (
            image if scale == 1.0 else image.resize((round(image.width * scale), round(image.height * scale)))
        )
        buffer = io.BytesIO()
        shown.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(
            buffer, format="PNG", optimize=True
        )
        if buffer.tell() <= args.max_kb * 1024:
            break
    args.png.parent.mkdir(parents=True, exist_ok=True)
    args.png.write_bytes(buffer.getvalue())
    print(f"{args.png}: {shown.width}x{shown.height}, {buffer.tell() // 1024} KB, exam {exam}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
