"""ffnjax: Flood-Filling Networks in JAX/Flax.

The names users reach for first live at the top level::

    import ffnjax
    config, params = ffnjax.load_checkpoint("runs/fib25")
    seg, info = ffnjax.segment(image, params, config, ffnjax.InferenceOptions())

What `import ffnjax` loads, and why not more. The configuration dataclasses
(`ffnjax.config`, no JAX) are imported here. Everything that needs JAX is
imported on first use, by the module `__getattr__` below (PEP 562): `segment`
comes from `ffnjax.segmentation`, `fill` from `ffnjax.flood`,
`load_checkpoint` from `ffnjax.checkpoints`, and the submodules in
`SUBMODULES` (`ffnjax.train_loop`, `ffnjax.erl`, `ffnjax.synthetic`, ...) are
reachable as attributes without importing them by name. Importing them all
here would make `import ffnjax` (and every `python -m experiments.* --help`)
take seconds instead of a tenth of one: JAX, Orbax and TensorStore load then.

On import, ffnjax gives XLA:CPU one host device per core
(`ffnjax.hostdevices.configure_host_devices`), so that training batches and
batched flood fills spread over every core. A device count the user set
(`XLA_FLAGS`, `JAX_NUM_CPU_DEVICES`) wins; `FFNJAX_HOST_DEVICES=0` turns it off.
"""

import importlib

from ffnjax.config import InferenceOptions, ModelConfig, TrainConfig, logit
from ffnjax.hostdevices import configure_host_devices as _configure_host_devices

_configure_host_devices()

__all__ = ["InferenceOptions", "ModelConfig", "TrainConfig", "logit",
           "segment", "fill", "load_checkpoint"]
__version__ = "0.1.0"

# Submodules reachable as `ffnjax.<name>` after a plain `import ffnjax`.
SUBMODULES = ("agglomeration", "agglomeration_blocks", "augment", "baseline", "blockfiles", "blockwise", "checkpoints",
              "conv", "dask_tasks", "decision_points", "erl", "files", "flood", "fovsplit",
              "gffn_output", "handoff", "interrupt", "multihost", "nets", "request",
              "resegmentation", "restrict", "resume", "scale", "seed_policies", "segmentation",
              "synthetic", "testing", "tf_import", "train_loop", "view", "volumes")


def __getattr__(name: str):
    """The JAX-using names and submodules, imported when first asked for."""
    if name == "segment":
        from ffnjax.segmentation import segment
        return segment
    if name == "fill":
        from ffnjax.flood import fill
        return fill
    if name == "load_checkpoint":
        from ffnjax.checkpoints import load_checkpoint
        return load_checkpoint
    if name in SUBMODULES:
        return importlib.import_module(f"ffnjax.{name}")  # also binds ffnjax.<name>
    raise AttributeError(f"module 'ffnjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *SUBMODULES})
