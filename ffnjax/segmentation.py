"""The host side of inference: segmenting a volume one flood fill at a time.

`segment` is google/ffn's `Canvas.segment_all`: for every seed in turn it asks
whether the seed may start a fill (`seed_allowed`), runs one device fill
(`ffnjax.flood.run_fill`) and commits the filled object into the segmentation
(`commit_object`) in NumPy, between fills:

* seeds inside an object, tried before, masked (`ffnjax.restrict`) or within
  `min_boundary_dist` of an object are skipped (google/ffn also marks the
  latter -1: no result differs, since only ids > 0 are ever tested and -1
  becomes 0 in the output);
* a fill whose seed voxel ends below the move threshold is dropped;
* an object is every voxel at or above the segment threshold in the box of
  the evaluated centres padded by the FOV radius (no connected-component
  step, as google/ffn); earlier objects win overlaps; objects below
  `min_segment_size` are dropped; a dropped seed's voxel is marked -1 so it
  is not tried again;
* with `skip_segmented`, each fill gets the voxels of the objects so far, on
  which it centres no FOV (google/ffn's `Canvas.is_valid_pos`); with a
  `Restriction`, the move mask too (its `MovementRestrictor`);
* with `init_segmentation`, the run starts from those objects (ids kept, new
  ones numbered after the largest): seeds in them are skipped and they win
  every voxel they hold, as any earlier object does.

The thresholds come as logits from the run's `ffnjax.flood.FillSpec`,
converted there once; nothing here converts a probability again.

With `consensus` the seeds run forward and then reversed, and
`ffnjax.consensus` combines the two segmentations. The whole run is a
`SegmentState` that `save_state` / `load_state` write and read between seeds,
so an interrupted run resumes to the same result.

Python API::

    seg, info = segment(image, params, model_config, options)   # uint64 z,y,x
    state, info = segment_state(image, params, model_config, options,
                                checkpoint_fn=lambda s: save_state(path, s))
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from scipy.special import expit
from tqdm.auto import tqdm

from ffnjax import interrupt, scale, seed_policies
from ffnjax import seeds as seeds_lib
from ffnjax.config import InferenceOptions, ModelConfig
from ffnjax.consensus import split_by_intersection, unlabel_contested
from ffnjax.files import save_npz
from ffnjax.flood import (ApplyFn, FillSpec, as_image_array, check_apply_fn, default_apply_fn,
                          fill_devices, fill_stepper, place_fill_inputs, run_fill)
from ffnjax.nets import normalize_image
from ffnjax.restrict import Restriction, coarse_inputs, inputs_digest

UNSEGMENTED_SEED = -1  # marks a tried seed voxel so it is not retried
# FOV steps per device call of a fill: a signal (`ffnjax.interrupt`) or the
# progress bar acts between calls; the result does not depend on it.
FILL_CHUNK_STEPS = 16


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
                 min_boundary_dist: Sequence[int], excluded: np.ndarray | None = None,
                 retry_tried: bool = False) -> str | None:
    """Why `seed` may not start a fill ('segmented' / 'masked' / 'boundary'), or None if it may.

    'segmented': the seed voxel is in an object, or was tried before (-1)
    unless `retry_tried`. google/ffn tries such a seed again (a seed policy
    may list a voxel twice); only a fill that depends on the objects made
    since (`skip_segmented`) can come out differently, so ffnjax retries
    exactly then.
    'masked': `excluded` (z,y,x bool, `ffnjax.restrict.Restriction.seeds`) holds it.
    'boundary': an object lies within `min_boundary_dist` (z,y,x) of it.
    """
    z, y, x = (int(v) for v in seed)
    if segmentation[z, y, x] > 0 or (segmentation[z, y, x] < 0 and not retry_tried):
        return "segmented"
    if excluded is not None and excluded[z, y, x]:
        return "masked"
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
                  object_id: int, steps: int, spec: FillSpec, min_size: int = 0,
                  bbox: tuple[Sequence[int], Sequence[int]] | None = None,
                  probabilities: np.ndarray | None = None) -> tuple[str, ObjectRecord | None]:
    """Adds one filled object to `segmentation` in place (google/ffn's segment_all rules).

    Args:
      segmentation: int64 z,y,x labels so far; 0 free, -1 a seed tried before.
      canvas: float32 z,y,x logits of the fill (NaN = never visited).
      seed: the fill's seed z,y,x.
      object_id: id given to the object if it is kept.
      steps: FOV evaluations of the fill (0: nothing was evaluated).
      spec: the fill's FillSpec; its `move_logit` (does the seed voxel still
        pass?) and `segment_logit` (which voxels the object keeps) are the
        thresholds, already logits.
      min_size: objects with fewer new voxels are dropped (`min_segment_size`).
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
    if not canvas[z, y, x] >= spec.move_logit:
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
    mask = logits >= np.float32(spec.segment_logit)
    ids, counts = np.unique(seg[mask], return_counts=True)
    overlaps = {int(i): int(c) for i, c in zip(ids, counts) if i > 0}
    mask &= seg <= 0  # earlier objects win
    voxels = int(mask.sum())
    if voxels == 0 or voxels < min_size:
        if segmentation[z, y, x] == 0:
            segmentation[z, y, x] = UNSEGMENTED_SEED
        return "too_small", None
    seg[mask] = object_id
    if probabilities is not None:
        probabilities[sel][mask] = quantize_probability(expit(logits[mask]))
    return "committed", ObjectRecord(id=int(object_id), seed=(z, y, x), steps=int(steps),
                                     voxels=voxels, overlaps=overlaps)


