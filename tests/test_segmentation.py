"""The host side of inference: segmenting whole volumes (oracle, equality with a
plain-NumPy reference), commit semantics and the thresholds it reads, seed
acceptance, resuming, consensus, bad input."""

from __future__ import annotations

import dataclasses

import edt
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffnjax import flood, segmentation, seeds as seeds_lib
from ffnjax.config import InferenceOptions, logit
from ffnjax.consensus import split_by_intersection, unlabel_contested
from ffnjax.testing import oracle_apply_fn, oracle_options
from test_flood import TINY, cell_image, random_net, reference_fill, rod_labels


# ----------------------------------------------------------------------------
# Synthetic data (more in tests/test_flood.py).


def one_seed_per_object(labels: np.ndarray) -> np.ndarray:
    """The voxel farthest from the object's boundary, per object (ascending id)."""
    dist = edt.edt(np.ascontiguousarray(labels), black_border=True)
    out = []
    for obj in np.unique(labels)[1:]:
        d = np.where(labels == obj, dist, -1)
        out.append(np.unravel_index(np.argmax(d), labels.shape))
    return np.asarray(out, np.int64)


# ----------------------------------------------------------------------------
# The plain-NumPy reference of segment_all, around test_flood's reference_fill.


def reference_segment(image, seeds, net, cfg, opt):
    img = ((image.astype(np.float32) - np.float32(opt.image_mean)) / np.float32(opt.image_stddev))
    seg = np.zeros(image.shape, np.int64)
    move = np.float32(logit(opt.move_threshold))
    thr = np.float32(logit(opt.segment_threshold))
    mbd = np.array(opt.min_boundary_dist)
    next_id, all_steps = 1, []
    for seed in np.asarray(seeds):
        if seg[tuple(seed)] != 0:
            continue
        lo = np.maximum(seed - mbd, 0)
        if np.any(seg[tuple(slice(a, b + 1) for a, b in zip(lo, seed + mbd))] > 0):
            continue
        canvas, evaluated = reference_fill(img, seed, net, cfg, opt)
        if not evaluated:
            continue
        if not canvas[tuple(seed)] >= move:
            seg[tuple(seed)] = -1
            continue
        mask = (canvas >= thr) & (seg <= 0)
        if mask.sum() == 0 or mask.sum() < opt.min_segment_size:
            seg[tuple(seed)] = -1
            continue
        seg[mask] = next_id
        next_id += 1
        all_steps.append(len(evaluated))
    return np.maximum(seg, 0).astype(np.uint64), all_steps


# ----------------------------------------------------------------------------
# Oracle.


def test_oracle_segments_the_whole_volume_up_to_relabelling():
    lab = rod_labels()
    seg, info = segmentation.segment(lab, None, TINY, oracle_options(min_segment_size=10),
                                     oracle_apply_fn, seeds=one_seed_per_object(lab),
                                     progress=False)
    assert seg.dtype == np.uint64 and seg.shape == lab.shape
    # A bijection between ground-truth ids and segment ids, background to background.
    pairs = set(zip(lab.ravel().tolist(), seg.ravel().tolist()))
    assert len(pairs) == len(np.unique(lab)) == len(np.unique(seg))
    assert (0, 0) in pairs
    assert info.counters["committed"] == len(np.unique(lab)) - 1
    assert sum(o.voxels for o in info.objects) == int((lab > 0).sum())
    assert all(o.overlaps == {} for o in info.objects)


def test_oracle_drops_objects_below_min_size():
    lab = rod_labels()
    sizes = dict(zip(*np.unique(lab, return_counts=True)))
    min_size = 500  # the 400-voxel pieces go, the others stay
    seg, info = segmentation.segment(lab, None, TINY, oracle_options(min_segment_size=min_size),
                                     oracle_apply_fn, seeds=one_seed_per_object(lab), progress=False)
    kept = {k for k, v in sizes.items() if k != 0 and v >= min_size}
    assert info.counters["too_small"] == len(sizes) - 1 - len(kept)
    for k in sizes:
        if k == 0:
            continue
        if k in kept:
            assert len(np.unique(seg[lab == k])) == 1 and seg[lab == k][0] > 0
        else:
            assert np.all(seg[lab == k] == 0)


# ----------------------------------------------------------------------------
# Reference equality.


