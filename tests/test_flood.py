"""Flood fill: oracle recovery, equality with a plain-NumPy reference, queue and
commit semantics, resuming, bad input."""

from __future__ import annotations

import collections
import dataclasses
import functools

import edt
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from ffnjax import flood
from ffnjax.config import InferenceOptions, ModelConfig, logit
from ffnjax.testing import oracle_apply_fn, oracle_options

TINY = ModelConfig(depth=1, features=4, fov_size=(9, 9, 9), deltas=(2, 2, 2))


# ----------------------------------------------------------------------------
# Synthetic data.


def rod_labels() -> np.ndarray:
    """Rods along x with 5x5 cross-sections (every voxel of a rod lies within a
    FOV radius of any centre inside it, so an oracle fill covers it whole),
    some split in two along x, inside a 4-voxel background border."""
    lab = np.zeros((28, 28, 48), np.uint16)
    k = 1
    for i in range(4):
        for j in range(4):
            z0, y0 = 4 + 5 * i, 4 + 5 * j
            if (i + j) % 3 == 0:
                lab[z0:z0 + 5, y0:y0 + 5, 4:20] = k
                lab[z0:z0 + 5, y0:y0 + 5, 20:44] = k + 1
                k += 2
            else:
                lab[z0:z0 + 5, y0:y0 + 5, 4:44] = k
                k += 1
    return lab


def one_seed_per_object(labels: np.ndarray) -> np.ndarray:
    """The voxel farthest from the object's boundary, per object (ascending id)."""
    dist = edt.edt(np.ascontiguousarray(labels), black_border=True)
    out = []
    for obj in np.unique(labels)[1:]:
        d = np.where(labels == obj, dist, -1)
        out.append(np.unravel_index(np.argmax(d), labels.shape))
    return np.asarray(out, np.int64)


