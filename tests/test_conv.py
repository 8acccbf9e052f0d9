"""Every convolution formulation equals lax.conv (values and gradients), and
the network built on each equals the network built on the native one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffnjax import conv, cpu_kernel, nets
from ffnjax.config import CONV_IMPLS, ModelConfig

REFORMULATIONS = [i for i in conv.IMPLS if i != "native"]


def _reference(x, k):
    """lax.conv in float32 at highest precision: the ground truth."""
    return jax.lax.conv_general_dilated(
        x.astype(jnp.float32), k.astype(jnp.float32), (1, 1, 1), "SAME",
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=jax.lax.Precision.HIGHEST)


def _inputs(shape, kshape, seed=0):
    kx, kk = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, shape, jnp.float32)
    k = jax.random.normal(kk, kshape, jnp.float32) / np.sqrt(np.prod(kshape[:4]))
    return x, k


@pytest.mark.parametrize("impl", conv.IMPLS)
@pytest.mark.parametrize("shape,kshape", [
    ((2, 5, 6, 7, 3), (3, 3, 3, 3, 4)),     # odd/even sizes, 3x3x3
    ((1, 4, 5, 3, 2), (1, 1, 1, 2, 5)),     # pointwise (conv_lom)
    # Output channels in vectors of 16: what `direct` runs itself (the rest
    # falls back to depth_split); rows of 29 and 7 cut into uneven blocks.
    ((2, 5, 6, 29, 2), (3, 3, 3, 2, 16)),
    ((1, 3, 4, 7, 5), (3, 3, 3, 5, 48)),
    # Shapes the convstack never uses; slow only because each compiles anew.
    pytest.param((1, 2, 5, 7, 2), (3, 1, 5, 2, 3), marks=pytest.mark.slow),  # anisotropic, deeper than z
    pytest.param((1, 4, 4, 4, 2), (2, 2, 2, 2, 3), marks=pytest.mark.slow),  # even: SAME pads (0, 1)
])
def test_float32_matches_lax_conv(impl, shape, kshape):
    x, k = _inputs(shape, kshape)
    got = jax.jit(lambda a, b: conv.conv3d(a, b, impl))(x, k)
    want = _reference(x, k)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", conv.IMPLS)
def test_bfloat16_matches_lax_conv(impl):
    """bfloat16 in, float32 accumulation, one rounding to bfloat16 at the end:
    the error is that of rounding the inputs and the result (about 2**-8 relative)."""
    x, k = _inputs((2, 5, 6, 7, 8), (3, 3, 3, 8, 8), seed=1)
    xb, kb = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    got = jax.jit(lambda a, b: conv.conv3d(a, b, impl))(xb, kb)
    assert got.dtype == jnp.bfloat16
    want = _reference(xb, kb)  # exact products of the rounded inputs
    err = np.abs(np.asarray(got, np.float32) - np.asarray(want))
    # One bfloat16 rounding of the result: |err| <= 2**-8 |want| (+ tiny slack).
    assert np.all(err <= 2.0 ** -8 * np.abs(np.asarray(want)) + 1e-6), err.max()


@pytest.mark.parametrize("impl", REFORMULATIONS)
def test_gradients_match_native(impl):
    x, k = _inputs((1, 4, 5, 6, 3), (3, 3, 3, 3, 4), seed=2)
    w = jax.random.normal(jax.random.PRNGKey(9), (1, 4, 5, 6, 4))

    def loss(impl_, a, b):
        return jnp.sum(w * jnp.tanh(conv.conv3d(a, b, impl_)))

    got = jax.grad(loss, argnums=(1, 2))(impl, x, k)
    want = jax.grad(loss, argnums=(1, 2))("native", x, k)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


needs_kernel = pytest.mark.skipif(not cpu_kernel.available(),
                                  reason=f"direct kernel unavailable: {cpu_kernel.unavailable_reason()}")


def _kernel_calls(fn, *args) -> int:
    return jax.jit(fn).lower(*args).as_text().count(cpu_kernel.TARGET)


@needs_kernel
def test_direct_runs_the_kernel_where_it_can():
    """Output channels in vectors of 16, float32: the kernel; 8 channels or
    bfloat16: depth_split's ops, no kernel call."""
    for kshape, dtype, calls in [((3, 3, 3, 2, 16), jnp.float32, 1), ((3, 3, 3, 2, 48), jnp.float32, 1),
                                 ((3, 3, 3, 2, 8), jnp.float32, 0), ((3, 3, 3, 2, 16), jnp.bfloat16, 0)]:
        x, k = _inputs((1, 4, 5, 6, 2), kshape)
        got = _kernel_calls(lambda a, b: conv.conv3d(a, b, "direct"), x.astype(dtype), k.astype(dtype))
        assert got == calls, (kshape, dtype, got)


