"""FOV moves, the update step (single and data-parallel), learning, and resume."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap
from collections import deque
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffnjax import checkpoints
from ffnjax.config import ModelConfig, TrainConfig, logit
from ffnjax.nets import make_apply_fn
from ffnjax.train_loop import (fov_starts, init_state, lattice_offsets, load_checkpoint,
                               load_training_volumes, make_sampler, move_orders, run_fovs, train,
                               train_step)

REPO = Path(__file__).resolve().parents[1]
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
    """google/ffn's max_pred_moves in plain Python: FIFO queue, faces at +-delta."""
    offsets = [tuple(o) for o in lattice_offsets(config.fov_moves)]
    starts = fov_starts(config)
    fov, r, d = TINY.fov_size, TINY.fov_radius, TINY.deltas
    queue, queued, visited = deque([13]), {13}, []
    while queue:
        p = queue.popleft()
        visited.append(p)
        s = starts[p]
        pred = image[s[0]:s[0] + fov[0], s[1]:s[1] + fov[1], s[2]:s[2] + fov[2]]
        for axis in range(3):
            for sign in (-1, 1):
                face = np.take(pred, r[axis] + sign * d[axis], axis=axis)
                q = list(offsets[p])
                q[axis] += sign
                if face.max() > THR and tuple(q) in offsets and offsets.index(tuple(q)) not in queued:
                    queued.add(offsets.index(tuple(q)))
                    queue.append(offsets.index(tuple(q)))
    return visited


def test_max_pred_moves_follow_the_face_rule():
    config = TrainConfig(model=TINY, fov_moves=1, move_policy="max_pred_moves")
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
    params = init_state(config)["params"]
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


def test_evaluate_matches_run_fovs_and_ignores_chunking():
    from ffnjax.train_loop import evaluate

    # Pad 0.5 and threshold 0.5: a move is taken where the untrained net's update
    # is positive, so some moves happen and their order matters.
    config = TrainConfig(model=TINY, fov_moves=1, pad_prob=0.5, move_threshold=0.5)
    params = init_state(config)["params"]
    batch = _random_logit_batch(config, 5, seed=4, p_high=0.3)
    a = evaluate(params, batch, config, chunk=5)
    b = evaluate(params, batch, config, chunk=2)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
    out = run_fovs(make_apply_fn(TINY), params, {k: jnp.asarray(v) for k, v in batch.items()},
                   move_orders(jax.random.split(jax.random.PRNGKey(0), 5), 1), config,
                   with_grad=False)
    assert 5 < np.asarray(out["taken"]).sum() < 5 * 27    # some moves, so orders matter
    np.testing.assert_allclose(a["loss"], float(out["loss_sum"]) / float(out["weight_sum"]),
                               rtol=1e-5)


def _f1(params, batch, config) -> float:
    out = run_fovs(make_apply_fn(config.model), params, batch,
                   move_orders(jax.random.split(jax.random.PRNGKey(0), batch["image"].shape[0]),
                               config.fov_moves), config, with_grad=False)
    tp, fp, fn = (float(out[k]) for k in ("tp", "fp", "fn"))
    return 2 * tp / max(2 * tp + fp + fn, 1e-6)


def _learn(fov_moves: int, steps: int) -> tuple[list[float], float, float]:
    config = TrainConfig.smoke(model=ModelConfig(depth=2, features=8, fov_size=(9, 9, 9),
                                                 deltas=(2, 2, 2)),
                               steps=steps, batch_size=4, learning_rate=3e-3, warmup_steps=20,
                               fov_moves=fov_moves)
    volumes = load_training_volumes(config)
    sampler = make_sampler(config, volumes)
    held_out = make_sampler(dataclasses.replace(config, seed=123), volumes).batch(16)
    state = init_state(config)
    f1_before = _f1(state["params"], held_out, config)
    step = jax.jit(functools.partial(train_step, config=config))
    losses = []
    for _ in range(config.steps):
        state, metrics = step(state, sampler.batch(config.batch_size))
        losses.append(float(metrics["loss"]))
    return losses, f1_before, _f1(state["params"], held_out, config)


def test_loss_decreases_and_trained_f1_beats_untrained():
    # The centre FOV only, to stay fast; the slow variant below trains with moves.
    losses, f1_before, f1_after = _learn(fov_moves=0, steps=200)
    assert np.mean(losses[-25:]) < 0.8 * np.mean(losses[:25])
    assert f1_after > f1_before + 0.2, (f1_before, f1_after)


