"""Seed policies: peaks (edge-distance maxima) and grid."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ffnjax import seeds
from ffnjax.config import InferenceOptions

from conftest import shared_path


def skip_segmented(zyx: np.ndarray, segmentation: np.ndarray) -> np.ndarray:
    """The seeds whose voxel is not yet segmented (segmentation == 0): a batch
    form of the check `ffnjax.segmentation.seed_allowed` makes per seed."""
    zyx = np.asarray(zyx, np.int64).reshape(-1, 3)
    if len(zyx) == 0:
        return zyx
    return zyx[segmentation[tuple(zyx.T)] == 0]


def balls_image(centres, radius=5, shape=(32, 48, 48)) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    img = np.full(shape, 60.0)
    for c in centres:
        img[np.linalg.norm(grid - np.array(c), axis=-1) <= radius] = 200.0
    return img.astype(np.uint8)


CENTRES = [(10, 12, 12), (10, 30, 20), (20, 20, 36), (22, 36, 10)]


def assert_local_maxima_of_edge_distance(image, found, min_distance=seeds.PEAKS_MIN_DISTANCE):
    """Independent check with scipy's EDT: each seed is off the edges and no voxel
    within min_distance (Chebyshev) is farther from an edge (up to the jitter)."""
    non_edge = ~seeds.edge_mask(image)
    dist = ndimage.distance_transform_edt(non_edge)
    local_max = ndimage.maximum_filter(dist, size=2 * min_distance + 1, mode="nearest")
    at = tuple(found.T)
    assert np.all(non_edge[at])
    assert np.all(dist[at] >= local_max[at] - 2 * seeds.PEAKS_JITTER - 1e-5)


def test_peaks_finds_each_ball_centre_and_are_edge_distance_maxima():
    img = balls_image(CENTRES)
    found = seeds.peaks_seeds(img, InferenceOptions())
    assert found.dtype == np.int64 and found.shape[1] == 3
    for c in CENTRES:
        nearest = np.min(np.linalg.norm(found - np.array(c), axis=1))
        assert nearest <= 1.0, (c, nearest)
    assert_local_maxima_of_edge_distance(img, found)


def test_peaks_are_deterministic_sorted_and_respect_the_margin():
    img = balls_image(CENTRES)
    a = seeds.peaks_seeds(img, margin=(4, 6, 6))
    b = seeds.peaks_seeds(img.copy(), margin=(4, 6, 6))
    np.testing.assert_array_equal(a, b)
    assert [tuple(s) for s in a.tolist()] == sorted(tuple(s) for s in a.tolist())
    assert np.all(a >= [4, 6, 6]) and np.all(a <= np.array(img.shape) - 1 - [4, 6, 6])
    # the margin only removes seeds
    full = {tuple(s) for s in seeds.peaks_seeds(img).tolist()}
    assert {tuple(s) for s in a.tolist()} == {s for s in full if all(
        m <= v <= n - 1 - m for v, m, n in zip(s, (4, 6, 6), img.shape))}


def test_grid_equals_explicit_loops():
    opt = InferenceOptions(seed_grid_step=(3, 5, 4))
    got = seeds.grid_seeds((12, 20, 17), opt, margin=(1, 2, 0))
    want = [(z, y, x) for z in range(1, 11, 3) for y in range(2, 18, 5) for x in range(0, 17, 4)]
    assert [tuple(s) for s in got.tolist()] == want
    assert seeds.grid_seeds((4, 4, 4), opt, margin=(2, 2, 2)).shape == (0, 3)


def test_distance_order_visits_thickest_object_first():
    # Balls of radius 3, 5 and 7: the deepest seed is the centre of the largest ball,
    # the order is by descending edge distance (scipy's EDT as the reference), and it
    # is a permutation of the z,y,x-ordered seeds.
    shape = (40, 48, 48)
    img = np.maximum.reduce([balls_image([c], radius=r, shape=shape)
                             for c, r in (((10, 10, 10), 3), ((20, 24, 30), 7), ((28, 36, 12), 5))])
    zyx = seeds.make_seeds(img, InferenceOptions())
    deep = seeds.make_seeds(img, InferenceOptions(seed_order="distance"))
    assert sorted(map(tuple, deep.tolist())) == sorted(map(tuple, zyx.tolist()))
    np.testing.assert_array_equal(zyx, zyx[np.lexsort(zyx.T[::-1])])
    dist = ndimage.distance_transform_edt(~seeds.edge_mask(img))[tuple(deep.T)]
    assert np.all(np.diff(dist) <= 1e-4)
    # Each ball's centre is a seed; the larger the ball, the earlier.
    at = [int(np.argmin(np.abs(deep - c).max(axis=1))) for c in ((20, 24, 30), (28, 36, 12), (10, 10, 10))]
    assert all(np.abs(deep[i] - c).max() <= 1 for i, c in zip(at, ((20, 24, 30), (28, 36, 12), (10, 10, 10))))
    assert at[0] < at[1] < at[2]
    with pytest.raises(ValueError, match="seed_order"):
        InferenceOptions(seed_order="random")
    with pytest.raises(ValueError, match="seed_order"):
        seeds.order_seeds(zyx, "random")
    with pytest.raises(ValueError, match="seed_order 'distance' needs"):
        seeds.order_seeds(zyx, "distance")


def test_make_seeds_dispatches_and_skip_segmented():
    img = balls_image(CENTRES)
    np.testing.assert_array_equal(seeds.make_seeds(img, InferenceOptions(seed_policy="peaks")),
                                  seeds.peaks_seeds(img))
    opt = InferenceOptions(seed_policy="grid", seed_grid_step=(8, 8, 8))
    grid = seeds.make_seeds(img, opt, margin=(2, 2, 2))
    np.testing.assert_array_equal(grid, seeds.grid_seeds(img.shape, opt, (2, 2, 2)))
    seg = np.zeros(img.shape, np.int64)
    seg[:16] = 5
    kept = skip_segmented(grid, seg)
    assert np.all(kept[:, 0] >= 16) and len(kept) == int(np.sum(grid[:, 0] >= 16))


def test_bad_input():
    with pytest.raises(ValueError, match="3D"):
        seeds.peaks_seeds(np.zeros((10, 10)))
    with pytest.raises(ValueError, match="margin"):
        seeds.grid_seeds((10, 10, 10), margin=(1, 1))
    with pytest.raises(ValueError, match="shape"):
        seeds.grid_seeds((10, 0, 10))


def test_peaks_on_real_fib25_crop():
    raw = np.load(shared_path("fib25_training_sample2", "raw_z000-049.npz"))["raw"][:, :96, :96]
    found = seeds.peaks_seeds(raw, margin=(4, 4, 4))
    # FIB-25 neurites are a few tens of voxels across: hundreds of seeds in this crop.
    assert 50 < len(found) < 5000
    assert_local_maxima_of_edge_distance(raw, found)
