"""Training input on the host: volumes in memory, the balanced sampler of each
host, the validation batch, and the background prefetch thread.

Everything here fails early with a message naming the volume spec at fault
(before any compilation), so a bad `--image` / `--labels` costs seconds.
Volume specs use `ffnjax.volumes.read_spec`'s grammar (``@z0:z1,y0:y1,x0:x1``
boxes, ``A+B`` stacking along z).
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import threading
import time

import numpy as np

from ffnjax import multihost, scale
from ffnjax.augment import AugmentOptions
from ffnjax.config import IMAGE_MEAN, IMAGE_STDDEV, TrainConfig
from ffnjax.examples import BalancedSampler, TrainingVolume
from ffnjax.synthetic import SyntheticConfig, make_volume
from ffnjax.volumes import read_spec, require_finite

__all__ = ["load_training_volumes", "load_volume_pair", "load_validation_batch", "make_sampler",
           "stream_count", "StreamSampler", "process_sampler", "restore_streams", "Prefetcher",
           "sampler_states"]


# ----------------------------------------------------------------------------
# Volumes
# ----------------------------------------------------------------------------

def load_training_volumes(config: TrainConfig) -> list[TrainingVolume]:
    """The training volumes of `config` in memory (the synthetic one when
    `config.images` is empty). Fails, naming the spec, on unreadable specs,
    image/label shape mismatches, non-3-D arrays and empty labels."""
    if not config.images:
        image, labels = make_volume(config.synthetic_shape, seed=config.synthetic_seed,
                                    config=SyntheticConfig(mean_radius=config.synthetic_radius))
        mask = read_spec(config.masks[0]).astype(bool) if config.masks else None
        f = config.downsample
        return [TrainingVolume(
            scale.downsample_image(np.asarray(image), f), scale.downsample_labels(np.asarray(labels), f),
            *config.normalisation(0), None if mask is None else scale.downsample_labels(mask, f),
            name=f"synthetic{tuple(config.synthetic_shape)}")]
    masks = config.masks or (None,) * len(config.images)
    return [load_volume_pair(i, l, *config.normalisation(k), masks[k], downsample=config.downsample)
            for k, (i, l) in enumerate(zip(config.images, config.labels))]


def load_volume_pair(ispec: str, lspec: str, mean: float = IMAGE_MEAN,
                     stddev: float = IMAGE_STDDEV, mask_spec: str | None = None,
                     downsample: tuple[int, int, int] = (1, 1, 1)) -> TrainingVolume:
    """One image / labels (/ mask) spec pair as a TrainingVolume, with checks
    that name the spec at fault (an image holding NaN or infinity is refused,
    naming its first such box); reduced by `downsample` (`ffnjax.scale`)
    after the checks, so shapes are compared on the native grid."""
    image = require_finite(read_spec(ispec), f"image {ispec!r}")
    labels = read_spec(lspec)
    if image.ndim == 4 and image.shape[-1] == 1:
        image = image[..., 0]
    if labels.ndim == 4 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels {lspec!r} must hold integer object ids, got dtype {labels.dtype}")
    if image.shape != labels.shape:
        raise ValueError(f"image {ispec!r} has shape {image.shape} but labels {lspec!r} have "
                         f"shape {labels.shape}; they must match (use SPEC@z0:z1,y0:y1,x0:x1 "
                         "to cut a box)")
    if not labels.any():
        raise ValueError(f"labels {lspec!r} are empty (every voxel is 0)")
    mask = read_spec(mask_spec).astype(bool) if mask_spec else None
    if not scale.is_identity(downsample):
        image = scale.downsample_image(image, downsample)
        labels = scale.downsample_labels(labels, downsample)
        mask = None if mask is None else scale.downsample_labels(mask, downsample)
    return TrainingVolume(image, labels, mean, stddev, mask, name=f"{ispec} / {lspec}")


# ----------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------

def make_sampler(config: TrainConfig, volumes: list[TrainingVolume],
                 process_index: int = 0) -> BalancedSampler:
    """The balanced sampler of this host (its own seed stream per process)."""
    m = config.model
    crop = config.crop_size
    if any(c > n for v in volumes for c, n in zip(crop if config.full_crop_margin else m.fov_size,
                                                   v.labels.shape)):
        shapes = [v.labels.shape for v in volumes]
        raise ValueError(f"example crop {crop} (FOV {m.fov_size} + 2 * deltas {m.deltas} * "
                         f"fov_moves {config.fov_moves}) does not fit the training volume(s) {shapes}")
    margin = tuple(c // 2 for c in crop) if config.full_crop_margin else m.fov_radius
    radius = tuple(r + d for r, d in zip(m.fov_radius, m.deltas))
    return BalancedSampler(
        volumes, crop, radius, margin, config.partition_thresholds, config.min_object_size,
        seed=np.random.SeedSequence([config.seed, process_index]), augment=config.augment,
        transpose_yx=config.transpose_yx, brightness=config.brightness, contrast=config.contrast,
        seed_prob=config.seed_prob, pad_prob=config.pad_prob, cache_dir=config.cache_dir or None,
        extra=AugmentOptions.of(config))


def load_validation_batch(config: TrainConfig) -> dict[str, np.ndarray] | None:
    """`config.val_examples` balanced, unaugmented examples of the validation
    volumes (a fixed seed: the same examples at every evaluation), or None."""
    if not config.val_images:
        return None
    mean, std = config.normalisation(0)
    vols = [load_volume_pair(i, l, mean, std, downsample=config.downsample)
            for i, l in zip(config.val_images, config.val_labels)]
    # Centres need only their centre FOV inside (a thin held-out slab keeps
    # enough centres); crop voxels outside the volume carry no loss.
    val_config = dataclasses.replace(config, augment=False, brightness=0.0, contrast=0.0,
                                     seed=config.seed + 7919, cache_dir="", full_crop_margin=False)
    return make_sampler(val_config, vols).batch(config.val_examples)


def stream_count(config: TrainConfig, process_count: int = 1) -> int:
    """The sampler streams the global batch is drawn from: `config.input_streams`,
    or one per process when it is 0.

    Raises:
      ValueError: naming input_streams when it is not a multiple of the
        process count, or batch_size when the streams cannot share it evenly.
    """
    n = config.input_streams or process_count
    if n % process_count:
        raise ValueError(f"input_streams {n} must be a multiple of the process count "
                         f"{process_count}")
    if config.batch_size % n:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of the "
                         f"{n} input stream(s) (one per process unless --input-streams)")
    return n


class StreamSampler:
    """Several sampler streams drawn by one process: a batch of n is n/k
    examples from each of the k streams, stacked in stream order. The streams
    share `base`'s volumes and partitions; each has its own generator.

    `get_state` / `set_state` take the list of the streams' states.
    """

    def __init__(self, base: BalancedSampler, seeds: list[np.random.SeedSequence]):
        self.streams = []
        for seed in seeds:
            stream = copy.copy(base)
            stream.rng = np.random.Generator(np.random.PCG64(seed))
            self.streams.append(stream)

    def batch(self, n: int) -> dict[str, np.ndarray]:
        k = len(self.streams)
        if n % k:
            raise ValueError(f"a batch of {n} cannot be split evenly over {k} input streams")
        parts = [stream.batch(n // k) for stream in self.streams]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def get_state(self) -> list[dict]:
        return [stream.get_state() for stream in self.streams]

    def set_state(self, states: list[dict]) -> None:
        for stream, state in zip(self.streams, states, strict=True):
            stream.set_state(state)


def process_sampler(config: TrainConfig, volumes: list[TrainingVolume], process_index: int = 0,
                    process_count: int = 1) -> BalancedSampler | StreamSampler:
    """This process's share of the run's sampler streams (`stream_count`).

    Stream s is seeded by (config.seed, s) and process p draws streams
    p*k .. p*k + k - 1 (k = streams / processes), so the global batch, read in
    process order, is the same whatever the number of processes. With one
    stream per process (the default) this is `make_sampler(config, volumes,
    process_index)` itself, the stream every single-process run has drawn.
    """
    k = stream_count(config, process_count) // process_count
    first = process_index * k
    base = make_sampler(config, volumes, first)
    if k == 1:
        return base
    return StreamSampler(base, [np.random.SeedSequence([config.seed, first + j]) for j in range(k)])


def sampler_states(state: dict | list[dict]) -> list[dict]:
    """Every stream's sampler state (gathered when there are several hosts), in
    stream order: what a checkpoint's meta saves as 'sampler_states'.

    Args:
      state: this process's state: one stream's dict, or a `StreamSampler`'s list.

    Collective when there are several processes (every process calls it).
    """
    mine = state if isinstance(state, list) else [state]
    return [s for process in multihost.allgather_json(mine) for s in process]


def restore_streams(sampler: BalancedSampler | StreamSampler, saved: list[dict],
                    process_index: int = 0, process_count: int = 1) -> None:
    """Sets `sampler` (this process's, from `process_sampler`) to its streams'
    states in a checkpoint's 'sampler_states'.

    Raises:
      ValueError: when the checkpoint holds another number of streams than
        this run draws, naming both and the --input-streams that resumes it.
    """
    mine = sampler.get_state()
    k = len(mine) if isinstance(mine, list) else 1
    if len(saved) != k * process_count:
        raise ValueError(
            f"the checkpoint holds {len(saved)} sampler stream(s) but this run draws "
            f"{k * process_count} ({process_count} process(es) x {k}); to continue the same "
            f"sample stream give --input-streams {len(saved)} (a multiple of the process count)")
    part = saved[process_index * k:(process_index + 1) * k]
    sampler.set_state(part if isinstance(mine, list) else part[0])


# ----------------------------------------------------------------------------
# Prefetching
# ----------------------------------------------------------------------------

class Prefetcher:
    """A background thread preparing the next batches while the device works.

    Each item is (batch, sampler state after drawing it): the state saved with
    a checkpoint taken after that batch's step, so a resumed run draws exactly
    the next batch of the uninterrupted stream.
    """

    def __init__(self, sampler: BalancedSampler, batch_size: int, depth: int):
        self._sampler, self._n = sampler, batch_size
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ffnjax-prefetch", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                item = (self._sampler.batch(self._n), self._sampler.get_state())
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer
            self._error = e

    def get(self) -> tuple[dict[str, np.ndarray], dict, float]:
        """(batch, sampler state, seconds waited)."""
        t0 = time.perf_counter()
        while True:
            if self._error is not None:
                raise RuntimeError("input pipeline failed") from self._error
            try:
                batch, state = self._q.get(timeout=0.1)
                return batch, state, time.perf_counter() - t0
            except queue.Empty:
                continue

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
