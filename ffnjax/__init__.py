"""ffnjax: Flood-Filling Networks in JAX/Flax."""

from ffnjax.config import InferenceOptions, ModelConfig, logit

__all__ = ["InferenceOptions", "ModelConfig", "logit"]
__version__ = "0.1.0"
