"""Movement restriction (`ffnjax.restrict`) and init_segmentation, against
direct constructions: google/ffn's MovementRestrictor and Canvas restated in
NumPy (`test_gffn_parity.canvas_reference`), its build_mask and shift-mask
test written out voxel by voxel."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from ffnjax import restrict, segmentation, seeds as seeds_lib
from ffnjax.config import InferenceOptions
from ffnjax.restrict import MaskChannel, MaskSource, Restriction
from test_flood import TINY, cell_image, random_net
from test_gffn_parity import canvas_reference


def _setup(skip_segmented=True):
    """The toy image, the random net (and jitted for the NumPy Canvas), the
    mode's options and dense seeds (so that fills meet masks and objects)."""
    img = cell_image()
    params, net = random_net(0)
    jnet = jax.jit(lambda i, m: net(params, i, m))
    opt = InferenceOptions.google_ffn(min_segment_size=20, skip_segmented=skip_segmented)
    seeds = seeds_lib.grid_seeds(img.shape, dataclasses.replace(opt, seed_grid_step=(3, 3, 3)),
                                 margin=TINY.fov_radius)
    return img, params, net, jnet, opt, seeds


def _masks(shape):
    """A 3-voxel band across x that no FOV may be centred in (a fill cannot
    step over it with deltas 2), and a corner where no fill may start."""
    mask = np.zeros(shape, bool)
    mask[:, :, 12:15] = True
    seed_mask = np.zeros(shape, bool)
    seed_mask[:10, :12] = True
    return mask, seed_mask


@pytest.mark.parametrize("skip_segmented", [True, False])
def test_masked_fills_equal_google_ffns_restrictor(skip_segmented):
    img, params, net, jnet, opt, seeds = _setup(skip_segmented)
    mask, seed_mask = _masks(img.shape)
    ref, ref_path, _ = canvas_reference(img, seeds, jnet, TINY, opt, move_mask=mask,
                                        seed_mask=seed_mask)
    seg, info = segmentation.segment(img, params, TINY, opt, net, seeds=seeds, progress=False,
                                     record_positions=True,
                                     restriction=Restriction(mask=mask, seed_mask=seed_mask))
    np.testing.assert_array_equal(info.positions, ref_path)
    np.testing.assert_array_equal(seg, ref)
    assert not mask[tuple(info.positions.T)].any(), "a FOV was centred in the mask"
    assert info.counters["skipped_masked"] > 0 and info.counters["committed"] >= 3
    _, free = segmentation.segment(img, params, TINY, opt, net, seeds=seeds, progress=False,
                                   record_positions=True)
    assert mask[tuple(free.positions.T)].any(), "the mask should matter here"


def test_an_empty_restriction_changes_nothing():
    img, params, net, *_ = _setup()
    opt = InferenceOptions(min_segment_size=20, seed_policy="grid", seed_grid_step=(4, 4, 4))
    a, _ = segmentation.segment(img, params, TINY, opt, net, progress=False)
    b, _ = segmentation.segment(img, params, TINY, opt, net, progress=False,
                                restriction=Restriction(mask=np.zeros(img.shape, bool)))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("skip_segmented", [True, False])
def test_init_segmentation_is_kept_and_blocks_new_fills(skip_segmented):
    img, params, net, jnet, opt, seeds = _setup(skip_segmented)
    first, _ = segmentation.segment(img, params, TINY, opt, net, seeds=seeds, progress=False)
    ids, sizes = np.unique(first[first > 0], return_counts=True)
    keep = ids[np.argsort(-sizes)[:2]]
    init = np.zeros(img.shape, np.uint32)
    init[first == keep[0]] = 700
    init[first == keep[1]] = 9
    ref, ref_path, _ = canvas_reference(img, seeds, jnet, TINY, opt, labels=init)
    seg, info = segmentation.segment(img, params, TINY, opt, net, seeds=seeds, progress=False,
                                     record_positions=True, init_segmentation=init)
    np.testing.assert_array_equal(info.positions, ref_path)
    np.testing.assert_array_equal(seg, ref)
    np.testing.assert_array_equal(seg[init > 0], init[init > 0])  # kept, ids and all
    new = np.unique(seg[(seg > 0) & (init == 0)])
    assert len(new) >= 2 and new.min() == 701  # numbered after the largest id
    assert info.counters["skipped_segmented"] > 0
    with pytest.raises(ValueError, match="consensus"):
        segmentation.segment(img, params, TINY, dataclasses.replace(opt, consensus=True), net,
                             seeds=seeds, progress=False, init_segmentation=init)
    with pytest.raises(ValueError, match="shape"):
        segmentation.segment(img, params, TINY, opt, net, seeds=seeds, progress=False,
                             init_segmentation=init[1:])


