"""The named training recipes: ffnjax's own (the `TrainConfig` defaults) and
google/ffn's, as `TrainConfig.ffnjax(...)` / `TrainConfig.google_ffn(...)` and
`python -m experiments.train --recipe NAME`.

A recipe is a set of `TrainConfig` field values; both recipes set the same
fields (`RECIPE_FIELDS`), so applying one over a config file replaces every
choice the other made. Fields outside them (the data, the model, batch_size,
steps, ema_decay, the opt-in augmentations) keep whatever was given.

What google_ffn takes from google/ffn, and from where:

- optimiser (ffn/training/optimizer.py): learning rate 1e-3, momentum 0.9 with
  the 'momentum' optimiser (`MomentumOptimizer`). Their `--optimizer` flag
  defaults to 'sgd', which is plain gradient descent without momentum; get
  that with `momentum=0` (`--momentum 0`). Their
  `learning_rate_decay_factor` (0.94) and `num_epochs_per_decay` (2) flags are
  defined but never used, so the rate stays constant: schedule='constant',
  no warmup. schedule='exponential' applies them as a staircase, lr *
  lr_decay_factor ** floor(step / lr_decay_steps), with lr_decay_steps =
  num_epochs_per_decay * (examples per epoch) / batch size.
- clipping (ffn/training/model.py, `set_up_optimizer`): every gradient entry
  clipped to +-0.7 (`max_gradient_entry_mag`), no global-norm clipping.
- loss (model.py, `set_up_sigmoid_pixelwise_loss`): the mean of the weighted
  sigmoid cross-entropy over every voxel of the FOV batch
  (loss_normalization='voxels'); ffnjax divides the weighted sum by the summed
  weight instead, which differs wherever weights are zero.
- sampling (compute_partitions.py, build_coordinates.py): --min_size 10000
  (their flag default and README); thresholds, lom_radius = fov // 2 + deltas
  and margin = FOV radius + deltas are ffnjax's defaults already.
- augmentation (train.py): reflections of z, y, x and permutation of y, x
  (`reflectable_axes`, `permutable_axes`): ffnjax's defaults already.
- not in the recipes: batch_size (google/ffn's 64 suits a GPU; on a CPU
  ffnjax's 4 keeps a step to seconds); the FOV move policy, threshold 0.9 and
  seed / pad 0.95 / 0.05, which both share. The learning rate 1e-3 is
  google/ffn's for its batch of 64: at a batch of 2 the same rate destroys the
  converged published model within 10 steps, and fine-tuning it needs about
  1e-5 (measured in docs/google_ffn.md, "Fine-tuning google/ffn's published
  model").
"""

from __future__ import annotations

from typing import Any

from ffnjax.config import TrainConfig

RECIPE_FIELDS = ("optimizer", "momentum", "learning_rate", "schedule", "warmup_steps",
                 "clip_norm", "clip_value", "loss_normalization", "min_object_size", "augment",
                 "transpose_yx", "permute_axes")

RECIPES: dict[str, dict[str, Any]] = {
    "ffnjax": {f: getattr(TrainConfig(), f) for f in RECIPE_FIELDS},
    "google_ffn": dict(optimizer="sgd", momentum=0.9, learning_rate=1e-3, schedule="constant",
                       warmup_steps=0, clip_norm=0.0, clip_value=0.7, loss_normalization="voxels",
                       min_object_size=10000, augment=True, transpose_yx=True,
                       permute_axes=False),
}

__all__ = ["RECIPE_FIELDS", "RECIPES"]
