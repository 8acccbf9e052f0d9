"""The training step (`ffnjax.step`): the optimiser built once, single- and
data-parallel steps, per-FOV updates, evaluation, learning, and `STEP_FIELDS`."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffnjax.config import ModelConfig, TrainConfig, logit
from ffnjax.fov_moves import fov_starts, move_orders, run_fovs
from ffnjax.inputs import load_training_volumes, make_sampler
from ffnjax.nets import make_apply_fn
from ffnjax.step import evaluate, init_state, make_optimizer, train_step
from test_fov_moves import TINY, _fov_loss_and_grad, _random_logit_batch

REPO = Path(__file__).resolve().parents[1]


def test_evaluate_matches_run_fovs_and_ignores_chunking():
    # Pad 0.5 and threshold 0.5: a move is taken where the untrained net's update
    # is positive, so some moves happen and their order matters.
    config = TrainConfig(model=TINY, fov_moves=1, pad_prob=0.5, move_threshold=0.5)
    params = init_state(config, make_optimizer(config)[0])["params"]
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
    optimizer = make_optimizer(config)
    state = init_state(config, optimizer[0])
    f1_before = _f1(state["params"], held_out, config)
    step = jax.jit(functools.partial(train_step, config=config, optimizer=optimizer))
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
    state = init_state(config, make_optimizer(config)[0])
    step32 = functools.partial(train_step, config=config, optimizer=make_optimizer(config))
    step16 = functools.partial(train_step, config=bf16, optimizer=make_optimizer(bf16))
    _, m32 = jax.jit(step32)(state, batch)
    new16, m16 = jax.jit(step16)(state, batch)
    assert new16["params"]["params"]["conv0_a"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=0.05)
    np.testing.assert_allclose(float(m16["grad_norm"]), float(m32["grad_norm"]), rtol=0.1)


def test_direct_kernel_step_tracks_the_depth_split_step():
    """16 features, so every hidden convolution and its input gradient run on the
    direct kernel, inside the step's FOV-move scan and conds: the loss and the
    updated parameters equal those of depth_split's 2D convolutions."""
    from ffnjax import cpu_kernel
    if not cpu_kernel.available():
        pytest.skip(f"direct kernel unavailable: {cpu_kernel.unavailable_reason()}")
    model = ModelConfig(depth=2, features=16, fov_size=(5, 5, 5), deltas=(2, 2, 2))
    states, metrics = [], []
    for impl in ("depth_split", "direct"):
        config = TrainConfig(model=dataclasses.replace(model, conv_impl=impl), fov_moves=1,
                             move_threshold=0.5)
        batch = _random_logit_batch(config, 2, seed=6, p_high=0.6)
        optimizer = make_optimizer(config)
        step = jax.jit(functools.partial(train_step, config=config, optimizer=optimizer))
        if impl == "direct":
            text = step.lower(init_state(config, optimizer[0]), batch).as_text()
            assert cpu_kernel.TARGET in text
        new, m = step(init_state(config, optimizer[0]), batch)
        states.append(jax.device_get(new["params"]))
        metrics.append({k: float(v) for k, v in m.items()})
    assert metrics[0]["moves"] > 1
    for k in metrics[0]:
        np.testing.assert_allclose(metrics[1][k], metrics[0][k], rtol=1e-4, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree_util.tree_leaves(states[0]), jax.tree_util.tree_leaves(states[1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


_DP_SCRIPT = textwrap.dedent("""
    import functools, json, os
    import jax, numpy as np
    from ffnjax.config import ModelConfig, TrainConfig
    from ffnjax.inputs import load_training_volumes, make_sampler
    from ffnjax.step import init_state, make_mesh, make_optimizer, make_sharded_step, train_step
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
    optimizer = make_optimizer(config)
    state = init_state(config, optimizer[0])
    initial_params = jax.device_get(state["params"])
    single, m1 = jax.jit(functools.partial(train_step, config=config, optimizer=optimizer))(state, batch)
    single = jax.device_get(single)
    mesh = make_mesh()
    step = make_sharded_step(config, mesh, optimizer)
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


def test_update_per_fov_equals_one_sgd_step_per_slot_replayed_on_the_host():
    """google/ffn's rule: each FOV slot is an optimiser step on that slot's FOVs
    (over the batch), and later slots see the updated parameters. Replayed
    slot by slot with plain SGD on the host."""
    config = TrainConfig(model=TINY, fov_moves=1, max_moves=4, update_per_fov=True,
                         optimizer="sgd", momentum=0.0, learning_rate=0.5, clip_norm=0.0,
                         warmup_steps=0, end_lr_fraction=1.0, pad_prob=0.5, move_threshold=0.5,
                         steps=10)
    optimizer = make_optimizer(config)
    state = init_state(config, optimizer[0])
    batch = make_sampler(config, load_training_volumes(TrainConfig.smoke(
        model=TINY, fov_moves=1, min_object_size=20))).batch(3)
    batch = {k: batch[k] for k in ("image", "target", "weight")}
    new_state, metrics = jax.jit(functools.partial(train_step, config=config,
                                                   optimizer=optimizer))(state, batch)
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


class _ReadRecorder:
    """A TrainConfig stand-in that records the name of every field read from it.

    Properties (`crop_size`) are evaluated with the recorder as `self`, so the
    fields they read count too."""

    def __init__(self, config: TrainConfig):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "reads", set())

    def __getattr__(self, name):
        attr = getattr(TrainConfig, name, None)
        if isinstance(attr, property):
            return attr.fget(self)
        if name in {f.name for f in dataclasses.fields(TrainConfig)}:
            self.reads.add(name)
        return getattr(self._config, name)


# Configurations that between them take every branch of the step and the optimiser.
_STEP_VARIANTS = [dict(), dict(update_per_fov=False), dict(move_policy="max_pred_moves"),
                  dict(max_moves=2, optimizer="sgd", clip_norm=0.0), dict(fov_moves=0),
                  dict(schedule="exponential", clip_value=0.7, loss_normalization="voxels",
                       ema_decay=0.9),
                  dict(schedule="constant", update_per_fov=False, loss_normalization="voxels")]


def test_step_fields_hold_every_field_the_compiled_step_reads():
    """`step_config` keeps only STEP_FIELDS: a field the step (or the optimiser
    built for it) read outside them would silently take its default there."""
    from ffnjax import step as step_module
    from ffnjax.config import STEP_FIELDS, step_config

    reads = set()
    for overrides in _STEP_VARIANTS:
        config = dataclasses.replace(TrainConfig.smoke(model=TINY), **overrides)
        recorder = _ReadRecorder(config)
        optimizer = step_module._make_optimizer.__wrapped__(recorder)   # the unmemoised builder
        state = jax.eval_shape(lambda: init_state(config, optimizer[0]))
        batch = {k: jax.ShapeDtypeStruct((2, *config.crop_size, 1), jnp.float32)
                 for k in ("image", "target", "weight")}
        jax.eval_shape(functools.partial(train_step, config=recorder, optimizer=optimizer),
                       state, batch)
        reads |= recorder.reads
        assert step_config(config) == TrainConfig(**{f: getattr(config, f) for f in STEP_FIELDS})
    assert {"model", "fov_moves", "learning_rate", "move_policy"} <= reads   # the recorder works
    assert reads <= set(STEP_FIELDS), sorted(reads - set(STEP_FIELDS))
    assert set(STEP_FIELDS) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_optimizer_is_built_once_per_step_configuration():
    config = TrainConfig.smoke(model=TINY)
    optimizer = make_optimizer(config)
    # Host-only fields do not make another optimiser (nor another compiled step).
    assert make_optimizer(dataclasses.replace(config, log_every=7, seed=3)) is optimizer
    assert make_optimizer(dataclasses.replace(config, learning_rate=1e-4)) is not optimizer
