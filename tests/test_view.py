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
