"""FFN training: in-example FOV moves on the device, a data-parallel jitted step,
Orbax checkpoints that resume the same sample stream, and the loop around them.

The one library call is `train(config, workdir)`; `python -m experiments.train`
is a thin wrapper around it. The pieces are importable on their own:

* `run_fovs(apply_fn, params, batch, order, config)` -- one example's FOV moves
  as a `lax.scan` over a fixed number of FOV slots with a taken-mask (static
  shapes, one compiled computation). Every slot that is taken applies the net
  at its lattice position, writes the output logits into the example's mask
  canvas, and adds its loss and its gradient to running sums.
* `train_step(state, batch, config, axis_name=None)` -- pure; with `axis_name`
  it is the per-device body that `make_sharded_step` wraps in `jax.shard_map`.
* `train(config, workdir)` -- the loop (big_vision's train.py shape).

Gradients between moves are stopped, as in google/ffn: each FOV's mask input
is the canvas with `stop_gradient`, so the gradient of an FOV flows only through
its own forward pass. As in google/ffn, each FOV slot is one optimiser step
(`TrainConfig.update_per_fov`, the default), so later moves already see the
updated net; with `update_per_fov=False` the losses of all FOVs of a batch are
summed and averaged over every evaluated voxel before one step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ffnjax import checkpoints, platform
from ffnjax.checkpoints import load_checkpoint  # noqa: F401  (re-exported for notebooks)
from ffnjax.config import ModelConfig, TrainConfig, logit
from ffnjax.examples import BalancedSampler, TrainingVolume
from ffnjax.nets import init_params, make_apply_fn
from ffnjax.volumes import read_spec  # noqa: F401  (alias: ffnjax.train_loop.read_spec, its old home)

AXIS = "data"              # the one mesh axis: data parallelism
F1_THRESHOLD = 0.9         # mask precision / recall / F1 are measured at this probability

__all__ = ["AXIS", "load_checkpoint", "lattice_offsets", "fov_starts", "move_orders", "run_fovs",
           "fov_slots", "make_optimizer", "init_state", "train_step", "step_config", "make_mesh", "make_sharded_step",
           "load_training_volumes", "load_volume_pair", "load_validation_batch", "evaluate",
           "make_sampler", "predict_example", "train"]


# ----------------------------------------------------------------------------
# The FOV lattice of one example
# ----------------------------------------------------------------------------

def lattice_offsets(fov_moves: int) -> np.ndarray:
    """(P, 3) int lattice offsets in units of deltas, P = (2 * fov_moves + 1)**3,
    in C order (index = ravel of offset + fov_moves)."""
    r = np.arange(-fov_moves, fov_moves + 1)
    return np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3).astype(np.int32)


def fov_starts(config: TrainConfig) -> np.ndarray:
    """(P, 3) voxel start (z,y,x) inside the example crop of the FOV at every lattice position."""
    m = config.model
    centre = np.asarray(config.crop_size) // 2
    return (centre + lattice_offsets(config.fov_moves) * np.asarray(m.deltas)
            - np.asarray(m.fov_radius)).astype(np.int32)


def move_orders(keys: jax.Array, fov_moves: int) -> jax.Array:
    """Per-example visiting order (B, P) of the 'fixed' policy: the centre, then
    the lattice ring by ring (Chebyshev distance 1, then 2, ...), each ring in a
    random order drawn from that example's key. With fov_moves=1: the centre
    then the 26 neighbour shifts shuffled."""
    ring = np.abs(lattice_offsets(fov_moves)).max(-1).astype(np.float32)
    noise = jax.vmap(lambda k: jax.random.uniform(k, ring.shape, maxval=0.5))(keys)
    return jnp.argsort(jnp.asarray(ring)[None] + noise, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------
# FOV moves inside an example (on the device)
# ----------------------------------------------------------------------------

def _slice_fovs(vol: jax.Array, starts: jax.Array, size: tuple[int, int, int]) -> jax.Array:
    """Per-example FOV crops: vol (B,z,y,x,C), starts (B,3) -> (B,*size,C)."""
    def one(v, s):
        return lax.dynamic_slice(v, (s[0], s[1], s[2], 0), (*size, v.shape[-1]))
    return jax.vmap(one)(vol, starts)


def _write_fovs(vol: jax.Array, update: jax.Array, starts: jax.Array) -> jax.Array:
    def one(v, u, s):
        return lax.dynamic_update_slice(v, u, (s[0], s[1], s[2], 0))
    return jax.vmap(one)(vol, update, starts)


def initial_canvas(config: TrainConfig, batch: int) -> jax.Array:
    """Mask logits (B, crop, 1): logit(pad_prob) everywhere, logit(seed_prob) at the centre."""
    size = config.crop_size
    canvas = jnp.full((batch, *size, 1), logit(config.pad_prob), jnp.float32)
    c = tuple(s // 2 for s in size)
    return canvas.at[:, c[0], c[1], c[2], 0].set(logit(config.seed_prob))


def fov_slots(config: TrainConfig) -> int:
    """FOV slots per example (the length of `run_fovs`'s scan): every lattice
    position, or 1 + max_moves when moves are capped."""
    n_pos = (2 * config.fov_moves + 1) ** 3
    return n_pos if not config.max_moves else min(n_pos, 1 + config.max_moves)


def run_fovs(apply_fn: Callable, params: Any, batch: dict[str, jax.Array], order: jax.Array,
             config: TrainConfig, *, with_grad: bool = True, update: Callable | None = None,
             opt_state: Any = None, axis_name: str | None = None) -> dict[str, Any]:
    """Runs the FOV moves of a batch of examples as one `lax.scan`.

    Args:
      apply_fn: `apply_fn(params, image_fov, mask_logits_fov) -> logits` (N,z,y,x,1).
      params: the network parameters.
      batch: image, target, weight of shape (B, *crop_size, 1) (`BalancedSampler.batch`).
      order: (B, P) lattice visiting order for the 'fixed' policy (`move_orders`);
        ignored by 'max_pred_moves'.
      config: geometry, policy and thresholds.
      with_grad: also accumulate d(loss_sum)/d(params).
      update: `update(params, opt_state, grad_sum, weight_sum) -> (params,
        opt_state)`, applied with each slot's sums after every slot that some
        example takes, so later FOVs see the updated parameters (google/ffn's
        one optimiser step per FOV); needs `with_grad` and `opt_state`.
      axis_name: the mesh axis under `shard_map` when `update` is given (the
        update is collective, so every device must take the same branch).

    Returns a dict:
      loss_sum, weight_sum: summed weighted sigmoid cross-entropy and summed
        weight over every taken FOV (loss = loss_sum / weight_sum).
      grad_sum: gradient of loss_sum (None without `with_grad`).
      tp, fp, fn: weighted voxel counts of (prob > 0.9) vs (target > 0.5).
      taken: (B, P) bool, slot s of example b was evaluated.
      positions: (B, P) lattice index evaluated in each slot.
      canvas: (B, *crop_size, 1) final mask logits.
      params, opt_state: after the last update (None without `update`).

    Policies. 'fixed': slot 0 is the centre; each later slot takes the next
    position of the example's `order` whose FOV centre voxel exceeds
    logit(move_threshold) on the canvas (google/ffn's fixed policy, with the
    skipped positions packed out so that slots are not wasted).
    `config.max_moves` > 0 caps the slots at 1 + max_moves per example
    (taken, positions are then (B, 1 + max_moves)).
    'max_pred_moves' (inference's rule): after an FOV is evaluated, each of its
    six faces (the plane at +-delta from its centre) whose maximum prediction
    exceeds the threshold queues the neighbouring lattice position; slot s
    takes the earliest-queued position not yet visited.
    """
    mc = config.model
    fov = mc.fov_size
    offsets = lattice_offsets(config.fov_moves)
    n_pos = len(offsets)
    starts_tab = jnp.asarray(fov_starts(config))
    centres_tab = starts_tab + jnp.asarray(mc.fov_radius, jnp.int32)
    thr = jnp.float32(logit(config.move_threshold))
    f1_thr = jnp.float32(logit(F1_THRESHOLD))
    big = jnp.int32(2**30)
    b = batch["image"].shape[0]
    rad = np.asarray(mc.fov_radius)
    # Neighbour table for max_pred_moves: (P, 6) lattice index or -1 off the lattice.
    side = 2 * config.fov_moves + 1
    neigh = np.full((n_pos, 6), -1, np.int32)
    for p, o in enumerate(offsets):
        for k, (axis, sign) in enumerate((a, s) for a in range(3) for s in (-1, 1)):
            q = o.copy()
            q[axis] += sign
            if np.all(np.abs(q) <= config.fov_moves):
                neigh[p, k] = np.ravel_multi_index(tuple(q + config.fov_moves), (side,) * 3)
    neigh = jnp.asarray(neigh)
    centre_index = n_pos // 2

    def fov_loss(p, image_f, mask_f, target_f, weight_f):
        logits = apply_fn(p, image_f, mask_f)
        ce = optax.sigmoid_binary_cross_entropy(logits, target_f)
        return jnp.sum(ce * weight_f), logits

    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params) if with_grad else None
    if config.move_policy == "fixed":
        order_centres = centres_tab[order]       # (B, P, 3): each example's FOV centres, in order

    def slot(carry, s):
        canvas = carry["canvas"]
        if config.move_policy == "fixed":
            # Each example skips ahead to the next position of its order whose
            # centre passes the threshold (slot 0: the centre). An example's
            # canvas changes only when it evaluates a FOV, so checking the
            # skipped positions now gives the same decisions as checking them
            # one per slot -- but the slots stay packed: a batch costs the
            # largest number of FOVs any one example takes, not the union.
            ptr = carry["ptr"]
            value = canvas[jnp.arange(b)[:, None], order_centres[..., 0], order_centres[..., 1],
                           order_centres[..., 2], 0]                           # (B, P)
            index = jnp.arange(n_pos, dtype=jnp.int32)[None, :]
            ok = (index >= ptr[:, None]) & ((value > thr) | ((index == 0) & (ptr[:, None] == 0)))
            first = jnp.argmax(ok, axis=1).astype(jnp.int32)
            taken = jnp.any(ok, axis=1)
            pos = jnp.take_along_axis(order, first[:, None], axis=1)[:, 0]
            next_ptr = jnp.where(taken, first + 1, n_pos)
        else:
            cand = (carry["queued"] < big) & ~carry["visited"]
            pos = jnp.argmin(jnp.where(cand, carry["queued"], big), axis=-1).astype(jnp.int32)
            taken = jnp.any(cand, axis=-1)
        starts = starts_tab[pos]
        image_f = _slice_fovs(batch["image"], starts, fov)
        mask_f = lax.stop_gradient(_slice_fovs(canvas, starts, fov))
        target_f = _slice_fovs(batch["target"], starts, fov)
        weight_f = _slice_fovs(batch["weight"], starts, fov) * taken[:, None, None, None, None]

        p_now = carry["params"] if update is not None else params

        def evaluate(_):
            if with_grad:
                (ls, logits), g = jax.value_and_grad(fov_loss, has_aux=True)(
                    p_now, image_f, mask_f, target_f, weight_f)
            else:
                ls, logits = fov_loss(p_now, image_f, mask_f, target_f, weight_f)
                g = None
            if update is None:
                return ls, logits, g
            return (ls, logits, g) + tuple(update(p_now, carry["opt_state"], g, jnp.sum(weight_f)))

        def skip(_):  # no example takes this slot: nothing to compute
            if update is None:
                return jnp.float32(0), mask_f, zero_grads
            return jnp.float32(0), mask_f, zero_grads, p_now, carry["opt_state"]

        any_taken = jnp.any(taken)
        if update is not None and axis_name is not None:
            any_taken = lax.pmax(any_taken.astype(jnp.int32), axis_name) > 0
        res = lax.cond(any_taken, evaluate, skip, None)
        ls, logits, g = res[:3]
        new_fov = jnp.where(taken[:, None, None, None, None], logits, mask_f)
        out = dict(carry)
        if update is not None:
            out["params"], out["opt_state"] = res[3], res[4]
        out["canvas"] = _write_fovs(canvas, new_fov, starts)
        out["loss_sum"] = carry["loss_sum"] + ls
        out["weight_sum"] = carry["weight_sum"] + jnp.sum(weight_f)
        if with_grad:
            out["grad_sum"] = jax.tree_util.tree_map(jnp.add, carry["grad_sum"], g)
        pred = (logits > f1_thr).astype(jnp.float32)
        truth = (target_f > 0.5).astype(jnp.float32)
        out["tp"] = carry["tp"] + jnp.sum(weight_f * pred * truth)
        out["fp"] = carry["fp"] + jnp.sum(weight_f * pred * (1 - truth))
        out["fn"] = carry["fn"] + jnp.sum(weight_f * (1 - pred) * truth)
        if config.move_policy == "fixed":
            out["ptr"] = next_ptr
        if config.move_policy == "max_pred_moves":
            visited = carry["visited"].at[jnp.arange(b), pos].max(taken)
            # Face planes at +-delta from the FOV centre (google/ffn's
            # get_scored_move_offsets), in the order of the neighbour table.
            faces = []
            for axis in range(3):
                for sign in (-1, 1):
                    idx = int(rad[axis] + sign * mc.deltas[axis])
                    faces.append(jnp.max(jnp.take(logits, idx, axis=axis + 1), axis=(1, 2, 3)))
            passes = (jnp.stack(faces, -1) > thr) & taken[:, None]          # (B, 6)
            nb = neigh[pos]                                                      # (B, 6)
            ok = passes & (nb >= 0)
            when = (s + 1) * 6 + jnp.arange(6, dtype=jnp.int32)                  # FIFO, then face order
            queued = carry["queued"].at[jnp.arange(b)[:, None], jnp.where(ok, nb, 0)].min(
                jnp.where(ok, when[None, :], big))
            out["visited"], out["queued"] = visited, queued
        return out, (taken, pos)

    carry = dict(canvas=initial_canvas(config, b), loss_sum=jnp.float32(0),
                 weight_sum=jnp.float32(0), tp=jnp.float32(0), fp=jnp.float32(0),
                 fn=jnp.float32(0))
    if with_grad:
        carry["grad_sum"] = zero_grads
    if update is not None:
        carry["params"], carry["opt_state"] = params, opt_state
    if config.move_policy == "fixed":
        carry["ptr"] = jnp.zeros((b,), jnp.int32)
    if config.move_policy == "max_pred_moves":
        carry["visited"] = jnp.zeros((b, n_pos), bool)
        carry["queued"] = jnp.full((b, n_pos), big, jnp.int32).at[:, centre_index].set(0)
    carry, (taken, positions) = lax.scan(slot, carry, jnp.arange(fov_slots(config)))
    return dict(loss_sum=carry["loss_sum"], weight_sum=carry["weight_sum"],
                grad_sum=carry.get("grad_sum"), tp=carry["tp"], fp=carry["fp"], fn=carry["fn"],
                taken=taken.T, positions=positions.T, canvas=carry["canvas"],
                params=carry.get("params"), opt_state=carry.get("opt_state"))


# ----------------------------------------------------------------------------
# Optimiser, state and the update step
# ----------------------------------------------------------------------------

def make_optimizer(config: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam (or SGD with momentum) with linear warmup + cosine decay and
    global-norm clipping. Returns (optimizer, learning-rate schedule of the
    batch step). With `update_per_fov` the optimiser counts FOV slots, so its
    schedule is stretched by `fov_slots(config)` to span the same batches."""
    k = fov_slots(config) if config.update_per_fov else 1
    per_update = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps * k,
        decay_steps=max(config.steps, config.warmup_steps + 1) * k,
        end_value=config.learning_rate * config.end_lr_fraction)
    schedule = per_update if k == 1 else (lambda step: per_update(step * k))
    if config.optimizer == "adam":
        opt = optax.adam(per_update)
    else:
        opt = optax.sgd(per_update, momentum=config.momentum)
    if config.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)
    return opt, schedule


