"""A direct 3D convolution for x86 CPUs with AVX-512, called from JAX through XLA's FFI.

XLA:CPU computes ffnjax's 3x3x3 convolutions with Eigen's 2D spatial
convolution (`conv.depth_split`), which reaches about 120 GFLOP/s on one core
of this project's machine where oneDNN, in TensorFlow, reaches about 155. The
kernel in `csrc/conv3d_direct.cc` is a register-blocked direct convolution
that matches oneDNN there (`benchmarks/forward_bench.py`), so a batch-1 fill,
which has no batch to spread, gets google/ffn's speed per core.

The source ships with the package and is compiled on first use with the C++
compiler on the PATH (`$CXX`, else `g++`, else `c++`; about 5 s) into
`kernel_root()/KEY/` (`$FFNJAX_KERNEL_DIR`, else `files.cache_home('kernels')`),
where KEY digests the source, the compiler, its flags, jaxlib's FFI headers
and jaxlib's version, so a changed kernel or jaxlib compiles again. The
library is written beside its name and moved into place, so two processes
never load each other's half-written file. A compile that fails leaves
`build-failed.txt` with the compiler's error in that folder, and later
processes read it instead of compiling again (delete it to retry). The
compiled handler is registered with XLA once per process.

Nothing is required: on a CPU without AVX-512F, off Linux x86-64, without a
compiler, when compiling fails (a warning says why, once per process), or with
`FFNJAX_CPU_KERNEL=0` (read once, at the first convolution of a process),
`available()` is False and `conv.conv3d(impl='direct')` computes
`depth_split` instead.

`conv3d_kernel_grad(x, dy, ksize)`: the kernel's gradient of that convolution
(training's third convolution-sized sum), from a second handler of the same
source.

`conv3d_valid(x, kernel)`: VALID, unit strides, float32 N,z,y,x,C input and
kz,ky,kx,C,F kernel with F a multiple of 16 (`supports`). It has no
derivative of its own (`ffnjax.conv` gives it one); under `vmap` it runs
once per element. Each output is summed in one fixed order whatever slab of
the volume it is computed in, so a volume split over devices
(`ffnjax.fovsplit`) gives the bits of the whole.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from ffnjax import files

SOURCE = Path(__file__).with_name("csrc") / "conv3d_direct.cc"
SYMBOL = "FfnjaxConv3dValid"
TARGET = "ffnjax_conv3d_valid"
GRAD_SYMBOL = "FfnjaxConv3dKernelGrad"
GRAD_TARGET = "ffnjax_conv3d_kernel_grad"
ENV = "FFNJAX_CPU_KERNEL"
DIR_ENV = "FFNJAX_KERNEL_DIR"
LIBRARY = "libffnjax_conv3d.so"
FAILED = "build-failed.txt"
# -Wno-*: two warnings jaxlib's FFI headers raise under GCC 12.
FLAGS = ("-O3", "-mavx512f", "-mfma", "-std=c++17", "-shared", "-fPIC",
         "-Wno-attributes", "-Wno-return-type")
# Output channels are handled in vectors of 16 float32.
CHANNEL_MULTIPLE = 16

_LOCK = threading.Lock()
_reason: list[str | None] = []     # [] until loaded; then [None] (ready) or [why not]
_library: list[ctypes.CDLL] = []   # the loaded library, kept for the life of the process


def cpu_has_avx512() -> bool:
    """Linux on x86-64 with AVX-512F and FMA (read from /proc/cpuinfo)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return {"avx512f", "fma"} <= set(line.split(":", 1)[1].split())
    return False


def compiler() -> str | None:
    """The C++ compiler to build with: $CXX, else g++, else c++ (None when none is found)."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def kernel_root() -> Path:
    """Where compiled kernels live: $FFNJAX_KERNEL_DIR, else ~/.cache/ffnjax/kernels."""
    return Path(os.environ[DIR_ENV]) if os.environ.get(DIR_ENV) else files.cache_home("kernels")


def _build_key(cxx: str) -> str:
    import jaxlib
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    headers = sorted(Path(jax.ffi.include_dir(), "xla", "ffi", "api").glob("*.h"))
    return files.digest([SOURCE.read_bytes(), version, " ".join(FLAGS), jaxlib.__version__,
                         *(h.read_bytes() for h in headers)])[:16]


def build_dir(cxx: str | None = None) -> Path | None:
    """This machine's folder for the kernel built by `cxx` (None without a compiler)."""
    cxx = cxx or compiler()
    return None if cxx is None else kernel_root() / _build_key(cxx)


