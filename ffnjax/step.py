"""The pure training step: optimiser, state, `train_step`, its data-parallel form,
and the no-gradient evaluation of examples.

The optimiser and its learning-rate schedule are built once per run by
`make_optimizer(config) -> (tx, schedule)` and passed in wherever they are
needed (`init_state`, `train_step`, `make_sharded_step`), as flax's
`TrainState.create(tx=...)` and `create_learning_rate_fn` do.

The state is a plain dict pytree -- {'params': {'params': ...}, 'opt_state',
'step', 'rng'}, plus 'ema' only when `ema_decay` > 0 -- and it is exactly the
tree Orbax saves under 'state' in every checkpoint
(`ffnjax.checkpoints.save_args`), so its layout must not change: existing
workdirs resume from it and `--init-from` reads its parameters.

Compilation is keyed on `ffnjax.config.step_config(config)` (only the
`STEP_FIELDS` of the config), so runs that differ in data or logging share it.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ffnjax.config import TrainConfig, step_config
from ffnjax.fov_moves import fov_slots, loss_denominator, move_orders, run_fovs
from ffnjax.nets import init_params, make_apply_fn

AXIS = "data"              # the one mesh axis: data parallelism

Optimizer = tuple[optax.GradientTransformation, optax.Schedule]

__all__ = ["AXIS", "Optimizer", "make_optimizer", "learning_rate_schedule", "init_state",
           "ema_update", "inference_params", "train_step", "make_mesh", "make_sharded_step",
           "predict_example", "evaluate"]


# ----------------------------------------------------------------------------
# Optimiser and state
# ----------------------------------------------------------------------------

def make_optimizer(config: TrainConfig) -> Optimizer:
    """The run's optimiser and learning-rate schedule, built once.

    Adam (or SGD with momentum) with linear warmup then `config.schedule`
    (cosine decay, constant, or google/ffn's staircase exponential decay),
    after per-entry clipping (`clip_value`) and global-norm clipping
    (`clip_norm`), each when > 0. With `update_per_fov` the optimiser counts
    FOV slots, so its schedule is stretched by `fov_slots(config)` to span the
    same batches.

    Args:
      config: reads only `STEP_FIELDS` (the result is memoised on them, so
        configs that agree there share one optimiser and one compiled step).

    Returns:
      (tx, schedule): the optax transformation, and the learning rate as a
      function of the batch step (the 'learning_rate' metric).
    """
    return _make_optimizer(step_config(config))


def learning_rate_schedule(config: TrainConfig, k: int = 1) -> optax.Schedule:
    """The learning rate as a function of the optimiser update count, when each
    batch makes `k` updates (warmup, cosine horizon and decay steps count batches)."""
    lr, warmup = config.learning_rate, config.warmup_steps * k
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup,
            decay_steps=max(config.steps, config.warmup_steps + 1) * k,
            end_value=lr * config.end_lr_fraction)
    if config.schedule == "constant":
        main = optax.constant_schedule(lr)
    else:   # google/ffn's flags as a staircase: lr * factor ** floor(step / decay_steps)
        main = optax.exponential_decay(lr, transition_steps=config.lr_decay_steps * k,
                                       decay_rate=config.lr_decay_factor, staircase=True)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


@functools.lru_cache(maxsize=16)
def _make_optimizer(config: TrainConfig) -> Optimizer:
    k = fov_slots(config) if config.update_per_fov else 1
    per_update = learning_rate_schedule(config, k)
    schedule = per_update if k == 1 else (lambda step: per_update(step * k))
    if config.optimizer == "adam":
        tx = optax.adam(per_update)
    else:
        tx = optax.sgd(per_update, momentum=config.momentum)
    if config.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), tx)
    if config.clip_value > 0:      # google/ffn: tf.clip_by_value on every gradient entry
        tx = optax.chain(optax.clip(config.clip_value), tx)
    return tx, schedule


def init_state(config: TrainConfig, tx: optax.GradientTransformation) -> dict[str, Any]:
    """A fresh training state: {'params': {'params': ...}, 'opt_state', 'step',
    'rng'}, plus 'ema' (a copy of 'params') when `config.ema_decay` > 0.

    Args:
      config: the model, `seed` and `ema_decay`.
      tx: the optimiser (`make_optimizer(config)[0]`); its state is initialised here.

    'params' holds the linen variables so `ffnjax.checkpoints.load_checkpoint`
    restores training checkpoints directly; 'rng' (a raw uint32[2] key) seeds
    the per-example move orders, folded with the step. Without an EMA the tree
    is exactly what checkpoints held before EMAs existed, so old workdirs resume.
    """
    key = jax.random.PRNGKey(config.seed)
    params = init_params(config.model, jax.random.fold_in(key, 0))
    state = dict(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                 rng=jax.random.fold_in(key, 1))
    if config.ema_decay > 0:
        state["ema"] = jax.tree_util.tree_map(jnp.array, params)
    return state


def ema_update(ema: Any, params: Any, decay: float, count: jax.Array) -> Any:
    """The bias-corrected exponential moving average after its `count`-th update.

    With b_t = decay * b_{t-1} + (1 - decay) * p_t from b_0 = 0, the corrected
    average m_t = b_t / (1 - decay**t) obeys m_t = m_{t-1} + w_t (p_t - m_{t-1})
    with w_t = (1 - decay) / (1 - decay**t): this stores m_t itself, so the
    saved 'ema' is usable as it is, and m_1 = p_1 whatever `ema` started as
    (the initial weights never leak into it).
    """
    log_decay = math.log(decay)        # 1 - d**t as -expm1(t log d): exact in float32 at t = 1
    w = jnp.expm1(jnp.float32(log_decay)) / jnp.expm1(count.astype(jnp.float32) * log_decay)
    return jax.tree_util.tree_map(lambda m, p: m + w * (p - m), ema, params)


def inference_params(state: dict[str, Any]) -> Any:
    """The parameters inference uses: the EMA when the state keeps one."""
    return state.get("ema", state["params"])


# ----------------------------------------------------------------------------
# The update step
# ----------------------------------------------------------------------------

def _example_keys(state: dict, local_batch: int, axis_name: str | None) -> jax.Array:
    """Keys of this device's examples, drawn from the GLOBAL batch so that the
    result does not depend on how many devices share the batch."""
    if axis_name is None:
        index, n_dev = 0, 1
    else:
        index, n_dev = lax.axis_index(axis_name), lax.axis_size(axis_name)
    keys = jax.random.split(jax.random.fold_in(state["rng"], state["step"]), local_batch * n_dev)
    return lax.dynamic_slice_in_dim(keys, index * local_batch, local_batch)


def train_step(state: dict[str, Any], batch: dict[str, jax.Array], config: TrainConfig,
               optimizer: Optimizer, axis_name: str | None = None
               ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One optimiser step on a batch (one per FOV slot with `update_per_fov`); pure.

    Args:
      state: the training state (`init_state`).
      batch: image, target, weight arrays (B, *crop_size, 1) float32.
      config: the run configuration (static; reads only `STEP_FIELDS`).
      optimizer: (tx, schedule) from `make_optimizer(config)`.
      axis_name: the mesh axis when called per device inside `jax.shard_map`;
        loss/gradient sums and metric counts are then `lax.pmean`-ed over it,
        so the update equals the single-device step on the whole global batch.

    Returns:
      (new state, metrics) with metrics loss, precision, recall, f1 (at 0.9,
      over evaluated FOVs), moves (FOVs taken per example beyond the centre),
      learning_rate and grad_norm -- all scalars, identical on every device.

    As in google/ffn, each FOV slot is one optimiser step
    (`config.update_per_fov`), so later moves already see the updated net; with
    `update_per_fov=False` the losses of all FOVs of a batch are summed and
    averaged over every evaluated voxel before one step.
    """
    tx, schedule = optimizer
    local_batch = batch["image"].shape[0]
    order = move_orders(_example_keys(state, local_batch, axis_name), config.fov_moves)

    def apply(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def update(params, opt_state, grad_sum, weight_sum, voxel_sum):   # one FOV slot's step
        if axis_name is not None:
            grad_sum, weight_sum, voxel_sum = lax.pmean((grad_sum, weight_sum, voxel_sum),
                                                        axis_name)
        denom = loss_denominator(config, weight_sum, voxel_sum)
        return apply(params, opt_state, jax.tree_util.tree_map(lambda g: g / denom, grad_sum))

    out = run_fovs(make_apply_fn(config.model), state["params"], batch, order, config,
                   with_grad=True, update=update if config.update_per_fov else None,
                   opt_state=state["opt_state"], axis_name=axis_name)
    sums = dict(grad_sum=out["grad_sum"], loss_sum=out["loss_sum"], weight_sum=out["weight_sum"],
                voxel_sum=out["voxel_sum"], tp=out["tp"], fp=out["fp"], fn=out["fn"],
                fovs=jnp.sum(out["taken"]).astype(jnp.float32), examples=jnp.float32(local_batch))
    if axis_name is not None:
        # Means of sums over devices: ratios of them equal the global-batch ratios.
        sums = lax.pmean(sums, axis_name)
    denom = loss_denominator(config, sums["weight_sum"], sums["voxel_sum"])
    grads = jax.tree_util.tree_map(lambda g: g / denom, sums["grad_sum"])
    if config.update_per_fov:         # already applied, one step per FOV slot
        params, opt_state = out["params"], out["opt_state"]
    else:
        params, opt_state = apply(state["params"], state["opt_state"], grads)
    tp, fp, fn = sums["tp"], sums["fp"], sums["fn"]
    metrics = dict(loss=sums["loss_sum"] / denom, precision=tp / jnp.maximum(tp + fp, 1e-6),
                   recall=tp / jnp.maximum(tp + fn, 1e-6),
                   f1=2 * tp / jnp.maximum(2 * tp + fp + fn, 1e-6),
                   moves=sums["fovs"] / sums["examples"] - 1.0,
                   learning_rate=jnp.asarray(schedule(state["step"]), jnp.float32),
                   grad_norm=optax.tree.norm(grads))
    new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1, rng=state["rng"])
    if config.ema_decay > 0:
        new_state["ema"] = ema_update(state["ema"], params, config.ema_decay, new_state["step"])
    return new_state, metrics


# ----------------------------------------------------------------------------
# Data parallelism
# ----------------------------------------------------------------------------

def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over every device (all hosts), axis 'data'."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def make_sharded_step(config: TrainConfig, mesh: Mesh, optimizer: Optimizer) -> Callable:
    """`step(state, batch) -> (state, metrics)`: `train_step` per device under
    `jax.shard_map` over the mesh axis 'data', jitted, state buffers donated.

    Compiled once per (step config, mesh, optimizer): a resumed run in the same
    process (with `make_optimizer`'s memoised optimiser) reuses the compiled step.

    Shardings: state -> P() replicated on every device (each holds the full
    parameters and optimiser state); batch -> P('data'), split along the
    example axis (global batch = per-device batch x device count); metrics ->
    P() replicated (they are pmean-ed inside).
    """
    return _make_sharded_step(step_config(config), mesh, optimizer)


@functools.lru_cache(maxsize=8)
def _make_sharded_step(config: TrainConfig, mesh: Mesh, optimizer: Optimizer) -> Callable:
    replicated = NamedSharding(mesh, P())
    by_example = NamedSharding(mesh, P(AXIS))
    body = functools.partial(train_step, config=config, optimizer=optimizer, axis_name=AXIS)
    sharded = jax.shard_map(body, mesh=mesh,
                            in_specs=(P(), P(AXIS)),    # (state, batch)
                            out_specs=(P(), P()),       # (state, metrics)
                            # The body averages gradient sums itself with
                            # lax.pmean; with check_vma=True jax would also
                            # psum the gradient of the replicated params
                            # automatically, counting it twice.
                            check_vma=False)
    return jax.jit(sharded,
                   in_shardings=(replicated, by_example),
                   out_shardings=(replicated, replicated),
                   donate_argnums=(0,))                 # the old state's buffers are reused


# ----------------------------------------------------------------------------
# Evaluation without gradients
# ----------------------------------------------------------------------------

def _batch_of(example: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The image / target / weight arrays of `example` on the device."""
    return {k: jnp.asarray(v) for k, v in example.items() if k in ("image", "target", "weight")}


def predict_example(params: Any, example: dict[str, np.ndarray], config: TrainConfig,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Runs one example's FOV moves without gradients.

    Args:
      example: image/target/weight arrays (*crop_size, 1) or batched (B, *crop_size, 1).

    Returns:
      (probabilities of the final canvas (B, *crop_size), taken (B, S)).
    """
    batch = {k: v if v.ndim == 5 else v[None] for k, v in _batch_of(example).items()}
    out = _predict_jit(params, batch, jax.random.PRNGKey(seed), step_config(config))
    return np.asarray(jax.nn.sigmoid(out[0]))[..., 0], np.asarray(out[1])


@functools.partial(jax.jit, static_argnums=(3,))
def _predict_jit(params, batch, key, config):
    order = move_orders(jax.random.split(key, batch["image"].shape[0]), config.fov_moves)
    out = run_fovs(make_apply_fn(config.model), params, batch, order, config, with_grad=False)
    return out["canvas"], out["taken"]


def evaluate(params: Any, batch: dict[str, np.ndarray], config: TrainConfig,
             chunk: int = 8, seed: int = 0) -> dict[str, float]:
    """Loss and mask precision / recall / F1 (at 0.9) of `params` on a batch of
    examples, with the same FOV moves as training (no gradients), `chunk`
    examples per device call."""
    sums = np.zeros(6)
    n = batch["image"].shape[0]
    keys = jax.random.split(jax.random.PRNGKey(seed), n)   # per example: chunking changes nothing
    for i in range(0, n, chunk):
        part = _batch_of({k: v[i:i + chunk] for k, v in batch.items()})
        sums += np.asarray(_eval_jit(params, part, keys[i:i + chunk], step_config(config)))
    loss_sum, weight_sum, voxel_sum, tp, fp, fn = sums
    denom = weight_sum if config.loss_normalization == "weight" else voxel_sum
    return dict(loss=loss_sum / max(denom, 1.0), precision=tp / max(tp + fp, 1e-6),
                recall=tp / max(tp + fn, 1e-6), f1=2 * tp / max(2 * tp + fp + fn, 1e-6))


@functools.partial(jax.jit, static_argnums=(3,))
def _eval_jit(params, batch, keys, config):
    order = move_orders(keys, config.fov_moves)
    out = run_fovs(make_apply_fn(config.model), params, batch, order, config, with_grad=False)
    return jnp.stack([out["loss_sum"], out["weight_sum"], out["voxel_sum"], out["tp"], out["fp"],
                      out["fn"]])
