"""The two basic seed policies: where flood filling starts each object.

Two policies, both returning an (N, 3) int64 array of z,y,x positions in the
order they will be tried (`ffnjax.seed_policies` holds every policy, these
two and google/ffn's others, with their arguments and masks):

* `peaks_seeds` (google/ffn's `PolicyPeaks`): points far from image edges.
  Edge magnitude (Sobel gradient) is thresholded against its own Gaussian-
  smoothed version, the Euclidean distance transform of the non-edge region is
  computed with `edt`, and its local maxima (scikit-image `peak_local_max`,
  minimum distance 3) are the seeds. A deterministic tiny jitter breaks ties
  between equal distances. `options.peaks_method='google_ffn'` follows
  PolicyPeaks exactly instead (see `peaks_seeds`).
* `grid_seeds`: a regular lattice with step `options.seed_grid_step`.

`make_seeds` returns them in `options.seed_order`: 'zyx' (ascending z, then y,
then x: google/ffn's order) or 'distance' (deepest first: descending distance
to the nearest image edge, ties in z,y,x order), which starts each object from
its thickest, least ambiguous part before thin processes seed pieces of their
own.

Both accept a `margin` (z,y,x): seeds closer than that to the volume border
are dropped, because a flood fill can only start where a whole FOV fits
(google/ffn drops such seeds later, in `Canvas.segment_all`). Skipping voxels
that are already segmented happens while segmenting
(`ffnjax.segmentation.seed_allowed` checks every seed just before its fill),
because the segmentation grows as seeds are used.
"""

from __future__ import annotations

from typing import Sequence

import edt
import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max

from ffnjax.config import SEED_ORDERS, InferenceOptions

PEAKS_SMOOTHING_SIGMA = 49.0 / 6.0  # google/ffn's adaptive-threshold sigma (voxels)
PEAKS_MIN_DISTANCE = 3
PEAKS_JITTER = 1e-4
PEAKS_JITTER_SEED = 42


def _margin(margin: Sequence[int] | None) -> np.ndarray:
    m = np.zeros(3, np.int64) if margin is None else np.asarray(margin, np.int64)
    if m.shape != (3,) or np.any(m < 0):
        raise ValueError(f"margin must be three non-negative integers z,y,x, got {margin!r}")
    return m


