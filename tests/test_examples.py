"""Balanced sampling, crops, soft targets and augmentation (host-side NumPy)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from ffnjax.config import DEFAULT_PARTITION_THRESHOLDS
from ffnjax.examples import (EXCLUDED, Augmentation, BalancedSampler, TrainingVolume,
                             apply_geometric, box_sum, cached_partitions, compute_partitions, crop,
                             make_example, remove_small_objects)
from ffnjax.synthetic import SyntheticConfig, make_volume


@pytest.fixture(scope="module")
def synth():
    image, labels = make_volume((24, 48, 48), seed=3, config=SyntheticConfig(mean_radius=3.0))
    return image, labels


def test_box_sum_matches_uniform_filter():
    a = (np.random.default_rng(0).random((9, 11, 13)) > 0.6).astype(np.int32)
    r = (1, 2, 3)
    size = [2 * x + 1 for x in r]
    ref = ndimage.uniform_filter(a.astype(np.float64), size=size, mode="constant") * np.prod(size)
    np.testing.assert_allclose(box_sum(a, r), ref, atol=1e-9)


def test_partitions_match_brute_force():
    rng = np.random.default_rng(1)
    # Blocky labels so that fractions spread over several bins.
    labels = np.kron(rng.integers(0, 4, (3, 4, 4)), np.ones((3, 3, 3), int)).astype(np.uint16)
    radius = (1, 2, 1)
    thresholds = (0.2, 0.5, 0.8)
    part = compute_partitions(labels, radius, thresholds)
    box = np.prod([2 * r + 1 for r in radius])
    expected = np.zeros(labels.shape, np.uint8)
    for z, y, x in np.ndindex(labels.shape):
        if labels[z, y, x] == 0:
            continue
        sl = tuple(slice(max(c - r, 0), c + r + 1) for c, r in zip((z, y, x), radius))
        frac = np.sum(labels[sl] == labels[z, y, x]) / box
        expected[z, y, x] = 1 + np.searchsorted(thresholds, frac, side="right")
    np.testing.assert_array_equal(part, expected)
    assert len(np.unique(part)) >= 3


def test_small_objects_are_background_and_mask_is_excluded():
    labels = np.zeros((10, 10, 10), np.uint32)
    labels[1:9, 1:9, 1:9] = 7
    labels[0, 0, 0] = 3                       # a one-voxel object
    mask = np.zeros(labels.shape, bool)
    mask[5] = True
    part = compute_partitions(labels, (1, 1, 1), min_size=2, mask=mask)
    assert part[0, 0, 0] == 0
    assert np.all(part[5] == EXCLUDED)
    assert np.all(part[(labels == 7) & ~mask] >= 1) and np.all(part[~mask & (labels == 0)] == 0)
    np.testing.assert_array_equal(remove_small_objects(labels, 2) == 3, np.zeros(labels.shape, bool))


def test_partition_cache_round_trip(tmp_path, synth):
    _, labels = synth
    a = cached_partitions(labels, (3, 4, 4), DEFAULT_PARTITION_THRESHOLDS, 10, None, tmp_path)
    assert len(list(tmp_path.glob("partitions_*.npy"))) == 1
    b = cached_partitions(labels, (3, 4, 4), DEFAULT_PARTITION_THRESHOLDS, 10, None, tmp_path)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, compute_partitions(labels, (3, 4, 4), min_size=10))


def test_partition_cache_name_unchanged_and_no_temporary_left(tmp_path, synth):
    # the key is the sha1 the cache has always used, so caches written before
    # ffnjax.files took over are still found
    import hashlib

    _, labels = synth
    mask = labels == 0
    cached_partitions(labels, (3, 4, 4), DEFAULT_PARTITION_THRESHOLDS, 10, mask, tmp_path)
    h = hashlib.sha1()
    for part in (np.ascontiguousarray(labels), np.asarray((3, 4, 4)),
                 np.asarray(DEFAULT_PARTITION_THRESHOLDS), np.asarray([10]), mask):
        h.update(str(part.shape).encode() + str(part.dtype).encode())
        h.update(part.tobytes())
    assert [p.name for p in tmp_path.iterdir()] == [f"partitions_{h.hexdigest()[:16]}.npy"]


def test_sampler_balances_partitions_and_respects_margin(synth):
    image, labels = synth
    vol = TrainingVolume(image, labels)
    size = (9, 13, 13)
    sampler = BalancedSampler([vol], size, radius=(4, 6, 6), min_size=10, seed=0)
    part = sampler.partitions[0]
    n = 300 * len(sampler.bins)
    draws = [sampler.sample_centre() for _ in range(n)]
    counts = np.bincount([sampler.bins.index(int(part[c])) for _, c, _ in draws],
                         minlength=len(sampler.bins))
    assert len(sampler.bins) >= 6
    # Uniform over bins: every bin within 25% of n / bins (binomial std ~ 5.5%).
    np.testing.assert_allclose(counts / (n / len(sampler.bins)), 1.0, atol=0.25)
    # The voxel's own partition is what was drawn, and every crop lies inside.
    assert all(int(part[c]) == p for _, c, p in draws)
    cs = np.array([c for _, c, _ in draws])
    half = np.array(size) // 2
    assert np.all(cs >= half) and np.all(cs < np.array(labels.shape) - half)


def test_sampler_stream_resumes_from_state(synth):
    image, labels = synth
    vol = TrainingVolume(image, labels)
    a = BalancedSampler([vol], (9, 13, 13), (3, 4, 4), seed=5)
    a.batch(3)
    state = a.get_state()
    expect = a.batch(2)
    b = BalancedSampler([vol], (9, 13, 13), (3, 4, 4), seed=99)
    b.set_state(state)
    got = b.batch(2)
    for k in expect:
        np.testing.assert_array_equal(got[k], expect[k])


def test_sampler_pools_several_volumes(synth):
    image, labels = synth
    other = TrainingVolume(image[:, ::-1].copy(), (labels[:, ::-1] + 1000).copy(), mean=100.0,
                           stddev=20.0, name="second")
    sampler = BalancedSampler([TrainingVolume(image, labels), other], (9, 13, 13), (3, 4, 4), seed=2)
    vis = {sampler.sample_centre()[0] for _ in range(200)}
    assert vis == {0, 1}


def _coordinate_volume(shape):
    """Image whose value encodes the labels, so alignment can be checked voxel-wise."""
    rng = np.random.default_rng(4)
    labels = np.kron(rng.integers(1, 20, [s // 3 + 1 for s in shape]),
                     np.ones((3, 3, 3), np.uint32))[:shape[0], :shape[1], :shape[2]]
    image = (labels * 11 % 256).astype(np.uint8)
    return image, labels.astype(np.uint32)


@pytest.mark.parametrize("flips,transpose", [((True, False, False), False),
                                             ((False, True, True), True),
                                             ((True, True, True), True)])
def test_augmentation_equals_cropping_the_transformed_volume(flips, transpose):
    image, labels = _coordinate_volume((15, 18, 18))
    vol = TrainingVolume(image, labels, mean=10.0, stddev=2.0)
    centre, size = (7, 8, 9), (7, 9, 9)
    aug = Augmentation(flips, transpose, contrast=1.5, brightness=0.25)
    ex = make_example(vol, centre, size, aug)
    # Reference: transform the whole volume first, then crop at the moved centre.
    t_img, t_lab, t_centre = image, labels, list(centre)
    for axis, f in enumerate(flips):
        if f:
            t_img, t_lab = np.flip(t_img, axis), np.flip(t_lab, axis)
            t_centre[axis] = image.shape[axis] - 1 - t_centre[axis]
    if transpose:
        t_img, t_lab = np.swapaxes(t_img, 1, 2), np.swapaxes(t_lab, 1, 2)
        t_centre[1], t_centre[2] = t_centre[2], t_centre[1]
    ref_img, _ = crop(t_img, t_centre, size)
    ref_lab, _ = crop(t_lab, t_centre, size)
    np.testing.assert_array_equal(ex["labels"], ref_lab)
    np.testing.assert_allclose(ex["image"], ((ref_img - 10.0) / 2.0) * 1.5 + 0.25, rtol=1e-6)
    # Image, labels and target stay aligned voxel by voxel.
    raw = (ex["image"] - 0.25) / 1.5 * 2.0 + 10.0
    np.testing.assert_allclose(raw, ex["labels"] * 11 % 256, atol=1e-3)
    centre_label = ex["labels"][3, 4, 4]
    np.testing.assert_array_equal(ex["target"] > 0.5, ex["labels"] == centre_label)
    assert set(np.unique(ex["target"])) <= {np.float32(0.95), np.float32(0.05)}


def test_crop_outside_volume_has_zero_weight_and_background_centre_has_empty_target():
    image, labels = _coordinate_volume((9, 9, 9))
    labels[0, 0, 0] = 0
    mask = np.zeros(labels.shape, bool)
    mask[4] = True
    vol = TrainingVolume(image, labels, mask=mask)
    ex = make_example(vol, (0, 0, 0), (5, 5, 5))
    expected = np.zeros((5, 5, 5), bool)
    expected[2:, 2:, 2:] = True               # volume 0..2 maps to crop 2..4 on every axis
    np.testing.assert_array_equal(ex["weight"] > 0, expected)
    assert np.all(ex["target"] == np.float32(0.05))   # centre on background: nothing to fill
    ex2 = make_example(vol, (4, 4, 4), (5, 5, 5))
    assert np.all(ex2["weight"][2] == 0) and ex2["weight"].sum() == 4 * 25


def test_training_volume_rejects_bad_input():
    image, labels = _coordinate_volume((6, 6, 6))
    with pytest.raises(ValueError, match="differs from labels shape"):
        TrainingVolume(image[:5], labels)
    with pytest.raises(ValueError, match="labels are empty"):
        TrainingVolume(image, np.zeros_like(labels))


def test_apply_geometric_is_an_involution_without_transpose_and_with_it():
    a = np.arange(5 * 7 * 7).reshape(5, 7, 7)
    aug = Augmentation((True, False, True), True)
    once = apply_geometric(a, aug)
    assert once.shape == (5, 7, 7)
    # Transposing then flipping the swapped axes undoes it.
    undo = np.swapaxes(once, 1, 2)[::-1, :, ::-1]
    np.testing.assert_array_equal(undo, a)


def test_fib25_partitions_are_fast_and_balanced(shared_data):
    labels = np.load(shared_data("fib25_training_sample2", "groundtruth_z000-149.npz"))["labels"]
    t0 = time.perf_counter()
    part = compute_partitions(labels, (12, 24, 24), min_size=100)
    seconds = time.perf_counter() - t0
    assert seconds < 60, f"partitions of FIB-25 took {seconds:.1f} s"
    counts = np.bincount(part.ravel(), minlength=14)
    # FIB-25's sample is densely labelled: every fraction bin is populated.
    assert np.all(counts[1:14] > 10000)
