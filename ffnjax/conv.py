"""Formulations of the SAME 3D convolution that the FFN convstack runs on.

Every function here computes exactly what `lax.conv_general_dilated` computes
for an N,z,y,x,C input and a z,y,x,in,out kernel with SAME padding and unit
strides, only arranged differently so that XLA's CPU backend runs it faster.
They are built from ordinary `lax` ops, so they jit, vmap, shard and
differentiate like the native convolution (tests check values and gradients
against `lax.conv` in float32 and bfloat16); `direct` is an XLA FFI call
whose derivative is defined here (through `depth_split`'s ops, so it can be
differentiated again) and which runs once per element under `vmap`.

Why: XLA:CPU lowers a 3D convolution to a generic, poorly blocked loop nest
(about 36 GFLOP/s on google/ffn's depth-12 net here), while its 2D convolution
goes to Eigen's tuned spatial convolution. A 3x3x3 convolution is a sum of
2D convolutions over depth-shifted slices, so folding depth into the batch
turns the 3D problem into 2D ones.

Formulations (`IMPLS`):

  native      `lax.conv_general_dilated` in 3D.
  depth_split one 2D convolution per kernel z-slice on the z-shifted input
              (depth folded into the batch), summed.
  stacked_z   one 2D convolution of the unshifted input with the kernel's
              z-slices stacked on the output axis (Cout * kz outputs: a single
              larger GEMM), followed by kz - 1 shifted adds over z.
  stacked_zy  one 1D convolution along x with kz * ky * Cout outputs,
              followed by shifted adds over y and z.
  im2col      explicit patches (kz*ky*kx*Cin columns) and one GEMM.
  direct      the AVX-512 direct convolution of `ffnjax.cpu_kernel` (an XLA
              FFI call, float32, output channels a multiple of 16); where it
              cannot run (no AVX-512 or compiler, bfloat16, other channel
              counts, not the CPU backend) it computes `depth_split`.

`conv3d(x, kernel, impl)` dispatches; `impl='auto'` resolves through
`resolve_impl` to the fastest formulation measured for the default backend
(`benchmarks/forward_bench.py`): on CPU `direct` where the kernel is
available, else `depth_split`; the native convolution on GPU/TPU, whose
libraries (cuDNN, the TPU compiler) already handle 3D convolutions well.

Inside `channel_parallel(axis_name, size)` (used by
`benchmarks.sharded_forward` for batches smaller than the device count)
each device computes a slice of every convolution's output channels.

Mixed precision: with bfloat16 inputs every formulation multiplies in bfloat16
and accumulates in float32 (`preferred_element_type`), including the shifted
adds, and rounds to bfloat16 once at the end, like the native convolution.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

import jax
import jax.numpy as jnp
from jax import lax

from ffnjax import cpu_kernel

Array = jax.Array

IMPLS = ("native", "depth_split", "stacked_z", "stacked_zy", "im2col", "direct")

# What `impl='auto'` becomes, per backend (see benchmarks/README.md for the
# measurements behind the CPU choice); on CPU 'direct' only where
# `cpu_kernel.available()`, else 'depth_split'.
AUTO_IMPL = {"cpu": "direct"}
AUTO_IMPL_DEFAULT = "native"


def resolve_impl(impl: str = "auto", backend: str | None = None) -> str:
    """The concrete formulation `impl` names.

    Args:
      impl: 'auto' or one of `IMPLS`.
      backend: 'cpu', 'gpu', 'tpu', ...; defaults to `jax.default_backend()`.

    Returns:
      One of `IMPLS`: for 'auto', `AUTO_IMPL[backend]` (CPU) or 'native';
      'direct' (asked for or chosen) becomes 'depth_split' where the kernel is
      unavailable (`cpu_kernel.available()`). Layers the kernel cannot run
      (bfloat16, other channel counts) still compute 'depth_split' inside
      'direct'.

    Raises:
      ValueError: naming `impl` when it is unknown.
    """
    if impl == "auto":
        backend = backend or jax.default_backend()
        impl = AUTO_IMPL.get(backend, AUTO_IMPL_DEFAULT)
    elif impl not in IMPLS:
        raise ValueError(f"conv impl must be 'auto' or one of {IMPLS}, got {impl!r}")
    if impl == "direct" and not cpu_kernel.available():
        return "depth_split"
    return impl


def _check(x: Array, kernel: Array) -> None:
    if x.ndim != 5 or kernel.ndim != 5:
        raise ValueError(f"conv3d expects x N,z,y,x,C and kernel z,y,x,in,out; got shapes "
                         f"{x.shape} and {kernel.shape}")
    if x.shape[-1] != kernel.shape[3]:
        raise ValueError(f"conv3d: input has {x.shape[-1]} channels but the kernel expects "
                         f"{kernel.shape[3]} (kernel shape {kernel.shape})")


def _acc_dtype(dtype) -> jnp.dtype:
    """Accumulation dtype: float32 for bfloat16/float16 inputs, else the input's own."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def _pads(k: int) -> tuple[int, int]:
    """SAME padding (low, high) for kernel size k at stride 1, as XLA pads it."""
    return (k - 1) // 2, k // 2


