"""Bench reports and plots say what they show (issue 33): the methods the protocols used, UA / IRA / CRA spelled
out, per-concept rows legible. Drawn from the committed 12-request results, no bench run."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest

from diffusers_unlearn.bench import report

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "bench" / "minicanvas-style12" / "results.json"


@pytest.fixture(scope="module")
def result():
    return json.loads(RESULTS.read_text())


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions close, kept for inspection."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    return figures


def test_the_metrics_plot_names_every_method_and_spells_out_the_scores(result, drawn, tmp_path):
    assert result["settings"]["method"] == "esd" and "closed_form" in result["protocols"]
    report.plot_metrics(result, tmp_path / "metrics.png")
    fig = drawn[-1]
    assert fig._suptitle.get_text() == "minicanvas: 12 style requests, methods esd, closed_form"
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["UA: unlearning accuracy", "IRA: in-domain retain accuracy", "CRA: cross-domain retain accuracy"]


def test_ua_matrix_row_labels_are_legible(result, drawn, tmp_path):
    report.plot_ua_matrix(result, tmp_path / "ua_matrix.png")
    fig = drawn[-1]
    fig.set_dpi(report.UA_MATRIX_DPI)
    fig.canvas.draw()
    labels = [t for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert [t.get_text() for t in labels] == result["stream"]
    heights = [t.get_window_extent().height for t in labels]
    assert min(heights) >= 11  # pixels in the saved PNG (was about 7)
    rows = fig.axes[0].get_window_extent().height / len(result["stream"])
    assert rows > max(heights)  # the labels do not overlap


def test_the_report_defines_ua_ira_and_cra_before_using_them(result):
    text = report.markdown(result)
    first = min(text.index(name) for name in ("IRA", "CRA"))
    assert report.DEFINITIONS in text and text.index(report.DEFINITIONS) <= first
    assert "UA = unlearning accuracy" in report.DEFINITIONS and "cross-domain retain accuracy" in report.DEFINITIONS