def _check_volume(image: np.ndarray, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"{name} must be a 3D z,y,x array, got shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"{name} is empty (shape {image.shape})")
    return image


def inside_margin(seeds: np.ndarray, shape: Sequence[int], margin: Sequence[int]) -> np.ndarray:
    """Boolean mask over `seeds` (N,3): True where a seed is at least `margin` from every border."""
    seeds = np.asarray(seeds, np.int64).reshape(-1, 3)
    m = _margin(margin)
    hi = np.asarray(shape, np.int64) - 1 - m
    return np.all((seeds >= m) & (seeds <= hi), axis=1)


def edge_mask(image: np.ndarray, sigma: float = PEAKS_SMOOTHING_SIGMA) -> np.ndarray:
    """Adaptive edge map: Sobel gradient magnitude above its Gaussian-smoothed
    self (of a z,y,x volume, or of one y,x section: `PolicyPeaks2d`)."""
    image = np.asarray(image)
    if image.ndim != 2:
        image = _check_volume(image)
    image = image.astype(np.float32)
    edges = ndimage.generic_gradient_magnitude(image, ndimage.sobel)
    smooth = ndimage.gaussian_filter(edges, sigma, mode="reflect")
    return edges > smooth


def edge_distance(image: np.ndarray, sigma: float = PEAKS_SMOOTHING_SIGMA,
                  anisotropy: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """float32 Euclidean distance of every voxel to the nearest `edge_mask` voxel."""
    non_edge = ~edge_mask(_check_volume(image), sigma)
    # edt wants C-contiguous input and z,y,x anisotropy in the array's axis order.
    return edt.edt(np.ascontiguousarray(non_edge, dtype=np.uint8),
                   anisotropy=tuple(float(a) for a in anisotropy),
                   black_border=False).astype(np.float32)


def peaks_seeds(image: np.ndarray, options: InferenceOptions = InferenceOptions(),
                margin: Sequence[int] | None = None, *,
                sigma: float = PEAKS_SMOOTHING_SIGMA,
                min_distance: int = PEAKS_MIN_DISTANCE,
                anisotropy: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Seeds at local maxima of the distance to the nearest image edge.

    Args:
      image: z,y,x raw image (any real dtype; not normalised).
      options: `peaks_method` chooses how: 'ffnjax' (the edge map of the raw
        image, a float32 jitter from `np.random.default_rng(42)`, peaks up to
        the border) or 'google_ffn' (PolicyPeaks exactly: the edge map of the
        image normalised with `image_mean` / `image_stddev` in float32, SciPy's
        distance transform, a float64 jitter from
        `np.random.RandomState(42)`, scikit-image's default exclusion of
        peaks within `min_distance` of the border; `anisotropy` must be
        isotropic). Both give the same seeds wherever no two jittered
        distances tie differently; the 'google_ffn' list is google/ffn's to
        the voxel (tests/test_gffn_parity.py).
      margin: drop seeds closer than this to the border, z,y,x (the FOV radius
        when used for flood filling).
      sigma: Gaussian sigma of the adaptive edge threshold.
      min_distance: minimum distance between two peaks (`peak_local_max`).
      anisotropy: voxel size z,y,x for the distance transform (google/ffn
        assumes isotropic voxels; 1,1,1 reproduces that).

    Returns:
      (N, 3) int64 z,y,x seeds in ascending lexicographic order.
    """
    image = _check_volume(image)
    if options.peaks_method == "google_ffn":
        if tuple(float(a) for a in anisotropy) != (1.0, 1.0, 1.0):
            raise ValueError("peaks_method 'google_ffn' assumes isotropic voxels (PolicyPeaks); "
                             f"got anisotropy {tuple(anisotropy)}")
        return _google_ffn_peaks(google_ffn_edge_distance(image, options, sigma), margin,
                                 min_distance)
    return _distance_peaks(edge_distance(image, sigma, anisotropy), margin, min_distance)


def google_ffn_edge_distance(image: np.ndarray, options: InferenceOptions = InferenceOptions(),
                             sigma: float = PEAKS_SMOOTHING_SIGMA) -> np.ndarray:
    """`edge_distance` as google/ffn's PolicyPeaks computes it: the edge map of
    the image normalised as the network sees it (float32, in NumPy), and
    SciPy's exact Euclidean distance transform made float32."""
    non_edge = ~edge_mask(google_ffn_normalised(_check_volume(image), options), sigma)
    return ndimage.distance_transform_edt(non_edge).astype(np.float32)


def google_ffn_normalised(image: np.ndarray, options: InferenceOptions = InferenceOptions()
                          ) -> np.ndarray:
    """The image as google/ffn's seed policies see it (`Canvas.image`):
    (image - image_mean) / image_stddev in float32, in NumPy."""
    return ((np.asarray(image).astype(np.float32) - np.float32(options.image_mean))
            / np.float32(options.image_stddev))


def _google_ffn_peaks(dist: np.ndarray, margin: Sequence[int] | None,
                      min_distance: int = PEAKS_MIN_DISTANCE) -> np.ndarray:
    """PolicyPeaks' maxima of `dist`: a float64 jitter (the legacy Mersenne
    Twister seeded with 42, so the draws are google/ffn's), scikit-image's
    default border exclusion (`exclude_border=True`: no peak within
    `min_distance` of the border), ascending z,y,x, then the margin."""
    peaks = google_ffn_maxima(dist, min_distance)
    if margin is not None:
        peaks = peaks[inside_margin(peaks, dist.shape, margin)]
    return order_seeds(peaks, "zyx")


def google_ffn_maxima(values: np.ndarray, min_distance: int = PEAKS_MIN_DISTANCE,
                      threshold_abs: float = 0.0) -> np.ndarray:
    """google/ffn's `_find_peaks`: the local maxima of `values` (2-D or 3-D)
    plus a float64 jitter from the legacy Mersenne Twister seeded with 42, by
    scikit-image's `peak_local_max` (its default border exclusion,
    `threshold_rel=0`), in the order it returns them; (N, ndim) int64."""
    jitter = np.random.RandomState(PEAKS_JITTER_SEED).random_sample(values.shape) * PEAKS_JITTER
    peaks = peak_local_max(values + jitter, min_distance=int(min_distance),
                           threshold_abs=threshold_abs, threshold_rel=0)
    return np.asarray(peaks, np.int64).reshape(-1, values.ndim)


def _distance_peaks(dist: np.ndarray, margin: Sequence[int] | None,
                    min_distance: int = PEAKS_MIN_DISTANCE) -> np.ndarray:
    """`peaks_seeds` from the edge-distance map `dist` (left unchanged)."""
    # Deterministic jitter, independent of any global random state, so that
    # plateaus of equal distance yield one peak at a reproducible place.
    rng = np.random.default_rng(PEAKS_JITTER_SEED)
    dist = dist + rng.random(dist.shape, dtype=np.float32) * np.float32(PEAKS_JITTER)
    peaks = peak_local_max(dist, min_distance=int(min_distance), threshold_abs=0.0,
                           threshold_rel=0.0, exclude_border=False)
    peaks = np.asarray(peaks, np.int64).reshape(-1, 3)
    if margin is not None:
        peaks = peaks[inside_margin(peaks, dist.shape, margin)]
    return order_seeds(peaks, "zyx")


def grid_seeds(shape: Sequence[int], options: InferenceOptions = InferenceOptions(),
               margin: Sequence[int] | None = None) -> np.ndarray:
    """Seeds on a regular grid of step `options.seed_grid_step` (z,y,x).

    The grid starts at `margin` (so the first seed is the first valid FOV
    centre) and is visited in ascending z,y,x order.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be three positive integers z,y,x, got {shape}")
    m = _margin(margin)
    axes = [np.arange(m[a], shape[a] - m[a], options.seed_grid_step[a]) for a in range(3)]
    if any(len(a) == 0 for a in axes):
        return np.zeros((0, 3), np.int64)
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid.astype(np.int64)


def order_seeds(seeds: np.ndarray, order: str = "zyx",
                distance: np.ndarray | None = None) -> np.ndarray:
    """`seeds` (N, 3) in `order`: 'zyx' ascending, or 'distance' (descending
    value of the `edge_distance` map `distance` at each seed, ties in ascending z,y,x)."""
    seeds = np.asarray(seeds, np.int64).reshape(-1, 3)
    seeds = seeds[np.lexsort(seeds.T[::-1])]  # ascending z, then y, then x
    if order == "zyx":
        return seeds
    if order == "distance":
        if distance is None:
            raise ValueError("seed_order 'distance' needs the edge-distance map (edge_distance(image))")
        return seeds[np.argsort(-distance[tuple(seeds.T)], kind="stable")]
    raise ValueError(f"unknown seed_order {order!r}; expected one of {SEED_ORDERS}")


def make_seeds(image: np.ndarray, options: InferenceOptions = InferenceOptions(),
               margin: Sequence[int] | None = None) -> np.ndarray:
    """Seeds from the policy named by `options.seed_policy` ('peaks' or 'grid'),
    in `options.seed_order` (the edge-distance map is computed once for both)."""
    image = _check_volume(image)
    if options.seed_policy not in ("peaks", "grid"):
        raise ValueError(f"seed policy {options.seed_policy!r} is not 'peaks' or 'grid': "
                         "ffnjax.seed_policies.make_seeds makes the others")
    needs_distance = options.seed_policy == "peaks" or options.seed_order == "distance"
    google = options.peaks_method == "google_ffn"
    dist = None
    if needs_distance:
        dist = google_ffn_edge_distance(image, options) if google else edge_distance(image)
    if options.seed_policy == "peaks":
        seeds = _google_ffn_peaks(dist, margin) if google else _distance_peaks(dist, margin)
    else:
        seeds = grid_seeds(image.shape, options, margin)
    return order_seeds(seeds, options.seed_order, dist)
