"""Consensus of two segmentations of one volume (a forward and a reverse seed order).

Flood filling is order dependent: whichever object fills first takes the
voxels where two objects touch. `segment` with `consensus` runs the seeds
forward and then reversed, and combines the two results with one of:

* `split_by_intersection`: every overlapping pair of objects becomes an
  object of its own, as in google/ffn's `split_segmentation_by_intersection`
  (which, unlike this one, keeps `a`'s id on each object's largest overlap;
  here the pieces are numbered 1..K in order of their pair).
* `unlabel_contested`: keeps the forward objects and unlabels only the small
  pieces the two orders disagree on (ffnjax's own rule).

Both are plain NumPy on the host and take int labels (> 0 objects, anything
else unlabelled).
"""

from __future__ import annotations

import numpy as np


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
