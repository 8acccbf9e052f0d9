"""Agglomeration block by block, on Dask: volumes larger than memory.

`ffnjax.agglomeration.agglomerate` reads the image and the segmentation
whole. Here every step reads only what it needs, from any volume
`ffnjax.volumes` opens (TensorStore), and runs as independent Dask tasks
(`ffnjax.dask_tasks`, the engines of `ffnjax.blockwise`):

1. **Decision points per block** (`decision_points_by_block`): each block's
   core plus `decision_points.block_margin` voxels of context gives the
   candidates of the faces in its core (`decision_points.find_candidates`);
   `decision_points.points_of` joins them: a pair met in several blocks is
   one pair (contacts summed, its point chosen over all its candidates).
   The points equal the whole-volume ones exactly (tested).
2. **Pairs in windows** (`resegment_windows`): each pair reads the image and
   segmentation of its subvolume only; its scores equal the whole-volume
   scores (the subvolume is the same box, `resegmentation.subvolume_corner`).
   Pairs run in chunks as Dask tasks; each chunk appends its scores to the
   results file as soon as it has them (so a killed run resumes).
3. **One global union-find** over the accepted pairs (`agglomeration.decide_all`,
   `merge_mapping`), then the output written block by block (`relabel_blocks`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Callable, Sequence

import numpy as np

from ffnjax import dask_tasks
from ffnjax.agglomeration import (AgglomerationResult, MergeRules, append_rows, assemble,
                                  relabel, result_row, run_record, scored_already)
from ffnjax.config import InferenceOptions, ModelConfig
from ffnjax.decision_points import (DecisionPoint, DecisionPointOptions, block_margin,
                                    find_candidates, points_of)
from ffnjax.flood import ApplyFn, check_apply_fn, default_apply_fn
from ffnjax.nets import normalize_image
from ffnjax.resegmentation import (FillScore, PairResult, ResegmentationConfig, resegment_pairs,
                                   subvolume_corner)

@dataclasses.dataclass(frozen=True)
class Region:
    """A box of a volume seen as a volume of its own: `shape` voxels of the
    volume `spec` from `start` (e.g. the part of an image a segmentation covers)."""

    spec: Any
    start: tuple[int, int, int]
    shape: tuple[int, int, int]


Source = Any   # a z,y,x NumPy array, a volume spec `ffnjax.volumes.open_input` opens, or a Region


def reader(source: Source) -> tuple[tuple[int, int, int], Callable[[Sequence[int], Sequence[int]], np.ndarray]]:
    """(shape, read(start, size)) of a source (a channel axis of one is dropped)."""
    if isinstance(source, np.ndarray):
        return tuple(source.shape[:3]), lambda start, size: source[  # type: ignore[return-value]
            tuple(slice(a, a + n) for a, n in zip(start, size))]
    from ffnjax.volumes import open_input

    region = source if isinstance(source, Region) else None
    vol = open_input(region.spec if region else source)
    origin = region.start if region else (0, 0, 0)

    def read(start, size):
        out = np.asarray(vol.read(tuple(int(a) + o for a, o in zip(start, origin)), size))
        return out[..., 0] if out.ndim == 4 and out.shape[-1] == 1 else out

    return (tuple(region.shape) if region else tuple(vol.shape)), read  # type: ignore[return-value]


def block_cores(shape: Sequence[int], block: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(start, stop) of every block of a grid of `block` covering `shape`, z,y,x order."""
    starts = [range(0, int(n), int(b)) for n, b in zip(shape, block)]
    return [(s, tuple(min(a + int(b), int(n)) for a, b, n in zip(s, block, shape)))
            for s in itertools.product(*starts)]


def _block_candidates(core, *, seg, shape, voxel_size, options):
    _, read = reader(seg)
    margin = block_margin(voxel_size, options)
    lo = tuple(max(a - m, 0) for a, m in zip(core[0], margin))
    hi = tuple(min(b + m, n) for b, m, n in zip(core[1], margin, shape))
    crop = read(lo, tuple(b - a for a, b in zip(lo, hi)))
    return find_candidates(crop, voxel_size, options, origin=lo, core=core, volume_shape=shape)


def decision_points_by_block(seg: Source, block: Sequence[int], voxel_size: Sequence[float] = (1, 1, 1),
                             options: DecisionPointOptions = DecisionPointOptions(), *,
                             engine: Any = "sync", progress: bool = False) -> list[DecisionPoint]:
    """`find_decision_points` computed block by block (equal results); `engine`
    is a Dask engine (`ffnjax.dask_tasks.engine`: 'sync', 'threads',
    'processes' or a Client)."""
    shape, _ = reader(seg)
    cores = block_cores(shape, block)
    parts = dask_tasks.run_tasks(
        engine, _block_candidates, [(c,) for c in cores], desc="decision points", progress=progress,
        shared=dict(seg=seg, shape=shape, voxel_size=tuple(voxel_size), options=options),
        labels=[f"block {c[0]}" for c in cores])
    return points_of(parts, options)


def _shift_fill(f: FillScore | None, corner: Sequence[int]) -> FillScore | None:
    if f is None:
        return None
    return dataclasses.replace(f, seed=tuple(int(s) + int(c) for s, c in zip(f.seed, corner)))


