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
import struct
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
        return cls.from_dict(json_object(f"{cls.__name__}", text))


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


COMPUTE_DTYPES = ("float32", "bfloat16")
CONV_IMPLS = ("auto", "native", "depth_split", "stacked_z", "stacked_zy", "im2col", "direct")


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


# google/ffn's image normalisation: the network sees (x - IMAGE_MEAN) / IMAGE_STDDEV.
# The one default: InferenceOptions, TrainConfig's per-volume normalisation,
# the training volumes and the synthetic images (made with these statistics)
# all read it from here.
IMAGE_MEAN = 128.0
IMAGE_STDDEV = 33.0

# Seed policies (`ffnjax.seed_policies`), and google/ffn's names for them
# (`seed.py`), accepted anywhere a policy is named and stored as ffnjax's.
SEED_POLICIES = ("peaks", "grid", "peaks2d", "max", "grid2d", "grid3d", "dense", "fill_empty",
                 "invert_origins", "sequence", "reverse")
GOOGLE_SEED_POLICIES = {"PolicyPeaks": "peaks", "PolicyPeaks2d": "peaks2d", "PolicyMax": "max",
                        "PolicyGrid2d": "grid2d", "PolicyGrid3d": "grid3d",
                        "PolicyDenseSeeds": "dense", "PolicyFillEmptySpace": "fill_empty",
                        "PolicyInvertOrigins": "invert_origins", "SequentialPolicies": "sequence",
                        "ReverseCoords": "reverse"}


def seed_policy_name(name: str) -> str:
    """ffnjax's name of a seed policy given by either name (google/ffn's
    'PolicyPeaks2d' is 'peaks2d'); ValueError naming both lists otherwise."""
    name = GOOGLE_SEED_POLICIES.get(name, name)
    if name not in SEED_POLICIES:
        raise ValueError(f"seed_policy must be one of {SEED_POLICIES} or google/ffn's "
                         f"{tuple(GOOGLE_SEED_POLICIES)}, got {name!r}")
    return name