def _shift_sum(parts: Array, axis: int, k: int) -> Array:
    """sum_d shift(parts[..., d, :], d - pad_lo) along `axis`, zeros shifted in.

    Args:
      parts: array whose axis -2 has size k (one partial result per kernel tap
        along `axis`), e.g. N,z,y,x,k,F for axis=1.
      axis: the spatial axis the taps run along.
      k: kernel size along that axis.

    Returns:
      parts summed over the taps, out[i] = sum_d parts[i + d - pad_lo, d].
    """
    lo, hi = _pads(k)
    if k == 1:
        return parts[..., 0, :]
    size = parts.shape[axis]
    widths = [(0, 0)] * parts.ndim
    widths[axis] = (lo, hi)
    padded = jnp.pad(parts, widths)
    out = None
    for d in range(k):
        term = lax.slice_in_dim(padded, d, d + size, axis=axis)[..., d, :]
        out = term if out is None else out + term
    return out


def conv3d_native(x: Array, kernel: Array) -> Array:
    """`lax.conv_general_dilated`, NDHWC/DHWIO, SAME, float32 accumulation for bfloat16."""
    acc = _acc_dtype(x.dtype)
    y = lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1, 1), padding="SAME",
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), preferred_element_type=acc)
    return y.astype(x.dtype)