COUNTER_NAMES = ("seeds", "fills", "committed", "skipped_segmented", "skipped_boundary",
                 "no_steps", "seed_too_weak", "too_small", "fov_steps", "net_calls", "voxels",
                 "skipped_masked")


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
      positions: with `record_positions`, every evaluated FOV centre z,y,x
        of every fill so far, in order ((N, 3) int64); else None.
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
    positions: np.ndarray | None = None


def save_state(path: str | os.PathLike, state: SegmentState) -> Path:
    """Writes `state` to `path` (.npz) atomically (`ffnjax.files.save_npz`), so an
    interrupted save leaves the previous state readable."""
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
    if state.positions is not None:
        arrays["positions"] = state.positions
    return save_npz(path, arrays)


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
        elapsed_s=float(meta["elapsed_s"]), positions=data.get("positions"))


def run_fingerprint(shape: Sequence[int], model_config: ModelConfig, options: InferenceOptions,
                    run_id: str = "") -> str:
    """What a run's result depends on, apart from the weights and image values
    (`run_id`: anything else the caller wants checked, e.g. image spec and bbox)."""
    return json.dumps({"shape": [int(s) for s in shape], "model": model_config.to_dict(),
                       "options": options.result_dict(), "run": run_id}, sort_keys=True)


@dataclasses.dataclass
class SegmentInfo:
    """What `segment` did: per-object records, counters and timings (seconds).

    With `consensus`, `objects` holds the records of the forward pass and then
    of the reverse pass (ids of the final, intersected labels differ from both),
    and the counters add both passes up: `passes` is 2 and `summary` says so.
    Count the final segmentation for its objects and voxels.

    timings: 'seeds' (seed policy), 'compile' (compiling the fill, timed apart
    from any fill: a run bounded at zero FOV steps), 'first_fill' (the first
    fill, without compilation), 'fill' (the other device fills incl. transfer of
    the canvas), 'commit' (host NumPy), 'total'.

    seeds: the seeds in the order tried ((N, 3) z,y,x; with consensus, the
    forward order). positions: with `record_positions`, every evaluated FOV
    centre of every fill in order ((M, 3) z,y,x: google/ffn's sequence of
    `Canvas.update_at` calls), else None.
    """

    objects: list[ObjectRecord]
    counters: dict[str, int]
    timings: dict[str, float]
    num_seeds: int
    passes: int = 1
    seeds: np.ndarray | None = None
    positions: np.ndarray | None = None

    def summary(self) -> str:
        c = self.counters
        t = self.timings
        if self.passes == 1:
            head = f"{c['committed']} objects, {c['voxels']} voxels from {self.num_seeds} seeds"
        else:
            head = (f"{self.passes} consensus passes together committed {c['committed']} objects, "
                    f"{c['voxels']} voxels (before the consensus combines them) from "
                    f"{self.num_seeds} seeds each")
        text = (f"{head} ({c['fills']} fills, {c['fov_steps']} FOV steps; seeds skipped: "
                f"{c['skipped_segmented']} in objects, {c['skipped_boundary']} near objects"
                + (f", {c['skipped_masked']} masked" if c.get("skipped_masked") else "") + "; "
                f"fills dropped: {c['seed_too_weak']} whose seed ended below --move-threshold "
                f"('too weak'), {c['too_small']} under --min-segment-size voxels ('too small')) "
                f"in {t['total']:.2f} s (compile {t.get('compile', 0.0):.1f} s, first fill "
                f"{t.get('first_fill', 0.0):.1f} s)")
        return text + self.hint()

    def hint(self) -> str:
        """What the dropped fills mean and what to try, when they outweigh the
        objects kept (empty otherwise)."""
        c = self.counters
        weak, small, kept = c["seed_too_weak"], c["too_small"], c["committed"]
        if not c["fills"] or (kept and weak <= kept):
            return ""
        undertrained = ("the model is probably undertrained for this image (train longer, or "
                        "start from a shipped model), or the image is not normalised as in "
                        "training (--image-mean / --image-stddev); a lower --move-threshold "
                        "keeps weaker fills, and moves the FOV on weaker evidence too")
        if kept:
            return (f"\nmore fills were dropped as too weak ({weak}) than kept ({kept}): at "
                    f"their seed the network's own prediction ended below --move-threshold, "
                    f"i.e. it did not hold the seed voxel to be inside an object; "
                    f"{undertrained}")
        if weak >= small:
            return ("\nno object committed: at most seeds the network's own prediction ended "
                    "below --move-threshold ('too weak': it did not hold the seed voxel to be "
                    f"inside an object); {undertrained}")
        return ("\nno object committed: every fill stayed under --min-segment-size voxels "
                "('too small'); lower --min-segment-size or --segment-threshold, or train longer")


