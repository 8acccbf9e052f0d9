"""The network over every local device for one call: batch split (padded) or channel split.

Used by `benchmarks/forward_bench.py` to time the forward pass on D host
devices, and by `tests/test_conv.py` to check that both splits equal the
plain forward pass. ffnjax itself splits a fill's FOV batches with
`ffnjax.devices.shard_batch` inside its `while_loop`, which needs neither the
padding nor the per-call cache here.

Usage::

    from benchmarks.sharded_forward import sharded_forward
    logits = sharded_forward(apply_fn, params, image_fovs, mask_fovs)  # N,z,y,x,1
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from ffnjax import conv
from ffnjax.devices import BATCH_AXIS, batch_mesh, shard_batch


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