@needs_kernel
def test_gradients_match_native_on_the_direct_kernel():
    """16 channels in and out, so the forward, the input gradient's convolution
    (channels swapped) and the kernel's gradient all run on the kernel; an even kernel (no
    forward-form VJP) and a second derivative go through the kernel's own
    derivative."""
    x, k = _inputs((1, 4, 5, 6, 16), (3, 3, 3, 16, 16), seed=3)
    w = jax.random.normal(jax.random.PRNGKey(8), (1, 4, 5, 6, 16))

    def loss(impl_, a, b):
        return jnp.sum(w * jnp.tanh(conv.conv3d(a, b, impl_)))

    grad = jax.grad(loss, argnums=(1, 2))
    assert _kernel_calls(lambda a, b: grad("direct", a, b), x, k) >= 2
    hlo = jax.jit(lambda a, b: grad("direct", a, b)).lower(x, k).as_text()
    assert cpu_kernel.GRAD_TARGET in hlo          # and the kernel's gradient
    got = jax.jit(grad, static_argnums=0)("direct", x, k)
    want = grad("native", x, k)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)

    xe, ke = _inputs((1, 4, 5, 6, 2), (2, 2, 2, 2, 16), seed=4)
    got = jax.grad(loss, argnums=(1, 2))("direct", xe, ke)
    want = jax.grad(loss, argnums=(1, 2))("native", xe, ke)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)

    def curvature(impl_, b):  # d/dk of |d loss / dx|^2
        return jnp.sum(jax.grad(loss, argnums=1)(impl_, x, b) ** 2)

    np.testing.assert_allclose(np.asarray(jax.grad(curvature, argnums=1)("direct", k)),
                               np.asarray(jax.grad(curvature, argnums=1)("native", k)),
                               rtol=1e-3, atol=1e-4)


_NET = ModelConfig(depth=1, features=4, fov_size=(5, 7, 9), deltas=(1, 2, 2), conv_impl="native")


@pytest.fixture(scope="module")
def native_net():
    """Parameters, inputs, and the native network's loss and parameter gradient."""
    params = nets.init_params(_NET, 0)
    image = jax.random.normal(jax.random.PRNGKey(3), nets.fov_shape(_NET, 2))
    mask = jax.random.normal(jax.random.PRNGKey(4), nets.fov_shape(_NET, 2))
    loss = lambda apply_fn: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda p: jnp.mean(apply_fn(p, image, mask) ** 2)))
    return params, loss, loss(nets.make_apply_fn(_NET))(params)


@pytest.mark.parametrize("impl", ["auto", "stacked_z"])
def test_network_matches_native(impl, native_net):
    """The whole convstack (and its parameter gradient) on the default formulation
    and the runner-up (the others are covered layer by layer above)."""
    params, loss, (want, gwant) = native_net
    cfg = ModelConfig(**{**_NET.to_dict(), "conv_impl": impl})
    got, ggot = loss(nets.make_apply_fn(cfg))(params)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, r in zip(jax.tree_util.tree_leaves(ggot), jax.tree_util.tree_leaves(gwant)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-3, atol=1e-5)


def test_resolve_impl():
    want_cpu = "direct" if cpu_kernel.available() else "depth_split"
    assert conv.resolve_impl("auto", "cpu") == want_cpu
    assert conv.resolve_impl("auto", "gpu") == "native"
    assert conv.resolve_impl("auto", "tpu") == "native"
    for impl in conv.IMPLS:
        fallback = impl == "direct" and not cpu_kernel.available()
        assert conv.resolve_impl(impl, "gpu") == ("depth_split" if fallback else impl)
    with pytest.raises(ValueError, match="winograd"):
        conv.resolve_impl("winograd")


def test_config_lists_every_formulation():
    assert set(CONV_IMPLS) == {"auto", *conv.IMPLS}


def test_bad_shapes_raise():
    x, k = _inputs((1, 3, 3, 3, 2), (3, 3, 3, 4, 2))
    with pytest.raises(ValueError, match="channels"):
        conv.conv3d(x, k, "depth_split")
    with pytest.raises(ValueError, match="N,z,y,x,C"):
        conv.conv3d(x[0], k, "depth_split")