def _time_compile(spec: FillSpec, apply_fn: ApplyFn, params: Any, image_dev: jax.Array,
                  seed: Sequence[int]) -> float:
    """Seconds to compile the fill for `spec`, apart from any fill: the loop run
    with a bound of zero steps (`flood.fill_stepper`) compiles the executable every
    later fill uses and evaluates no FOV. About 0 when it is compiled already."""
    t0 = time.perf_counter()
    start, resume = fill_stepper(spec, apply_fn)
    st, _ = resume(params, image_dev, seed, start(seed), 0)
    jax.block_until_ready(st.steps)
    return time.perf_counter() - t0


def _commit_fill(state: SegmentState, st: Any, seed: tuple[int, int, int], spec: FillSpec,
                 options: InferenceOptions, timings: dict[str, float], t0: float) -> None:
    """Adds the finished fill `st` of `seed` to `state` (counters, object, positions)."""
    c = state.counters
    canvas = np.asarray(st.canvas)
    steps, lo, hi = int(st.steps), np.asarray(st.lo), np.asarray(st.hi)
    if state.positions is not None:
        state.positions = np.concatenate(
            [state.positions, np.asarray(st.trace)[:steps].astype(np.int64)])
    t1 = time.perf_counter()
    timings["first_fill" if c["fills"] == 0 else "fill"] += t1 - t0
    c["fills"] += 1
    c["fov_steps"] += steps
    c["net_calls"] += int(st.calls)
    r = np.asarray(spec.radius)
    bbox = (lo - r, hi + r) if steps > 0 else None
    outcome, record = commit_object(state.segmentation, canvas, seed, state.next_id, steps, spec,
                                    options.min_segment_size, bbox=bbox,
                                    probabilities=state.probabilities)
    timings["commit"] += time.perf_counter() - t1
    c[outcome] += 1
    if record is not None:
        record.fill_s = t1 - t0
        state.objects.append(record)
        state.next_id += 1
        c["voxels"] += record.voxels


