"""Orbax checkpoints that carry their own model configuration.

Layout of a workdir (one Orbax `CheckpointManager` under `workdir/checkpoints`)::

    checkpoints/<step>/state/         the state pytree: {'params': ...} for an
                                      imported or exported model; training adds
                                      its optimiser state, step and rng (and
                                      'ema', the weights' moving average, when
                                      it kept one)
    checkpoints/<step>/model_config/  ModelConfig as JSON
    checkpoints/<step>/meta/          free-form JSON (sampler state, provenance)

`load_checkpoint(workdir)` is the one call a notebook or the segmenter needs;
`inference_defaults(workdir)` gives the flood-fill settings the model was
trained with (meta['inference']), which the segmenters start from.

A checkpoint that cannot be read (a truncated file, a half-copied folder)
raises `CheckpointError`, a ValueError whose one-line message names the
checkpoint folder and, where it can be told, the file that failed
(`restore`); training then falls back to an older checkpoint
(`ffnjax.train_loop`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from ffnjax.config import INFERENCE_FACTS, InferenceOptions, ModelConfig

ITEMS = ("state", "model_config", "meta")


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be restored; the message names its
    folder and the file at fault. `step` is the checkpoint's step."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


# Orbax stores these items as plain JSON files inside a step folder.
_JSON_FILES = ("model_config/metadata", "meta/metadata", "state/_METADATA",
               "_CHECKPOINT_METADATA")


def _culprit(folder: Path, error: BaseException) -> str:
    """The file of `folder` that made a restore fail: the last local file that
    TensorStore names in the error, else the first JSON file that does not parse."""
    found = [f for f in re.findall(r'local file "([^"]+)"', str(error)) if not f.endswith("/")]
    if found:
        return found[-1]
    for name in _JSON_FILES:
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):
                return str(path)
    return ""


def restore(mngr: ocp.CheckpointManager, workdir: str | os.PathLike, step: int,
            args: ocp.args.Composite) -> Any:
    """`mngr.restore(step, args=args)`, with any failure to read the checkpoint
    raised as one `CheckpointError` line naming the checkpoint folder and the
    file at fault (Orbax and TensorStore errors are long and name neither
    reliably).

    Raises:
      CheckpointError: the checkpoint exists but cannot be read, or does not
        match the tree asked for.
    """
    folder = checkpoint_dir(workdir) / str(step)
    try:
        return mngr.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 -- Orbax/TensorStore raise many types; all mean unreadable
        culprit = _culprit(folder, e)
        first = " ".join(str(e).split())[:300] or type(e).__name__
        where = f" ({culprit})" if culprit else ""
        raise CheckpointError(f"checkpoint {folder} cannot be restored{where}: "
                              f"{type(e).__name__}: {first}", step) from e


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def make_manager(workdir: str | os.PathLike, *, max_to_keep: int | None = 3,
                 create: bool = True) -> ocp.CheckpointManager:
    """The CheckpointManager for `workdir` with ffnjax's composite items."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def inference_facts(meta: Mapping[str, Any]) -> dict[str, float]:
    """The INFERENCE_FACTS a checkpoint's meta records, as InferenceOptions fields.

    Args:
      meta: a checkpoint's free-form JSON. Its 'inference' entry is used when
        present. Otherwise the facts are derived from what training has always
        saved: the first training volume's normalisation ('image_means',
        'image_stddevs'; validation normalises the same way) and the training
        config's seed_prob / pad_prob ('train_config'), so older training runs
        give them too.

    Returns:
      {field: value} for the facts found; empty for a checkpoint that records
      none (an imported TensorFlow model), whose users keep InferenceOptions'
      defaults (google/ffn's 128 / 33 and 0.95 / 0.05: `config.IMAGE_MEAN` /
      `IMAGE_STDDEV` and the InferenceOptions defaults).
    """
    if "inference" in meta:
        return {k: _fact(k, v) for k, v in dict(meta["inference"]).items() if k in INFERENCE_FACTS}
    facts: dict[str, Any] = {}
    for key, field in (("image_means", "image_mean"), ("image_stddevs", "image_stddev")):
        if meta.get(key):
            facts[field] = float(meta[key][0])
    train = meta.get("train_config") or {}
    for key, field in (("seed_prob", "init_activation"), ("pad_prob", "pad_value"),
                       ("downsample", "downsample")):
        if key in train:
            facts[field] = _fact(field, train[key])
    return _drop_native_scale(facts)


