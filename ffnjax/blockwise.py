"""Whole-volume segmentation block by block on Dask, with global ID reconciliation.

Real EM volumes are far larger than memory, so FFN runs on overlapping
subvolumes ("blocks") and the pieces are stitched. google/ffn leaves this to
its users; ffnjax does it in three phases, each a set of independent Dask
tasks whose memory is bounded by the block size, never by the volume:

1. **Segment.** The volume is cut into blocks of size `block` on a regular
   grid (`ffnjax.blockgrid`); neighbouring blocks share `overlap` voxels along each axis (the last
   block on an axis is shifted back to end at the volume edge, so every block
   has the full size and one compiled network serves all of them). A task
   reads its block, segments it on its own and writes its labels atomically
   (`ffnjax.files`) to ``<workdir>/blocks/ZZZ_YYY_XXX.npz`` plus
   a small JSON with its object ids and sizes. A block whose JSON exists is
   skipped, so rerunning after a crash resumes where it stopped.
2. **Match.** For every pair of face-adjacent blocks, a task counts the voxels
   each pair of objects shares in the overlap. Pairs sharing at least
   `min_overlap` voxels are joined; the joins form a graph whose connected
   components (a union-find, computed by `scipy.sparse.csgraph`) are the global
   objects, numbered 1..K as uint64. Pairs that touch but share fewer voxels
   are *reported* (`BlockwiseSummary.weak_contacts`): that is where an object
   may have been cut because the overlap was too small.
3. **Write.** Each block's *core* (its part of the volume after the overlap
   with each neighbour is split at its middle) is relabelled to global IDs and
   written into the single output volume (zarr, N5 or neuroglancer
   precomputed; TensorStore makes concurrent writes to shared chunks safe).

Diagonal neighbours need no matching: on a regular grid the overlap of two
diagonal blocks lies inside a face-adjacent block, so their objects are joined
through it.

Engine (`ffnjax.dask_tasks`): `dask.distributed`. `client=None` starts a `LocalCluster` sized to the
machine; a `Client` (or a scheduler address string such as
``tcp://host:8786``) runs on an existing cluster; the strings ``'sync'`` and
``'threads'`` use Dask's local schedulers (handy for tests and debugging). The
model travels to each worker once (`Client.scatter(..., broadcast=True)`).

Looking at the result (a slice montage, a Neuroglancer viewer) is `ffnjax.view`;
`save_montage`, `read_slices` and `make_viewer` stay importable from here.

Everything is z,y,x.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ffnjax import dask_tasks, handoff, scale
from ffnjax.blockfiles import (block_paths, check_output, check_run_file, default_workdir,  # noqa: F401
                               load_block_labels, load_block_meta, prepare_output, save_block)
from ffnjax.blockgrid import Block, BlockGrid, axis_starts, overlap_box  # noqa: F401  (old home)
from ffnjax.config import InferenceOptions, ModelConfig
from ffnjax.dask_tasks import LOCAL_SCHEDULERS  # noqa: F401  (its old home)
from ffnjax.files import digest, overlaps, probe_writable, write_json
from ffnjax.handles import as_volume, spec_text
from ffnjax.segmentation import (UNSEGMENTED_SEED, SegmentState, final_segmentation, run_fingerprint,
                                 segment, segment_state)
from ffnjax.view import make_viewer, read_slices, save_montage  # noqa: F401  (their old home)
from ffnjax.volume_spec import local_paths
from ffnjax.volumes import require_finite

SegmentFn = Callable[[np.ndarray], np.ndarray]
FORMAT_VERSION = 2  # 2: whole-volume seeds, handoff rounds, tried seeds kept


# ----------------------------------------------------------------------------
# Per-block segmenters


@dataclasses.dataclass(frozen=True, eq=False)
class FFNSegmenter:
    """Segments one block with `ffnjax.segmentation.segment` (picklable, so Dask can
    ship it to workers once).

    Attributes:
      params, model_config, options, apply_fn: as for `ffnjax.segmentation.segment`;
        apply_fn=None uses the FFN network, `ffnjax.testing.oracle_apply_fn`
        the oracle (then the image is a label volume).

    A block starts from the whole volume's seeds inside it (`seeds_for`,
    `ffnjax.handoff.block_seeds`) and can continue from seeds handed over by
    its neighbours (`run` with `prior`). `options.min_segment_size` is applied
    to whole objects after stitching (`min_object_size`), not to the pieces a
    block sees, so blocks segment with it at 0.
    """

    params: Any
    model_config: ModelConfig
    options: InferenceOptions
    apply_fn: Callable | None = None

    @property
    def radius(self) -> tuple[int, int, int]:
        return tuple(s // 2 for s in self.model_config.fov_size)  # type: ignore[return-value]

    @property
    def min_object_size(self) -> int:
        return int(self.options.min_segment_size)

    @property
    def handoff(self) -> bool:
        """Whether blocks can continue from handed seeds (not with consensus,
        whose two passes would each need them)."""
        return not self.options.consensus

    def read_block(self, image: Any, block: Block) -> np.ndarray:
        vol = as_volume(image)
        return require_finite(vol.read(block.start, block.shape), f"image {spec_text(image)!r}",
                              block.start, getattr(vol, "chunks", None))

    def seeds_for(self, image: Any, block: Block) -> np.ndarray:
        """The whole volume's seeds inside `block` (`ffnjax.handoff.block_seeds`)."""
        vol = as_volume(image)
        return handoff.block_seeds(vol.read, tuple(vol.shape), block, self.options, self.radius)

    def run(self, image: np.ndarray, seeds: np.ndarray,
            prior: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Segments the block `image` from `seeds` (block-local native z,y,x),
        continuing `prior` = (labels, tried) when given. Returns (labels,
        tried): native labels, and the seeds (segmented grid) that gave no
        object, each seed of `seeds` that ended outside an object included."""
        opts = dataclasses.replace(self.options, min_segment_size=0)
        f = opts.downsample
        coarse = scale.to_coarse_points(seeds, f)
        state = None
        if prior is not None:
            seg = scale.downsample_labels(np.asarray(prior[0]), f).astype(np.int64)
            seg[tuple(np.asarray(prior[1], np.int64).reshape(-1, 3).T)] = UNSEGMENTED_SEED
            state = SegmentState(segmentation=seg, seeds=coarse, next_id=int(seg.max()) + 1,
                                 fingerprint=run_fingerprint(seg.shape, self.model_config, opts))
        state, _ = segment_state(image, self.params, self.model_config, opts, self.apply_fn,
                                 state=state, seeds=seeds if prior is None else None,
                                 progress=False)
        seg = state.segmentation
        if len(coarse):
            unfilled = coarse[seg[tuple(coarse.T)] == 0]  # skipped: never offered again
            seg[tuple(unfilled.T)] = UNSEGMENTED_SEED
        return final_segmentation(state, opts, image.shape), np.argwhere(seg == UNSEGMENTED_SEED)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        seg, _ = segment(image, self.params, self.model_config, self.options, apply_fn=self.apply_fn,
                         progress=False)
        return np.asarray(seg)

    def fingerprint(self) -> dict:
        """What determines this segmenter's output, for resume checks."""
        return {"model_config": self.model_config.to_dict(), "options": self.options.result_dict(),
                "apply_fn": _qualname(self.apply_fn) if self.apply_fn is not None else "ffn",
                "params_sha256": params_digest(self.params), "seeds": "whole-volume+handoff"}


def params_digest(params: Any) -> str:
    """sha256 over every parameter array (tree order), so a resumed run can
    tell whether the model changed."""
    pieces = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.ascontiguousarray(np.asarray(leaf))
        pieces += [jax.tree_util.keystr(path), arr.dtype.str + str(arr.shape), arr]
    return digest(pieces)


def _qualname(fn: Any) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _fingerprint(segment_fn: Any) -> Any:
    fp = getattr(segment_fn, "fingerprint", None)
    return fp() if callable(fp) else {"segment_fn": _qualname(segment_fn)}


def _seeds_itself(segment_fn: Any) -> bool:
    """Whether `segment_fn` starts from the whole volume's seeds (`FFNSegmenter`)."""
    return callable(getattr(segment_fn, "seeds_for", None)) and callable(getattr(segment_fn, "run", None))


# ----------------------------------------------------------------------------
# Task bodies (module-level so that worker processes can import them)


def segment_block(image: Any, workdir: str, block: Block, segment_fn: SegmentFn) -> dict:
    """Phase 1 task: segments one block unless its result already exists.

    A segmenter with `seeds_for` / `run` (`FFNSegmenter`) starts from the
    whole volume's seeds in the block; any other is called on the block's
    image. Returns the block's metadata dict (with 'skipped': True when it was
    done before).
    """
    meta = load_block_meta(workdir, block)
    if meta is not None:
        return {**meta, "skipped": True}
    t0 = time.perf_counter()
    if _seeds_itself(segment_fn):
        data = segment_fn.read_block(image, block)
        labels, tried = segment_fn.run(data, segment_fn.seeds_for(image, block))
    else:
        vol = as_volume(image)
        data = require_finite(vol.read(block.start, block.shape), f"image {spec_text(image)!r}",
                              block.start, getattr(vol, "chunks", None))
        labels, tried = np.asarray(segment_fn(data)), np.zeros((0, 3), np.int64)
    if labels.shape != block.shape:
        raise ValueError(f"segmenter returned shape {labels.shape} for block {block.name} "
                         f"of shape {block.shape}")
    if labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise ValueError(f"segmenter must return non-negative integer labels, got {labels.dtype}")
    return {**save_block(workdir, block, 0, labels, tried, t0, {}), "skipped": False}


def _overlap_labels(workdir: str, block: Block, meta: dict | None, start, stop) -> np.ndarray:
    labels = load_block_labels(workdir, block, meta)
    return labels[tuple(slice(s - o, e - o) for s, e, o in zip(start, stop, block.start))]


def match_pair(workdir: str, a: Block, b: Block, meta_a: dict | None = None,
               meta_b: dict | None = None) -> np.ndarray:
    """Phase 2 task: object pairs shared by blocks a and b in their overlap
    (their results as `meta_a` / `meta_b` name them; None: round 0).

    Returns:
      int64 array (n, 3) of rows (local id in a, local id in b, shared voxels),
      both ids non-zero.
    """
    start, stop = overlap_box(a, b)
    if any(e <= s for s, e in zip(start, stop)):
        return np.zeros((0, 3), np.int64)
    la = _overlap_labels(workdir, a, meta_a, start, stop)
    lb = _overlap_labels(workdir, b, meta_b, start, stop)
    both = (la != 0) & (lb != 0)
    key = (la[both].astype(np.uint64) << np.uint64(32)) | lb[both].astype(np.uint64)
    keys, counts = np.unique(key, return_counts=True)
    return np.stack([(keys >> np.uint64(32)).astype(np.int64),
                     (keys & np.uint64(0xFFFFFFFF)).astype(np.int64),
                     counts.astype(np.int64)], axis=1)


def write_block(output: Any, workdir: str, block: Block, lut: np.ndarray,
                meta: dict | None = None) -> int:
    """Phase 3 task: relabels a block's core with `lut` (local id -> global id)
    and writes it into the output volume. Returns the voxels written."""
    labels = load_block_labels(workdir, block, meta)[block.core_slices]
    out = lut[labels]
    as_volume(output, "r+").write(block.core_start, out)
    return int(out.size)


# ----------------------------------------------------------------------------
# Reconciliation


@dataclasses.dataclass(frozen=True)
class Reconciliation:
    """Global IDs of every block's local objects.

    Attributes:
      luts: per block name, an array mapping local id -> global uint64 id
        (index 0 -> 0).
      n_objects: number of global objects with voxels in the output.
      object_sizes: voxels per global id (index = id; index 0 unused).
      n_joins: object pairs joined across overlaps.
      weak_contacts: pairs that touched in an overlap but shared fewer than
        min_overlap voxels and ended up in two different objects of the output,
        as dicts (blocks, local ids, global ids, voxels): the places where
        objects may have been cut because the overlap was too small. (A piece
        that lies wholly outside its block's core never reaches the output and
        is not reported.)
    """

    luts: dict[str, np.ndarray]
    n_objects: int
    object_sizes: np.ndarray
    n_joins: int
    weak_contacts: list[dict]


def reconcile(grid: BlockGrid, metas: dict[str, dict], matches: list[np.ndarray],
              min_overlap: int = 1, min_size: int = 0) -> Reconciliation:
    """Joins objects across overlaps and numbers them globally.

    Args:
      grid: the block grid.
      metas: block name -> metadata from `segment_block`.
      matches: per `grid.neighbour_pairs()` entry, the rows from `match_pair`.
      min_overlap: shared voxels needed to join two objects.
      min_size: objects with fewer voxels in the output are left out (0):
        `InferenceOptions.min_segment_size`, applied to whole objects.

    Returns:
      A Reconciliation. Global ids are 1..K in the order of the lowest
      (block raster position, local id) of each object, so the numbering is
      deterministic.
    """
    if int(min_overlap) < 1:
        raise ValueError(f"min_overlap must be >= 1 voxel, got {min_overlap}")
    offsets, total = {}, 0
    for b in grid.blocks:
        offsets[b.name] = total
        total += int(metas[b.name]["n_objects"])
    rows, cols, weak = [], [], []
    pairs = grid.neighbour_pairs()
    if len(matches) != len(pairs):
        raise ValueError(f"got {len(matches)} match tables for {len(pairs)} block pairs")
    n_joins = 0
    for (a, b), m in zip(pairs, matches):
        m = np.asarray(m, np.int64).reshape(-1, 3)
        strong = m[:, 2] >= min_overlap
        n_joins += int(strong.sum())
        rows.append(offsets[a.name] + m[strong, 0] - 1)
        cols.append(offsets[b.name] + m[strong, 1] - 1)
        for la, lb, n in m[~strong]:
            weak.append({"blocks": [a.name, b.name], "local_ids": [int(la), int(lb)], "voxels": int(n)})
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(r.size, np.int8), (r, c)), shape=(total, total))
    _, comp = connected_components(graph, directed=False) if total else (0, np.zeros(0, np.int64))

    core = np.zeros(total, np.int64)  # core voxels of every node
    for b in grid.blocks:
        meta = metas[b.name]
        ids = np.asarray(meta["core_ids"], np.int64)
        core[offsets[b.name] + ids - 1] = np.asarray(meta["core_sizes"], np.int64)
    comp_core = np.bincount(comp, weights=core, minlength=comp.max() + 1 if total else 0)
    # Components in order of first appearance (node order = block raster, local id).
    _, first = np.unique(comp, return_index=True)
    order = np.argsort(first, kind="stable")  # component ids sorted by first node
    present = order[comp_core[order] >= max(int(min_size), 1)]
    global_of_comp = np.zeros(comp_core.size, np.uint64)
    global_of_comp[present] = np.arange(1, present.size + 1, dtype=np.uint64)
    node_global = global_of_comp[comp] if total else np.zeros(0, np.uint64)

    luts = {}
    for b in grid.blocks:
        n = int(metas[b.name]["n_objects"])
        lut = np.zeros(n + 1, np.uint64)
        lut[1:] = node_global[offsets[b.name]:offsets[b.name] + n]
        luts[b.name] = lut
    sizes = np.zeros(present.size + 1, np.int64)
    sizes[1:] = comp_core[present].astype(np.int64)
    cuts = []
    for w in weak:  # only contacts between two different objects of the output
        ga = int(luts[w["blocks"][0]][w["local_ids"][0]])
        gb = int(luts[w["blocks"][1]][w["local_ids"][1]])
        if ga != gb and ga and gb:
            cuts.append({**w, "global_ids": [ga, gb]})
    return Reconciliation(luts, int(present.size), sizes, n_joins, cuts)