def _conv2d(x: Array, kernel: Array, acc) -> Array:
    """SAME 2D convolution, NHWC input, HWIO kernel, accumulating in `acc`."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=acc)


def _depth_split_valid(xp: Array, kernel: Array, z: int) -> Array:
    """sum over d of conv2d(xp[:, d:d + z], kernel[d]): `depth_split` on an
    input already padded in z (z + kz - 1 slices), VALID along z."""
    n, _, h, w, c = xp.shape
    acc = _acc_dtype(xp.dtype)
    out = None
    for d in range(kernel.shape[0]):
        xs = lax.slice_in_dim(xp, d, d + z, axis=1).reshape(n * z, h, w, c)
        term = _conv2d(xs, kernel[d], acc)
        out = term if out is None else out + term
    return out.reshape(n, z, h, w, -1).astype(xp.dtype)


def conv3d_depth_split(x: Array, kernel: Array) -> Array:
    """sum over kernel z-slices dz of conv2d(x shifted by dz in z, kernel[dz]).

    Depth is folded into the batch: each 2D convolution sees N*z images of
    y,x. The z-shift is a slice of the z-padded input.
    """
    lo, hi = _pads(kernel.shape[0])
    xp = jnp.pad(x, ((0, 0), (lo, hi), (0, 0), (0, 0), (0, 0)))
    return _depth_split_valid(xp, kernel, x.shape[1])


def _differentiable_as(reference):
    """Gives a function f(a, b, static) built on an FFI call (which has no
    derivative) the derivative of `reference`, which computes the same
    function from lax ops (and so can be differentiated again). Training's
    usual path does not need it: `_conv_with_forward_form_vjp` gives its own
    gradients; even kernels, the z split and second derivatives do."""
    def wrap(fast):
        f = jax.custom_vjp(fast, nondiff_argnums=(2,))

        def fwd(a, b, static):
            return f(a, b, static), (a, b)

        def bwd(static, res, cotangent):
            _, vjp = jax.vjp(lambda a, b: reference(a, b, static), *res)
            return vjp(cotangent)

        f.defvjp(fwd, bwd)
        return functools.wraps(fast)(f)
    return wrap


@_differentiable_as(_depth_split_valid)
def _kernel_valid(xp: Array, kernel: Array, z: int) -> Array:
    """`_depth_split_valid(xp, kernel, z)` computed by `cpu_kernel` (y and x padded here)."""
    widths = ((0, 0), (0, 0), _pads(kernel.shape[1]), _pads(kernel.shape[2]), (0, 0))
    return cpu_kernel.conv3d_valid(jnp.pad(xp, widths), kernel)


def _direct_valid(xp: Array, kernel: Array, z: int) -> Array:
    """`_depth_split_valid` computed by the direct kernel where it runs: xp already
    padded in z (z + kz - 1 slices), SAME in y and x, VALID along z."""
    if not cpu_kernel.supports(xp, kernel):
        return _depth_split_valid(xp, kernel, z)
    return _kernel_valid(xp, kernel, z)


def conv3d_direct(x: Array, kernel: Array) -> Array:
    """`ffnjax.cpu_kernel`'s direct convolution with SAME padding (`depth_split`
    where it cannot run)."""
    lo, hi = _pads(kernel.shape[0])
    xp = jnp.pad(x, ((0, 0), (lo, hi), (0, 0), (0, 0), (0, 0)))
    return _direct_valid(xp, kernel, x.shape[1])


def conv3d_stacked_z(x: Array, kernel: Array) -> Array:
    """One 2D convolution with kz*Cout outputs, then shifted adds over z.

    kernel (kz,ky,kx,Cin,Cout) becomes (ky,kx,Cin,kz*Cout): output channel
    block d holds the contribution of kernel slice d, which belongs to output
    plane z - (d - pad_lo).
    """
    n, z, h, w, c = x.shape
    kz, ky, kx, _, f = kernel.shape
    acc = _acc_dtype(x.dtype)
    k2 = jnp.transpose(kernel, (1, 2, 3, 0, 4)).reshape(ky, kx, c, kz * f)
    parts = _conv2d(x.reshape(n * z, h, w, c), k2, acc).reshape(n, z, h, w, kz, f)
    return _shift_sum(parts, 1, kz).astype(x.dtype)


def conv3d_stacked_zy(x: Array, kernel: Array) -> Array:
    """One 1D convolution along x with kz*ky*Cout outputs, then shifted adds over y and z."""
    n, z, h, w, c = x.shape
    kz, ky, kx, _, f = kernel.shape
    acc = _acc_dtype(x.dtype)
    k1 = jnp.transpose(kernel, (2, 3, 0, 1, 4)).reshape(kx, c, kz * ky * f)
    parts = lax.conv_general_dilated(
        x.reshape(n * z * h, w, c), k1, window_strides=(1,), padding="SAME",
        dimension_numbers=("NWC", "WIO", "NWC"), preferred_element_type=acc)
    parts = parts.reshape(n, z, h, w, kz, ky * f)
    parts = _shift_sum(parts, 1, kz).reshape(n, z, h, w, ky, f)
    return _shift_sum(parts, 2, ky).astype(x.dtype)


def conv3d_im2col(x: Array, kernel: Array) -> Array:
    """Explicit patch matrix (N*z*y*x, kz*ky*kx*Cin) times the flattened kernel: one GEMM."""
    n, z, h, w, c = x.shape
    kz, ky, kx, _, f = kernel.shape
    acc = _acc_dtype(x.dtype)
    xp = jnp.pad(x, ((0, 0), _pads(kz), _pads(ky), _pads(kx), (0, 0)))
    cols = [xp[:, a:a + z, b:b + h, e:e + w, :]
            for a in range(kz) for b in range(ky) for e in range(kx)]
    patches = jnp.concatenate(cols, axis=-1)
    y = lax.dot_general(patches, kernel.reshape(kz * ky * kx * c, f),
                        (((4,), (0,)), ((), ())), preferred_element_type=acc)
    return y.astype(x.dtype)


def conv3d_pointwise(x: Array, kernel: Array) -> Array:
    """A 1x1x1 convolution as one matmul over channels (every formulation uses it)."""
    acc = _acc_dtype(x.dtype)
    y = lax.dot_general(x, kernel[0, 0, 0], (((4,), (0,)), ((), ())), preferred_element_type=acc)
    return y.astype(x.dtype)


_FORMULATIONS = {
    "native": conv3d_native,
    "depth_split": conv3d_depth_split,
    "stacked_z": conv3d_stacked_z,
    "stacked_zy": conv3d_stacked_zy,
    "im2col": conv3d_im2col,
    "direct": conv3d_direct,
}
# How each formulation computes a convolution whose input is already padded in
# z (VALID along z, SAME in y and x); the others go through depth_split's.
_VALID_Z = {"direct": _direct_valid}


# The two trace-time split contexts below, per thread (`_split_context`):
# attribute 'channels' = (axis_name, size), 'depth' = (axis_name, size, depth),
# each absent or None outside its context.
_SPLIT = threading.local()


@contextlib.contextmanager
def _split_context(kind: str, *value) -> Iterator[None]:
    """This thread's `kind` split is `value` inside; the outer one is restored after."""
    prev = getattr(_SPLIT, kind, None)
    setattr(_SPLIT, kind, value)
    try:
        yield
    finally:
        setattr(_SPLIT, kind, prev)