def _drop_native_scale(facts: dict[str, Any]) -> dict[str, Any]:
    """Facts without a downsample of 1,1,1: the native scale is what a
    checkpoint that records none means, so older checkpoints read the same."""
    if tuple(facts.get("downsample", ())) == (1, 1, 1):
        facts = {k: v for k, v in facts.items() if k != "downsample"}
    return facts


def _fact(name: str, value: Any) -> float | tuple[int, ...]:
    """One inference fact as InferenceOptions holds it: the scale's z,y,x
    factors as ints, every other fact a float."""
    if name == "downsample":
        return tuple(int(v) for v in value)
    return float(value)


def save_args(state: Any, model_config: ModelConfig, meta: dict | None = None) -> ocp.args.Composite:
    """The composite save arguments for one checkpoint.

    A training meta (with 'train_config') gets its inference facts recorded
    under 'inference' (see `inference_facts`) unless it carries them already.
    """
    meta = dict(meta or {})
    if "inference" not in meta and inference_facts(meta):
        meta["inference"] = inference_facts(meta)
    return ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        model_config=ocp.args.JsonSave(model_config.to_dict()),
        meta=ocp.args.JsonSave(meta))


def save_model(workdir: str | os.PathLike, model_config: ModelConfig, params: Any,
               step: int = 0, meta: dict | None = None,
               inference: InferenceOptions | Mapping[str, float] | None = None) -> Path:
    """Writes `params` (and the config) as a checkpoint at `step`; returns its folder.

    Args:
      inference: the settings the model was trained with; its INFERENCE_FACTS
        (normalisation, seed / pad probabilities) are recorded in the meta for
        `inference_defaults`. None records none (segmenters then use
        InferenceOptions' defaults).

    Raises:
      ValueError: naming an `inference` key that is not one of INFERENCE_FACTS.
    """
    meta = dict(meta or {})
    if inference is not None:
        facts = inference.to_dict() if isinstance(inference, InferenceOptions) else dict(inference)
        if isinstance(inference, InferenceOptions):
            facts = {k: facts[k] for k in INFERENCE_FACTS}
        unknown = sorted(set(facts) - set(INFERENCE_FACTS))
        if unknown:
            raise ValueError(f"inference facts {unknown} are not recorded in a checkpoint; "
                             f"known: {list(INFERENCE_FACTS)}")
        meta["inference"] = _drop_native_scale({k: _fact(k, v) for k, v in facts.items()})
    mngr = make_manager(workdir, max_to_keep=None)
    mngr.save(step, args=save_args({"params": params}, model_config, meta), force=True)
    mngr.wait_until_finished()
    mngr.close()
    return checkpoint_dir(workdir) / str(step)


def latest_step(workdir: str | os.PathLike) -> int | None:
    """Newest complete checkpoint step in `workdir`, or None when there is none."""
    if not checkpoint_dir(workdir).is_dir():
        return None
    mngr = make_manager(workdir, create=False)
    try:
        return mngr.latest_step()
    finally:
        mngr.close()


def _resolve_step(mngr: ocp.CheckpointManager, workdir, step: int | None) -> int:
    steps = mngr.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint found in {checkpoint_dir(workdir)}")
    if step is None:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint at step {step} in {checkpoint_dir(workdir)}; "
                                f"available: {sorted(steps)}")
    return step