def build(force: bool = False) -> Path:
    """Compile the kernel unless it is built (or failed to build) already; returns the library.

    Raises:
      RuntimeError: without a compiler, or naming the compiler's error (now or recorded by
        an earlier process in `build-failed.txt`; `force` compiles again).
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found ($CXX, g++, c++)")
    folder = build_dir(cxx)
    path, failed = folder / LIBRARY, folder / FAILED
    if not force:
        if path.exists():
            return path
        if failed.exists():
            raise RuntimeError(f"{failed.read_text().strip()} (recorded in {failed}; delete it to "
                               "compile again)")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = files.temp_path(path)
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(tmp)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            error = f"{Path(cxx).name} failed on {SOURCE.name}: " + " / ".join(tail)
            files.write_bytes(failed, error.encode())
            raise RuntimeError(error)
        os.replace(tmp, path)
        failed.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _load() -> str | None:
    """Build, load and register the kernel; returns why it is unavailable, or None."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"turned off by {ENV}={os.environ[ENV]}"
    if not cpu_has_avx512():
        return "this CPU has no AVX-512F/FMA (or is not Linux x86-64)"
    try:
        lib = ctypes.CDLL(str(build()))
        for target, symbol in ((TARGET, SYMBOL), (GRAD_TARGET, GRAD_SYMBOL)):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except Exception as err:  # noqa: BLE001 - any failure means: use depth_split
        return f"{type(err).__name__}: {err}"
    _library.append(lib)
    return None


def unavailable_reason() -> str | None:
    """None when the kernel is ready to call, else why not (built and registered on first call)."""
    with _LOCK:
        first = not _reason
        if first:
            _reason.append(_load())
        reason = _reason[0]
    if first and reason is not None and not reason.startswith(("turned off", "this CPU")):
        warnings.warn(f"ffnjax: the AVX-512 convolution kernel is not available ({reason}); "
                      "3x3x3 convolutions use depth_split", RuntimeWarning, stacklevel=2)
    return reason


def available() -> bool:
    """Whether `conv3d_valid` can run here (see the module docstring)."""
    return unavailable_reason() is None


def _runs(dtypes, channels: int) -> bool:
    return (all(d == jnp.float32 for d in dtypes) and channels % CHANNEL_MULTIPLE == 0
            and jax.default_backend() == "cpu" and available())


def _require(what: str, a: jax.Array, b: jax.Array, channels: int) -> None:
    """ValueError naming `what` and why, unless the kernel runs on float32 `a`, `b`
    with `channels` output channels here."""
    if not _runs((a.dtype, b.dtype), channels):
        why = unavailable_reason() or (
            f"needs float32 and output channels a multiple of {CHANNEL_MULTIPLE} on the CPU, got "
            f"{a.dtype}/{b.dtype}, {channels} output channels, backend {jax.default_backend()}")
        raise ValueError(f"{what}: {why}")


def supports(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether `conv3d_valid(x, kernel)` runs here: the kernel is available, the
    default backend is the CPU, both arrays are float32 and the output
    channels are a multiple of 16 (the same for `conv3d_kernel_grad(x, dy)`,
    dy having those output channels)."""
    return _runs((x.dtype, kernel.dtype), kernel.shape[-1])


def conv3d_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """VALID 3D convolution of x (N,z,y,x,C) with kernel (kz,ky,kx,C,F), float32.

    Raises:
      ValueError: when `supports(x, kernel)` is False or the shapes make no
        VALID convolution (naming why).
    """
    _require("conv3d_valid", x, kernel, kernel.shape[-1])
    n, z, y, w, c = x.shape
    kz, ky, kx, kc, f = kernel.shape
    if kc != c or min(z - kz, y - ky, w - kx) < 0:
        raise ValueError(f"conv3d_valid: input {x.shape} and kernel {kernel.shape} do not make a "
                         "VALID convolution")
    out = jax.ShapeDtypeStruct((n, z - kz + 1, y - ky + 1, w - kx + 1, f), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, kernel)


def conv3d_kernel_grad(x: jax.Array, dy: jax.Array, ksize) -> jax.Array:
    """The kernel's gradient of `conv3d_valid(x, kernel)` for the cotangent `dy`:
    dk[a,b,e,c,f] = sum over n,z,y,x of x[n,z+a,y+b,x+e,c] * dy[n,z,y,x,f]
    (kz,ky,kx,C,F, float32; F a multiple of 16).

    Raises:
      ValueError: when the kernel cannot run here or the shapes do not fit.
    """
    kz, ky, kx = (int(k) for k in ksize)
    _require("conv3d_kernel_grad", x, dy, dy.shape[-1])
    n, z, y, w, c = x.shape
    if dy.shape[:4] != (n, z - kz + 1, y - ky + 1, w - kx + 1):
        raise ValueError(f"conv3d_kernel_grad: x {x.shape}, dy {dy.shape} and kernel size "
                         f"{(kz, ky, kx)} do not fit a VALID convolution")
    out = jax.ShapeDtypeStruct((kz, ky, kx, c, dy.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(GRAD_TARGET, out, vmap_method="sequential")(x, dy)
