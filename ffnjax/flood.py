"""Flood-filling inference: one object per seed, filled on the device.

The algorithm is google/ffn's `Canvas.segment_at` / `segment_all` with the
`FaceMaxMovementPolicy`, restated as a pure `lax.while_loop`:

* **State** (`FillState`, a NamedTuple that lives on the device): the canvas of
  mask logits over the whole subvolume (NaN = never visited; a FOV cut from it
  reads NaN as the pad value), a FIFO queue of FOV centres (array + head/tail),
  a lattice of visited positions (centres quantised by the deltas, relative to
  the seed, so no lattice cell is evaluated twice), step counter, bounding box of
  the evaluated centres, and an overflow flag.
* **One iteration** (`body_fn`) takes, from the next `8 * batch_size` queue
  entries, the first `batch_size` valid ones (valid = a whole FOV fits inside
  the subvolume, its lattice cell is unvisited, the canvas there is at least
  the move threshold; checked for the whole window at once, no nested loop),
  cuts their FOVs with `lax.dynamic_slice`, runs the network once on the batch,
  writes each prediction back with `lax.dynamic_update_slice` (in queue order),
  and pushes, for each of the 6 faces of the cube of half-size `deltas` around
  each centre, the position of the face's maximum when it passes the move
  threshold. Pushes are ordered by score (highest first), ties by relative
  offset, exactly as google/ffn sorts them.
* **Stop** (`cond_fn`): empty queue, the seed's own voxel fell below the move
  threshold, or the step budget (`max_steps`) is used up.

The queue's capacity is 1 + (number of faces) x (number of lattice cells that a
valid centre can fall into). Every evaluation claims one distinct lattice cell
and pushes at most one position per face, so the queue cannot overflow; an
overflow flag is still carried and raises if it is ever set.

Departures from google/ffn (none of them change the result with batch_size 1):

* Lattice cells are marked visited when a position is *popped* and accepted
  (google/ffn marks them right after evaluating it: the same thing when one
  position is evaluated at a time), and positions whose cell is already
  visited or whose FOV would leave the subvolume are not pushed at all (google
  pushes them and discards them on pop). With `batch_size > 1` marking at pop
  time is what keeps two positions of one batch from sharing a cell.
* `batch_size > 1` evaluates several queued positions in one network call, all
  cut from the canvas as it was before the batch. This is an approximation of
  the sequential algorithm (later positions of a batch do not see the
  predictions of earlier ones), traded for keeping an accelerator busy.

Committing objects (`commit_object`) happens on the host in NumPy between
fills, as in `Canvas.segment_all`: earlier objects win overlaps, objects below
`min_segment_size` are dropped and their seed voxel marked -1 so it is not
retried, seeds inside or within `min_boundary_dist` of an object are skipped,
and a seed whose own voxel falls below the move threshold is dropped.

Python API::

    seg, info = segment(image, params, model_config, options)   # uint64 z,y,x
    prob = fill(image, seed_zyx, params, model_config, options) # float32 z,y,x
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy.special import expit
from tqdm.auto import tqdm

from ffnjax import platform, seeds as seeds_lib
from ffnjax.config import InferenceOptions, ModelConfig, logit
from ffnjax.nets import make_apply_fn, normalize_image

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

# A voxel once driven below probability 0.5 (logit 0) is not revived when
# `disconnected_seeds` is on (google/ffn's `disco_seeds`).
DISCO_LOGIT = 0.0
UNSEGMENTED_SEED = -1  # marks a tried seed voxel so it is not retried


# ----------------------------------------------------------------------------
# Static description of one compiled fill.


@dataclasses.dataclass(frozen=True)
class FillSpec:
    """Everything a compiled fill depends on statically (hashable, the jit cache key).

    Attributes:
      shape: subvolume shape z,y,x.
      fov_size, deltas: from the ModelConfig.
      init_logit, pad_logit, move_logit: thresholds of InferenceOptions as logits.
      disconnected_seeds, max_steps, batch_size: from InferenceOptions.
      trace: also record every evaluated FOV centre (tests, notebooks).
    """

    shape: tuple[int, int, int]
    fov_size: tuple[int, int, int]
    deltas: tuple[int, int, int]
    init_logit: float
    pad_logit: float
    move_logit: float
    disconnected_seeds: bool
    max_steps: int
    batch_size: int
    trace: bool = False

    @classmethod
    def from_configs(cls, shape: Sequence[int], model_config: ModelConfig,
                     options: InferenceOptions, trace: bool = False) -> "FillSpec":
        shape = tuple(int(s) for s in shape)
        check_image_shape(shape, model_config.fov_size)
        return cls(shape=shape, fov_size=model_config.fov_size, deltas=model_config.deltas,
                   init_logit=logit(options.init_activation), pad_logit=logit(options.pad_value),
                   move_logit=logit(options.move_threshold),
                   disconnected_seeds=bool(options.disconnected_seeds),
                   max_steps=int(options.max_steps), batch_size=int(options.batch_size),
                   trace=bool(trace))

    @property
    def radius(self) -> tuple[int, int, int]:
        return tuple(s // 2 for s in self.fov_size)  # type: ignore[return-value]

    @property
    def lattice_shape(self) -> tuple[int, int, int]:
        """Lattice cells a valid centre can fall into, per axis.

        Valid centres along an axis span n = shape - 2 * radius positions; any
        such interval meets at most (n - 1) // step + 2 cells of width `step`.
        """
        out = []
        for s, r, d in zip(self.shape, self.radius, self.deltas):
            n = s - 2 * r
            out.append((n - 1) // max(d, 1) + 2)
        return tuple(out)  # type: ignore[return-value]

    @property
    def num_faces(self) -> int:
        return 2 * sum(1 for d in self.deltas if d > 0)

    @property
    def queue_capacity(self) -> int:
        return 1 + self.num_faces * math.prod(self.lattice_shape)

    @property
    def pop_window(self) -> int:
        """Queue entries examined per iteration to find up to batch_size valid ones."""
        return 8 * self.batch_size

    @property
    def trace_capacity(self) -> int:
        return math.prod(self.lattice_shape)


def check_image_shape(shape: Sequence[int], fov_size: Sequence[int]) -> None:
    """Raises ValueError unless `shape` is a z,y,x shape holding at least one whole FOV."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"image must be a 3D z,y,x volume, got shape {shape}")
    if any(s < f for s, f in zip(shape, fov_size)):
        raise ValueError(f"image shape {shape} (z,y,x) is smaller than the network's FOV "
                         f"{tuple(fov_size)}: flood filling needs at least one whole FOV")