def init_state(config: TrainConfig) -> dict[str, Any]:
    """A fresh TrainState pytree: {'params': {'params': ...}, 'opt_state', 'step', 'rng'}.

    'params' holds the linen variables so `ffnjax.checkpoints.load_checkpoint`
    restores training checkpoints directly; 'rng' (a raw uint32[2] key) seeds
    the per-example move orders, folded with the step.
    """
    key = jax.random.PRNGKey(config.seed)
    params = init_params(config.model, jax.random.fold_in(key, 0))
    opt, _ = make_optimizer(config)
    return dict(params=params, opt_state=opt.init(params), step=jnp.int32(0),
                rng=jax.random.fold_in(key, 1))


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
               axis_name: str | None = None) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One optimiser step on a batch (one per FOV slot with `update_per_fov`); pure.

    Args:
      state: the TrainState pytree (`init_state`).
      batch: image, target, weight arrays (B, *crop_size, 1) float32.
      config: the run configuration (static).
      axis_name: the mesh axis when called per device inside `jax.shard_map`;
        loss/gradient sums and metric counts are then `lax.pmean`-ed over it,
        so the update equals the single-device step on the whole global batch.

    Returns:
      (new state, metrics) with metrics loss, precision, recall, f1 (at 0.9,
      over evaluated FOVs), moves (FOVs taken per example beyond the centre),
      learning_rate and grad_norm -- all scalars, identical on every device.
    """
    apply_fn = make_apply_fn(config.model)
    local_batch = batch["image"].shape[0]
    order = move_orders(_example_keys(state, local_batch, axis_name), config.fov_moves)
    opt, schedule = make_optimizer(config)

    def apply(params, opt_state, grads):
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def update(params, opt_state, grad_sum, weight_sum):   # one FOV slot's step
        if axis_name is not None:
            grad_sum, weight_sum = lax.pmean((grad_sum, weight_sum), axis_name)
        return apply(params, opt_state,
                     jax.tree_util.tree_map(lambda g: g / jnp.maximum(weight_sum, 1.0), grad_sum))

    out = run_fovs(apply_fn, state["params"], batch, order, config, with_grad=True,
                   update=update if config.update_per_fov else None,
                   opt_state=state["opt_state"], axis_name=axis_name)
    sums = dict(grad_sum=out["grad_sum"], loss_sum=out["loss_sum"], weight_sum=out["weight_sum"],
                tp=out["tp"], fp=out["fp"], fn=out["fn"],
                fovs=jnp.sum(out["taken"]).astype(jnp.float32), examples=jnp.float32(local_batch))
    if axis_name is not None:
        # Means of sums over devices: ratios of them equal the global-batch ratios.
        sums = lax.pmean(sums, axis_name)
    denom = jnp.maximum(sums["weight_sum"], 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, sums["grad_sum"])
    if config.update_per_fov:         # already applied, one step per FOV slot
        params, opt_state = out["params"], out["opt_state"]
    else:
        params, opt_state = apply(state["params"], state["opt_state"], grads)
    tp, fp, fn = sums["tp"], sums["fp"], sums["fn"]
    precision = tp / jnp.maximum(tp + fp, 1e-6)
    recall = tp / jnp.maximum(tp + fn, 1e-6)
    metrics = dict(loss=sums["loss_sum"] / denom, precision=precision, recall=recall,
                   f1=2 * tp / jnp.maximum(2 * tp + fp + fn, 1e-6),
                   moves=sums["fovs"] / sums["examples"] - 1.0,
                   learning_rate=jnp.asarray(schedule(state["step"]), jnp.float32),
                   grad_norm=optax.tree.norm(grads))
    new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1, rng=state["rng"])
    return new_state, metrics


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over every device (all hosts), axis 'data'."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


# TrainConfig fields the device step depends on; the rest (data, logging,
# checkpoints, augmentation) only matter on the host.
STEP_FIELDS = ("model", "fov_moves", "move_policy", "max_moves", "update_per_fov", "move_threshold",
               "seed_prob", "pad_prob",
               "steps", "learning_rate", "optimizer", "momentum", "warmup_steps",
               "end_lr_fraction", "clip_norm")


def step_config(config: TrainConfig) -> TrainConfig:
    """`config` with every host-only field at its default: the static argument of
    the compiled step, so runs that differ only in data or logging share it."""
    return TrainConfig(**{f: getattr(config, f) for f in STEP_FIELDS})


def make_sharded_step(config: TrainConfig, mesh: Mesh) -> Callable:
    """See `_make_sharded_step`; compiled once per (step-relevant config, mesh)."""
    return _make_sharded_step(step_config(config), mesh)


@functools.lru_cache(maxsize=8)
def _make_sharded_step(config: TrainConfig, mesh: Mesh) -> Callable:
    """`step(state, batch) -> (state, metrics)`: `train_step` per device under
    `jax.shard_map` over the mesh axis 'data', jitted, state buffers donated.
    Cached per (config, mesh), so a resumed run in the same process reuses the
    compiled step.

    Shardings: state -> P() replicated on every device (each holds the full
    parameters and optimiser state); batch -> P('data'), split along the
    example axis (global batch = per-device batch x device count); metrics ->
    P() replicated (they are pmean-ed inside).
    """
    replicated = NamedSharding(mesh, P())
    by_example = NamedSharding(mesh, P(AXIS))
    body = functools.partial(train_step, config=config, axis_name=AXIS)
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


def predict_example(params: Any, example: dict[str, np.ndarray], config: TrainConfig,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Runs one example's FOV moves without gradients.

    Args:
      example: image/target/weight arrays (*crop_size, 1) or batched (B, *crop_size, 1).

    Returns:
      (probabilities of the final canvas (B, *crop_size), taken (B, P)).
    """
    batch = {k: jnp.asarray(v if v.ndim == 5 else v[None]) for k, v in example.items()
             if k in ("image", "target", "weight")}
    out = _predict_jit(params, batch, jax.random.PRNGKey(seed), step_config(config))
    return np.asarray(jax.nn.sigmoid(out[0]))[..., 0], np.asarray(out[1])


