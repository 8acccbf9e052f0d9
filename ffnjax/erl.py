"""Scoring a segmentation: expected run length (ERL), VOI and adapted Rand.

google/ffn ships no evaluation ("not part of the repository"); this module
gives every segmentation the field's standard figures:

* **Skeletons** (`Skeleton`, `skeletonize`, `load_swc`/`save_swc`) live in
  `ffnjax.skeletons`: one per ground-truth object, nodes in *voxel*
  coordinates z,y,x.
* **ERL** (`expected_run_length`, Januszewski et al. 2018): the expected
  length of skeleton one can walk from a random skeleton point without
  leaving the segment the point lies in, with merged segments counting for
  nothing. Lengths are in the units of ``voxel_size`` (nm when it is in nm).
* **VOI** (`voi`) split and merge in bits and the **adapted Rand error**
  (`adapted_rand`, CREMI/SNEMI's definition), both from a sparse contingency
  table and both ignoring ground-truth label 0. They equal
  ``skimage.metrics.variation_of_information(gt, seg, ignore_labels=(0,))``
  and ``skimage.metrics.adapted_rand_error(gt, seg)[0]`` (tested), but run in
  a few seconds on a 250^3 volume.
* `evaluate` computes all of it (ERL at two merge thresholds side by side)
  as one JSON-ready dict; `ffnjax.report` prints it (`format_table`) and
  draws the worst merges (`save_merge_png`).

Every name this module had before skeletons and the report moved out is
still importable from here (`ffnjax.erl.skeletonize`, `ffnjax.erl.format_table`, ...).

Conventions shared by every function here: arrays are z,y,x; ground-truth
label 0 means "unlabelled" and is ignored; segmentation label 0 means
"background / not segmented": it never counts as a run or a merger in ERL,
and in VOI/ARAND (like scikit-image and CREMI) it is an ordinary segment, so
leaving labelled voxels unsegmented costs merge error.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import fastremap
import numpy as np

# Re-exported: ffnjax.erl.* is public API, and these lived here before.
from ffnjax.report import format_table, save_merge_png  # noqa: F401
from ffnjax.skeletons import (DEFAULT_TEASAR, Skeleton, _voxel_size, load_swc,  # noqa: F401
                              load_swc_dir, save_swc, save_swc_dir, skeletonize)

# ----------------------------------------------------------------------------
# Expected run length


@dataclasses.dataclass(frozen=True, eq=False)
class ERLResult:
    """Expected run length of a segmentation against skeletons.

    Attributes:
      erl: expected run length (units of the voxel size).
      max_erl: the ERL of a perfect segmentation: sum L_k^2 / sum L_k.
      nerl: erl / max_erl, in [0, 1] (0 when there is no skeleton length).
      merges: number of segments that merge two or more skeletons.
      splits: sum over skeletons of (non-zero segments touched - 1).
      n_skeletons: skeletons scored (after the length threshold).
      total_length: sum of their lengths (after masking).
      merge_threshold: nodes a skeleton must have in a segment to count
        towards that segment being a merger.
      merging_segments: ids of the merging segments, the worst first (by the
        skeleton length they hold).
      merged_length: skeleton length (per merging segment, same order) lying
        inside it, lost to the merge.
      per_skeleton: one dict per scored skeleton: label, length, n_nodes,
        segments (non-zero segments touched), merged (touches a merger),
        run_erl (sum of its runs^2 / its length: its own expected run).
      nodes_outside: nodes dropped because they lie outside the volume or
        the mask.
    """

    erl: float
    max_erl: float
    nerl: float
    merges: int
    splits: int
    n_skeletons: int
    total_length: float
    merge_threshold: int
    merging_segments: tuple = ()
    merged_length: tuple = ()
    per_skeleton: tuple = ()
    nodes_outside: int = 0

    def summary(self) -> dict:
        """The scalar fields as a JSON-ready dict (no per-skeleton table)."""
        d = {k: getattr(self, k) for k in ("erl", "max_erl", "nerl", "merges", "splits",
                                           "n_skeletons", "total_length", "merge_threshold",
                                           "nodes_outside")}
        d["worst_merges"] = [int(s) for s in self.merging_segments[:10]]
        return d


def _node_segments(nodes: np.ndarray, segmentation: np.ndarray,
                   mask: np.ndarray | None) -> np.ndarray:
    """Segment id under each node; -1 where the node is outside the volume or mask."""
    vox = np.rint(nodes).astype(np.int64)
    shape = np.asarray(segmentation.shape)
    inside = np.all((vox >= 0) & (vox < shape), axis=1)
    out = np.full(len(nodes), -1, np.int64)
    v = vox[inside]
    seg = segmentation[v[:, 0], v[:, 1], v[:, 2]].astype(np.int64)
    if mask is not None:
        seg = np.where(mask[v[:, 0], v[:, 1], v[:, 2]], seg, -1)
    out[inside] = seg
    return out


def expected_run_length(skeletons: Sequence[Skeleton], segmentation: np.ndarray,
                        voxel_size: Sequence[float] = (1, 1, 1), merge_threshold: int = 1,
                        min_skeleton_length: float = 0.0,
                        mask: np.ndarray | None = None) -> ERLResult:
    """Expected run length (Januszewski et al. 2018) of a segmentation.

    The segment id under every skeleton node is looked up (node rounded to
    its voxel). A segment is a *merger* when two or more skeletons each have
    at least ``merge_threshold`` nodes in it. For each skeleton, an edge whose
    two nodes lie in the same segment, non-zero and not a merger, adds its
    length to that segment's run on that skeleton; other edges (crossing a
    boundary, touching background 0, or inside a merger) add nothing. A run is
    everything one skeleton has in one segment, even in pieces.

        ERL = sum_{k,s} run_{k,s}^2 / sum_k L_k,  max ERL = sum_k L_k^2 / sum_k L_k

    so ERL is the expected run length from a point drawn uniformly along all
    skeletons.

    Args:
      skeletons: the ground-truth skeletons (voxel coordinates z,y,x).
      segmentation: z,y,x integer volume to score.
      voxel_size: z,y,x physical voxel size; all lengths are in its units.
      merge_threshold: nodes of one skeleton a segment must hold before that
        skeleton counts towards making it a merger. 1 is the strict paper
        definition; on small dense cubes a one-node touch is common, so a
        tolerant value (e.g. 50) is worth reporting alongside.
      min_skeleton_length: skeletons shorter than this (after masking) are
        dropped entirely (not scored and not counted towards merges).
      mask: optional boolean z,y,x volume; nodes where it is False are
        dropped together with their edges (as are nodes outside the volume).

    Returns:
      An ERLResult.
    """
    segmentation = np.asarray(segmentation)
    if segmentation.ndim != 3:
        raise ValueError(f"segmentation must be a 3D z,y,x volume, got shape {segmentation.shape}")
    if not (np.issubdtype(segmentation.dtype, np.integer) or segmentation.dtype == bool):
        raise ValueError(f"segmentation must hold integer ids, got dtype {segmentation.dtype}")
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != segmentation.shape:
            raise ValueError(f"mask shape {mask.shape} differs from segmentation shape {segmentation.shape}")
    if int(merge_threshold) < 1:
        raise ValueError(f"merge_threshold must be >= 1, got {merge_threshold}")
    vs = _voxel_size(voxel_size)

    # Per skeleton: node segments (-1 = dropped), kept edges and their lengths.
    kept = []
    nodes_outside = 0
    for sk in skeletons:
        nseg = _node_segments(sk.nodes, segmentation, mask)
        nodes_outside += int((nseg < 0).sum())
        e = sk.edges[(nseg[sk.edges[:, 0]] >= 0) & (nseg[sk.edges[:, 1]] >= 0)] if len(sk.edges) else sk.edges
        lengths = Skeleton(sk.nodes, e, sk.label).edge_lengths(vs)
        total = float(lengths.sum())
        if total <= 0 or total < min_skeleton_length:
            continue
        kept.append((sk, nseg, e, lengths, total))

    if not kept:
        return ERLResult(0.0, 0.0, 0.0, 0, 0, 0, 0.0, int(merge_threshold), nodes_outside=nodes_outside)

    # Mergers: segments where >= 2 skeletons have >= merge_threshold nodes.
    node_sk = np.concatenate([np.full(len(n), k) for k, (_, n, *_r) in enumerate(kept)])
    node_seg = np.concatenate([n for _, n, *_r in kept])
    valid = node_seg > 0
    pairs, counts = np.unique(np.stack([node_seg[valid], node_sk[valid]], 1), axis=0, return_counts=True)
    strong = pairs[counts >= merge_threshold]
    seg_ids, n_sk = np.unique(strong[:, 0], return_counts=True)
    mergers = seg_ids[n_sk >= 2]

    totals = np.array([t for *_r, t in kept])
    per_skeleton = []
    sum_run2 = 0.0
    splits = 0
    merged_len: dict[int, float] = {}
    for k, (sk, nseg, e, lengths, total) in enumerate(kept):
        a, b = nseg[e[:, 0]], nseg[e[:, 1]]
        same = (a == b) & (a > 0)
        in_merger = same & np.isin(a, mergers)
        for s, l in zip(a[in_merger], lengths[in_merger]):
            merged_len[int(s)] = merged_len.get(int(s), 0.0) + float(l)
        good = same & ~in_merger
        runs = np.bincount(np.unique(a[good], return_inverse=True)[1], weights=lengths[good]) if good.any() else np.zeros(0)
        run2 = float((runs ** 2).sum())
        sum_run2 += run2
        touched = np.unique(nseg[nseg > 0])
        splits += max(len(touched) - 1, 0)
        per_skeleton.append({"label": sk.label, "length": total, "n_nodes": int((nseg >= 0).sum()),
                             "segments": int(len(touched)),
                             "merged": bool(np.isin(touched, mergers).any()),
                             "run_erl": run2 / total})
    total_length = float(totals.sum())
    erl = sum_run2 / total_length
    max_erl = float((totals ** 2).sum()) / total_length
    worst = sorted(mergers.tolist(), key=lambda s: -merged_len.get(int(s), 0.0))
    return ERLResult(erl=erl, max_erl=max_erl, nerl=erl / max_erl, merges=int(len(mergers)),
                     splits=int(splits), n_skeletons=len(kept), total_length=total_length,
                     merge_threshold=int(merge_threshold),
                     merging_segments=tuple(int(s) for s in worst),
                     merged_length=tuple(merged_len.get(int(s), 0.0) for s in worst),
                     per_skeleton=tuple(per_skeleton), nodes_outside=nodes_outside)


# ----------------------------------------------------------------------------
# VOI and adapted Rand from a sparse contingency table


def _check_pair(segmentation: np.ndarray, groundtruth: np.ndarray):
    seg = np.asarray(segmentation)
    gt = np.asarray(groundtruth)
    if seg.shape != gt.shape:
        raise ValueError(f"segmentation shape {seg.shape} differs from groundtruth shape {gt.shape}")
    for name, a in (("segmentation", seg), ("groundtruth", gt)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise ValueError(f"{name} must hold integer ids, got dtype {a.dtype}")
    return seg, gt


def contingency(segmentation: np.ndarray, groundtruth: np.ndarray):
    """Sparse contingency table over voxels whose ground truth is non-zero.

    Returns:
      (counts, gt_index, seg_index, n_gt, n_seg): ``counts[i]`` voxels have
      ground-truth object ``gt_index[i]`` and segment ``seg_index[i]``
      (indices into compact 0-based relabellings; segmentation 0 is a segment
      like any other). Only non-zero entries are listed.

    Raises:
      ValueError: when the ground truth has no non-zero voxel.
    """
    seg, gt = _check_pair(segmentation, groundtruth)
    keep = gt.reshape(-1) != 0
    if not keep.any():
        raise ValueError("groundtruth has no labelled (non-zero) voxel to score against")
    g = gt.reshape(-1)[keep]
    s = seg.reshape(-1)[keep]
    g, _ = fastremap.renumber(np.ascontiguousarray(g), start=0, preserve_zero=False)
    s, _ = fastremap.renumber(np.ascontiguousarray(s), start=0, preserve_zero=False)
    n_gt, n_seg = int(g.max()) + 1, int(s.max()) + 1
    key = g.astype(np.int64) * n_seg + s.astype(np.int64)
    uniq, counts = fastremap.unique(key, return_counts=True)
    uniq = np.asarray(uniq, np.int64)
    return (np.asarray(counts, np.float64), uniq // n_seg, uniq % n_seg, n_gt, n_seg)


def _xlog2x_sum(p: np.ndarray) -> float:
    p = p[p > 0]
    return float((p * np.log2(p)).sum())


def voi(segmentation: np.ndarray, groundtruth: np.ndarray) -> tuple[float, float]:
    """Variation of information split and merge parts, in bits.

    Over voxels with non-zero ground truth:
    ``split = H(seg | gt)`` (over-segmentation: how much one ground-truth
    object is scattered over segments) and ``merge = H(gt | seg)``
    (under-segmentation). This is
    ``skimage.metrics.variation_of_information(gt, seg, ignore_labels=(0,))``
    (note scikit-image takes the ground truth first and returns
    [H(image1|image0), H(image0|image1)]).

    Returns:
      (split, merge) as floats; both 0 for a segmentation equal to the ground
      truth up to relabelling.
    """
    return _voi_from_table(contingency(segmentation, groundtruth))


def _voi_from_table(table) -> tuple[float, float]:
    counts, gi, si, n_gt, n_seg = table
    n = counts.sum()
    p = counts / n
    p_gt = np.bincount(gi, weights=p, minlength=n_gt)
    p_seg = np.bincount(si, weights=p, minlength=n_seg)
    h_joint = -_xlog2x_sum(p)
    split = h_joint + _xlog2x_sum(p_gt)   # H(seg|gt) = H(gt,seg) - H(gt)
    merge = h_joint + _xlog2x_sum(p_seg)  # H(gt|seg) = H(gt,seg) - H(seg)
    return max(split, 0.0), max(merge, 0.0)


def adapted_rand(segmentation: np.ndarray, groundtruth: np.ndarray,
                 return_precision_recall: bool = False):
    """Adapted Rand error (CREMI / SNEMI3D), ignoring ground-truth label 0.

    With n_ij voxels in ground-truth object i and segment j, a_i and b_j the
    object and segment sizes (all over non-zero ground truth),

        precision = sum n_ij^2 - N over sum b_j^2 - N   (pairs together in the
                    segmentation that are together in the ground truth)
        recall    = sum n_ij^2 - N over sum a_i^2 - N
        error     = 1 - 2 / (1/precision + 1/recall)

    which equals ``skimage.metrics.adapted_rand_error(gt, seg)[0]``. (scikit-
    image's own precision/recall outputs are swapped relative to this,
    CREMI's naming, which is used here.)

    Returns:
      The error in [0, 1] (0 = perfect), or (error, precision, recall) with
      ``return_precision_recall=True``.
    """
    return _arand_from_table(contingency(segmentation, groundtruth), return_precision_recall)


def _arand_from_table(table, return_precision_recall: bool = False):
    counts, gi, si, n_gt, n_seg = table
    n = counts.sum()
    a = np.bincount(gi, weights=counts, minlength=n_gt)
    b = np.bincount(si, weights=counts, minlength=n_seg)
    sum_ij = float(counts @ counts - n)
    sum_a = float(a @ a - n)
    sum_b = float(b @ b - n)
    denom = 0.5 * (sum_a + sum_b)
    error = 1.0 - sum_ij / denom if denom > 0 else 0.0
    if not return_precision_recall:
        return error
    precision = sum_ij / sum_b if sum_b > 0 else 1.0
    recall = sum_ij / sum_a if sum_a > 0 else 1.0
    return error, precision, recall


# ----------------------------------------------------------------------------
# Everything at once


def merges_per_mm(merges: int, skeleton_length_nm: float) -> float:
    """Merge rate: merging segments per millimetre of scored skeleton path
    length (lengths in nm, as `voxel_size` is; 0 when there is no length).
    With a voxel size of 1 the 'nm' are voxels and the rate is per 10^6 voxels
    of path."""
    return float(merges) / (skeleton_length_nm * 1e-6) if skeleton_length_nm > 0 else 0.0


def evaluate(segmentation: np.ndarray, groundtruth: np.ndarray,
             voxel_size: Sequence[float] = (1, 1, 1), skeletons: Sequence[Skeleton] | None = None, *,
             merge_thresholds: Sequence[int] = (1, 50), min_skeleton_length: float = 0.0,
             mask: np.ndarray | None = None,
             skeleton_options: Mapping[str, Any] | None = None) -> dict:
    """Scores a segmentation with every metric here; a JSON-ready dict.

    Args:
      segmentation: z,y,x integer volume.
      groundtruth: z,y,x integer volume of the same shape; 0 = unlabelled.
      voxel_size: z,y,x physical voxel size (nm); ERL lengths are in its units.
      skeletons: ground-truth skeletons; by default `skeletonize(groundtruth,
        voxel_size, **skeleton_options)`.
      merge_thresholds: ERL is reported once per threshold (strict 1 and a
        tolerant 50 by default).
      min_skeleton_length, mask: see `expected_run_length`.
      skeleton_options: kimimaro options for `skeletonize`.

    Returns:
      {"voi_split", "voi_merge", "voi", "adapted_rand", "arand_precision",
       "arand_recall", "erl": {str(threshold): ERLResult.summary() with
       "erl_um", "max_erl_um" and "merges_per_mm" added}, "n_skeletons",
       "skeleton_length", "voxel_size", "shape", "n_segments", "n_gt_objects",
       "seconds"}.
    """
    t0 = time.perf_counter()
    seg, gt = _check_pair(segmentation, groundtruth)
    if seg.ndim != 3:
        raise ValueError(f"segmentation must be a 3D z,y,x volume, got shape {seg.shape}")
    vs = _voxel_size(voxel_size)
    table = contingency(seg, gt)
    split, merge = _voi_from_table(table)
    arand, prec, rec = _arand_from_table(table, return_precision_recall=True)
    if skeletons is None:
        skeletons = skeletonize(gt, vs, **dict(skeleton_options or {}))
    erl = {}
    for t in merge_thresholds:
        r = expected_run_length(skeletons, seg, vs, merge_threshold=int(t),
                                min_skeleton_length=min_skeleton_length, mask=mask)
        d = r.summary()
        d["erl_um"] = r.erl / 1000.0
        d["max_erl_um"] = r.max_erl / 1000.0
        d["merges_per_mm"] = merges_per_mm(r.merges, r.total_length)
        erl[str(int(t))] = d
    n_seg = len(fastremap.unique(seg))
    n_gt = len(fastremap.unique(gt))
    return {"voi_split": split, "voi_merge": merge, "voi": split + merge,
            "adapted_rand": arand, "arand_precision": prec, "arand_recall": rec,
            "erl": erl, "n_skeletons": len(skeletons),
            "skeleton_length": float(sum(s.length(vs) for s in skeletons)),
            "voxel_size": [float(v) for v in vs], "shape": list(seg.shape),
            "n_segments": int(n_seg - (seg == 0).any()) if seg.size else 0,
            "n_gt_objects": int(n_gt - (gt == 0).any()) if gt.size else 0,
            "seconds": time.perf_counter() - t0}
