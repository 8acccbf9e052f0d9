"""Training examples for FFN: balanced centre sampling, crops, soft targets, augmentation.

Everything here runs on the host in NumPy; the FOV moves inside an example run
on the device (`ffnjax.fov_moves.run_fovs`).

The pipeline, as in google/ffn (`compute_partitions.py`, `build_coordinates.py`,
`inputs.py`), but in memory and without TFRecords:

1. `compute_partitions(labels, radius)`: for every labelled voxel, the fraction
   of voxels in the box of half-size `radius` around it that carry the same
   label, binned at `thresholds`. Partition 0 is background (label 0 and objects
   below `min_size`); `EXCLUDED` marks masked voxels.
2. `BalancedSampler`: picks a partition uniformly, then a voxel uniformly within
   it (pooled over every training volume), so thin processes, thick trunks,
   boundaries and background are all seen equally often.
3. `make_example`: crops image, labels and a validity weight of size
   FOV + 2 * deltas * fov_moves around the centre, applies the same random
   reflection / y,x transposition (and the opt-in deformations of
   `ffnjax.augment`) to all of them, and builds the soft target (0.95 on the
   centre voxel's object, 0.05 elsewhere).

Departures from google/ffn: a centre on background (label 0) gets an all-0.05
target (google/ffn would train the net to fill the background as an object);
partitions count out-of-volume voxels as "other object" rather than padding.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ffnjax import augment as augmentations   # (`augment` is the sampler's on/off switch)
from ffnjax.config import DEFAULT_PARTITION_THRESHOLDS, IMAGE_MEAN, IMAGE_STDDEV
from ffnjax.files import digest, save_npy

EXCLUDED = 255  # partition value of voxels that are never used as centres


# ----------------------------------------------------------------------------
# Partitions (the fraction of same-object voxels around every voxel)
# ----------------------------------------------------------------------------

def box_sum(a: np.ndarray, radius: Sequence[int]) -> np.ndarray:
    """Sum of `a` over the box [v - radius, v + radius] around every voxel v.

    Voxels outside the array count as zero. Exact for integer input: it is
    separable, one cumulative sum and one difference per axis.
    """
    out = np.asarray(a)
    if np.issubdtype(out.dtype, np.integer) or out.dtype == bool:
        # int32 is exact up to 2**31 voxels per box and halves the memory traffic.
        out = out.astype(np.int64 if out.dtype.itemsize > 4 else np.int32)
    for axis, r in enumerate(radius):
        n = out.shape[axis]
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r + 1, r)
        c = np.cumsum(np.pad(out, pad), axis=axis, dtype=out.dtype)
        hi = [slice(None)] * out.ndim
        lo = [slice(None)] * out.ndim
        hi[axis] = slice(2 * r + 1, 2 * r + 1 + n)
        lo[axis] = slice(0, n)
        out = c[tuple(hi)] - c[tuple(lo)]
    return out


def remove_small_objects(labels: np.ndarray, min_size: int) -> np.ndarray:
    """A copy of `labels` with objects of fewer than `min_size` voxels set to 0."""
    labels = np.asarray(labels)
    if min_size <= 1:
        return labels.copy()
    ids, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    keep = (counts >= min_size) & (ids != 0)
    return np.where(keep[inverse.reshape(labels.shape)], labels, 0).astype(labels.dtype)


def compute_partitions(labels: np.ndarray, radius: Sequence[int],
                       thresholds: Sequence[float] = DEFAULT_PARTITION_THRESHOLDS,
                       min_size: int = 0, mask: np.ndarray | None = None) -> np.ndarray:
    """Partition index (uint8) of every voxel, for balanced sampling.

    Args:
      labels: z,y,x integer object ids (0 = unlabelled / background).
      radius: z,y,x half-size of the box (FOV // 2 + deltas for training).
      thresholds: increasing fractions in (0, 1); a labelled voxel whose
        same-object fraction f satisfies thresholds[i-1] <= f < thresholds[i]
        gets partition i + 1 (1 .. len(thresholds) + 1).
      min_size: objects with fewer voxels are treated as background.
      mask: optional z,y,x bool array of voxels to exclude (set to `EXCLUDED`).

    Returns:
      uint8 z,y,x array: 0 for background, 1 .. len(thresholds)+1 by fraction,
      `EXCLUDED` where masked.

    Cost is proportional to the summed bounding-box volumes of the objects
    (each object's box sum is computed only inside its padded bounding box).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3-D z,y,x array, got shape {labels.shape}")
    if len(thresholds) + 1 >= EXCLUDED:
        raise ValueError(f"at most {EXCLUDED - 2} thresholds are supported, got {len(thresholds)}")
    radius = tuple(int(r) for r in radius)
    ids, inverse = np.unique(remove_small_objects(labels, min_size), return_inverse=True)
    compact = inverse.reshape(labels.shape).astype(np.int32)
    if ids[0] != 0:            # no background present: keep ids 1.. for objects
        compact += 1
    box_volume = float(np.prod([2 * r + 1 for r in radius]))
    fraction = np.zeros(labels.shape, np.float32)
    for obj, sl in enumerate(ndimage.find_objects(compact), start=1):
        if sl is None:
            continue
        grown = tuple(slice(max(s.start - r, 0), min(s.stop + r, n))
                      for s, r, n in zip(sl, radius, labels.shape))
        inside = compact[grown] == obj
        counts = box_sum(inside.astype(np.int32), radius)
        fraction[grown][inside] = counts[inside] / box_volume
    partitions = (np.digitize(fraction, np.asarray(thresholds, np.float32)) + 1).astype(np.uint8)
    partitions[compact == 0] = 0
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != labels.shape:
            raise ValueError(f"mask shape {mask.shape} differs from labels shape {labels.shape}")
        partitions[mask] = EXCLUDED
    return partitions


def cached_partitions(labels: np.ndarray, radius: Sequence[int], thresholds: Sequence[float],
                      min_size: int, mask: np.ndarray | None, cache_dir: str | os.PathLike | None
                      ) -> np.ndarray:
    """`compute_partitions`, cached on disk under `cache_dir` by a hash of its inputs."""
    if not cache_dir:
        return compute_partitions(labels, radius, thresholds, min_size, mask)
    pieces = []
    for part in (np.ascontiguousarray(labels), np.asarray(radius), np.asarray(thresholds),
                 np.asarray([min_size]), np.ascontiguousarray(mask) if mask is not None else None):
        if part is not None:
            pieces += [str(part.shape) + str(part.dtype), part]
    path = Path(cache_dir) / f"partitions_{digest(pieces, 'sha1')[:16]}.npy"
    if path.exists():
        return np.load(path)
    partitions = compute_partitions(labels, radius, thresholds, min_size, mask)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npy(path, partitions)
    return partitions


# ----------------------------------------------------------------------------
# Training volumes and the balanced sampler
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainingVolume:
    """One labelled volume held in memory (z,y,x).

    Attributes:
      image: uint8 (or float) EM image.
      labels: integer object ids, same shape; 0 = unlabelled.
      mean, stddev: the image normalisation (x - mean) / stddev for this volume.
      mask: optional bool array of excluded voxels (never centres, weight 0).
      name: for messages.
    """

    image: np.ndarray
    labels: np.ndarray
    mean: float = IMAGE_MEAN
    stddev: float = IMAGE_STDDEV
    mask: np.ndarray | None = None
    name: str = "volume"

    def __post_init__(self):
        if self.image.ndim != 3:
            raise ValueError(f"{self.name}: image must be 3-D z,y,x, got shape {self.image.shape}")
        if self.image.shape != self.labels.shape:
            raise ValueError(f"{self.name}: image shape {self.image.shape} differs from "
                             f"labels shape {self.labels.shape}")
        if self.mask is not None and self.mask.shape != self.labels.shape:
            raise ValueError(f"{self.name}: mask shape {self.mask.shape} differs from "
                             f"labels shape {self.labels.shape}")
        if not np.any(self.labels):
            raise ValueError(f"{self.name}: labels are empty (every voxel is 0)")
        if self.stddev <= 0:
            raise ValueError(f"{self.name}: stddev must be positive, got {self.stddev}")


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """One example's augmentation: reflections (z,y,x), y,x transposition, a
    permutation `axes` of z,y,x, contrast / brightness applied to the
    normalised image, and the deformation and section artefacts of
    `ffnjax.augment` (None: none)."""

    flips: tuple[bool, bool, bool] = (False, False, False)
    transpose_yx: bool = False
    contrast: float = 1.0
    brightness: float = 0.0
    axes: tuple[int, int, int] = (0, 1, 2)
    deformation: augmentations.Deformation | None = None
    sections: augmentations.Sections | None = None


def apply_geometric(a: np.ndarray, aug: Augmentation) -> np.ndarray:
    """Reflects, transposes, then permutes the leading z,y,x axes of `a` as
    `aug` says (output axis i is the reflected input's axis `aug.axes[i]`).

    The same call on image, labels and weight keeps them aligned; the crop centre
    stays the centre because crops have odd sizes.
    """
    for axis, flip in enumerate(aug.flips):
        if flip:
            a = np.flip(a, axis)
    if aug.transpose_yx:
        a = np.swapaxes(a, 1, 2)
    if tuple(aug.axes) != (0, 1, 2):
        a = np.transpose(a, (*aug.axes, *range(3, a.ndim)))
    return np.ascontiguousarray(a)


def crop(volume: np.ndarray, centre: Sequence[int], size: Sequence[int],
         fill: Any = 0) -> tuple[np.ndarray, np.ndarray]:
    """The box of odd `size` centred at `centre`, padded with `fill` where it leaves
    the volume. Returns (crop, inside) with `inside` True for voxels in the volume."""
    start = [int(c) - s // 2 for c, s in zip(centre, size)]
    src = tuple(slice(max(b, 0), min(b + s, n)) for b, s, n in zip(start, size, volume.shape))
    dst = tuple(slice(sl.start - b, sl.stop - b) for sl, b in zip(src, start))
    out = np.full(tuple(size), fill, dtype=volume.dtype)
    inside = np.zeros(tuple(size), bool)
    if all(sl.stop > sl.start for sl in src):
        out[dst] = volume[src]
        inside[dst] = True
    return out, inside


def _crops(volume: TrainingVolume, centre: Sequence[int], size: Sequence[int]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, labels, weight) crops; weight is True inside the volume and unmasked."""
    image, inside = crop(volume.image, centre, size)
    labels, _ = crop(volume.labels, centre, size)
    weight = inside
    if volume.mask is not None:
        weight = weight & ~crop(volume.mask, centre, size, fill=True)[0].astype(bool)
    return image, labels, weight


def make_example(volume: TrainingVolume, centre: Sequence[int], size: Sequence[int],
                 aug: Augmentation = Augmentation(), seed_prob: float = 0.95,
                 pad_prob: float = 0.05) -> dict[str, np.ndarray]:
    """One training example around `centre`.

    The order: crop (with the context a deformation needs), deform (image
    linear, labels and weight nearest, one set of coordinates), section
    artefacts (image only, on the volume's own z sections), reflections /
    transposition / permutation, normalisation, contrast and brightness.

    Returns a dict of z,y,x arrays of shape `size`:
      image: float32, normalised, augmented.
      labels: the augmented label crop (0 outside the volume).
      target: float32 soft mask: `seed_prob` on the centre voxel's object,
        `pad_prob` elsewhere (everywhere when the centre is background).
      weight: float32 1 for voxels inside the volume and not masked, else 0.
    """
    size = tuple(int(s) for s in size)
    if any(s % 2 == 0 for s in size):
        raise ValueError(f"example size must be odd along every axis, got {size}")
    if aug.deformation is None:
        image, labels, weight = _crops(volume, centre, size)
    else:
        coords = aug.deformation.coordinates(size)
        pad = augmentations.context(coords, size)
        image, labels, weight = _crops(volume, centre, [s + 2 * p for s, p in zip(size, pad)])
        coords += np.asarray(pad, float)[:, None, None, None]
        image = augmentations.resample_linear(image, coords)
        labels = augmentations.resample_nearest(labels, coords)
        weight = augmentations.resample_nearest(weight, coords, fill=False)
    if aug.sections is not None:
        image = augmentations.apply_sections(image, aug.sections)
    image = apply_geometric(image, aug)
    labels = apply_geometric(labels, aug)
    weight = apply_geometric(weight, aug)
    centre_label = labels[tuple(s // 2 for s in size)]
    obj = (labels == centre_label) & (centre_label != 0)
    norm = (image.astype(np.float32) - np.float32(volume.mean)) / np.float32(volume.stddev)
    norm = norm * np.float32(aug.contrast) + np.float32(aug.brightness)
    return dict(image=norm.astype(np.float32), labels=labels,
                target=np.where(obj, np.float32(seed_prob), np.float32(pad_prob)),
                weight=weight.astype(np.float32))


class BalancedSampler:
    """Draws example centres uniformly over partitions, pooled over volumes, and
    builds batches. All randomness comes from one NumPy PCG64 generator whose
    state (`get_state` / `set_state`, JSON-friendly) resumes the exact stream.

    Args:
      volumes: the training volumes.
      example_size: z,y,x crop size (FOV + 2 * deltas * fov_moves).
      radius: partition box half-size (FOV // 2 + deltas).
      margin: z,y,x distance centres keep from every border (example_size // 2
        keeps the whole crop inside; FOV // 2 keeps the centre FOV inside).
      thresholds, min_size: see `compute_partitions`.
      seed: the generator's seed.
      augment, transpose_yx, brightness, contrast: augmentation settings
        (transposition only when the crop's y and x sizes are equal);
        `augment=False` turns every augmentation off.
      extra: the augmentations of `ffnjax.augment` (permute_axes replaces
        the y,x transposition; it needs a cubic crop).
      seed_prob, pad_prob: soft target values.
      cache_dir: where partitions are cached ('' / None: in memory only).
    """

    def __init__(self, volumes: Sequence[TrainingVolume], example_size: Sequence[int],
                 radius: Sequence[int], margin: Sequence[int] | None = None,
                 thresholds: Sequence[float] = DEFAULT_PARTITION_THRESHOLDS, min_size: int = 0,
                 seed: int = 0, augment: bool = True, transpose_yx: bool = True,
                 brightness: float = 0.0, contrast: float = 0.0, seed_prob: float = 0.95,
                 pad_prob: float = 0.05, cache_dir: str | None = None,
                 extra: augmentations.AugmentOptions | None = None):
        if not volumes:
            raise ValueError("BalancedSampler needs at least one training volume")
        self.volumes = list(volumes)
        self.example_size = tuple(int(s) for s in example_size)
        self.extra = extra or augmentations.AugmentOptions()
        if self.extra.permute_axes and len(set(self.example_size)) != 1:
            raise ValueError(f"permute_axes needs a cubic example crop, got {self.example_size}")
        margin = tuple(s // 2 for s in self.example_size) if margin is None else tuple(margin)
        self.augment = augment
        self.transpose_yx = transpose_yx and self.example_size[1] == self.example_size[2]
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.seed_prob, self.pad_prob = seed_prob, pad_prob
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.partitions = []
        per_bin: dict[int, list[tuple[int, np.ndarray]]] = {}
        for vi, vol in enumerate(self.volumes):
            part = cached_partitions(vol.labels, radius, thresholds, min_size, vol.mask, cache_dir)
            self.partitions.append(part)
            valid = np.zeros(part.shape, bool)
            inner = tuple(slice(m, n - m) for m, n in zip(margin, part.shape))
            valid[inner] = True
            if not valid.any():
                raise ValueError(f"{vol.name}: shape {part.shape} leaves no centre at margin "
                                 f"{margin} from the borders; use a larger volume or smaller FOV")
            for p in np.unique(part[valid]):
                if p == EXCLUDED:
                    continue
                idx = np.flatnonzero(valid & (part == p))
                per_bin.setdefault(int(p), []).append((vi, idx.astype(np.int64)))
        if not per_bin:
            raise ValueError("no usable training centres: every voxel is excluded or too close "
                             "to a border")
        self.bins = sorted(per_bin)
        self._bin_volumes = {p: [v for v, _ in per_bin[p]] for p in self.bins}
        self._bin_indices = {p: [i for _, i in per_bin[p]] for p in self.bins}
        self._bin_cum = {p: np.cumsum([len(i) for _, i in per_bin[p]]) for p in self.bins}

    # -- RNG state (saved in checkpoint meta) ---------------------------------
    def get_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    # -- sampling --------------------------------------------------------------
    def sample_centre(self) -> tuple[int, tuple[int, int, int], int]:
        """(volume index, z,y,x centre, partition) with partitions equally likely."""
        p = self.bins[self.rng.integers(len(self.bins))]
        cum = self._bin_cum[p]
        k = int(self.rng.integers(cum[-1]))
        j = int(np.searchsorted(cum, k, side="right"))
        offset = k - (cum[j - 1] if j else 0)
        vi = self._bin_volumes[p][j]
        flat = self._bin_indices[p][j][offset]
        centre = np.unravel_index(flat, self.volumes[vi].labels.shape)
        return vi, tuple(int(c) for c in centre), p

    def sample_augmentation(self) -> Augmentation:
        if not self.augment:
            return Augmentation()
        flips = tuple(bool(b) for b in self.rng.integers(0, 2, 3))
        can_transpose = self.transpose_yx and not self.extra.permute_axes
        transpose = bool(self.rng.integers(0, 2)) if can_transpose else False
        contrast = 1.0 + self.rng.uniform(-self.contrast, self.contrast) if self.contrast else 1.0
        brightness = self.rng.uniform(-self.brightness, self.brightness) if self.brightness else 0.0
        aug = Augmentation(flips, transpose, float(contrast), float(brightness))  # type: ignore[arg-type]
        if self.extra == augmentations.AugmentOptions():
            return aug
        axes, deformation, sections = augmentations.sample(self.rng, self.extra, self.example_size)
        return dataclasses.replace(aug, axes=axes, deformation=deformation, sections=sections)

    def example(self) -> dict[str, np.ndarray]:
        vi, centre, _ = self.sample_centre()
        return make_example(self.volumes[vi], centre, self.example_size,
                            self.sample_augmentation(), self.seed_prob, self.pad_prob)

    def batch(self, n: int) -> dict[str, np.ndarray]:
        """n examples stacked as N,z,y,x,1 float32 arrays: image, target, weight."""
        examples = [self.example() for _ in range(n)]
        return {k: np.stack([e[k] for e in examples])[..., None].astype(np.float32)
                for k in ("image", "target", "weight")}
