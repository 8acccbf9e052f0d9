"""FOV moves inside a training example, on the device.

An example is a crop of FOV + 2 * deltas * fov_moves voxels around a centre
(`ffnjax.examples`). Inside it the FOV can sit at the positions of a small
lattice: offsets -fov_moves..fov_moves (in units of deltas) along each axis.
`run_fovs` evaluates a batch of examples as one `lax.scan` over a fixed number
of FOV *slots* (static shapes, one compiled computation). In each slot every
example picks its next lattice position (its movement policy), or takes none;
the slot then runs the net on the FOVs that were taken, writes their logits
into the example's mask canvas and adds their loss (and gradient) to running
sums.

Two movement policies, each one small function returning a `MovePolicy`:

* `fixed_policy` ('fixed', google/ffn's `fixed_offsets`): the centre, then the
  lattice positions in the example's shuffled order (`move_orders`), each
  taken only when the canvas at its FOV centre passes the move threshold.
* `max_pred_policy` ('max_pred_moves', google/ffn's `max_pred_offsets`): after
  each FOV, every face of the +-delta cube whose maximum reaches the threshold
  (`ffnjax.movement`, the rule the flood fill uses) queues the neighbouring
  lattice position in that direction; the earliest-queued unvisited position
  goes next. Departure from google/ffn: it moves on the lattice (to the
  neighbour one delta away) rather than to the face's argmax voxel, and queues
  faces in face order rather than by score, so that the slots stay static.

Gradients between moves are stopped, as in google/ffn: each FOV's mask input
is the canvas with `stop_gradient`, so the gradient of an FOV flows only
through its own forward pass.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ffnjax import movement
from ffnjax.config import TrainConfig, logit

F1_THRESHOLD = 0.9         # mask precision / recall / F1 are measured at this probability
_NEVER = 2**30             # 'not queued' in max_pred_policy's queue times

__all__ = ["F1_THRESHOLD", "lattice_offsets", "fov_starts", "move_orders", "initial_canvas",
           "fov_slots", "MovePolicy", "fixed_policy", "max_pred_policy", "loss_denominator",
           "run_fovs"]


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


def fov_slots(config: TrainConfig) -> int:
    """FOV slots per example (the length of `run_fovs`'s scan): every lattice
    position, or 1 + max_moves when moves are capped."""
    n_pos = (2 * config.fov_moves + 1) ** 3
    return n_pos if not config.max_moves else min(n_pos, 1 + config.max_moves)


# ----------------------------------------------------------------------------
# FOV crops of the example arrays and the mask canvas
# ----------------------------------------------------------------------------

def _slice_fovs(vol: jax.Array, starts: jax.Array, size: tuple[int, int, int]) -> jax.Array:
    """Per-example FOV crops: vol (B,z,y,x,C), starts (B,3) -> (B,*size,C)."""
    def one(v, s):
        return lax.dynamic_slice(v, (s[0], s[1], s[2], 0), (*size, v.shape[-1]))
    return jax.vmap(one)(vol, starts)


def _write_fovs(vol: jax.Array, update: jax.Array, starts: jax.Array) -> jax.Array:
    """`vol` (B,z,y,x,C) with each example's FOV crop at `starts` (B,3) replaced by `update`."""
    def one(v, u, s):
        return lax.dynamic_update_slice(v, u, (s[0], s[1], s[2], 0))
    return jax.vmap(one)(vol, update, starts)


def initial_canvas(config: TrainConfig, batch: int) -> jax.Array:
    """Mask logits (B, crop, 1): logit(pad_prob) everywhere, logit(seed_prob) at the centre."""
    size = config.crop_size
    canvas = jnp.full((batch, *size, 1), logit(config.pad_prob), jnp.float32)
    c = tuple(s // 2 for s in size)
    return canvas.at[:, c[0], c[1], c[2], 0].set(logit(config.seed_prob))


# ----------------------------------------------------------------------------
# Movement policies
# ----------------------------------------------------------------------------

class MovePolicy(NamedTuple):
    """How each example of a batch picks its FOVs, as three pure functions over
    a small state pytree (carried through `run_fovs`'s scan).

    Attributes:
      init: `init(batch_size) -> state` before the first slot.
      choose: `choose(state, canvas) -> (pos (B,) int32, taken (B,) bool,
        state)`: the lattice index each example evaluates in this slot, and
        whether it evaluates one at all.
      observe: `observe(state, slot, pos, taken, logits) -> state` after the
        slot's FOVs were evaluated (`logits` (B, *fov_size, 1)).
    """

    init: Callable[[int], dict]
    choose: Callable[[dict, jax.Array], tuple[jax.Array, jax.Array, dict]]
    observe: Callable[[dict, jax.Array, jax.Array, jax.Array, jax.Array], dict]


def fixed_policy(config: TrainConfig, order: jax.Array) -> MovePolicy:
    """google/ffn's fixed policy, with the skipped positions packed out.

    Slot 0 is the centre; each later slot takes the next position of the
    example's `order` (B, P) whose FOV centre voxel exceeds logit(move_threshold)
    on the canvas. An example's canvas changes only when it evaluates a FOV, so
    checking the skipped positions now gives the same decisions as checking
    them one per slot -- but the slots stay packed: a batch costs the largest
    number of FOVs any one example takes, not the union.
    """
    n_pos = order.shape[1]
    centres = jnp.asarray(fov_starts(config)) + jnp.asarray(config.model.fov_radius, jnp.int32)
    order_centres = centres[order]                 # (B, P, 3): each example's FOV centres, in order
    thr = jnp.float32(logit(config.move_threshold))

    def init(b):
        return dict(ptr=jnp.zeros((b,), jnp.int32))

    def choose(state, canvas):
        ptr = state["ptr"]
        b = canvas.shape[0]
        value = canvas[jnp.arange(b)[:, None], order_centres[..., 0], order_centres[..., 1],
                       order_centres[..., 2], 0]                                 # (B, P)
        index = jnp.arange(n_pos, dtype=jnp.int32)[None, :]
        ok = (index >= ptr[:, None]) & ((value > thr) | ((index == 0) & (ptr[:, None] == 0)))
        first = jnp.argmax(ok, axis=1).astype(jnp.int32)
        taken = jnp.any(ok, axis=1)
        pos = jnp.take_along_axis(order, first[:, None], axis=1)[:, 0]
        return pos, taken, dict(ptr=jnp.where(taken, first + 1, n_pos))

    def observe(state, slot, pos, taken, logits):
        del slot, pos, taken, logits
        return state

    return MovePolicy(init, choose, observe)


def _neighbour_table(fov_moves: int, directions: tuple[tuple[int, int], ...]) -> np.ndarray:
    """(P, F) lattice index of the neighbour one step along each (axis, sign)
    of `directions` from every lattice position, -1 off the lattice."""
    offsets = lattice_offsets(fov_moves)
    side = 2 * fov_moves + 1
    table = np.full((len(offsets), len(directions)), -1, np.int32)
    for p, o in enumerate(offsets):
        for k, (axis, sign) in enumerate(directions):
            q = o.copy()
            q[axis] += sign
            if np.all(np.abs(q) <= fov_moves):
                table[p, k] = np.ravel_multi_index(tuple(q + fov_moves), (side,) * 3)
    return table


def max_pred_policy(config: TrainConfig) -> MovePolicy:
    """Inference's face-max rule (`ffnjax.movement`) on the example's lattice.

    Each FOV evaluated queues, for every face whose maximum logit reaches
    logit(move_threshold), the neighbouring lattice position in that face's
    direction; slot s takes the earliest-queued position not yet visited
    (first in, first out; faces of one FOV in `movement.face_directions` order).
    """
    mc = config.model
    n_pos = (2 * config.fov_moves + 1) ** 3
    directions = movement.face_directions(mc.deltas)
    neighbours = jnp.asarray(_neighbour_table(config.fov_moves, directions))
    n_faces = len(directions)
    thr = jnp.float32(logit(config.move_threshold))

    def init(b):
        return dict(visited=jnp.zeros((b, n_pos), bool),
                    queued=jnp.full((b, n_pos), _NEVER, jnp.int32).at[:, n_pos // 2].set(0))

    def choose(state, canvas):
        del canvas
        b = state["queued"].shape[0]
        cand = (state["queued"] < _NEVER) & ~state["visited"]
        pos = jnp.argmin(jnp.where(cand, state["queued"], _NEVER), axis=-1).astype(jnp.int32)
        taken = jnp.any(cand, axis=-1)
        visited = state["visited"].at[jnp.arange(b), pos].max(taken)
        return pos, taken, dict(state, visited=visited)

    def observe(state, slot, pos, taken, logits):
        b = pos.shape[0]
        scores, _ = jax.vmap(lambda p: movement.face_maxima(p, mc.fov_radius, mc.deltas))(
            logits[..., 0])                                                   # (B, F)
        nb = neighbours[pos]                                                  # (B, F)
        ok = movement.wanted(scores, thr) & taken[:, None] & (nb >= 0)
        when = (slot + 1) * n_faces + jnp.arange(n_faces, dtype=jnp.int32)   # FIFO, then face order
        queued = state["queued"].at[jnp.arange(b)[:, None], jnp.where(ok, nb, 0)].min(
            jnp.where(ok, when[None, :], _NEVER))
        return dict(state, queued=queued)

    return MovePolicy(init, choose, observe)


# ----------------------------------------------------------------------------
# The slot machinery shared by both policies
# ----------------------------------------------------------------------------

def _fov_loss(apply_fn: Callable, p: Any, fovs: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(summed weighted sigmoid cross-entropy, logits) of one slot's FOVs."""
    logits = apply_fn(p, fovs["image"], fovs["mask"])
    ce = optax.sigmoid_binary_cross_entropy(logits, fovs["target"])
    return jnp.sum(ce * fovs["weight"]), logits


def _slot_counts(logits: jax.Array, fovs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Weighted true / false positive and false negative voxel counts of one
    slot at F1_THRESHOLD (weight is zero where no FOV was taken)."""
    pred = (logits > jnp.float32(logit(F1_THRESHOLD))).astype(jnp.float32)
    truth = (fovs["target"] > 0.5).astype(jnp.float32)
    w = fovs["weight"]
    return dict(tp=jnp.sum(w * pred * truth), fp=jnp.sum(w * pred * (1 - truth)),
                fn=jnp.sum(w * (1 - pred) * truth))


def loss_denominator(config: TrainConfig, weight_sum: jax.Array, voxel_sum: jax.Array) -> jax.Array:
    """What a loss (and gradient) sum is divided by: the summed weight
    ('weight', ffnjax) or the voxel count of the evaluated FOVs ('voxels',
    google/ffn's reduce_mean), at least 1."""
    denom = weight_sum if config.loss_normalization == "weight" else voxel_sum
    return jnp.maximum(denom, 1.0)


def _evaluate_slot(apply_fn: Callable, carry: dict, params: Any, fovs: dict[str, jax.Array],
                   taken: jax.Array, *, with_grad: bool, update: Callable | None,
                   axis_name: str | None, zero_grads: Any, norm: jax.Array) -> tuple:
    """Runs the net on one slot's FOVs, or nothing when no example takes the slot.

    `norm` is the slot's (weight_sum, voxel_sum) handed to `update`.

    Returns (loss_sum, logits, grad or None[, params, opt_state after `update`]);
    logits are the mask input where nothing ran.
    """
    p_now = carry["params"] if update is not None else params

    def evaluate(_):
        if with_grad:
            (ls, logits), g = jax.value_and_grad(lambda p: _fov_loss(apply_fn, p, fovs),
                                                 has_aux=True)(p_now)
        else:
            (ls, logits), g = _fov_loss(apply_fn, p_now, fovs), None
        if update is None:
            return ls, logits, g
        return (ls, logits, g) + tuple(update(p_now, carry["opt_state"], g, *norm))

    def skip(_):  # no example takes this slot: nothing to compute
        if update is None:
            return jnp.float32(0), fovs["mask"], zero_grads
        return jnp.float32(0), fovs["mask"], zero_grads, p_now, carry["opt_state"]

    any_taken = jnp.any(taken)
    if update is not None and axis_name is not None:
        # The update is collective: every device must take the same branch.
        any_taken = lax.pmax(any_taken.astype(jnp.int32), axis_name) > 0
    return lax.cond(any_taken, evaluate, skip, None)


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
      config: geometry, policy (`config.move_policy`) and thresholds.
      with_grad: also accumulate d(loss_sum)/d(params).
      update: `update(params, opt_state, grad_sum, weight_sum, voxel_sum) ->
        (params, opt_state)`, applied with each slot's sums after every slot that some
        example takes, so later FOVs see the updated parameters (google/ffn's
        one optimiser step per FOV); needs `with_grad` and `opt_state`.
      axis_name: the mesh axis under `shard_map` when `update` is given (the
        update is collective, so every device must take the same branch).

    Returns a dict:
      loss_sum, weight_sum, voxel_sum: summed weighted sigmoid cross-entropy,
        summed weight and voxel count over every taken FOV (loss = loss_sum /
        `loss_denominator(config, weight_sum, voxel_sum)`).
      grad_sum: gradient of loss_sum (None without `with_grad`).
      tp, fp, fn: weighted voxel counts of (prob > 0.9) vs (target > 0.5).
      taken: (B, S) bool, slot s of example b was evaluated (S = `fov_slots`).
      positions: (B, S) lattice index evaluated in each slot.
      canvas: (B, *crop_size, 1) final mask logits.
      params, opt_state: after the last update (None without `update`).

    `config.max_moves` > 0 caps the slots at S = 1 + max_moves per example.
    """
    fov = config.model.fov_size
    fov_voxels = float(np.prod(fov))
    starts_tab = jnp.asarray(fov_starts(config))
    policy = fixed_policy(config, order) if config.move_policy == "fixed" else max_pred_policy(config)
    b = batch["image"].shape[0]
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params) if with_grad else None

    def slot(carry, s):
        pos, taken, moves = policy.choose(carry["moves"], carry["canvas"])
        starts = starts_tab[pos]
        fovs = {k: _slice_fovs(batch[k], starts, fov) for k in ("image", "target", "weight")}
        fovs["weight"] = fovs["weight"] * taken[:, None, None, None, None]
        fovs["mask"] = lax.stop_gradient(_slice_fovs(carry["canvas"], starts, fov))
        norm = (jnp.sum(fovs["weight"]), jnp.sum(taken).astype(jnp.float32) * fov_voxels)
        res = _evaluate_slot(apply_fn, carry, params, fovs, taken, with_grad=with_grad,
                             update=update, axis_name=axis_name, zero_grads=zero_grads, norm=norm)
        ls, logits, g = res[:3]
        out = dict(carry, moves=policy.observe(moves, s, pos, taken, logits))
        if update is not None:
            out["params"], out["opt_state"] = res[3], res[4]
        new_fov = jnp.where(taken[:, None, None, None, None], logits, fovs["mask"])
        out["canvas"] = _write_fovs(carry["canvas"], new_fov, starts)
        out["loss_sum"] = carry["loss_sum"] + ls
        out["weight_sum"] = carry["weight_sum"] + norm[0]
        out["voxel_sum"] = carry["voxel_sum"] + norm[1]
        if with_grad:
            out["grad_sum"] = jax.tree_util.tree_map(jnp.add, carry["grad_sum"], g)
        for k, v in _slot_counts(logits, fovs).items():
            out[k] = carry[k] + v
        return out, (taken, pos)

    carry = dict(canvas=initial_canvas(config, b), loss_sum=jnp.float32(0),
                 weight_sum=jnp.float32(0), voxel_sum=jnp.float32(0), tp=jnp.float32(0), fp=jnp.float32(0),
                 fn=jnp.float32(0), moves=policy.init(b))
    if with_grad:
        carry["grad_sum"] = zero_grads
    if update is not None:
        carry["params"], carry["opt_state"] = params, opt_state
    carry, (taken, positions) = lax.scan(slot, carry, jnp.arange(fov_slots(config)))
    return dict(loss_sum=carry["loss_sum"], weight_sum=carry["weight_sum"],
                voxel_sum=carry["voxel_sum"], grad_sum=carry.get("grad_sum"), tp=carry["tp"], fp=carry["fp"], fn=carry["fn"],
                taken=taken.T, positions=positions.T, canvas=carry["canvas"],
                params=carry.get("params"), opt_state=carry.get("opt_state"))
