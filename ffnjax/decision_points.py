"""Decision points: where two segments meet, the one place to ask the FFN again.

Agglomeration re-runs the network around a point where two segments of an
oversegmentation touch (or nearly touch) and merges them when both fills agree
(`ffnjax.resegmentation`, `ffnjax.agglomeration`). This module picks that
point for every pair, vectorised over voxels (one EDT per pair on a small
crop, no Python loop over voxels):

1. **Expansion** (`expand_labels`, only with `max_distance > 0`): background
   voxels within `max_distance` (physical units) of a segment take the label
   of the nearest one, and remember that distance (the *gap*); segments then
   meet across thin background, as in google/ffn's `watershed_expand`.
2. **Interface** (`interface_faces`): every pair of face-adjacent voxels
   (6-connectivity) with two different non-zero labels is one *face* of the
   interface of that pair (a, b) with a < b. The pair's *contact* is its
   number of faces between voxels of the original segments (0 for a pair
   that only comes within `max_distance`); its *gap* is the smallest mean gap
   of its faces (0 when it touches).
3. **Point** (`find_decision_points`): the candidates are both voxels of
   every face at the pair's closest approach (face gap within half the
   smallest voxel side of the pair's gap: for touching pairs, exactly the
   voxels of the contact). Each gets a *clearance*: its distance to the
   nearest voxel outside the union of the two (expanded) segments -- another
   segment, background, or beyond the volume's border -- capped at
   `clearance_cap`. The decision point is the candidate of largest clearance
   (the middle of a cut through a neurite, far from everything else); ties
   go to the candidate nearest the centroid of all candidates, then to the
   lowest z,y,x.

google/ffn's `find_decision_points` takes the interface voxel of smallest gap
closest to the centroid of the smallest-gap voxels, and looks at 7 of the
26 neighbour offsets. ffnjax keeps its closest-approach step but picks, among
the closest voxels, the one farthest from any third segment (the issue's
rule: the maximum of the distance transform over the pair's interface), so a
fill seeded near it sees both segments and little else; it counts contacts
over the 6 face neighbours (the usual meaning of 'touching' and of a contact
area).

Everything is z,y,x. Distances are in voxels along the finest axis: the
voxel size only says how the axes compare (`relative_voxel_size`), so the
defaults mean the same at 4 nm as at 40 nm, and anisotropy is respected.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import edt
import numpy as np
from scipy import ndimage

# Clearances closer than this count as equal (EDT values are float32).
TIE = 1e-3


@dataclasses.dataclass(frozen=True)
class DecisionPoint:
    """One pair of segments and where to resegment it.

    Attributes:
      a, b: the two segment ids, a < b.
      point: z,y,x voxel of the decision point (inside a or b, or in the
        expanded background between them).
      contact: face-adjacent voxel pairs between a and b in the original
        segmentation (0 when they only come within `max_distance`).
      gap: the pair's closest approach (0 when they touch).
      clearance: the point's distance to anything but a and b (capped).
    """

    a: int
    b: int
    point: tuple[int, int, int]
    contact: int
    gap: float
    clearance: float


@dataclasses.dataclass(frozen=True)
class DecisionPointOptions:
    """How decision points are found (the defaults suit touching segments).

    Attributes:
      max_distance: segments this close count as a pair; 0 pairs only
        segments that touch.
      min_contact: touching pairs with fewer contact faces are dropped (pairs
        found only through `max_distance` are kept).
      clearance_cap: clearances are capped here; beyond it every candidate
        is as good (then the most central wins).

    Distances are in voxels along the finest axis (`relative_voxel_size`).
    """

    max_distance: float = 0.0
    min_contact: int = 1
    clearance_cap: float = 12.0

    def __post_init__(self):
        if not self.max_distance >= 0:
            raise ValueError(f"max_distance must be >= 0, got {self.max_distance}")
        if int(self.min_contact) < 0:
            raise ValueError(f"min_contact must be >= 0, got {self.min_contact}")
        if not self.clearance_cap > 0:
            raise ValueError(f"clearance_cap must be > 0, got {self.clearance_cap}")


def _check(seg: np.ndarray, voxel_size: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    seg = np.asarray(seg)
    if seg.ndim != 3:
        raise ValueError(f"segmentation must be a 3D z,y,x volume, got shape {seg.shape}")
    if not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"segmentation must hold integer ids, got dtype {seg.dtype}")
    return seg, relative_voxel_size(voxel_size)


def relative_voxel_size(voxel_size: Sequence[float]) -> np.ndarray:
    """The voxel size divided by its smallest side: the unit of every distance
    in agglomeration (1 = one voxel along the finest axis)."""
    try:
        vs = np.asarray([float(v) for v in voxel_size], np.float64)
    except (TypeError, ValueError):
        vs = np.zeros(0)
    if vs.shape != (3,) or not np.all(vs > 0):
        raise ValueError(f"voxel_size must be three positive numbers z,y,x, got {voxel_size!r}")
    return vs / vs.min()


def expand_labels(seg: np.ndarray, voxel_size: Sequence[float] = (1, 1, 1),
                  max_distance: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, gap): background within `max_distance` (finest-axis voxels) of a segment takes the
    nearest segment's label; `gap` is that distance (0 inside segments and
    wherever the label stays 0).

    scipy's EDT is used here, not `edt`: the nearest segment needs the
    feature transform (the index of the nearest voxel), which `edt` lacks.
    """
    seg, vs = _check(seg, voxel_size)
    gap = np.zeros(seg.shape, np.float32)
    if max_distance <= 0 or not np.any(seg == 0) or not np.any(seg != 0):
        return seg.copy(), gap
    dist, nearest = ndimage.distance_transform_edt(seg == 0, sampling=vs, return_indices=True)
    take = (seg == 0) & (dist <= max_distance)
    labels = seg.copy()
    labels[take] = seg[tuple(ix[take] for ix in nearest)]
    gap[take] = dist[take]
    return labels, gap