def _google_build_mask(sources, data_by_spec, image):
    """storage.build_mask written out voxel by voxel (identity alignment)."""
    final = None
    for src in sources:
        vol = image[..., None] if not src.volume else data_by_spec[src.volume]
        if vol.ndim == 3:
            vol = vol[..., None]
        cur = np.zeros(image.shape, bool)
        for idx in np.ndindex(*image.shape):
            for ch in src.channels:
                v = vol[idx][ch.channel]
                hit = (v in ch.values) if ch.values else (ch.min_value <= v <= ch.max_value)
                cur[idx] |= hit != ch.invert
        if src.invert:
            cur = ~cur
        final = cur if final is None else final | cur
    return final


def test_masks_are_built_as_google_ffns_mask_configs(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (6, 7, 8)).astype(np.uint8)
    labels = rng.integers(0, 5, (10, 9, 12)).astype(np.uint16)
    two = rng.normal(0, 3, (10, 9, 12, 2)).astype(np.float32)
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "two.npy", two)
    start, size = (2, 1, 3), image.shape
    box = tuple(slice(a, a + s) for a, s in zip(start, size))
    specs = {str(tmp_path / "labels.npy"): labels[box], str(tmp_path / "two.npy"): two[box]}
    sources = [
        MaskSource.nonzero(str(tmp_path / "labels.npy")),
        MaskSource(str(tmp_path / "labels.npy"), (MaskChannel(values=(2, 4)),), invert=True),
        MaskSource(str(tmp_path / "two.npy"), (MaskChannel(1, -1.0, 2.5),
                                               MaskChannel(0, 0.0, 1.0, invert=True))),
        MaskSource("", (MaskChannel(0, 10, 60),)),
    ]
    for i in range(len(sources)):
        got = restrict.build_mask(sources[i:i + 1], start, size, image)
        np.testing.assert_array_equal(got, _google_build_mask(sources[i:i + 1], specs, image))
    np.testing.assert_array_equal(restrict.build_mask(sources, start, size, image),
                                  _google_build_mask(sources, specs, image))
    assert restrict.build_mask([], start, size, image) is None
    assert not restrict.build_mask([MaskSource(str(tmp_path / "two.npy"))], start, size).any()
    with pytest.raises(ValueError, match="channel 2"):
        restrict.build_mask([MaskSource(str(tmp_path / "two.npy"), (MaskChannel(2, 0, 1),))],
                            start, size)


@pytest.mark.parametrize("scale", [1, 2])
def test_shift_restriction_is_google_ffns_shift_mask_test(scale):
    rng = np.random.default_rng(scale)
    shape = (7, 10, 11)
    coarse = (7, -(-10 // scale), -(-11 // scale))
    shift = rng.integers(-6, 7, (*coarse, 2)).astype(np.float32) * (rng.random((*coarse, 1)) < 0.05)
    fov_start, fov_size, threshold = (-1, -2, -3), (3, 5, 7), 4
    got = restrict.shift_restriction(shift, threshold, fov_start, fov_size, scale, shape)
    # movement.MovementRestrictor.is_valid_pos, position by position.
    bad = np.max(np.abs(shift), axis=-1) >= threshold
    pre = np.array(fov_start)
    post = pre + np.array(fov_size) - 1
    want = np.zeros(shape, bool)
    for pos in np.ndindex(*shape):
        low = np.maximum(np.array(pos) + pre, 0)
        high = np.array(pos) + post
        lo, hi = low // scale, high // scale
        want[pos] = bad[low[0]:high[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1].any()
    assert want.any() and not want.all()
    np.testing.assert_array_equal(got, want)
    r = Restriction(mask=np.zeros(shape, bool), shift=got)
    np.testing.assert_array_equal(r.moves(), got)
    assert r.seeds().sum() == got.sum()
