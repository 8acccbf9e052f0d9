"""One FOV's forward pass split over the CPU host devices by z slabs.

google/ffn's exact algorithm evaluates one FOV at a time (`batch_size` 1),
and XLA:CPU runs each 2D convolution of `ffnjax.conv`'s `depth_split` on one
thread, so a batch-1 fill on one host device leaves the other cores idle.
Here every device owns a slab of ceil(z / D) z slices of the FOV (the last
slab padded with zero slices), and each 3x3x3 convolution first trades one
halo slice with each neighbouring slab (`lax.ppermute` inside
`jax.shard_map`; `ffnjax.conv.depth_parallel`); pointwise layers need
nothing. The result equals the one-device forward pass within float
rounding (tests/test_fovsplit.py, on 2 and 4 devices and inside a fill).

Usage::

    mesh = z_mesh(jax.local_devices()[:2])
    net = split_apply(apply_fn, mesh)       # same signature as apply_fn
    logits = jax.jit(net)(params, image_fovs, mask_fovs)

A fill uses it by itself (`ffnjax.flood.fill_mesh`) when
`InferenceOptions.fov_split` resolves to more than one device
(`split_devices`): with 'auto', for a batch-1 fill of the convstack on a CPU
with several host devices whose convolutions are large enough that the
halo exchange pays (`AUTO_MIN_LAYER_FLOPS`, measured in
docs/performance.md). Only the convstack is split (`splittable`): an
arbitrary network may mix z slices in ways no halo covers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from ffnjax import conv
from ffnjax.config import InferenceOptions, ModelConfig
from ffnjax.nets import ConvStack3D

Z_AXIS = "z"

# 'auto' splits when one 3x3x3 convolution (F -> F channels) of a FOV costs at
# least this many FLOPs: below it the per-layer halo exchange and device
# synchronisation eat the gain. Measured on 2 cores (docs/performance.md, "One
# FOV over the cores"): 0.12 GFLOP per convolution ran 0.77x as fast split,
# 0.27 GFLOP 1.42x, google/ffn's 2.0 GFLOP 1.75x.
AUTO_MIN_LAYER_FLOPS = 200e6


def layer_flops(config: ModelConfig) -> float:
    """FLOPs of one hidden 3x3x3 convolution over one FOV (2 per multiply-add)."""
    return 2.0 * 27 * config.features ** 2 * float(np.prod(config.fov_size))


def splittable(apply_fn: Callable) -> bool:
    """True for the convstack's own `apply` (`ffnjax.nets.make_apply_fn`), whose
    every z-mixing layer is an `ffnjax.conv.conv3d`."""
    return isinstance(getattr(apply_fn, "__self__", None), ConvStack3D)


def split_devices(model_config: ModelConfig, options: InferenceOptions,
                  devices: Sequence[Any] | None = None, backend: str | None = None) -> int:
    """How many devices each FOV's forward pass is split over (1: not split).

    Args:
      model_config: the network (its size decides 'auto').
      options: `fov_split` ('auto', 'on', 'off') and `batch_size` (only batch
        1 is split: larger batches are split by FOV, `ffnjax.devices`).
      devices: the local devices (default `jax.local_devices()`).
      backend: default `jax.default_backend()`; only 'cpu' is split.

    Returns:
      The device count: all local devices, at most one per z slice of the FOV
      when 'on' or when 'auto' finds the net large enough; else 1.
    """
    if options.fov_split == "off" or options.batch_size != 1:
        return 1
    if options.fov_split == "auto" and layer_flops(model_config) < AUTO_MIN_LAYER_FLOPS:
        return 1
    if (backend or jax.default_backend()) != "cpu":
        return 1
    n = len(jax.local_devices() if devices is None else devices)
    return max(min(n, model_config.fov_size[0]), 1)


def z_mesh(devices: Sequence[Any]) -> Mesh:
    """A 1D mesh named `Z_AXIS` over `devices`: slab i on devices[i]."""
    devices = list(devices)
    if not devices:
        raise ValueError("z_mesh: no devices given")
    return Mesh(np.asarray(devices), (Z_AXIS,))


def split_apply(apply_fn: Callable, mesh: Mesh) -> Callable:
    """`apply_fn(params, image_fovs, mask_fovs)` with every FOV's z axis split
    over `mesh` (from `z_mesh`): params replicated, the N,z,y,x,C inputs
    padded with zero slices to a multiple of the device count and cut into
    slabs, the logits put back together and cropped. Not jitted, so it can
    sit inside a larger jitted program (the fill's while_loop).

    `apply_fn` must mix z slices only through `ffnjax.conv.conv3d`
    (`splittable`); anything else would see its slab alone.
    """
    size = int(mesh.devices.size)

    def apply(params, image_fovs, mask_fovs):
        z = image_fovs.shape[1]
        zl = -(-z // size)
        pad = [(0, 0), (0, zl * size - z)] + [(0, 0)] * (image_fovs.ndim - 2)

        def body(p, img, msk):
            with conv.depth_parallel(Z_AXIS, size, z):
                return apply_fn(p, img, msk)

        run = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(None, Z_AXIS), P(None, Z_AXIS)),
                            out_specs=P(None, Z_AXIS))
        out = run(params, jnp.pad(image_fovs, pad), jnp.pad(mask_fovs, pad))
        return out[:, :z]

    return apply
