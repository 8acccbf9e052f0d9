"""What a resumed training run may change, and the run's history.

A workdir's checkpoints were trained with one `TrainConfig` (saved in each
checkpoint's meta). Re-running `train` there resumes from its latest
checkpoint; the new config is compared with the saved one first, field by
field (`config_changes`):

* `SAFE_ON_RESUME` fields may change freely: `steps` (to extend a run; a
  cosine schedule then decays over the new total), the logging, validation
  and checkpoint periods, how many checkpoints are kept, the prefetch depth
  and the partition cache folder. None of them changes what the network
  learns from the examples it has seen.
* Any other difference (other data, a learning rate, the FOV moves, the
  augmentations, ...) is refused with the list of fields that differ, unless
  the run names them in `allowed` (`--allow-config-change FIELD,...`).
* `STRUCTURAL` changes make it another model (its depth, features, FOV or
  deltas) or alter the tree of the saved state (the optimiser, an EMA or a
  clipping stage added or removed): they are refused, allowed or not.

Every run appends one JSON line to ``workdir/config_history.jsonl``
(`record_run`): when, from which step, how it started ('new', 'resume',
'init_from') and each changed field with its old and new value, so a
changed run is visible afterwards. `init_from` runs start fresh from another
workdir's weights and are not compared with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from ffnjax.config import ModelConfig, TrainConfig

HISTORY_FILE = "config_history.jsonl"

SAFE_ON_RESUME = ("steps", "log_every", "checkpoint_every", "image_every", "val_every",
                  "keep_checkpoints", "prefetch", "cache_dir", "model.conv_impl")

# Fields whose change alters the saved state's shapes or tree: (field, the
# part of its value that matters).
_ON = lambda v: float(v) > 0  # noqa: E731
# The network's geometry counts too: a checkpoint belongs to one model.
STRUCTURAL = {"model.depth": None, "model.features": None, "model.fov_size": None,
              "model.deltas": None, "optimizer": None, "ema_decay": _ON, "clip_norm": _ON,
              "clip_value": _ON}


def flat(config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """{field: JSON value} with the model's fields as 'model.<field>'."""
    d = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    model = d.pop("model", {}) or {}
    d.update({f"model.{k}": v for k, v in dict(model).items()})
    return d


def saved_config(saved: Mapping[str, Any]) -> TrainConfig:
    """A checkpoint meta's 'train_config' as a TrainConfig (fields an older
    version did not save take today's defaults)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in dict(saved).items() if k in known})


def field_names(names: Iterable[str]) -> tuple[str, ...]:
    """Field names as `--allow-config-change` accepts them: 'learning_rate',
    'learning-rate', '--learning-rate', 'fov_size' or 'model.fov_size' (also
    the flags' spellings '--fov').

    Raises:
      ValueError: naming a name that is no TrainConfig or ModelConfig field.
    """
    known = set(flat(TrainConfig()))
    aliases = {"fov": "model.fov_size", "image": "images", "mask": "masks",
               "image_mean": "image_means", "image_stddev": "image_stddevs",
               "val_image": "val_images"}
    model = {f.name for f in dataclasses.fields(ModelConfig)}
    out = []
    for name in names:
        key = name.strip().lstrip("-").replace("-", "_")
        if not key:
            continue
        key = aliases.get(key, key)
        if key in model:
            key = f"model.{key}"
        if key not in known:
            raise ValueError(f"--allow-config-change: {name!r} is not a training or model field; "
                             f"known: {', '.join(sorted(known))}")
        out.append(key)
    return tuple(out)


def config_changes(old: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (old, new)} of every field that differs (model fields as 'model.x')."""
    a, b = flat(old), flat(new)
    return {k: (a.get(k), b[k]) for k in b if a.get(k) != b[k]}


def _shown(changes: Mapping[str, tuple[Any, Any]], names: Iterable[str]) -> str:
    def fmt(v):
        return ",".join(map(str, v)) if isinstance(v, list) else repr(v) if v == "" else str(v)
    return ", ".join(f"{k} {fmt(changes[k][0])} -> {fmt(changes[k][1])}" for k in names)


def check_resume(old: TrainConfig, new: TrainConfig, allowed: Iterable[str], workdir: str | Path
                 ) -> dict[str, tuple[Any, Any]]:
    """The changes from the saved config `old` to `new` when resuming is safe.

    Returns:
      {field: (old, new)} of every change (safe ones included), for the history.

    Raises:
      ValueError: one line naming the workdir and the fields that differ:
        structural changes always, others unless in `allowed`.
    """
    changes = config_changes(old, new)
    structural = [k for k, part in STRUCTURAL.items() if k in changes and (
        part is None or part(changes[k][0]) != part(changes[k][1]))]
    if structural:
        raise ValueError(
            f"workdir {workdir} holds checkpoints of a different model or optimiser "
            f"({_shown(changes, structural)}); their state cannot be restored with this "
            "config: use a new workdir (or --init-from to start from its weights)")
    allowed = set(field_names(allowed))
    refused = [k for k in changes if k not in SAFE_ON_RESUME and k not in allowed]
    if refused:
        names = ",".join(k.removeprefix("model.") for k in refused)
        raise ValueError(
            f"workdir {workdir} was trained with another configuration: "
            f"{_shown(changes, refused)}; resuming would silently change the run. Pass "
            f"--allow-config-change {names} to resume anyway (recorded in "
            f"{Path(workdir) / HISTORY_FILE}), or use a new workdir. These may change "
            f"freely on resume: {', '.join(SAFE_ON_RESUME)}")
    return changes


def record_run(workdir: str | Path, kind: str, step: int, config: TrainConfig,
               changes: Mapping[str, tuple[Any, Any]] | None = None,
               allowed: Iterable[str] = ()) -> Path:
    """Appends this run's line to ``workdir/config_history.jsonl`` and returns its path.

    Args:
      kind: 'new', 'resume' or 'init_from'.
      step: the step the run starts from.
      changes: {field: (old, new)} on resume.
      allowed: the fields the user allowed to change (`--allow-config-change`).
    """
    path = Path(workdir) / HISTORY_FILE
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": kind, "step": int(step),
             "changed": {k: {"from": a, "to": b} for k, (a, b) in (changes or {}).items()},
             "allowed": sorted(field_names(allowed)), "config": config.to_dict()}
    with open(path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def read_history(workdir: str | Path) -> list[dict]:
    """The runs recorded in ``workdir/config_history.jsonl``, oldest first."""
    path = Path(workdir) / HISTORY_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
