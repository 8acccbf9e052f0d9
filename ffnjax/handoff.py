"""Block-wise seeds that cover what the whole-volume run covers.

A whole-volume run fills an object from the first of its seeds, wherever in
the volume that seed lies, and the fill follows the object everywhere. A
block sees only itself: an object whose seeds all lie in other blocks is left
empty there, and a piece of an object that is joined to the rest only outside
the block is never reached. Two things make a block-wise run
(`ffnjax.blockwise`) cover what the whole-volume run covers:

* **The whole volume's seeds** (`block_seeds`). A block starts from the seeds
  the whole-volume run has inside it: the grid policy's lattice counted from
  the volume's origin (not the block's), and peaks found on the block plus a
  halo of context (`seed_halo`), so that the smoothing and the distance
  transform see what they see in the whole volume.
* **Handoff** (`handoff_seeds`, rounds run by `run_rounds`). After every block
  has used its own seeds, each block looks at what its face neighbours
  segmented in the overlap they share: where a neighbour has an object and
  the block has nothing, the block gets a seed (the deepest voxel of each such
  piece) and continues its segmentation from it. Rounds repeat, every block in
  parallel and each round reading the previous round's results only (so the
  result does not depend on the order tasks finish in), until no block gets a
  seed. A seed is only handed where a whole FOV fits in the receiving block.

The overlap must be at least twice the FOV radius (`required_overlap`), so
that every voxel lies where some block can start a fill.

Every handed seed ends as part of an object or as a tried seed (-1), and a
piece of a neighbour's object that holds a tried seed gets no more, so the
rounds end; `max_rounds` bounds them regardless.

Everything is z,y,x, block-local native voxels unless said otherwise.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import cc3d
import edt
import fastremap
import numpy as np
from scipy import ndimage

from ffnjax import scale
from ffnjax import seeds as seeds_lib
from ffnjax.blockfiles import block_paths, load_block_meta, load_block_state, save_block
from ffnjax.blockgrid import Block, BlockGrid, overlap_box
from ffnjax.config import InferenceOptions
from ffnjax.files import write_json

# Context read around a block for the 'peaks' seeds, in voxels of the
# segmented grid: the Gaussian of the adaptive edge threshold reaches
# 4 sigma, plus the Sobel kernel, the peaks' minimum distance and room for
# the distance transform.
PEAKS_HALO = 2 * math.ceil(4 * seeds_lib.PEAKS_SMOOTHING_SIGMA) + 1 + seeds_lib.PEAKS_MIN_DISTANCE


def seed_halo(options: InferenceOptions) -> int:
    """Voxels of context (segmented grid) the seed policy needs around a
    block: 0 for the grid in z,y,x order, `PEAKS_HALO` otherwise."""
    if options.seed_policy == "grid" and options.seed_order == "zyx":
        return 0
    return PEAKS_HALO


def seedable_box(shape: Sequence[int], radius: Sequence[int],
                 factors: Sequence[int] = (1, 1, 1)) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) of the native voxels of a block of `shape` from which a fill may
    start: a whole FOV (`radius`, segmented grid) fits around their voxel of
    the segmented grid (`ffnjax.seeds.inside_margin`)."""
    f = np.asarray(factors, np.int64)
    r = np.asarray(radius, np.int64)
    cs = np.asarray(scale.coarse_shape(shape, factors), np.int64)
    return r * f, np.minimum((cs - r) * f, np.asarray(shape, np.int64))


