"""The FFN training loop: `train(config, workdir)`, read top to bottom.

`python -m experiments.train` is a thin wrapper around `train`. The pieces it
puts together live in their own modules:

* `ffnjax.inputs` -- training volumes, the balanced sampler of each host, the
  validation batch and the background prefetch thread;
* `ffnjax.step` -- the optimiser (built once), the training state, the pure
  `train_step` and its data-parallel `jax.shard_map` form, evaluation;
* `ffnjax.fov_moves` -- the FOV moves inside an example, on the device;
* `ffnjax.checkpoints` -- Orbax checkpoints (state, model config, meta).

The loop has big_vision's train.py shape: mesh, input, model and optimiser,
update step, checkpoint restore, then one loop whose periodic actions (log,
validation, example image, checkpoint) all follow one rule (`due`). A run
resumes the same sample stream: the sampler state after each batch is saved
with the checkpoint taken after that batch's step.

Before any data is read, the workdir is probed for writing and, when it
holds checkpoints, the new config is compared with the saved one
(`ffnjax.resume`: changes other than the safe ones are refused unless
allowed); every run is recorded in ``workdir/config_history.jsonl``. A
checkpoint that cannot be read is skipped for the newest one that can (and
moved to ``workdir/checkpoints_unreadable/``, so that the run can save that
step again).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from ffnjax import checkpoints, devices, files, interrupt, multihost, resume, view
from ffnjax.checkpoints import load_checkpoint  # noqa: F401  (re-exported for notebooks)
from ffnjax.config import ModelConfig, TrainConfig
from ffnjax.inputs import (Prefetcher, load_training_volumes, load_validation_batch,
                           process_sampler, restore_streams, sampler_states)
from ffnjax.step import (AXIS, evaluate, inference_params, init_state, make_mesh, make_optimizer,
                         make_sharded_step, predict_example)
from ffnjax.volume_spec import local_paths
from ffnjax.volumes import read_spec  # noqa: F401  (alias: ffnjax.train_loop.read_spec, its old home)

__all__ = ["train", "due"]


# ----------------------------------------------------------------------------
# Helpers of the loop
# ----------------------------------------------------------------------------

def due(step: int, every: int, last: int) -> bool:
    """The one periodic-action rule: every `every` steps and at the last step."""
    return step % every == 0 or step == last


def _training_mesh(batch_size: int, process_count: int) -> Mesh:
    """The data-parallel mesh: every device, or the most devices of each
    process that share its share of the batch evenly (e.g. the per-core CPU
    devices of ffnjax.hostdevices with an odd batch size), in process order."""
    mesh = make_mesh()
    if batch_size % mesh.size:
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the process "
                             f"count {process_count}")
        n = len(devices.devices_for_batch(batch_size // process_count, jax.local_devices()))
        mesh = make_mesh([d for p in range(process_count)
                          for d in [d for d in jax.devices() if d.process_index == p][:n]])
    return mesh


def _check_workdir(config: TrainConfig, workdir: Path, allowed: tuple[str, ...]
                   ) -> tuple[int | None, dict]:
    """The checks made before any data is read: the workdir is not (inside) an
    input and can be written, and a resume keeps the saved config apart from
    safe or `allowed` changes (`ffnjax.resume.check_resume`).

    Returns:
      (the step of the newest checkpoint whose meta reads, or None for a new
      run; {field: (old, new)} of the changes).
    """
    inputs = [*config.images, *config.labels, *config.masks, *config.val_images,
              *config.val_labels]
    for spec in inputs:
        for path in local_paths(spec):
            if files.overlaps(workdir, path):
                raise ValueError(f"workdir {workdir} would be written over (or inside) the input "
                                 f"{spec}; choose another workdir")
    files.probe_writable(workdir, "workdir")
    if not checkpoints.checkpoint_dir(workdir).is_dir():
        return None, {}
    mngr = checkpoints.make_manager(workdir, create=False)
    try:
        for step in sorted(mngr.all_steps(), reverse=True):
            try:
                restored = checkpoints.restore(mngr, workdir, step, ocp.args.Composite(
                    meta=ocp.args.JsonRestore(), model_config=ocp.args.JsonRestore()))
            except checkpoints.CheckpointError:
                continue   # unreadable: the restore below skips it and says why
            saved = restored["meta"].get("train_config")
            if saved is None:   # a model saved without training (an import): its model only
                saved_model = ModelConfig.from_dict(restored["model_config"])
                saved_config = dataclasses.replace(config, model=saved_model)
            else:
                saved_config = resume.saved_config(saved)
            return step, resume.check_resume(saved_config, config, allowed, workdir)
        return None, {}
    finally:
        mngr.close()


def _restore(mngr: ocp.CheckpointManager, step: int, state: dict, config: TrainConfig,
             workdir: Path) -> tuple[dict, list[dict]]:
    """(state, every host's sampler state) of checkpoint `step`, restored with
    `state`'s shapes and shardings; refuses a checkpoint that does (not) keep
    the EMA `config.ema_decay` asks for, or holds another model.

    Raises:
      checkpoints.CheckpointError: the checkpoint cannot be read.
    """
    saved = checkpoints.restore(mngr, workdir, step,
                                ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved_ema = float(saved.get("train_config", {}).get("ema_decay", 0.0)) > 0
    if saved_ema != ("ema" in state):
        raise ValueError(f"workdir {workdir} holds a checkpoint {'with' if saved_ema else 'without'}"
                         f" an EMA of the weights but the config has ema_decay "
                         f"{config.ema_decay}; keep the run's ema_decay or use a new workdir")
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = checkpoints.restore(mngr, workdir, step, ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), model_config=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    saved_model = ModelConfig.from_dict(restored["model_config"])
    how = dict(conv_impl=config.model.conv_impl, compute_dtype=config.model.compute_dtype)
    if dataclasses.replace(saved_model, **how) != config.model:
        raise ValueError(f"workdir {workdir} holds a checkpoint of a different model "
                         f"({saved_model}) than the config ({config.model}); use a new workdir")
    return restored["state"], restored["meta"]["sampler_states"]


def _restore_newest(mngr: ocp.CheckpointManager, state: dict, config: TrainConfig,
                    workdir: Path, primary: bool) -> tuple[int, dict, list[dict]]:
    """(step, state, sampler states) of the newest checkpoint that restores.

    Newer checkpoints that cannot be read are skipped, each named with the
    file at fault on stderr, and moved to ``workdir/checkpoints_unreadable/``
    (kept, not deleted) so that the resumed run can save those steps again.

    Raises:
      ValueError: naming every checkpoint and why, when none restores (then
        nothing is moved).
    """
    skipped: list[checkpoints.CheckpointError] = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored_state, streams = _restore(mngr, step, state, config, workdir)
        except checkpoints.CheckpointError as e:
            skipped.append(e)
            continue
        if skipped and primary:
            aside = workdir / "checkpoints_unreadable"
            aside.mkdir(exist_ok=True)
            for e in skipped:
                dest = aside / str(e.step)
                n = 1
                while dest.exists():
                    dest, n = aside / f"{e.step}.{n}", n + 1
                shutil.move(str(checkpoints.checkpoint_dir(workdir) / str(e.step)), str(dest))
                print(f"skipped checkpoint {e.step}, it cannot be read ({e}); moved it to {dest} "
                      f"and resumed from step {step}", file=sys.stderr)
            mngr.reload()
        return step, restored_state, streams
    raise ValueError(f"no checkpoint in {checkpoints.checkpoint_dir(workdir)} can be restored: "
                     + "; ".join(str(e) for e in skipped))


def _init_from(state: dict, config: TrainConfig, tx: Any) -> dict:
    """`state` with the parameters of `config.init_from`'s latest checkpoint
    (its EMA when it kept one), a fresh optimiser state for them and the EMA
    (when this run keeps one) starting from them; refuses another architecture."""
    init_model, params = checkpoints.load_checkpoint(config.init_from)
    if init_model.fov_size != config.model.fov_size or init_model.depth != config.model.depth \
            or init_model.features != config.model.features:
        raise ValueError(f"init_from {config.init_from} holds model {init_model}, which does "
                         f"not match the config's {config.model}")
    fresh = dict(state, params=params, opt_state=tx.init(params))
    if "ema" in state:
        fresh["ema"] = jax.tree_util.tree_map(np.array, params)
    return fresh


def _interval_means(interval: list[dict], first: int, last: int) -> dict[str, float]:
    """Host means of the metrics of steps first..last; raises FloatingPointError
    naming those steps when the loss or the gradient norm is not finite."""
    host = {k: float(np.mean([jax.device_get(m[k]) for m in interval])) for k in interval[0]}
    if not all(math.isfinite(v) for v in (host["loss"], host["grad_norm"])):
        raise FloatingPointError(
            f"training diverged: loss {host['loss']} / grad norm {host['grad_norm']} "
            f"is not finite in steps {first}..{last}")
    return host


def _write_scalars(writer: SummaryWriter, prefix: str, values: dict[str, float], step: int):
    for k, v in values.items():
        writer.add_scalar(f"{prefix}/{k}", v, step)
    writer.flush()


def _example_png(path: Path, params: Any, batch: dict[str, np.ndarray], config: TrainConfig,
                 seed: int) -> Path:
    """Image / target / prediction of the batch's first example: the centre z
    slice and the centre y slice of its crop."""
    example = {k: v[:1] for k, v in batch.items()}
    prob, _ = predict_example(params, example, config, seed)
    img, tgt, prd = example["image"][0, ..., 0], example["target"][0, ..., 0], prob[0]
    gray = lambda a: np.repeat((np.clip(a, 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)  # noqa: E731
    cz, cy = img.shape[0] // 2, img.shape[1] // 2
    panels = [view.overlay(img[cz]), gray(tgt[cz]), gray(prd[cz]),
              view.overlay(img[:, cy]), gray(tgt[:, cy]), gray(prd[:, cy])]
    scale = max(1, 160 // max(img.shape))   # nearest-neighbour zoom so small crops are visible
    panels = [np.repeat(np.repeat(p, scale, 0), scale, 1) for p in panels]
    return view.save_png(path, view.montage(panels, ncols=3))


# ----------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------

def train(config: TrainConfig, workdir: str | Path, *, stop_at_step: int | None = None,
          progress: bool = True, allow_config_change: Sequence[str] = ()) -> dict[str, float]:
    """Trains (or resumes training) in `workdir`; returns the final metrics.

    Writes `workdir/checkpoints/<step>/` (Orbax: state, model_config, meta),
    `workdir/tensorboard/` (event files), `workdir/images/step_NNNNNN.png`
    and `workdir/train_config.json`.

    Args:
      config: the run; `config.steps` is the total, a resumed run continues
        from the latest checkpoint up to it.
      workdir: output folder (created).
      stop_at_step: stop (with a checkpoint) at this step although the schedule
        runs to `config.steps` -- a clean stand-in for a pre-emption.
      progress: show a tqdm bar and print log lines.
      allow_config_change: TrainConfig fields (model fields as 'fov_size' or
        'model.fov_size') a resumed run may change beyond
        `ffnjax.resume.SAFE_ON_RESUME`; recorded in config_history.jsonl.

    Returns:
      dict with step, loss, precision, recall, f1, moves, learning_rate,
      grad_norm (means over the last logging interval), examples_per_s,
      input_wait_fraction and wall_s (of this session).

    Raises:
      ValueError / FileNotFoundError: bad data or configuration, before any
        step; a resume whose config differs from the saved one
        (`ffnjax.resume.check_resume`), before any data is read.
      OSError: a workdir that cannot be written, before any data is read.
      FloatingPointError: the loss became NaN or infinite (naming the steps).
      ffnjax.interrupt.Interrupted: SIGTERM or SIGINT (on any process) stopped
        the run at the end of a step, after a checkpoint of it was saved; its
        `result` holds the metrics so far (a second signal stops at once).
    """
    t_start = time.perf_counter()
    workdir = Path(workdir)

    # --- Workdir (checked before any data is read or anything compiled) ----------
    allowed = resume.field_names(allow_config_change)
    _, changes = _check_workdir(config, workdir, allowed)

    # --- Mesh -------------------------------------------------------------------
    if config.distributed:   # the environment form, unless the caller joined already
        multihost.initialize()   # (experiments.train: --coordinator, ffnjax.multihost)
    multihost.check_same_config(config, stop_at_step=stop_at_step)
    process_index, process_count = jax.process_index(), jax.process_count()
    primary = process_index == 0
    mesh = _training_mesh(config.batch_size, process_count)
    replicated = NamedSharding(mesh, P())
    by_example = NamedSharding(mesh, P(AXIS))
    local_batch = config.batch_size // process_count

    # --- Input (fails here, before any compilation, on bad data) ---------------
    volumes = load_training_volumes(config)
    sampler = process_sampler(config, volumes, process_index, process_count)
    val_batch = load_validation_batch(config) if primary else None

    def to_global(batch_np: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        # Each host hands in its own share; jax assembles the global batch.
        return {k: jax.make_array_from_process_local_data(by_example, v)
                for k, v in batch_np.items()}

    # --- Model and optimiser (the optimiser and its schedule built once) -------
    optimizer = make_optimizer(config)
    tx, _ = optimizer
    state = jax.device_put(init_state(config, tx), replicated)

    # --- Update step ----------------------------------------------------------------
    step_fn = make_sharded_step(config, mesh, optimizer)

    # --- Checkpoint restore -------------------------------------------------------
    # Resume order:
    # 1. the newest checkpoint in workdir that restores (newer unreadable ones
    #    are skipped and moved aside): the full state and every host's sampler
    #    stream (a resumed run continues the uninterrupted one); its config was
    #    compared with this one before the data was read (_check_workdir);
    # 2. else `config.init_from`: its parameters only, a fresh optimiser state
    #    (a fresh run: not compared with init_from's config);
    # 3. else the fresh initialisation from `config.seed` (above).
    workdir.mkdir(parents=True, exist_ok=True)
    mngr = checkpoints.make_manager(workdir, max_to_keep=config.keep_checkpoints)
    latest = mngr.latest_step()
    multihost.check_same("the latest checkpoint step", latest,
                         hint=f"every process needs the same workdir ({workdir}), on a shared filesystem")
    if latest is not None:                                              # (1)
        latest, state, saved_streams = _restore_newest(mngr, state, config, workdir, primary)
        restore_streams(sampler, saved_streams, process_index, process_count)
        kind = "resume"
        if primary and progress:
            print(f"resuming from step {latest} of {checkpoints.checkpoint_dir(workdir)}")
    elif config.init_from:                                              # (2)
        state = jax.device_put(_init_from(state, config, tx), replicated)
        kind, changes = "init_from", {}
    else:                                                               # (3)
        kind, changes = "new", {}
    step = int(state["step"])
    end = config.steps if stop_at_step is None else min(config.steps, int(stop_at_step))
    if primary:
        resume.record_run(workdir, kind, step, config, changes, allowed)
        files.write_bytes(workdir / "train_config.json", config.to_json().encode())

    def save(at_step: int, sampler_state: dict):
        if at_step in mngr.all_steps():
            return
        meta = dict(sampler_states=sampler_states(sampler_state), train_config=config.to_dict(),
                    image_means=[v.mean for v in volumes], image_stddevs=[v.stddev for v in volumes],
                    examples_seen=at_step * config.batch_size)
        mngr.save(at_step, args=checkpoints.save_args(state, config.model, meta), force=True)
        mngr.wait_until_finished()

    # --- Logging and evals ----------------------------------------------------------
    writer = SummaryWriter(str(workdir / "tensorboard")) if primary else None
    if primary and progress:
        print(f"training {config.model} on {mesh.size} device(s), global batch {config.batch_size}\n"
              f"  checkpoints: {checkpoints.checkpoint_dir(workdir)}\n"
              f"  tensorboard: {workdir / 'tensorboard'}")
    def validate(at_step: int, write) -> dict[str, float]:
        val = evaluate(jax.device_get(inference_params(state)), val_batch, config)
        _write_scalars(writer, "val", val, at_step)
        if progress:
            write(f"step {at_step} validation: " + " ".join(f"{k}={v:.4g}" for k, v in val.items()))
        return {f"val_{k}": v for k, v in val.items()}

    # SIGTERM / SIGINT: checkpoint at the end of the step, then stop (a second
    # signal of a kind acts at once); `interrupt.flagged()` says which came.
    with interrupt.flagging():
        # A run that starts from another model's weights (fine-tuning) is first
        # validated as it starts, so its curve shows what training changed.
        initial_val = (validate(step, print) if val_batch is not None and kind == "init_from"
                       else {})

        # --- Loop -------------------------------------------------------------------------
        sampler_state = sampler.get_state()
        prefetcher = Prefetcher(sampler, local_batch, config.prefetch)
        final: dict[str, float] = {}
        stopped = False
        last_val: dict[str, float] = {}
        interval: list[dict] = []
        t_interval, waited, last_logged = time.perf_counter(), 0.0, step
        bar = tqdm(total=end, initial=step, disable=not (primary and progress), unit="step",
                   dynamic_ncols=True)
        try:
            while step < end:
                batch_np, sampler_state, wait = prefetcher.get()
                waited += wait
                state, metrics = step_fn(state, to_global(batch_np))
                step += 1
                # Keep at most one step in flight: wait for the previous step so the
                # bar's rate and ETA are true and the host never runs far ahead.
                if interval:
                    jax.block_until_ready(interval[-1])
                interval.append(metrics)
                bar.update(1)
                if due(step, config.log_every, end):
                    host = _interval_means(interval, last_logged + 1, step)
                    elapsed = time.perf_counter() - t_interval
                    host["examples_per_s"] = len(interval) * config.batch_size / elapsed
                    host["input_wait_fraction"] = waited / elapsed
                    if writer is not None:
                        _write_scalars(writer, "train", host, step)
                    if primary and progress:
                        bar.write(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in host.items()))
                    final = dict(host, step=step)
                    interval, t_interval, waited, last_logged = [], time.perf_counter(), 0.0, step
                if val_batch is not None and due(step, config.val_every, end):
                    last_val = validate(step, bar.write)
                if primary and due(step, config.image_every, end):
                    _example_png(workdir / "images" / f"step_{step:06d}.png",
                                 jax.device_get(inference_params(state)), batch_np, config, seed=step)
                received = interrupt.flagged()
                stop = multihost.any_process(received is not None)   # SIGTERM on any host
                if due(step, config.checkpoint_every, end) or stop:
                    save(step, sampler_state)
                if stop:
                    name = signal.Signals(received).name if received else "SIGTERM on another process"
                    if primary and progress:
                        bar.write(f"{name}: saved checkpoint at step {step}, stopping")
                    stopped = True
                    break
            save(step, sampler_state)
        finally:
            bar.close()
            prefetcher.close()
            mngr.close()
            if writer is not None:
                writer.close()
            received = interrupt.flagged()
    metrics = dict(final, **last_val, **{f"initial_{k}": v for k, v in initial_val.items()},
                   step=step, wall_s=time.perf_counter() - t_start)
    if stopped:
        raise interrupt.Interrupted(
            received or signal.SIGTERM, result=metrics,
            resume=f"checkpoint saved at step {step} in {workdir}; rerun the same command to resume")
    return metrics
