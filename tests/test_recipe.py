"""google/ffn's training recipe (`ffnjax.recipes`, `TrainConfig.google_ffn`): per-entry
gradient clipping, the loss normalisation, the learning-rate schedules, the EMA of the
weights and the checkpoints that serve it, each checked against a direct computation."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ffnjax import checkpoints
from ffnjax.config import ModelConfig, TrainConfig, logit
from ffnjax.fov_moves import move_orders, run_fovs
from ffnjax.nets import make_apply_fn
from ffnjax.recipes import RECIPE_FIELDS, RECIPES
from ffnjax.step import init_state, make_optimizer, train_step

TINY = ModelConfig(depth=1, features=4, fov_size=(5, 5, 5), deltas=(2, 2, 2))
# Plain SGD, constant rate, nothing clipped: a step is params - lr * gradient.
PLAIN = dict(model=TINY, fov_moves=0, optimizer="sgd", momentum=0.0, learning_rate=1.0,
             schedule="constant", warmup_steps=0, clip_norm=0.0, update_per_fov=False)


def _batch(config: TrainConfig, b: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Random image / binary targets, and weights that are zero on about 40% of voxels."""
    rng = np.random.default_rng(seed)
    shape = (b, *config.crop_size, 1)
    return dict(image=rng.normal(size=shape).astype(np.float32),
                target=np.where(rng.random(shape) < 0.5, 0.95, 0.05).astype(np.float32),
                weight=(rng.random(shape) < 0.6).astype(np.float32))


def _direct_loss(config: TrainConfig, batch: dict[str, np.ndarray], normalization: str):
    """The centre-FOV loss written out: sigmoid cross-entropy times weight, then
    reduce_mean over every voxel (google/ffn) or the sum over the summed weight."""
    apply_fn = make_apply_fn(config.model)
    b = batch["image"].shape[0]
    mask = np.full(batch["image"].shape, logit(config.pad_prob), np.float32)
    c = tuple(s // 2 for s in config.crop_size)
    mask[:, c[0], c[1], c[2], 0] = logit(config.seed_prob)
    x, z, w = (jnp.asarray(batch[k]) for k in ("image", "target", "weight"))

    def loss(params):
        logits = apply_fn(params, x, jnp.asarray(mask))
        xent = jnp.maximum(logits, 0) - logits * z + jnp.log1p(jnp.exp(-jnp.abs(logits)))
        if normalization == "voxels":
            return jnp.mean(xent * w)
        return jnp.sum(xent * w) / jnp.sum(w)
    assert b * np.prod(config.crop_size) == w.size
    return loss


def _step(config, state, batch):
    return jax.jit(functools.partial(train_step, config=config,
                                     optimizer=make_optimizer(config)))(state, batch)


@pytest.mark.parametrize("normalization", ["voxels", "weight"])
def test_loss_and_update_normalisation_equal_the_direct_computation(normalization):
    config = TrainConfig(**PLAIN, loss_normalization=normalization)
    batch = _batch(config)
    assert 0 < batch["weight"].mean() < 1          # some zero weights: the two differ
    state = init_state(config, make_optimizer(config)[0])
    params = jax.device_get(state["params"])
    loss_fn = _direct_loss(config, batch, normalization)
    want_loss, want_grad = jax.value_and_grad(loss_fn)(params)
    new_state, metrics = _step(config, state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-5)
    moved = jax.tree_util.tree_map(lambda a, b: a - b, params, jax.device_get(new_state["params"]))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                           moved, jax.device_get(want_grad))


def test_voxel_normalisation_differs_from_weight_normalisation_by_the_weight_fraction():
    config = TrainConfig(**PLAIN)
    batch = _batch(config)
    state = init_state(config, make_optimizer(config)[0])
    _, by_weight = _step(config, state, batch)
    _, by_voxels = _step(dataclasses.replace(config, loss_normalization="voxels"), state, batch)
    np.testing.assert_allclose(float(by_voxels["loss"]),
                               float(by_weight["loss"]) * batch["weight"].mean(), rtol=1e-5)


def test_voxel_count_is_the_taken_fovs_times_the_fov_size():
    config = TrainConfig(model=TINY, fov_moves=1, pad_prob=0.5, move_threshold=0.5)
    batch = {k: jnp.asarray(v) for k, v in _batch(config, 4, seed=2).items()}
    params = init_state(config, make_optimizer(config)[0])["params"]
    out = run_fovs(make_apply_fn(TINY), params, batch,
                   move_orders(jax.random.split(jax.random.PRNGKey(0), 4), 1), config,
                   with_grad=False)
    taken = int(np.asarray(out["taken"]).sum())
    assert 4 < taken
    assert float(out["voxel_sum"]) == taken * 125
    assert float(out["weight_sum"]) < float(out["voxel_sum"])


