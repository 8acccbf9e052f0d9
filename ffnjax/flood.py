"""Flood-filling inference: one object per seed, filled on the device.

The algorithm is google/ffn's `Canvas.segment_at` / `segment_all` with the
`FaceMaxMovementPolicy`, restated as a pure `lax.while_loop`:

* **State** (`FillState`, a NamedTuple that lives on the device): the canvas of
  mask logits over the whole subvolume (NaN = never visited; a FOV cut from it
  reads NaN as the pad value), a FIFO queue of FOV centres (array + head/tail),
  a lattice of visited positions (centres quantised by the deltas, relative to
  the seed, so no lattice cell is evaluated twice), step counter, bounding box of
  the evaluated centres, an overflow flag, the count of *deleted* voxels
  (google/ffn's `history_deleted`: confident voxels a later prediction turned
  down; per evaluation as well when tracing) and the voxels on which no FOV
  is centred (`blocked`: earlier objects with `skip_segmented`, and the move
  mask of `ffnjax.restrict` in a `restricted` fill).
* **One iteration** (`body_fn`) takes, from the next `8 * batch_size` queue
  entries, the first `batch_size` valid ones (valid = a whole FOV fits inside
  the subvolume, its lattice cell is unvisited, the canvas there is at least
  the move threshold and it is not `blocked`: google/ffn's
  `Canvas.is_valid_pos` and `MovementRestrictor.is_valid_pos`, where a
  refused position does not take its lattice cell; checked for the whole
  window at once, no nested loop),
  cuts their FOVs with `lax.dynamic_slice`, runs the network once on the batch,
  writes each prediction back with `lax.dynamic_update_slice` (in queue order),
  and pushes, for each of the 6 faces of the cube of half-size `deltas` around
  each centre, the position of the face's maximum when it passes the move
  threshold (the face-move rule of `ffnjax.movement`, which training's
  'max_pred_moves' uses too). Pushes are ordered by score (highest first), ties by relative
  offset, exactly as google/ffn sorts them.
* **Stop** (`cond_fn`): empty queue, the seed's own voxel fell below the move
  threshold, or the step budget (`max_steps`) is used up.

The queue's capacity is 1 + (number of faces) x (number of lattice cells that a
valid centre can fall into). Every evaluation claims one distinct lattice cell
and pushes at most one position per face, so the queue cannot overflow; an
overflow flag is still carried and raises if it is ever set.

The disconnected-seed rule (`disconnected_seeds`, google/ffn's
`Canvas.update_at`): a prediction may not raise a canvas voxel that an earlier
prediction drove below probability 0.5. ffnjax applies it to every
prediction; google/ffn only to a prediction that reaches the move threshold in
more than `disco_seed_threshold` of its voxels (`disco_active_fraction`; its
unset default 0 means: anywhere at all).

Departures from google/ffn (none of them change the result with batch_size 1):

* Lattice cells are marked visited when a position is *popped* and accepted
  (google/ffn marks them right after evaluating it: the same thing when one
  position is evaluated at a time), and positions whose cell is already
  visited or whose FOV would leave the subvolume are not pushed at all (google
  pushes them and discards them on pop). With `batch_size > 1` marking at pop
  time is what keeps two positions of one batch from sharing a cell.
* `skip_segmented` is read from the segmentation as it was when the fill
  started (`blocked`); google/ffn reads the same array, which changes only
  between fills.
* `batch_size > 1` evaluates several queued positions in one network call, all
  cut from the canvas as it was before the batch. This is an approximation of
  the sequential algorithm (later positions of a batch do not see the
  predictions of earlier ones), traded for keeping an accelerator busy.

Like an optax transform, the loop is a pure function of static data (`FillSpec`,
whose thresholds are logits converted once, in `FillSpec.from_configs`) and of
arrays (`FillState`), with static shapes; this module keeps no host-side state.
What happens to a finished fill (seed acceptance, committing objects,
consensus, resumable state, the seed loop `segment`) is `ffnjax.segmentation`.

Python API::

    prob = fill(image, seed_zyx, params, model_config, options) # float32 z,y,x
    st = run_fill(spec, apply_fn, params, image_dev, seed)      # FillState
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy.special import expit

from ffnjax import devices, fovsplit, movement
from ffnjax.config import InferenceOptions, ModelConfig, logit
from ffnjax.nets import make_apply_fn, normalize_image

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

# A voxel once driven below probability 0.5 (logit 0) is not revived when
# `disconnected_seeds` is on (google/ffn's `disco_seeds`).
DISCO_LOGIT = 0.0
# A *deleted* voxel (google/ffn's `history_deleted`): one the canvas held at
# probability >= 0.8 that a new prediction puts below 0.5 (before the
# disconnected-seeds rule undoes it). Counted per FOV evaluation; many of them
# mean the network kept changing its mind (agglomeration's merge rules read it).
DELETED_FROM_LOGIT = math.log(0.8 / 0.2)


# ----------------------------------------------------------------------------
# Static description of one compiled fill.


@dataclasses.dataclass(frozen=True)
class FillSpec:
    """Everything a compiled fill depends on statically (hashable, the jit cache key).

    Every threshold of InferenceOptions is held here as a logit, converted once
    by `from_configs`; the device loop and the host's committing
    (`ffnjax.segmentation.commit_object`) read these and convert nothing.

    Attributes:
      shape: subvolume shape z,y,x.
      fov_size, deltas: from the ModelConfig.
      init_logit, pad_logit, move_logit: thresholds of InferenceOptions as logits.
      disconnected_seeds, max_steps, batch_size, skip_segmented: from InferenceOptions.
      restricted: the fill receives voxels on which no FOV is centred
        (`ffnjax.restrict`, as `blocked`) even without skip_segmented.
      disco_min_active: with disconnected_seeds, a prediction freezes voxels
        only when more than this many of its voxels reach the move threshold
        (from InferenceOptions.disco_active_fraction; -1: always).
      segment_logit: `segment_threshold` as a logit. Only the host reads it
        (which canvas voxels an object keeps), so it is left out of equality
        and hash: specs that differ only there share one compiled fill.
      trace: also record every evaluated FOV centre (tests, notebooks).
      fov_split: host devices each FOV's forward pass is split over by z
        slabs (`ffnjax.fovsplit.split_devices`; 1: not split). Applies to the
        convstack only (`fill_devices`).
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
    segment_logit: float = dataclasses.field(compare=False)
    trace: bool = False
    disco_min_active: int = -1
    skip_segmented: bool = False
    restricted: bool = False
    fov_split: int = 1

    @classmethod
    def from_configs(cls, shape: Sequence[int], model_config: ModelConfig,
                     options: InferenceOptions, trace: bool = False,
                     restricted: bool = False) -> "FillSpec":
        shape = tuple(int(s) for s in shape)
        check_image_shape(shape, model_config.fov_size)
        fraction = float(options.disco_active_fraction)
        # more than fraction * N voxels <=> more than floor(fraction * N) of them
        min_active = -1 if fraction < 0 else math.floor(fraction * math.prod(model_config.fov_size))
        return cls(shape=shape, fov_size=model_config.fov_size, deltas=model_config.deltas,
                   init_logit=logit(options.init_activation), pad_logit=logit(options.pad_value),
                   move_logit=logit(options.move_threshold),
                   segment_logit=logit(options.segment_threshold),
                   disconnected_seeds=bool(options.disconnected_seeds),
                   max_steps=int(options.max_steps), batch_size=int(options.batch_size),
                   trace=bool(trace), disco_min_active=min_active,
                   skip_segmented=bool(options.skip_segmented), restricted=bool(restricted),
                   fov_split=fovsplit.split_devices(model_config, options))

    @property
    def uses_blocked(self) -> bool:
        """Whether the fill takes a z,y,x `blocked` array (skip_segmented or restricted)."""
        return self.skip_segmented or self.restricted

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
    blocked: jax.Array   # (Z, Y, X) bool: no FOV is centred there (spec.uses_blocked), else (1, 1, 1)
    deleted: jax.Array   # int32 voxels deleted so far (DELETED_FROM_LOGIT -> below DISCO_LOGIT)
    trace_deleted: jax.Array  # (trace_capacity or 1,) int32 voxels deleted by each evaluation


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
    """The face moves of the FOV centred at `pos`: google/ffn's rule, as
    `ffnjax.movement.face_maxima` computes it (the one place it lives), plus
    the target centres the fill queues. Returns (scores (F,), targets (F, 3),
    rel (F, 3)), faces in `movement.face_directions(spec.deltas)` order."""
    scores, rels = movement.face_maxima(pred, spec.radius, spec.deltas)
    return scores, pos[None, :] + rels, rels


