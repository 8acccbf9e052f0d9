"""Scoring a segmentation: expected run length (ERL), VOI and adapted Rand.

google/ffn ships no evaluation ("not part of the repository"); this module
gives every segmentation the field's standard figures:

* **Skeletons** (`Skeleton`, `skeletonize`, `load_swc`/`save_swc`): one per
  ground-truth object, nodes in *voxel* coordinates z,y,x (floats allowed)
  plus edges between node indices. `skeletonize` runs kimimaro's TEASAR on a
  dense ground-truth volume; SWC files hold physical x,y,z coordinates and are
  converted at load/save time with the voxel size.
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
  as one JSON-ready dict, and `save_merge_png` draws the worst merges.

Conventions shared by every function here: arrays are z,y,x; ground-truth
label 0 means "unlabelled" and is ignored; segmentation label 0 means
"background / not segmented": it never counts as a run or a merger in ERL,
and in VOI/ARAND (like scikit-image and CREMI) it is an ordinary segment, so
leaving labelled voxels unsegmented costs merge error.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------
# Skeletons


@dataclasses.dataclass(frozen=True, eq=False)
class Skeleton:
    """One ground-truth object's skeleton.

    Attributes:
      nodes: (N, 3) float array of voxel coordinates z,y,x (voxel centres are
        integers; node i lies in voxel ``round(nodes[i])``).
      edges: (E, 2) int array of node indices; each edge is a straight
        segment between two nodes.
      label: the ground-truth id the skeleton belongs to.
    """

    nodes: np.ndarray
    edges: np.ndarray
    label: int = 0

    def __post_init__(self):
        nodes = np.asarray(self.nodes, dtype=np.float64).reshape(-1, 3) if np.size(self.nodes) else np.zeros((0, 3))
        edges = np.asarray(self.edges, dtype=np.int64).reshape(-1, 2) if np.size(self.edges) else np.zeros((0, 2), np.int64)
        if edges.size and (edges.min() < 0 or edges.max() >= len(nodes)):
            raise ValueError(f"skeleton {self.label}: edge indices must lie in [0, {len(nodes)}), "
                             f"got range [{edges.min()}, {edges.max()}]")
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "label", int(self.label))

    def edge_lengths(self, voxel_size: Sequence[float] = (1, 1, 1)) -> np.ndarray:
        """(E,) physical length of every edge (units of ``voxel_size``)."""
        vs = _voxel_size(voxel_size)
        d = (self.nodes[self.edges[:, 0]] - self.nodes[self.edges[:, 1]]) * vs
        return np.sqrt((d * d).sum(axis=1))

    def length(self, voxel_size: Sequence[float] = (1, 1, 1)) -> float:
        """Total physical length (sum of edge lengths)."""
        return float(self.edge_lengths(voxel_size).sum())


def _voxel_size(voxel_size: Sequence[float]) -> np.ndarray:
    vs = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if vs.shape != (3,) or not np.all(vs > 0):
        raise ValueError(f"voxel_size must be three positive numbers (z,y,x), got {voxel_size!r}")
    return vs


# kimimaro's TEASAR defaults, except that lengths scale with the voxel size
# in the callers' units; "const" is in physical units (nm for nm voxels).
DEFAULT_TEASAR = {"scale": 1.5, "const": 300}


def skeletonize(labels: np.ndarray, voxel_size: Sequence[float] = (1, 1, 1),
                **kimimaro_options: Any) -> list[Skeleton]:
    """Skeletonizes every object of a dense label volume with kimimaro (TEASAR).

    Args:
      labels: z,y,x integer label volume; 0 is background.
      voxel_size: physical voxel size z,y,x (kimimaro's ``anisotropy``).
      **kimimaro_options: passed to ``kimimaro.skeletonize``. Defaults here:
        ``teasar_params={"scale": 1.5, "const": 300}`` (invalidation radius
        ``scale * distance_to_boundary + const`` in physical units; a given
        dict is merged over these defaults), ``dust_threshold=100`` (objects
        with fewer voxels are skipped), ``fix_branching=True``,
        ``fix_borders=True``, ``progress=False``, ``parallel=1``.

    Returns:
      Skeletons sorted by label, nodes in voxel coordinates z,y,x.

    kimimaro works in x,y,z on Fortran-ordered arrays and returns vertices in
    physical units; both are converted here so callers only see z,y,x voxels.
    """
    import kimimaro

    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3D z,y,x volume, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    vs = _voxel_size(voxel_size)
    opts = {"dust_threshold": 100, "fix_branching": True, "fix_borders": True,
            "progress": False, "parallel": 1}
    opts.update(kimimaro_options)
    teasar = dict(DEFAULT_TEASAR)
    teasar.update(opts.pop("teasar_params", None) or {})
    if labels.dtype.kind == "i":
        if labels.size and labels.min() < 0:
            raise ValueError("labels must be non-negative")
        labels = labels.astype(np.uint64)
    result = kimimaro.skeletonize(labels.transpose(2, 1, 0), teasar_params=teasar,
                                  anisotropy=tuple(float(v) for v in vs[::-1]), **opts)
    out = []
    for label in sorted(result):
        sk = result[label]
        nodes = np.asarray(sk.vertices, np.float64)[:, ::-1] / vs
        out.append(Skeleton(nodes, np.asarray(sk.edges, np.int64), int(label)))
    return out


def save_swc(path: str | os.PathLike, skeleton: Skeleton,
             voxel_size: Sequence[float] = (1, 1, 1)) -> Path:
    """Writes one skeleton as SWC (physical x,y,z, one tree per connected part).

    Node ids are 1-based; each node's parent is its neighbour on a
    breadth-first tree of the edges (a root gets parent -1). Cycles, which SWC
    cannot hold, lose their closing edge. The label goes into a comment line.
    """
    vs = _voxel_size(voxel_size)
    n = len(skeleton.nodes)
    adj: list[list[int]] = [[] for _ in range(n)]
    for a, b in skeleton.edges:
        adj[a].append(int(b))
        adj[b].append(int(a))
    parent = np.full(n, -2, np.int64)
    order = []
    for root in range(n):
        if parent[root] != -2:
            continue
        parent[root] = -1
        queue = [root]
        while queue:
            v = queue.pop(0)
            order.append(v)
            for w in adj[v]:
                if parent[w] == -2:
                    parent[w] = v
                    queue.append(w)
    new_id = np.empty(n, np.int64)
    new_id[order] = np.arange(1, n + 1)
    xyz = skeleton.nodes[:, ::-1] * vs[::-1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# ffnjax skeleton label {skeleton.label}\n")
        f.write(f"# voxel_size_zyx {vs[0]:g} {vs[1]:g} {vs[2]:g}\n")
        for v in order:
            p = -1 if parent[v] == -1 else int(new_id[parent[v]])
            x, y, z = xyz[v]
            f.write(f"{new_id[v]} 0 {x:.6g} {y:.6g} {z:.6g} 1 {p}\n")
    return path


def load_swc(path: str | os.PathLike, voxel_size: Sequence[float] = (1, 1, 1),
             label: int | None = None) -> Skeleton:
    """Reads an SWC file (physical x,y,z) into a Skeleton in voxel z,y,x.

    Args:
      path: the .swc file.
      voxel_size: z,y,x voxel size in the file's units (coordinates are
        divided by it).
      label: the skeleton's label; by default the ``# ffnjax skeleton label``
        comment when present, else the digits in the file name, else 0.

    Raises:
      FileNotFoundError: when the file is missing.
      ValueError: naming the file and line when a line is malformed or a
        parent id does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SWC file not found: {path}")
    vs = _voxel_size(voxel_size)
    ids, coords, parents = [], [], []
    file_label = None
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if not s:
                continue
            if s.startswith("#"):
                parts = s[1:].split()
                if parts[:3] == ["ffnjax", "skeleton", "label"] and len(parts) > 3:
                    file_label = int(parts[3])
                continue
            parts = s.split()
            if len(parts) < 7:
                raise ValueError(f"{path}:{lineno}: SWC lines need 7 fields "
                                 f"(id type x y z radius parent), got {s!r}")
            try:
                ids.append(int(parts[0]))
                coords.append([float(parts[2]), float(parts[3]), float(parts[4])])
                parents.append(int(float(parts[6])))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: malformed SWC line {s!r}: {e}") from e
    index = {i: k for k, i in enumerate(ids)}
    if len(index) != len(ids):
        raise ValueError(f"{path}: duplicate node ids")
    edges = []
    for k, p in enumerate(parents):
        if p < 0:
            continue
        if p not in index:
            raise ValueError(f"{path}: node {ids[k]} names parent {p}, which does not exist")
        edges.append((index[p], k))
    nodes = np.asarray(coords, np.float64).reshape(-1, 3)[:, ::-1] / vs
    if label is None:
        digits = "".join(c for c in path.stem if c.isdigit())
        label = file_label if file_label is not None else (int(digits) if digits else 0)
    return Skeleton(nodes, np.asarray(edges, np.int64).reshape(-1, 2), label)


