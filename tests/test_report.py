"""report.html in a real headless Chromium: every embedded image decodes, the tables are there."""

from __future__ import annotations

import numpy as np
import pytest

from metacontrol.eval.report import (
    Sample,
    Table,
    clear_stale_outputs,
    control_score_figure,
    metrics_table,
    save_figure,
    write_report,
)
from tests.browser import render_in_chromium

RESULTS = {"standard": {"canny": {"control_score": 0.0, "edge_f1": 0.2}, "seg": {"control_score": 0.1, "edge_f1": 0.3}},
           "reptile": {"canny": {"control_score": 0.6, "edge_f1": 0.5}, "seg": {"control_score": 0.4, "edge_f1": 0.4}}}


def test_report_renders_every_image_and_table(tmp_path):
    rng = np.random.default_rng(0)
    tile = lambda: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # noqa: E731
    plot = save_figure(control_score_figure(RESULTS), tmp_path / "control_scores.png")
    samples = {"reptile / canny": [Sample("a red ball <b>&</b>", tile(), tile(), tile()),
                                   Sample("a photo", tile(), tile(), None)]}
    path = write_report(tmp_path / "run", "evaluation", settings={"seed": 3, "settings": {"steps": 2}},
                        tables=[metrics_table("metrics", RESULTS), Table("extra", ["a"], [[1]])],
                        samples=samples, figures={"control score": plot})
    page = render_in_chromium(path)
    assert page["title"] == "evaluation"
    assert len(page["images"]) == 1 + 3 + 2  # the plot, a full sample, one without ground truth
    assert all(img["loaded"] for img in page["images"]), page["images"]
    tables = {t["cls"]: t for t in page["tables"]}
    assert {"metrics", "samples", "settings"} <= set(tables)
    metrics = [t for t in page["tables"] if t["cls"] == "metrics"]
    assert metrics[0]["rows"] == 4 and metrics[0]["header"][:3] == ["checkpoint", "condition", "control_score"]
    assert tables["settings"]["rows"] == 2  # nested settings flattened to seed, settings.steps
    assert "a red ball <b>&</b>" in path.read_text().replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def test_broken_image_is_detected(tmp_path):
    """The probe can fail: an undecodable data URI reads as not loaded."""
    page = tmp_path / "broken.html"
    page.write_text('<html><body><img alt="x" src="data:image/png;base64,AAAA"></body></html>')
    assert render_in_chromium(page)["images"] == [{"alt": "x", "loaded": False, "width": 0}]


def test_control_score_axis_label_is_not_clipped():
    fig = control_score_figure(RESULTS)
    fig.canvas.draw()
    label = fig.axes[0].yaxis.label.get_window_extent()
    assert fig.bbox.y0 <= label.y0 and label.y1 <= fig.bbox.y1, (label, fig.bbox)
    assert fig.bbox.x0 <= label.x0


def test_clear_stale_outputs_only_removes_matching_files(tmp_path):
    for name in ("grid_old.png", "metrics.json", "notes.txt"):
        (tmp_path / name).write_text("x")
    removed = clear_stale_outputs(tmp_path, ["grid_*.png", "metrics.json"])
    assert sorted(p.name for p in removed) == ["grid_old.png", "metrics.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("value,cell", [(0.12345, "0.123"), (3, ">3<"), ("<x>", "&lt;x&gt;")])
def test_cells_are_formatted_and_escaped(tmp_path, value, cell):
    path = write_report(tmp_path, "t", settings={}, tables=[Table("t", ["v"], [[value]])])
    assert cell in path.read_text()
