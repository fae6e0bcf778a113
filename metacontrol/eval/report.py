"""``report.html``: one self-contained page per evaluation or benchmark to look at instead of JSON.

Every image (sample grids, plots) is embedded as a base64 PNG data URI, so the file can be mailed,
attached to an issue or opened from an artifact store with nothing next to it. Sections: settings,
metric tables, figures, and per group (condition) a grid of prompt | condition | generated | ground truth.
The same ``Table`` renders as markdown (``markdown_table``) for reports kept in the repository.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPORT_NAME = "report.html"

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.tile { width: 128px; height: 128px; image-rendering: pixelated; }
img.figure { max-width: 100%; }
td.prompt { max-width: 22em; }
"""


@dataclass
class Sample:
    """One generated example: what was asked (prompt, condition map), what came out, what it should be."""

    prompt: str
    condition: np.ndarray  # (H, W, 3) uint8
    generated: np.ndarray  # (H, W, 3) uint8
    ground_truth: np.ndarray | None = None  # (H, W, 3) uint8; None for real inputs without a target


@dataclass
class Table:
    """A titled table; floats are shown with 3 decimals. ``note``: how to read it, shown above it."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


def png_data_uri(image: np.ndarray | Image.Image | str | Path) -> str:
    """A ``data:image/png;base64,...`` URI of an array, a PIL image or a PNG file."""
    if isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
    else:
        buf = io.BytesIO()
        (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).save(buf, format="PNG")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def bounds_table(control_metrics: Mapping[str, Sequence[str]], floor: Mapping[str, Mapping[str, float]],
                 ceiling: Mapping[str, Mapping[str, float]]) -> Table:
    """The floor and ceiling of every control metric: what 0 and 1 of the control score stand for."""
    return Table("floor (no ControlNet) and ceiling (ground truth through the VAE)",
                 ["condition", "metric", "floor", "ceiling"],
                 [[c, m, floor[c][m], ceiling[c][m]] for c, metrics in control_metrics.items() for m in metrics])


def metrics_table(title: str, results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> Table:
    """``results[checkpoint][condition][metric]`` as one row per checkpoint and condition."""
    keys = sorted({k for per in results.values() for m in per.values() for k in m})
    rows = [[label, condition, *(metrics.get(k, float("nan")) for k in keys)]
            for label, per in results.items() for condition, metrics in per.items()]
    return Table(title, ["checkpoint", "condition", *keys], rows)


def control_score_figure(results: Mapping[str, Mapping[str, Mapping[str, float]]]):
    """Grouped bars: control score per condition, one bar per checkpoint (a matplotlib Figure).

    The scale's meaning goes in the title: as the y label it is longer than the axis and gets clipped.
    """
    plt = pyplot()
    conditions = list(next(iter(results.values())))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(conditions), 3.2))
    width = 0.8 / len(results)
    for i, (label, per_condition) in enumerate(results.items()):
        xs = np.arange(len(conditions)) + i * width
        ax.bar(xs, [per_condition[c]["control_score"] for c in conditions], width, label=label)
    ax.set_xticks(np.arange(len(conditions)) + 0.4 - width / 2, conditions)
    ax.set_ylabel("control score")
    ax.set_title("0 = base model without ControlNet, 1 = ground truth", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend: plots are written, never shown (no screen here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Save and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def clear_stale_outputs(folder: str | Path, patterns: Sequence[str]) -> list[Path]:
    """Delete the files a previous run left in ``folder`` matching ``patterns`` (e.g. ``grid_*.png``).

    Like diffusers' training scripts, results go straight into ``output_dir``; removing what the last
    run wrote there keeps its grids from being mistaken for this run's (other files are left alone).
    """
    folder = Path(folder)
    stale = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    for path in stale:
        path.unlink()
    return stale


def _text(value: Any) -> str:
    """A cell's text: floats with 3 decimals, containers as JSON, anything else as ``str``."""
    if isinstance(value, (float, np.floating)):
        return f"{value:.3f}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def _cell(value: Any) -> str:
    number = isinstance(value, (float, np.floating, int, np.integer)) and not isinstance(value, bool)
    css = ' class="num"' if number else ""
    return f"<td{css}>{html.escape(_text(value))}</td>"


def markdown_table(table: Table) -> str:
    """``table`` as a ``###`` heading, its note and a GitHub-flavoured markdown table, cells as in the HTML."""
    lines = [f"### {table.title}", ""] + ([table.note, ""] if table.note else [])
    lines += ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_text(v) for v in row) + " |" for row in table.rows]
    return "\n".join(lines)


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], css: str) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> list[list[Any]]:
    rows: list[list[Any]] = []
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", value])
    return rows


def _img(image: np.ndarray | None, alt: str) -> str:
    if image is None:
        return "<td>-</td>"
    return f'<td><img class="tile" alt="{html.escape(alt)}" src="{png_data_uri(image)}"></td>'


def render_report(title: str, *, settings: Mapping[str, Any], tables: Sequence[Table] = (),
                  samples: Mapping[str, Sequence[Sample]] | None = None,
                  figures: Mapping[str, str | Path | Image.Image] | None = None) -> str:
    """The report as an HTML string (see ``write_report``)."""
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>written {created}</p>"]
    for table in tables:
        note = f"<p>{html.escape(table.note)}</p>" if table.note else ""
        parts.append(f"<h2>{html.escape(table.title)}</h2>{note}{_table(table.columns, table.rows, 'metrics')}")
    for caption, figure in (figures or {}).items():
        parts.append(f"<h2>{html.escape(caption)}</h2>"
                     f'<img class="figure" alt="{html.escape(caption)}" src="{png_data_uri(figure)}">')
    for group, group_samples in (samples or {}).items():
        parts.append(f"<h2>samples: {html.escape(group)}</h2><table class='samples'><thead><tr><th>#</th>"
                     "<th>prompt</th><th>condition</th><th>generated</th><th>ground truth</th></tr></thead><tbody>")
        for i, s in enumerate(group_samples):
            parts.append(f"<tr><td>{i}</td><td class='prompt'>{html.escape(s.prompt)}</td>"
                         f"{_img(s.condition, 'condition')}{_img(s.generated, 'generated')}"
                         f"{_img(s.ground_truth, 'ground truth')}</tr>")
        parts.append("</tbody></table>")
    parts.append(f"<h2>settings</h2>{_table(['key', 'value'], _flatten(settings), 'settings')}</body></html>")
    return "".join(parts)


def write_report(folder: str | Path, title: str, *, settings: Mapping[str, Any], tables: Sequence[Table] = (),
                 samples: Mapping[str, Sequence[Sample]] | None = None,
                 figures: Mapping[str, str | Path | Image.Image] | None = None) -> Path:
    """Write ``folder/report.html`` (created if missing) and return its path.

    ``settings``: everything that fixed the run (nested dicts are flattened to ``a.b`` keys);
    ``tables``: metric tables, e.g. from ``metrics_table``; ``samples``: per group (condition) the
    examples shown as prompt | condition | generated | ground truth; ``figures``: caption -> PNG file
    or PIL image (plots, learning curves).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REPORT_NAME
    path.write_text(render_report(title, settings=settings, tables=tables, samples=samples, figures=figures),
                    encoding="utf-8")
    return path
