"""Train an FFN on labelled EM volumes (or on a synthetic volume when none is given).

    python -m experiments.train --workdir runs/synth --steps 2000
    D=../shared/data/fib25_training_sample2
    python -m experiments.train --workdir runs/fib25 \\
        --image "$D/raw_z000-049.npz:raw+$D/raw_z050-099.npz:raw" \\
        --labels "$D/groundtruth_z000-149.npz:labels@0:100,:,:" \\
        --val-image "$D/raw_z100-149.npz:raw" \\
        --val-labels "$D/groundtruth_z000-149.npz:labels@100:150,:,:" \\
        --fov 33,33,33 --deltas 8,8,8 --depth 12 --steps 100000

--image/--labels pair up in order and repeat for several volumes; a spec may
end in @z0:z1,y0:y1,x0:x1 to use a box of the volume, and SPEC1+SPEC2 stacks
volumes along z. Re-running the same command resumes from the latest
checkpoint in --workdir and continues the same sample stream. A resume with
another configuration is refused with the fields that differ, apart from
--steps, the logging / validation / checkpoint periods and a few more that
are safe to change (`ffnjax.resume.SAFE_ON_RESUME`); name the others in
--allow-config-change to resume anyway (each run is recorded in
WORKDIR/config_history.jsonl). A checkpoint that cannot be read is skipped
for the newest that can, saying so.

Several hosts train as one when every host runs the same command with
--coordinator HOST:PORT --num-processes N --process-id I (I = 0 on the host
at HOST), or with --distributed alone where the cluster says who is who (TPU
pod, SLURM, Kubernetes); the workdir must be on a filesystem they share.
Recipes: docs/multihost.md.

Every TrainConfig (and ModelConfig) field has a flag. Precedence, lowest
first: TrainConfig's defaults (the 'ffnjax' recipe), --config (a TrainConfig
JSON file), --recipe (google_ffn: google/ffn's optimiser, clipping, loss and
sampling; it sets only its own fields), then the flags; every flag left out
keeps the value below it. Each checkpoint records the normalisation and the
seed / pad probabilities it was trained with; experiments.segment and
experiments.segment_volume start from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from experiments import _cli
from ffnjax import interrupt, multihost
from ffnjax.config import ModelConfig, TrainConfig
from ffnjax.recipes import RECIPES

# The flag groups of --help: every TrainConfig field (and the model's) is in one.
GROUPS = {
    "run": ("steps", "seed", "distributed", "input_streams", "init_from"),
    "data": ("images", "labels", "masks", "downsample", "image_means", "image_stddevs", "synthetic_shape",
             "synthetic_seed", "synthetic_radius", "min_object_size", "partition_thresholds",
             "cache_dir", "full_crop_margin", "augment", "transpose_yx", "brightness", "contrast",
             "permute_axes", "elastic_alpha", "elastic_sigma", "rotation_degrees", "rotation_3d",
             "misalign_prob", "misalign_max", "missing_section_prob", "out_of_focus_prob",
             "out_of_focus_sigma", "prefetch", "val_images", "val_labels", "val_every",
             "val_examples"),
    "optimisation": ("batch_size", "learning_rate", "optimizer", "momentum", "warmup_steps",
                     "schedule", "end_lr_fraction", "lr_decay_factor", "lr_decay_steps",
                     "clip_norm", "clip_value", "loss_normalization", "ema_decay", "fov_moves",
                     "move_policy", "max_moves", "move_threshold", "update_per_fov", "seed_prob",
                     "pad_prob"),
    "logging and checkpoints": ("log_every", "checkpoint_every", "image_every",
                                "keep_checkpoints"),
}


def build_parser() -> argparse.ArgumentParser:
    """Flags of the run, then one per TrainConfig / ModelConfig field (default None:
    keep the --config file's value, else TrainConfig's)."""
    p = _cli.make_parser("train", __doc__)
    groups = {name: p.add_argument_group(name) for name in ("run", "data", "model", *GROUPS)}
    g = groups["run"]
    g.add_argument("--workdir", required=True,
                   help="output folder: checkpoints/, tensorboard/, images/, train_config.json; "
                        "an existing run there is resumed")
    g.add_argument("--config", help="TrainConfig JSON file to start from (flags override it)")
    g.add_argument("--recipe", choices=sorted(RECIPES),
                   help="a named training recipe (ffnjax.recipes): 'google_ffn' is google/ffn's "
                        "(SGD momentum 0.9, lr 1e-3 constant, per-entry clipping at 0.7, loss "
                        "averaged over all voxels, min object size 10000), 'ffnjax' the defaults; "
                        "it overrides --config's values of its fields, flags override both")
    g.add_argument("--stop-at-step", type=int,
                   help="stop (with a checkpoint) at this step, keeping the --steps schedule")
    g.add_argument("--allow-config-change", metavar="FIELD,...", default="",
                   help="resume although these fields differ from the saved run (e.g. "
                        "learning_rate,fov_moves); recorded in WORKDIR/config_history.jsonl. "
                        "Without it a resume with another config is refused, listing the "
                        "fields that differ (steps and the logging periods may always change)")
    m = p.add_argument_group("multi-process (docs/multihost.md)")
    m.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0, which serves jax.distributed's coordinator "
                        "there; with --num-processes and --process-id (implies --distributed)")
    m.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    m.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    m.add_argument("--init-timeout", type=float, default=multihost.INIT_TIMEOUT_S, metavar="S",
                   help="seconds to wait for the coordinator and every process before failing "
                        f"(default {multihost.INIT_TIMEOUT_S:g})")
    _cli.add_common(g, quiet="no progress bar or log lines")
    _cli.add_compile_cache(g)
    for name, fields in GROUPS.items():
        _cli.add_flags(groups[name], TrainConfig, _cli.TRAIN_FLAGS, fields)
    _cli.add_flags(groups["model"], ModelConfig, _cli.MODEL_FLAGS)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed flags (raises ValueError naming a bad value)."""
    base = TrainConfig()
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path} does not exist")
        base = TrainConfig.from_json(path.read_text())
    if args.recipe:
        base = dataclasses.replace(base, **RECIPES[args.recipe])
    changes = _cli.given(args, TrainConfig, _cli.TRAIN_FLAGS, [f for fs in GROUPS.values() for f in fs])
    model = _cli.given(args, ModelConfig, _cli.MODEL_FLAGS)
    if model:
        changes["model"] = _cli.build(ModelConfig, _cli.MODEL_FLAGS, base.model.to_dict(), model)
    elif changes.get("init_from") and not args.config:
        # Fine-tuning: the network is the one --init-from holds (e.g. google/ffn's
        # published model imported by experiments.import_tf), unless flags say otherwise.
        from ffnjax.checkpoints import load_model_config  # loads JAX: only on this path
        changes["model"] = load_model_config(changes["init_from"])
    return _cli.build(TrainConfig, _cli.TRAIN_FLAGS, base.to_dict(), changes)


