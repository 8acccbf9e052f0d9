"""The devices a batch is split over: a 1D mesh and the network as a shard_map on it.

XLA:CPU runs each 2D convolution of `ffnjax.conv`'s formulations on a single
thread, so one device leaves the other cores idle. `ffnjax.hostdevices` gives
XLA one host device per core before JAX starts (at `import ffnjax`); this
module, which needs JAX, spreads work over those devices:

    devices = devices_for_batch(batch_size, jax.local_devices())  # gcd(batch, n) of them
    mesh = batch_mesh(devices)                                    # 1D, axis BATCH_AXIS
    net = shard_batch(apply_fn, mesh)    # each device its share of the FOV batch

Training builds its data-parallel mesh from `devices_for_batch`
(`ffnjax.train_loop`); a batched flood fill calls `shard_batch`'s network
inside its `while_loop` (`ffnjax.flood.fill_mesh`). The two halves stay in two
modules because `ffnjax.hostdevices` must not import JAX: `import ffnjax`
runs it, and stays free of the seconds a JAX import costs until JAX is used.
A forward pass over all devices with padding and a channel split, used by
benchmarks and tests only, is `benchmarks/sharded_forward.py`.

(This module was `ffnjax/platform.py`, a name that shadowed the standard
library's `platform`.)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

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


def shard_batch(apply_fn: Callable, mesh: Mesh) -> Callable:
    """`apply_fn(params, image_fovs, mask_fovs)` as a `jax.shard_map` over
    `mesh`'s `BATCH_AXIS`: params replicated, each device its share of the FOV
    batch (a multiple of the device count). Not jitted, so it can sit inside
    a larger jitted program (the flood fill's while_loop)."""
    return jax.shard_map(apply_fn, mesh=mesh, in_specs=(P(), P(BATCH_AXIS), P(BATCH_AXIS)),
                         out_specs=P(BATCH_AXIS))