@functools.partial(jax.jit, static_argnums=(3,))
def _predict_jit(params, batch, key, config):
    order = move_orders(jax.random.split(key, batch["image"].shape[0]), config.fov_moves)
    out = run_fovs(make_apply_fn(config.model), params, batch, order, config, with_grad=False)
    return out["canvas"], out["taken"]


# ----------------------------------------------------------------------------
# Training volumes and the input pipeline
# ----------------------------------------------------------------------------

def load_training_volumes(config: TrainConfig) -> list[TrainingVolume]:
    """The training volumes of `config` in memory (the synthetic one when
    `config.images` is empty). Fails, naming the spec, on unreadable specs,
    image/label shape mismatches, non-3-D arrays and empty labels."""
    n = max(len(config.images), 1)
    means = config.image_means or (128.0,) * n
    stds = config.image_stddevs or (33.0,) * n
    if not config.images:
        from ffnjax.synthetic import SyntheticConfig, make_volume
        image, labels = make_volume(config.synthetic_shape, seed=config.synthetic_seed,
                                    config=SyntheticConfig(mean_radius=config.synthetic_radius))
        mask = read_spec(config.masks[0]).astype(bool) if config.masks else None
        return [TrainingVolume(np.asarray(image), np.asarray(labels), means[0], stds[0], mask,
                               name=f"synthetic{tuple(config.synthetic_shape)}")]
    masks = config.masks or (None,) * n
    return [load_volume_pair(i, l, means[k], stds[k], masks[k])
            for k, (i, l) in enumerate(zip(config.images, config.labels))]


