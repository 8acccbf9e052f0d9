"""A simple, honest non-learned baseline segmentation (scikit-image).

FFN results are only meaningful next to something simpler on the same
volume. This is the classic pipeline for EM with dark membranes:

1. smooth the raw image with a Gaussian (sigma in voxels, scaled for
   anisotropic voxels so it is isotropic in nm);
2. call voxels brighter than a threshold "cell interior" (Otsu's threshold of
   the smoothed image by default, shifted by ``threshold_offset`` standard deviations);
3. Euclidean distance transform of the interior (in units of the smallest
   voxel side, anisotropy respected);
4. seeds: the h-maxima of the distance map (maxima at least ``h`` higher than
   their surroundings), one connected component per seed;
5. seeded watershed of the negated distance map inside the interior, then a
   second seeded watershed of the smoothed image's darkness that extends the
   segments over the membranes, so every voxel gets an id (dense ground truth
   like FIB-25 labels the membranes too, and unsegmented voxels would count as
   one big merged segment in VOI/ARAND);
6. segments smaller than ``min_size`` voxels are dropped and their voxels
   taken over by the neighbours (watershed again), then ids are relabelled
   1..N (uint64).

Nothing is learned; the defaults were chosen on FIB-25 and the gala medulla
volume (docs/evaluation.md gives their scores).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import cc3d
import edt
import fastremap
import numpy as np
from skimage.filters import gaussian, threshold_otsu
from skimage.morphology import h_maxima
from skimage.segmentation import watershed


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Parameters of `baseline_segmentation`.

    Attributes:
      sigma: Gaussian smoothing in voxels of the smallest voxel side.
      threshold: interior/membrane threshold on the smoothed image in raw
        intensity units; None uses Otsu's threshold.
      threshold_offset: added to the (Otsu or given) threshold, in units of
        the smoothed image's standard deviation (so it means the same for
        uint8 EM and for normalised float images); positive values thin the
        interior and separate touching cells more often.
      h: seeds are distance-map maxima at least this high (voxels) above
        their surroundings; larger = fewer seeds = fewer splits, more merges.
      min_size: segments with fewer voxels are absorbed by their neighbours.
      dark_membranes: True for EM where membranes are darker than cytoplasm
        (FIB-SEM, most TEM); False inverts the image first.
    """

    sigma: float = 1.0
    threshold: float | None = None
    threshold_offset: float = 0.0
    h: float = 5.0
    min_size: int = 200
    dark_membranes: bool = True

    def __post_init__(self):
        if not self.sigma >= 0:
            raise ValueError(f"BaselineConfig.sigma must be >= 0, got {self.sigma}")
        if not self.h > 0:
            raise ValueError(f"BaselineConfig.h must be > 0, got {self.h}")
        if int(self.min_size) < 0:
            raise ValueError(f"BaselineConfig.min_size must be >= 0, got {self.min_size}")


def _relabel(labels: np.ndarray) -> np.ndarray:
    out, _ = fastremap.renumber(labels, preserve_zero=True, in_place=False)
    return out.astype(np.uint64)


def baseline_segmentation(image: Any, config: BaselineConfig | None = None,
                          voxel_size: Sequence[float] = (1, 1, 1),
                          **overrides: Any) -> np.ndarray:
    """Segments a z,y,x EM image without learning (smoothing, threshold,
    distance transform, seeded watershed).

    Args:
      image: z,y,x grey-scale array (any numeric dtype).
      config: a BaselineConfig; defaults when None.
      voxel_size: z,y,x voxel size; only ratios matter (anisotropy).
      **overrides: BaselineConfig fields to replace, e.g. ``h=3``.

    Returns:
      uint64 z,y,x labels 1..N, every voxel labelled (0 only when the image
      has no interior at all).

    Raises:
      ValueError: for a non-3D image or bad parameters.
    """
    config = dataclasses.replace(config or BaselineConfig(), **overrides)
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"baseline_segmentation needs a 3D z,y,x image, got shape {image.shape}")
    vs = np.asarray(voxel_size, np.float64)
    if vs.shape != (3,) or not np.all(vs > 0):
        raise ValueError(f"voxel_size must be three positive numbers (z,y,x), got {voxel_size!r}")
    rel = vs / vs.min()

    img = image.astype(np.float32)
    if not config.dark_membranes:
        img = img.max() - img
    smooth = gaussian(img, sigma=config.sigma / rel, preserve_range=True) if config.sigma > 0 else img
    if float(smooth.max()) == float(smooth.min()):
        return np.zeros(image.shape, np.uint64)
    thr = threshold_otsu(smooth) if config.threshold is None else float(config.threshold)
    interior = smooth > thr + config.threshold_offset * float(smooth.std())
    if not interior.any():
        return np.zeros(image.shape, np.uint64)

    dist = edt.edt(interior, anisotropy=tuple(rel), parallel=1).astype(np.float32)
    seeds = cc3d.connected_components(h_maxima(dist, config.h).astype(bool) & interior,
                                      connectivity=26)
    if seeds.max() == 0:  # flat distance map: one seed per interior component
        seeds = cc3d.connected_components(interior, connectivity=6)
    seg = watershed(-dist, seeds, mask=interior)
    darkness = (smooth.max() - smooth).astype(np.float32)
    seg = watershed(darkness, seg)
    if config.min_size > 0:
        ids, counts = fastremap.unique(seg, return_counts=True)
        small = ids[(counts < config.min_size) & (ids != 0)]
        if len(small) and len(small) < len(ids):
            seg = fastremap.mask(seg, small)
            seg = watershed(darkness, seg)
    return _relabel(seg)