@pytest.mark.slow
def test_loss_decreases_and_f1_improves_with_fov_moves():
    losses, f1_before, f1_after = _learn(fov_moves=1, steps=250)
    assert np.mean(losses[-25:]) < 0.8 * np.mean(losses[:25])
    assert f1_after > f1_before + 0.2, (f1_before, f1_after)


def test_bfloat16_step_tracks_the_float32_step():
    config = TrainConfig(model=TINY, fov_moves=0)
    bf16 = dataclasses.replace(config, model=dataclasses.replace(TINY, compute_dtype="bfloat16"))
    batch = _random_logit_batch(config, 2, seed=5, p_high=0.3)
    state = init_state(config)
    _, m32 = jax.jit(functools.partial(train_step, config=config))(state, batch)
    new16, m16 = jax.jit(functools.partial(train_step, config=bf16))(state, batch)
    assert new16["params"]["params"]["conv0_a"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=0.05)
    np.testing.assert_allclose(float(m16["grad_norm"]), float(m32["grad_norm"]), rtol=0.1)


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    config = TrainConfig.smoke(steps=6, log_every=3, checkpoint_every=100, image_every=100)
    first = train(config, tmp_path / "a", stop_at_step=3, progress=False)
    assert first["step"] == 3 and checkpoints.latest_step(tmp_path / "a") == 3
    resumed = train(config, tmp_path / "a", progress=False)
    straight = train(config, tmp_path / "b", progress=False)
    assert resumed["step"] == straight["step"] == 6
    cfg_a, params_a = load_checkpoint(tmp_path / "a")
    cfg_b, params_b = load_checkpoint(tmp_path / "b")
    assert cfg_a == cfg_b == config.model
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                           params_a, params_b)
    np.testing.assert_allclose(resumed["loss"], straight["loss"], rtol=1e-5)
    # The checkpoint's params are the training state's linen tree.
    assert set(params_a) == {"params"} and "conv0_a" in params_a["params"]
    meta = checkpoints.load_meta(tmp_path / "a")
    assert meta["examples_seen"] == 6 * config.batch_size and len(meta["sampler_states"]) == 1
    assert (tmp_path / "a" / "images" / "step_000006.png").is_file()
    assert any((tmp_path / "a" / "tensorboard").iterdir())


def test_nan_guard_names_the_step_range(tmp_path):
    # A vanishing stddev makes the normalised image infinite, so the loss is NaN.
    # Same step configuration as the resume test above: the compiled step is reused.
    config = TrainConfig.smoke(steps=6, log_every=2, checkpoint_every=100, image_every=100,
                               image_stddevs=(1e-45,))
    with pytest.raises(FloatingPointError, match=r"steps 1\.\.2"):
        train(config, tmp_path, progress=False)


_DP_SCRIPT = textwrap.dedent("""
    import functools, json, os
    import jax, numpy as np
    from ffnjax.config import ModelConfig, TrainConfig
    from ffnjax.train_loop import (init_state, load_training_volumes, make_mesh, make_sampler,
                                   make_sharded_step, train_step)
    from jax.sharding import NamedSharding, PartitionSpec as P

    assert len(jax.devices()) == 4, jax.devices()
    config = TrainConfig.smoke(model=ModelConfig(depth=1, features=4, fov_size=(9, 9, 9),
                                                 deltas=(2, 2, 2)), batch_size=8,
                               # SGD without clipping or warmup: the update is lr * gradient,
                               # so a wrongly averaged gradient shows in the parameters.
                               optimizer="sgd", learning_rate=0.5, clip_norm=0.0, warmup_steps=0,
                               # Pad 0.5 / threshold 0.5: the untrained net already moves, so
                               # the per-example move orders must match across device counts.
                               pad_prob=0.5, move_threshold=0.5,
                               update_per_fov=bool(int(os.environ.get("UPDATE_PER_FOV", "0"))))
    batch = make_sampler(config, load_training_volumes(config)).batch(8)
    state = init_state(config)
    initial_params = jax.device_get(state["params"])
    single, m1 = jax.jit(functools.partial(train_step, config=config))(state, batch)
    single = jax.device_get(single)
    mesh = make_mesh()
    step = make_sharded_step(config, mesh)
    sharded_state = jax.device_put(state, NamedSharding(mesh, P()))
    gbatch = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in batch.items()}
    multi, m4 = step(sharded_state, gbatch)
    multi = jax.device_get(multi)
    diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))),
        single["params"], multi["params"]))
    changes = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
        initial_params, single["params"]))
    print(json.dumps(dict(max_diff=max(diffs), min_change=min(changes),
                          m1={k: float(v) for k, v in m1.items()},
                          m4={k: float(v) for k, v in m4.items()},
                          shards=len(gbatch["image"].addressable_shards))))
""")