def _segment_pass(state: SegmentState, spec: FillSpec, apply_fn: ApplyFn, params: Any,
                  image_dev: jax.Array, options: InferenceOptions, timings: dict[str, float],
                  checkpoint: Callable[[bool], None], progress: bool, desc: str,
                  restriction: Restriction) -> None:
    """Tries every remaining seed of `state` in order, updating it in place.

    The bar counts seeds (so its rate and ETA are over seeds) and shows, also
    while one long fill runs, the FOV steps, their rate and the voxels
    committed so far.
    """
    seg = state.segmentation
    bar = tqdm(total=len(state.seeds), initial=state.seed_index, desc=desc, unit="seed",
               disable=not progress, dynamic_ncols=True)
    c = state.counters
    params, image_dev = place_fill_inputs(fill_devices(spec, apply_fn), params,
                                          image_dev)  # once per volume, not per seed
    t_pass, steps_pass0 = time.perf_counter(), c["fov_steps"]

    def show(steps_now: int) -> None:
        rate = (c["fov_steps"] + steps_now - steps_pass0) / max(time.perf_counter() - t_pass, 1e-9)
        bar.set_postfix_str(f"objects={c['committed']} FOV steps={c['fov_steps'] + steps_now:,} "
                            f"({rate:.1f}/s) voxels={c['voxels']:,}", refresh=True)

    moves, excluded = restriction.moves(), restriction.seeds()

    def between_chunks(steps_now: int) -> None:  # a signal stops a long fill here
        interrupt.check()
        if progress:
            show(steps_now)

    try:
        if c["fills"] == 0 and state.seed_index < len(state.seeds):
            seed0 = tuple(int(v) for v in state.seeds[state.seed_index])
            timings["compile"] += _time_compile(spec, apply_fn, params, image_dev, seed0)
        while state.seed_index < len(state.seeds):
            seed = tuple(int(v) for v in state.seeds[state.seed_index])
            why = seed_allowed(seg, seed, options.min_boundary_dist, excluded,
                               retry_tried=spec.skip_segmented)
            if why is None:
                t0 = time.perf_counter()
                # blocks; checks overflow; runs in chunks of FILL_CHUNK_STEPS (same result)
                blocked = _blocked(seg, spec, moves)
                st = run_fill(spec, apply_fn, params, image_dev, seed, report=between_chunks,
                              every=FILL_CHUNK_STEPS, blocked=blocked)
            with interrupt.deferred():  # the seed's outcome and the next seed change together
                if why is not None:
                    c[f"skipped_{why}"] += 1
                else:
                    _commit_fill(state, st, seed, spec, options, timings, t0)
                state.seed_index += 1
                bar.update(1)
                if progress:
                    show(0)
                checkpoint(False)
    finally:
        bar.close()


def _blocked(seg: np.ndarray, spec: FillSpec, moves: np.ndarray | None) -> np.ndarray | None:
    """The fill's `blocked` voxels: earlier objects (skip_segmented) and the move mask."""
    if not spec.uses_blocked:
        return None
    if not spec.skip_segmented:
        return moves
    return seg > 0 if moves is None else (seg > 0) | moves