def init_fill_state(spec: FillSpec, seed: jax.Array, blocked: jax.Array | None = None) -> FillState:
    """Canvas all NaN but the seed voxel (init logit); the queue holds the seed.

    `blocked` (z,y,x bool, only with `spec.uses_blocked`): the voxels on
    which no FOV is centred (earlier objects, the move mask); None: none.
    """
    seed = jnp.asarray(seed, jnp.int32)
    if not spec.uses_blocked:
        blocked = jnp.zeros((1, 1, 1), bool)
    elif blocked is None:
        blocked = jnp.zeros(spec.shape, bool)
    else:
        blocked = jnp.asarray(blocked, bool)
        if blocked.shape != spec.shape:
            raise ValueError(f"blocked has shape {blocked.shape}, the fill {spec.shape}")
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
        trace=jnp.full((spec.trace_capacity if spec.trace else 1, 3), -1, jnp.int32),
        blocked=blocked,
        deleted=jnp.int32(0),
        trace_deleted=jnp.zeros((spec.trace_capacity if spec.trace else 1,), jnp.int32))


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
        inside = tuple(jnp.clip(window, 0, jnp.asarray(spec.shape) - 1).T)
        cand = (present & _in_bounds(spec, window) & ~st.visited[tuple(cells.T)]
                & (st.canvas[inside] >= move))
        if spec.uses_blocked:  # is_valid_pos: no earlier object, not masked
            cand &= ~st.blocked[inside]
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
        overflow, deleted, trace_deleted = st.overflow, st.deleted, st.trace_deleted
        deleted_from = jnp.float32(DELETED_FROM_LOGIT)
        cap = spec.queue_capacity
        drop = queue.shape[0]  # beyond the padded queue: a push that is not made
        for i in range(B):  # static: B is small; writes are applied in queue order
            valid = i < n
            old = cut(canvas, starts[i])
            new = logits[i]
            # NaN (never visited) compares False: only voxels once confident count.
            gone = jnp.where(valid, jnp.sum((old >= deleted_from) & (new < DISCO_LOGIT),
                                            dtype=jnp.int32), 0)
            deleted += gone
            if spec.disconnected_seeds:
                # NaN (never visited) compares False, so such voxels may rise.
                freeze = (old < DISCO_LOGIT) & (new > old)
                if spec.disco_min_active >= 0:
                    # google/ffn's disco_seed_threshold: only a prediction that
                    # reaches the move threshold in more than that many voxels.
                    freeze &= jnp.sum(new >= move, dtype=jnp.int32) > spec.disco_min_active
                new = jnp.where(freeze, old, new)
            new = jnp.where(valid, new, old)
            canvas = jax.lax.dynamic_update_slice(canvas, new, starts[i])

            scores, targets, rels = _face_moves(spec, new, slots[i])
            cells = jax.vmap(lambda p: _cell(spec, p, seed))(targets)
            seen = st.visited[tuple(cells.T)]
            ok = valid & movement.wanted(scores, move) & _in_bounds(spec, targets) & ~seen
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
                at = jnp.where(valid, st.steps + i, spec.trace_capacity)
                trace = trace.at[at].set(slots[i], mode="drop")
                trace_deleted = trace_deleted.at[at].set(gone, mode="drop")
        return st._replace(canvas=canvas, queue=queue, tail=tail, steps=st.steps + n,
                           calls=st.calls + 1, lo=lo, hi=hi, overflow=overflow, trace=trace,
                           deleted=deleted, trace_deleted=trace_deleted)

    def body_fn(params, image, seed, st: FillState) -> FillState:
        head, visited, slots, n = pop(seed, st)
        st = st._replace(head=head, visited=visited)
        return jax.lax.cond(n > 0, lambda s: evaluate(params, image, seed, s, slots, n),
                            lambda s: s, st)

    return cond_fn, body_fn


