"""The FFN convstack: shapes, google/ffn's variable layout, the additive
output, parameter and FLOP counts checked against independent counts,
jit/grad, and bfloat16 compute. Nets are tiny so this file runs in seconds."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffnjax import ModelConfig, nets

TINY = ModelConfig(depth=2, features=4, fov_size=(9, 9, 9), deltas=(2, 2, 2))
ODD = ModelConfig(depth=3, features=8, fov_size=(7, 9, 11), deltas=(2, 2, 2))


# Everything below runs under jit (eager flax application compiles every
# primitive separately), and most tests draw parameters with NumPy from the
# tree's shapes: compiling `init_params` (threefry random numbers) takes
# several seconds on XLA:CPU, so only test_init_params pays for it.
@functools.lru_cache(maxsize=None)
def _params(cfg: ModelConfig, seed: int = 0):
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if len(leaf.shape) == 5:  # kernel z,y,x,in,out: He-scaled
            fan_in = math.prod(leaf.shape[:4])
            return jnp.asarray(rng.normal(0, math.sqrt(2.0 / fan_in), leaf.shape), jnp.float32)
        return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)  # non-zero biases

    return jax.tree_util.tree_map(draw, _shapes(cfg))


@functools.lru_cache(maxsize=None)
def _apply(cfg: ModelConfig):
    return jax.jit(nets.make_apply_fn(cfg))


def _shapes(cfg: ModelConfig):
    """The parameter tree's shapes without computing anything (jax.eval_shape)."""
    return jax.eval_shape(functools.partial(nets.init_params, cfg), jax.random.PRNGKey(0))


def _inputs(cfg: ModelConfig, batch: int = 2, seed: int = 0):
    """A normalised-looking image and mask logits, N,z,y,x,1 (NumPy random:
    jax.random would compile threefry for every new shape)."""
    rng = np.random.default_rng(seed)
    shape = nets.fov_shape(cfg, batch)
    return (jnp.asarray(rng.standard_normal(shape), jnp.float32),
            jnp.asarray(2.0 * rng.standard_normal(shape), jnp.float32))


def _leaves(params) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path):
            v if isinstance(v, jax.ShapeDtypeStruct) else np.asarray(v) for path, v in flat}


def test_init_params():
    params = jax.jit(nets.init_params, static_argnums=0)(TINY, jax.random.PRNGKey(0))
    leaves = _leaves(params)
    assert {k: v.shape for k, v in leaves.items()} == {k: v.shape for k, v in _leaves(_shapes(TINY)).items()}
    for name, v in leaves.items():
        assert v.dtype == np.float32 and np.all(np.isfinite(v))
        if name.endswith("bias"):
            assert not v.any()
        else:
            fan_in = math.prod(v.shape[:4])
            assert 0.5 < v.std() * math.sqrt(fan_in / 2.0) < 1.5  # He-like scale


@pytest.mark.parametrize("cfg", [TINY, ODD], ids=["tiny", "anisotropic"])
def test_output_shape_equals_fov(cfg):
    params = _params(cfg)
    image, mask = _inputs(cfg, batch=3)
    out = _apply(cfg)(params, image, mask)
    assert out.shape == (3, *cfg.fov_size, 1) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))


def test_variable_layout_matches_google_ffn():
    cfg = ModelConfig(depth=4, features=6, fov_size=(5, 5, 5), deltas=(1, 1, 1))
    leaves = _leaves(_shapes(cfg))
    expected = {"params/conv0_a/kernel": (3, 3, 3, 2, 6), "params/conv0_b/kernel": (3, 3, 3, 6, 6),
                "params/conv_lom/kernel": (1, 1, 1, 6, 1), "params/conv_lom/bias": (1,)}
    for i in range(1, 4):
        for s in "ab":
            expected[f"params/conv{i}_{s}/kernel"] = (3, 3, 3, 6, 6)
            expected[f"params/conv{i}_{s}/bias"] = (6,)
    expected["params/conv0_a/bias"] = expected["params/conv0_b/bias"] = (6,)
    assert {k: v.shape for k, v in leaves.items()} == expected
    assert all(v.dtype == np.float32 for v in leaves.values())


def test_param_count_published_model():
    # The count does not depend on the FOV, so a small FOV keeps init cheap.
    cfg = ModelConfig(depth=12, features=32, fov_size=(5, 5, 5), deltas=(2, 2, 2))
    assert nets.param_count(cfg) == 638_433
    assert sum(math.prod(v.shape) for v in _leaves(_shapes(cfg)).values()) == 638_433
    assert nets.param_count(ModelConfig(depth=12, fov_size=(33, 33, 33), deltas=(8, 8, 8))) == 638_433


@pytest.mark.parametrize("cfg", [TINY, ODD, ModelConfig()], ids=["tiny", "odd", "default"])
def test_param_count_equals_tree_size(cfg):
    assert nets.param_count(cfg) == sum(math.prod(v.shape) for v in _leaves(_shapes(cfg)).values())


def test_additive_output_with_zeroed_last_layer():
    params = _params(ODD, 1)
    zeroed = jax.tree_util.tree_map(lambda x: x, params)
    zeroed["params"]["conv_lom"] = jax.tree_util.tree_map(jnp.zeros_like, zeroed["params"]["conv_lom"])
    image, mask = _inputs(ODD)
    out = _apply(ODD)(zeroed, image, mask)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(mask))
    # With the trained (here: random) last layer the update is not zero.
    assert float(jnp.abs(_apply(ODD)(params, image, mask) - mask).max()) > 1e-4