def segment_state(image: Any, params: Any, model_config: ModelConfig,
                  options: InferenceOptions = InferenceOptions(), apply_fn: ApplyFn | None = None,
                  *, state: SegmentState | None = None, seeds: np.ndarray | None = None,
                  keep_probabilities: bool = False,
                  checkpoint_fn: Callable[[SegmentState], Any] | None = None,
                  checkpoint_every_s: float = 300.0, progress: bool = True, run_id: str = "",
                  record_positions: bool = False, restriction: Restriction | None = None,
                  init_segmentation: np.ndarray | None = None,
                  corner: Sequence[int] = (0, 0, 0)) -> tuple[SegmentState, SegmentInfo]:
    """`segment` that returns its full `SegmentState` (for resuming and for the CLI).

    Args:
      state: a state from an interrupted run with the same image and options
        (see `segment`), or None to start afresh.
      seeds: (N, 3) z,y,x seeds to use instead of `options.seed_policy`
        (native voxels; divided by `options.downsample`).
      keep_probabilities: also build a uint8 probability map of committed voxels.
      checkpoint_fn: called with the state every `checkpoint_every_s` seconds
        (between seeds, so the state is consistent), once at the end, and
        when a signal (KeyboardInterrupt, `ffnjax.interrupt.Interrupted`)
        stops the run, which it then re-raises: a fill is cut between two
        chunks of FILL_CHUNK_STEPS FOV steps, so that takes seconds, and the
        state saved is the one before that seed.
      progress: show a tqdm bar over seeds.
      run_id: extra identity of the run stored in the state's fingerprint
        (the CLI passes the image spec and bbox); a resumed state must match.
      record_positions: keep every evaluated FOV centre in order
        (`SegmentState.positions`, `SegmentInfo.positions`); a resumed state
        keeps recording when it did.
      restriction: where no fill starts and no FOV is centred
        (`ffnjax.restrict.Restriction`, z,y,x over the image; native voxels).
      init_segmentation: z,y,x integer labels to start from (google/ffn's
        `init_segmentation`; native voxels); not with consensus.
      corner: z,y,x of this image in the whole volume (`invert_origins` seeds).
    """
    t_start = time.perf_counter()
    # At a coarser scale (options.downsample) the whole state lives on the
    # coarse grid; final_segmentation brings the labels back to the native one.
    native = as_image_array(image)
    arr = scale.downsample_image(native, options.downsample)
    if seeds is not None:
        seeds = scale.to_coarse_points(seeds, options.downsample)
    restriction, init = coarse_inputs(native.shape, options, restriction, init_segmentation)
    run_id += inputs_digest(restriction, init)
    record_positions = record_positions or (state is not None and state.positions is not None)
    spec = FillSpec.from_configs(arr.shape, model_config, options, trace=record_positions,
                                 restricted=restriction.moves() is not None)
    apply_fn = apply_fn or default_apply_fn(model_config)
    check_apply_fn(apply_fn, params, model_config, spec.batch_size)
    timings = dict.fromkeys(("seeds", "compile", "first_fill", "fill", "commit", "total"), 0.0)
    fingerprint = run_fingerprint(arr.shape, model_config, options, run_id)

    if state is None:
        t0 = time.perf_counter()
        if seeds is None:
            seed_arr = seed_policies.make_seeds(seed_policies.SeedContext(
                arr, options, spec.radius, segmentation=init, mask=restriction.mask,
                seed_mask=restriction.seed_mask, corner=corner))
        else:
            seed_arr = np.asarray(seeds, np.int64).reshape(-1, 3)
            seed_arr = seed_arr[seeds_lib.inside_margin(seed_arr, arr.shape, spec.radius)]
        timings["seeds"] = time.perf_counter() - t0
        state = SegmentState(segmentation=np.zeros(arr.shape, np.int64) if init is None
                             else init, seeds=seed_arr,
                             next_id=1 if init is None or not init.size else int(init.max()) + 1,
                             probabilities=np.zeros(arr.shape, np.uint8) if keep_probabilities else None,
                             fingerprint=fingerprint,
                             positions=np.zeros((0, 3), np.int64) if record_positions else None)
        if state.probabilities is not None and init is not None:
            state.probabilities[init > 0] = 255  # google/ffn: the objects it starts from are certain
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
    try:
        while state.phase < passes:
            desc = ("segment" if passes == 1 else
                    "segment (forward)" if state.phase == 0 else "segment (reverse)")
            _segment_pass(state, spec, apply_fn, params, image_dev, options, timings, checkpoint,
                          progress, desc, restriction)
            with interrupt.deferred():
                if state.phase + 1 < passes:  # start the reverse pass of consensus
                    state.forward = state.segmentation
                    state.segmentation = np.zeros(arr.shape, np.int64)
                    state.seeds = state.seeds[::-1].copy()
                    state.seed_index = 0
                    if state.probabilities is not None:
                        state.probabilities = np.zeros_like(state.probabilities)
                state.phase += 1
                checkpoint(True)
    except KeyboardInterrupt:  # SIGINT / SIGTERM (ffnjax.interrupt): the state is consistent
        with interrupt.deferred():
            checkpoint(True)
        raise

    timings["total"] = time.perf_counter() - t_start
    state.elapsed_s = elapsed0 + timings["total"]
    info = SegmentInfo(objects=list(state.objects), counters=dict(state.counters), timings=timings,
                       num_seeds=len(state.seeds), passes=passes,
                       seeds=state.seeds[::-1].copy() if state.phase > 1 else state.seeds.copy(),
                       positions=None if state.positions is None else state.positions.copy())
    return state, info