@pytest.mark.parametrize("update_per_fov", [False, True], ids=["per_batch", "per_fov"])
def test_four_device_step_equals_single_device_step(update_per_fov):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", UPDATE_PER_FOV=str(int(update_per_fov)))
    proc = subprocess.run([sys.executable, "-c", _DP_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["shards"] == 4
    assert res["min_change"] > 0                    # the step moved every parameter tensor
    # Per-FOV updates chain several lr-0.5 steps, each re-reading the parameters the
    # last one wrote: float32 summation-order differences compound (changes ~0.7).
    tol = 2e-4 if update_per_fov else 1e-5
    assert res["max_diff"] < tol and res["min_change"] > 1e-3, res
    assert res["m1"]["moves"] > 1
    for k in res["m1"]:
        np.testing.assert_allclose(res["m4"][k], res["m1"][k], rtol=1e-4, atol=1e-6, err_msg=k)


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


def test_update_per_fov_equals_one_sgd_step_per_slot_replayed_on_the_host():
    """google/ffn's rule: each FOV slot is an optimiser step on that slot's FOVs
    (over the batch), and later slots see the updated parameters. Replayed
    slot by slot with plain SGD on the host."""
    config = TrainConfig(model=TINY, fov_moves=1, max_moves=4, update_per_fov=True,
                         optimizer="sgd", momentum=0.0, learning_rate=0.5, clip_norm=0.0,
                         warmup_steps=0, end_lr_fraction=1.0, pad_prob=0.5, move_threshold=0.5,
                         steps=10)
    state = init_state(config)
    batch = make_sampler(config, load_training_volumes(TrainConfig.smoke(
        model=TINY, fov_moves=1, min_object_size=20))).batch(3)
    batch = {k: batch[k] for k in ("image", "target", "weight")}
    new_state, metrics = jax.jit(functools.partial(train_step, config=config))(state, batch)
    order = np.asarray(move_orders(jax.random.split(jax.random.fold_in(state["rng"], 0), 3), 1))
    assert metrics["moves"] > 0.5                     # several slots, hence several updates

    slot_grad = _fov_loss_and_grad(make_apply_fn(TINY))
    # Replay google/ffn's fixed policy slot by slot: each example takes the next
    # position of its order whose centre passes the threshold on its canvas.
    params = jax.device_get(state["params"])
    c = config.crop_size[0] // 2
    canvas = np.full((3, *config.crop_size, 1), logit(config.pad_prob), np.float32)
    canvas[:, c, c, c, 0] = logit(config.seed_prob)
    starts = fov_starts(config)
    ptr = np.zeros(3, int)
    centres = starts + np.asarray(TINY.fov_radius)
    updates = 0
    for s in range(1 + config.max_moves):
        fovs = []
        for b in range(3):
            for i in range(ptr[b], order.shape[1]):
                z, y, x = centres[order[b, i]]
                if (s == 0 and i == 0) or canvas[b, z, y, x, 0] > logit(config.move_threshold):
                    fovs.append((b, order[b, i]))
                    ptr[b] = i + 1
                    break
            else:
                ptr[b] = order.shape[1]
        if not fovs:
            continue
        grad = jax.tree_util.tree_map(np.zeros_like, params)
        wsum = 0.0
        for b, pos in fovs:
            z, y, x = starts[pos]
            sl = (slice(b, b + 1), slice(z, z + 5), slice(y, y + 5), slice(x, x + 5))
            (_, logits), g = slot_grad(params, batch["image"][sl], canvas[sl], batch["target"][sl],
                                       batch["weight"][sl])
            grad = jax.tree_util.tree_map(lambda a, c: a + np.asarray(c), grad, g)
            wsum += float(batch["weight"][sl].sum())
            canvas[sl] = np.asarray(logits)
        params = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g / max(wsum, 1.0), params, grad)
        updates += 1
    assert updates >= 2
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           jax.device_get(new_state["params"]), params)