def interface_faces(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every face between two different non-zero labels, over the 3 axes.

    Returns:
      (a, b, p, q): int64 arrays with one entry per face: the labels (a < b)
      and the flat (C order) indices of the face's two voxels.
    """
    labels = np.asarray(labels)
    flat = np.arange(labels.size, dtype=np.int64).reshape(labels.shape)
    parts = []
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        u, v = labels[tuple(lo)], labels[tuple(hi)]
        on = (u != v) & (u != 0) & (v != 0)
        parts.append((u[on], v[on], flat[tuple(lo)][on], flat[tuple(hi)][on]))
    u, v, p, q = (np.concatenate([part[i] for part in parts]) for i in range(4))
    u, v = u.astype(np.int64), v.astype(np.int64)
    return np.minimum(u, v), np.maximum(u, v), p, q


def border_distance_at(coords: np.ndarray, shape: Sequence[int],
                       voxel_size: Sequence[float]) -> np.ndarray:
    """Distance from each voxel of `coords` ((n, 3) z,y,x) to the nearest voxel
    just outside a volume of `shape`."""
    coords = np.asarray(coords, np.int64).reshape(-1, 3)
    n = np.asarray(shape, np.int64)
    steps = np.minimum(coords, n - 1 - coords) + 1
    return (steps * np.asarray(voxel_size, np.float64)).min(axis=1).astype(np.float32)


def _pair_clearance(labels: np.ndarray, a: int, b: int, cand: np.ndarray, vs: np.ndarray,
                    cap: float, border: np.ndarray) -> np.ndarray:
    """Clearance (capped) of candidate voxels `cand` ((n, 3) z,y,x in `labels`) of pair (a, b).

    One EDT of the pair's union on a crop that reaches `cap` beyond the
    candidates: anything farther than the cap cannot lower a capped value, and
    the crop's own faces are not boundaries (`black_border=False`); the
    volume's border enters through `border` (n,), the candidates' distances to it.
    """
    margin = np.ceil(cap / vs).astype(np.int64) + 1
    lo = np.maximum(cand.min(axis=0) - margin, 0)
    hi = np.minimum(cand.max(axis=0) + margin + 1, labels.shape)
    crop = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    union = ((crop == a) | (crop == b)).astype(np.uint8)
    dist = edt.edt(union, anisotropy=tuple(vs), black_border=False)
    local = cand - lo
    inside = dist[tuple(local.T)]
    return np.minimum(np.minimum(inside, border), np.float32(cap))


def choose_point(cand: np.ndarray, clearance: np.ndarray) -> int:
    """Index of the decision point among candidates: largest clearance (within
    TIE), then nearest the candidates' centroid, then lowest z,y,x."""
    best = clearance >= clearance.max() - TIE
    centre = cand.mean(axis=0)
    d2 = ((cand - centre) ** 2).sum(axis=1)
    order = np.lexsort((cand[:, 2], cand[:, 1], cand[:, 0], np.round(d2, 6), ~best))
    return int(order[0])


@dataclasses.dataclass(frozen=True)
class Candidates:
    """What one block (or the whole volume) says about its pairs, in volume coordinates.

    Attributes:
      pairs: (n, 2) int64 segment ids a < b.
      contact: (n,) faces between the original segments counted in the block.
      min_gap: (n,) the smallest face gap seen in the block.
      pair_of: (m,) index into `pairs` of each candidate voxel.
      coords: (m, 3) int64 z,y,x of the candidate voxels.
      face_gap: (m,) the smallest gap of the faces the voxel belongs to.
      clearance: (m,) float32 capped clearance of the voxel.
    """

    pairs: np.ndarray
    contact: np.ndarray
    min_gap: np.ndarray
    pair_of: np.ndarray
    coords: np.ndarray
    face_gap: np.ndarray
    clearance: np.ndarray

    @staticmethod
    def empty() -> "Candidates":
        z = lambda *shape, dtype=np.int64: np.zeros(shape, dtype)  # noqa: E731
        return Candidates(z(0, 2), z(0), z(0, dtype=np.float64), z(0), z(0, 3),
                          z(0, dtype=np.float64), z(0, dtype=np.float32))


def block_margin(voxel_size: Sequence[float], options: DecisionPointOptions) -> tuple[int, ...]:
    """Voxels of context around a block's core that make `find_candidates` on
    the block exact: clearances reach `clearance_cap` beyond a candidate, and
    the expansion `2 * max_distance` (a gap voxel's nearest segment, and the
    segments it lies between)."""
    vs = relative_voxel_size(voxel_size)
    reach = options.clearance_cap + 2 * options.max_distance
    return tuple(int(m) for m in np.ceil(reach / vs).astype(np.int64) + 2)


def find_candidates(seg: np.ndarray, voxel_size: Sequence[float] = (1, 1, 1),
                    options: DecisionPointOptions = DecisionPointOptions(), *,
                    origin: Sequence[int] = (0, 0, 0),
                    core: tuple[Sequence[int], Sequence[int]] | None = None,
                    volume_shape: Sequence[int] | None = None) -> Candidates:
    """The candidates of every pair whose faces lie in `core` (see the module docstring).

    Args:
      seg: z,y,x segmentation of a block with context (`block_margin`), or of
        the whole volume.
      origin: where `seg` starts in the volume.
      core: (start, stop) in the volume: only faces whose lower voxel lies
        there count (each face of the volume belongs to exactly one core);
        None: all of `seg`.
      volume_shape: the whole volume's shape (its border bounds clearances;
        default: `seg` is the whole volume).
    """
    seg, vs = _check(seg, voxel_size)
    origin = np.asarray(origin, np.int64)
    volume_shape = tuple(volume_shape) if volume_shape is not None else tuple(origin + seg.shape)
    labels, gap = expand_labels(seg, vs, options.max_distance)
    a, b, p, q = interface_faces(labels)
    if core is not None:
        lo, hi = (np.asarray(c, np.int64) - origin for c in core)
        pz = np.stack(np.unravel_index(p, labels.shape), 1)
        keep = np.all((pz >= lo) & (pz < hi), axis=1)
        a, b, p, q = a[keep], b[keep], p[keep], q[keep]
    if a.size == 0:
        return Candidates.empty()
    orig = seg.reshape(-1)
    touching = (orig[p] != 0) & (orig[q] != 0)
    face_gap = (gap.reshape(-1)[p] + gap.reshape(-1)[q]) / 2
    pairs, inverse = np.unique(np.stack([a, b], 1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    contact = np.bincount(inverse, weights=touching, minlength=len(pairs)).astype(np.int64)
    min_gap = np.full(len(pairs), np.inf)
    np.minimum.at(min_gap, inverse, face_gap)
    tol = np.where(min_gap[inverse] > 0, 0.5 * vs.min(), 0.0)  # touching: the contact only
    close = face_gap <= min_gap[inverse] + tol

    # Candidate voxels (both sides of each close face): one row per (pair, voxel), its least gap.
    cand_pair = np.concatenate([inverse[close], inverse[close]])
    cand_flat = np.concatenate([p[close], q[close]])
    cand_gap = np.concatenate([face_gap[close], face_gap[close]])
    order = np.lexsort((cand_gap, cand_flat, cand_pair))
    cand_pair, cand_flat, cand_gap = cand_pair[order], cand_flat[order], cand_gap[order]
    first = np.ones(len(order), bool)
    first[1:] = (np.diff(cand_pair) != 0) | (np.diff(cand_flat) != 0)
    cand_pair, cand_flat, cand_gap = cand_pair[first], cand_flat[first], cand_gap[first]
    local = np.stack(np.unravel_index(cand_flat, labels.shape), 1).astype(np.int64)
    border = border_distance_at(local + origin, volume_shape, vs)
    clearance = np.zeros(len(local), np.float32)
    starts = np.searchsorted(cand_pair, np.arange(len(pairs) + 1))
    for k, (ia, ib) in enumerate(pairs):
        sl = slice(starts[k], starts[k + 1])
        clearance[sl] = _pair_clearance(labels, int(ia), int(ib), local[sl], vs,
                                        options.clearance_cap, border[sl])
    return Candidates(pairs=pairs.astype(np.int64), contact=contact, min_gap=min_gap,
                      pair_of=cand_pair, coords=local + origin, face_gap=cand_gap,
                      clearance=clearance)


def points_of(parts: Sequence[Candidates],
              options: DecisionPointOptions = DecisionPointOptions()) -> list[DecisionPoint]:
    """One `DecisionPoint` per pair from the candidates of every block (or of
    the whole volume), sorted by (a, b): contacts summed, gaps and candidates
    taken at the pair's closest approach over all blocks."""
    parts = [c for c in parts if len(c.pairs)]
    if not parts:
        return []
    all_pairs = np.concatenate([c.pairs for c in parts])
    pairs, inverse = np.unique(all_pairs, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    contact = np.bincount(inverse, weights=np.concatenate([c.contact for c in parts]),
                          minlength=len(pairs)).astype(np.int64)
    min_gap = np.full(len(pairs), np.inf)
    np.minimum.at(min_gap, inverse, np.concatenate([c.min_gap for c in parts]))
    offsets = np.cumsum([0] + [len(c.pairs) for c in parts])[:-1]
    pair_of = np.concatenate([inverse[o + c.pair_of] for o, c in zip(offsets, parts)])
    coords = np.concatenate([c.coords for c in parts])
    face_gap = np.concatenate([c.face_gap for c in parts])
    clearance = np.concatenate([c.clearance for c in parts])
    close = face_gap <= min_gap[pair_of] + np.where(min_gap[pair_of] > 0, 0.5, 0.0)
    pair_of, coords, clearance = pair_of[close], coords[close], clearance[close]
    # A voxel found by two blocks (a face's upper voxel across a core's edge) counts once.
    order = np.lexsort((coords[:, 2], coords[:, 1], coords[:, 0], pair_of))
    pair_of, coords, clearance = pair_of[order], coords[order], clearance[order]
    first = np.ones(len(order), bool)
    first[1:] = (np.diff(pair_of) != 0) | np.any(np.diff(coords, axis=0) != 0, axis=1)
    pair_of, coords, clearance = pair_of[first], coords[first], clearance[first]
    starts = np.searchsorted(pair_of, np.arange(len(pairs) + 1))
    points = []
    for k, (ia, ib) in enumerate(pairs):
        if contact[k] > 0 and contact[k] < options.min_contact:
            continue
        cand, clear = coords[starts[k]:starts[k + 1]], clearance[starts[k]:starts[k + 1]]
        i = choose_point(cand, clear)
        points.append(DecisionPoint(a=int(ia), b=int(ib), point=tuple(int(c) for c in cand[i]),
                                    contact=int(contact[k]),
                                    gap=float(0.0 if contact[k] else min_gap[k]),
                                    clearance=float(clear[i])))
    return points


def find_decision_points(seg: np.ndarray, voxel_size: Sequence[float] = (1, 1, 1),
                         options: DecisionPointOptions = DecisionPointOptions()
                         ) -> list[DecisionPoint]:
    """One `DecisionPoint` per pair of segments that touch (or come within
    `options.max_distance`), sorted by (a, b). See the module docstring;
    block by block: `ffnjax.agglomeration_blocks`.

    Args:
      seg: z,y,x integer segmentation, 0 = background.
      voxel_size: z,y,x voxel size (only the ratios of its sides matter).
      options: DecisionPointOptions.
    """
    return points_of([find_candidates(seg, voxel_size, options)], options)


def describe(points: Sequence[DecisionPoint]) -> str:
    """One line: how many pairs, how many touch, the median contact."""
    if not points:
        return "no decision points (no two segments meet)"
    contacts = np.asarray([p.contact for p in points])
    touching = contacts > 0
    med = float(np.median(contacts[touching])) if touching.any() else math.nan
    return (f"{len(points)} decision points: {int(touching.sum())} touching pairs "
            f"(median contact {med:g} faces), {int((~touching).sum())} within the distance")
