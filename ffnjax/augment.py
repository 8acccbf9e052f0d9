"""Training augmentations beyond reflections and y,x transposition: the
distortions and section artefacts of serial-section EM, in NumPy on the host.

All of them are off by default (`AugmentOptions()`); `TrainConfig` carries
their settings (`AUGMENT_FIELDS`), `ffnjax.examples.BalancedSampler` draws one
example's instance from its own generator (`sample`, so a resumed run draws
the same stream) and `ffnjax.examples.make_example` applies it. Three kinds:

* Permutation of all three axes (`permute_axes`): exact, like the reflections;
  it needs a cubic crop and only makes sense for isotropic voxels.
* Deformations, one resampling of the crop (`Deformation`): the output voxel
  v reads the input at `coordinates(v)` = rotation about the crop centre +
  smooth elastic displacement + a misalignment shift of the sections on one
  side of a random z. The image is interpolated linearly, labels and weights
  take the nearest voxel -- the same coordinates for all three, so they stay
  aligned. The crop centre always maps to itself (the elastic field is taken
  relative to the centre's displacement and the misaligned side is the one
  away from the centre), so the sampled centre and its partition are kept.
* Section artefacts of the image only (`Sections`): one section replaced by
  the crop's mean (a missing section) or blurred in y,x (out of focus).

google/ffn's train.py uses only reflections and the y,x permutation; the
deformations and artefacts here are the usual ones of EM training pipelines,
opt-in. Everything is in z,y,x voxel units of the crop.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from ffnjax.config import TrainConfig

AUGMENT_FIELDS = ("permute_axes", "elastic_alpha", "elastic_sigma", "rotation_degrees",
                  "rotation_3d", "misalign_prob", "misalign_max", "missing_section_prob",
                  "out_of_focus_prob", "out_of_focus_sigma")

__all__ = ["AUGMENT_FIELDS", "AugmentOptions", "Deformation", "Sections", "sample", "context",
           "resample_linear", "resample_nearest", "apply_sections", "rotation_matrix"]


def _train_config_fields():
    """(name, type, default) of TrainConfig's augmentation fields: the one place
    their defaults are written is TrainConfig, which carries them to the CLI."""
    by_name = {f.name: f for f in dataclasses.fields(TrainConfig)}
    return [(n, by_name[n].type, dataclasses.field(default=by_name[n].default))
            for n in AUGMENT_FIELDS]


_AugmentFields = dataclasses.make_dataclass("_AugmentFields", _train_config_fields(), frozen=True)


@dataclasses.dataclass(frozen=True)
class AugmentOptions(_AugmentFields):
    """The settings of these augmentations (TrainConfig's fields of the same names).

    Attributes:
      permute_axes: a random permutation of z, y, x per example.
      elastic_alpha: std (voxels) of the elastic displacement of every voxel
        (before it is taken relative to the centre's); 0 disables the warp.
      elastic_sigma: spacing (voxels) of the control points, i.e. the
        smoothness of the displacement field. alpha / sigma is about the
        strain: keep it well below 1 (near 1 the warp folds the tissue).
      rotation_degrees: rotations by an angle uniform in +-this; 0 disables.
      rotation_3d: about a random 3-D axis (isotropic voxels) rather than z.
      misalign_prob, misalign_max: probability of a misalignment and its
        largest y,x shift in voxels.
      missing_section_prob: probability that one image section is replaced by
        the crop's mean intensity.
      out_of_focus_prob, out_of_focus_sigma: probability that one image
        section is blurred, and the Gaussian's sigma in y,x.
    """

    @classmethod
    def of(cls, config) -> "AugmentOptions":
        """The options of a TrainConfig (or anything with these attributes)."""
        return cls(**{f: getattr(config, f) for f in AUGMENT_FIELDS})

    @property
    def deforms(self) -> bool:
        return self.elastic_alpha > 0 or self.rotation_degrees > 0 or self.misalign_prob > 0


@dataclasses.dataclass(frozen=True, eq=False)
class Deformation:
    """One example's resampling: output voxel v reads the input crop at
    R (v - c) + c + elastic(v) (+ the misalignment shift), c the crop centre.

    Attributes:
      rotation: 3x3 rotation matrix acting on z,y,x offsets from the centre.
      elastic: (3, gz, gy, gx) displacements (voxels) at control points
        spaced `spacing` apart and centred on the crop centre, or None.
      spacing: control-point spacing (voxels) of `elastic`.
      misalign: (z0, dy, dx): sections z >= z0 (when the centre lies below
        z0) or z < z0 (otherwise) read the input shifted by (dy, dx).
    """

    rotation: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    elastic: np.ndarray | None = None
    spacing: float = 8.0
    misalign: tuple[int, int, int] | None = None

    def coordinates(self, size: Sequence[int]) -> np.ndarray:
        """(3, *size) float64 input coordinates of every output voxel (crop frame)."""
        size = tuple(int(s) for s in size)
        c = np.asarray([s // 2 for s in size], float)
        grid = np.indices(size, dtype=float)
        offsets = grid - c[:, None, None, None]
        coords = np.einsum("ij,j...->i...", np.asarray(self.rotation, float), offsets)
        coords += c[:, None, None, None]
        if self.elastic is not None:     # relative to the centre's displacement: c stays put
            field = smooth_field(self.elastic, self.spacing, size)
            coords += field - field[(slice(None), *(s // 2 for s in size))][:, None, None, None]
        if self.misalign is not None:
            z0, dy, dx = self.misalign
            side = slice(z0, None) if size[0] // 2 < z0 else slice(None, z0)
            coords[1, side] += dy
            coords[2, side] += dx
        return coords


@dataclasses.dataclass(frozen=True)
class Sections:
    """One example's section artefacts: z indices (-1: none) of the crop's own
    sections, i.e. before reflections and permutation."""

    missing: int = -1
    blurred: int = -1
    blur_sigma: float = 2.0


# ----------------------------------------------------------------------------
# Drawing one example's augmentation
# ----------------------------------------------------------------------------

def rotation_matrix(axis: Sequence[float], angle: float) -> np.ndarray:
    """The 3x3 rotation by `angle` (radians) about `axis` (z,y,x; normalised here)."""
    u = np.asarray(axis, float)
    u = u / np.linalg.norm(u)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def control_grid(size: Sequence[int], spacing: float) -> tuple[int, int, int]:
    """Control points per axis: enough to span the crop at `spacing`, an odd
    number so that one sits at the centre."""
    return tuple(2 * math.ceil((s // 2) / spacing) + 1 for s in size)  # type: ignore[return-value]


def sample(rng: np.random.Generator, options: AugmentOptions, size: Sequence[int]
           ) -> tuple[tuple[int, int, int], Deformation | None, Sections | None]:
    """(axis permutation, deformation, section artefacts) of one example.

    Draws from `rng` only for the options that are on, in a fixed order, so
    with everything off the sampler's stream is what it was without them.
    """
    size = tuple(int(s) for s in size)
    axes = tuple(int(a) for a in rng.permutation(3)) if options.permute_axes else (0, 1, 2)
    deformation = None
    if options.deforms:
        rotation, elastic, misalign = np.eye(3), None, None
        if options.rotation_degrees > 0:
            angle = math.radians(rng.uniform(-options.rotation_degrees, options.rotation_degrees))
            axis = rng.normal(size=3) if options.rotation_3d else (1.0, 0.0, 0.0)
            rotation = rotation_matrix(axis, angle)
        if options.elastic_alpha > 0:
            grid = control_grid(size, options.elastic_sigma)
            elastic = rng.normal(0.0, options.elastic_alpha, (3, *grid))
        if options.misalign_prob > 0 and size[0] > 1 and rng.random() < options.misalign_prob:
            m = options.misalign_max
            dy, dx = (int(v) for v in rng.integers(-m, m + 1, 2))
            misalign = (int(rng.integers(1, size[0])), dy, dx)
        deformation = Deformation(rotation, elastic, options.elastic_sigma, misalign)
    missing = blurred = -1
    if options.missing_section_prob > 0 and rng.random() < options.missing_section_prob:
        missing = int(rng.integers(size[0]))
    if options.out_of_focus_prob > 0 and rng.random() < options.out_of_focus_prob:
        blurred = int(rng.integers(size[0]))
    sections = (Sections(missing, blurred, options.out_of_focus_sigma)
                if missing >= 0 or blurred >= 0 else None)
    return axes, deformation, sections  # type: ignore[return-value]


# ----------------------------------------------------------------------------
# Applying it
# ----------------------------------------------------------------------------

def smooth_field(control: np.ndarray, spacing: float, size: Sequence[int]) -> np.ndarray:
    """(3, *size) displacement: a Gaussian-weighted (width `spacing`) sum of the
    control values, control points `spacing` apart and centred on the crop
    centre, separable per axis. The weights of each voxel have unit squared
    sum, so i.i.d. control values of std alpha give every voxel std alpha."""
    weights = []
    for n, g in zip(size, control.shape[1:]):
        points = (np.arange(g) - g // 2) * spacing + n // 2
        w = np.exp(-0.5 * ((np.arange(n)[:, None] - points[None, :]) / spacing) ** 2)
        weights.append(w / np.sqrt((w ** 2).sum(1, keepdims=True)))
    wz, wy, wx = weights          # one axis at a time: a few small matrix products
    field = np.einsum("xk,cijk->cijx", wx, control)
    field = np.einsum("yj,cijx->ciyx", wy, field)
    return np.einsum("zi,ciyx->czyx", wz, field)


def context(coords: np.ndarray, size: Sequence[int]) -> tuple[int, int, int]:
    """Per-axis voxels a crop of `size` must grow by on each side so that it
    holds every coordinate (and its linear-interpolation neighbour)."""
    pads = []
    for axis, s in enumerate(size):
        c = coords[axis]
        pads.append(max(0, math.ceil(max(-c.min(), c.max() - (s - 1))) + 1))
    return tuple(pads)  # type: ignore[return-value]


def resample_linear(a: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """`a` (float32) trilinearly interpolated at `coords` (3, ...); 0 outside."""
    return ndimage.map_coordinates(np.asarray(a, np.float32), coords, order=1, mode="constant",
                                   cval=0.0, output=np.float32)


def resample_nearest(a: np.ndarray, coords: np.ndarray, fill=0) -> np.ndarray:
    """`a` at the nearest voxel (floor(c + 0.5)) of `coords`, `fill` outside;
    exact for any dtype (label ids never pass through floats)."""
    idx = np.floor(coords + 0.5).astype(np.int64)
    ok = np.all((idx >= 0) & (idx < np.asarray(a.shape)[:, None, None, None]), axis=0)
    out = np.full(coords.shape[1:], fill, a.dtype)
    out[ok] = a[tuple(i[ok] for i in idx)]
    return out


def apply_sections(image: np.ndarray, sections: Sections) -> np.ndarray:
    """A float32 copy of `image` (z,y,x) with the section artefacts applied."""
    out = np.array(image, np.float32)
    if sections.blurred >= 0:
        out[sections.blurred] = ndimage.gaussian_filter(out[sections.blurred], sections.blur_sigma,
                                                        mode="reflect")
    if sections.missing >= 0:
        out[sections.missing] = out.mean()
    return out