def load_volume_pair(ispec: str, lspec: str, mean: float = 128.0, stddev: float = 33.0,
                     mask_spec: str | None = None) -> TrainingVolume:
    """One image / labels (/ mask) spec pair as a TrainingVolume, with checks
    that name the spec at fault."""
    image, labels = read_spec(ispec), read_spec(lspec)
    if image.ndim == 4 and image.shape[-1] == 1:
        image = image[..., 0]
    if labels.ndim == 4 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels {lspec!r} must hold integer object ids, got dtype {labels.dtype}")
    if image.shape != labels.shape:
        raise ValueError(f"image {ispec!r} has shape {image.shape} but labels {lspec!r} have "
                         f"shape {labels.shape}; they must match (use SPEC@z0:z1,y0:y1,x0:x1 "
                         "to cut a box)")
    if not labels.any():
        raise ValueError(f"labels {lspec!r} are empty (every voxel is 0)")
    mask = read_spec(mask_spec).astype(bool) if mask_spec else None
    return TrainingVolume(image, labels, mean, stddev, mask, name=f"{ispec} / {lspec}")


def load_validation_batch(config: TrainConfig) -> dict[str, np.ndarray] | None:
    """`config.val_examples` balanced, unaugmented examples of the validation
    volumes (a fixed seed: the same examples at every evaluation), or None."""
    if not config.val_images:
        return None
    mean = config.image_means[0] if config.image_means else 128.0
    std = config.image_stddevs[0] if config.image_stddevs else 33.0
    vols = [load_volume_pair(i, l, mean, std) for i, l in zip(config.val_images, config.val_labels)]
    # Centres need only their centre FOV inside (a thin held-out slab keeps
    # enough centres); crop voxels outside the volume carry no loss.
    val_config = dataclasses.replace(config, augment=False, brightness=0.0, contrast=0.0,
                                     seed=config.seed + 7919, cache_dir="", full_crop_margin=False)
    return make_sampler(val_config, vols).batch(config.val_examples)