# ----------------------------------------------------------------------------
# The runner


@dataclasses.dataclass(frozen=True)
class BlockwiseSummary:
    """What a block-wise run did.

    Attributes:
      output: the output volume spec; workdir: the per-block result folder.
      shape, block, overlap, grid_shape: the geometry (z,y,x).
      n_blocks, blocks_computed, blocks_skipped: phase 1 bookkeeping
        (skipped = found done by an earlier run).
      n_objects: global objects in the output; n_joins: joined object pairs.
      weak_contacts: object pairs that touched across an overlap with fewer
        than min_overlap shared voxels (possible cuts), see `Reconciliation`.
      handoff_rounds: handoff rounds run (`ffnjax.handoff`; 0 for a
        segmenter without handoff); handoff_converged: whether the last round
        handed no seed (False: `handoff_rounds` hit its bound).
      seconds: wall time per phase ('segment', 'handoff', 'match',
        'reconcile', 'write', 'total').
      voxels_per_second: volume voxels / total seconds.
      peak_worker_rss_mb: the largest peak resident memory reported by a
        segmenting worker process (covers only blocks computed in this run).
    """

    output: str
    workdir: str
    shape: tuple[int, int, int]
    block: tuple[int, int, int]
    overlap: tuple[int, int, int]
    grid_shape: tuple[int, int, int]
    n_blocks: int
    blocks_computed: int
    blocks_skipped: int
    n_objects: int
    n_joins: int
    weak_contacts: list[dict]
    seconds: dict[str, float]
    voxels_per_second: float
    peak_worker_rss_mb: float
    handoff_rounds: int = 0
    handoff_converged: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def __str__(self) -> str:
        s = self.seconds
        return (f"{self.n_blocks} blocks {self.grid_shape} of {self.block} (overlap {self.overlap}) "
                f"over {self.shape}: {self.blocks_computed} segmented, {self.blocks_skipped} resumed; "
                f"{self.handoff_rounds} handoff rounds"
                f"{'' if self.handoff_converged else ' (bound reached: coverage may be short)'}; "
                f"{self.n_objects} objects, {self.n_joins} joins, {len(self.weak_contacts)} weak "
                f"contacts; {s['total']:.1f} s total (segment {s['segment']:.1f}, handoff "
                f"{s.get('handoff', 0.0):.1f}, match "
                f"{s['match']:.1f}, write {s['write']:.1f}), {self.voxels_per_second:,.0f} voxels/s, "
                f"peak worker RSS {self.peak_worker_rss_mb:.0f} MiB -> {self.output}")