def json_object(name: str, text: str) -> dict:
    """The JSON object in `text`; ValueError naming `name` when it is invalid
    JSON or not an object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: invalid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name}: expected a JSON object, got {type(value).__name__}")
    return value


def json_object_text(name: str, text: Any) -> str:
    """`text` (a JSON object as text, or a dict; '' = none) as canonical JSON
    text (sorted keys); ValueError naming `name` when it is not an object."""
    value = text if isinstance(text, dict) else json_object(name, text) if text else {}
    return json.dumps(value, sort_keys=True) if value else ""
SEED_ORDERS = ("zyx", "distance")
# How the 'peaks' seed policy finds its maxima (`ffnjax.seeds.peaks_seeds`):
# ffnjax's own way, or exactly as google/ffn's PolicyPeaks does.
PEAKS_METHODS = ("ffnjax", "google_ffn")
# Named inference modes: `InferenceOptions.<name>(**overrides)` and
# `python -m experiments.segment --compat NAME`.
INFERENCE_MODES = ("ffnjax", "google_ffn")
CONSENSUS_MODES = ("split", "contested")
# InferenceOptions.fov_split: one FOV's forward pass split over the CPU host devices.
FOV_SPLITS = ("auto", "on", "off")
# InferenceOptions fields that choose how a result is computed, not what it is
# (`InferenceOptions.result_dict` leaves them out of resume checks).
HOW_FIELDS = ("fov_split",)
# The InferenceOptions fields fixed by training: the normalisation of the
# image, the initial mask (training's seed_prob / pad_prob) and the scale
# (training's downsample factors). Inference with
# other values shows the network inputs it never saw. A checkpoint records
# them (`ffnjax.checkpoints.inference_defaults`).
INFERENCE_FACTS = ("image_mean", "image_stddev", "init_activation", "pad_value", "downsample")


# The InferenceOptions fields that google/ffn's request holds in float32 proto
# fields (`InferenceOptions.google_ffn` rounds them the same way).
PROTO_FLOATS = ("image_mean", "image_stddev", "init_activation", "pad_value", "move_threshold",
                "segment_threshold", "disco_active_fraction")


def as_float32(value: float) -> float:
    """`value` rounded to the nearest float32, as a Python float (what a
    protocol-buffer `float` field gives back)."""
    return float(struct.unpack("<f", struct.pack("<f", float(value)))[0])


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
      seed_policy: 'peaks', 'grid' or another of SEED_POLICIES
        (`ffnjax.seed_policies`); google/ffn's names (GOOGLE_SEED_POLICIES,
        e.g. 'PolicyPeaks2d') are accepted and stored as ffnjax's.
      seed_policy_args: the policy's arguments as a JSON object (google/ffn's
        `seed_policy_args`), e.g. '{"min_distance": 3}'; '' for none.
      seed_grid_step: spacing z,y,x of the 'grid' seed policy.
      seed_order: 'zyx' (ascending z,y,x: google/ffn's order) or 'distance'
        (deepest first: descending distance to the nearest image edge).
      batch_size: FOV positions evaluated per network call during a fill.
      consensus: also segment in reverse seed order and combine both passes
        as `consensus_mode` says.
      consensus_mode: 'split' (google/ffn's oversegmentation consensus: one
        object per overlapping pair of objects, pieces under
        `min_segment_size` dropped) or 'contested' (keep the forward pass's
        objects; unlabel the pieces under `min_segment_size` that the reverse
        pass gives to an object that does not correspond: order-dependent
        claims across a boundary).
      downsample: z,y,x factors: segment the image reduced by these
        (`ffnjax.scale`: block mean) and return labels on the native grid; a
        model trained with `TrainConfig.downsample` records its factors and
        the segmenters default to them. Seeds, FOV steps and
        `min_segment_size` count coarse voxels.
      peaks_method: how the 'peaks' seed policy finds its maxima: 'ffnjax'
        or 'google_ffn' (PolicyPeaks exactly: `ffnjax.seeds.peaks_seeds`).
      disco_active_fraction: with `disconnected_seeds`, a FOV's prediction
        freezes the voxels below 0.5 only when more than this fraction of it
        reaches `move_threshold` (google/ffn's `disco_seed_threshold`, 0 when
        its request leaves it unset); negative: always (ffnjax).
      skip_segmented: a fill does not evaluate a FOV centred on a voxel of an
        earlier object (google/ffn's `Canvas.is_valid_pos`); False: a fill
        depends on the image and its seed only (ffnjax).
      fov_split: with `batch_size` 1 on a CPU with several host devices,
        split each FOV's forward pass over them by z slabs (`ffnjax.fovsplit`;
        equal to the unsplit pass within float rounding): 'auto' where it
        measured faster (`fovsplit.AUTO_MIN_LAYER_FLOPS`), 'on', 'off'. Only
        the convstack is split; other networks run on one device. How a
        result is computed, not what: a resumed run may change it.

    `InferenceOptions.google_ffn()` sets every option where google/ffn's
    inference differs (docs/google_ffn_parity.md lists them).
    """

    image_mean: float = IMAGE_MEAN
    image_stddev: float = IMAGE_STDDEV
    init_activation: float = 0.95
    pad_value: float = 0.05
    move_threshold: float = 0.9
    segment_threshold: float = 0.6
    min_segment_size: int = 100
    min_boundary_dist: tuple[int, int, int] = (1, 1, 1)
    disconnected_seeds: bool = True
    max_steps: int = 0
    seed_policy: str = "peaks"
    seed_policy_args: str = ""
    seed_grid_step: tuple[int, int, int] = (8, 16, 16)
    seed_order: str = "zyx"
    batch_size: int = 1
    consensus: bool = False
    consensus_mode: str = "split"
    downsample: tuple[int, int, int] = (1, 1, 1)
    peaks_method: str = "ffnjax"
    disco_active_fraction: float = -1.0
    skip_segmented: bool = False
    fov_split: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "downsample", _as_zyx("downsample", self.downsample))
        if self.fov_split not in FOV_SPLITS:
            raise ValueError(f"fov_split must be one of {FOV_SPLITS}, got {self.fov_split!r}")
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
        object.__setattr__(self, "seed_policy", seed_policy_name(self.seed_policy))
        object.__setattr__(self, "seed_policy_args",
                           json_object_text("seed_policy_args", self.seed_policy_args))
        # The arguments must fit the policy (unknown or missing ones fail here, not at
        # the first seed). Imported here, as seed_policies imports this module; the
        # default options its imports build while it is half-loaded are not checked.
        from ffnjax import seed_policies
        check = getattr(seed_policies, "check_args", None)
        if check is not None:
            check(self.seed_policy, json.loads(self.seed_policy_args or "{}"))
        if self.seed_order not in SEED_ORDERS:
            raise ValueError(f"seed_order must be one of {SEED_ORDERS}, got {self.seed_order!r}")
        if self.consensus_mode not in CONSENSUS_MODES:
            raise ValueError(f"consensus_mode must be one of {CONSENSUS_MODES}, "
                             f"got {self.consensus_mode!r}")
        if self.peaks_method not in PEAKS_METHODS:
            raise ValueError(f"peaks_method must be one of {PEAKS_METHODS}, "
                             f"got {self.peaks_method!r}")
        v = float(self.disco_active_fraction)
        if not v < 1.0:
            raise ValueError(f"disco_active_fraction must be below 1 (negative: always), got {v}")
        object.__setattr__(self, "disco_active_fraction", v)
        for name, least in (("min_segment_size", 0), ("max_steps", 0), ("batch_size", 1)):
            if int(getattr(self, name)) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")

    def result_dict(self) -> dict[str, Any]:
        """`to_dict()` without the fields that change how a result is computed,
        not what it is (`HOW_FIELDS`): what resumed runs compare, so that a
        run resumes whichever way it spreads over the cores."""
        return {k: v for k, v in self.to_dict().items() if k not in HOW_FIELDS}

    @classmethod
    def ffnjax(cls, **overrides: Any) -> "InferenceOptions":
        """ffnjax's own inference: the defaults, with `overrides`."""
        return cls(**overrides)

    @classmethod
    def google_ffn(cls, **overrides: Any) -> "InferenceOptions":
        """google/ffn's inference (`ffn/inference/inference.py`, `movement.py`,
        `seed.py`) with its FIB-25 settings (`configs/inference_training_sample2.pbtxt`);
        `overrides` win.

        With batch_size 1 (its `--batch_size` default) and the same network,
        `ffnjax.segmentation.segment` then reproduces google/ffn's segmentation
        of the same subvolume: its seeds, the FOV positions it evaluates and
        in which order, and the voxels of every object
        (tests/test_gffn_parity.py; docs/google_ffn_parity.md says what
        differs from ffnjax's defaults and why). Unlike the defaults:

        - probabilities and the normalisation are held as google/ffn's
          float32 proto fields hold them (0.95 as 0.949999988...), so that
          each threshold, made a logit once, is the float32 number google/ffn
          compares with (`overrides` of these fields are rounded the same
          way);
        - min_segment_size 1000 (the FIB-25 request);
        - PolicyPeaks exactly (`peaks_method='google_ffn'`);
        - the disconnected-seed freeze only where the prediction reaches the
          move threshold somewhere (`disco_active_fraction=0`);
        - FOVs are not centred on earlier objects (`skip_segmented`).
        """
        base = dict(image_mean=IMAGE_MEAN, image_stddev=IMAGE_STDDEV, init_activation=0.95,
                    pad_value=0.05, move_threshold=0.9, segment_threshold=0.6,
                    min_segment_size=1000, min_boundary_dist=(1, 1, 1), disconnected_seeds=True,
                    disco_active_fraction=0.0, max_steps=0, seed_policy="peaks",
                    seed_order="zyx", batch_size=1, consensus=False,
                    peaks_method="google_ffn", skip_segmented=True)
        base.update(overrides)
        for name in PROTO_FLOATS:
            base[name] = as_float32(base[name])
        return cls(**base)


