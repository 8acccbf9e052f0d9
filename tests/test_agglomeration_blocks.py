"""Block-wise agglomeration equals the whole-volume one: decision points per
block (with and without a distance), pair scores read from windows of volumes,
the merge graph, and the output written block by block."""

from __future__ import annotations

import numpy as np
import pytest

from ffnjax import agglomeration as ag
from ffnjax import agglomeration_blocks as ab
from ffnjax import decision_points as dp
from ffnjax.testing import oracle_apply_fn, oracle_options
from ffnjax.volumes import create_volume, read_all, save_volume

from tests.test_agglomeration import CONFIG, TINY, cut_scene, random_segmentation


def _key(points):
    return [(p.a, p.b, p.point, p.contact, round(p.gap, 5), round(p.clearance, 4)) for p in points]


@pytest.mark.parametrize("seed, shape, n, block, options", [
    (0, (12, 20, 22), 9, (5, 7, 8), dp.DecisionPointOptions(clearance_cap=3.0)),
    (1, (12, 20, 22), 12, (4, 4, 4), dp.DecisionPointOptions(clearance_cap=5.0)),
    (2, (14, 18, 20), 9, (6, 5, 20), dp.DecisionPointOptions(max_distance=1.5, clearance_cap=4.0)),
    (3, (10, 16, 16), 7, (3, 16, 5), dp.DecisionPointOptions(min_contact=4, clearance_cap=6.0)),
])
def test_decision_points_per_block_equal_the_whole_volume(seed, shape, n, block, options):
    seg = random_segmentation(seed, shape, n)
    whole = dp.find_decision_points(seg, (1, 1, 1), options)
    assert len(whole) >= 10
    cores = ab.block_cores(shape, block)
    assert len(cores) > 4
    assert _key(ab.decision_points_by_block(seg, block, (1, 1, 1), options)) == _key(whole)


def test_decision_points_per_block_with_anisotropy_and_threads():
    seg = random_segmentation(5, (9, 24, 24), 10)
    options = dp.DecisionPointOptions(clearance_cap=4.0)
    whole = dp.find_decision_points(seg, (3, 1, 1), options)
    blocks = ab.decision_points_by_block(seg, (4, 9, 9), (3, 1, 1), options, engine="threads")
    assert _key(blocks) == _key(whole)


def test_blockwise_agglomeration_equals_the_whole_volume_run(tmp_path):
    gt, seg = cut_scene()
    seg = seg.astype(np.uint64)
    image_spec, seg_spec = str(tmp_path / "image.zarr"), str(tmp_path / "seg.zarr")
    save_volume(image_spec, gt.astype(np.float32))
    save_volume(seg_spec, seg)
    whole = ag.agglomerate(gt, seg, None, TINY, oracle_options(), oracle_apply_fn,
                           config=CONFIG, progress=False)
    results = tmp_path / "scores.jsonl"
    blocks = ab.agglomerate_blocks(image_spec, seg_spec, None, TINY, oracle_options(),
                                   block=(16, 20, 20), config=CONFIG, results_path=results,
                                   pairs_per_task=1, progress=False, apply_fn=oracle_apply_fn)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(blocks.rows) == strip(whole.rows) and blocks.merges == whole.merges == [(1, 5)]
    # Every pair was appended as it was scored; a rerun scores none again.
    assert len(results.read_text().splitlines()) == 1 + len(whole.points)
    again = ab.agglomerate_blocks(image_spec, seg_spec, None, TINY, oracle_options(),
                                  block=(16, 20, 20), config=CONFIG, results_path=results,
                                  progress=False, apply_fn=oracle_apply_fn)
    assert again.scored == 0 and again.merges == whole.merges
    out = str(tmp_path / "out.zarr")
    create_volume(out, seg.shape, np.uint64)
    ab.relabel_blocks(seg_spec, out, ag.merge_mapping(blocks.merges), (16, 20, 20))
    np.testing.assert_array_equal(read_all(out), whole.labels)


def test_a_coarse_model_agglomerates_at_its_scale_and_merges_native_ids(tmp_path):
    # The cut scene's boundaries lie on even voxels, so a 2x block mean keeps every object exact.
    import dataclasses

    gt, seg = cut_scene()
    options = dataclasses.replace(oracle_options(), downsample=(2, 2, 2))
    coarse = ag.agglomerate(gt, seg, None, TINY, options, oracle_apply_fn, config=CONFIG,
                            progress=False)
    assert coarse.merges == [(1, 5)]
    assert all(max(p.point) < 24 for p in coarse.points)          # coarse coordinates
    np.testing.assert_array_equal(coarse.labels, ag.merge_labels(seg, [(1, 5)]))
    with pytest.raises(ValueError, match="downsample"):
        ab.agglomerate_blocks(gt, seg, None, TINY, options, block=(16, 20, 20), config=CONFIG,
                              progress=False, apply_fn=oracle_apply_fn)
