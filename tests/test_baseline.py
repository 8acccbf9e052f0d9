"""The non-learned baseline: separates synthetic cells, is dense, is scored
on real data."""

from __future__ import annotations

import numpy as np
import pytest

from ffnjax import erl
from ffnjax.baseline import BaselineConfig, baseline_segmentation
from tests.conftest import shared_path


def two_cells(dark_membranes: bool = True):
    """Two bright boxes separated by a dark 2-voxel membrane, plus noise."""
    rng = np.random.default_rng(0)
    gt = np.zeros((16, 24, 40), np.uint16)
    gt[:, :, :19] = 1
    gt[:, :, 21:] = 2
    image = np.where(gt > 0, 200.0, 40.0) + rng.normal(0, 10, gt.shape)
    if not dark_membranes:
        image = 255 - image
    return np.clip(image, 0, 255).astype(np.uint8), gt


def test_separates_two_cells_and_labels_every_voxel():
    image, gt = two_cells()
    seg = baseline_segmentation(image, h=2, min_size=50)
    assert seg.dtype == np.uint64 and seg.shape == image.shape
    assert (seg > 0).all()  # membranes are assigned too
    assert sorted(np.unique(seg).tolist()) == [1, 2]  # relabelled 1..N
    assert erl.adapted_rand(seg, gt) < 0.02
    split, merge = erl.voi(seg, gt)
    assert split < 0.05 and merge < 0.05


def test_bright_membranes_option_and_overrides_match_config():
    image, gt = two_cells(dark_membranes=False)
    cfg = BaselineConfig(h=2, min_size=50, dark_membranes=False)
    seg = baseline_segmentation(image, cfg)
    assert erl.adapted_rand(seg, gt) < 0.02
    same = baseline_segmentation(image, dark_membranes=False, h=2, min_size=50)
    np.testing.assert_array_equal(seg, same)
    # the wrong polarity makes the membrane the "interior": a bad result
    wrong = baseline_segmentation(image, h=2, min_size=50)
    assert erl.adapted_rand(wrong, gt) > 0.1


def test_anisotropic_voxels_and_min_size():
    image, gt = two_cells()
    seg = baseline_segmentation(image[::2], voxel_size=(2, 1, 1), h=2, min_size=50)
    assert erl.adapted_rand(seg, gt[::2]) < 0.02
    # min_size: surviving segments only grow, so none is smaller than it
    noisy = np.clip(image + np.random.default_rng(1).normal(0, 60, image.shape), 0, 255)
    many = baseline_segmentation(noisy, sigma=0, h=0.5, min_size=0)
    kept = baseline_segmentation(noisy, sigma=0, h=0.5, min_size=1000)
    sizes = np.bincount(kept.ravel())[1:]
    assert np.bincount(many.ravel())[1:].min() < 1000  # there was something to drop
    assert sizes.min() >= 1000 and len(sizes) < many.max()
    assert (kept > 0).all()


def test_bad_input():
    with pytest.raises(ValueError, match="3D"):
        baseline_segmentation(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="sigma"):
        BaselineConfig(sigma=-1)
    with pytest.raises(ValueError, match="voxel_size"):
        baseline_segmentation(np.zeros((4, 4, 4)), voxel_size=(1, 1))
    assert (baseline_segmentation(np.full((4, 5, 6), 7, np.uint8)) == 0).all()


def test_gala_crop_scores():
    path = shared_path("gala_fibsem_medulla", "train.npz")
    with np.load(path) as z:
        raw, gt = z["raw"][:20, :, :100], z["labels"][:20, :, :100]
    seg = baseline_segmentation(raw)
    split, merge = erl.voi(seg, gt)
    # far from perfect but far better than one segment or one per slice
    one = np.ones_like(seg)
    assert erl.adapted_rand(seg, gt) < erl.adapted_rand(one, gt)
    assert split + merge < sum(erl.voi(one, gt))
    assert erl.adapted_rand(seg, gt) < 0.5


def test_evaluate_cli_scores_the_baseline(tmp_path):
    import json

    from experiments import evaluate as cli

    image, gt = two_cells()
    np.savez(tmp_path / "v.npz", raw=image, gt=gt)
    out = tmp_path / "r.json"
    rc = cli.main(["--segmentation", "baseline", "--image", f"{tmp_path}/v.npz:raw",
                   "--groundtruth", f"{tmp_path}/v.npz:gt", "--voxel-size", "1,1,1",
                   "--baseline-h", "2",
                   "--dust-threshold", "10", "--json", str(out)])
    rep = json.loads(out.read_text())
    direct = baseline_segmentation(image, h=2)
    assert rc == 0 and rep["adapted_rand"] == pytest.approx(erl.adapted_rand(direct, gt))
    assert rep["erl"]["1"]["nerl"] == pytest.approx(1.0) and rep["erl"]["1"]["merges"] == 0