def load_swc_dir(directory: str | os.PathLike,
                 voxel_size: Sequence[float] = (1, 1, 1)) -> list[Skeleton]:
    """Every ``*.swc`` in a directory (sorted by name) as Skeletons."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"skeleton directory not found: {directory}")
    files = sorted(directory.glob("*.swc"))
    if not files:
        raise FileNotFoundError(f"no .swc files in {directory}")
    return [load_swc(p, voxel_size) for p in files]


def save_swc_dir(directory: str | os.PathLike, skeletons: Iterable[Skeleton],
                 voxel_size: Sequence[float] = (1, 1, 1)) -> list[Path]:
    """Writes each skeleton as ``DIRECTORY/LABEL.swc``."""
    directory = Path(directory)
    return [save_swc(directory / f"{sk.label}.swc", sk, voxel_size) for sk in skeletons]


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
    import fastremap

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
       "erl_um" added}, "n_skeletons", "skeleton_length", "voxel_size",
       "shape", "n_segments", "n_gt_objects", "seconds"}.
    """
    import time

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
        erl[str(int(t))] = d
    import fastremap
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


def format_table(report: dict) -> str:
    """A plain-text table of an `evaluate` report."""
    lines = [f"{'merge threshold':>16} {'ERL (um)':>10} {'max ERL (um)':>13} {'NERL':>7} "
             f"{'merges':>7} {'splits':>7}"]
    for t, r in report["erl"].items():
        lines.append(f"{t:>16} {r['erl_um']:>10.3f} {r['max_erl_um']:>13.3f} {r['nerl']:>7.3f} "
                     f"{r['merges']:>7d} {r['splits']:>7d}")
    lines.append(f"VOI split {report['voi_split']:.3f}  merge {report['voi_merge']:.3f}  "
                 f"total {report['voi']:.3f} bits   adapted Rand error {report['adapted_rand']:.4f}")
    lines.append(f"{report['n_skeletons']} skeletons, {report['skeleton_length'] / 1000:.2f} um; "
                 f"{report['n_segments']} segments vs {report['n_gt_objects']} GT objects; "
                 f"shape {tuple(report['shape'])}, voxel {tuple(report['voxel_size'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Picture


def save_merge_png(path: str | os.PathLike, segmentation: np.ndarray, groundtruth: np.ndarray,
                   image: np.ndarray | None = None, merging_segments: Sequence[int] = (),
                   n_worst: int = 3, n_slices: int = 3) -> Path:
    """Writes a PNG: per chosen z slice, the image with ground-truth outlines,
    the segmentation in colour, and the worst merges filled in magenta.

    Slices are those where the worst merging segments have the most voxels
    (evenly spread slices when there is no merger). ``merging_segments`` is
    `ERLResult.merging_segments` (worst first).
    """
    from ffnjax import viz

    seg, gt = _check_pair(segmentation, groundtruth)
    worst = [int(s) for s in merging_segments[:n_worst]]
    if worst:
        per_z = np.isin(seg, worst).sum(axis=(1, 2))
        zs = sorted(int(z) for z in np.argsort(-per_z, kind="stable")[:n_slices] if per_z[z] > 0)
    else:
        zs = viz.default_slices(seg.shape[0], n_slices)
    panels = []
    for z in zs:
        img = image[z] if image is not None else None
        panels.append(viz.overlay(img, gt[z], outline=True))
        panels.append(viz.overlay(img, seg[z], outline=False))
        m = viz.overlay(img, seg[z], outline=True, outline_color=(255, 255, 0))
        m[np.isin(seg[z], worst)] = (255, 0, 255)
        m[viz.boundaries(gt[z])] = (255, 60, 60)
        panels.append(m)
    return viz.save_png(path, viz.montage(panels, ncols=3))