def fill_mesh(batch_size: int, fov_split: int = 1) -> Mesh | None:
    """The devices that share each network call of a fill, or None.

    On CPU, with several host devices (one per core: `ffnjax.hostdevices`):
    a batch of `batch_size` >= 2 FOVs is split over gcd(batch_size, devices)
    of them (a mesh along `devices.BATCH_AXIS`), so every core runs its share
    of the network; a single FOV with `fov_split` > 1 is split into z slabs
    over that many (a mesh along `fovsplit.Z_AXIS`). Accelerators keep a
    fill on one device: there one device is already parallel, and splitting
    would add a transfer per step.
    """
    if jax.default_backend() != "cpu":
        return None
    if batch_size < 2:
        chosen = jax.local_devices()[:fov_split]
        return fovsplit.z_mesh(chosen) if len(chosen) > 1 else None
    chosen = devices.devices_for_batch(batch_size, jax.local_devices())
    return devices.batch_mesh(chosen) if len(chosen) > 1 else None


def fill_devices(spec: FillSpec, apply_fn: ApplyFn) -> Mesh | None:
    """The mesh a fill of `spec` with `apply_fn` runs on (`fill_mesh`): the z
    split of `spec.fov_split` only for the convstack (`fovsplit.splittable`)."""
    split = spec.fov_split if fovsplit.splittable(apply_fn) else 1
    return fill_mesh(spec.batch_size, split)


