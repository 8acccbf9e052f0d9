"""Pictures: slice overlays and montages in memory, montages read from volumes
on disk, and the old import paths (ffnjax.viz, ffnjax.blockwise) of the same
functions. The viewer itself is exercised on a block-wise result in
test_blockwise.test_montage_and_viewer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ffnjax import blockwise, view, viz
from ffnjax.volumes import save_volume


def test_old_import_paths_are_the_same_functions():
    for name in ("boundaries", "default_slices", "label_colors", "montage", "overlay", "save_png",
                 "save_slices_png"):
        assert getattr(viz, name) is getattr(view, name)
    for name in ("save_montage", "read_slices", "make_viewer"):
        assert getattr(blockwise, name) is getattr(view, name)


def test_colours_outlines_and_montage_layout():
    labels = np.zeros((6, 8), np.uint32)
    labels[:, 4:] = 7
    assert (view.label_colors(labels)[labels == 0] == 0).all()
    assert len({tuple(c) for c in view.label_colors(labels)[labels == 7]}) == 1
    assert view.boundaries(labels)[:, 3].all() and not view.boundaries(labels)[:, 5].any()
    rgb = view.overlay(np.arange(48.0).reshape(6, 8), labels)
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    assert (rgb[:, 3] == (255, 60, 60)).all()
    tiles = view.montage([rgb] * 3, ncols=2, pad=1)
    assert tiles.shape == (2 * 7 + 1, 2 * 9 + 1, 3)
    assert view.default_slices(10, 4) == [2, 4, 5, 7]


def test_save_montage_reads_only_chosen_slices(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (12, 20, 24)).astype(np.uint8)
    seg = np.zeros(image.shape, np.uint64)
    seg[:, 5:15, 6:18] = 3
    save_volume(str(tmp_path / "img.zarr"), image)
    save_volume(str(tmp_path / "seg.zarr"), seg)
    np.testing.assert_array_equal(view.read_slices(str(tmp_path / "seg.zarr"), [1, 7]), seg[[1, 7]])
    png = view.save_montage(tmp_path / "m.png", str(tmp_path / "img.zarr"), str(tmp_path / "seg.zarr"),
                            z_slices=[1, 7])
    pic = np.asarray(Image.open(png))
    assert pic.shape[2] == 3 and pic.shape[0] > 2 * 20 and pic.shape[1] > 2 * 24
    with pytest.raises(ValueError, match="outside the volume depth"):
        view.save_montage(tmp_path / "n.png", str(tmp_path / "img.zarr"), str(tmp_path / "seg.zarr"),
                          z_slices=[12])
    save_volume(str(tmp_path / "small.zarr"), seg[:6])
    with pytest.raises(ValueError, match="differ in shape"):
        view.save_montage(tmp_path / "n.png", str(tmp_path / "img.zarr"), str(tmp_path / "small.zarr"))


def test_no_viewer_without_png_is_a_one_line_usage_error(capsys, tmp_path):
    # --no-viewer leaves only --png to do; without it the command used to do
    # nothing and exit 0.
    from experiments import view as view_cli
    with pytest.raises(SystemExit) as exit_:
        view_cli.main(["--image", str(tmp_path / "img.zarr"), "--no-viewer"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-viewer" in err[0] and "--png" in err[0]
    assert not list(tmp_path.iterdir())  # nothing was opened or written


def test_vivid_label_colours_are_saturated_and_stable():
    ids = np.arange(0, 200, dtype=np.uint64)
    vivid = view.label_colors(ids, vivid=True).astype(int)
    assert (vivid[0] == 0).all()
    chroma = vivid[1:].max(-1) - vivid[1:].min(-1)
    assert chroma.min() >= 0.5 * 0.8 * 255 and len({tuple(c) for c in vivid[1:]}) > 190
    np.testing.assert_array_equal(view.label_colors(ids, vivid=True), vivid)
    muted = view.label_colors(ids).astype(int)  # the default is unchanged: 96..223
    assert muted[1:].min() >= 96 and muted[1:].max() <= 223


def test_figure_enlarges_small_panels_and_draws_titles_key_and_notes():
    panels = [np.full((10, 12, 3), 128, np.uint8)] * 4
    plain = view.figure(panels, 2, min_panel=48, pad=2)
    # enlarged 4x (12 * 4 = 48), two columns and rows with padding
    assert plain.shape == (2 + 2 * (40 + 2), 2 + 2 * (48 + 2), 3)
    titled = view.figure(panels, 2, column_titles=("a", "b"), row_titles=("z 1", "z 2"),
                         legend=[((255, 0, 255), "magenta")], banner="warning",
                         notes={1: "empty"}, min_panel=48, pad=2)
    assert titled.shape[0] > plain.shape[0] and titled.shape[1] > plain.shape[1]
    assert (titled == (255, 0, 255)).all(-1).sum() > 20  # the key's swatch
    assert (titled == (30, 30, 30)).all(-1).sum() > 48 * 10  # the note's band
    with pytest.raises(ValueError, match="one shape"):
        view.figure([panels[0], np.zeros((5, 5, 3), np.uint8)], 2)