def final_segmentation(state: SegmentState, options: InferenceOptions,
                       shape: Sequence[int] | None = None) -> np.ndarray:
    """uint64 labels from a finished state (-1 seed marks become 0; consensus
    applied), on the native grid of `shape` when `options.downsample` is not
    1 (default: the coarse shape times the factors)."""
    seg = np.where(state.segmentation > 0, state.segmentation, 0).astype(np.uint64)
    if options.consensus and state.forward is not None:
        fwd = np.where(state.forward > 0, state.forward, 0)
        combine = split_by_intersection if options.consensus_mode == "split" else unlabel_contested
        seg = combine(fwd, seg, options.min_segment_size)
    return scale.upsample_labels(seg, options.downsample, shape)


def segment(image: Any, params: Any, model_config: ModelConfig,
            options: InferenceOptions = InferenceOptions(), apply_fn: ApplyFn | None = None,
            *, state: SegmentState | None = None, seeds: np.ndarray | None = None,
            checkpoint_fn: Callable[[SegmentState], Any] | None = None,
            checkpoint_every_s: float = 300.0, progress: bool = True,
            record_positions: bool = False, restriction: Restriction | None = None,
            init_segmentation: np.ndarray | None = None) -> tuple[np.ndarray, SegmentInfo]:
    """Segments a whole subvolume by flood filling from every seed in turn.

    Args:
      image: z,y,x raw image, a numpy array or a volume object (`ffnjax.volumes`).
      params: network parameters ({'params': ...} for the convstack).
      model_config: FOV size and deltas (and the convstack, when apply_fn is None).
      options: InferenceOptions; thresholds are probabilities (made logits once,
        in `FillSpec.from_configs`).
      apply_fn: `apply_fn(params, image_fov, mask_logits_fov) -> logits` on
        N,z,y,x,1 arrays; defaults to the convstack.
      state: resume from this `SegmentState` (as saved by `checkpoint_fn`); the
        result equals that of an uninterrupted run.
      seeds: explicit (N, 3) seeds instead of the seed policy.
      checkpoint_fn: called with the `SegmentState` every `checkpoint_every_s`
        seconds and at the end (e.g. `lambda s: save_state(path, s)`).
      progress: tqdm bar over seeds.
      record_positions: also return every evaluated FOV centre, in order
        (`SegmentInfo.positions`).
      restriction: masks of where no fill starts and no FOV is centred
        (`ffnjax.restrict.Restriction`).
      init_segmentation: z,y,x labels to continue: their objects are kept
        (ids too) and block new fills (google/ffn's `init_segmentation`).

    Returns:
      (segmentation uint64 z,y,x with 0 = background, SegmentInfo).

    Raises:
      ValueError: image smaller than the FOV, a network that does not map
        FOVs to FOVs, a state from a different run.
    """
    image = as_image_array(image)
    state, info = segment_state(image, params, model_config, options, apply_fn, state=state,
                                seeds=seeds, checkpoint_fn=checkpoint_fn,
                                checkpoint_every_s=checkpoint_every_s, progress=progress,
                                record_positions=record_positions, restriction=restriction,
                                init_segmentation=init_segmentation)
    return final_segmentation(state, options, image.shape[:3]), info