def join_processes(args: argparse.Namespace, config: TrainConfig) -> None:
    """Joins the multi-process run the flags (or `config.distributed`) ask for."""
    explicit = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
                "--process-id": args.process_id}
    given = [k for k, v in explicit.items() if v is not None]
    if given and len(given) < 3:
        missing = [k for k in explicit if k not in given]
        raise ValueError(f"{', '.join(given)} needs {' and '.join(missing)} too "
                         "(--coordinator, --num-processes and --process-id go together)")
    if args.num_processes is not None and args.num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.process_id is not None and not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id must lie in 0..{args.num_processes - 1} "
                         f"(--num-processes {args.num_processes}), got {args.process_id}")
    if args.init_timeout <= 0:
        raise ValueError(f"--init-timeout must be positive, got {args.init_timeout:g}")
    if given or config.distributed:
        multihost.initialize(args.coordinator, args.num_processes, args.process_id,
                             timeout_s=args.init_timeout)


def main(argv: list[str] | None = None) -> dict:
    """Trains; bad input (flags, config, data) exits with status 2 and one error line."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        _cli.use_compile_cache(args)
        join_processes(args, config)
        from ffnjax.train_loop import train  # after flag parsing: --help stays fast

        # Bad data is found while loading the volumes, before the first step.
        metrics = train(config, args.workdir, stop_at_step=args.stop_at_step,
                        progress=not args.quiet,
                        allow_config_change=args.allow_config_change.split(","))
    except _cli.BAD_INPUT as e:
        raise SystemExit(_cli.report_error(e, args.debug)) from None
    except interrupt.Interrupted as e:  # checkpoint saved: the metrics so far, then the one line
        if e.result is not None:
            print(json.dumps({"workdir": str(Path(args.workdir).absolute()), **e.result},
                             sort_keys=True), flush=True)
        raise
    print(json.dumps({"workdir": str(Path(args.workdir).absolute()), **metrics}, sort_keys=True))
    return metrics


if __name__ == "__main__":
    _cli.run(main)