class FillState(NamedTuple):
    """Device state of one flood fill (see the module docstring)."""

    canvas: jax.Array    # (Z, Y, X) float32 logits, NaN where never written
    queue: jax.Array     # (capacity + pop window, 3) int32 FOV centres
    head: jax.Array      # int32, next position to pop
    tail: jax.Array      # int32, next free slot
    visited: jax.Array   # lattice_shape bool
    steps: jax.Array     # int32 FOV evaluations so far
    calls: jax.Array     # int32 network calls so far (one per batch of <= batch_size FOVs)
    lo: jax.Array        # (3,) int32 smallest evaluated centre
    hi: jax.Array        # (3,) int32 largest evaluated centre
    overflow: jax.Array  # bool, a push found the queue full (never expected)
    trace: jax.Array     # (trace_capacity or 1, 3) int32 evaluated centres, in order


# ----------------------------------------------------------------------------
# The pure loop.


def _geometry(spec: FillSpec):
    r = jnp.asarray(spec.radius, jnp.int32)
    upper = jnp.asarray(spec.shape, jnp.int32) - 1 - r
    step = jnp.asarray([max(d, 1) for d in spec.deltas], jnp.int32)
    half = jnp.asarray([d // 2 for d in spec.deltas], jnp.int32)
    return r, upper, step, half


def _in_bounds(spec: FillSpec, pos: jax.Array) -> jax.Array:
    r, upper, _, _ = _geometry(spec)
    return jnp.all((pos >= r) & (pos <= upper), axis=-1)


def _cell(spec: FillSpec, pos: jax.Array, origin: jax.Array) -> jax.Array:
    """Lattice cell of `pos`: (pos - origin + delta // 2) // delta, as google/ffn's
    `quantize_pos` (the seed sits mid-cell), shifted so the lowest valid centre
    is in cell 0. Clipped so that invalid positions still index safely (callers
    combine the result with `_in_bounds`)."""
    r, _, step, half = _geometry(spec)
    cell = (pos - origin + half) // step - (r - origin + half) // step
    return jnp.clip(cell, 0, jnp.asarray(spec.lattice_shape, jnp.int32) - 1)


def _face_moves(spec: FillSpec, pred: jax.Array, pos: jax.Array):
    """Scores and target centres of the 6 face maxima one delta away.

    The face perpendicular to `axis` sits at centre +- delta along it and spans
    centre +- delta along the other two axes (google/ffn's
    `get_scored_move_offsets`). Returns (scores (F,), targets (F, 3), rel (F, 3)).
    """
    c = spec.radius
    d = spec.deltas
    scores, rels = [], []
    for axis in range(3):
        if d[axis] == 0:
            continue
        others = [a for a in range(3) if a != axis]
        for sign in (-1, 1):
            sel = [slice(c[a] - d[a], c[a] + d[a] + 1) for a in range(3)]
            sel[axis] = c[axis] + sign * d[axis]
            face = pred[tuple(sel)]
            flat = jnp.argmax(face)  # first maximum in C order, like np.argmax
            i, j = jnp.unravel_index(flat, face.shape)
            rel = [None, None, None]
            rel[axis] = jnp.int32(sign * d[axis])
            rel[others[0]] = (i - d[others[0]]).astype(jnp.int32)
            rel[others[1]] = (j - d[others[1]]).astype(jnp.int32)
            scores.append(face.reshape(-1)[flat])
            rels.append(jnp.stack(rel))
    scores = jnp.stack(scores)
    rels = jnp.stack(rels)
    return scores, pos[None, :] + rels, rels


def init_fill_state(spec: FillSpec, seed: jax.Array) -> FillState:
    """Canvas all NaN but the seed voxel (init logit); the queue holds the seed."""
    seed = jnp.asarray(seed, jnp.int32)
    canvas = jnp.full(spec.shape, jnp.nan, jnp.float32)
    canvas = canvas.at[tuple(seed)].set(jnp.float32(spec.init_logit))
    # Padded by one pop window so that dynamic_slice at any head never clamps.
    queue = jnp.zeros((spec.queue_capacity + spec.pop_window, 3), jnp.int32).at[0].set(seed)
    big = jnp.iinfo(jnp.int32).max
    return FillState(
        canvas=canvas, queue=queue, head=jnp.int32(0), tail=jnp.int32(1),
        visited=jnp.zeros(spec.lattice_shape, bool), steps=jnp.int32(0), calls=jnp.int32(0),
        lo=jnp.full((3,), big, jnp.int32), hi=jnp.full((3,), -1, jnp.int32),
        overflow=jnp.bool_(False),
        trace=jnp.full((spec.trace_capacity if spec.trace else 1, 3), -1, jnp.int32))


def make_fill_fns(spec: FillSpec, apply_fn: ApplyFn):
    """(cond_fn, body_fn) of the fill loop for `spec`, closed over nothing traced.

    Both take `(params, image, seed, state)`; `image` is the normalised z,y,x
    float32 subvolume and `seed` the z,y,x int32 origin of the fill.
    """
    B = spec.batch_size
    r = np.asarray(spec.radius, np.int32)
    move = jnp.float32(spec.move_logit)
    pad = jnp.float32(spec.pad_logit)

    def cond_fn(params, image, seed, st: FillState) -> jax.Array:
        del params, image
        alive = (st.head < st.tail) & (st.canvas[tuple(seed)] >= move)
        if spec.max_steps:
            alive &= st.steps < spec.max_steps
        return alive

    def pop(seed, st: FillState):
        """Takes up to B valid positions from the next `pop_window` queue entries.

        Vectorised (no nested loop, so no per-entry host sync on accelerators):
        an entry is a candidate when it is queued, its FOV fits, its lattice
        cell is unvisited and the canvas there passes the move threshold; the
        first candidate of each cell is valid; the first B valid entries are
        accepted. Entries before the last accepted one are consumed, the rest
        stay queued. This accepts exactly what popping one entry at a time
        would (google/ffn's order); only a batch may come out short when the
        window holds fewer than B valid entries.
        """
        K = spec.pop_window
        limit = B if not spec.max_steps else jnp.minimum(B, spec.max_steps - st.steps)
        window = jax.lax.dynamic_slice(st.queue, (st.head, 0), (K, 3))
        order = jnp.arange(K, dtype=jnp.int32)
        present = st.head + order < st.tail
        cells = jax.vmap(lambda p: _cell(spec, p, seed))(window)
        value = st.canvas[tuple(jnp.clip(window, 0, jnp.asarray(spec.shape) - 1).T)]
        cand = (present & _in_bounds(spec, window) & ~st.visited[tuple(cells.T)]
                & (value >= move))
        same_cell = jnp.all(cells[:, None, :] == cells[None, :, :], axis=-1)
        earlier = order[None, :] < order[:, None]
        valid = cand & ~jnp.any(same_cell & earlier & cand[None, :], axis=1)
        rank = jnp.cumsum(valid.astype(jnp.int32))
        accept = valid & (rank <= limit)
        n = jnp.minimum(rank[-1], limit)
        last = jnp.max(jnp.where(accept, order, -1))
        head = jnp.where(n >= limit, st.head + last + 1, jnp.minimum(st.head + K, st.tail))
        slots = jnp.broadcast_to(seed, (B, 3)).astype(jnp.int32)  # a valid dummy centre
        slots = slots.at[jnp.where(accept, rank - 1, B)].set(window, mode="drop")
        drop = jnp.asarray(spec.lattice_shape, jnp.int32)  # out of range: not written
        marks = jnp.where(accept[:, None], cells, drop[None, :])
        visited = st.visited.at[tuple(marks.T)].set(True, mode="drop")
        return head, visited, slots, n

    def evaluate(params, image, seed, st: FillState, slots, n) -> FillState:
        starts = slots - r
        cut = lambda vol, s: jax.lax.dynamic_slice(vol, s, spec.fov_size)  # noqa: E731
        images = jax.vmap(cut, (None, 0))(image, starts)
        masks = jax.vmap(cut, (None, 0))(st.canvas, starts)
        masks = jnp.where(jnp.isnan(masks), pad, masks)
        logits = apply_fn(params, images[..., None], masks[..., None])
        logits = logits.reshape((B, *spec.fov_size)).astype(jnp.float32)

        canvas, queue, tail, lo, hi, trace = st.canvas, st.queue, st.tail, st.lo, st.hi, st.trace
        overflow = st.overflow
        cap = spec.queue_capacity
        drop = queue.shape[0]  # beyond the padded queue: a push that is not made
        for i in range(B):  # static: B is small; writes are applied in queue order
            valid = i < n
            old = cut(canvas, starts[i])
            new = logits[i]
            if spec.disconnected_seeds:
                # NaN (never visited) compares False, so such voxels may rise.
                new = jnp.where((old < DISCO_LOGIT) & (new > old), old, new)
            new = jnp.where(valid, new, old)
            canvas = jax.lax.dynamic_update_slice(canvas, new, starts[i])

            scores, targets, rels = _face_moves(spec, new, slots[i])
            cells = jax.vmap(lambda p: _cell(spec, p, seed))(targets)
            seen = st.visited[tuple(cells.T)]
            ok = valid & (scores >= move) & _in_bounds(spec, targets) & ~seen
            # google/ffn: sorted((score, rel), reverse=True) -> score, then z, y, x descending.
            order = jnp.lexsort((-rels[:, 2], -rels[:, 1], -rels[:, 0], -scores))
            targets, ok = targets[order], ok[order]
            idx = tail + jnp.cumsum(ok.astype(jnp.int32)) - 1
            queue = queue.at[jnp.where(ok & (idx < cap), idx, drop)].set(targets, mode="drop")
            pushed = ok.sum(dtype=jnp.int32)
            overflow |= tail + pushed > cap
            tail = jnp.minimum(tail + pushed, cap)

            lo = jnp.where(valid, jnp.minimum(lo, slots[i]), lo)
            hi = jnp.where(valid, jnp.maximum(hi, slots[i]), hi)
            if spec.trace:
                trace = trace.at[jnp.where(valid, st.steps + i, spec.trace_capacity)].set(
                    slots[i], mode="drop")
        return st._replace(canvas=canvas, queue=queue, tail=tail, steps=st.steps + n,
                           calls=st.calls + 1,
                           lo=lo, hi=hi, overflow=overflow, trace=trace)

    def body_fn(params, image, seed, st: FillState) -> FillState:
        head, visited, slots, n = pop(seed, st)
        st = st._replace(head=head, visited=visited)
        return jax.lax.cond(n > 0, lambda s: evaluate(params, image, seed, s, slots, n),
                            lambda s: s, st)

    return cond_fn, body_fn


def fill_mesh(batch_size: int) -> Mesh | None:
    """The devices that share each batch of FOVs of a batched fill, or None.

    On CPU, with several host devices (one per core: `ffnjax.hostdevices`)
    and `batch_size` >= 2, each batch of FOVs is split over
    gcd(batch_size, devices) of them, so every core runs its share of the
    network. Accelerators keep a fill on one device: there one device is
    already parallel, and splitting would add a transfer per step.
    """
    if batch_size < 2 or jax.default_backend() != "cpu":
        return None
    devices = platform.devices_for_batch(batch_size, jax.local_devices())
    return platform.batch_mesh(devices) if len(devices) > 1 else None


def fill_network(apply_fn: ApplyFn, mesh: Mesh | None) -> ApplyFn:
    """`apply_fn` as a fill on `mesh` (from `fill_mesh`) calls it: a
    `jax.shard_map` over the mesh (each device its share of the FOVs, params
    replicated), or `apply_fn` itself when mesh is None."""
    return apply_fn if mesh is None else platform.shard_batch(apply_fn, mesh)


def place_fill_inputs(mesh: Mesh | None, params: Any, image: jax.Array) -> tuple[Any, jax.Array]:
    """params and image where a fill on `mesh` (from `fill_mesh`) wants them:
    replicated on its devices, or unchanged when mesh is None. Placing them
    once per volume makes the per-seed placement in `compiled_fill` a no-op."""
    if mesh is None:
        return params, image
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.device_put(params, replicated), jax.device_put(image, replicated)


@functools.lru_cache(maxsize=64)
def compiled_fill(spec: FillSpec, apply_fn: ApplyFn):
    """The jitted `run(params, image, seed) -> FillState` for `spec`, cached per
    (spec, apply_fn) so that every seed after the first reuses the executable.

    With a `fill_mesh`, the loop's bookkeeping runs replicated on the mesh's
    devices and the network call inside it is a `jax.shard_map` over the FOV
    batch; params and image are placed replicated on the mesh first
    (`place_fill_inputs`: a no-op when the caller placed them already).
    """
    mesh = fill_mesh(spec.batch_size)
    cond_fn, body_fn = make_fill_fns(spec, fill_network(apply_fn, mesh))

    def run(params, image, seed):
        seed = jnp.asarray(seed, jnp.int32)
        st = init_fill_state(spec, seed)
        return jax.lax.while_loop(lambda s: cond_fn(params, image, seed, s),
                                  lambda s: body_fn(params, image, seed, s), st)

    jitted = jax.jit(run)
    if mesh is None:
        return jitted

    def placed(params, image, seed):
        return jitted(*place_fill_inputs(mesh, params, image), seed)

    return placed


@functools.lru_cache(maxsize=16)
def default_apply_fn(model_config: ModelConfig) -> ApplyFn:
    """The convstack's apply_fn, one object per config (so the jit cache hits)."""
    return make_apply_fn(model_config)


def check_apply_fn(apply_fn: ApplyFn, params: Any, model_config: ModelConfig,
                   batch_size: int = 1) -> None:
    """Raises ValueError unless `apply_fn(params, img, mask)` maps (B, *fov, 1) to (B, *fov, 1)."""
    shape = (batch_size, *model_config.fov_size, 1)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    try:
        out = jax.eval_shape(apply_fn, params, x, x)
    except Exception as e:  # flax raises many kinds for mismatched parameter trees
        raise ValueError(f"the network cannot run on FOVs of shape {shape} (fov_size "
                         f"{model_config.fov_size}) with these parameters: {e}") from e
    if tuple(out.shape) != shape:
        raise ValueError(f"the network maps FOVs of shape {shape} to {tuple(out.shape)}; "
                         f"flood filling needs logits of the FOV's shape (fov_size "
                         f"{model_config.fov_size})")


def _as_array(image: Any) -> np.ndarray:
    """A numpy z,y,x array from a numpy array or a volume object (`read(start, size)`)."""
    if isinstance(image, (np.ndarray, jax.Array)):
        arr = np.asarray(image)
    elif hasattr(image, "read") and hasattr(image, "shape"):
        shape = tuple(int(s) for s in image.shape)[:3]
        arr = np.asarray(image.read((0, 0, 0), shape))
    else:
        raise ValueError(f"image must be a z,y,x numpy array or a volume object, got {type(image).__name__}")
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"image must be a 3D z,y,x volume, got shape {arr.shape}")
    return arr


def _check_seed(seed: Sequence[int], spec: FillSpec) -> np.ndarray:
    seed = np.asarray(seed, np.int64).reshape(-1)
    if seed.shape != (3,):
        raise ValueError(f"seed must be a z,y,x triple, got {seed!r}")
    r = np.asarray(spec.radius)
    if np.any(seed < r) or np.any(seed > np.asarray(spec.shape) - 1 - r):
        raise ValueError(f"seed {tuple(int(s) for s in seed)} is closer than the FOV radius "
                         f"{spec.radius} to the border of the {spec.shape} image; a fill must "
                         "start where a whole FOV fits")
    return seed


def run_fill(spec: FillSpec, apply_fn: ApplyFn, params: Any, image_dev: jax.Array,
             seed: Sequence[int]) -> FillState:
    """Runs one compiled fill (blocking) and raises if the queue ever overflowed."""
    st = compiled_fill(spec, apply_fn)(params, image_dev, jnp.asarray(seed, jnp.int32))
    if bool(st.overflow):
        raise RuntimeError(f"flood-fill queue overflowed (capacity {spec.queue_capacity}); "
                           "this is a bug: the capacity is sized from the lattice")
    return st


def fill(image: Any, seed_zyx: Sequence[int], params: Any, model_config: ModelConfig,
         options: InferenceOptions = InferenceOptions(), apply_fn: ApplyFn | None = None,
         *, with_trace: bool = False):
    """Flood-fills one object from `seed_zyx` and returns its probability map.

    Args:
      image: z,y,x raw image (numpy or volume object); normalised with
        `options.image_mean` / `options.image_stddev`.
      seed_zyx: starting voxel; must be at least the FOV radius from every border.
      params, model_config: the network and its geometry.
      options: InferenceOptions (thresholds, disco seeds, step budget, batch size).
      apply_fn: `apply_fn(params, image_fov, mask_logits_fov) -> logits`
        (default: the convstack of `model_config`).
      with_trace: also return a dict with 'steps' and 'positions' (the
        evaluated FOV centres in order, (steps, 3)).

    Returns:
      float32 z,y,x probabilities (sigmoid of the canvas; never-visited voxels
      read as `options.pad_value`), or `(probabilities, trace)` when with_trace.
    """
    arr = _as_array(image)
    spec = FillSpec.from_configs(arr.shape, model_config, options, trace=with_trace)
    seed = _check_seed(seed_zyx, spec)
    apply_fn = apply_fn or default_apply_fn(model_config)
    check_apply_fn(apply_fn, params, model_config, spec.batch_size)
    image_dev = normalize_image(arr, options.image_mean, options.image_stddev)
    st = run_fill(spec, apply_fn, params, image_dev, seed)
    canvas = np.asarray(st.canvas)
    prob = expit(np.where(np.isnan(canvas), np.float32(spec.pad_logit), canvas)).astype(np.float32)
    if not with_trace:
        return prob
    steps = int(st.steps)
    return prob, {"steps": steps, "positions": np.asarray(st.trace)[:steps].astype(np.int64)}


# ----------------------------------------------------------------------------
# Host side: committing objects, the seed loop, resumable state.


@dataclasses.dataclass
class ObjectRecord:
    """One committed object: id, seed z,y,x, FOV steps, voxels, overlaps {earlier id: voxels}."""

    id: int
    seed: tuple[int, int, int]
    steps: int
    voxels: int
    overlaps: dict[int, int]
    fill_s: float = 0.0

    def to_dict(self) -> dict:
        return {"id": self.id, "seed": list(self.seed), "steps": self.steps, "voxels": self.voxels,
                "overlaps": [[int(k), int(v)] for k, v in self.overlaps.items()],
                "fill_s": self.fill_s}

    @classmethod
    def from_dict(cls, d: dict) -> "ObjectRecord":
        return cls(id=int(d["id"]), seed=tuple(int(v) for v in d["seed"]), steps=int(d["steps"]),
                   voxels=int(d["voxels"]), overlaps={int(k): int(v) for k, v in d["overlaps"]},
                   fill_s=float(d.get("fill_s", 0.0)))


def seed_allowed(segmentation: np.ndarray, seed: Sequence[int],
                 min_boundary_dist: Sequence[int]) -> str | None:
    """Why `seed` may not start a fill ('segmented' / 'boundary'), or None if it may.

    'segmented': the seed voxel is in an object or was tried before (-1).
    'boundary': an object lies within `min_boundary_dist` (z,y,x) of it.
    """
    z, y, x = (int(v) for v in seed)
    if segmentation[z, y, x] != 0:
        return "segmented"
    m = np.asarray(min_boundary_dist, np.int64)
    lo = np.maximum(np.asarray((z, y, x)) - m, 0)
    hi = np.asarray((z, y, x)) + m + 1
    window = segmentation[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    if np.any(window > 0):
        return "boundary"
    return None


def quantize_probability(p: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as uint8 0..255 (rounded); 0 also means 'no object'."""
    return np.clip(np.rint(np.asarray(p, np.float64) * 255.0), 0, 255).astype(np.uint8)


def commit_object(segmentation: np.ndarray, canvas: np.ndarray, seed: Sequence[int],
                  object_id: int, steps: int, options: InferenceOptions,
                  bbox: tuple[Sequence[int], Sequence[int]] | None = None,
                  probabilities: np.ndarray | None = None) -> tuple[str, ObjectRecord | None]:
    """Adds one filled object to `segmentation` in place (google/ffn's segment_all rules).

    Args:
      segmentation: int64 z,y,x labels so far; 0 free, -1 a seed tried before.
      canvas: float32 z,y,x logits of the fill (NaN = never visited).
      seed: the fill's seed z,y,x.
      object_id: id given to the object if it is kept.
      steps: FOV evaluations of the fill (0: nothing was evaluated).
      options: thresholds and min size.
      bbox: (lo, hi) inclusive voxel bounds outside which the canvas is NaN
        (speeds up large volumes); None for the whole volume.
      probabilities: optional uint8 map, written with the object's probabilities.

    Returns:
      (outcome, record): outcome is 'committed', 'no_steps', 'seed_too_weak' or
      'too_small'; record describes the object when committed.
    """
    z, y, x = (int(v) for v in seed)
    if steps <= 0:
        return "no_steps", None
    if not canvas[z, y, x] >= logit(options.move_threshold):
        if segmentation[z, y, x] == 0:
            segmentation[z, y, x] = UNSEGMENTED_SEED
        return "seed_too_weak", None
    if bbox is None:
        sel = (slice(None),) * 3
    else:
        lo, hi = bbox
        sel = tuple(slice(max(int(a), 0), int(b) + 1) for a, b in zip(lo, hi))
    seg = segmentation[sel]
    logits = canvas[sel]
    mask = logits >= np.float32(logit(options.segment_threshold))
    ids, counts = np.unique(seg[mask], return_counts=True)
    overlaps = {int(i): int(c) for i, c in zip(ids, counts) if i > 0}
    mask &= seg <= 0  # earlier objects win
    voxels = int(mask.sum())
    if voxels == 0 or voxels < options.min_segment_size:
        if segmentation[z, y, x] == 0:
            segmentation[z, y, x] = UNSEGMENTED_SEED
        return "too_small", None
    seg[mask] = object_id
    if probabilities is not None:
        probabilities[sel][mask] = quantize_probability(expit(logits[mask]))
    return "committed", ObjectRecord(id=int(object_id), seed=(z, y, x), steps=int(steps),
                                     voxels=voxels, overlaps=overlaps)


def _overlap_pairs(a: np.ndarray, b: np.ndarray):
    """Two segmentations as int64, the mask of voxels labelled in both, the
    distinct (a, b) label pairs there (K, 2), each such voxel's pair index and
    each pair's voxel count."""
    a = np.asarray(a).astype(np.int64)
    b = np.asarray(b).astype(np.int64)
    if a.shape != b.shape:
        raise ValueError(f"segmentations differ in shape: {a.shape} vs {b.shape}")
    both = (a > 0) & (b > 0)
    pairs, inverse, counts = np.unique(np.stack([a[both], b[both]], axis=1), axis=0,
                                       return_inverse=True, return_counts=True)
    return a, b, both, pairs, inverse.reshape(-1), counts


def split_by_intersection(a: np.ndarray, b: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Consensus of two segmentations: one object per pair (a, b) of overlapping
    objects (voxels unlabelled in either become 0); pieces below `min_size` are dropped.

    Returns uint64 labels numbered 1..K in order of their (a, b) pair.
    """
    a, b, both, pairs, inverse, counts = _overlap_pairs(a, b)
    out = np.zeros(a.shape, np.uint64)
    if not len(pairs):
        return out
    keep = counts >= max(int(min_size), 1)
    new_ids = np.zeros(len(pairs), np.uint64)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint64)
    out[both] = new_ids[inverse]
    return out


def _largest_overlaps(pairs: np.ndarray, counts: np.ndarray, col: int) -> np.ndarray:
    """Mask over `pairs`: True for each object of column `col` on its largest
    overlap (ties: the smaller id of the other column)."""
    # Sorted by id of `col`, then by count descending: each id's first pair wins.
    order = np.lexsort((pairs[:, 1 - col], -counts, pairs[:, col]))
    first = np.ones(len(order), bool)
    first[1:] = pairs[order[1:], col] != pairs[order[:-1], col]
    best = np.zeros(len(pairs), bool)
    best[order[first]] = True
    return best


def unlabel_contested(a: np.ndarray, b: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Consensus that keeps `a`'s objects and unlabels the small pieces `b` disputes.

    Objects x of `a` and y of `b` correspond when y is the `b` object x overlaps
    most, or x the `a` object y overlaps most. The voxels labelled x in `a` and
    y in `b` for non-corresponding x, y are a disputed piece: the two seed
    orders gave it to different objects, as happens where whichever object
    fills first reaches a voxel or two across a boundary. Disputed pieces
    smaller than `min_size` are unlabelled (0); everything else keeps its `a`
    label, including voxels `b` leaves unlabelled. Objects left with fewer than
    `min_size` voxels are dropped. `split_by_intersection` drops the same small
    pieces but makes every other piece an object of its own; this adds none, so
    it removes order-dependent contacts without adding splits.

    Returns uint64 labels (the ids of `a`).
    """
    a, b, both, pairs, inverse, counts = _overlap_pairs(a, b)
    out = np.where(a > 0, a, 0)
    keep = (_largest_overlaps(pairs, counts, 0) | _largest_overlaps(pairs, counts, 1)
            | (counts >= min_size))
    out[both] = np.where(keep[inverse], a[both], 0)
    if min_size > 0 and out.any():
        ids, sizes = np.unique(out[out > 0], return_counts=True)
        small = ids[sizes < min_size]
        if len(small):
            out[np.isin(out, small)] = 0
    return out.astype(np.uint64)


COUNTER_NAMES = ("seeds", "fills", "committed", "skipped_segmented", "skipped_boundary",
                 "no_steps", "seed_too_weak", "too_small", "fov_steps", "net_calls", "voxels")


@dataclasses.dataclass
class SegmentState:
    """Everything needed to continue an interrupted `segment` run.

    Attributes:
      segmentation: int64 z,y,x (objects > 0, tried seeds -1).
      seeds: (N, 3) seeds in the order they are tried.
      seed_index: the next seed to try; seeds before it are fully done.
      next_id: id of the next committed object.
      objects: ObjectRecord per committed object, in order.
      counters: see COUNTER_NAMES.
      probabilities: optional uint8 map of committed voxels.
      phase: 0 forward; 1 the reverse pass of consensus (then `forward` holds
        the finished forward segmentation).
      forward: forward-pass segmentation during consensus, else None.
      fingerprint: JSON of what the run depends on (image shape, configs);
        resuming checks it.
      elapsed_s: wall time spent so far over all runs.
    """

    segmentation: np.ndarray
    seeds: np.ndarray
    seed_index: int = 0
    next_id: int = 1
    objects: list[ObjectRecord] = dataclasses.field(default_factory=list)
    counters: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0))
    probabilities: np.ndarray | None = None
    phase: int = 0
    forward: np.ndarray | None = None
    fingerprint: str = ""
    elapsed_s: float = 0.0


def save_state(path: str | os.PathLike, state: SegmentState) -> Path:
    """Writes `state` to `path` (.npz) atomically: a temporary file beside it, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"seed_index": state.seed_index, "next_id": state.next_id,
            "objects": [o.to_dict() for o in state.objects], "counters": state.counters,
            "phase": state.phase, "fingerprint": state.fingerprint, "elapsed_s": state.elapsed_s}
    arrays = {"segmentation": state.segmentation, "seeds": state.seeds,
              "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    if state.probabilities is not None:
        arrays["probabilities"] = state.probabilities
    if state.forward is not None:
        arrays["forward"] = state.forward
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_state(path: str | os.PathLike) -> SegmentState:
    """Reads a state written by `save_state`.

    Raises:
      FileNotFoundError: no such file. ValueError: not a segmentation state.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no segmentation state at {path}")
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(data["meta"].tobytes().decode())
    except Exception as e:
        raise ValueError(f"{path} is not a readable segmentation state: {e}") from e
    return SegmentState(
        segmentation=data["segmentation"], seeds=data["seeds"],
        seed_index=int(meta["seed_index"]), next_id=int(meta["next_id"]),
        objects=[ObjectRecord.from_dict(o) for o in meta["objects"]],
        counters={**dict.fromkeys(COUNTER_NAMES, 0), **meta["counters"]},
        probabilities=data.get("probabilities"), phase=int(meta["phase"]),
        forward=data.get("forward"), fingerprint=meta["fingerprint"],
        elapsed_s=float(meta["elapsed_s"]))


def run_fingerprint(shape: Sequence[int], model_config: ModelConfig, options: InferenceOptions,
                    run_id: str = "") -> str:
    """What a run's result depends on, apart from the weights and image values
    (`run_id`: anything else the caller wants checked, e.g. image spec and bbox)."""
    return json.dumps({"shape": [int(s) for s in shape], "model": model_config.to_dict(),
                       "options": options.to_dict(), "run": run_id}, sort_keys=True)


@dataclasses.dataclass
class SegmentInfo:
    """What `segment` did: per-object records, counters and timings (seconds).

    With `consensus`, `objects` holds the records of the forward pass and then
    of the reverse pass (ids of the final, intersected labels differ from both).

    timings: 'seeds' (seed policy), 'compile' (first fill, including
    compilation), 'fill' (device fills incl. transfer of the canvas), 'commit'
    (host NumPy), 'total'.
    """

    objects: list[ObjectRecord]
    counters: dict[str, int]
    timings: dict[str, float]
    num_seeds: int

    def summary(self) -> str:
        c = self.counters
        t = self.timings
        return (f"{c['committed']} objects, {c['voxels']} voxels from {self.num_seeds} seeds "
                f"({c['fills']} fills, {c['fov_steps']} FOV steps; skipped: "
                f"{c['skipped_segmented']} in objects, {c['skipped_boundary']} near objects, "
                f"{c['seed_too_weak']} too weak, {c['too_small']} too small) in {t['total']:.2f} s")


def _segment_pass(state: SegmentState, spec: FillSpec, apply_fn: ApplyFn, params: Any,
                  image_dev: jax.Array, options: InferenceOptions, timings: dict[str, float],
                  checkpoint: Callable[[bool], None], progress: bool, desc: str) -> None:
    """Tries every remaining seed of `state` in order, updating it in place."""
    seg = state.segmentation
    bar = tqdm(total=len(state.seeds), initial=state.seed_index, desc=desc, unit="seed",
               disable=not progress, dynamic_ncols=True)
    c = state.counters
    fill_fn = compiled_fill(spec, apply_fn)
    params, image_dev = place_fill_inputs(fill_mesh(spec.batch_size), params,
                                          image_dev)  # once per volume, not per seed
    try:
        while state.seed_index < len(state.seeds):
            seed = tuple(int(v) for v in state.seeds[state.seed_index])
            why = seed_allowed(seg, seed, options.min_boundary_dist)
            if why is not None:
                c[f"skipped_{why}"] += 1
            else:
                t0 = time.perf_counter()
                st = fill_fn(params, image_dev, jnp.asarray(seed, jnp.int32))
                canvas = np.asarray(st.canvas)  # blocks until the fill is done
                steps, lo, hi = int(st.steps), np.asarray(st.lo), np.asarray(st.hi)
                if bool(st.overflow):
                    raise RuntimeError(f"flood-fill queue overflowed (capacity {spec.queue_capacity})")
                t1 = time.perf_counter()
                timings["compile" if c["fills"] == 0 else "fill"] += t1 - t0
                c["fills"] += 1
                c["fov_steps"] += steps
                c["net_calls"] += int(st.calls)
                r = np.asarray(spec.radius)
                bbox = (lo - r, hi + r) if steps > 0 else None
                outcome, record = commit_object(seg, canvas, seed, state.next_id, steps, options,
                                                bbox=bbox, probabilities=state.probabilities)
                timings["commit"] += time.perf_counter() - t1
                c[outcome] += 1
                if record is not None:
                    record.fill_s = t1 - t0
                    state.objects.append(record)
                    state.next_id += 1
                    c["voxels"] += record.voxels
            state.seed_index += 1
            bar.update(1)
            bar.set_postfix(objects=c["committed"], steps=c["fov_steps"], refresh=False)
            checkpoint(False)
    finally:
        bar.close()


def segment_state(image: Any, params: Any, model_config: ModelConfig,
                  options: InferenceOptions = InferenceOptions(), apply_fn: ApplyFn | None = None,
                  *, state: SegmentState | None = None, seeds: np.ndarray | None = None,
                  keep_probabilities: bool = False,
                  checkpoint_fn: Callable[[SegmentState], Any] | None = None,
                  checkpoint_every_s: float = 300.0, progress: bool = True, run_id: str = ""
                  ) -> tuple[SegmentState, SegmentInfo]:
    """`segment` that returns its full `SegmentState` (for resuming and for the CLI).

    Args:
      state: a state from an interrupted run with the same image and options
        (see `segment`), or None to start afresh.
      seeds: (N, 3) z,y,x seeds to use instead of `options.seed_policy`.
      keep_probabilities: also build a uint8 probability map of committed voxels.
      checkpoint_fn: called with the state every `checkpoint_every_s` seconds
        (between seeds, so the state is consistent) and once at the end.
      progress: show a tqdm bar over seeds.
      run_id: extra identity of the run stored in the state's fingerprint
        (the CLI passes the image spec and bbox); a resumed state must match.
    """
    t_start = time.perf_counter()
    arr = _as_array(image)
    spec = FillSpec.from_configs(arr.shape, model_config, options)
    apply_fn = apply_fn or default_apply_fn(model_config)
    check_apply_fn(apply_fn, params, model_config, spec.batch_size)
    timings = dict.fromkeys(("seeds", "compile", "fill", "commit", "total"), 0.0)
    fingerprint = run_fingerprint(arr.shape, model_config, options, run_id)

    if state is None:
        t0 = time.perf_counter()
        if seeds is None:
            seed_arr = seeds_lib.make_seeds(arr, options, margin=spec.radius)
        else:
            seed_arr = np.asarray(seeds, np.int64).reshape(-1, 3)
            seed_arr = seed_arr[seeds_lib.inside_margin(seed_arr, arr.shape, spec.radius)]
        timings["seeds"] = time.perf_counter() - t0
        state = SegmentState(segmentation=np.zeros(arr.shape, np.int64), seeds=seed_arr,
                             probabilities=np.zeros(arr.shape, np.uint8) if keep_probabilities else None,
                             fingerprint=fingerprint)
        state.counters["seeds"] = len(seed_arr)
    else:
        if state.fingerprint != fingerprint:
            raise ValueError("the saved segmentation state belongs to a different run (image shape, "
                             "model or inference options differ); delete it to start afresh.\n"
                             f"saved: {state.fingerprint}\nnow:   {fingerprint}")
        if state.segmentation.shape != arr.shape:
            raise ValueError(f"saved state has shape {state.segmentation.shape}, image {arr.shape}")
    elapsed0 = state.elapsed_s

    image_dev = normalize_image(arr, options.image_mean, options.image_stddev)
    last = [time.perf_counter()]

    def checkpoint(final: bool) -> None:
        now = time.perf_counter()
        if checkpoint_fn is not None and (final or now - last[0] >= checkpoint_every_s):
            state.elapsed_s = elapsed0 + now - t_start
            checkpoint_fn(state)
            last[0] = time.perf_counter()

    passes = 2 if options.consensus else 1
    while state.phase < passes:
        desc = "segment" if passes == 1 else ("segment (forward)" if state.phase == 0 else "segment (reverse)")
        _segment_pass(state, spec, apply_fn, params, image_dev, options, timings, checkpoint,
                      progress, desc)
        if state.phase + 1 < passes:  # start the reverse pass of consensus
            state.forward = state.segmentation
            state.segmentation = np.zeros(arr.shape, np.int64)
            state.seeds = state.seeds[::-1].copy()
            state.seed_index = 0
            if state.probabilities is not None:
                state.probabilities = np.zeros_like(state.probabilities)
        state.phase += 1
        checkpoint(True)

    timings["total"] = time.perf_counter() - t_start
    state.elapsed_s = elapsed0 + timings["total"]
    info = SegmentInfo(objects=list(state.objects), counters=dict(state.counters), timings=timings,
                       num_seeds=len(state.seeds))
    return state, info


def final_segmentation(state: SegmentState, options: InferenceOptions) -> np.ndarray:
    """uint64 labels from a finished state (-1 seed marks become 0; consensus applied)."""
    seg = np.where(state.segmentation > 0, state.segmentation, 0).astype(np.uint64)
    if options.consensus and state.forward is not None:
        fwd = np.where(state.forward > 0, state.forward, 0)
        combine = split_by_intersection if options.consensus_mode == "split" else unlabel_contested
        seg = combine(fwd, seg, options.min_segment_size)
    return seg


def segment(image: Any, params: Any, model_config: ModelConfig,
            options: InferenceOptions = InferenceOptions(), apply_fn: ApplyFn | None = None,
            *, state: SegmentState | None = None, seeds: np.ndarray | None = None,
            checkpoint_fn: Callable[[SegmentState], Any] | None = None,
            checkpoint_every_s: float = 300.0, progress: bool = True
            ) -> tuple[np.ndarray, SegmentInfo]:
    """Segments a whole subvolume by flood filling from every seed in turn.

    Args:
      image: z,y,x raw image, a numpy array or a volume object (`ffnjax.volumes`).
      params: network parameters ({'params': ...} for the convstack).
      model_config: FOV size and deltas (and the convstack, when apply_fn is None).
      options: InferenceOptions; thresholds are probabilities.
      apply_fn: `apply_fn(params, image_fov, mask_logits_fov) -> logits` on
        N,z,y,x,1 arrays; defaults to the convstack.
      state: resume from this `SegmentState` (as saved by `checkpoint_fn`); the
        result equals that of an uninterrupted run.
      seeds: explicit (N, 3) seeds instead of the seed policy.
      checkpoint_fn: called with the `SegmentState` every `checkpoint_every_s`
        seconds and at the end (e.g. `lambda s: save_state(path, s)`).
      progress: tqdm bar over seeds.

    Returns:
      (segmentation uint64 z,y,x with 0 = background, SegmentInfo).

    Raises:
      ValueError: image smaller than the FOV, a network that does not map
        FOVs to FOVs, a state from a different run.
    """
    state, info = segment_state(image, params, model_config, options, apply_fn, state=state,
                                seeds=seeds, checkpoint_fn=checkpoint_fn,
                                checkpoint_every_s=checkpoint_every_s, progress=progress)
    return final_segmentation(state, options), info