@pytest.mark.parametrize("disco", [True, False])
def test_device_loop_equals_numpy_reference(disco):
    img = cell_image()
    params, net = random_net(0)
    opt = InferenceOptions(min_segment_size=20, seed_policy="grid", seed_grid_step=(4, 5, 5),
                           disconnected_seeds=disco, min_boundary_dist=(1, 1, 1))
    seeds = seeds_lib.grid_seeds(img.shape, opt, margin=TINY.fov_radius)
    jnet = jax.jit(lambda i, m: net(params, i, m))
    ref, ref_steps = reference_segment(img, seeds, jnet, TINY, opt)
    seg, info = segmentation.segment(img, params, TINY, opt, net, seeds=seeds, progress=False)
    assert len(ref_steps) >= 5 and max(ref_steps) >= 8, "the random net should make real fills"
    np.testing.assert_array_equal(seg, ref)
    assert [o.steps for o in info.objects] == ref_steps


# ----------------------------------------------------------------------------
# Commit semantics.


def _canvas(shape, region, inside=3.0):
    c = np.full(shape, np.nan, np.float32)
    c[region] = inside
    return c


def commit(seg, canvas, seed, object_id, steps, options):
    """`commit_object` with the thresholds of `options`, as `segment` passes them:
    as logits of the run's FillSpec."""
    spec = flood.FillSpec.from_configs(seg.shape, TINY, options)
    return segmentation.commit_object(seg, canvas, seed, object_id, steps, spec,
                                      options.min_segment_size)


def test_earlier_objects_win_and_overlaps_are_recorded():
    seg = np.zeros((10, 10, 10), np.int64)
    seg[:, :, :5] = 7
    opt = InferenceOptions(min_segment_size=1)
    canvas = _canvas(seg.shape, np.s_[2:6, 2:6, 3:8])
    outcome, rec = commit(seg, canvas, (3, 3, 6), 8, steps=3, options=opt)
    assert outcome == "committed"
    assert rec.overlaps == {7: 4 * 4 * 2} and rec.voxels == 4 * 4 * 3
    assert np.all(seg[:, :, :5] == 7) and np.all(seg[2:6, 2:6, 5:8] == 8)


def test_small_objects_and_weak_seeds_are_dropped_and_marked():
    opt = InferenceOptions(min_segment_size=30)
    seg = np.zeros((10, 10, 10), np.int64)
    outcome, rec = commit(seg, _canvas(seg.shape, np.s_[2:5, 2:5, 2:5]), (3, 3, 3), 1,
                          steps=2, options=opt)
    assert (outcome, rec) == ("too_small", None)
    assert seg[3, 3, 3] == -1 and np.count_nonzero(seg) == 1
    canvas = _canvas(seg.shape, np.s_[0:8, 0:8, 0:8])
    canvas[5, 5, 5] = logit(0.89)  # below the move threshold
    assert commit(seg, canvas, (5, 5, 5), 1, 4, opt)[0] == "seed_too_weak"
    assert seg[5, 5, 5] == -1
    assert commit(seg, canvas, (6, 6, 6), 1, 0, opt)[0] == "no_steps"
    assert seg[6, 6, 6] == 0
    # A marked seed voxel is free for later objects.
    outcome, rec = commit(seg, canvas, (6, 6, 6), 1, 4, opt)
    assert outcome == "committed" and seg[3, 3, 3] == 1 and rec.voxels == 8 ** 3  # -1 marks included


def test_min_boundary_distance():
    seg = np.zeros((12, 12, 12), np.int64)
    seg[6, 6, 6] = 3
    assert segmentation.seed_allowed(seg, (6, 6, 6), (0, 0, 0)) == "segmented"
    assert segmentation.seed_allowed(seg, (6, 6, 8), (1, 1, 1)) is None
    assert segmentation.seed_allowed(seg, (6, 6, 8), (1, 1, 2)) == "boundary"
    assert segmentation.seed_allowed(seg, (6, 8, 6), (1, 2, 1)) == "boundary"
    assert segmentation.seed_allowed(seg, (0, 0, 0), (1, 1, 1)) is None
    # and inside segment(): with a large boundary distance fewer objects start
    img = cell_image()
    params, net = random_net(0)
    seeds = seeds_lib.grid_seeds(img.shape, InferenceOptions(seed_grid_step=(2, 2, 2)),
                                 TINY.fov_radius)
    out = {}
    for mbd in [(0, 0, 0), (3, 3, 3)]:
        opt = InferenceOptions(min_segment_size=20, min_boundary_dist=mbd)
        seg, info = segmentation.segment(img, params, TINY, opt, net, seeds=seeds, progress=False)
        out[mbd] = info
        m = np.array(mbd)
        for rec in info.objects:
            lo = np.maximum(np.array(rec.seed) - m, 0)
            window = seg[tuple(slice(a, b + 1) for a, b in zip(lo, np.array(rec.seed) + m))]
            others = set(np.unique(window)) - {0, rec.id}
            # objects committed later may come close, earlier ones may not
            assert all(o > rec.id for o in others)
    assert out[(3, 3, 3)].counters["skipped_boundary"] > 0