def _naive_conv_same(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """SAME 3D cross-correlation by explicit shifts (x: z,y,x,Cin; k: kz,ky,kx,Cin,Cout)."""
    kz, ky, kx = k.shape[:3]
    pad = np.pad(x, ((kz // 2,) * 2, (ky // 2,) * 2, (kx // 2,) * 2, (0, 0)))
    out = np.zeros((*x.shape[:3], k.shape[-1]))
    Z, Y, X = x.shape[:3]
    for a in range(kz):
        for b in range(ky):
            for c in range(kx):
                out += pad[a:a + Z, b:b + Y, c:c + X] @ k[a, b, c]
    return out


def test_network_equals_numpy_reference():
    """The whole convstack recomputed in NumPy from the parameter tree."""
    params = _params(ODD, 2)
    p = {k: np.asarray(v, np.float64) for k, v in _leaves(params).items()}
    image, mask = _inputs(ODD, batch=1)
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    conv = lambda v, name: _naive_conv_same(v, p[f"params/{name}/kernel"]) + p[f"params/{name}/bias"]  # noqa: E731
    x = np.concatenate([np.asarray(image[0], np.float64), np.asarray(mask[0], np.float64)], -1)
    x = conv(relu(conv(x, "conv0_a")), "conv0_b")
    for i in range(1, ODD.depth):
        x = x + conv(relu(conv(relu(x), f"conv{i}_a")), f"conv{i}_b")
    expected = np.asarray(mask[0]) + conv(relu(x), "conv_lom")
    out = _apply(ODD)(params, image, mask)
    np.testing.assert_allclose(np.asarray(out[0]), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [TINY, ODD], ids=["tiny", "anisotropic"])
def test_forward_flops_consistent_with_xla_cost_analysis(cfg):
    """XLA counts only the multiply-adds of a native 3D convolution that touch
    real (not padded) voxels; forward_flops counts SAME padding as full.
    Removing the padded taps, counted by hand (a 3-tap axis of n voxels has
    3n - 2 valid taps), must give XLA's figure. The native formulation is
    used so XLA sees plain 3D convolutions."""
    cfg = ModelConfig(**{**cfg.to_dict(), "conv_impl": "native"})
    params = _shapes(cfg)
    image, mask = _inputs(cfg, batch=1)
    cost = jax.jit(nets.make_apply_fn(cfg)).lower(params, image, mask).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    voxels = math.prod(cfg.fov_size)
    valid_taps = math.prod(3 * n - 2 for n in cfg.fov_size)
    padded_flops = sum(
        2 * v.shape[3] * v.shape[4] * (27 * voxels - valid_taps)
        for k, v in _leaves(params).items() if k.endswith("kernel") and v.shape[:3] == (3, 3, 3))
    assert cost["flops"] == pytest.approx(nets.forward_flops(cfg) - padded_flops, rel=0.01)
    assert nets.forward_flops(cfg, batch=4) == 4 * nets.forward_flops(cfg)


def test_forward_flops_published_model_by_hand():
    cfg = ModelConfig(depth=12, features=32, fov_size=(33, 33, 33), deltas=(8, 8, 8))
    # 2 FLOPs per multiply-add: first conv 2->32, 23 convs 32->32, the 1x1 32->1.
    macs = 33 ** 3 * (27 * 2 * 32 + 23 * 27 * 32 * 32 + 32)
    flops = nets.forward_flops(cfg)
    assert 2 * macs <= flops <= 2 * macs * 1.01


def test_jit_and_grad():
    params = _params(TINY, 3)
    image, mask = _inputs(TINY)
    target = (image > 0).astype(jnp.float32)

    def loss(p):
        logits = nets.ConvStack3D(TINY).apply(p, image, mask)
        return jnp.mean(jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits))))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(value)
    g = _leaves(grads)
    assert set(g) == set(_leaves(params))
    assert all(np.all(np.isfinite(v)) for v in g.values())
    assert all(np.abs(v).max() > 0 for v in g.values())
    # A gradient step lowers the loss.
    stepped = jax.tree_util.tree_map(lambda p, d: p - 0.05 * d, params, grads)
    assert jax.jit(loss)(stepped) < value


def test_bfloat16_compute_close_to_float32():
    cfg32 = ODD
    cfg16 = ModelConfig(**{**ODD.to_dict(), "compute_dtype": "bfloat16"})
    params = _params(cfg32, 4)
    leaves16 = _leaves(_shapes(cfg16))
    assert all(v.dtype == np.float32 for v in leaves16.values())  # parameters stay float32
    image, mask = _inputs(cfg32)
    out32 = _apply(cfg32)(params, image, mask)
    out16 = _apply(cfg16)(params, image, mask)
    assert out16.dtype == jnp.float32 and out16.shape == out32.shape
    upd32, upd16 = out32 - mask, out16 - mask
    err = float(jnp.abs(upd16 - upd32).max()) / float(jnp.abs(upd32).max())
    assert 0 < err < 0.05  # bf16 has ~3 significant digits; it really computed in bf16


def test_normalize_image():
    img = np.array([[[0, 128, 161]]], np.uint8)
    out = nets.normalize_image(img, 128.0, 33.0)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), [[[-128 / 33, 0.0, 1.0]]], rtol=1e-6)
