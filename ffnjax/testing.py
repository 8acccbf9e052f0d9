"""An oracle network for tests and for checking inference without training.

The oracle is fed the ground-truth *label volume as its image* (with
normalisation mean 0, std 1, so labels pass through unchanged; exact in float32
below 2**24). It answers logit(0.95) wherever the FOV's label equals the label
at the FOV centre (and is non-zero) and logit(0.05) elsewhere, ignoring the
mask it is given, minus a small dip towards the FOV edges (`centre_bias`) that
breaks face-maximum ties the way a trained net's smooth output does. A flood fill driven by it must therefore recover each
ground-truth object exactly, as far as FOV moves can reach.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ffnjax.config import InferenceOptions, logit

ORACLE_OPTIONS = dict(image_mean=0.0, image_stddev=1.0)


def oracle_apply_fn(params: Any, image_fov: jax.Array, mask_logits_fov: jax.Array) -> jax.Array:
    """apply_fn(params, image_fov, mask_logits_fov) -> logits for N,z,y,x,1 label FOVs."""
    del params, mask_logits_fov
    n, z, y, x, _ = image_fov.shape
    centre = image_fov[:, z // 2, y // 2, x // 2, :][:, None, None, None, :]
    inside = (image_fov == centre) & (centre != 0)
    logits = jnp.where(inside, jnp.float32(logit(0.95)), jnp.float32(logit(0.05)))
    return logits - centre_bias((z, y, x))[None, :, :, :, None]


def centre_bias(fov_size: tuple[int, int, int], scale: float = 0.5) -> jax.Array:
    """`scale` times the squared distance from the FOV centre, normalised so
    that the FOV corners get exactly `scale` (z,y,x radii count equally).

    A perfectly flat oracle makes every voxel of a face a tie, and the face
    maximum (argmax: the first voxel) is then a face corner, so every move
    drifts towards the low corner and objects come out in pieces. This small
    dip breaks the ties towards the face centre, as a trained net's smooth
    output does; 0.5 keeps inside logits (2.94 - 0.5) above logit(0.9) = 2.20.
    """
    axes = [(jnp.arange(s, dtype=jnp.float32) - s // 2) / max(s // 2, 1) for s in fov_size]
    d2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    return jnp.float32(scale / 3.0) * d2


def oracle_options(**overrides: Any) -> InferenceOptions:
    """InferenceOptions that pass label values to the oracle unchanged."""
    return InferenceOptions(**{**ORACLE_OPTIONS, **overrides})