def test_gradients_are_clipped_entry_by_entry_at_clip_value():
    # An entry bound well inside the gradients' range: some entries clip, some do not.
    config = TrainConfig(**PLAIN, clip_value=2e-3)
    batch = _batch(config, seed=1)
    state = init_state(config, make_optimizer(config)[0])
    params = jax.device_get(state["params"])
    grad = jax.device_get(jax.grad(_direct_loss(config, batch, "weight"))(params))
    entries = np.concatenate([np.abs(g).ravel() for g in jax.tree_util.tree_leaves(grad)])
    assert (entries > 2e-3).sum() > 10 and (entries < 2e-3).sum() > 10
    new_state, _ = _step(config, state, batch)
    moved = jax.tree_util.tree_map(lambda a, b: a - b, params, jax.device_get(new_state["params"]))
    jax.tree_util.tree_map(
        lambda m, g: np.testing.assert_allclose(m, np.clip(g, -2e-3, 2e-3), rtol=1e-4, atol=1e-7),
        moved, grad)


def test_entry_clipping_of_the_optimiser_is_np_clip():
    config = TrainConfig(**dict(PLAIN, clip_value=0.7))
    tx, _ = make_optimizer(config)
    grads = {"a": jnp.asarray([-3.0, -0.7, -0.2, 0.0, 0.5, 0.71, 2.5]),
             "b": jnp.linspace(-2, 2, 12).reshape(3, 4)}
    updates, _ = tx.update(grads, tx.init(grads), grads)
    for k in grads:
        np.testing.assert_allclose(-np.asarray(updates[k]), np.clip(grads[k], -0.7, 0.7), rtol=1e-6)
    # google_ffn's optimiser clips at 0.7 too (and does not clip the global norm).
    g = TrainConfig.google_ffn(model=TINY, fov_moves=0, update_per_fov=False, momentum=0.0)
    tx, _ = make_optimizer(g)
    updates, _ = tx.update(grads, tx.init(grads), grads)
    np.testing.assert_allclose(-np.asarray(updates["a"]), 1e-3 * np.clip(grads["a"], -0.7, 0.7),
                               rtol=1e-6)


@pytest.mark.parametrize("warmup,update_per_fov", [(0, False), (4, False), (2, True)])
def test_exponential_schedule_is_the_staircase_formula(warmup, update_per_fov):
    config = TrainConfig(model=TINY, fov_moves=1, update_per_fov=update_per_fov,
                         schedule="exponential", learning_rate=0.1, lr_decay_factor=0.5,
                         lr_decay_steps=3, warmup_steps=warmup)
    _, schedule = make_optimizer(config)
    for step in range(20):
        if step < warmup:
            want = 0.1 * step / warmup
        else:
            want = 0.1 * 0.5 ** math.floor((step - warmup) / 3)
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-6, err_msg=str(step))


def test_constant_schedule_and_the_default_cosine_schedule():
    _, constant = make_optimizer(TrainConfig(model=TINY, schedule="constant", warmup_steps=0))
    assert {round(float(constant(s)), 9) for s in (0, 5, 10**4, 10**6)} == {1e-3}
    # The default is unchanged: optax's warmup + cosine over `steps` (counted in batches).
    config = TrainConfig(model=TINY, fov_moves=0, steps=50, warmup_steps=5)
    _, cosine = make_optimizer(config)
    ref = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 5, 50, 1e-5)
    for s in (0, 3, 5, 20, 49, 50):
        np.testing.assert_allclose(float(cosine(s)), float(ref(s)), rtol=1e-6)


def test_ema_is_the_bias_corrected_average_of_the_parameters_after_each_step():
    decay, n = 0.8, 4
    config = TrainConfig(**dict(PLAIN, learning_rate=0.5), ema_decay=decay)
    state = init_state(config, make_optimizer(config)[0])
    assert set(state) == {"params", "opt_state", "step", "rng", "ema"}
    history = []
    for i in range(n):
        state, _ = _step(config, state, _batch(config, seed=10 + i))
        history.append(jax.device_get(state["params"]))
    # m_N = sum_k (1 - d) d^(N - k) p_k / (1 - d^N), k = 1..N.
    weights = [(1 - decay) * decay ** (n - k) / (1 - decay ** n) for k in range(1, n + 1)]
    want = jax.tree_util.tree_map(lambda *ps: sum(w * p for w, p in zip(weights, ps)), *history)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           jax.device_get(state["ema"]), want)
    assert not np.allclose(history[-1]["params"]["conv0_a"]["kernel"],
                           want["params"]["conv0_a"]["kernel"])