def test_thresholds_are_converted_to_logits_once_in_the_fill_spec():
    opt = InferenceOptions(init_activation=0.97, pad_value=0.02, move_threshold=0.8,
                           segment_threshold=0.7)
    spec = flood.FillSpec.from_configs((12, 12, 12), TINY, opt)
    assert (spec.init_logit, spec.pad_logit, spec.move_logit, spec.segment_logit) == \
           (logit(0.97), logit(0.02), logit(0.8), logit(0.7))
    # The segment logit is read on the host only: specs differing only there
    # share one compiled fill.
    other = dataclasses.replace(spec, segment_logit=5.0)
    assert other == spec and hash(other) == hash(spec)
    # The host side converts no threshold itself.
    assert not hasattr(segmentation, "logit")


def test_commit_reads_the_spec_logits():
    """A spec with a different segment (or move) logit changes what is committed,
    for the same options: commit_object takes its thresholds from the spec."""
    opt = InferenceOptions(min_segment_size=1)
    canvas = _canvas((10, 10, 10), np.s_[2:8, 2:8, 2:8], inside=1.0)
    canvas[3:5, 3:5, 3:5] = 3.0
    spec = flood.FillSpec.from_configs(canvas.shape, TINY, opt)
    assert spec.segment_logit == logit(opt.segment_threshold) < 1.0
    loose = np.zeros(canvas.shape, np.int64)
    outcome, rec = segmentation.commit_object(loose, canvas, (4, 4, 4), 1, 2, spec, 1)
    assert outcome == "committed" and rec.voxels == 6 ** 3
    strict = np.zeros(canvas.shape, np.int64)
    outcome, rec = segmentation.commit_object(strict, canvas, (4, 4, 4), 1, 2,
                                              dataclasses.replace(spec, segment_logit=2.0), 1)
    assert outcome == "committed" and rec.voxels == 2 ** 3
    np.testing.assert_array_equal(strict > 0, canvas >= 2.0)
    weak = np.zeros(canvas.shape, np.int64)
    outcome, _ = segmentation.commit_object(weak, canvas, (4, 4, 4), 1, 2,
                                            dataclasses.replace(spec, move_logit=4.0), 1)
    assert outcome == "seed_too_weak"


# ----------------------------------------------------------------------------
# Resuming.