def cell_image(shape=(20, 28, 28), n=10, seed=0, noise=20.0) -> np.ndarray:
    """An EM-like toy image: bright Voronoi cells (200) with dark 2-voxel membranes (50), noise."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1, (n, 3)) * np.array(shape)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    cells = np.argmin(np.linalg.norm(grid[..., None, :] - pts, axis=-1), -1)
    membrane = np.zeros(shape, bool)
    for ax in range(3):
        diff = np.diff(cells, axis=ax) != 0
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[ax], lo[ax] = slice(1, None), slice(None, -1)
        membrane[tuple(hi)] |= diff
        membrane[tuple(lo)] |= diff
    img = np.where(membrane, 50.0, 200.0) + rng.normal(0, noise, shape)
    return ndimage.gaussian_filter(img, 0.7).clip(0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=None)  # one apply_fn object, so compiled fills are reused
def random_net(key: int = 0):
    """A small random network with FFN's signature whose fills actually move.

    The output rises near voxels the mask already believes in (a 5^3 max-pool
    of the mask probability) and follows a random positive 3^3 blur of the
    image, so bright cells fill and dark membranes stop the fill. (A freshly
    initialised convstack hardly ever leaves its seed.)"""
    k = jnp.abs(jax.random.normal(jax.random.PRNGKey(key), (3, 3, 3, 1, 1)))
    params = {"k": k / k.sum()}

    def apply_fn(params, image_fov, mask_logits_fov):
        f = jnp.tanh(jax.lax.conv_general_dilated(
            image_fov, params["k"], (1, 1, 1), "SAME",
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC")))
        s = jax.lax.reduce_window(jax.nn.sigmoid(mask_logits_fov), -jnp.inf, jax.lax.max,
                                  (1, 5, 5, 5, 1), (1, 1, 1, 1, 1), "SAME")
        return 10.0 * s - 9.0 + 8.0 * f

    return params, apply_fn


# ----------------------------------------------------------------------------
# The plain-NumPy reference: google/ffn's Canvas.segment_at / segment_all with
# FaceMaxMovementPolicy, written out with a deque and a set.


def reference_fill(img, seed, net, cfg, opt):
    """Returns (canvas logits with NaN = unvisited, evaluated centres in order)."""
    fov, r, d = np.array(cfg.fov_size), np.array(cfg.fov_radius), np.array(cfg.deltas)
    shape = np.array(img.shape)
    move = np.float32(logit(opt.move_threshold))
    pad = np.float32(logit(opt.pad_value))
    canvas = np.full(img.shape, np.nan, np.float32)
    canvas[tuple(seed)] = np.float32(logit(opt.init_activation))
    queue = collections.deque([tuple(seed)])
    done, evaluated = set(), []
    quant = lambda p: tuple((np.array(p) - seed + d // 2) // np.maximum(d, 1))  # noqa: E731
    while queue:
        pos = np.array(queue.popleft())
        if np.any(pos < r) or np.any(pos >= shape - r):
            continue
        if quant(pos) in done or not canvas[tuple(pos)] >= move:
            continue
        if not canvas[tuple(seed)] >= move:  # the seed got too weak
            break
        if opt.max_steps and len(evaluated) >= opt.max_steps:
            break
        sel = tuple(slice(a - b, a - b + f) for a, b, f in zip(pos, r, fov))
        old = canvas[sel].copy()
        mask = np.where(np.isnan(old), pad, old)
        out = np.asarray(net(img[sel][None, ..., None], mask[None, ..., None]))[0, ..., 0]
        if opt.disconnected_seeds:
            with np.errstate(invalid="ignore"):
                keep = (old < 0) & (out > old)
            out = np.where(keep, old, out)
        canvas[sel] = out
        done.add(quant(pos))
        evaluated.append(tuple(int(v) for v in pos))
        scored = []
        for axis in range(3):
            if d[axis] == 0:
                continue
            for off in (-d[axis], d[axis]):
                fsel = [slice(c - e, c + e + 1) for c, e in zip(r, d)]
                fsel[axis] = r[axis] + off
                face = out[tuple(fsel)]
                i = np.unravel_index(np.argmax(face), face.shape)
                if face[i] >= move:
                    rel = [int(i[0] - face.shape[0] // 2), int(i[1] - face.shape[1] // 2)]
                    rel.insert(axis, int(off))
                    scored.append((float(face[i]), tuple(rel)))
        for _, rel in sorted(scored, reverse=True):
            queue.append(tuple(pos + np.array(rel)))
    return canvas, evaluated


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


def test_oracle_fill_recovers_the_seeded_object_exactly():
    lab = rod_labels()
    opt = oracle_options()
    for seed in [(6, 6, 30), (11, 16, 8), (21, 21, 40)]:
        prob = flood.fill(lab, seed, None, TINY, opt, oracle_apply_fn)
        assert prob.dtype == np.float32 and prob.shape == lab.shape
        np.testing.assert_array_equal(prob >= 0.6, lab == lab[seed])


def test_oracle_segments_the_whole_volume_up_to_relabelling():
    lab = rod_labels()
    seg, info = flood.segment(lab, None, TINY, oracle_options(min_segment_size=10), oracle_apply_fn,
                              seeds=one_seed_per_object(lab), progress=False)
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
    seg, info = flood.segment(lab, None, TINY, oracle_options(min_segment_size=min_size),
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
    seeds = flood.seeds_lib.grid_seeds(img.shape, opt, margin=TINY.fov_radius)
    jnet = jax.jit(lambda i, m: net(params, i, m))
    ref, ref_steps = reference_segment(img, seeds, jnet, TINY, opt)
    seg, info = flood.segment(img, params, TINY, opt, net, seeds=seeds, progress=False)
    assert len(ref_steps) >= 5 and max(ref_steps) >= 8, "the random net should make real fills"
    np.testing.assert_array_equal(seg, ref)
    assert [o.steps for o in info.objects] == ref_steps


def test_fill_trace_and_probabilities_equal_reference():
    img = cell_image()
    params, net = random_net(0)
    opt = InferenceOptions()
    seed = (10, 14, 14)
    prob, trace = flood.fill(img, seed, params, TINY, opt, net, with_trace=True)
    norm = (img.astype(np.float32) - 128) / 33
    canvas, evaluated = reference_fill(norm, np.array(seed), jax.jit(lambda i, m: net(params, i, m)),
                                       TINY, opt)
    assert trace["steps"] == len(evaluated) > 10
    assert [tuple(p) for p in trace["positions"].tolist()] == evaluated
    expect = 1 / (1 + np.exp(-np.where(np.isnan(canvas), logit(opt.pad_value), canvas)))
    np.testing.assert_allclose(prob, expect, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Queue semantics.


def test_no_lattice_cell_is_evaluated_twice_and_moves_follow_face_maxima():
    img = cell_image()
    params, net = random_net(0)
    seed = np.array((10, 14, 14))
    _, trace = flood.fill(img, seed, params, TINY, InferenceOptions(), net, with_trace=True)
    pos = trace["positions"]
    d = np.array(TINY.deltas)
    cells = (pos - seed + d // 2) // d
    assert len({tuple(c) for c in cells}) == len(pos) > 10
    # Every move is one delta along exactly one axis and within +-delta across.
    for p in pos[1:]:
        diffs = np.abs(p[None] - pos)
        ok = [(np.sum(df == dd) >= 1 and np.all(df <= dd))
              for df, dd in zip(diffs, [d] * len(pos))]
        assert any(ok)


@pytest.mark.parametrize("prob, expect_steps", [(0.89, 1), (0.91, None)])
def test_moves_only_when_the_face_maximum_passes_the_threshold(prob, expect_steps):
    """A net answering a constant probability: below the move threshold the fill
    stays at its seed; above it, it covers every lattice cell it can reach."""
    value = logit(prob)
    const = lambda p, i, m: jnp.full(i.shape, value, jnp.float32)  # noqa: E731
    img = np.zeros((15, 15, 15), np.uint8)
    seed = (7, 7, 7)
    _, trace = flood.fill(img, seed, None, TINY, InferenceOptions(init_activation=0.95), const,
                          with_trace=True)
    if expect_steps is not None:
        assert trace["steps"] == expect_steps
    else:
        # Valid centres span 4..10 on each axis: 7 positions, cells of width 2.
        assert trace["steps"] > 1
        spec = flood.FillSpec.from_configs(img.shape, TINY, InferenceOptions())
        assert trace["steps"] <= spec.trace_capacity


def test_step_budget_and_batched_mode():
    img = cell_image()
    params, net = random_net(0)
    seed = (10, 14, 14)
    _, tr = flood.fill(img, seed, params, TINY, InferenceOptions(max_steps=5), net, with_trace=True)
    assert tr["steps"] == 5
    _, full = flood.fill(img, seed, params, TINY, InferenceOptions(), net, with_trace=True)
    assert [tuple(p) for p in tr["positions"]] == [tuple(p) for p in full["positions"][:5]]
    _, b4 = flood.fill(img, seed, params, TINY, InferenceOptions(batch_size=4, max_steps=7), net,
                       with_trace=True)
    assert b4["steps"] == 7
    d = np.array(TINY.deltas)
    cells = {tuple(c) for c in (b4["positions"] - np.array(seed) + d // 2) // d}
    assert len(cells) == 7


def test_queue_capacity_bounds_the_lattice():
    spec = flood.FillSpec.from_configs((20, 28, 28), TINY, InferenceOptions())
    # valid centres: 12, 20, 20 positions per axis -> at most 7, 11, 11 cells of width 2
    assert spec.lattice_shape == (7, 11, 11)
    assert spec.queue_capacity == 1 + 6 * 7 * 11 * 11


# ----------------------------------------------------------------------------
# Commit semantics.


def _canvas(shape, region, inside=3.0):
    c = np.full(shape, np.nan, np.float32)
    c[region] = inside
    return c


def test_earlier_objects_win_and_overlaps_are_recorded():
    seg = np.zeros((10, 10, 10), np.int64)
    seg[:, :, :5] = 7
    opt = InferenceOptions(min_segment_size=1)
    canvas = _canvas(seg.shape, np.s_[2:6, 2:6, 3:8])
    outcome, rec = flood.commit_object(seg, canvas, (3, 3, 6), 8, steps=3, options=opt)
    assert outcome == "committed"
    assert rec.overlaps == {7: 4 * 4 * 2} and rec.voxels == 4 * 4 * 3
    assert np.all(seg[:, :, :5] == 7) and np.all(seg[2:6, 2:6, 5:8] == 8)


def test_small_objects_and_weak_seeds_are_dropped_and_marked():
    opt = InferenceOptions(min_segment_size=30)
    seg = np.zeros((10, 10, 10), np.int64)
    outcome, rec = flood.commit_object(seg, _canvas(seg.shape, np.s_[2:5, 2:5, 2:5]), (3, 3, 3), 1,
                                       steps=2, options=opt)
    assert (outcome, rec) == ("too_small", None)
    assert seg[3, 3, 3] == -1 and np.count_nonzero(seg) == 1
    canvas = _canvas(seg.shape, np.s_[0:8, 0:8, 0:8])
    canvas[5, 5, 5] = logit(0.89)  # below the move threshold
    assert flood.commit_object(seg, canvas, (5, 5, 5), 1, 4, opt)[0] == "seed_too_weak"
    assert seg[5, 5, 5] == -1
    assert flood.commit_object(seg, canvas, (6, 6, 6), 1, 0, opt)[0] == "no_steps"
    assert seg[6, 6, 6] == 0
    # A marked seed voxel is free for later objects.
    outcome, rec = flood.commit_object(seg, canvas, (6, 6, 6), 1, 4, opt)
    assert outcome == "committed" and seg[3, 3, 3] == 1 and rec.voxels == 8 ** 3  # -1 marks included


def test_min_boundary_distance():
    seg = np.zeros((12, 12, 12), np.int64)
    seg[6, 6, 6] = 3
    assert flood.seed_allowed(seg, (6, 6, 6), (0, 0, 0)) == "segmented"
    assert flood.seed_allowed(seg, (6, 6, 8), (1, 1, 1)) is None
    assert flood.seed_allowed(seg, (6, 6, 8), (1, 1, 2)) == "boundary"
    assert flood.seed_allowed(seg, (6, 8, 6), (1, 2, 1)) == "boundary"
    assert flood.seed_allowed(seg, (0, 0, 0), (1, 1, 1)) is None
    # and inside segment(): with a large boundary distance fewer objects start
    img = cell_image()
    params, net = random_net(0)
    seeds = flood.seeds_lib.grid_seeds(img.shape, InferenceOptions(seed_grid_step=(2, 2, 2)),
                                       TINY.fov_radius)
    out = {}
    for mbd in [(0, 0, 0), (3, 3, 3)]:
        opt = InferenceOptions(min_segment_size=20, min_boundary_dist=mbd)
        seg, info = flood.segment(img, params, TINY, opt, net, seeds=seeds, progress=False)
        out[mbd] = info
        m = np.array(mbd)
        for rec in info.objects:
            lo = np.maximum(np.array(rec.seed) - m, 0)
            window = seg[tuple(slice(a, b + 1) for a, b in zip(lo, np.array(rec.seed) + m))]
            others = set(np.unique(window)) - {0, rec.id}
            # objects committed later may come close, earlier ones may not
            assert all(o > rec.id for o in others)
    assert out[(3, 3, 3)].counters["skipped_boundary"] > 0


# ----------------------------------------------------------------------------
# Resuming.


class _Stop(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    img = cell_image()
    params, net = random_net(0)
    opt = InferenceOptions(min_segment_size=20, seed_policy="grid", seed_grid_step=(3, 4, 4))
    full, info = flood.segment(img, params, TINY, opt, net, progress=False)
    assert info.counters["committed"] >= 3
    path = tmp_path / "state.npz"
    saves = []

    def save_then_die(state):
        flood.save_state(path, state)
        saves.append(state.seed_index)
        if len(saves) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        flood.segment(img, params, TINY, opt, net, checkpoint_fn=save_then_die,
                      checkpoint_every_s=0.0, progress=False)
    state = flood.load_state(path)
    assert state.seed_index == saves[-1] and 0 < state.seed_index < len(state.seeds)
    seg, info2 = flood.segment(img, params, TINY, opt, net, state=state, progress=False)
    np.testing.assert_array_equal(seg, full)
    assert [o.to_dict() | {"fill_s": 0} for o in info2.objects] == \
           [o.to_dict() | {"fill_s": 0} for o in info.objects]
    # A state from another run is refused.
    with pytest.raises(ValueError, match="different run"):
        flood.segment(img, params, TINY, InferenceOptions(min_segment_size=21), net,
                      state=flood.load_state(path), progress=False)


def test_consensus_splits_by_intersection():
    a = np.array([[[1, 1, 2, 2, 0]]])
    b = np.array([[[5, 6, 6, 6, 6]]])
    np.testing.assert_array_equal(flood.split_by_intersection(a, b), [[[1, 2, 3, 3, 0]]])
    np.testing.assert_array_equal(flood.split_by_intersection(a, b, min_size=2), [[[0, 0, 1, 1, 0]]])
    lab = rod_labels()
    seg, _ = flood.segment(lab, None, TINY, oracle_options(min_segment_size=10, consensus=True),
                           oracle_apply_fn, seeds=one_seed_per_object(lab), progress=False)
    pairs = set(zip(lab.ravel().tolist(), seg.ravel().tolist()))
    assert len(pairs) == len(np.unique(lab)) == len(np.unique(seg))


def test_contested_consensus_unlabels_small_disputed_pieces_only():
    # Forward: object 1 reaches two voxels into object 2's side; reverse (2 first)
    # gives them to 2. Object 9 of the reverse pass covers objects 3 and 4 of the
    # forward one: both correspond to it, so nothing is split or lost there.
    a = np.array([[[1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 3, 3, 3, 4, 4, 4]]])
    b = np.array([[[7, 7, 7, 7, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9]]])
    got = flood.unlabel_contested(a, b, min_size=3)
    np.testing.assert_array_equal(got, [[[1, 1, 1, 1, 0, 0, 2, 2, 2, 0, 3, 3, 3, 4, 4, 4]]])
    assert got.dtype == np.uint64
    # Same answer for any relabelling of the reverse pass; b = a changes nothing.
    np.testing.assert_array_equal(flood.unlabel_contested(a, (b * 13) % 101, min_size=3), got)
    np.testing.assert_array_equal(flood.unlabel_contested(a, a, min_size=3), a)
    # A disputed piece of at least min_size voxels keeps its forward label...
    np.testing.assert_array_equal(flood.unlabel_contested(a, b, min_size=2), a)
    np.testing.assert_array_equal(flood.unlabel_contested(a, b), a)
    # ...and objects left smaller than min_size are dropped.
    np.testing.assert_array_equal(flood.unlabel_contested(a, b, min_size=4),
                                  [[[1, 1, 1, 1] + [0] * 12]])
    # Through segment(): an oracle fill has no disputes, so consensus keeps it as is.
    lab = rod_labels()
    opts = oracle_options(min_segment_size=10)
    seeds = one_seed_per_object(lab)
    plain, _ = flood.segment(lab, None, TINY, opts, oracle_apply_fn, seeds=seeds, progress=False)
    cons, _ = flood.segment(lab, None, TINY, dataclasses.replace(
        opts, consensus=True, consensus_mode="contested"), oracle_apply_fn, seeds=seeds,
        progress=False)
    np.testing.assert_array_equal(cons, plain)
    with pytest.raises(ValueError, match="consensus_mode"):
        dataclasses.replace(opts, consensus_mode="vote")


# ----------------------------------------------------------------------------
# Bad input.


def test_bad_input_raises_clear_errors():
    params, net = random_net(0)
    with pytest.raises(ValueError, match="smaller than the network's FOV"):
        flood.segment(np.zeros((8, 20, 20), np.uint8), params, TINY, InferenceOptions(), net,
                      progress=False)
    with pytest.raises(ValueError, match="3D"):
        flood.fill(np.zeros((20, 20), np.uint8), (5, 5, 5), params, TINY, InferenceOptions(), net)
    with pytest.raises(ValueError, match="closer than the FOV radius"):
        flood.fill(np.zeros((20, 20, 20), np.uint8), (2, 10, 10), params, TINY, InferenceOptions(), net)
    # A network whose output is not the FOV's shape.
    crop = lambda p, i, m: m[:, 1:-1, 1:-1, 1:-1]  # noqa: E731
    with pytest.raises(ValueError, match="logits of the FOV's shape"):
        flood.segment(np.zeros((20, 20, 20), np.uint8), None, TINY, InferenceOptions(), crop,
                      progress=False)
    # Convstack parameters that do not fit the config.
    other = {"params": {"conv0_a": {"kernel": np.zeros((3, 3, 3, 2, 8), np.float32),
                                    "bias": np.zeros(8, np.float32)}}}
    with pytest.raises(ValueError, match="cannot run on FOVs"):
        flood.segment(np.zeros((20, 20, 20), np.uint8), other, TINY, InferenceOptions(),
                      progress=False)


def test_oracle_on_real_fib25_never_merges_and_covers_most_voxels():
    """Ground truth of a FIB-25 crop as the oracle's image, peaks seeds from the
    raw EM: every segment lies inside one true object, and most voxels are
    reached (FOV moves cannot enter every thin process)."""
    from conftest import shared_path

    root = shared_path("fib25_training_sample2")
    raw = np.load(root / "raw_z000-049.npz")["raw"][:24, :64, :64]
    gt = np.load(root / "groundtruth_z000-149.npz")["labels"][:24, :64, :64]
    seeds = flood.seeds_lib.peaks_seeds(raw, margin=TINY.fov_radius)
    seg, info = flood.segment(gt.astype(np.float32), None, TINY, oracle_options(min_segment_size=100),
                              oracle_apply_fn, seeds=seeds, progress=False)
    for obj in np.unique(seg)[1:]:
        assert len(np.unique(gt[seg == obj])) == 1
    assert (seg > 0).mean() > 0.7  # 0.82 on this crop with FOV 9^3, deltas 2
    assert info.counters["committed"] == len(np.unique(seg)) - 1


def test_a_queue_that_would_overflow_is_reported_not_dropped():
    """With the capacity forced below the lattice bound, the flag trips and run_fill raises."""

    @dataclasses.dataclass(frozen=True)
    class TinyQueue(flood.FillSpec):
        @property
        def queue_capacity(self) -> int:
            return 3

    img = cell_image()
    params, net = random_net(0)
    base = flood.FillSpec.from_configs(img.shape, TINY, InferenceOptions())
    spec = TinyQueue(**dataclasses.asdict(base))
    image_dev = jnp.asarray((img.astype(np.float32) - 128) / 33)
    with pytest.raises(RuntimeError, match="overflowed"):
        flood.run_fill(spec, net, params, image_dev, (10, 14, 14))
    st = flood.run_fill(base, net, params, image_dev, (10, 14, 14))
    assert not bool(st.overflow) and int(st.steps) > 10


_SHARDED_FILL = r"""
import json, numpy as np, jax
from ffnjax import flood, nets
from ffnjax.config import ModelConfig
from ffnjax.testing import oracle_apply_fn, oracle_options
import tests.test_flood as t
cfg = ModelConfig(depth=2, features=4, fov_size=t.TINY.fov_size, deltas=t.TINY.deltas)
params = nets.init_params(cfg, 0)
convstack = nets.make_apply_fn(cfg)
# The oracle drives the fill; a small share of a real convstack's output makes
# the sharded network call carry real convolutions.
net = lambda p, i, m: oracle_apply_fn(p, i, m) + 1e-3 * convstack(p, i, m)
lab = t.rod_labels()
opt = oracle_options(batch_size=2)
seed = (11, 16, 8)
mesh = flood.fill_mesh(2)
a, ta = flood.fill(lab, seed, params, cfg, opt, net, with_trace=True)
flood.fill_mesh = lambda b: None
flood.compiled_fill.cache_clear()
b, tb = flood.fill(lab, seed, params, cfg, opt, net, with_trace=True)
print(json.dumps(dict(devices=jax.device_count(), mesh=None if mesh is None else int(mesh.devices.size),
                      steps=[ta["steps"], tb["steps"]], same=bool(np.array_equal(ta["positions"], tb["positions"])),
                      err=float(np.abs(a - b).max()))))
"""


def test_batched_fill_spread_over_host_devices_equals_one_device():
    """With two host devices a batch of 2 FOVs runs one FOV per device
    (shard_map inside the fill loop) and fills exactly as on one device."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "FFNJAX_HOST_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    r = subprocess.run([sys.executable, "-c", _SHARDED_FILL], capture_output=True, text=True, env=env,
                       cwd=str(Path(__file__).resolve().parents[1]), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2 and out["mesh"] == 2
    assert out["steps"][0] == out["steps"][1] > 4
    assert out["same"]
    assert out["err"] < 1e-6