def _split(kind: str):
    """This thread's active split of `kind` ('channels' or 'depth'), or None."""
    return getattr(_SPLIT, kind, None)


@contextlib.contextmanager
def channel_parallel(axis_name: str, size: int) -> Iterator[None]:
    """While tracing inside this context (within `jax.shard_map` over the
    mesh axis `axis_name` of `size` devices, inputs replicated), `conv3d`
    splits every convolution's output channels over the devices: device i
    computes channels [i*F/size, (i+1)*F/size) and `lax.all_gather` rebuilds
    the full output on every device. One FOV then keeps all devices busy.
    Convolutions whose output channels do not divide by `size` (the 1-channel
    output layer) run whole on every device.

    The context is read at trace time only; it has no effect on functions
    already compiled.
    """
    if size < 1:
        raise ValueError(f"channel_parallel: size must be >= 1, got {size}")
    with _split_context("channels", axis_name, int(size)):
        yield


def _channel_split(fn, x: Array, kernel: Array) -> Array:
    """fn(x, kernel) computed on this device's share of output channels, then all-gathered."""
    ctx = _split("channels")
    cout = kernel.shape[-1]
    if ctx is None or ctx[1] == 1 or cout % ctx[1] != 0:
        return fn(x, kernel)
    axis_name, size = ctx
    f = cout // size
    local = lax.dynamic_slice_in_dim(kernel, lax.axis_index(axis_name) * f, f, axis=4)
    return lax.all_gather(fn(x, local), axis_name, axis=4, tiled=True)


@contextlib.contextmanager
def depth_parallel(axis_name: str, size: int, depth: int) -> Iterator[None]:
    """While tracing inside this context (within `jax.shard_map` over the mesh
    axis `axis_name` of `size` devices, device i holding slices
    [i*zl, (i+1)*zl) of a z axis of `depth` slices, zl = ceil(depth / size)),
    `conv3d` computes each convolution with kz > 1 on the local slab only: it
    receives the kz // 2 slices next to its slab from each neighbour
    (`lax.ppermute`; zeros at the two ends of the volume, as SAME padding
    gives), zeroes the slices past `depth` (padding when `size` does not
    divide it), and convolves VALID along z as the formulation does
    (the direct kernel where it runs, else `depth_split`'s 2D convolutions). The result
    on every slab equals the unsplit convolution's slices there.
    `ffnjax.fovsplit` wraps a network in this context.

    Read at trace time only, like `channel_parallel`.
    """
    if size < 1 or depth < 1:
        raise ValueError(f"depth_parallel: size and depth must be >= 1, got {size}, {depth}")
    with _split_context("depth", axis_name, int(size), int(depth)):
        yield


def _halo_conv(x: Array, kernel: Array, axis_name: str, size: int, depth: int,
               impl: str = "depth_split") -> Array:
    """SAME conv3d of the local z slab `x` inside `depth_parallel` (see there)."""
    zl = x.shape[1]
    lo, hi = _pads(kernel.shape[0])
    if max(lo, hi) > zl:
        raise ValueError(f"depth_parallel: a slab of {zl} slices cannot lend {max(lo, hi)} "
                         "halo slices; use fewer devices")
    # Slices past `depth` (padding) must read as zeros, as SAME padding does
    # outside the volume; only the top `k` of a slab can be such slices, so
    # only they are masked (one select over a few slices, not the slab).
    k = min(zl * size - depth, zl)
    first = lax.axis_index(axis_name) * zl

    def valid(part: Array, start: int) -> Array:
        if start + part.shape[1] <= zl - k:
            return part
        z = first + start + lax.broadcasted_iota(jnp.int32, (1, part.shape[1], 1, 1, 1), 1)
        return jnp.where(z < depth, part, jnp.zeros((), part.dtype))

    parts = [x] if k == 0 else [p for p in (x[:, :zl - k], valid(x[:, zl - k:], zl - k)) if p.shape[1]]
    if lo:  # the top slices of the device below; zeros on device 0
        parts.insert(0, lax.ppermute(valid(x[:, zl - lo:], zl - lo), axis_name,
                                     [(i, i + 1) for i in range(size - 1)]))
    if hi:  # the bottom slices of the device above; zeros on the last device
        parts.append(lax.ppermute(valid(x[:, :hi], 0), axis_name,
                                  [(i + 1, i) for i in range(size - 1)]))
    valid_z = _VALID_Z.get(impl, _depth_split_valid)
    return valid_z(jnp.concatenate(parts, axis=1), kernel, zl)


