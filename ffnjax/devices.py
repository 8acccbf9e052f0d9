"""Use every CPU core: one XLA host device per core, FOV batches split over them.

XLA:CPU runs each 2D convolution of `ffnjax.conv`'s formulations on a single
thread, so one device leaves the other cores idle. With one host device per
core and the batch split across devices by `jax.shard_map`, each core runs its
own share of the batch (measured in benchmarks/forward_bench.py).

Usage (before anything touches a JAX array)::

    from ffnjax import devices
    devices.configure_host_devices()           # n = number of usable cores
    ...
    logits = devices.sharded_forward(apply_fn, params, image_fovs, mask_fovs)

`configure_host_devices` must run before JAX initialises its backends (the
first `jax.devices()`, array creation or jit call); afterwards the device count
is fixed for the life of the process.

(This module was `ffnjax/platform.py`, a name that shadowed the standard
library's `platform`.)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from ffnjax.hostdevices import configure_host_devices, usable_cores  # noqa: F401 (re-exported)

BATCH_AXIS = "batch"


def batch_mesh(devices: Any = None) -> Mesh:
    """A 1D mesh named `BATCH_AXIS` over `devices` (default: all local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("batch_mesh: no devices given")
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def devices_for_batch(batch_size: int, devices: Any) -> list:
    """The most of `devices` (a prefix) that share a batch of `batch_size` evenly:
    gcd(batch_size, len(devices)) of them, e.g. 2 of 2 CPU host devices for a
    batch of 4, 1 for a batch of 3."""
    devices = list(devices)
    return devices[:math.gcd(int(batch_size), len(devices))]


def pad_batch(x: Any, multiple: int) -> tuple[Any, int]:
    """x padded along axis 0 (by repeating its last row) to a multiple of `multiple`.

    Returns:
      (padded array, original batch size). Repeating a real row rather than
      zeros keeps padded rows numerically ordinary (no NaN-prone inputs).
    """
    n = x.shape[0]
    if n < 1:
        raise ValueError("pad_batch: empty batch")
    extra = (-n) % multiple
    if extra == 0:
        return x, n
    tail = jnp.repeat(x[-1:], extra, axis=0)
    return jnp.concatenate([x, tail], axis=0), n


SPLITS = ("batch", "channels")


def shard_batch(apply_fn: Callable, mesh: Mesh) -> Callable:
    """`apply_fn(params, image_fovs, mask_fovs)` as a `jax.shard_map` over
    `mesh`'s `BATCH_AXIS`: params replicated, each device its share of the FOV
    batch (a multiple of the device count). Not jitted, so it can sit inside
    a larger jitted program (the flood fill's while_loop)."""
    return jax.shard_map(apply_fn, mesh=mesh, in_specs=(P(), P(BATCH_AXIS), P(BATCH_AXIS)),
                         out_specs=P(BATCH_AXIS))


@functools.lru_cache(maxsize=32)
def _sharded_apply_cached(apply_fn: Callable, mesh: Mesh, split: str) -> Callable:
    return make_sharded_apply(apply_fn, mesh, split, _cache=False)


def make_sharded_apply(apply_fn: Callable, mesh: Mesh | None = None, split: str = "batch", *,
                       _cache: bool = True) -> Callable:
    """A jitted `f(params, image_fovs, mask_fovs)` that runs `apply_fn` over
    `mesh`'s devices (params replicated).

    Args:
      apply_fn: `apply_fn(params, image_fov, mask_logits_fov) -> logits`, as
        `ffnjax.nets.make_apply_fn` returns.
      mesh: a 1D mesh with axis `BATCH_AXIS`; default `batch_mesh()`.
      split: 'batch': each device runs its share of the FOV batch (the batch
        must be a multiple of the device count; `sharded_forward` pads).
        'channels': every device sees the whole batch and computes its share
        of each convolution's output channels (`ffnjax.conv.channel_parallel`),
        so that even one FOV uses every device; costs one all-gather per
        layer, and only `ffnjax.conv.conv3d` layers are split.

    Raises:
      ValueError: on an unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    mesh = batch_mesh() if mesh is None else mesh
    if _cache:
        try:
            return _sharded_apply_cached(apply_fn, mesh, split)
        except TypeError:  # unhashable apply_fn: build a fresh one
            pass
    if split == "batch":
        return jax.jit(shard_batch(apply_fn, mesh))
    from ffnjax import conv  # local: keeps this module importable before jax config

    def channel_body(p, img, msk):
        with conv.channel_parallel(BATCH_AXIS, mesh.devices.size):
            return apply_fn(p, img, msk)

    body = jax.shard_map(channel_body, mesh=mesh, in_specs=(P(), P(), P()), out_specs=P(),
                         check_vma=False)
    return jax.jit(body)


def _jitted(apply_fn: Callable) -> Callable:
    try:
        return _jit_cached(apply_fn)
    except TypeError:  # unhashable apply_fn
        return jax.jit(apply_fn)


@functools.lru_cache(maxsize=32)
def _jit_cached(apply_fn: Callable) -> Callable:
    return jax.jit(apply_fn)


def sharded_forward(apply_fn: Callable, params: Any, image_fovs: Any, mask_fovs: Any,
                    mesh: Mesh | None = None, split: str = "auto") -> jax.Array:
    """`apply_fn(params, image_fovs, mask_fovs)` spread over all devices.

    With split 'batch' it pads the batch to a multiple of the device count,
    runs each device's share on that device (one core each after
    `configure_host_devices`), and drops the padding. With 'channels' every
    device computes a share of each layer's output channels (see
    `make_sharded_apply`), so one FOV uses every core; it synchronises the
    devices once per layer, and on a loaded machine it measured slower than
    one device (benchmarks/README.md), so it is opt-in. 'none' runs the
    jitted `apply_fn` on the default device. 'auto' splits the batch when it
    has at least one FOV per device and is 'none' otherwise. With one device
    every split is just the jitted `apply_fn`.

    Args:
      apply_fn: `apply_fn(params, image_fov, mask_logits_fov) -> logits`.
      params: the network parameters (replicated to every device).
      image_fovs, mask_fovs: N,z,y,x,C batches.
      mesh: default `batch_mesh()` over all local devices.
      split: 'auto', 'batch', 'channels' or 'none'.

    Returns:
      The logits, N,z,y,x,1, equal to `apply_fn(params, image_fovs, mask_fovs)`.

    Raises:
      ValueError: when the two batches differ in size, or on an unknown split.
    """
    if image_fovs.shape[0] != mask_fovs.shape[0]:
        raise ValueError(f"sharded_forward: image batch {image_fovs.shape} and mask batch "
                         f"{mask_fovs.shape} differ in size")
    mesh = batch_mesh() if mesh is None else mesh
    k = mesh.devices.size
    if split == "auto":
        split = "batch" if image_fovs.shape[0] >= k else "none"
    if split == "none" or k == 1:
        return _jitted(apply_fn)(params, jnp.asarray(image_fovs), jnp.asarray(mask_fovs))
    if split == "channels":
        return make_sharded_apply(apply_fn, mesh, "channels")(
            params, jnp.asarray(image_fovs), jnp.asarray(mask_fovs))
    image_fovs, n = pad_batch(jnp.asarray(image_fovs), k)
    mask_fovs, _ = pad_batch(jnp.asarray(mask_fovs), k)
    out = make_sharded_apply(apply_fn, mesh)(params, image_fovs, mask_fovs)
    return out[:n]
