"""Frozen configuration dataclasses: one place for every option and its default.

`ModelConfig` holds the network and its FOV/delta geometry; `InferenceOptions`
holds FFN's flood-fill settings. Both round-trip through JSON so that a
checkpoint carries its own configuration.

Arrays and tuples are z,y,x everywhere inside ffnjax.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Self


def logit(p: float) -> float:
    """The one place where probabilities become logits: log(p / (1 - p)).

    Args:
      p: probability in the open interval (0, 1).

    Raises:
      ValueError: naming the value when p is outside (0, 1).
    """
    p = float(p)
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability must lie in (0, 1) to convert to a logit, got {p}")
    return math.log(p / (1.0 - p))


def _as_zyx(name: str, value: Any, *, positive: bool = True) -> tuple[int, int, int]:
    """Validates a z,y,x triple of ints (accepts a 'z,y,x' string too)."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    try:
        triple = tuple(int(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be three integers z,y,x, got {value!r}") from e
    if len(triple) != 3:
        raise ValueError(f"{name} must be three integers z,y,x, got {value!r}")
    if positive and any(v <= 0 for v in triple):
        raise ValueError(f"{name} must be positive, got {triple}")
    if not positive and any(v < 0 for v in triple):
        raise ValueError(f"{name} must be non-negative, got {triple}")
    return triple  # type: ignore[return-value]


class _JsonMixin:
    """JSON round trip for frozen dataclasses whose fields are JSON-friendly."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> Self:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cls.__name__}: invalid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


COMPUTE_DTYPES = ("float32", "bfloat16")
CONV_IMPLS = ("auto", "native")


@dataclasses.dataclass(frozen=True)
class ModelConfig(_JsonMixin):
    """The FFN convstack and its field-of-view geometry (all z,y,x).

    Attributes:
      depth: number of residual levels counting the input pair (google/ffn's
        `depth`): conv0_a/conv0_b then `depth - 1` residual modules.
      features: channels of every hidden convolution.
      fov_size: the network's field of view, z,y,x (odd sizes).
      deltas: the FOV move step z,y,x; flood fill and in-example training moves
        step by exactly these.
      compute_dtype: 'float32' or 'bfloat16'; parameters stay float32.
      conv_impl: how 3x3x3 convolutions are computed ('auto' picks the fastest
        correct formulation for the backend; 'native' is lax.conv).

    The published google/ffn FIB-25 model is
    `ModelConfig(depth=12, fov_size=(33, 33, 33), deltas=(8, 8, 8))`.
    """

    depth: int = 9
    features: int = 32
    fov_size: tuple[int, int, int] = (17, 33, 33)
    deltas: tuple[int, int, int] = (4, 8, 8)
    compute_dtype: str = "float32"
    conv_impl: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "fov_size", _as_zyx("fov_size", self.fov_size))
        object.__setattr__(self, "deltas", _as_zyx("deltas", self.deltas, positive=False))
        if int(self.depth) < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if int(self.features) < 1:
            raise ValueError(f"features must be >= 1, got {self.features}")
        object.__setattr__(self, "depth", int(self.depth))
        object.__setattr__(self, "features", int(self.features))
        if any(s % 2 == 0 for s in self.fov_size):
            raise ValueError(f"fov_size must be odd along every axis, got {self.fov_size}")
        if any(d > s // 2 for d, s in zip(self.deltas, self.fov_size)):
            raise ValueError(
                f"deltas {self.deltas} must be at most half the fov_size {self.fov_size} "
                "so that a move stays inside the current FOV")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}")

    @property
    def fov_radius(self) -> tuple[int, int, int]:
        """Half the FOV, z,y,x: the FOV centred at c spans [c - r, c + r]."""
        return tuple(s // 2 for s in self.fov_size)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class InferenceOptions(_JsonMixin):
    """Flood-fill settings, with google/ffn's usual defaults.

    Probabilities are given here as probabilities; `ffnjax.config.logit` is the
    one function that turns them into logits.

    Attributes:
      image_mean, image_stddev: image normalisation (x - mean) / std.
      init_activation: probability written at the seed voxel.
      pad_value: probability of canvas voxels not yet visited.
      move_threshold: a FOV face must exceed this for a move.
      segment_threshold: voxels above this join the object.
      min_segment_size: objects with fewer voxels are dropped.
      min_boundary_dist: a seed closer than this (z,y,x) to an existing object is skipped.
      disconnected_seeds: when True, a voxel once driven below 0.5 is not revived.
      max_steps: FOV evaluations allowed per object (0: bounded only by the lattice).
      seed_policy: 'peaks' or 'grid'.
      seed_grid_step: spacing z,y,x of the 'grid' seed policy.
      batch_size: FOV positions evaluated per network call during a fill.
      consensus: also segment in reverse seed order and split objects by intersection.
    """

    image_mean: float = 128.0
    image_stddev: float = 33.0
    init_activation: float = 0.95
    pad_value: float = 0.05
    move_threshold: float = 0.9
    segment_threshold: float = 0.6
    min_segment_size: int = 100
    min_boundary_dist: tuple[int, int, int] = (1, 1, 1)
    disconnected_seeds: bool = True
    max_steps: int = 0
    seed_policy: str = "peaks"
    seed_grid_step: tuple[int, int, int] = (8, 16, 16)
    batch_size: int = 1
    consensus: bool = False

    def __post_init__(self):
        for name in ("init_activation", "pad_value", "move_threshold", "segment_threshold"):
            v = float(getattr(self, name))
            if not 0.0 < v < 1.0:
                raise ValueError(f"{name} must be a probability in (0, 1), got {v}")
            object.__setattr__(self, name, v)
        if float(self.image_stddev) <= 0:
            raise ValueError(f"image_stddev must be positive, got {self.image_stddev}")
        object.__setattr__(self, "min_boundary_dist",
                           _as_zyx("min_boundary_dist", self.min_boundary_dist, positive=False))
        object.__setattr__(self, "seed_grid_step", _as_zyx("seed_grid_step", self.seed_grid_step))
        if self.seed_policy not in ("peaks", "grid"):
            raise ValueError(f"seed_policy must be 'peaks' or 'grid', got {self.seed_policy!r}")
        if int(self.min_segment_size) < 0 or int(self.max_steps) < 0 or int(self.batch_size) < 1:
            raise ValueError("min_segment_size and max_steps must be >= 0 and batch_size >= 1, got "
                             f"{self.min_segment_size}, {self.max_steps}, {self.batch_size}")
