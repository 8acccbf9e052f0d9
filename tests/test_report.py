"""The evaluation report: the text table and the worst-merge PNG of an
`erl.evaluate` result, and their old import path ffnjax.erl."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ffnjax import erl, report


def test_old_import_path_is_the_same():
    assert erl.format_table is report.format_table
    assert erl.save_merge_png is report.save_merge_png


def test_report_imports_first_without_a_cycle(tmp_path):
    # erl imports report for its re-exports; report reaches erl only inside
    # save_merge_png, so either module can be imported first.
    code = ("import numpy as np, ffnjax.report as r; g = np.zeros((2, 4, 4), np.uint8); g[:, :2] = 1; "
            f"r.save_merge_png({str(tmp_path / 'a.png')!r}, g, g)")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "a.png").exists()


def test_evaluate_report_and_png(tmp_path):
    labels = np.zeros((8, 16, 40), np.uint32)
    labels[1:7, 1:7, 2:38] = 1
    labels[1:7, 9:15, 2:38] = 2
    merged = labels.copy()
    merged[1:7, 1:15, 20:38] = np.where(labels[1:7, 1:15, 20:38] > 0, 9, 0)  # joins both halves
    rep = erl.evaluate(merged, labels, (1, 1, 1), skeleton_options={"dust_threshold": 10})
    assert set(rep["erl"]) == {"1", "50"}
    strict = rep["erl"]["1"]
    assert strict["merges"] == 1 and strict["worst_merges"] == [9] and strict["nerl"] < 0.5
    assert rep["voi_merge"] > 0 and rep["voi_split"] > 0 and 0 < rep["adapted_rand"] < 1
    json.dumps(rep)  # JSON-ready
    assert "NERL" in report.format_table(rep)
    png = report.save_merge_png(tmp_path / "m.png", merged, labels, merging_segments=[9])
    rgb = np.asarray(Image.open(png))
    assert (rgb == (255, 0, 255)).all(-1).any()  # the merger is marked
    perfect = erl.evaluate(labels, labels, (1, 1, 1), skeleton_options={"dust_threshold": 10})
    assert perfect["erl"]["1"]["nerl"] == pytest.approx(1) and perfect["voi"] == 0
    assert perfect["erl"]["1"]["merges_per_mm"] == 0


def _two_halves():
    labels = np.zeros((8, 16, 40), np.uint32)
    labels[1:7, 1:7, 2:38] = 1
    labels[1:7, 9:15, 2:38] = 2
    image = np.random.default_rng(0).normal(128, 30, labels.shape).astype(np.float32)
    return labels, image


def test_merge_png_has_a_key_below_the_panels(tmp_path):
    # No merger: magenta then appears only in the key, below every panel; the
    # key also shows the ground-truth and segment boundary colours.
    labels, image = _two_halves()
    png = report.save_merge_png(tmp_path / "k.png", labels, labels, image, merging_segments=[])
    rgb = np.asarray(Image.open(png))
    rows = np.nonzero((rgb == report.MERGE).all(-1))[0]
    assert len(rows) > 20 and rows.min() > 0.8 * rgb.shape[0]
    for colour in (report.GT_BOUNDARY, report.SEGMENT_BOUNDARY):
        assert (rgb[rows.min():rows.max() + 1] == colour).all(-1).sum() > 20
    # Small volumes are enlarged so the titles fit: 16x40 slices become at
    # least 4 times larger, three columns and three rows of them.
    assert rgb.shape[0] > 3 * 16 * 4 and rgb.shape[1] > 3 * 40 * 4
    # Titles above the panels: dark text pixels in the top rows.
    assert (rgb[:20].max(-1) < 100).sum() > 50


def test_merge_png_says_when_the_segmentation_is_empty(tmp_path):
    labels, image = _two_halves()
    banner = (200, 0, 0)
    full = np.asarray(Image.open(report.save_merge_png(tmp_path / "f.png", labels, labels, image)))
    assert not (full == banner).all(-1).any()
    empty = np.asarray(Image.open(report.save_merge_png(tmp_path / "e.png", np.zeros_like(labels),
                                                        labels, image)))
    assert (empty[:24] == banner).all(-1).sum() > 50  # the red line above everything
    assert (empty == (30, 30, 30)).all(-1).sum() > 3 * 150 * 10  # a note across each panel


def test_merge_png_colours_are_vivid(tmp_path):
    # The segmentation panel colours segments with saturated colours at alpha
    # 0.6, not a faint tint: the picture holds strongly coloured pixels where
    # the segmentation is.
    labels, image = _two_halves()
    rgb = np.asarray(Image.open(report.save_merge_png(tmp_path / "v.png", labels, labels, image)),
                     np.float32)
    chroma = rgb.max(-1) - rgb.min(-1)
    assert (chroma > 80).sum() > 3 * 2 * 6 * 36 * 16  # both objects, 3 slices, enlarged >= 4x



def test_merge_rate_is_per_mm_of_skeleton_in_the_voxel_size_units():
    labels = np.zeros((8, 16, 40), np.uint32)
    labels[1:7, 1:7, 2:38] = 1
    labels[1:7, 9:15, 2:38] = 2
    merged = np.where(labels > 0, 9, 0).astype(np.uint32)  # one segment holds both
    opts = {"dust_threshold": 10}
    fine = erl.evaluate(merged, labels, (1, 1, 1), skeleton_options=opts)["erl"]["1"]
    coarse = erl.evaluate(merged, labels, (10, 10, 10), skeleton_options=opts)["erl"]["1"]
    assert fine["merges"] == coarse["merges"] == 1
    assert fine["merges_per_mm"] == pytest.approx(1e6 / fine["total_length"])
    assert coarse["merges_per_mm"] == pytest.approx(fine["merges_per_mm"] / 10)
    table = report.format_table(erl.evaluate(merged, labels, (10, 10, 10), skeleton_options=opts))
    assert "merges/mm" in table.splitlines()[0]
    assert f"{coarse['merges_per_mm']:.4g}" in table.splitlines()[1]