class _Stop(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    img = cell_image()
    params, net = random_net(0)
    opt = InferenceOptions(min_segment_size=20, seed_policy="grid", seed_grid_step=(3, 4, 4))
    full, info = segmentation.segment(img, params, TINY, opt, net, progress=False)
    assert info.counters["committed"] >= 3
    path = tmp_path / "state.npz"
    saves = []

    def save_then_die(state):
        segmentation.save_state(path, state)
        saves.append(state.seed_index)
        if len(saves) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        segmentation.segment(img, params, TINY, opt, net, checkpoint_fn=save_then_die,
                             checkpoint_every_s=0.0, progress=False)
    state = segmentation.load_state(path)
    assert state.seed_index == saves[-1] and 0 < state.seed_index < len(state.seeds)
    seg, info2 = segmentation.segment(img, params, TINY, opt, net, state=state, progress=False)
    np.testing.assert_array_equal(seg, full)
    assert [o.to_dict() | {"fill_s": 0} for o in info2.objects] == \
           [o.to_dict() | {"fill_s": 0} for o in info.objects]
    # A state from another run is refused.
    with pytest.raises(ValueError, match="different run"):
        segmentation.segment(img, params, TINY, InferenceOptions(min_segment_size=21), net,
                             state=segmentation.load_state(path), progress=False)


def test_consensus_splits_by_intersection():
    a = np.array([[[1, 1, 2, 2, 0]]])
    b = np.array([[[5, 6, 6, 6, 6]]])
    np.testing.assert_array_equal(split_by_intersection(a, b), [[[1, 2, 3, 3, 0]]])
    np.testing.assert_array_equal(split_by_intersection(a, b, min_size=2), [[[0, 0, 1, 1, 0]]])
    lab = rod_labels()
    seg, info = segmentation.segment(lab, None, TINY, oracle_options(min_segment_size=10,
                                                                      consensus=True),
                                     oracle_apply_fn, seeds=one_seed_per_object(lab),
                                     progress=False)
    pairs = set(zip(lab.ravel().tolist(), seg.ravel().tolist()))
    assert len(pairs) == len(np.unique(lab)) == len(np.unique(seg))
    # The counters add both passes up (each object committed twice), and say so.
    assert info.passes == 2 and info.counters["committed"] == 2 * (len(np.unique(seg)) - 1)
    assert info.summary().startswith("2 consensus passes together")


def test_contested_consensus_unlabels_small_disputed_pieces_only():
    # Forward: object 1 reaches two voxels into object 2's side; reverse (2 first)
    # gives them to 2. Object 9 of the reverse pass covers objects 3 and 4 of the
    # forward one: both correspond to it, so nothing is split or lost there.
    a = np.array([[[1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 3, 3, 3, 4, 4, 4]]])
    b = np.array([[[7, 7, 7, 7, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9]]])
    got = unlabel_contested(a, b, min_size=3)
    np.testing.assert_array_equal(got, [[[1, 1, 1, 1, 0, 0, 2, 2, 2, 0, 3, 3, 3, 4, 4, 4]]])
    assert got.dtype == np.uint64
    # Same answer for any relabelling of the reverse pass; b = a changes nothing.
    np.testing.assert_array_equal(unlabel_contested(a, (b * 13) % 101, min_size=3), got)
    np.testing.assert_array_equal(unlabel_contested(a, a, min_size=3), a)
    # A disputed piece of at least min_size voxels keeps its forward label...
    np.testing.assert_array_equal(unlabel_contested(a, b, min_size=2), a)
    np.testing.assert_array_equal(unlabel_contested(a, b), a)
    # ...and objects left smaller than min_size are dropped.
    np.testing.assert_array_equal(unlabel_contested(a, b, min_size=4),
                                  [[[1, 1, 1, 1] + [0] * 12]])
    # Through segment(): an oracle fill has no disputes, so consensus keeps it as is.
    lab = rod_labels()
    opts = oracle_options(min_segment_size=10)
    seeds = one_seed_per_object(lab)
    plain, _ = segmentation.segment(lab, None, TINY, opts, oracle_apply_fn, seeds=seeds, progress=False)
    cons, _ = segmentation.segment(lab, None, TINY, dataclasses.replace(
        opts, consensus=True, consensus_mode="contested"), oracle_apply_fn, seeds=seeds,
        progress=False)
    np.testing.assert_array_equal(cons, plain)
    with pytest.raises(ValueError, match="consensus_mode"):
        dataclasses.replace(opts, consensus_mode="vote")


# ----------------------------------------------------------------------------
# Bad input (see tests/test_flood.py for what fill() rejects).


def test_bad_input_raises_clear_errors():
    params, net = random_net(0)
    with pytest.raises(ValueError, match="smaller than the network's FOV"):
        segmentation.segment(np.zeros((8, 20, 20), np.uint8), params, TINY, InferenceOptions(), net,
                             progress=False)
    # A network whose output is not the FOV's shape.
    crop = lambda p, i, m: m[:, 1:-1, 1:-1, 1:-1]  # noqa: E731
    with pytest.raises(ValueError, match="logits of the FOV's shape"):
        segmentation.segment(np.zeros((20, 20, 20), np.uint8), None, TINY, InferenceOptions(), crop,
                             progress=False)
    # Convstack parameters that do not fit the config.
    other = {"params": {"conv0_a": {"kernel": np.zeros((3, 3, 3, 2, 8), np.float32),
                                    "bias": np.zeros(8, np.float32)}}}
    with pytest.raises(ValueError, match="cannot run on FOVs"):
        segmentation.segment(np.zeros((20, 20, 20), np.uint8), other, TINY, InferenceOptions(),
                             progress=False)


def test_oracle_on_real_fib25_never_merges_and_covers_most_voxels():
    """Ground truth of a FIB-25 crop as the oracle's image, peaks seeds from the
    raw EM: every segment lies inside one true object, and most voxels are
    reached (FOV moves cannot enter every thin process)."""
    from conftest import shared_path

    root = shared_path("fib25_training_sample2")
    raw = np.load(root / "raw_z000-049.npz")["raw"][:24, :64, :64]
    gt = np.load(root / "groundtruth_z000-149.npz")["labels"][:24, :64, :64]
    seeds = seeds_lib.peaks_seeds(raw, margin=TINY.fov_radius)
    seg, info = segmentation.segment(gt.astype(np.float32), None, TINY,
                                     oracle_options(min_segment_size=100), oracle_apply_fn,
                                     seeds=seeds, progress=False)
    for obj in np.unique(seg)[1:]:
        assert len(np.unique(gt[seg == obj])) == 1
    assert (seg > 0).mean() > 0.7  # 0.82 on this crop with FOV 9^3, deltas 2
    assert info.counters["committed"] == len(np.unique(seg)) - 1


def test_progress_inside_fills_changes_nothing_and_compile_is_timed_apart(capsys):
    """With the bar on, fills run in bounded pieces that report FOV steps as they
    happen; the segmentation is the one without the bar. Compilation is timed by
    a fill bounded at zero steps, apart from the first fill."""
    img = cell_image()
    params, jnet = random_net(0)
    opt = InferenceOptions(min_segment_size=5)
    flood.compiled_fill.cache_clear()
    flood.fill_stepper.cache_clear()
    quiet, info_q = segmentation.segment(img, params, TINY, opt, jnet, progress=False)
    shown, info_s = segmentation.segment(img, params, TINY, opt, jnet, progress=True)
    np.testing.assert_array_equal(quiet, shown)
    assert info_q.counters == info_s.counters
    err = capsys.readouterr().err
    assert f"FOV steps={info_s.counters['fov_steps']:,}" in err
    t = info_q.timings
    assert {"compile", "first_fill", "fill"} <= set(t)
    # The first run compiled; the second found the executable cached.
    assert t["compile"] > 0 and info_s.timings["compile"] < t["compile"]
    assert "compile" in info_q.summary() and "first fill" in info_q.summary()


def test_a_run_that_commits_nothing_says_what_to_try():
    img = cell_image()
    params, jnet = random_net(0)
    strict = InferenceOptions(min_segment_size=10 ** 6)
    _, info = segmentation.segment(img, params, TINY, strict, jnet, progress=False)
    assert info.counters["committed"] == 0 and info.counters["too_small"] > 0
    assert "--min-segment-size" in info.hint() and info.summary().endswith(info.hint())
    # A net that drives every voxel down: each seed ends below the move threshold.
    sink = lambda p, i, m: jnp.full(i.shape, -5.0, jnp.float32)  # noqa: E731
    _, info = segmentation.segment(img, None, TINY, InferenceOptions(), sink, progress=False)
    assert info.counters["committed"] == 0 and info.counters["seed_too_weak"] > 0
    assert "undertrained" in info.hint()
    ok, info = segmentation.segment(img, params, TINY, InferenceOptions(min_segment_size=5), jnet,
                                    progress=False)
    assert info.counters["committed"] > 0 and info.hint() == ""


def _info(passes=1, **counts):
    counters = {**dict.fromkeys(segmentation.COUNTER_NAMES, 0), **counts}
    timings = dict.fromkeys(("seeds", "compile", "first_fill", "fill", "commit", "total"), 0.0)
    return segmentation.SegmentInfo(objects=[], counters=counters, timings=timings, num_seeds=30,
                                    passes=passes)


def test_too_weak_says_what_it_means_and_what_to_try():
    # The summary names the threshold behind each count of dropped fills.
    info = _info(fills=10, committed=8, seed_too_weak=2)
    assert "2 whose seed ended below --move-threshold ('too weak')" in info.summary()
    assert "under --min-segment-size voxels ('too small')" in info.summary()
    assert info.hint() == ""  # most fills were kept: nothing to say
    # More weak fills than objects: what it means (the net did not believe in its
    # own seed) and what to try, even though some objects were kept.
    hint = _info(fills=10, committed=3, seed_too_weak=7).hint()
    assert "too weak (7) than kept (3)" in hint and "inside an object" in hint
    for remedy in ("train longer", "--image-mean", "lower --move-threshold"):
        assert remedy in hint
    assert "--move-threshold" in _info(fills=4, seed_too_weak=4).hint()


def test_consensus_summary_says_its_counts_add_both_passes():
    # With consensus the counters add the forward and reverse passes up; the
    # summary says so, so that no one reads them as the final segmentation's.
    one = _info(fills=5, committed=5, voxels=900).summary()
    two = _info(passes=2, fills=10, committed=10, voxels=1800).summary()
    assert one.startswith("5 objects, 900 voxels from 30 seeds")
    assert two.startswith("2 consensus passes together committed 10 objects, 1800 voxels "
                          "(before the consensus combines them) from 30 seeds each")