def _in_box(points: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.all((points >= lo) & (points < hi), axis=1)


def block_seeds(read: Callable[[Sequence[int], Sequence[int]], np.ndarray],
                volume_shape: Sequence[int], block: Block, options: InferenceOptions,
                radius: Sequence[int]) -> np.ndarray:
    """The whole-volume run's seeds that a fill can start from in `block`, in
    the order that run tries them, as block-local native z,y,x.

    Args:
      read: read(start, shape) -> the image box (native voxels).
      volume_shape: the image's shape.
      block: the block.
      options: the seed policy, order and `downsample`.
      radius: the FOV radius (segmented grid).

    The grid policy in z,y,x order is the lattice of the whole volume (no
    read); any other policy runs on the block and `seed_halo` voxels of
    context, so that it equals the whole volume's inside the block as far as
    the policy is local to that halo.
    """
    f = np.asarray(options.downsample, np.int64)
    start, stop = np.asarray(block.start), np.asarray(block.stop)
    halo = seed_halo(options)
    if halo == 0:
        cs = scale.coarse_shape(volume_shape, f)
        axes = [np.arange(r, n - r, s) for r, n, s in zip(radius, cs, options.seed_grid_step)]
        axes = [a[(a * k >= b0) & (a * k < b1)] for a, k, b0, b1 in zip(axes, f, start, stop)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        found = grid * f - start
    else:
        lo = np.maximum(start - halo * f, 0) // f * f  # on the volume's coarse grid
        hi = np.minimum(stop + halo * f, np.asarray(volume_shape))
        image = scale.downsample_image(np.asarray(read(tuple(lo), tuple(hi - lo))), f)
        found = seeds_lib.make_seeds(image, options) * f + lo - start
    box = seedable_box(block.shape, radius, f)
    return found[_in_box(found, *box)].astype(np.int64)


def handoff_seeds(own: np.ndarray, tried: np.ndarray,
                  neighbours: Sequence[tuple[np.ndarray, Sequence[int]]],
                  box: tuple[np.ndarray, np.ndarray], min_boundary_dist: Sequence[int]) -> np.ndarray:
    """Seeds for a block where its neighbours found objects and it found none.

    Args:
      own: the block's labels (0 = nothing).
      tried: (k, 3) voxels of the block where a fill was tried and gave no
        object.
      neighbours: per face neighbour, (its labels in the overlap, where that
        overlap starts in the block).
      box: [lo, hi) where a fill may start (`seedable_box`).
      min_boundary_dist: no seed within this of one of the block's objects
        (`InferenceOptions.min_boundary_dist`, native voxels).

    Returns:
      (N, 3) seeds in ascending z,y,x: per connected piece of one neighbour
      object over free voxels of the block (inside `box`), its deepest voxel
      (largest distance to the piece's edge; the first in z,y,x order among
      equals) not within `min_boundary_dist` of an object. A piece holding a
      tried voxel gets none: a fill there gave nothing already.
    """
    shape = own.shape
    keys = np.zeros(shape, np.uint64)
    for i, (crop, at) in enumerate(neighbours):
        sl = tuple(slice(int(a), int(a) + n) for a, n in zip(at, crop.shape))
        region = keys[sl]
        mine = (crop > 0) & (region == 0)  # the first neighbour wins where several overlap
        region[mine] = (np.uint64(i + 1) << np.uint64(40)) | crop[mine].astype(np.uint64)
    lo, hi = box
    inside = np.zeros(shape, bool)
    inside[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))] = True
    keys[(own != 0) | ~inside] = 0
    if not keys.any():
        return np.zeros((0, 3), np.int64)
    pieces = cc3d.connected_components(fastremap.renumber(keys, preserve_zero=True)[0],
                                       connectivity=6)
    tried_mask = np.zeros(shape, bool)
    if len(tried):
        tried_mask[tuple(np.asarray(tried, np.int64).T)] = True
    spent = np.unique(pieces[tried_mask])
    md = np.asarray(min_boundary_dist, np.int64)
    near = ndimage.maximum_filter(own > 0, size=tuple(2 * md + 1), mode="constant")
    allowed = (pieces > 0) & ~near & ~tried_mask & ~np.isin(pieces, spent)
    ids = np.unique(pieces[allowed])
    if not ids.size:
        return np.zeros((0, 3), np.int64)
    depth = edt.edt(np.ascontiguousarray(pieces), black_border=False)
    score = np.where(allowed, depth, -1.0)
    found = np.asarray(ndimage.maximum_position(score, pieces, ids), np.int64).reshape(-1, 3)
    return seeds_lib.order_seeds(found, "zyx")


