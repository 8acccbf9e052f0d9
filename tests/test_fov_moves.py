"""FOV moves inside an example (`ffnjax.fov_moves`): the two movement policies,
packed slots, the move cap, and gradients that stop between moves."""

from __future__ import annotations

import dataclasses
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffnjax.config import ModelConfig, TrainConfig, logit
from ffnjax.fov_moves import fov_starts, lattice_offsets, move_orders, run_fovs
from ffnjax.nets import make_apply_fn
from ffnjax.step import init_state, make_optimizer

TINY = ModelConfig(depth=1, features=4, fov_size=(5, 5, 5), deltas=(2, 2, 2))
THR = logit(0.9)


def image_as_logits(params, image_fov, mask_logits_fov):
    """A stand-in net whose output logits are its image: the canvas then holds
    the image wherever an FOV was evaluated, so moves can be predicted by hand."""
    del params, mask_logits_fov
    return image_fov


def _random_logit_batch(config: TrainConfig, b: int, seed: int, p_high: float) -> dict:
    rng = np.random.default_rng(seed)
    high = rng.random((b, *config.crop_size, 1)) < p_high
    image = np.where(high, 4.0, -4.0).astype(np.float32)
    return dict(image=image, target=(image > 0).astype(np.float32),
                weight=np.ones_like(image))


def test_fixed_policy_moves_only_where_canvas_passes_threshold():
    config = TrainConfig(model=TINY, fov_moves=1, move_policy="fixed")
    batch = _random_logit_batch(config, 4, seed=0, p_high=0.5)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    order = np.asarray(move_orders(keys, 1))
    out = run_fovs(image_as_logits, None, batch, jnp.asarray(order), config, with_grad=False)
    taken, positions = np.asarray(out["taken"]), np.asarray(out["positions"])
    centres = fov_starts(config) + np.array(TINY.fov_radius)
    for b in range(4):
        assert order[b, 0] == 13 and sorted(order[b]) == list(range(27))
        # Every neighbour centre lies in the centre FOV, whose output is the image.
        expect = {13} | {p for p in range(27) if batch["image"][b, *centres[p], 0] > THR}
        # Taken slots come first (packed), visiting the expected positions in
        # the example's order; the rest of the slots are idle.
        n = len(expect)
        assert taken[b, :n].all() and not taken[b, n:].any()
        assert [int(p) for p in positions[b, :n]] == [int(p) for p in order[b] if p in expect]
        # The canvas holds the image on every evaluated FOV and the pad value elsewhere.
        seen = np.zeros(config.crop_size, bool)
        for p in expect:
            s = fov_starts(config)[p]
            seen[s[0]:s[0] + 5, s[1]:s[1] + 5, s[2]:s[2] + 5] = True
        canvas = np.asarray(out["canvas"])[b, ..., 0]
        np.testing.assert_array_equal(canvas[seen], batch["image"][b, ..., 0][seen])
        np.testing.assert_allclose(canvas[~seen], logit(0.05), rtol=1e-6)
    # Different examples get different shuffles.
    assert len({tuple(o) for o in order}) > 1


def _bfs_reference(image: np.ndarray, config: TrainConfig) -> list[int]:
    """google/ffn's max_pred_moves in plain Python on the lattice: FIFO queue;
    the faces at +-delta, each restricted to the +-delta square around the
    centre; a face moves when its maximum reaches the threshold."""
    offsets = [tuple(o) for o in lattice_offsets(config.fov_moves)]
    starts = fov_starts(config)
    m = config.model
    fov, r, d = m.fov_size, m.fov_radius, m.deltas
    centre = len(offsets) // 2
    queue, queued, visited = deque([centre]), {centre}, []
    while queue:
        p = queue.popleft()
        visited.append(p)
        s = starts[p]
        pred = image[s[0]:s[0] + fov[0], s[1]:s[1] + fov[1], s[2]:s[2] + fov[2]]
        for axis in range(3):
            for sign in (-1, 1):
                sel = [slice(r[a] - d[a], r[a] + d[a] + 1) for a in range(3)]
                sel[axis] = r[axis] + sign * d[axis]
                face = pred[tuple(sel)]
                q = list(offsets[p])
                q[axis] += sign
                if face.max() >= THR and tuple(q) in offsets and offsets.index(tuple(q)) not in queued:
                    queued.add(offsets.index(tuple(q)))
                    queue.append(offsets.index(tuple(q)))
    return visited


# The +-delta square is smaller than the FOV's plane: the face rule differs
# from a whole-plane maximum here (with TINY the square is the whole plane).
WIDE = ModelConfig(depth=1, features=4, fov_size=(7, 7, 7), deltas=(2, 2, 2))


@pytest.mark.parametrize("model", [TINY, WIDE], ids=["square_is_plane", "square_inside_plane"])
def test_max_pred_moves_follow_the_face_rule(model):
    config = TrainConfig(model=model, fov_moves=1, move_policy="max_pred_moves")
    batch = _random_logit_batch(config, 6, seed=1, p_high=0.02)
    out = run_fovs(image_as_logits, None, batch, jnp.zeros((6, 27), jnp.int32), config,
                   with_grad=False)
    taken, positions = np.asarray(out["taken"]), np.asarray(out["positions"])
    lengths = []
    for b in range(6):
        ref = _bfs_reference(batch["image"][b, ..., 0], config)
        got = [int(p) for p, t in zip(positions[b], taken[b]) if t]
        assert got == ref
        lengths.append(len(ref))
    assert min(lengths) < max(lengths)          # the batch exercises different move counts


