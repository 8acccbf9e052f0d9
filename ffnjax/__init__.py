"""ffnjax: Flood-Filling Networks in JAX/Flax.

The names users reach for first live at the top level::

    import ffnjax
    config, params = ffnjax.load_checkpoint("runs/fib25")
    seg, info = ffnjax.segment(image, params, config, ffnjax.InferenceOptions())

`segment`, `fill` and `load_checkpoint` are imported lazily so that
`import ffnjax` stays cheap (no JAX import until they are used).

On import, ffnjax gives XLA:CPU one host device per core
(`ffnjax.hostdevices.configure_host_devices`), so that training batches and
batched flood fills spread over every core. A device count the user set
(`XLA_FLAGS`, `JAX_NUM_CPU_DEVICES`) wins; `FFNJAX_HOST_DEVICES=0` turns it off.
"""

from ffnjax.config import InferenceOptions, ModelConfig, TrainConfig, logit
from ffnjax.hostdevices import configure_host_devices as _configure_host_devices

_configure_host_devices()

__all__ = ["InferenceOptions", "ModelConfig", "TrainConfig", "logit",
           "segment", "fill", "load_checkpoint"]
__version__ = "0.1.0"

_LAZY = {"segment": "ffnjax.segmentation", "fill": "ffnjax.flood",
         "load_checkpoint": "ffnjax.checkpoints"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ffnjax' has no attribute {name!r}")
