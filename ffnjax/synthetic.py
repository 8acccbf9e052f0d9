"""Synthetic EM-like neuropil: an image and its dense ground-truth labels.

Real volumes cannot ship inside the package, so the demo and many tests train
and segment this instead. The generator builds the scene the way neuropil is
built, then images it:

1. Neurites. Smooth random 3D centrelines (a persistent random walk of the
   direction), each with its own calibre (log-normal radius) that swells and
   narrows along the path (varicosities); about half of them branch, the
   branch keeping its parent's id. Neurites are added until their tubes would
   fill `fill` of the volume.
2. Dense labels. Every voxel within a tube's radius of its nearest centreline
   belongs to that tube; the remaining voxels go to the nearest tube body, so
   the tissue is packed with no extracellular space, as in FFN's ground truth.
   Labels are then split into 6-connected pieces, slivers are absorbed by their
   neighbours, and ids are renumbered 1..N (no zeros).
3. Image. Cytoplasm of a per-object grey level with smooth intracellular
   texture and small dark vesicles, a dark membrane profile on every boundary
   between objects (both sides, about 2 voxels thick), optical blur and
   Gaussian noise. The result is scaled to mean ~128 and std ~33
   (`ffnjax.config.IMAGE_MEAN` / `IMAGE_STDDEV`), the normalisation FFN uses
   for EM, so default `InferenceOptions` work.

All geometry is computed in physical units where an x/y voxel is 1 and a z
voxel is `anisotropy` (e.g. 2 for a 2x coarser z). Deterministic for a seed;
128^3 takes a few seconds on one core.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import cc3d
import edt
import fastremap
import numpy as np
import scipy.ndimage as ndi

from ffnjax.config import IMAGE_MEAN, IMAGE_STDDEV
from ffnjax.view import save_slices_png


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic neuropil (defaults give FFN-friendly data).

    Attributes:
      mean_radius: median neurite radius in x/y voxels.
      radius_spread: sigma of the log-normal radius distribution.
      fill: fraction of the volume the tubes (before packing) should occupy;
        higher means more, thinner-looking objects.
      tortuosity: how strongly centrelines bend (0 = straight).
      branch_prob: probability that a neurite has a branch.
      membrane_contrast: membrane darkness relative to cytoplasm texture.
      membrane_width: width (voxels) of the Gaussian membrane profile.
      vesicle_density: dark intracellular specks per 1000 voxels.
      blur_sigma: optical blur in x/y voxels.
      noise: Gaussian noise amplitude (same units as the texture).
      min_fragment: pieces smaller than this (voxels) are merged into their
        neighbours.
      mean, std: intensity statistics of the final uint8 image (default: the
        normalisation defaults, so the net sees it at mean 0, std 1).
    """

    mean_radius: float = 6.0
    radius_spread: float = 0.35
    fill: float = 0.5
    tortuosity: float = 0.6
    branch_prob: float = 0.5
    membrane_contrast: float = 4.0
    membrane_width: float = 0.7
    vesicle_density: float = 0.3
    blur_sigma: float = 0.7
    noise: float = 0.35
    min_fragment: int = 200
    mean: float = IMAGE_MEAN
    std: float = IMAGE_STDDEV

    def __post_init__(self):
        for name in ("mean_radius", "membrane_width", "std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SyntheticConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.fill <= 1:
            raise ValueError(f"SyntheticConfig.fill must lie in (0, 1], got {self.fill}")
        if not 0 <= self.branch_prob <= 1:
            raise ValueError(f"SyntheticConfig.branch_prob must lie in [0, 1], got {self.branch_prob}")
        for name in ("radius_spread", "tortuosity", "membrane_contrast", "vesicle_density",
                     "blur_sigma", "noise", "min_fragment"):
            if getattr(self, name) < 0:
                raise ValueError(f"SyntheticConfig.{name} must be >= 0, got {getattr(self, name)}")


# ----------------------------------------------------------------------------
# Centrelines


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _smooth_noise_1d(rng: np.random.Generator, n: int, dims: int, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed along the first axis."""
    x = ndi.gaussian_filter1d(rng.standard_normal((n, dims)), sigma, axis=0, mode="nearest")
    return x / max(float(x.std()), 1e-9)


def _trace(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, n_steps: int,
           step: float, tortuosity: float, both_ways: bool) -> np.ndarray:
    """A smooth path through `start`: points (n, 3) in physical z,y,x.

    The direction is the initial one plus slowly varying noise, so the path
    has a persistence length of tens of voxels. With both_ways the path
    extends on both sides of `start`; otherwise it starts there.
    """
    total = 2 * n_steps + 1 if both_ways else n_steps + 1
    dirs = _unit(direction[None] + tortuosity * _smooth_noise_1d(rng, total, 3, 12.0))
    pos = np.cumsum(dirs * step, axis=0)
    anchor = n_steps if both_ways else 0
    return pos - pos[anchor] + start


def _inside_run(points: np.ndarray, lo: np.ndarray, hi: np.ndarray, anchor: int) -> slice:
    """The contiguous run of points around `anchor` that stays inside [lo, hi]."""
    inside = np.all((points >= lo) & (points <= hi), axis=1)
    if not inside[anchor]:
        return slice(anchor, anchor)
    outside = np.flatnonzero(~inside)
    before, after = outside[outside < anchor], outside[outside > anchor]
    return slice(int(before[-1]) + 1 if before.size else 0, int(after[0]) if after.size else len(points))


def _neurites(rng: np.random.Generator, extent: np.ndarray, cfg: SyntheticConfig):
    """Centreline points (physical z,y,x), their radius and their neurite id."""
    step = 0.5
    margin = 3.0 * cfg.mean_radius
    lo, hi = -margin * np.ones(3), extent + margin
    n_steps = int(np.ceil(2.0 * np.linalg.norm(extent + 2 * margin) / step))
    target = cfg.fill * float(np.prod(extent))
    pts, rad, ids = [], [], []
    filled, nid = 0.0, 0
    while filled < target and nid < 5000:
        nid += 1
        r0 = float(np.clip(cfg.mean_radius * np.exp(cfg.radius_spread * rng.standard_normal()),
                           0.4 * cfg.mean_radius, 3.0 * cfg.mean_radius))
        r0 = max(r0, 1.5)
        start = rng.uniform(0, 1, 3) * extent
        direction = _unit(rng.standard_normal(3))
        branches = [(start, direction, r0, True)]
        if rng.uniform() < cfg.branch_prob:
            branches.append(None)  # placeholder: filled once the trunk exists
        trunk = None
        for b in branches:
            if b is None:
                if trunk is None or len(trunk) < 20:
                    continue
                k = int(rng.integers(len(trunk) // 5, 4 * len(trunk) // 5))
                tangent = _unit(trunk[min(k + 1, len(trunk) - 1)] - trunk[max(k - 1, 0)])
                side = _unit(np.cross(tangent, rng.standard_normal(3)))
                b = (trunk[k], _unit(tangent + rng.uniform(0.8, 1.6) * side),
                     r0 * rng.uniform(0.45, 0.75), False)
            s, d, r, both = b
            path = _trace(rng, s, d, n_steps, step, cfg.tortuosity, both)
            run = _inside_run(path, lo, hi, n_steps if both else 0)
            path = path[run]
            if len(path) < 2:
                continue
            if trunk is None:
                trunk = path
            radius = r * np.exp(0.25 * _smooth_noise_1d(rng, len(path), 1, 16.0)[:, 0])
            pts.append(path)
            rad.append(np.clip(radius, 1.2, None))
            ids.append(np.full(len(path), nid, np.int64))
            inside = np.all((path >= 0) & (path <= extent), axis=1)
            filled += float(np.pi * np.sum(radius[inside] ** 2) * step)
    return np.concatenate(pts), np.concatenate(rad), np.concatenate(ids)


# ----------------------------------------------------------------------------
# Labels


def _nearest_fill(labels: np.ndarray, sampling: Sequence[float]) -> np.ndarray:
    """Every zero voxel takes the label of the nearest non-zero voxel."""
    if labels.all():
        return labels
    idx = ndi.distance_transform_edt(labels == 0, sampling=sampling, return_distances=False,
                                     return_indices=True)
    return labels[tuple(idx)]


def _dense_labels(shape: tuple[int, int, int], points: np.ndarray, radius: np.ndarray,
                  ids: np.ndarray, sampling: tuple[float, float, float],
                  min_fragment: int) -> np.ndarray:
    """Packs the tubes into dense, 6-connected labels 1..N (uint32)."""
    vox = np.round(points / np.asarray(sampling)).astype(np.int64)
    keep = np.all((vox >= 0) & (vox < np.asarray(shape)), axis=1)
    vox, radius, ids = vox[keep], radius[keep], ids[keep]
    marker = np.zeros(shape, np.int64)
    marker[tuple(vox.T)] = np.arange(1, len(vox) + 1)
    # Nearest centreline point of every voxel; inside its radius the voxel is tube core.
    dist, idx = ndi.distance_transform_edt(marker == 0, sampling=sampling, return_indices=True)
    nearest = marker[tuple(idx)] - 1
    del idx
    core = dist <= radius[nearest]
    labels = np.where(core, ids[nearest], 0)
    labels = _nearest_fill(labels, sampling)
    # Each id must be one 6-connected object; absorb slivers into their neighbours.
    pieces = cc3d.connected_components(labels, connectivity=6, out_dtype=np.uint64)
    counts = np.bincount(pieces.ravel())
    small = counts < min_fragment
    small[0] = False
    if small.any() and not small[1:].all():
        pieces[small[pieces]] = 0
        pieces = _nearest_fill(pieces, sampling)
        pieces = cc3d.connected_components(pieces, connectivity=6, out_dtype=np.uint64)
    pieces, _ = fastremap.renumber(pieces, start=1, in_place=True)
    return pieces.astype(np.uint32)


def membrane_mask(labels: np.ndarray) -> np.ndarray:
    """True on voxels that have a 6-neighbour with a different label (both
    sides of every boundary between objects)."""
    m = np.zeros(labels.shape, bool)
    for ax in range(labels.ndim):
        a = np.moveaxis(labels, ax, 0)
        mm = np.moveaxis(m, ax, 0)
        diff = a[1:] != a[:-1]
        mm[1:] |= diff
        mm[:-1] |= diff
    return m


# ----------------------------------------------------------------------------
# Image


def _render(labels: np.ndarray, rng: np.random.Generator, anisotropy: float,
            cfg: SyntheticConfig) -> np.ndarray:
    """EM-like uint8 image of the labelled tissue."""
    shape = labels.shape
    sig = lambda s: (s / anisotropy, s, s)  # noqa: E731 - physical sigma to voxel sigma
    n_obj = int(labels.max())
    base = rng.normal(0.0, 0.3, n_obj + 1).astype(np.float32)
    img = base[labels]
    img += 0.35 * _normalised(ndi.gaussian_filter(rng.standard_normal(shape, np.float32), sig(1.5)))
    img += 0.25 * _normalised(ndi.gaussian_filter(rng.standard_normal(shape, np.float32), sig(6.0)))
    # Distance (voxels) to the nearest voxel of another object; boundary voxels have 1.
    d = edt.edt(labels, black_border=False, parallel=1).astype(np.float32)
    if cfg.vesicle_density > 0:
        specks = (rng.uniform(size=shape) < cfg.vesicle_density / 1000.0) & (d > 3)
        v = ndi.gaussian_filter(specks.astype(np.float32), sig(1.0))
        img -= 1.5 * v / max(float(v.max()), 1e-6)
    img -= cfg.membrane_contrast * np.exp(-0.5 * ((d - 0.5) / cfg.membrane_width) ** 2)
    if cfg.blur_sigma > 0:
        img = ndi.gaussian_filter(img, sig(cfg.blur_sigma))
    img += cfg.noise * rng.standard_normal(shape, np.float32)
    img = cfg.mean + cfg.std * _normalised(img)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _normalised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / max(float(x.std()), 1e-9)


# ----------------------------------------------------------------------------
# Public API


def make_volume(shape: Sequence[int] = (128, 128, 128), seed: int = 0, anisotropy: float = 1.0,
                config: SyntheticConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Generates EM-like neuropil and its dense ground truth.

    Args:
      shape: volume size z,y,x in voxels.
      seed: random seed; the same seed and arguments give identical output.
      anisotropy: z voxel size relative to x/y (2.0: z is 2x coarser, so
        objects span half as many z slices).
      config: the generator's knobs; SyntheticConfig() by default.

    Returns:
      (image, labels): image uint8 z,y,x with mean ~128 and std ~33; labels
      uint32 z,y,x, dense (every voxel 1..N), each id one 6-connected object.

    Raises:
      ValueError: for a shape that is not three positive sizes of at least 8,
        or a non-positive anisotropy.
    """
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as e:
        raise ValueError(f"shape must be three integers z,y,x, got {shape!r}") from e
    if len(shape) != 3 or any(s < 8 for s in shape):
        raise ValueError(f"shape must be three sizes z,y,x of at least 8 voxels, got {shape}")
    if not anisotropy > 0:
        raise ValueError(f"anisotropy must be positive, got {anisotropy}")
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(seed)
    sampling = (float(anisotropy), 1.0, 1.0)
    extent = (np.asarray(shape) - 1) * np.asarray(sampling)
    points, radius, ids = _neurites(rng, extent, cfg)
    labels = _dense_labels(shape, points, radius, ids, sampling, cfg.min_fragment)
    image = _render(labels, rng, float(anisotropy), cfg)
    return image, labels


def save_preview(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray | None = None,
                 z_slices: Sequence[int] | None = None) -> Path:
    """Saves a PNG montage of a few z slices of `image` with label outlines
    (red) so a person can judge the data. Returns the path."""
    return save_slices_png(path, image, labels, z_slices=z_slices)


def object_sizes(labels: np.ndarray) -> np.ndarray:
    """Voxel count of every object id 1..N (index i-1 holds id i)."""
    return np.bincount(labels.ravel())[1:]