def segment_volume(image_spec: Any, output_spec: Any, params: Any = None,
                   model_config: ModelConfig | None = None,
                   options: InferenceOptions = InferenceOptions(), *,
                   block: Sequence[int] = (128, 256, 256), overlap: Sequence[int] | None = None,
                   client: Any = None, apply_fn: Callable | None = None,
                   min_overlap: int = 1, workdir: str | os.PathLike | None = None,
                   segment_fn: SegmentFn | None = None, n_workers: int | None = None,
                   chunks: Sequence[int] | None = None, retries: int = 1,
                   progress: bool = True, overwrite: bool = False,
                   max_handoff_rounds: int = 16) -> BlockwiseSummary:
    """Segments a whole volume block by block and writes one global segmentation.

    Args:
      image_spec: the image volume (any `ffnjax.volumes` spec, or an opened
        Volume-like object with shape/voxel_size/read when running in-process).
      output_spec: where the uint64 segmentation goes ('x.zarr', 'x.n5',
        'precomputed://x'); created when absent (after the blocks are
        segmented), reused when resuming (`workdir` holds this run's
        run.json). It may never be (or hold, or lie inside) the image.
      params, model_config, options, apply_fn: the model, as for
        `ffnjax.segmentation.segment` (apply_fn=`ffnjax.testing.oracle_apply_fn` with
        `oracle_options()` runs the oracle on a label volume).
      block: block size z,y,x.
      overlap: voxels shared by neighbouring blocks z,y,x. With the FFN
        segmenter at least twice the FOV radius on every axis with several
        blocks (`check_overlap`), which is the default (None); another
        `segment_fn` must be given one.
      client: None (a LocalCluster sized to the machine), a
        `dask.distributed.Client`, a scheduler address 'tcp://host:port', or a
        Dask local scheduler name 'sync' / 'threads' / 'processes'.
      min_overlap: shared voxels needed to join two objects across an overlap.
      workdir: folder for per-block results (default `<output>.blocks`); must
        be shared by all workers. Rerunning with the same workdir resumes.
      segment_fn: replaces the FFN segmenter: a picklable callable
        image block (z,y,x) -> integer labels of the same shape. Give it a
        `fingerprint()` method returning JSON to have resumes checked.
      n_workers: worker processes of the default LocalCluster.
      chunks: chunk shape of a newly created output (default: volumes' default).
      retries: times a failed task is tried again (`ffnjax.dask_tasks.run_tasks`).
      progress: show tqdm bars (blocks, pairs, writes).
      overwrite: replace an existing output that this run did not write
        (without it, such an output is refused before any work).
      max_handoff_rounds: bound on the handoff rounds (`ffnjax.handoff`) of
        a segmenter that supports them; 0 turns handoff off.

    Returns:
      A BlockwiseSummary.

    Raises:
      ValueError: bad geometry (an overlap too small for the FOV), a workdir holding another run, an output
        that is the image, an existing output of the wrong shape, or neither
        params/model_config nor segment_fn given.
      FileExistsError: an existing output this run did not write, without
        `overwrite`.
      ffnjax.dask_tasks.TasksFailed: blocks that failed every try, each named
        with its error (after the other blocks of the phase finished; their
        results are kept, and a rerun computes only the missing ones).
      NotADirectoryError / PermissionError: an output or work folder that
        cannot be written (found before any work).
    """
    t_start = time.perf_counter()
    built_here = segment_fn is None
    if segment_fn is None:
        if model_config is None:
            raise ValueError("segment_volume needs model_config (and params) or a segment_fn")
        segment_fn = FFNSegmenter(params, model_config, options, apply_fn)
    image = as_volume(image_spec)
    shape = tuple(int(s) for s in image.shape)
    if len(shape) != 3:
        raise ValueError(f"image {spec_text(image_spec)!r} must be 3D z,y,x, got shape {shape}")
    if overlap is None:
        if not _seeds_itself(segment_fn):
            raise ValueError("segment_volume needs an overlap with a segment_fn of its own")
        overlap = handoff.required_overlap(segment_fn.radius, segment_fn.options.downsample)
    grid = BlockGrid(shape, block, overlap)
    handing_off = (_seeds_itself(segment_fn) and bool(getattr(segment_fn, "handoff", False))
                   and int(max_handoff_rounds) > 0)
    if _seeds_itself(segment_fn):
        check_overlap(grid, segment_fn)
    if (built_here and options.fov_split == "auto"
            and dask_tasks.runs_in_parallel(client, len(grid), n_workers)):
        # Blocks already keep every core busy: splitting each FOV over the
        # cores as well would only add threads that wait for each other.
        options = dataclasses.replace(options, fov_split="off")
        segment_fn = FFNSegmenter(params, model_config, options, apply_fn)
    min_overlap = int(min_overlap)
    if min_overlap < 1:
        raise ValueError(f"min_overlap must be >= 1 voxel, got {min_overlap}")
    if int(retries) < 0:
        raise ValueError(f"retries (--retries) must be >= 0, got {retries}")
    workdir = Path(workdir) if workdir is not None else default_workdir(output_spec)
    for ipath in local_paths(image_spec):
        if overlaps(workdir, ipath):
            raise ValueError(f"work folder {workdir} would write into the image "
                             f"{spec_text(image_spec)!r}; pass another workdir")
    record = {"format": FORMAT_VERSION, "image": spec_text(image_spec), "shape": list(shape),
              "block": list(grid.block), "overlap": list(grid.overlap),
              "segmenter": json.loads(json.dumps(_fingerprint(segment_fn))),
              "max_handoff_rounds": int(max_handoff_rounds) if handing_off else 0}
    resuming = check_run_file(workdir, record, write=False)
    create = check_output(output_spec, image_spec, workdir, shape, resuming, overwrite)
    probe_writable(workdir / "blocks", "work folder")
    # Checks done: from here on files are written.
    (workdir / "blocks").mkdir(parents=True, exist_ok=True)
    check_run_file(workdir, record)
    wd = str(workdir)
    seconds = {}
    hint = (f"finished blocks are kept in {workdir}: rerun the same command to compute only the "
            f"missing ones (tracebacks in {workdir / 'failures.json'})")
    with dask_tasks.engine(client, len(grid), n_workers) as engine:
        def tasks(fn, args_list, desc, labels, **shared):
            try:
                return dask_tasks.run_tasks(engine, fn, args_list, desc=desc, progress=progress,
                                            shared=shared, retries=retries, labels=labels,
                                            hint=hint)
            except dask_tasks.TasksFailed as e:
                write_json(workdir / "failures.json",
                           {"phase": desc, "failures": [f.to_dict() for f in e.failures]})
                raise

        t = time.perf_counter()
        done = {b.name: m for b in grid.blocks if (m := load_block_meta(wd, b)) is not None}
        todo = [b for b in grid.blocks if b.name not in done]
        new = tasks(segment_block, [(image_spec, wd, b) for b in todo], "segment",
                    [f"block {b.name}" for b in todo], segment_fn=segment_fn)
        metas = {**done, **{m["block"]: m for m in new}}
        seconds["segment"] = time.perf_counter() - t

        t = time.perf_counter()
        rounds, converged = 0, True
        if handing_off:
            def run_round(fn, args_list, desc, labels):
                return tasks(fn, args_list, desc, labels, segment_fn=segment_fn)

            metas, rounds, converged = handoff.run_rounds(run_round, grid, image_spec, wd,
                                                          segment_fn, metas, int(max_handoff_rounds))
        seconds["handoff"] = time.perf_counter() - t

        t = time.perf_counter()
        pairs = grid.neighbour_pairs()
        matches = tasks(match_pair, [(wd, a, b, metas[a.name], metas[b.name]) for a, b in pairs],
                        "match", [f"blocks {a.name} and {b.name}" for a, b in pairs])
        seconds["match"] = time.perf_counter() - t

        t = time.perf_counter()
        rec = reconcile(grid, metas, matches, min_overlap,
                        int(getattr(segment_fn, "min_object_size", 0)))
        write_json(workdir / "reconcile.json", {
            "n_objects": rec.n_objects, "n_joins": rec.n_joins, "min_overlap": min_overlap,
            "handoff_rounds": rounds, "handoff_converged": converged,
            "weak_contacts": rec.weak_contacts})
        seconds["reconcile"] = time.perf_counter() - t

        t = time.perf_counter()
        output = prepare_output(output_spec, shape, getattr(image, "voxel_size", (1, 1, 1)), chunks,
                                create, replace=overwrite and not resuming)
        tasks(write_block, [(output, wd, b, rec.luts[b.name], metas[b.name]) for b in grid.blocks],
              "write", [f"block {b.name}" for b in grid.blocks])
        seconds["write"] = time.perf_counter() - t
    (workdir / "failures.json").unlink(missing_ok=True)
    seconds["total"] = time.perf_counter() - t_start
    computed = [m for m in new if not m.get("skipped")]
    return BlockwiseSummary(
        output=spec_text(output_spec), workdir=wd, shape=shape, block=grid.block,
        overlap=grid.overlap, grid_shape=grid.grid_shape, n_blocks=len(grid),
        blocks_computed=len(computed), blocks_skipped=len(grid) - len(computed),
        n_objects=rec.n_objects, n_joins=rec.n_joins, weak_contacts=rec.weak_contacts,
        seconds=seconds, voxels_per_second=math.prod(shape) / max(seconds["total"], 1e-9),
        peak_worker_rss_mb=max([m["peak_rss_mb"] for m in computed], default=0.0),
        handoff_rounds=rounds, handoff_converged=converged)


def check_overlap(grid: BlockGrid, segment_fn: FFNSegmenter) -> None:
    """Refuses an overlap below `ffnjax.handoff.required_overlap` (twice the
    FOV radius) on an axis with several blocks: there, the band between the
    places where two neighbouring blocks can start a fill would be reached
    by neither, and objects seeded only there would be lost."""
    need = handoff.required_overlap(segment_fn.radius, segment_fn.options.downsample)
    short = [ax for ax in range(3) if grid.grid_shape[ax] > 1 and grid.overlap[ax] < need[ax]]
    if short:
        fov = tuple(segment_fn.model_config.fov_size)
        ask = ",".join(str(max(o, n)) for o, n in zip(grid.overlap, need))
        raise ValueError(
            f"overlap {grid.overlap} (z,y,x) is too small for the FOV {fov}: along "
            f"{', '.join('zyx'[ax] for ax in short)} neighbouring blocks must share at least twice "
            f"the FOV radius, {','.join(map(str, need))} voxels, or objects seeded near a block face "
            f"are lost (a fill starts only where a whole FOV fits in its block); use --overlap {ask}")
