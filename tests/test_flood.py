"""The device fill of one object: oracle recovery, equality with a plain-NumPy
reference, queue semantics, the thresholds the loop reads, overflow, bad input,
a fill spread over host devices.

The synthetic data, the random net and the NumPy reference fill defined here
are shared with tests/test_segmentation.py (the host side) and
tests/test_segment_cli.py.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

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


def moving_convstack(config: ModelConfig, key: int = 0, kernel_scale: float = 8.0,
                     bias: float = 4.0) -> dict:
    """Random convstack parameters (NumPy) whose fills move: the output layer
    scaled by `kernel_scale` and shifted by `bias` (a plain initialisation
    hardly ever leaves its seed)."""
    from ffnjax.nets import init_params
    params = jax.jit(lambda k: init_params(config, k))(jax.random.PRNGKey(key))  # jit: fast
    params = jax.tree_util.tree_map(np.asarray, params)
    lom = params["params"]["conv_lom"]
    lom["kernel"], lom["bias"] = lom["kernel"] * kernel_scale, lom["bias"] + bias
    return params


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


# ----------------------------------------------------------------------------
# Oracle.


def test_oracle_fill_recovers_the_seeded_object_exactly():
    lab = rod_labels()
    opt = oracle_options()
    for seed in [(6, 6, 30), (11, 16, 8), (21, 21, 40)]:
        prob = flood.fill(lab, seed, None, TINY, opt, oracle_apply_fn)
        assert prob.dtype == np.float32 and prob.shape == lab.shape
        np.testing.assert_array_equal(prob >= 0.6, lab == lab[seed])


# ----------------------------------------------------------------------------
# Reference equality.


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



def test_deleted_voxels_are_counted_per_evaluation():
    """google/ffn's `history_deleted`: a net that answers 0.05 wherever the
    canvas already holds >= 0.8 (0.95 elsewhere and at its FOV centre) deletes,
    at its second evaluation, the overlap of the two FOVs less that centre;
    the seed then falls below the move threshold and the fill stops."""
    hi, lo = logit(0.95), logit(0.05)

    def flip(params, img, mask):
        out = jnp.where(mask >= logit(0.8), lo, hi)
        z, y, x = (s // 2 for s in mask.shape[1:4])
        return out.at[:, z, y, x, :].set(hi)

    opt = InferenceOptions(image_mean=0.0, image_stddev=1.0)
    img = np.zeros((20, 20, 20), np.float32)
    _, trace = flood.fill(img, (10, 10, 10), None, TINY, opt, flip, with_trace=True)
    pos = trace["positions"]
    assert len(pos) == 2
    overlap = int(np.prod(np.maximum(0, np.array(TINY.fov_size) - np.abs(pos[1] - pos[0]))))
    assert overlap > 100 and trace["deleted"].tolist() == [0, overlap - 1]
    spec = flood.FillSpec.from_configs(img.shape, TINY, opt)
    assert int(flood.run_fill(spec, flip, None, jnp.asarray(img), (10, 10, 10)).deleted) == overlap - 1

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


def test_the_device_loop_reads_the_move_logit_of_its_spec():
    """The loop compares against `FillSpec.move_logit` (converted once from the
    options): the same constant net moves or stays with the spec's logit alone."""
    value = logit(0.91)
    const = lambda p, i, m: jnp.full(i.shape, value, jnp.float32)  # noqa: E731
    image_dev = jnp.zeros((15, 15, 15), jnp.float32)
    spec = flood.FillSpec.from_configs(image_dev.shape, TINY, InferenceOptions(init_activation=0.95))
    assert spec.move_logit == logit(0.9)
    assert int(flood.run_fill(spec, const, None, image_dev, (7, 7, 7)).steps) > 1
    stricter = dataclasses.replace(spec, move_logit=logit(0.92))
    assert int(flood.run_fill(stricter, const, None, image_dev, (7, 7, 7)).steps) == 1


@pytest.mark.parametrize("every", [1, 5])
def test_a_fill_cut_into_bounded_runs_is_the_same_fill(every):
    """run_fill with `report` runs the loop in pieces of `every` steps (progress
    inside one long fill); the result is the one-shot fill's, bit for bit."""
    img = cell_image()
    params, net = random_net(0)
    spec = flood.FillSpec.from_configs(img.shape, TINY, InferenceOptions(batch_size=2), trace=True)
    image_dev = jnp.asarray((img.astype(np.float32) - 128) / 33)
    whole = flood.run_fill(spec, net, params, image_dev, (10, 14, 14))
    seen = []
    cut = flood.run_fill(spec, net, params, image_dev, (10, 14, 14), report=seen.append,
                         every=every)
    assert int(whole.steps) > 10
    for a, b in zip(whole, cut):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Reports rise in pieces of `every` (a batch of 2 may pass a bound by one) up to the end.
    assert seen == sorted(seen) and seen[-1] == int(whole.steps)
    assert len(seen) >= int(whole.steps) // (every + 1)
    assert all(b - a <= every + 1 for a, b in zip([0] + seen, seen))


def test_a_bound_of_zero_compiles_without_evaluating_a_fov():
    img = cell_image()
    params, net = random_net(0)
    spec = flood.FillSpec.from_configs(img.shape, TINY, InferenceOptions())
    image_dev = jnp.asarray((img.astype(np.float32) - 128) / 33)
    start, resume = flood.fill_stepper(spec, net)
    st, alive = resume(params, image_dev, (10, 14, 14), start((10, 14, 14)), 0)
    assert int(st.steps) == 0 and int(st.calls) == 0 and bool(alive)


# ----------------------------------------------------------------------------
# Bad input (see tests/test_segmentation.py for what segment() rejects).


def test_fill_rejects_bad_input():
    params, net = random_net(0)
    with pytest.raises(ValueError, match="3D"):
        flood.fill(np.zeros((20, 20), np.uint8), (5, 5, 5), params, TINY, InferenceOptions(), net)
    with pytest.raises(ValueError, match="closer than the FOV radius"):
        flood.fill(np.zeros((20, 20, 20), np.uint8), (2, 10, 10), params, TINY, InferenceOptions(), net)


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
flood.fill_mesh = lambda *a: None
flood.compiled_fill.cache_clear()
flood.fill_stepper.cache_clear()
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