def required_overlap(radius: Sequence[int], factors: Sequence[int] = (1, 1, 1)) -> tuple[int, ...]:
    """The least overlap z,y,x (native voxels) at which a block-wise run can
    cover what the whole-volume run covers: twice the FOV radius (the FOV
    size - 1 for odd sizes).

    A fill starts only where a whole FOV fits inside its block, i.e. at least
    the radius r from the block's faces. Along an axis, block i can start
    fills up to e_i - 1 - r and block i + 1 from s_{i+1} + r = e_i - o + r:
    with an overlap o < 2r the voxels between are a band where no block can
    start a fill, and an object whose seeds all lie there is lost (the issue's
    measurements lost up to 9% of the voxels that way). At o >= 2r the bands
    close, and handed seeds (which must lie in the overlap, r inside the
    receiving block) have room too.
    """
    return tuple(2 * int(r) * int(k) for r, k in zip(radius, factors))


# ----------------------------------------------------------------------------
# Rounds (task bodies are module-level so that worker processes can import them)


def handoff_block(image: Any, workdir: str, block: Block, round_: int,
                  neighbours: Sequence[Block], segment_fn: Any) -> dict:
    """Handoff round `round_` (>= 1) of one block: seeds from its neighbours'
    results of the round before, and the block's segmentation continued from
    them. Returns the block's metadata after this round ('seeds': seeds
    handed; 'skipped': True when an earlier run did this round)."""
    meta = load_block_meta(workdir, block, round_)
    if meta is not None:
        return {**meta, "skipped": True}
    t0 = time.perf_counter()
    prev = load_block_meta(workdir, block, round_ - 1)
    own, tried = load_block_state(workdir, block, prev)
    f = np.asarray(segment_fn.options.downsample, np.int64)
    crops = []
    for nb in neighbours:
        start, stop = overlap_box(block, nb)
        labels, _ = load_block_state(workdir, nb, load_block_meta(workdir, nb, round_ - 1))
        crops.append((labels[tuple(slice(s - o, e - o) for s, e, o in zip(start, stop, nb.start))],
                      tuple(s - o for s, o in zip(start, block.start))))
    radius = segment_fn.radius
    seeds = handoff_seeds(own, tried * f, crops, seedable_box(block.shape, radius, f),
                          np.asarray(segment_fn.options.min_boundary_dist) * f)
    if not len(seeds):
        meta = {**prev, "round": round_, "seeds": 0, "seconds": time.perf_counter() - t0}
        path = block_paths(workdir, block, round_)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, meta)
        return {**meta, "skipped": False}
    data = segment_fn.read_block(image, block)
    labels, tried = segment_fn.run(data, seeds, prior=(own, tried))
    meta = save_block(workdir, block, round_, labels, tried, t0, {"seeds": int(len(seeds))})
    return {**meta, "skipped": False}


def face_neighbours(grid: BlockGrid) -> dict[str, list[Block]]:
    """Per block name, its face-adjacent blocks."""
    out: dict[str, list[Block]] = {b.name: [] for b in grid.blocks}
    for a, b in grid.neighbour_pairs():
        out[a.name].append(b)
        out[b.name].append(a)
    return out


def run_rounds(run_tasks: Callable, grid: BlockGrid, image: Any, workdir: str, segment_fn: Any,
               metas: dict[str, dict], max_rounds: int) -> tuple[dict[str, dict], int, bool]:
    """Handoff rounds until a round hands no seed (or `max_rounds`).

    `run_tasks(fn, args_list, desc, labels)` runs tasks
    (`ffnjax.dask_tasks.run_tasks` bound to an engine). Returns (metadata of every block after the last
    round, rounds run, converged). A rerun finds finished rounds on disk and
    does not repeat them.
    """
    nbs = face_neighbours(grid)
    rounds, converged = 0, max_rounds == 0
    for k in range(1, max_rounds + 1):
        out = run_tasks(handoff_block, [(image, workdir, b, k, nbs[b.name]) for b in grid.blocks],
                        f"handoff {k}", [f"block {b.name}" for b in grid.blocks])
        metas = {m["block"]: m for m in out}
        rounds = k
        if sum(int(m.get("seeds", 0)) for m in out) == 0:
            converged = True
            break
    return metas, rounds, converged
