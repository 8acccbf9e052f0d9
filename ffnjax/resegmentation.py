"""Pair resegmentation: two fresh FFN fills around a decision point, and their scores.

google/ffn's `resegmentation.process_point` and
`resegmentation_analysis.evaluate_pair_resegmentation`, restated for ffnjax's
device fill (`ffnjax.flood`). For a `DecisionPoint` between segments A and B:

1. **Subvolume.** A box of `2 * radius + 1` voxels centred on the point (moved
   inside the volume where the point is nearer a border than `radius`, so every
   box has one shape and one compiled fill serves all points).
2. **Seeds.** In A, the voxel deepest inside A (largest EDT of A) within
   `seed_radius` of the point, among voxels where a whole FOV fits in the box
   (`seed_candidates`; near the volume's border, where no such voxel lies that
   close, the ball grows by the distance to the nearest one); likewise in B. A
   pair with no such voxel on one side is not resegmented.
3. **Fills.** Two flood fills of the trained network, one from each seed,
   each on an empty canvas. A fill that covers less than `recovery_fraction`
   of its own segment is tried again from the next deepest candidate at least
   `exclusion_radius` from the seeds tried, up to `max_retries` times
   (google/ffn's `max_retry_iters`, `segment_recovery_fraction`); its last
   attempt is scored. Several fills run as one vmapped, compiled call when
   `fills_per_call > 1` (A and B of consecutive pairs).
4. **Scores** inside the *analysis box* (`2 * analysis_radius + 1`, centred on
   the point, clipped to the subvolume), per fill (`FillScore`): voxels of the
   fill (probability >= segment_threshold), fraction of A and of B that it
   covers, voxels *deleted* by the evaluations centred in the box
   (`ffnjax.flood.DELETED_FROM_LOGIT`), and the fill's largest distance to its
   own border (max EDT); per pair the IoU of the two fills.

What the scores mean for merging is `ffnjax.agglomeration.MergeRules`.
Departure from google/ffn: its canvas keeps the other segments, and the FOV
may not move onto their voxels (`Canvas.is_valid_pos`); here the canvas is
empty and the fill may go anywhere in the box.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Sequence

import edt
import jax
import jax.numpy as jnp
import numpy as np

from ffnjax.config import InferenceOptions, ModelConfig, _as_zyx
from ffnjax.decision_points import DecisionPoint, relative_voxel_size
from ffnjax.flood import ApplyFn, FillSpec, compiled_fill, run_fill


@dataclasses.dataclass(frozen=True)
class ResegmentationConfig:
    """Geometry of a pair resegmentation (voxels, z,y,x).

    Attributes:
      radius: the subvolume is 2 * radius + 1 voxels, centred on the point
        (google/ffn's `radius`); each side must hold a whole FOV.
      analysis_radius: scores are computed in 2 * analysis_radius + 1 voxels
        around the point (google/ffn's `analysis_radius`); at most `radius`.
      seed_radius: seeds lie within this distance of the point (voxels along
        the finest axis); the deepest voxel of the segment there is taken.
      max_retries: further seeds tried on a side whose fill covers less than
        `recovery_fraction` of its own segment in the analysis box.
      recovery_fraction: see `max_retries` (google/ffn: 0.6).
      exclusion_radius: a retry's seed lies at least this far from the seeds
        tried before.
      fills_per_call: fills run together as one vmapped call (1: each fill on
        its own, google/ffn's order; 2: both fills of a pair; more: several
        pairs). Batching pays on accelerators; on a CPU each call runs as
        many steps as its longest fill.
    """

    radius: tuple[int, int, int] = (12, 16, 16)
    analysis_radius: tuple[int, int, int] = (8, 12, 12)
    seed_radius: float = 6.0
    max_retries: int = 2
    recovery_fraction: float = 0.6
    exclusion_radius: float = 3.0
    fills_per_call: int = 1

    def __post_init__(self):
        object.__setattr__(self, "radius", _as_zyx("radius", self.radius))
        object.__setattr__(self, "analysis_radius", _as_zyx("analysis_radius", self.analysis_radius))
        if any(a > r for a, r in zip(self.analysis_radius, self.radius)):
            raise ValueError(f"analysis_radius {self.analysis_radius} must not exceed radius "
                             f"{self.radius} (z,y,x)")
        if not self.seed_radius > 0:
            raise ValueError(f"seed_radius must be > 0, got {self.seed_radius}")
        if int(self.fills_per_call) < 1:
            raise ValueError(f"fills_per_call must be >= 1, got {self.fills_per_call}")
        if int(self.max_retries) < 0 or not 0.0 <= self.recovery_fraction <= 1.0:
            raise ValueError(f"max_retries must be >= 0 and recovery_fraction in [0, 1], got "
                             f"{self.max_retries} and {self.recovery_fraction}")
        if not self.exclusion_radius >= 0:
            raise ValueError(f"exclusion_radius must be >= 0, got {self.exclusion_radius}")

    def box_shape(self, volume_shape: Sequence[int]) -> tuple[int, int, int]:
        """The subvolume shape: 2 * radius + 1, or the volume where it is smaller."""
        return tuple(min(2 * r + 1, int(n)) for r, n in zip(self.radius, volume_shape))  # type: ignore


@dataclasses.dataclass(frozen=True)
class FillScore:
    """One fill of a pair resegmentation, scored in the analysis box.

    Attributes:
      seed: z,y,x of the fill's seed in the volume.
      voxels: voxels of the fill (probability >= segment_threshold).
      frac_a, frac_b: fraction of segment A's (B's) voxels the fill covers.
      deleted: voxels deleted by evaluations centred in the analysis box.
      max_edt: the fill's largest distance to its own border or the analysis
        box's faces (voxels along the finest axis): how thick the fill is there.
      steps: FOV evaluations of the fill.
      attempts: seeds tried on this side (the last one is scored).
    """

    seed: tuple[int, int, int]
    voxels: int
    frac_a: float
    frac_b: float
    deleted: int
    max_edt: float
    steps: int
    attempts: int = 1

    @property
    def deleted_fraction(self) -> float:
        return self.deleted / self.voxels if self.voxels else math.inf


@dataclasses.dataclass(frozen=True)
class PairTask:
    """Everything one pair's fills need, cut out of the volume (host arrays)."""

    point: DecisionPoint
    corner: tuple[int, int, int]       # subvolume start in the volume
    candidates: tuple[np.ndarray, np.ndarray]  # seed candidates of A and B, best first
    image: np.ndarray                  # float32 normalised subvolume
    seg_a: np.ndarray                  # bool, analysis box only
    seg_b: np.ndarray
    analysis: tuple[slice, slice, slice]  # the analysis box in the subvolume


def subvolume_corner(point: Sequence[int], box: Sequence[int], shape: Sequence[int]
                     ) -> tuple[int, int, int]:
    """Start of the box of shape `box` centred on `point`, moved inside `shape`."""
    return tuple(int(min(max(p - b // 2, 0), n - b))
                 for p, b, n in zip(point, box, shape))  # type: ignore[return-value]


def seed_candidates(mask: np.ndarray, point: Sequence[int], fov_radius: Sequence[int],
                    voxel_size: Sequence[float], seed_radius: float) -> np.ndarray:
    """Seed candidates (n, 3) z,y,x of the segment `mask`, best first.

    The candidates are the voxels of `mask` where a whole FOV fits in its box
    within `seed_radius` of `point` (plus the distance from `point` to the
    nearest such voxel, so a point near the border still gets seeds), ordered
    by depth inside `mask` (EDT, largest first), then distance to `point`,
    then z,y,x. Empty when no voxel of `mask` holds a whole FOV.
    """
    vs = np.asarray(voxel_size, np.float64)
    r = np.asarray(fov_radius)
    inner = np.zeros_like(mask)
    inner[tuple(slice(a, n - a) for a, n in zip(r, mask.shape))] = True
    coords = np.argwhere(mask & inner)
    if not len(coords):
        return coords
    depth = edt.edt(mask.astype(np.uint8), anisotropy=tuple(vs), black_border=False)
    dist = np.sqrt((((coords - np.asarray(point)) * vs) ** 2).sum(axis=1))
    near = dist <= dist.min() + float(seed_radius)
    coords, dist = coords[near], dist[near]
    order = np.lexsort((coords[:, 2], coords[:, 1], coords[:, 0], dist,
                        -depth[tuple(coords.T)]))
    return coords[order]


def next_seed(candidates: np.ndarray, tried: Sequence[Sequence[int]], voxel_size: Sequence[float],
              exclusion_radius: float) -> tuple[int, int, int] | None:
    """The first candidate at least `exclusion_radius` from every seed tried
    (and never a seed tried before), or None."""
    ok = np.ones(len(candidates), bool)
    vs = np.asarray(voxel_size, np.float64)
    for t in tried:
        d = np.sqrt((((candidates - np.asarray(t)) * vs) ** 2).sum(axis=1))
        ok &= (d > 0) & (d >= exclusion_radius)
    i = np.flatnonzero(ok)
    return tuple(int(c) for c in candidates[i[0]]) if len(i) else None  # type: ignore[return-value]


def prepare_pair(image: np.ndarray, seg: np.ndarray, point: DecisionPoint,
                 config: ResegmentationConfig, model_config: ModelConfig,
                 voxel_size: Sequence[float]) -> PairTask:
    """Cuts the subvolume of `point` and finds its seed candidates (`image` normalised already)."""
    box = config.box_shape(seg.shape)
    corner = subvolume_corner(point.point, box, seg.shape)
    sel = tuple(slice(c, c + b) for c, b in zip(corner, box))
    sub = seg[sel]
    local = tuple(p - c for p, c in zip(point.point, corner))
    fov_r = tuple(f // 2 for f in model_config.fov_size)
    cands = tuple(seed_candidates(sub == i, local, fov_r, voxel_size, config.seed_radius)
                  for i in (point.a, point.b))
    analysis = tuple(slice(max(p - r, 0), min(p + r + 1, b))
                     for p, r, b in zip(local, config.analysis_radius, box))
    return PairTask(point=point, corner=corner, candidates=cands,  # type: ignore[arg-type]
                    image=np.asarray(image[sel], np.float32),
                    seg_a=sub[analysis] == point.a, seg_b=sub[analysis] == point.b,
                    analysis=analysis)  # type: ignore[arg-type]


def score_fill(task: PairTask, seed: Sequence[int], canvas: np.ndarray, positions: np.ndarray,
               deleted: np.ndarray, spec: FillSpec, voxel_size: Sequence[float]
               ) -> tuple[FillScore, np.ndarray]:
    """(FillScore, the fill's mask in the analysis box) of one finished fill."""
    mask = np.asarray(canvas)[task.analysis] >= np.float32(spec.segment_logit)  # NaN: False
    lo = np.asarray([s.start for s in task.analysis])
    hi = np.asarray([s.stop for s in task.analysis])
    centred = np.all((positions >= lo) & (positions < hi), axis=1)
    n_a, n_b = int(task.seg_a.sum()), int(task.seg_b.sum())
    max_edt = float(edt.edt(mask.astype(np.uint8), anisotropy=tuple(float(v) for v in voxel_size),
                            black_border=True).max()) if mask.any() else 0.0
    return FillScore(seed=tuple(int(s) + c for s, c in zip(seed, task.corner)),  # type: ignore
                     voxels=int(mask.sum()),
                     frac_a=float((mask & task.seg_a).sum() / n_a) if n_a else 0.0,
                     frac_b=float((mask & task.seg_b).sum() / n_b) if n_b else 0.0,
                     deleted=int(deleted[centred].sum()), max_edt=max_edt,
                     steps=int(len(positions))), mask


def iou(m1: np.ndarray, m2: np.ndarray) -> float:
    union = int((m1 | m2).sum())
    return float((m1 & m2).sum() / union) if union else 0.0


@functools.lru_cache(maxsize=16)
def batched_fill(spec: FillSpec, apply_fn: ApplyFn):
    """`run(params, images (K, *shape), seeds (K, 3)) -> FillState` with every
    field batched over K: `ffnjax.flood.compiled_fill` vmapped and jitted (the
    loop runs until the longest of the K fills ends; finished ones idle). The
    K fills are one batch of work already, so no FOV is split over devices."""
    one = compiled_fill(dataclasses.replace(spec, fov_split=1), apply_fn)
    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


def run_fills(spec: FillSpec, apply_fn: ApplyFn, params: Any, images: Sequence[np.ndarray],
              seeds: Sequence[Sequence[int]], fills_per_call: int = 1):
    """Fills `images[i]` from `seeds[i]` for every i; yields (canvas, positions,
    deleted) per fill, in order (host arrays; positions/deleted per FOV step).

    With `fills_per_call` K > 1 the fills run K at a time through
    `batched_fill` (a short last batch is padded with copies of its first fill,
    so one executable serves every batch); with 1, one at a time through
    `ffnjax.flood.run_fill`.
    """
    n = len(images)
    if fills_per_call <= 1:
        for img, seed in zip(images, seeds):
            st = run_fill(spec, apply_fn, params, jnp.asarray(img), seed)
            steps = int(st.steps)
            yield (np.asarray(st.canvas), np.asarray(st.trace)[:steps],
                   np.asarray(st.trace_deleted)[:steps])
        return
    run = batched_fill(spec, apply_fn)
    for start in range(0, n, fills_per_call):
        idx = list(range(start, min(start + fills_per_call, n)))
        idx += [idx[0]] * (fills_per_call - len(idx))
        st = run(params, jnp.asarray(np.stack([images[i] for i in idx])),
                 jnp.asarray(np.asarray([seeds[i] for i in idx], np.int32)))
        if bool(np.any(np.asarray(st.overflow))):
            raise RuntimeError("flood-fill queue overflowed in a batched fill; this is a bug")
        canvas, trace, dels = np.asarray(st.canvas), np.asarray(st.trace), np.asarray(st.trace_deleted)
        steps = np.asarray(st.steps)
        for k in range(min(fills_per_call, n - start)):
            yield canvas[k], trace[k, :steps[k]], dels[k, :steps[k]]


@dataclasses.dataclass(frozen=True)
class PairResult:
    """A resegmented pair: its decision point, both fills and their IoU.

    `from_a` / `from_b` are None when no seed could be placed on one side
    (then the pair is never merged); `seconds` is the wall time of the pair's
    share of the fills and scoring.
    """

    point: DecisionPoint
    from_a: FillScore | None
    from_b: FillScore | None
    iou: float
    seconds: float


def resegment_pairs(image: np.ndarray, seg: np.ndarray, points: Sequence[DecisionPoint],
                    params: Any, model_config: ModelConfig, options: InferenceOptions,
                    apply_fn: ApplyFn, config: ResegmentationConfig = ResegmentationConfig(),
                    voxel_size: Sequence[float] = (1, 1, 1)) -> list[PairResult]:
    """Resegments each decision point of `points` (see the module docstring).

    Args:
      image: z,y,x float32 image, normalised already (`ffnjax.nets.normalize_image`).
      seg: z,y,x segmentation the points were found in.
      points: the decision points to resegment (their fills are batched together).
      params, model_config, options, apply_fn: the network and fill settings.
      config: subvolume and analysis geometry, retries, fills per call.
      voxel_size: z,y,x voxel size (only the ratios of its sides matter:
        distances count voxels along the finest axis).
    """
    t0 = time.perf_counter()
    voxel_size = tuple(relative_voxel_size(voxel_size))
    tasks = [prepare_pair(image, seg, p, config, model_config, voxel_size) for p in points]
    ready = [k for k, t in enumerate(tasks) if all(len(c) for c in t.candidates)]
    tried: dict[tuple[int, int], list] = {(k, side): [] for k in ready for side in (0, 1)}
    final: dict[tuple[int, int], tuple[FillScore, np.ndarray]] = {}
    pending = list(tried)
    spec = None
    for _ in range(1 + int(config.max_retries)):
        jobs = []
        for k, side in pending:
            seed = next_seed(tasks[k].candidates[side], tried[k, side], voxel_size,
                             config.exclusion_radius)
            if seed is not None:
                tried[k, side].append(seed)
                jobs.append((k, side, seed))
        if not jobs:
            break
        if spec is None:
            spec = FillSpec.from_configs(tasks[jobs[0][0]].image.shape, model_config, options,
                                         trace=True)
        fills = run_fills(spec, apply_fn, params, [tasks[k].image for k, _, _ in jobs],
                          [seed for _, _, seed in jobs], config.fills_per_call)
        pending = []
        for (k, side, seed), fill in zip(jobs, fills):
            score, mask = score_fill(tasks[k], seed, *fill, spec, voxel_size)
            score = dataclasses.replace(score, attempts=len(tried[k, side]))
            final[k, side] = (score, mask)
            own = score.frac_a if side == 0 else score.frac_b
            if own < config.recovery_fraction:
                pending.append((k, side))
    seconds = (time.perf_counter() - t0) / max(len(tasks), 1)
    out = []
    for k, t in enumerate(tasks):
        if (k, 0) in final and (k, 1) in final:
            (a, ma), (b, mb) = final[k, 0], final[k, 1]
            out.append(PairResult(point=t.point, from_a=a, from_b=b, iou=iou(ma, mb),
                                  seconds=seconds))
        else:
            out.append(PairResult(point=t.point, from_a=None, from_b=None, iou=0.0,
                                  seconds=seconds))
    return out
