"""The AVX-512 direct convolution (`ffnjax.cpu_kernel`): equal to lax.conv on
the shapes it is built for, bit-identical however a volume is cut into slabs,
compiled from source on a fresh cache, and out of the way where it cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffnjax import conv, cpu_kernel

ROOT = Path(__file__).resolve().parents[1]
needs_kernel = pytest.mark.skipif(not cpu_kernel.available(),
                                  reason=f"direct kernel unavailable: {cpu_kernel.unavailable_reason()}")


def _valid_reference(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (1, 1, 1), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        precision=jax.lax.Precision.HIGHEST)


@needs_kernel
@pytest.mark.parametrize("shape,kshape", [
    ((1, 35, 35, 35, 32), (3, 3, 3, 32, 32)),   # google/ffn's hidden layer, SAME-padded 33^3
    ((2, 7, 9, 30, 3), (3, 3, 3, 3, 16)),       # batch 2, 16 channels, blocks of 14 + 14
    ((1, 4, 6, 9, 4), (1, 3, 5, 4, 80)),        # anisotropic kernel, 32 + 32 + 16 channels
    ((1, 3, 3, 3, 1), (3, 3, 3, 1, 16)),        # one output voxel
    ((1, 3, 3, 26, 2), (3, 3, 3, 2, 32)),       # two full blocks of 12
    ((1, 3, 3, 40, 3), (3, 3, 3, 3, 32)),       # a row of 38: blocks 10 + 10 + 9 + 9
    ((1, 3, 3, 34, 2), (3, 3, 3, 2, 16)),       # 16 channels: two full blocks of 16
])
def test_valid_convolution_matches_lax(shape, kshape):
    kx, kk = jax.random.split(jax.random.PRNGKey(sum(shape)))
    x = jax.random.normal(kx, shape, jnp.float32)
    k = jax.random.normal(kk, kshape, jnp.float32) / np.sqrt(np.prod(kshape[:4]))
    got = np.asarray(jax.jit(cpu_kernel.conv3d_valid)(x, k))
    want = np.asarray(_valid_reference(x, k))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@needs_kernel
@pytest.mark.parametrize("shape,ksize,f", [
    ((2, 9, 10, 11, 16), (3, 3, 3), 16),        # the demo net's layer, batch 2
    ((1, 7, 9, 30, 2), (3, 3, 3), 32),          # the first layer (2 channels in)
    ((1, 4, 6, 9, 3), (1, 3, 5), 48),           # anisotropic kernel, 32 + 16 channels
    ((1, 35, 35, 35, 32), (3, 3, 3), 32),       # google/ffn's hidden layer (many rows per chunk)
])
def test_kernel_gradient_matches_autodiff(shape, ksize, f):
    """`conv3d_kernel_grad(x, dy)` is d/dk of sum(conv3d_valid(x, k) * dy), the
    same as JAX's autodiff of lax's VALID convolution, and the same bits twice."""
    kx_, kd = jax.random.split(jax.random.PRNGKey(sum(shape) + f))
    x = jax.random.normal(kx_, shape, jnp.float32)
    out = tuple(s - k + 1 for s, k in zip(shape[1:4], ksize))
    dy = jax.random.normal(kd, (shape[0], *out, f), jnp.float32)
    k0 = jnp.zeros((*ksize, shape[-1], f), jnp.float32)
    want = jax.grad(lambda k: jnp.sum(_valid_reference(x, k) * dy))(k0)
    grad = jax.jit(lambda a, d: cpu_kernel.conv3d_kernel_grad(a, d, ksize))
    got = np.asarray(grad(x, dy))
    scale = float(np.abs(np.asarray(want)).max())
    np.testing.assert_allclose(got, np.asarray(want), rtol=0, atol=2e-5 * scale)
    assert np.array_equal(got, np.asarray(grad(x, dy)))


@needs_kernel
def test_slabs_give_the_bits_of_the_whole():
    """Each output is summed in one order wherever it is computed: the slabs a
    z split gives (with their halos) reproduce the whole volume exactly, which
    is what makes `fovsplit` exact on this kernel."""
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 19, 11, 13, 32), jnp.float32)
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 32, 32), jnp.float32)
    whole = np.asarray(cpu_kernel.conv3d_valid(x, k))
    parts = [np.asarray(cpu_kernel.conv3d_valid(x[:, z0:z1 + 2], k)) for z0, z1 in ((0, 6), (6, 12), (12, 17))]
    assert np.array_equal(np.concatenate(parts, axis=1), whole)


@needs_kernel
def test_vmap_and_unsupported_inputs():
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 1, 5, 5, 5, 2), jnp.float32)
    k = jax.random.normal(jax.random.PRNGKey(3), (3, 3, 3, 2, 16), jnp.float32)
    got = jax.vmap(cpu_kernel.conv3d_valid, in_axes=(0, None))(x, k)
    want = jnp.stack([_valid_reference(xi, k) for xi in x])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    assert not cpu_kernel.supports(x[0], k[..., :8])
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_kernel.conv3d_valid(x[0], k[..., :8])
    assert not cpu_kernel.supports(x[0].astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    # conv3d's 'direct' computes depth_split where the kernel cannot run.
    xb = x[0, :, :, :, :, :1]
    kb = jax.random.normal(jax.random.PRNGKey(4), (3, 3, 3, 1, 8), jnp.float32)
    np.testing.assert_array_equal(np.asarray(conv.conv3d(xb, kb, "direct")),
                                  np.asarray(conv.conv3d(xb, kb, "depth_split")))


def _python(code: str, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != cpu_kernel.ENV}
    env.update(JAX_PLATFORMS="cpu", **env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=600)


@needs_kernel
def test_builds_from_source_into_an_empty_cache(tmp_path):
    """An empty kernel folder: the first use compiles the source into
    <folder>/<key>/ (nothing half-written left beside it) and runs it; without
    $FFNJAX_KERNEL_DIR the folder is $XDG_CACHE_HOME/ffnjax/kernels."""
    code = ("import jax, jax.numpy as jnp\n"
            "from ffnjax import conv, cpu_kernel\n"
            "x = jnp.ones((1, 3, 3, 3, 2)); k = jnp.ones((3, 3, 3, 2, 16))\n"
            "print(conv.resolve_impl('auto', 'cpu'), float(cpu_kernel.conv3d_valid(x, k)[0, 0, 0, 0, 0]),"
            " cpu_kernel.build_dir())")
    r = _python(code, **{cpu_kernel.DIR_ENV: str(tmp_path / "kernels")})
    assert r.returncode == 0, r.stderr[-2000:]
    impl, value, folder = r.stdout.split()
    assert (impl, float(value)) == ("direct", 54.0)
    folder = Path(folder)
    assert folder.parent == tmp_path / "kernels"
    assert [p.name for p in folder.iterdir()] == [cpu_kernel.LIBRARY]
    r = _python(code.replace("print(", "print(cpu_kernel.kernel_root(), "),
                **{cpu_kernel.DIR_ENV: "", "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.split()[0]) == tmp_path / "xdg" / "ffnjax" / "kernels"


def test_turned_off_falls_back_to_depth_split(tmp_path):
    r = _python("from ffnjax import conv, cpu_kernel\n"
                "print(conv.resolve_impl('auto', 'cpu')); print(cpu_kernel.unavailable_reason())",
                **{cpu_kernel.ENV: "0", cpu_kernel.DIR_ENV: str(tmp_path / "kernels")})
    assert r.returncode == 0, r.stderr[-2000:]
    impl, reason = r.stdout.strip().splitlines()
    assert impl == "depth_split" and cpu_kernel.ENV in reason
    assert not (tmp_path / "kernels").exists()   # nothing compiled


@pytest.mark.skipif(not cpu_kernel.cpu_has_avx512(), reason="no AVX-512 here: the compiler is never tried")
def test_a_broken_compiler_warns_once_and_is_not_retried(tmp_path):
    """A compiler that fails: one warning naming its error, depth_split, and a
    record of the failure that the next process reads instead of compiling again."""
    runs = tmp_path / "runs"
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fake-cxx 1.0'\n[ \"$1\" = --version ] && exit 0\n"
                    f"echo run >> {runs}\necho 'error: no such thing' >&2\nexit 1\n")
    fake.chmod(0o755)
    code = ("import warnings\nwarnings.simplefilter('always')\n"
            "from ffnjax import conv, cpu_kernel\n"
            "print(conv.resolve_impl('auto', 'cpu')); print(conv.resolve_impl('auto', 'cpu'))")
    env = {"CXX": str(fake), cpu_kernel.DIR_ENV: str(tmp_path / "kernels")}
    for _ in range(2):
        r = _python(code, **env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split() == ["depth_split", "depth_split"]
        assert r.stderr.count("not available") == 1 and "no such thing" in r.stderr
    assert runs.read_text().count("run") == 1          # compiled once, then read the record
    assert "delete it to compile again" in r.stderr
    assert not list((tmp_path / "kernels").glob("*/*.so"))
