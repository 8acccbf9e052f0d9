"""An oracle network for tests and for checking inference without training.

The oracle is fed the ground-truth *label volume as its image* (with
normalisation mean 0, std 1, so labels pass through unchanged; exact in float32
below 2**24). It answers logit(0.95) wherever the FOV's label equals the label
at the FOV centre (and is non-zero) and logit(0.05) elsewhere, ignoring the
mask it is given. A flood fill driven by it must therefore recover each
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
    return jnp.where(inside, jnp.float32(logit(0.95)), jnp.float32(logit(0.05)))


def oracle_options(**overrides: Any) -> InferenceOptions:
    """InferenceOptions that pass label values to the oracle unchanged."""
    return InferenceOptions(**{**ORACLE_OPTIONS, **overrides})