def fill_network(apply_fn: ApplyFn, mesh: Mesh | None) -> ApplyFn:
    """`apply_fn` as a fill on `mesh` (from `fill_mesh`) calls it: a
    `jax.shard_map` over the mesh (each device its share of the FOVs, or its
    z slab of one FOV; params replicated), or `apply_fn` itself when mesh is
    None."""
    if mesh is None:
        return apply_fn
    if mesh.axis_names == (fovsplit.Z_AXIS,):
        return fovsplit.split_apply(apply_fn, mesh)
    return devices.shard_batch(apply_fn, mesh)


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
    start, resume = fill_stepper(spec, apply_fn)
    never = jnp.iinfo(jnp.int32).max

    def run(params, image, seed, blocked=None):
        return resume(params, image, seed, start(seed, blocked), never)[0]

    return run


@functools.lru_cache(maxsize=64)
def fill_stepper(spec: FillSpec, apply_fn: ApplyFn):
    """`(start, resume)`: the fill of `compiled_fill` cut into bounded runs.

    `start(seed, blocked=None) -> FillState` is the initial state
    (`init_fill_state`); `resume(params, image,
    seed, state, stop_at) -> (state, alive)` runs the same loop on until the fill
    ends or `state.steps` reaches `stop_at` (one iteration may pass it by less
    than a batch), and says whether the fill would go on. Cutting the loop this
    way changes nothing (`cond_fn` and `body_fn` are pure functions of the
    state), so the host can report progress between runs of one long fill, and
    `resume(..., stop_at=0)` compiles the loop without evaluating a FOV (how
    `ffnjax.segmentation` times compilation apart from the first fill).
    `stop_at` is a traced int32: every bound shares one executable, and the
    state's buffers are donated from run to run.
    """
    mesh = fill_devices(spec, apply_fn)
    cond_fn, body_fn = make_fill_fns(spec, fill_network(apply_fn, mesh))

    def run(params, image, seed, st, stop_at):
        st = jax.lax.while_loop(
            lambda s: cond_fn(params, image, seed, s) & (s.steps < stop_at),
            lambda s: body_fn(params, image, seed, s), st)
        return st, cond_fn(params, image, seed, st)

    def init(seed, blocked):
        return init_fill_state(spec, seed, blocked)

    if mesh is None:
        jitted_init, jitted = jax.jit(init), jax.jit(run, donate_argnums=(3,))
    else:
        replicated = NamedSharding(mesh, PartitionSpec())
        jitted_init = jax.jit(init, out_shardings=replicated)
        jitted = jax.jit(run, donate_argnums=(3,), out_shardings=replicated)

    def start(seed, blocked=None):
        if spec.uses_blocked and blocked is None:
            blocked = np.zeros(spec.shape, bool)
        return jitted_init(jnp.asarray(seed, jnp.int32), None if blocked is None
                           else jnp.asarray(blocked, bool))

    def resume(params, image, seed, st, stop_at):
        if mesh is not None:
            params, image = place_fill_inputs(mesh, params, image)
        return jitted(params, image, jnp.asarray(seed, jnp.int32), st, jnp.int32(stop_at))

    return start, resume


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


def as_image_array(image: Any) -> np.ndarray:
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
             seed: Sequence[int], report: Callable[[int], Any] | None = None,
             every: int = 64, blocked: np.ndarray | None = None) -> FillState:
    """Runs one compiled fill (blocking) and raises if the queue ever overflowed.

    Args:
      report: called with the FOV steps taken so far after every `every` of
        them (and at the end), for progress inside one long fill; the fill is
        then run in bounded pieces (`fill_stepper`), with the same result.
      blocked: with `spec.uses_blocked`, the z,y,x bool voxels on which no
        FOV is centred (earlier objects, the move mask); ignored otherwise.

    The one place the overflow flag is checked: `fill` and the seed loop of
    `ffnjax.segmentation` both run their fills through here.
    """
    if report is None:
        st = compiled_fill(spec, apply_fn)(params, image_dev, jnp.asarray(seed, jnp.int32),
                                           blocked)
    else:
        start, resume = fill_stepper(spec, apply_fn)
        st, alive, steps = start(seed, blocked), True, 0
        while alive:
            st, alive = resume(params, image_dev, seed, st, steps + max(int(every), 1))
            steps = int(st.steps)
            report(steps)
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
      with_trace: also return a dict with 'steps', 'positions' (the
        evaluated FOV centres in order, (steps, 3)) and 'deleted' (voxels
        each evaluation deleted, `DELETED_FROM_LOGIT`; (steps,)).

    Returns:
      float32 z,y,x probabilities (sigmoid of the canvas; never-visited voxels
      read as `options.pad_value`), or `(probabilities, trace)` when with_trace.
    """
    arr = as_image_array(image)
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
    return prob, {"steps": steps, "positions": np.asarray(st.trace)[:steps].astype(np.int64),
                  "deleted": np.asarray(st.trace_deleted)[:steps].astype(np.int64)}