def test_without_ema_the_state_tree_is_the_one_old_checkpoints_hold():
    for config in (TrainConfig(model=TINY), TrainConfig.google_ffn(model=TINY)):
        state = init_state(config, make_optimizer(config)[0])
        assert set(state) == {"params", "opt_state", "step", "rng"}
        new_state, _ = _step(dataclasses.replace(config, fov_moves=0), state,
                             _batch(dataclasses.replace(config, fov_moves=0)))
        assert set(new_state) == set(state)


def test_load_checkpoint_serves_the_ema_and_the_raw_params_on_request(tmp_path):
    config = TrainConfig(**PLAIN, ema_decay=0.5)
    state = init_state(config, make_optimizer(config)[0])
    state, _ = _step(config, state, _batch(config))
    state, _ = _step(config, state, _batch(config, seed=3))
    mngr = checkpoints.make_manager(tmp_path)
    mngr.save(2, args=checkpoints.save_args(jax.device_get(state), TINY, {}), force=True)
    mngr.wait_until_finished()
    mngr.close()
    model, served = checkpoints.load_checkpoint(tmp_path)
    _, raw = checkpoints.load_checkpoint(tmp_path, use_ema=False)
    assert model == TINY
    same = lambda a, b: jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)  # noqa: E731
    same(served, jax.device_get(state["ema"]))
    same(raw, jax.device_get(state["params"]))
    assert not np.array_equal(served["params"]["conv0_a"]["kernel"],
                              raw["params"]["conv0_a"]["kernel"])


def test_recipes_set_the_same_fields_and_google_ffn_is_their_recipe():
    assert set(RECIPES) == {"ffnjax", "google_ffn"}
    for recipe in RECIPES.values():
        assert set(recipe) == set(RECIPE_FIELDS)
    assert TrainConfig.ffnjax() == TrainConfig()
    g = TrainConfig.google_ffn(steps=7)
    assert (g.optimizer, g.momentum, g.learning_rate, g.schedule) == ("sgd", 0.9, 1e-3, "constant")
    assert (g.clip_value, g.clip_norm, g.loss_normalization) == (0.7, 0.0, "voxels")
    assert (g.warmup_steps, g.min_object_size, g.steps) == (0, 10000, 7)
    assert g.augment and g.transpose_yx and not g.permute_axes
    assert TrainConfig.from_json(g.to_json()) == g


def test_a_run_with_ema_resumes_exactly_and_serves_the_ema(tmp_path):
    from ffnjax.train_loop import train

    config = TrainConfig.smoke(steps=4, log_every=2, checkpoint_every=100, image_every=100,
                               ema_decay=0.5)
    train(config, tmp_path / "a", stop_at_step=2, progress=False)
    train(config, tmp_path / "a", progress=False)
    train(config, tmp_path / "b", progress=False)
    (_, ema_a), (_, ema_b) = (checkpoints.load_checkpoint(tmp_path / w) for w in "ab")
    _, raw_a = checkpoints.load_checkpoint(tmp_path / "a", use_ema=False)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                           ema_a, ema_b)
    kernel = lambda p: p["params"]["conv0_a"]["kernel"]   # noqa: E731
    assert not np.allclose(kernel(ema_a), kernel(raw_a))
    # A workdir's EMA (or its absence) is part of its state: a resume must keep it.
    with pytest.raises(ValueError, match="ema_decay"):
        train(dataclasses.replace(config, ema_decay=0.0, steps=6), tmp_path / "a", progress=False)


def test_recipe_flag_sits_between_the_config_file_and_the_flags(tmp_path):
    from experiments.train import build_parser, config_from_args

    def parse(*argv):
        return config_from_args(build_parser().parse_args(["--workdir", "w", *argv]))

    assert parse("--recipe", "google_ffn") == TrainConfig.google_ffn()
    assert parse("--recipe", "ffnjax") == TrainConfig()
    # The recipe overrides the file's values of its own fields and keeps the others ...
    (tmp_path / "c.json").write_text(TrainConfig(learning_rate=0.05, steps=33).to_json())
    config = parse("--config", str(tmp_path / "c.json"), "--recipe", "google_ffn")
    assert (config.learning_rate, config.steps, config.optimizer) == (1e-3, 33, "sgd")
    # ... and explicit flags override the recipe.
    config = parse("--recipe", "google_ffn", "--momentum", "0", "--min-object-size", "20",
                   "--schedule", "exponential", "--lr-decay-steps", "500")
    assert (config.momentum, config.min_object_size, config.schedule) == (0.0, 20, "exponential")
    assert (config.lr_decay_steps, config.clip_value) == (500, 0.7)
    # A file written by one recipe is reset by the other.
    (tmp_path / "g.json").write_text(TrainConfig.google_ffn(steps=9).to_json())
    assert parse("--config", str(tmp_path / "g.json"), "--recipe", "ffnjax") == TrainConfig(steps=9)
