"""Working at a coarser scale (`ffnjax.scale`): the reductions against direct
computations, the round trip to the native grid, and the wiring through
training volumes, checkpoints, `segment` and `experiments.segment`."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ffnjax import checkpoints, inputs, scale, segmentation
from ffnjax.config import InferenceOptions, ModelConfig, TrainConfig
from ffnjax.testing import oracle_apply_fn, oracle_options


def block_mean_loop(image: np.ndarray, f) -> np.ndarray:
    """The obvious reference: one Python loop over coarse voxels."""
    shape = scale.coarse_shape(image.shape, f)
    out = np.zeros(shape)
    for idx in itertools.product(*(range(n) for n in shape)):
        block = image[tuple(slice(i * k, (i + 1) * k) for i, k in zip(idx, f))]
        out[idx] = block.astype(np.float64).mean()
    return out


@pytest.mark.parametrize("shape,f", [((8, 12, 10), (2, 2, 2)), ((7, 11, 5), (2, 3, 2)),
                                     ((5, 9, 9), (1, 2, 4))])
def test_image_block_mean_equals_the_loop_with_partial_blocks(shape, f):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, shape).astype(np.uint8)
    got = scale.downsample_image(image, f)
    want = block_mean_loop(image, f)
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, np.round(want).astype(np.uint8))
    fimage = image.astype(np.float32) / 7
    np.testing.assert_allclose(scale.downsample_image(fimage, f), want / 7, rtol=1e-6)


def test_labels_subsample_and_return_to_the_native_grid():
    rng = np.random.default_rng(1)
    coarse = rng.integers(1, 50, (4, 5, 6)).astype(np.uint64)
    for native in [(8, 10, 12), (7, 9, 11), (8, 9, 12)]:
        up = scale.upsample_labels(coarse, (2, 2, 2), native)
        assert up.shape == native
        np.testing.assert_array_equal(scale.downsample_labels(up, (2, 2, 2)), coarse)
        # every native voxel carries its block's label
        zz, yy, xx = np.indices(native)
        np.testing.assert_array_equal(up, coarse[zz // 2, yy // 2, xx // 2])
    with pytest.raises(ValueError, match="not the"):
        scale.upsample_labels(coarse, (2, 2, 2), (10, 10, 12))
    with pytest.raises(ValueError, match="factors"):
        scale.downsample_labels(coarse, (0, 1, 1))


def test_identity_factors_change_nothing():
    a = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    for fn in (scale.downsample_image, scale.downsample_labels, scale.upsample_labels):
        assert fn(a, (1, 1, 1)) is a


def test_training_volumes_are_reduced_after_the_shape_checks(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (9, 20, 21)).astype(np.uint8)
    labels = (np.indices(image.shape).sum(0) // 7 + 1).astype(np.uint32)
    np.savez(tmp_path / "v.npz", raw=image, labels=labels)
    vol = inputs.load_volume_pair(f"{tmp_path}/v.npz:raw", f"{tmp_path}/v.npz:labels",
                                  downsample=(2, 2, 2))
    np.testing.assert_array_equal(vol.image, scale.downsample_image(image, (2, 2, 2)))
    np.testing.assert_array_equal(vol.labels, labels[::2, ::2, ::2])
    assert vol.labels.shape == (5, 10, 11)


def test_checkpoint_records_the_scale_and_segmenters_default_to_it(tmp_path):
    from ffnjax import train_loop
    config = TrainConfig.smoke(downsample=(2, 2, 2), steps=2, synthetic_shape=(32, 48, 48),
                               log_every=1, checkpoint_every=2)
    train_loop.train(config, tmp_path / "w", progress=False)
    facts = checkpoints.inference_defaults(tmp_path / "w")
    assert facts["downsample"] == (2, 2, 2)
    assert InferenceOptions(**facts).downsample == (2, 2, 2)


def test_segment_at_a_coarse_scale_returns_native_labels():
    # Objects 4 voxels thick along z (slabs) are whole blocks at factor 2: the
    # oracle recovers them at the coarse scale and the labels come back on the
    # native grid, equal to the ground truth up to relabelling.
    native = np.zeros((36, 40, 40), np.int32)
    for k in range(9):
        native[4 * k:4 * k + 4] = k + 1
    model = ModelConfig(depth=1, features=4, fov_size=(9, 9, 9), deltas=(2, 2, 2))
    opts = oracle_options(min_segment_size=10, seed_policy="grid", seed_grid_step=(2, 4, 4),
                          min_boundary_dist=(0, 0, 0), downsample=(2, 2, 2))
    seg, info = segmentation.segment(native, None, model, opts, oracle_apply_fn, progress=False)
    assert seg.shape == native.shape
    coarse_seg, _ = segmentation.segment(
        scale.downsample_image(native, (2, 2, 2)), None, model,
        oracle_options(min_segment_size=10, seed_policy="grid", seed_grid_step=(2, 4, 4),
                       min_boundary_dist=(0, 0, 0)), oracle_apply_fn, progress=False)
    np.testing.assert_array_equal(seg, scale.upsample_labels(coarse_seg, (2, 2, 2), native.shape))
    # where the coarse fill reached, every object is one ground-truth slab and vice versa
    inside = seg > 0
    assert inside.mean() > 0.5
    pairs = set(zip(seg[inside].tolist(), native[inside].tolist()))
    assert len(pairs) == len({s for s, _ in pairs}) == len({g for _, g in pairs})