MOVE_POLICIES = ("fixed", "max_pred_moves")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant", "exponential")
LOSS_NORMALIZATIONS = ("weight", "voxels")
# google/ffn's default partition thresholds (compute_partitions.py): fraction
# of same-object voxels in the box around a voxel, binned at these values.
DEFAULT_PARTITION_THRESHOLDS = (0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _as_tuple(name: str, value: Any, kind: type) -> tuple:
    """A tuple of `kind` from a tuple/list (or a single value)."""
    if value is None:
        return ()
    if isinstance(value, (str, int, float)):
        value = (value,)
    try:
        return tuple(kind(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a list of {kind.__name__}, got {value!r}") from e


@dataclasses.dataclass(frozen=True)
class TrainConfig(_JsonMixin):
    """Everything one training run needs; `python -m experiments.train` builds one.

    Usage::

        python -m experiments.train --workdir runs/synth --steps 2000
        python -m experiments.train --config train.json --workdir runs/fib25

    where train.json is `TrainConfig(...).to_json()`. With no `images` the run
    trains on a synthetic EM-like volume (`ffnjax.synthetic.make_volume`).
    `TrainConfig.smoke()` is a laptop-sized variant that runs in seconds.
    The defaults are the 'ffnjax' recipe; `TrainConfig.google_ffn()` is
    google/ffn's (`ffnjax.recipes` says where they differ).

    Attributes:
      model: the network and its FOV geometry (a dict is accepted).
      images, labels: volume specs (anything `ffnjax.volumes.open_volume`
        reads), one image per label volume; several pairs train on several
        volumes at once. A spec may end in `@z0:z1,y0:y1,x0:x1` to use a box.
      downsample: z,y,x factors: train at this coarser scale (`ffnjax.scale`:
        images block-averaged, labels and masks subsampled, validation too);
        the checkpoint records them and the segmenters default to them.
      masks: optional specs of exclusion masks (non-zero = excluded), one per
        volume or empty.
      image_means, image_stddevs: per-volume normalisation (x - mean) / std;
        empty means IMAGE_MEAN / IMAGE_STDDEV (google/ffn's 128 / 33) for
        every volume (`normalisation`).
      synthetic_shape, synthetic_seed, synthetic_radius: the synthetic volume
        used when `images` is empty (its median neurite radius in voxels; keep
        it small for small volumes so that they hold many objects).
      steps: total optimiser steps of the run (the schedule decays over them).
      batch_size: global batch (examples per step over all devices); must be a
        multiple of the device count.
      learning_rate, optimizer ('adam' or 'sgd' with `momentum`),
      warmup_steps (linear from 0), then `schedule`: 'cosine' (to lr *
      end_lr_fraction at `steps`), 'constant' or 'exponential' (lr *
      lr_decay_factor ** floor(steps after warmup / lr_decay_steps)),
      clip_value (per-entry clipping to +-clip_value, then) clip_norm
      (global-norm clipping); 0 disables either.
      loss_normalization: the weighted loss sum over the summed 'weight', or
        over all 'voxels' of the evaluated FOVs (google/ffn's reduce_mean).
      ema_decay: > 0 keeps a bias-corrected moving average of the parameters
        (state 'ema', saved; validation and `load_checkpoint` use it).
      seed: seeds parameters, the sampler and the move orders.
      fov_moves: lattice radius of in-example FOV moves (the example crop is
        FOV + 2 * deltas * fov_moves); 0 trains on the centre FOV only.
      move_policy: 'fixed' (centre, then the neighbours in a per-example
        shuffled order) or 'max_pred_moves' (inference's face-max rule).
      max_moves: at most this many FOV moves per example beyond the centre
        (0: no cap, every lattice position the policy takes). A cap makes an
        example cost at most 1 + max_moves FOVs; the random orders still cover
        every direction across examples.
      update_per_fov: one optimiser step per FOV slot, as google/ffn trains
        (the slot's FOVs over the batch form that step's batch; later moves
        see the updated net). False: one step per batch on the summed losses
        of all its FOVs. Both cost the same compute; per-FOV steps segmented
        far better on the demo's recipe (docs/experiments.md). `steps`,
        `warmup_steps` and the schedule count batches either way; with
        fov_moves=0 (one slot) the two are the same.
      move_threshold: a move needs the canvas (or face max) above this.
      seed_prob, pad_prob: the initial mask (probability at the centre voxel
        and everywhere else) and the soft target values (inside / outside).
      partition_thresholds, min_object_size: balanced centre sampling.
      full_crop_margin: centres keep the whole example crop inside the volume
        (False: only the centre FOV; crop voxels outside get weight zero).
      augment: random reflections (and y,x transposition when `transpose_yx`);
        False turns every augmentation off. brightness / contrast: jitter
        amplitudes on the normalised image (0 disables). permute_axes,
        elastic_*, rotation_*, misalign_*, missing_section_prob,
        out_of_focus_*: `ffnjax.augment`'s augmentations, off by default.
      log_every, checkpoint_every, image_every: periods in steps.
      keep_checkpoints: how many checkpoints the manager keeps.
      prefetch: batches prepared ahead by the background input thread.
      distributed: call `jax.distributed.initialize()` (multi-host runs;
        `ffnjax.multihost`, docs/multihost.md).
      input_streams: independent sampler streams the global batch is drawn
        from, each `batch_size / input_streams` examples per step from its own
        seed (`seed`, stream index); 0 means one per process. Processes split
        the streams evenly, so a one-process run with `input_streams=N` sees
        exactly the examples of an N-process run (and can resume it).
      init_from: a workdir whose latest parameters start a fresh run.
      cache_dir: where balanced-sampling partitions are cached ('' = none).
      val_images, val_labels: optional held-out volume pairs; every
        `val_every` steps the loss and mask precision / recall / F1 over the
        same `val_examples` balanced examples (drawn once, no augmentation,
        normalised with the first training volume's mean / std) are logged.
    """

    model: ModelConfig = ModelConfig()
    images: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    masks: tuple[str, ...] = ()
    downsample: tuple[int, int, int] = (1, 1, 1)
    image_means: tuple[float, ...] = ()
    image_stddevs: tuple[float, ...] = ()
    synthetic_shape: tuple[int, int, int] = (64, 128, 128)
    synthetic_seed: int = 0
    synthetic_radius: float = 6.0
    steps: int = 10000
    batch_size: int = 4
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    warmup_steps: int = 100
    end_lr_fraction: float = 0.01
    clip_norm: float = 1.0
    schedule: str = "cosine"
    lr_decay_factor: float = 0.94
    lr_decay_steps: int = 10000
    clip_value: float = 0.0
    loss_normalization: str = "weight"
    ema_decay: float = 0.0
    seed: int = 0
    fov_moves: int = 1
    move_policy: str = "fixed"
    max_moves: int = 0
    update_per_fov: bool = True
    move_threshold: float = 0.9
    seed_prob: float = 0.95
    pad_prob: float = 0.05
    partition_thresholds: tuple[float, ...] = DEFAULT_PARTITION_THRESHOLDS
    min_object_size: int = 100
    full_crop_margin: bool = True
    augment: bool = True
    transpose_yx: bool = True
    brightness: float = 0.0
    contrast: float = 0.0
    permute_axes: bool = False
    elastic_alpha: float = 0.0
    elastic_sigma: float = 8.0
    rotation_degrees: float = 0.0
    rotation_3d: bool = False
    misalign_prob: float = 0.0
    misalign_max: int = 8
    missing_section_prob: float = 0.0
    out_of_focus_prob: float = 0.0
    out_of_focus_sigma: float = 2.0
    log_every: int = 50
    checkpoint_every: int = 1000
    image_every: int = 1000
    keep_checkpoints: int = 3
    prefetch: int = 4
    distributed: bool = False
    input_streams: int = 0
    init_from: str = ""
    cache_dir: str = ""
    val_images: tuple[str, ...] = ()
    val_labels: tuple[str, ...] = ()
    val_every: int = 1000
    val_examples: int = 64

    def __post_init__(self):
        model = self.model
        if isinstance(model, dict):
            model = ModelConfig.from_dict(model)
        if not isinstance(model, ModelConfig):
            raise ValueError(f"model must be a ModelConfig or dict, got {type(model).__name__}")
        object.__setattr__(self, "model", model)
        for name in ("images", "labels", "masks", "val_images", "val_labels"):
            object.__setattr__(self, name, _as_tuple(name, getattr(self, name), str))
        for name in ("image_means", "image_stddevs", "partition_thresholds"):
            object.__setattr__(self, name, _as_tuple(name, getattr(self, name), float))
        object.__setattr__(self, "synthetic_shape", _as_zyx("synthetic_shape", self.synthetic_shape))
        object.__setattr__(self, "downsample", _as_zyx("downsample", self.downsample))
        if len(self.images) != len(self.labels):
            raise ValueError(f"images and labels must pair up: got {len(self.images)} image spec(s) "
                             f"and {len(self.labels)} label spec(s)")
        if len(self.val_images) != len(self.val_labels):
            raise ValueError(f"val_images and val_labels must pair up: got {len(self.val_images)} "
                             f"and {len(self.val_labels)}")
        n = len(self.images)
        for name in ("masks", "image_means", "image_stddevs"):
            if getattr(self, name) and len(getattr(self, name)) != max(n, 1):
                raise ValueError(f"{name} needs one entry per training volume ({max(n, 1)}), "
                                 f"got {len(getattr(self, name))}")
        if any(s <= 0 for s in self.image_stddevs):
            raise ValueError(f"image_stddevs must be positive, got {self.image_stddevs}")
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "image_every",
                     "keep_checkpoints", "prefetch", "val_every", "val_examples", "lr_decay_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("warmup_steps", "fov_moves", "max_moves", "min_object_size", "seed",
                     "synthetic_seed", "misalign_max", "input_streams"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.input_streams and self.batch_size % self.input_streams:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of input_streams "
                             f"{self.input_streams}")
        if float(self.synthetic_radius) <= 0:
            raise ValueError(f"synthetic_radius must be positive, got {self.synthetic_radius}")
        if float(self.learning_rate) <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.move_policy not in MOVE_POLICIES:
            raise ValueError(f"move_policy must be one of {MOVE_POLICIES}, got {self.move_policy!r}")
        for name in ("move_threshold", "seed_prob", "pad_prob"):
            v = float(getattr(self, name))
            if not 0.0 < v < 1.0:
                raise ValueError(f"{name} must be a probability in (0, 1), got {v}")
        if list(self.partition_thresholds) != sorted(self.partition_thresholds) or any(
                not 0.0 < t < 1.0 for t in self.partition_thresholds):
            raise ValueError("partition_thresholds must be increasing values in (0, 1), got "
                             f"{self.partition_thresholds}")
        if self.brightness < 0 or self.contrast < 0 or self.clip_norm < 0:
            raise ValueError("brightness, contrast and clip_norm must be >= 0, got "
                             f"{self.brightness}, {self.contrast}, {self.clip_norm}")
        for name, choices in (("schedule", SCHEDULES), ("loss_normalization", LOSS_NORMALIZATIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("clip_value", "elastic_alpha", "rotation_degrees"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr_decay_factor", "elastic_sigma", "out_of_focus_sigma"):
            if float(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("misalign_prob", "missing_section_prob", "out_of_focus_prob", "ema_decay"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0 or (name == "ema_decay" and v == 1.0):
                raise ValueError(f"{name} must lie in [0, 1] (ema_decay below 1), got {v}")
        if self.permute_axes and len(set(self.crop_size)) != 1:
            raise ValueError(f"permute_axes needs a cubic example crop (isotropic voxels), got "
                             f"crop {self.crop_size}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["model"] = self.model.to_dict()
        return d

    @property
    def crop_size(self) -> tuple[int, int, int]:
        """Example crop z,y,x: FOV + 2 * deltas * fov_moves."""
        return tuple(f + 2 * d * self.fov_moves
                     for f, d in zip(self.model.fov_size, self.model.deltas))  # type: ignore[return-value]

    def normalisation(self, volume: int = 0) -> tuple[float, float]:
        """(mean, stddev) of training volume `volume`: its `image_means` /
        `image_stddevs` entry, IMAGE_MEAN / IMAGE_STDDEV when a list is empty."""
        mean = self.image_means[volume] if self.image_means else IMAGE_MEAN
        stddev = self.image_stddevs[volume] if self.image_stddevs else IMAGE_STDDEV
        return mean, stddev

    @classmethod
    def smoke(cls, **overrides: Any) -> "TrainConfig":
        """A tiny run (depth-1, 4-feature net, 9^3 FOV, small synthetic volume)
        that trains in seconds on a laptop CPU."""
        base = dict(model=ModelConfig(depth=1, features=4, fov_size=(9, 9, 9), deltas=(2, 2, 2)),
                    synthetic_shape=(24, 48, 48), synthetic_radius=3.0, steps=20, batch_size=2,
                    learning_rate=3e-3, warmup_steps=2, log_every=5, checkpoint_every=10,
                    image_every=10, min_object_size=20, prefetch=2)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def ffnjax(cls, **overrides: Any) -> "TrainConfig":
        """ffnjax's own recipe, the defaults (`ffnjax.recipes`); `overrides` win."""
        from ffnjax.recipes import RECIPES
        return cls(**{**RECIPES["ffnjax"], **overrides})

    @classmethod
    def google_ffn(cls, **overrides: Any) -> "TrainConfig":
        """google/ffn's training recipe (`ffnjax.recipes`); `overrides` win (e.g. the data)."""
        from ffnjax.recipes import RECIPES
        return cls(**{**RECIPES["google_ffn"], **overrides})


# TrainConfig fields the compiled device step (the FOV moves, the loss, the
# optimiser and its schedule) depends on; the rest (data, logging,
# checkpoints, augmentation) only matter on the host. tests/test_step.py fails
# when the step reads a field missing here: it would silently take its default.
STEP_FIELDS = ("model", "fov_moves", "move_policy", "max_moves", "update_per_fov", "move_threshold",
               "seed_prob", "pad_prob",
               "steps", "learning_rate", "optimizer", "momentum", "warmup_steps",
               "end_lr_fraction", "clip_norm", "schedule", "lr_decay_factor", "lr_decay_steps",
               "clip_value", "loss_normalization", "ema_decay")


def step_config(config: TrainConfig) -> TrainConfig:
    """`config` with every host-only field at its default (only `STEP_FIELDS`
    kept): the static argument of the compiled step, so runs that differ only
    in data or logging share one compilation."""
    return TrainConfig(**{f: getattr(config, f) for f in STEP_FIELDS})
