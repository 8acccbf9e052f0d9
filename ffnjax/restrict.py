"""Movement restriction: where no fill starts and where no FOV is centred.

google/ffn's `MovementRestrictor` (`ffn/inference/movement.py`), built from
its request's `masks`, `seed_masks` and `shift_mask` (`storage.build_mask`,
`Runner.make_restrictor`), as boolean z,y,x arrays over the subvolume:

* `Restriction.mask` (the request's `masks`): no FOV is centred on these
  voxels and no fill starts there;
* `Restriction.seed_mask` (`seed_masks`): no fill starts there; FOVs may
  still move over them;
* `Restriction.shift` (`shift_mask`): positions whose FOV box holds a large
  local misalignment (`shift_restriction`); treated as `mask`.

The device loop (`ffnjax.flood`) receives `Restriction.moves()` as the voxels
on which no FOV is centred (a popped position there is skipped without
taking its lattice cell, as google/ffn's `segment_at` does); the host skips
seeds in `Restriction.seeds()` (`ffnjax.segmentation.seed_allowed`).

A mask is the logical OR of `MaskSource`s, each google/ffn's `MaskConfig`:
a volume (any `ffnjax.volumes` spec, read over the subvolume's box; 3-D, or
z,y,x,c with the channel last) or the image itself, whose channels
(`MaskChannel`) each select voxels by a value range or a list of values, ORed,
then optionally inverted. `MaskSource.nonzero(spec)` is the common case: the
non-zero voxels of a volume (`--mask` / `--seed-mask` of
`python -m experiments.segment`).

The segmentation a run continues (`init_segmentation`) constrains it too;
`coarse_inputs` checks it and the masks against the image and brings both to
the run's scale.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np

from ffnjax import scale
from ffnjax.config import InferenceOptions
from ffnjax.files import digest


@dataclasses.dataclass(frozen=True)
class MaskChannel:
    """google/ffn's MaskChannelConfig: voxels of one channel with `values`, or
    else with min_value <= value <= max_value; the complement with `invert`."""

    channel: int = 0
    min_value: float = 0.0
    max_value: float = 0.0
    values: tuple[int, ...] = ()
    invert: bool = False

    def select(self, data: np.ndarray) -> np.ndarray:
        """The voxels of `data` (this channel, z,y,x) this channel selects."""
        if self.values:
            out = np.isin(data, np.asarray(self.values))
        else:
            out = (data >= self.min_value) & (data <= self.max_value)
        return ~out if self.invert else out


@dataclasses.dataclass(frozen=True)
class MaskSource:
    """google/ffn's MaskConfig: the OR of `channels` of `volume` (an
    `ffnjax.volumes` spec; '' = the raw image), inverted with `invert`. No
    channels selects nothing (as in google/ffn)."""

    volume: str = ""
    channels: tuple[MaskChannel, ...] = ()
    invert: bool = False

    @classmethod
    def nonzero(cls, spec: str) -> "MaskSource":
        """The non-zero voxels of volume `spec`."""
        return cls(volume=str(spec), channels=(MaskChannel(values=(0,), invert=True),))

    def read(self, start: Sequence[int], size: Sequence[int],
             image: np.ndarray | None = None) -> np.ndarray:
        """This source's bool mask over the box [start, start + size) (z,y,x)."""
        if self.volume:
            from ffnjax.volumes import open_volume
            with open_volume(self.volume) as vol:
                data = np.asarray(vol.read(start, size))
            where = f"mask volume {self.volume!r}"
        else:
            if image is None:
                raise ValueError("an image mask needs the image")
            data, where = np.asarray(image), "the image"
        if data.ndim == 3:
            data = data[..., None]
        out = np.zeros(tuple(int(s) for s in size), bool)
        for ch in self.channels:
            if not 0 <= ch.channel < data.shape[-1]:
                raise ValueError(f"{where} has {data.shape[-1]} channel(s); a mask channel "
                                 f"asks for channel {ch.channel}")
            out |= ch.select(data[..., ch.channel])
        return ~out if self.invert else out


