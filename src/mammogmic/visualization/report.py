"""A self-contained HTML report: metrics tables, ROC/PR curves and a gallery of explanation figures.

Everything (images included, as base64 ``data:`` URIs) is in one file, with no scripts and no external
resources, so the page opens from disk in any browser, can be e-mailed, and is archived as it is.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GalleryItem", "metrics_tables_html", "png_data_uri", "write_html_report"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.curves img { width: 420px; max-width: 48%; margin-right: 1em; }
.gallery figure { margin: 0 0 2em 0; } .gallery img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.95em; margin-bottom: 0.3em; } .meta { color: #666; font-size: 0.85em; }
"""


@dataclass(frozen=True)
class GalleryItem:
    """One figure of the gallery.

    Attributes:
        name: image id shown in the caption.
        png: the PNG bytes of the figure.
        malignant: malignant score (the gallery is sorted by it, highest first).
        benign: benign score.
        labels: e.g. ``"benign 0, malignant 1"`` when known.
    """

    name: str
    png: bytes
    malignant: float
    benign: float | None = None
    labels: str | None = None


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` URI of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _num(value: Any, ci: Any = None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    if ci and ci[0] is not None:
        text += f" ({ci[0]:.3f}–{ci[1]:.3f})"
    return text


def metrics_tables_html(result: dict[str, Any]) -> str:
    """HTML tables of a :func:`mammogmic.evaluation.table.evaluate_table` result."""
    esc = html.escape
    parts = [
        f'<p class="meta">Label <code>{esc(str(result["label"]))}</code>, {esc(str(result["group"]))} level, '
        f"{result['n_rows']} rows; 95% CIs from {result['bootstrap']} bootstrap resamples (seed {result['seed']}).</p>",
        '<table class="metrics"><thead><tr><th>column</th><th>n</th><th>positives</th><th>AUROC (95% CI)</th>'
        "<th>AUPRC (95% CI)</th><th>average precision (95% CI)</th></tr></thead><tbody>",
    ]
    for col, m in result["metrics"].items():
        parts.append(
            f"<tr><td>{esc(col)}</td><td>{m['n']}</td><td>{m['n_positive']}</td>"
            f"<td>{_num(m['auroc'], m['auroc_ci'])}</td><td>{_num(m['auprc'], m['auprc_ci'])}</td>"
            f"<td>{_num(m['average_precision'], m['average_precision_ci'])}</td></tr>"
        )
    parts.append("</tbody></table>")
    points = [(col, p) for col, m in result["metrics"].items() for p in m.get("operating_points", [])]
    if points:
        parts.append(
            '<table class="operating-points"><thead><tr><th>column</th><th>threshold</th><th>sensitivity</th>'
            "<th>specificity</th><th>TP</th><th>FP</th><th>TN</th><th>FN</th></tr></thead><tbody>"
        )
        for col, p in points:
            parts.append(
                f"<tr><td>{esc(col)}</td><td>{p['threshold']:g}</td><td>{_num(p['sensitivity'])}</td>"
                f"<td>{_num(p['specificity'])}</td><td>{p['tp']}</td><td>{p['fp']}</td><td>{p['tn']}</td>"
                f"<td>{p['fn']}</td></tr>"
            )
        parts.append("</tbody></table>")
    if "hybrid" in result:
        keys = list(result["hybrid_mean"])
        parts.append(
            f"<p>Hybrid AUROC of λ·reader + (1−λ)·<code>{esc(result['hybrid_model'])}</code></p>"
            '<table class="hybrid"><thead><tr><th>reader</th>'
            + "".join(f"<th>λ={esc(k)}</th>" for k in keys)
            + "</tr></thead><tbody>"
        )
        for reader, row in result["hybrid"].items():
            parts.append(
                f"<tr><td>{esc(reader)}</td>" + "".join(f"<td>{_num(row[k])}</td>" for k in keys) + "</tr>"
            )
        parts.append(
            "<tr><td><b>mean</b></td>"
            + "".join(f"<td>{_num(result['hybrid_mean'][k])}</td>" for k in keys)
            + "</tr>"
        )
        parts.append("</tbody></table>")
    for c in result.get("comparisons", []):
        parts.append(
            f"<p>AUROC {esc(c['a'])} − {esc(c['b'])}: {_num(c['difference'], c['difference_ci'])}, "
            f"p = {_num(c['p_value'])} (paired bootstrap, n = {c['n']})</p>"
        )
    return "\n".join(parts)


def write_html_report(
    path: str | Path,
    title: str,
    metrics: Sequence[tuple[str, dict[str, Any]]] = (),
    curves: Sequence[tuple[str, bytes]] = (),
    gallery: Sequence[GalleryItem] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write the report.

    Args:
        path: output ``.html`` file.
        title: page title.
        metrics: ``(heading, evaluate_table result)`` per level (image, breast, ...).
        curves: ``(caption, png bytes)`` of ROC/PR plots.
        gallery: figures; shown sorted by malignant score, highest first.
        notes: free-text paragraphs (models, inputs, settings) shown under the title.

    Returns:
        The path written.
    """
    esc = html.escape
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>{esc(title)}</h1>", f'<p class="meta">Generated by mammogmic on {stamp}.</p>']
    body += [f"<p>{esc(n)}</p>" for n in notes]
    if metrics:
        body.append('<section id="metrics"><h2>Metrics</h2>')
        for heading, result in metrics:
            body.append(f"<h3>{esc(heading)}</h3>")
            body.append(metrics_tables_html(result))
        body.append("</section>")
    if curves:
        body.append('<section id="curves" class="curves"><h2>ROC and precision-recall curves</h2>')
        for caption, png in curves:
            body.append(f'<img src="{png_data_uri(png)}" alt="{esc(caption)}" title="{esc(caption)}">')
        body.append("</section>")
    if gallery:
        body.append(
            f'<section id="gallery" class="gallery"><h2>Gallery ({len(gallery)} images, '
            "highest malignant score first)</h2>"
        )
        for item in sorted(gallery, key=lambda g: -g.malignant):
            caption = f"<b>{esc(item.name)}</b> — malignant {item.malignant:.3f}"
            if item.benign is not None:
                caption += f", benign {item.benign:.3f}"
            if item.labels:
                caption += f" <span class='meta'>(labels: {esc(item.labels)})</span>"
            body.append(
                f'<figure data-image="{esc(item.name)}" data-malignant="{item.malignant:.6f}">'
                f"<figcaption>{caption}</figcaption>"
                f'<img src="{png_data_uri(item.png)}" alt="GMIC explanation for {esc(item.name)}"></figure>'
            )
        body.append("</section>")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