_SHARDED_SCRIPT = r"""
import json, os, sys
import numpy as np
from ffnjax import hostdevices
n = hostdevices.configure_host_devices(int(sys.argv[1]) if len(sys.argv) > 1 else None)
import jax, jax.numpy as jnp
from benchmarks.sharded_forward import make_sharded_apply, sharded_forward
from ffnjax import nets
from ffnjax.config import ModelConfig
cfg = ModelConfig(depth=1, features=4, fov_size=(5, 5, 5), deltas=(1, 1, 1))
params = nets.init_params(cfg, 0)
apply_fn = nets.make_apply_fn(cfg)
img = jax.random.normal(jax.random.PRNGKey(0), nets.fov_shape(cfg, 3))
msk = jax.random.normal(jax.random.PRNGKey(1), nets.fov_shape(cfg, 3))
got = sharded_forward(apply_fn, params, img, msk)
want = jax.jit(apply_fn)(params, img, msk)
# One FOV: split each layer's output channels over the devices, values and gradients.
one = sharded_forward(apply_fn, params, img[:1], msk[:1], split="channels")
none = sharded_forward(apply_fn, params, img[:1], msk[:1])
chan = make_sharded_apply(apply_fn, split="channels")
hlo = chan.lower(params, img[:1], msk[:1]).compile().as_text()
loss = lambda f: (lambda p: jnp.sum(f(p, img[:1], msk[:1]) ** 2))
g1 = jax.tree_util.tree_leaves(jax.grad(loss(chan))(params))
g2 = jax.tree_util.tree_leaves(jax.grad(loss(apply_fn))(params))
print(json.dumps(dict(returned=n, devices=jax.device_count(), shape=list(got.shape),
                      err=float(jnp.max(jnp.abs(got - want))),
                      err_one=float(jnp.max(jnp.abs(one - want[:1]))),
                      err_none=float(jnp.max(jnp.abs(none - want[:1]))),
                      gathers=hlo.count("all-gather"),
                      grad_rel=max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(g1, g2)),
                      again=hostdevices.configure_host_devices(5))))
"""


def _run_sharded(args=(), xla_flags=None):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    r = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, *args], capture_output=True, text=True,
                       env=env, cwd=str(Path(__file__).resolve().parents[1]), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_host_devices_and_sharded_forward():
    """configure_host_devices() gives one CPU device per usable core; a batch
    of 3 (padded to a multiple of the device count) split over them equals the
    plain forward pass; after initialisation the count is fixed and the
    count in force is what it returns."""
    import os
    cores = len(os.sched_getaffinity(0))
    out = _run_sharded()
    assert out["returned"] == cores and out["devices"] == cores
    assert out["shape"] == [3, 5, 5, 5, 1]
    assert out["err"] < 1e-5
    assert out["err_one"] < 1e-5 and out["err_none"] < 1e-5
    assert out["grad_rel"] < 1e-4
    if cores > 1:  # conv0_a and conv0_b are split (depth 1): their outputs are gathered
        assert out["gathers"] >= 2
    assert out["again"] == cores


def test_host_devices_respect_user_xla_flags():
    """A user's device count wins over the requested one."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=3")
    script = ("from ffnjax import hostdevices; n = hostdevices.configure_host_devices(2); "
              "import jax; print(n, jax.device_count())")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       cwd=str(Path(__file__).resolve().parents[1]), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["3", "3"]


def test_pad_batch():
    import jax.numpy as jnp
    from benchmarks.sharded_forward import pad_batch
    from ffnjax import hostdevices
    x = jnp.arange(3 * 2).reshape(3, 2)
    y, n = pad_batch(x, 4)
    assert n == 3 and y.shape == (4, 2)
    np.testing.assert_array_equal(np.asarray(y), [[0, 1], [2, 3], [4, 5], [4, 5]])
    assert pad_batch(x, 3)[0] is x
    with pytest.raises(ValueError, match="n must be"):
        hostdevices.configure_host_devices(0)


def test_channel_parallel_outside_shard_map_needs_axis():
    """The context only makes sense inside shard_map: outside, the axis is unbound."""
    x, k = _inputs((1, 3, 3, 3, 2), (3, 3, 3, 2, 4))
    with conv.channel_parallel("nope", 2):
        with pytest.raises(NameError):
            conv.conv3d(x, k, "depth_split")
    np.testing.assert_allclose(np.asarray(conv.conv3d(x, k, "depth_split")),
                               np.asarray(_reference(x, k)), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="size"):
        with conv.channel_parallel("b", 0):
            pass