def build_mask(sources: Sequence[MaskSource], start: Sequence[int], size: Sequence[int],
               image: np.ndarray | None = None) -> np.ndarray | None:
    """The OR of `sources` over the box (google/ffn's `build_mask`); None when
    there are none. `image` (the raw subvolume) serves image sources."""
    masks = [s.read(start, size, image) for s in sources]
    return functools.reduce(np.logical_or, masks) if masks else None


def _box_bounds(n: int, pre: int, post: int, scale: int, limit: int) -> tuple[np.ndarray, ...]:
    """Per position along one axis, the [lo, hi) cells of google/ffn's shift-mask box."""
    pos = np.arange(n)
    lo = np.minimum(np.maximum(pos + pre, 0) // scale, limit)   # a box past the end is empty
    hi = np.minimum((pos + post) // scale + 1, limit)
    return lo, np.maximum(hi, lo)


def shift_restriction(shift: np.ndarray, threshold: float, fov_start: Sequence[int],
                      fov_size: Sequence[int], scale: int, shape: Sequence[int]) -> np.ndarray:
    """Positions whose FOV box holds a large shift (google/ffn's shift mask).

    Args:
      shift: z,y,x,2 per-section (y, x) shift vectors at `scale` in y and x
        (z,Y/scale,X/scale, rounded up), over the subvolume.
      threshold: a shift component of at least this magnitude is large.
      fov_start, fov_size: the box around a position, z,y,x, relative to it
        (start may be negative; google/ffn's `shift_mask_fov`).
      scale: how many image voxels one shift-mask voxel spans in y and x.
      shape: the subvolume's z,y,x shape.

    Returns:
      bool z,y,x of `shape`: True where google/ffn's `is_valid_pos` refuses
      the position for its shift mask (the box clipped at 0 below, as there).
    """
    shift = np.asarray(shift)
    if shift.ndim != 4 or shift.shape[-1] != 2:
        raise ValueError(f"a shift mask has two channels (z,y,x,2), got shape {shift.shape}")
    if int(scale) < 1:
        raise ValueError(f"shift_mask_scale must be >= 1, got {scale}")
    bad = np.max(np.abs(shift), axis=-1) >= threshold
    table = np.zeros(tuple(s + 1 for s in bad.shape), np.int64)  # summed-area table
    table[1:, 1:, 1:] = bad.cumsum(0).cumsum(1).cumsum(2)
    scales = (1, int(scale), int(scale))
    (lz, hz), (ly, hy), (lx, hx) = (
        _box_bounds(int(n), int(a), int(a) + int(s) - 1, k, m)
        for n, a, s, k, m in zip(shape, fov_start, fov_size, scales, bad.shape))
    z0, z1 = lz[:, None, None], hz[:, None, None]
    y0, y1 = ly[None, :, None], hy[None, :, None]
    x0, x1 = lx[None, None, :], hx[None, None, :]
    total = (table[z1, y1, x1] - table[z0, y1, x1] - table[z1, y0, x1] - table[z1, y1, x0]
             + table[z0, y0, x1] + table[z0, y1, x0] + table[z1, y0, x0] - table[z0, y0, x0])
    return total > 0


def read_shift_restriction(spec: str, threshold: float, fov_start: Sequence[int],
                           fov_size: Sequence[int], scale: int, start: Sequence[int],
                           size: Sequence[int]) -> np.ndarray:
    """`shift_restriction` of the shift volume `spec` (z,y,x,2 at `scale` in
    y and x) for the subvolume [start, start + size): google/ffn reads it from
    start // (1, scale, scale), size / (1, scale, scale) rounded up."""
    from ffnjax.volumes import open_volume
    s = int(scale)
    if s < 1:
        raise ValueError(f"shift_mask_scale must be >= 1, got {scale}")
    lo = (int(start[0]), int(start[1]) // s, int(start[2]) // s)
    n = (int(size[0]), -(-int(size[1]) // s), -(-int(size[2]) // s))
    with open_volume(spec) as vol:
        if vol.num_channels != 2:
            raise ValueError(f"shift mask {spec!r} must have two channels (z,y,x,2), got shape "
                             f"{vol.shape} with {vol.num_channels or 'no'} channel axis")
        clipped = tuple(min(b, m - a) for a, b, m in zip(lo, n, vol.shape))
        data = np.zeros((*n, 2), np.float32)
        data[:clipped[0], :clipped[1], :clipped[2]] = vol.read(lo, clipped)
    return shift_restriction(data, threshold, fov_start, fov_size, s, size)


@dataclasses.dataclass
class Restriction:
    """Where a run may not go (see the module docstring); None = nowhere."""

    mask: np.ndarray | None = None
    seed_mask: np.ndarray | None = None
    shift: np.ndarray | None = None

    def _or(self, *names: str) -> np.ndarray | None:
        parts = [getattr(self, n) for n in names if getattr(self, n) is not None]
        return functools.reduce(np.logical_or, parts).astype(bool) if parts else None

    def moves(self) -> np.ndarray | None:
        """Voxels on which no FOV is centred: `mask` | `shift`."""
        return self._or("mask", "shift")

    def seeds(self) -> np.ndarray | None:
        """Voxels where no fill starts: `mask` | `shift` | `seed_mask`."""
        return self._or("mask", "shift", "seed_mask")

    def check(self, shape: Sequence[int]) -> "Restriction":
        """Self, after checking every mask has the z,y,x `shape`."""
        for name in ("mask", "seed_mask", "shift"):
            arr = getattr(self, name)
            if arr is not None and tuple(np.shape(arr)) != tuple(shape):
                raise ValueError(f"restriction {name} has shape {np.shape(arr)}, the image "
                                 f"{tuple(shape)}")
        return self

    def map(self, fn) -> "Restriction":
        """A Restriction of `fn(array)` of each mask (e.g. a downsampling)."""
        return Restriction(*(None if a is None else fn(a)
                             for a in (self.mask, self.seed_mask, self.shift)))


def check_init_segmentation(labels: Any, shape: Sequence[int]) -> np.ndarray:
    """`labels` as int64 z,y,x of `shape`: integer ids >= 0 (0 = background)."""
    arr = np.asarray(labels)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"init_segmentation has shape {arr.shape}, the image {tuple(shape)}")
    if arr.dtype.kind not in "iub":
        raise ValueError(f"init_segmentation must hold integer ids, got dtype {arr.dtype}")
    if arr.size and (int(arr.max()) > np.iinfo(np.int64).max or int(arr.min()) < 0):
        raise ValueError("init_segmentation ids must lie in 0 .. 2**63 - 1")
    return arr.astype(np.int64)


def coarse_inputs(shape: Sequence[int], options: InferenceOptions,
                  restriction: Restriction | None, init_segmentation: Any
                  ) -> tuple[Restriction, np.ndarray | None]:
    """The restriction and the starting labels of a run, checked against the
    native image `shape` and brought to the coarse grid of
    `options.downsample` (`ffnjax.scale.downsample_labels`)."""
    coarse = lambda a: scale.downsample_labels(np.asarray(a), options.downsample)  # noqa: E731
    restriction = (restriction or Restriction()).check(shape).map(coarse)
    if init_segmentation is None:
        return restriction, None
    if options.consensus:
        raise ValueError("init_segmentation cannot be combined with consensus (the reverse "
                         "pass would start without it)")
    return restriction, coarse(check_init_segmentation(init_segmentation, shape))


def inputs_digest(restriction: Restriction, init: np.ndarray | None) -> str:
    """A digest of the masks and the starting labels, for the run's fingerprint ('' if none)."""
    arrays = {"mask": restriction.mask, "seed_mask": restriction.seed_mask,
              "shift": restriction.shift, "init": init}
    if all(a is None for a in arrays.values()):
        return ""
    # Each array behind its name, shape and dtype: the same bytes in another
    # role (a move mask become a seed mask) or shape give another digest.
    pieces: list = []
    for name, a in arrays.items():
        pieces += [f"{name}:-;" if a is None else f"{name}:{a.shape}:{a.dtype.str};",
                   b"" if a is None else a]
    return " data:" + digest(pieces)