def load_model_config(workdir: str | os.PathLike, step: int | None = None) -> ModelConfig:
    """Only the ModelConfig of a checkpoint (cheap)."""
    mngr = _open_existing(workdir)
    try:
        step = _resolve_step(mngr, workdir, step)
        restored = restore(mngr, workdir, step,
                           ocp.args.Composite(model_config=ocp.args.JsonRestore()))
    finally:
        mngr.close()
    return ModelConfig.from_dict(restored["model_config"])


def load_checkpoint(workdir: str | os.PathLike, step: int | None = None, *,
                    use_ema: bool = True) -> tuple[ModelConfig, Any]:
    """Restores `(model_config, params)` from a workdir, the latest step by default.

    Works for training runs (the optimiser state is left on disk) and for
    imported TensorFlow models alike. Parameters come back as host NumPy arrays
    wrapped in the usual {'params': ...} linen tree. When training kept a
    moving average of the weights (`TrainConfig.ema_decay` > 0), that average
    is what comes back, the weights to segment with; `use_ema=False` returns
    the raw trained parameters instead.

    Raises:
      FileNotFoundError: naming the workdir (or step) that holds no checkpoint.
      CheckpointError: naming the checkpoint folder and the file that cannot
        be read.
    """
    mngr = _open_existing(workdir)
    try:
        step = _resolve_step(mngr, workdir, step)
        restored = restore(mngr, workdir, step, ocp.args.Composite(
            model_config=ocp.args.JsonRestore(),
            state=ocp.args.StandardRestore(_on_this_device(workdir, step))))
    finally:
        mngr.close()
    config = ModelConfig.from_dict(restored["model_config"])
    state = restored["state"]
    if "params" not in state:
        raise ValueError(f"checkpoint {checkpoint_dir(workdir) / str(step)} has no 'params' in its state")
    params = jax.tree_util.tree_map(np.asarray, state["ema"] if use_ema and "ema" in state
                                    else state["params"])
    return config, params


def _on_this_device(workdir: str | os.PathLike, step: int) -> Any:
    """The saved state's shapes and dtypes, placed on this process's first
    device: the restore target that reads a checkpoint whatever topology wrote
    it (Orbax refuses the saved shardings of a multi-process run otherwise);
    None when the metadata cannot be read, so that the restore itself fails
    with the message that names the file."""
    try:
        saved = ocp.StandardCheckpointHandler().metadata(checkpoint_dir(workdir) / str(step) / "state")
    except Exception:  # noqa: BLE001 -- unreadable metadata: `restore` names the file at fault
        return None
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                                 sharding=device), saved)


def load_meta(workdir: str | os.PathLike, step: int | None = None) -> dict:
    """The free-form JSON saved with a checkpoint."""
    mngr = _open_existing(workdir)
    try:
        step = _resolve_step(mngr, workdir, step)
        return dict(restore(mngr, workdir, step,
                            ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    finally:
        mngr.close()


def inference_defaults(workdir: str | os.PathLike, step: int | None = None) -> dict[str, float]:
    """The InferenceOptions fields the checkpoint's model was trained with.

    One call for a segmenter: `InferenceOptions(**{**inference_defaults(w), **flags})`.
    Keys are among INFERENCE_FACTS (image_mean, image_stddev, init_activation,
    pad_value, and downsample for a model trained at a coarser scale); a
    checkpoint recording none (an imported TensorFlow model) gives {}.

    Raises:
      FileNotFoundError: naming the workdir (or step) that holds no checkpoint.
    """
    return inference_facts(load_meta(workdir, step))


def _open_existing(workdir) -> ocp.CheckpointManager:
    if not checkpoint_dir(workdir).is_dir():
        raise FileNotFoundError(f"no checkpoints folder in workdir {Path(workdir)} "
                                f"(expected {checkpoint_dir(workdir)})")
    return make_manager(workdir, create=False)