def test_max_pred_moves_ignore_the_plane_outside_the_delta_square():
    """google/ffn's face is the +-delta square, not the whole plane: a high
    voxel on the centre FOV's +x plane but 3 > delta voxels off in y queues no
    move; one inside the -z face's square does."""
    config = TrainConfig(model=WIDE, fov_moves=1, move_policy="max_pred_moves")
    c = config.crop_size[0] // 2                                     # 5: crop 11^3
    image = np.full((1, *config.crop_size, 1), -4.0, np.float32)
    image[0, c, c + 3, c + 2, 0] = 4.0                               # +x plane, outside the square
    image[0, c - 2, c + 1, c - 1, 0] = 4.0                           # -z face, inside the square
    batch = dict(image=image, target=(image > 0).astype(np.float32), weight=np.ones_like(image))
    out = run_fovs(image_as_logits, None, batch, jnp.zeros((1, 27), jnp.int32), config,
                   with_grad=False)
    taken, positions = np.asarray(out["taken"])[0], np.asarray(out["positions"])[0]
    # Lattice index of offset (dz, dy, dx) is 9 * (dz + 1) + 3 * (dy + 1) + (dx + 1).
    assert [int(p) for p, t in zip(positions, taken) if t] == [13, 4]
    assert _bfs_reference(image[0, ..., 0], config) == [13, 4]


def _moving_apply_fn(config: ModelConfig):
    """The real net plus 3x the image: image blobs drive the moves."""
    net = make_apply_fn(config)
    return lambda p, img, m: net(p, img, m) + 3.0 * img


def _fov_loss_and_grad(apply_fn):
    """`(p, image, mask, target, weight) -> ((loss_sum, logits), grad)` of one FOV,
    its mask input held fixed: the host-side reference for the scan's slots."""
    import optax

    @jax.jit
    def fov_grad(p, img, msk, tgt, w):
        def loss(p):
            logits = apply_fn(p, img, msk)
            return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, tgt) * w), logits
        return jax.value_and_grad(loss, has_aux=True)(p)
    return fov_grad


def test_gradient_is_the_sum_of_per_fov_gradients_with_stopped_moves():
    config = TrainConfig(model=TINY, fov_moves=1)
    apply_fn = _moving_apply_fn(TINY)
    params = init_state(config, make_optimizer(config)[0])["params"]
    batch = _random_logit_batch(config, 2, seed=2, p_high=0.5)
    batch["weight"][:, :2] = 0.0                  # some voxels carry no loss
    order = move_orders(jax.random.split(jax.random.PRNGKey(3), 2), 1)
    out = run_fovs(apply_fn, params, batch, order, config)
    taken, positions = np.asarray(out["taken"]), np.asarray(out["positions"])
    assert taken.sum() > 4                        # moves happened

    # Replay slot by slot on the host: each FOV's gradient with its canvas input fixed.
    fov_grad = _fov_loss_and_grad(apply_fn)
    c = config.crop_size[0] // 2
    canvas = np.full((2, *config.crop_size, 1), logit(0.05), np.float32)
    canvas[:, c, c, c, 0] = logit(0.95)
    starts = fov_starts(config)
    grad = jax.tree_util.tree_map(np.zeros_like, params)
    loss_sum, weight_sum = 0.0, 0.0
    for s in range(27):
        for b in range(2):
            if not taken[b, s]:
                continue
            z, y, x = starts[positions[b, s]]
            sl = (slice(b, b + 1), slice(z, z + 5), slice(y, y + 5), slice(x, x + 5))
            w = batch["weight"][sl]
            (ls, logits), g = fov_grad(params, batch["image"][sl], canvas[sl], batch["target"][sl], w)
            grad = jax.tree_util.tree_map(lambda a, c: a + np.asarray(c), grad, g)
            loss_sum += float(ls)
            weight_sum += float(w.sum())
            canvas[sl] = np.asarray(logits)
    np.testing.assert_allclose(float(out["loss_sum"]), loss_sum, rtol=1e-5)
    np.testing.assert_allclose(float(out["weight_sum"]), weight_sum)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5),
                           jax.device_get(out["grad_sum"]), grad)
    np.testing.assert_allclose(np.asarray(out["canvas"]), canvas, rtol=1e-5, atol=1e-5)


def test_max_moves_caps_the_packed_slots():
    """A cap of K moves keeps exactly the first 1 + K packed slots of the
    uncapped run (same positions, same canvas decisions) and nothing else."""
    import dataclasses
    config = TrainConfig(model=TINY, fov_moves=1, move_policy="fixed")
    batch = _random_logit_batch(config, 4, seed=1, p_high=0.6)
    order = move_orders(jax.random.split(jax.random.PRNGKey(3), 4), 1)
    full = run_fovs(image_as_logits, None, batch, order, config, with_grad=False)
    capped = run_fovs(image_as_logits, None, batch, order, dataclasses.replace(config, max_moves=3),
                      with_grad=False)
    assert np.asarray(capped["taken"]).shape == (4, 4)
    assert np.asarray(full["taken"]).sum(1).min() > 4          # the cap binds
    np.testing.assert_array_equal(np.asarray(capped["taken"]), np.asarray(full["taken"])[:, :4])
    np.testing.assert_array_equal(np.asarray(capped["positions"]), np.asarray(full["positions"])[:, :4])