def evaluate(params: Any, batch: dict[str, np.ndarray], config: TrainConfig,
             chunk: int = 8, seed: int = 0) -> dict[str, float]:
    """Loss and mask precision / recall / F1 (at 0.9) of `params` on a batch of
    examples, with the same FOV moves as training (no gradients)."""
    sums = np.zeros(5)
    n = batch["image"].shape[0]
    keys = jax.random.split(jax.random.PRNGKey(seed), n)   # per example: chunking changes nothing
    for i in range(0, n, chunk):
        part = {k: jnp.asarray(v[i:i + chunk]) for k, v in batch.items()
                if k in ("image", "target", "weight")}
        sums += np.asarray(_eval_jit(params, part, keys[i:i + chunk], step_config(config)))
    loss_sum, weight_sum, tp, fp, fn = sums
    return dict(loss=loss_sum / max(weight_sum, 1.0), precision=tp / max(tp + fp, 1e-6),
                recall=tp / max(tp + fn, 1e-6), f1=2 * tp / max(2 * tp + fp + fn, 1e-6))


@functools.partial(jax.jit, static_argnums=(3,))
def _eval_jit(params, batch, keys, config):
    order = move_orders(keys, config.fov_moves)
    out = run_fovs(make_apply_fn(config.model), params, batch, order, config, with_grad=False)
    return jnp.stack([out["loss_sum"], out["weight_sum"], out["tp"], out["fp"], out["fn"]])