def resegment_windows(points: Sequence[DecisionPoint], *, image: Source, seg: Source,
                      params: Any, model_config: ModelConfig, options: InferenceOptions,
                      apply_fn: ApplyFn | None = None,
                      config: ResegmentationConfig = ResegmentationConfig(),
                      voxel_size: Sequence[float] = (1, 1, 1),
                      results_path: str | os.PathLike | None = None) -> list[PairResult]:
    """`resegment_pairs` of each point on its own subvolume, read from the
    volumes (equal to the whole-volume scores); appends each pair's row to
    `results_path` as soon as it is scored."""
    shape, read_seg = reader(seg)
    image_shape, read_image = reader(image)
    if image_shape != shape:
        raise ValueError(f"image shape {image_shape} differs from segmentation shape {shape}")
    apply_fn = apply_fn or default_apply_fn(model_config)
    box = config.box_shape(shape)
    out = []
    for p in points:
        corner = subvolume_corner(p.point, box, shape)
        img = np.asarray(normalize_image(read_image(corner, box), options.image_mean,
                                         options.image_stddev))
        local = dataclasses.replace(p, point=tuple(int(a) - c for a, c in zip(p.point, corner)))
        r = resegment_pairs(img, read_seg(corner, box), [local], params, model_config, options,
                            apply_fn, config, voxel_size)[0]
        r = dataclasses.replace(r, point=p, from_a=_shift_fill(r.from_a, corner),
                                from_b=_shift_fill(r.from_b, corner))
        if results_path:
            append_rows(results_path, [result_row(r)])
        out.append(r)
    return out


def _pairs_task(points, **shared):
    return resegment_windows(points, **shared)


def _relabel_task(core, *, seg, output, mapping):
    from ffnjax.volumes import open_volume

    _, read = reader(seg)
    size = tuple(b - a for a, b in zip(*core))
    labels = relabel(read(core[0], size), mapping).astype(np.uint64)
    open_volume(output, mode="r+").write(core[0], labels)
    return int(labels.size)


def relabel_blocks(seg: Source, output: Any, mapping: dict[int, int], block: Sequence[int], *,
                   engine: Any = "sync", progress: bool = False) -> None:
    """Writes `seg` relabelled by `mapping` into the existing volume `output`, block by block."""
    shape, _ = reader(seg)
    cores = block_cores(shape, block)
    dask_tasks.run_tasks(engine, _relabel_task, [(c,) for c in cores], desc="relabel",
                         progress=progress, shared=dict(seg=seg, output=output, mapping=mapping),
                         labels=[f"block {c[0]}" for c in cores])


def agglomerate_blocks(image: Source, seg: Source, params: Any, model_config: ModelConfig,
                       options: InferenceOptions = InferenceOptions(), *,
                       block: Sequence[int], voxel_size: Sequence[float] = (1, 1, 1),
                       config: ResegmentationConfig = ResegmentationConfig(),
                       rules: MergeRules = MergeRules(),
                       point_options: DecisionPointOptions = DecisionPointOptions(),
                       results_path: str | os.PathLike | None = None, run_id: str = "",
                       overwrite: bool = False, engine: Any = "sync", pairs_per_task: int = 8,
                       progress: bool = True, apply_fn: ApplyFn | None = None
                       ) -> AgglomerationResult:
    """`agglomerate` block by block: decision points per block, pairs in
    windows as Dask tasks (a chunk of `pairs_per_task` each), one union-find.
    The result's `labels` is None: write them with `relabel_blocks(seg, output,
    merge_mapping(result.merges), block)`. Scores, merge graph and merges
    equal `agglomerate`'s on the same inputs."""
    shape, _ = reader(seg)
    if any(int(f) != 1 for f in options.downsample):
        raise ValueError(f"block-wise agglomeration runs at the volumes' own scale, but the options "
                         f"ask for downsample {tuple(options.downsample)}: agglomerate the whole "
                         f"volume (it works at that scale), or downsample the volumes first")
    apply_fn = apply_fn or default_apply_fn(model_config)
    check_apply_fn(apply_fn, params, model_config, options.batch_size)
    points = decision_points_by_block(seg, block, voxel_size, point_options, engine=engine,
                                      progress=progress)
    run = run_record(shape, voxel_size, model_config, options, config, point_options, run_id)
    done, todo = scored_already(points, results_path, run, overwrite)
    n = max(int(pairs_per_task), 1)
    chunks = [todo[i:i + n] for i in range(0, len(todo), n)]
    shared = dict(image=image, seg=seg, params=params, model_config=model_config, options=options,
                  apply_fn=apply_fn, config=config, voxel_size=tuple(voxel_size),
                  results_path=results_path)
    scored = dask_tasks.run_tasks(engine, _pairs_task, [(c,) for c in chunks], desc="pairs",
                                  progress=progress, shared=shared,
                                  labels=[f"pairs {c[0].a}-{c[0].b}..." for c in chunks])
    new = {(r.point.a, r.point.b): r for chunk in scored for r in chunk}
    return assemble(points, new, done, rules, None)


__all__ = ["Region", "reader", "block_cores", "decision_points_by_block", "resegment_windows",
           "relabel_blocks", "agglomerate_blocks"]
