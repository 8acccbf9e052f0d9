"""Working at a coarser scale: downsampling images and labels, upsampling labels.

An FFN sees a fixed FOV in voxels, so the scale it works at decides how much
of a neurite it sees and what training and flood filling cost. On a CPU (or to
segment large volumes quickly) it pays to train and segment at 2x (or more)
downsampled resolution and to bring the segmentation back to the native grid:

* `TrainConfig.downsample` reduces every training and validation volume
  (`ffnjax.inputs`), and the checkpoint records the factors as an inference
  fact;
* `InferenceOptions.downsample` (defaulting to the checkpoint's) makes
  `ffnjax.segment` reduce the image, flood-fill at the coarse scale and return
  labels on the native grid.

The rules (z,y,x factors, each >= 1):

* images: the mean over each block of `factors` voxels (a trailing partial
  block averages the voxels it has), rounded to the nearest value (half to
  even) for integer images and kept as float32 for float ones;
* labels and masks: the voxel at each block's origin (`labels[::fz, ::fy, ::fx]`),
  so every label is a real object id and a label's coarse voxels are a subset
  of its native ones;
* back to native: each coarse voxel fills its block (`np.repeat`), cut to the
  native shape.

The coarse shape is ceil(native / factor) along each axis for all three.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["is_identity", "coarse_shape", "downsample_image", "downsample_labels",
           "upsample_labels", "to_coarse_points"]


def _factors(factors: Sequence[int]) -> tuple[int, int, int]:
    f = tuple(int(v) for v in factors)
    if len(f) != 3 or any(v < 1 for v in f):
        raise ValueError(f"downsample factors must be three integers >= 1 (z,y,x), got {tuple(factors)}")
    return f  # type: ignore[return-value]


def is_identity(factors: Sequence[int]) -> bool:
    """True when `factors` are all 1 (the native scale: nothing to do)."""
    return all(int(v) == 1 for v in _factors(factors))


def coarse_shape(shape: Sequence[int], factors: Sequence[int]) -> tuple[int, int, int]:
    """ceil(shape / factors) per axis: the shape a volume of `shape` has downsampled."""
    f = _factors(factors)
    return tuple(-(-int(n) // k) for n, k in zip(shape[:3], f))  # type: ignore[return-value]


def downsample_image(image: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """The block mean of a z,y,x image (see the module docstring); same dtype
    for integer images, float32 for float ones. Factors of 1 return `image`."""
    f = _factors(factors)
    image = np.asarray(image)
    if is_identity(f):
        return image
    if image.ndim != 3:
        raise ValueError(f"downsample_image takes a z,y,x image, got shape {image.shape}")
    out = np.zeros(coarse_shape(image.shape, f), np.float64)
    count = np.zeros(out.shape, np.float64)
    # One strided view per offset inside a block: no padding, exact counts at the faces.
    for dz in range(f[0]):
        for dy in range(f[1]):
            for dx in range(f[2]):
                part = image[dz::f[0], dy::f[1], dx::f[2]]
                if part.size == 0:
                    continue
                out[:part.shape[0], :part.shape[1], :part.shape[2]] += part
                count[:part.shape[0], :part.shape[1], :part.shape[2]] += 1
    mean = out / count
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return np.clip(np.round(mean), info.min, info.max).astype(image.dtype)
    return mean.astype(np.float32)


def downsample_labels(labels: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """labels[::fz, ::fy, ::fx] (the voxel at each block's origin); any dtype, masks too."""
    f = _factors(factors)
    labels = np.asarray(labels)
    if is_identity(f):
        return labels
    return np.ascontiguousarray(labels[::f[0], ::f[1], ::f[2]])


def upsample_labels(labels: np.ndarray, factors: Sequence[int],
                    shape: Sequence[int] | None = None) -> np.ndarray:
    """Each coarse voxel repeated over its block, cut to `shape` (default: the
    coarse shape times the factors). The inverse of `downsample_labels` on the
    native grid of `shape`: `downsample_labels(upsample_labels(c, f, s), f)`
    equals `c` for every `s` whose coarse shape is c's."""
    f = _factors(factors)
    labels = np.asarray(labels)
    if shape is None:
        shape = tuple(n * k for n, k in zip(labels.shape, f))
    shape = tuple(int(n) for n in shape[:3])
    if coarse_shape(shape, f) != tuple(labels.shape[:3]):
        raise ValueError(f"labels of shape {labels.shape} are not the {f} downsampling of a "
                         f"volume of shape {shape} (that would be {coarse_shape(shape, f)})")
    if is_identity(f):
        return labels
    out = labels
    for axis, k in enumerate(f):
        if k > 1:
            out = np.repeat(out, k, axis=axis)
    return np.ascontiguousarray(out[:shape[0], :shape[1], :shape[2]])


def to_coarse_points(points: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Native z,y,x points (N, 3) as coarse voxel indices (floor division)."""
    f = np.asarray(_factors(factors), np.int64)
    return np.asarray(points, np.int64).reshape(-1, 3) // f
