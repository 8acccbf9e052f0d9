"""One XLA:CPU device per core, chosen before JAX starts (no JAX import here).

XLA:CPU runs each 2D convolution of `ffnjax.conv`'s formulations on a single
thread, so a process with one host device leaves every other core idle. With
one host device per core, `jax.shard_map` over the devices gives each core its
own share of a batch: training splits its batch over all devices
(`ffnjax.step.make_mesh`) and flood filling with `batch_size >= 2`
splits each batch of FOVs (`ffnjax.flood`).

`import ffnjax` calls `configure_host_devices()` once, so every entry point
uses every core. It leaves the choice to the user when:

- `XLA_FLAGS` already holds `--xla_force_host_platform_device_count`,
- `JAX_NUM_CPU_DEVICES` is set,
- `FFNJAX_HOST_DEVICES` is set (`0`: leave XLA alone; `n`: use n devices),
- JAX's backends are already initialised (the count is fixed by then).

Only the CPU platform is affected: on GPU/TPU machines the accelerators stay
JAX's default devices and this costs nothing.
"""

from __future__ import annotations

import os
import re
import sys

FLAG = "--xla_force_host_platform_device_count"
ENV = "FFNJAX_HOST_DEVICES"


def usable_cores() -> int:
    """Cores this process may run on (`os.sched_getaffinity`, else `os.cpu_count`)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _backends_initialised() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge  # stays here: only once JAX is loaded, never loading it
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume not yet
        return False


def configure_host_devices(n: int | None = None) -> int:
    """Give XLA:CPU `n` host devices (default: one per usable core), unless the
    user chose already (see the module docstring).

    Works by appending the device-count flag to `XLA_FLAGS`, which XLA reads
    when its CPU backend starts; subprocesses (Dask workers, test scripts)
    inherit it.

    Args:
      n: devices to create; defaults to `FFNJAX_HOST_DEVICES` when set, else
        `usable_cores()`.

    Returns:
      The host device count that will be (or already is) in force; -1 when it
      cannot be known without initialising the backends (already initialised,
      or `FFNJAX_HOST_DEVICES=0`).

    Raises:
      ValueError: when n < 1, or when FFNJAX_HOST_DEVICES is not an integer >= 0.
    """
    if n is not None and int(n) < 1:
        raise ValueError(f"configure_host_devices: n must be >= 1, got {n}")
    flags = os.environ.get("XLA_FLAGS", "")
    m = re.search(re.escape(FLAG) + r"=(\d+)", flags)
    if m:
        return int(m.group(1))
    if os.environ.get("JAX_NUM_CPU_DEVICES"):
        return int(os.environ["JAX_NUM_CPU_DEVICES"])
    if n is None and os.environ.get(ENV, "").strip():
        text = os.environ[ENV].strip()
        if not text.isdigit():
            raise ValueError(f"{ENV} must be an integer >= 0 (0 = leave XLA's device count "
                             f"alone), got {text!r}")
        if int(text) == 0:
            return -1
        n = int(text)
    n = usable_cores() if n is None else int(n)
    if _backends_initialised():
        return -1
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={n}".strip()
    return n
