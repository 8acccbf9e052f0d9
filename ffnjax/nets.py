"""The FFN convstack (google/ffn `convstack_3d`) as a pure-functional linen module.

Layout: arrays are N,z,y,x,C. The network sees two channels, the normalised
image and the current object-mask logits (the "POM"), and returns logits of the
FOV's size that are the input logits plus a learned update (FFN's additive
output).

Parameter tree (matches google/ffn's variable names so its TensorFlow weights
load one to one; kernels are z,y,x,in,out)::

    conv0_a/{kernel,bias}   3x3x3, 2 -> F, ReLU
    conv0_b/{kernel,bias}   3x3x3, F -> F
    conv{i}_a, conv{i}_b    i = 1 .. depth-1: x + conv_b(relu(conv_a(relu(x))))
    conv_lom/{kernel,bias}  1x1x1, F -> 1 after a final ReLU
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ffnjax import conv as conv_lib
from ffnjax.config import ModelConfig

Array = jax.Array


def normalize_image(image: Any, mean: float, stddev: float) -> Array:
    """The one image normalisation used by training and inference: (x - mean) / std, float32."""
    return (jnp.asarray(image, jnp.float32) - jnp.float32(mean)) / jnp.float32(stddev)


def conv3d(x: Array, kernel: Array, impl: str = "auto") -> Array:
    """SAME 3D convolution of x (N,z,y,x,Cin) with kernel (kz,ky,kx,Cin,Cout).

    `impl` selects the formulation (`ffnjax.conv.IMPLS`); every formulation
    equals `lax.conv` within float tolerance (tests/test_conv.py checks values
    and gradients). 'auto' picks the fastest one for the default backend: a
    depth-folded 2D formulation on CPU, the native convolution on GPU/TPU.
    """
    return conv_lib.conv3d(x, kernel, impl)


class Conv3D(nn.Module):
    """A biased SAME convolution with google/ffn's parameter names (kernel, bias)."""

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        # He initialisation from a truncated normal (init_params draws the same in NumPy).
        kernel = self.param("kernel", nn.initializers.variance_scaling(
            2.0, "fan_in", "truncated_normal"),
            (*self.kernel_size, in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = conv3d(x.astype(self.dtype), kernel.astype(self.dtype), self.impl)
        return y + bias.astype(self.dtype)


class ConvStack3D(nn.Module):
    """google/ffn's residual convstack with an additive mask-logit output.

    Usage::

        net = ConvStack3D(ModelConfig())
        params = net.init(rng, image_fov, mask_logits_fov)
        logits = net.apply(params, image_fov, mask_logits_fov)   # N,z,y,x,1

    `image_fov` is float and already normalised (`normalize_image`).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, image_fov: Array, mask_logits_fov: Array) -> Array:
        cfg = self.config
        dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
        conv = lambda name, f=cfg.features, k=(3, 3, 3): Conv3D(  # noqa: E731
            f, k, dtype=dtype, impl=cfg.conv_impl, name=name)
        # Channel order as in google/ffn: image first, then the mask logits.
        x = jnp.concatenate([image_fov, mask_logits_fov], axis=-1).astype(dtype)
        x = nn.relu(conv("conv0_a")(x))
        x = conv("conv0_b")(x)
        for i in range(1, cfg.depth):
            skip = x
            x = nn.relu(conv(f"conv{i}_a")(nn.relu(x)))
            x = conv(f"conv{i}_b")(x) + skip
        update = conv("conv_lom", 1, (1, 1, 1))(nn.relu(x))
        # Additive output: the net predicts a change to the input logits.
        return mask_logits_fov.astype(jnp.float32) + update.astype(jnp.float32)


def _layers(config: ModelConfig) -> list[tuple[int, int, int]]:
    """(kernel volume, in channels, out channels) of every convolution."""
    f = config.features
    layers = [(27, 2, f), (27, f, f)]
    layers += [(27, f, f)] * (2 * (config.depth - 1))
    layers.append((1, f, 1))
    return layers


def param_count(config: ModelConfig) -> int:
    """Number of parameters (kernels and biases); 638,433 for depth 12, 32 features."""
    return sum(k * cin * cout + cout for k, cin, cout in _layers(config))


def forward_flops(config: ModelConfig, batch: int = 1) -> int:
    """FLOPs of one forward pass over `batch` FOVs: 2 per multiply-add of every
    convolution (SAME padding counted as full), plus the bias adds, ReLUs,
    residual adds and the additive output (one each per output voxel)."""
    voxels = math.prod(config.fov_size)
    conv = sum(2 * k * cin * cout for k, cin, cout in _layers(config))
    f = config.features
    elementwise = (
        sum(cout for _, _, cout in _layers(config))   # bias adds
        + f * (2 + 2 * (config.depth - 1))            # ReLUs
        + f * (config.depth - 1)                      # residual adds
        + 1)                                          # additive output
    return batch * voxels * (conv + elementwise)


def init_params(config: ModelConfig, rng: Array | int = 0) -> Any:
    """Initial parameters for `config` (float32), from an int seed or a PRNG key.

    Kernels are drawn from a truncated normal (+-2 std) with He scaling
    sqrt(2 / fan_in), biases are zero: the distribution `Conv3D`'s own
    initialisers use. The draw happens in NumPy on the host because XLA:CPU
    spends seconds compiling each jax.random call (about 3 s per kernel shape),
    which would dominate every short run and test. Deterministic in `rng`.
    """
    zeros = jax.ShapeDtypeStruct((1, *config.fov_size, 1), jnp.float32)
    if isinstance(rng, jax.core.Tracer):  # under jit: linen's own (same-distribution) init
        z = jnp.zeros(zeros.shape, zeros.dtype)
        return ConvStack3D(config).init(rng, z, z)
    if isinstance(rng, (int, np.integer)):
        entropy = [int(rng)]
    else:
        data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
        entropy = [int(v) for v in np.asarray(data, np.uint32).ravel()]
    gen = np.random.default_rng(entropy)
    shapes = jax.eval_shape(lambda a, b: ConvStack3D(config).init(jax.random.PRNGKey(0), a, b),
                            zeros, zeros)

    def draw(path, leaf):
        name = getattr(path[-1], "key", None)
        if name == "bias":
            return jnp.zeros(leaf.shape, jnp.float32)
        fan_in = math.prod(leaf.shape[:-1])
        std = math.sqrt(2.0 / fan_in) / 0.87962566  # std of a N(0,1) truncated at +-2
        values = gen.standard_normal(leaf.shape)
        bad = np.abs(values) > 2.0
        while bad.any():  # resample outside +-2, as a truncated normal does
            values[bad] = gen.standard_normal(int(bad.sum()))
            bad = np.abs(values) > 2.0
        return jnp.asarray(values * std, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def make_apply_fn(config: ModelConfig):
    """`apply_fn(params, image_fov, mask_logits_fov) -> logits` for the convstack:
    the signature flood fill and training take, so any other net (an oracle in
    tests) can stand in for it."""
    net = ConvStack3D(config)
    return net.apply


def fov_shape(config: ModelConfig, batch: int = 1) -> tuple[int, ...]:
    """N,z,y,x,1 shape the network expects."""
    return (batch, *config.fov_size, 1)