def _kernel_grad(x: Array, dy: Array, ksize: tuple[int, int, int]) -> Array:
    """d(sum(conv3d(x, k) * dy)) / dk for a SAME kernel of size `ksize`.

    Written as one canonical VALID 2D convolution per kernel z-tap, with depth
    folded into the batch and then the batch used as the contraction
    ("feature") axis and the input channels as the batch, so XLA:CPU hands it
    to its tuned 2D kernel (3-4x faster than the 3D form of the same sum).
    """
    n, z, y, xx, c = x.shape
    kz, ky, kx = ksize
    pads = [(0, 0)] + [_pads(k) for k in ksize] + [(0, 0)]
    xp = jnp.pad(x, pads)
    rhs = dy.reshape(n * z, y, xx, -1).transpose(1, 2, 0, 3)          # y, x, N*z, Cout
    taps = []
    for a in range(kz):
        lhs = lax.slice_in_dim(xp, a, a + z, axis=1)
        lhs = lhs.reshape(n * z, *lhs.shape[2:]).transpose(3, 1, 2, 0)   # Cin, y', x', N*z
        out = lax.conv_general_dilated(
            lhs, rhs.astype(lhs.dtype), window_strides=(1, 1), padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=_acc_dtype(x.dtype))                 # Cin, ky, kx, Cout
        taps.append(out.transpose(1, 2, 0, 3))
    return jnp.stack(taps)                                             # kz, ky, kx, Cin, Cout


@_differentiable_as(_kernel_grad)
def _direct_kernel_grad(x: Array, dy: Array, ksize: tuple[int, int, int]) -> Array:
    """`_kernel_grad` computed by `cpu_kernel.conv3d_kernel_grad` (x padded here)."""
    xp = jnp.pad(x, [(0, 0)] + [_pads(k) for k in ksize] + [(0, 0)])
    return cpu_kernel.conv3d_kernel_grad(xp, dy, ksize)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_with_forward_form_vjp(x: Array, kernel: Array, impl: str) -> Array:
    return _FORMULATIONS[impl](x, kernel)


def _cvjp_fwd(x, kernel, impl):
    return _FORMULATIONS[impl](x, kernel), (x, kernel)


def _cvjp_bwd(impl, res, dy):
    # Autodiff of a convolution yields transposed convolutions that XLA:CPU
    # runs ~5-15x slower inside control flow (the training step's lax.scan /
    # lax.cond over FOV moves) than at the top level. Both gradients are
    # written here in forward form instead:
    #   dx = conv(dy, kernel flipped in space, in/out swapped)   (SAME, odd kernel)
    #   dk = a VALID convolution of x with dy (`_kernel_grad`; with 'direct',
    #        the kernel's own gradient handler, `_direct_kernel_grad`).
    x, kernel = res
    dx = _FORMULATIONS[impl](dy.astype(x.dtype),
                             jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4).astype(x.dtype))
    grad_k = _direct_kernel_grad if impl == "direct" and cpu_kernel.supports(dy, kernel) \
        else _kernel_grad
    dk = grad_k(x, dy.astype(x.dtype), kernel.shape[:3])
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv_with_forward_form_vjp.defvjp(_cvjp_fwd, _cvjp_bwd)


def _odd(kernel: Array) -> bool:
    return all(k % 2 == 1 for k in kernel.shape[:3])


def conv3d(x: Array, kernel: Array, impl: str = "auto") -> Array:
    """SAME 3D convolution of x (N,z,y,x,Cin) with kernel (kz,ky,kx,Cin,Cout).

    Args:
      x: input, N,z,y,x,Cin (float32 or bfloat16).
      kernel: z,y,x,Cin,Cout, same dtype as x.
      impl: 'auto' (best for the default backend) or one of `IMPLS`.

    Returns:
      N,z,y,x,Cout in x's dtype; equal to `lax.conv_general_dilated` with SAME
      padding within float rounding.

    Raises:
      ValueError: on an unknown impl or mismatched shapes.
    """
    _check(x, kernel)
    impl = resolve_impl(impl)
    split = _split("depth")
    if split is not None and kernel.shape[0] > 1:
        return _halo_conv(x, kernel, *split, impl=impl)
    if impl != "native" and kernel.shape[:3] == (1, 1, 1):
        return _channel_split(conv3d_pointwise, x, kernel)
    if impl != "native" and _odd(kernel):
        fn = functools.partial(_conv_with_forward_form_vjp, impl=impl)
        return _channel_split(lambda a, k: fn(a, k), x, kernel)
    return _channel_split(_FORMULATIONS[impl], x, kernel)