def make_sampler(config: TrainConfig, volumes: list[TrainingVolume],
                 process_index: int = 0) -> BalancedSampler:
    """The balanced sampler of this host (its own seed stream per process)."""
    m = config.model
    crop = config.crop_size
    if any(c > n for v in volumes for c, n in zip(crop if config.full_crop_margin else m.fov_size,
                                                   v.labels.shape)):
        shapes = [v.labels.shape for v in volumes]
        raise ValueError(f"example crop {crop} (FOV {m.fov_size} + 2 * deltas {m.deltas} * "
                         f"fov_moves {config.fov_moves}) does not fit the training volume(s) {shapes}")
    margin = tuple(c // 2 for c in crop) if config.full_crop_margin else m.fov_radius
    radius = tuple(r + d for r, d in zip(m.fov_radius, m.deltas))
    return BalancedSampler(
        volumes, crop, radius, margin, config.partition_thresholds, config.min_object_size,
        seed=np.random.SeedSequence([config.seed, process_index]), augment=config.augment,
        transpose_yx=config.transpose_yx, brightness=config.brightness, contrast=config.contrast,
        seed_prob=config.seed_prob, pad_prob=config.pad_prob, cache_dir=config.cache_dir or None)


class Prefetcher:
    """A background thread preparing the next batches while the device works.

    Each item is (batch, sampler state after drawing it): the state saved with
    a checkpoint taken after that batch's step, so a resumed run draws exactly
    the next batch of the uninterrupted stream.
    """

    def __init__(self, sampler: BalancedSampler, batch_size: int, depth: int):
        self._sampler, self._n = sampler, batch_size
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ffnjax-prefetch", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                item = (self._sampler.batch(self._n), self._sampler.get_state())
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer
            self._error = e

    def get(self) -> tuple[dict[str, np.ndarray], dict, float]:
        """(batch, sampler state, seconds waited)."""
        t0 = time.perf_counter()
        while True:
            if self._error is not None:
                raise RuntimeError("input pipeline failed") from self._error
            try:
                batch, state = self._q.get(timeout=0.1)
                return batch, state, time.perf_counter() - t0
            except queue.Empty:
                continue

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


# ----------------------------------------------------------------------------
# Logging helpers
# ----------------------------------------------------------------------------

def _due(step: int, every: int, last: int) -> bool:
    """The one periodic-action rule: every `every` steps and at the last step."""
    return step % every == 0 or step == last


def _example_png(path: Path, params: Any, batch: dict[str, np.ndarray], config: TrainConfig,
                 seed: int) -> Path:
    """Image / target / prediction of the batch's first example: the centre z
    slice and the centre y slice of its crop."""
    from ffnjax import viz

    example = {k: v[:1] for k, v in batch.items()}
    prob, _ = predict_example(params, example, config, seed)
    img, tgt, prd = example["image"][0, ..., 0], example["target"][0, ..., 0], prob[0]
    gray = lambda a: np.repeat((np.clip(a, 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)  # noqa: E731
    cz, cy = img.shape[0] // 2, img.shape[1] // 2
    panels = [viz.overlay(img[cz]), gray(tgt[cz]), gray(prd[cz]),
              viz.overlay(img[:, cy]), gray(tgt[:, cy]), gray(prd[:, cy])]
    scale = max(1, 160 // max(img.shape))   # nearest-neighbour zoom so small crops are visible
    panels = [np.repeat(np.repeat(p, scale, 0), scale, 1) for p in panels]
    return viz.save_png(path, viz.montage(panels, ncols=3))


def _sampler_states(state: dict) -> list[dict]:
    """Every host's sampler state (gathered when there are several hosts)."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils

    raw = json.dumps(state).encode()
    buf = np.zeros(4096, np.uint8)
    if len(raw) > len(buf):
        raise ValueError(f"sampler state too large to gather ({len(raw)} bytes)")
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bytes(row).rstrip(b"\0")) for row in gathered]


# ----------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------

def train(config: TrainConfig, workdir: str | Path, *, stop_at_step: int | None = None,
          progress: bool = True) -> dict[str, float]:
    """Trains (or resumes training) in `workdir`; returns the final metrics.

    Writes `workdir/checkpoints/<step>/` (Orbax: state, model_config, meta),
    `workdir/tensorboard/` (event files), `workdir/images/step_NNNNNN.png`
    and `workdir/train_config.json`.

    Args:
      config: the run; `config.steps` is the total, a resumed run continues
        from the latest checkpoint up to it.
      workdir: output folder (created).
      stop_at_step: stop (with a checkpoint) at this step although the schedule
        runs to `config.steps` -- a clean stand-in for a pre-emption.
      progress: show a tqdm bar and print log lines.

    Returns:
      dict with step, loss, precision, recall, f1, moves, learning_rate,
      grad_norm (means over the last logging interval), examples_per_s,
      input_wait_fraction and wall_s (of this session).

    Raises:
      ValueError / FileNotFoundError: bad data or configuration, before any step.
      FloatingPointError: the loss became NaN or infinite (naming the steps).
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    workdir = Path(workdir)

    # --- Distributed setup ----------------------------------------------------
    if config.distributed:
        jax.distributed.initialize()   # coordinator / process ids from the environment
    process_index, process_count = jax.process_index(), jax.process_count()
    primary = process_index == 0

    # --- Mesh -------------------------------------------------------------------
    mesh = make_mesh()
    n_dev = mesh.size
    if config.batch_size % n_dev:
        if process_count > 1:
            raise ValueError(f"batch_size {config.batch_size} must be a multiple of the device "
                             f"count {n_dev}")
        # One host: use the most devices that share the batch evenly (e.g. the
        # per-core CPU devices of ffnjax.hostdevices with an odd batch size).
        mesh = make_mesh(platform.devices_for_batch(config.batch_size, jax.devices()))
        n_dev = mesh.size
    local_batch = config.batch_size // process_count

    # --- Input (fails here, before any compilation, on bad data) ---------------
    volumes = load_training_volumes(config)
    sampler = make_sampler(config, volumes, process_index)
    val_batch = load_validation_batch(config) if primary else None

    # --- Model and optimiser ------------------------------------------------------
    state = init_state(config)

    # --- Sharding -----------------------------------------------------------------
    replicated = NamedSharding(mesh, P())
    by_example = NamedSharding(mesh, P(AXIS))
    state = jax.device_put(state, replicated)

    def to_global(batch_np: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        # Each host hands in its own share; jax assembles the global batch.
        return {k: jax.make_array_from_process_local_data(by_example, v)
                for k, v in batch_np.items()}

    # --- Update step ----------------------------------------------------------------
    step_fn = make_sharded_step(config, mesh)

    # --- Checkpoint restore -------------------------------------------------------
    # Resume order: (1) the latest checkpoint in workdir -- full state and the
    # sampler stream; (2) `config.init_from` -- parameters only, a fresh
    # optimiser; (3) the fresh initialisation from `config.seed`.
    workdir.mkdir(parents=True, exist_ok=True)
    mngr = checkpoints.make_manager(workdir, max_to_keep=config.keep_checkpoints)
    latest = mngr.latest_step()
    if latest is not None:
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = mngr.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), model_config=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        saved_model = ModelConfig.from_dict(restored["model_config"])
        if saved_model != config.model:
            raise ValueError(f"workdir {workdir} holds a checkpoint of a different model "
                             f"({saved_model}) than the config ({config.model}); use a new workdir")
        state = restored["state"]
        sampler.set_state(restored["meta"]["sampler_states"][process_index])
        if primary and progress:
            print(f"resuming from step {latest} of {checkpoints.checkpoint_dir(workdir)}")
    elif config.init_from:
        init_model, params = checkpoints.load_checkpoint(config.init_from)
        if init_model.fov_size != config.model.fov_size or init_model.depth != config.model.depth \
                or init_model.features != config.model.features:
            raise ValueError(f"init_from {config.init_from} holds model {init_model}, which does "
                             f"not match the config's {config.model}")
        state = dict(state, params=params, opt_state=make_optimizer(config)[0].init(params))
        state = jax.device_put(state, replicated)
    step = int(state["step"])
    end = config.steps if stop_at_step is None else min(config.steps, int(stop_at_step))
    if primary:
        (workdir / "train_config.json").write_text(config.to_json())

    # --- Loop ---------------------------------------------------------------------
    writer = None
    if primary:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(str(workdir / "tensorboard"))
    if primary and progress:
        print(f"training {config.model} on {n_dev} device(s), global batch {config.batch_size}\n"
              f"  checkpoints: {checkpoints.checkpoint_dir(workdir)}\n"
              f"  tensorboard: {workdir / 'tensorboard'}")
    terminated = threading.Event()
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGTERM, lambda *_: terminated.set())

    def save(at_step: int, sampler_state: dict):
        if at_step in mngr.all_steps():
            return
        meta = dict(sampler_states=_sampler_states(sampler_state), train_config=config.to_dict(),
                    image_means=[v.mean for v in volumes], image_stddevs=[v.stddev for v in volumes],
                    examples_seen=at_step * config.batch_size)
        mngr.save(at_step, args=checkpoints.save_args(state, config.model, meta), force=True)
        mngr.wait_until_finished()

    sampler_state = sampler.get_state()
    prefetcher = Prefetcher(sampler, local_batch, config.prefetch)
    final: dict[str, float] = {}
    last_val: dict[str, float] = {}
    interval: list[dict] = []
    t_interval, waited, last_logged = time.perf_counter(), 0.0, step
    bar = tqdm(total=end, initial=step, disable=not (primary and progress), unit="step",
               dynamic_ncols=True)
    try:
        while step < end:
            batch_np, sampler_state, wait = prefetcher.get()
            waited += wait
            state, metrics = step_fn(state, to_global(batch_np))
            step += 1
            # Keep at most one step in flight: wait for the previous step so the
            # bar's rate and ETA are true and the host never runs far ahead.
            if interval:
                jax.block_until_ready(interval[-1])
            interval.append(metrics)
            bar.update(1)
            if _due(step, config.log_every, end):
                host = {k: float(np.mean([jax.device_get(m[k]) for m in interval])) for k in interval[0]}
                if not all(math.isfinite(v) for v in (host["loss"], host["grad_norm"])):
                    raise FloatingPointError(
                        f"training diverged: loss {host['loss']} / grad norm {host['grad_norm']} "
                        f"is not finite in steps {last_logged + 1}..{step}")
                elapsed = time.perf_counter() - t_interval
                host["examples_per_s"] = len(interval) * config.batch_size / elapsed
                host["input_wait_fraction"] = waited / elapsed
                if writer is not None:
                    for k, v in host.items():
                        writer.add_scalar(f"train/{k}", v, step)
                    writer.flush()
                if primary and progress:
                    bar.write(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in host.items()))
                final = dict(host, step=step)
                interval, t_interval, waited, last_logged = [], time.perf_counter(), 0.0, step
            if val_batch is not None and _due(step, config.val_every, end):
                val = evaluate(jax.device_get(state["params"]), val_batch, config)
                for k, v in val.items():
                    writer.add_scalar(f"val/{k}", v, step)
                writer.flush()
                if progress:
                    bar.write(f"step {step} validation: " +
                              " ".join(f"{k}={v:.4g}" for k, v in val.items()))
                last_val = {f"val_{k}": v for k, v in val.items()}
            if primary and _due(step, config.image_every, end):
                _example_png(workdir / "images" / f"step_{step:06d}.png",
                             jax.device_get(state["params"]), batch_np, config, seed=step)
            if _due(step, config.checkpoint_every, end) or terminated.is_set():
                save(step, sampler_state)
            if terminated.is_set():
                if primary and progress:
                    bar.write(f"SIGTERM: saved checkpoint at step {step}, stopping")
                break
        save(step, sampler_state)
    finally:
        bar.close()
        prefetcher.close()
        mngr.close()
        if writer is not None:
            writer.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    final = dict(final, **last_val, step=step, wall_s=time.perf_counter() - t_start)
    return final
