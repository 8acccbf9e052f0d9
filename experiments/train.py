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
volumes along z. Re-running the same
command resumes from the latest checkpoint in --workdir and continues the same
sample stream. Flags override --config (a TrainConfig JSON file); every flag
left out keeps the config's (or TrainConfig's) value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ffnjax.config import MOVE_POLICIES, OPTIMIZERS, TrainConfig


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--workdir", required=True,
                   help="output folder: checkpoints/, tensorboard/, images/, train_config.json; "
                        "an existing run there is resumed")
    g.add_argument("--config", help="TrainConfig JSON file to start from (flags override it)")
    g.add_argument("--steps", type=int, help=f"total optimiser steps (default {d.steps})")
    g.add_argument("--seed", type=int, help=f"seed of parameters, sampler and move orders (default {d.seed})")
    g.add_argument("--distributed", action="store_true", default=None,
                   help="call jax.distributed.initialize() first (multi-host runs; each host "
                        "feeds its share of the batch)")
    g.add_argument("--init-from", help="workdir whose latest parameters start a fresh run "
                                       "(e.g. an imported google/ffn model)")
    g.add_argument("--stop-at-step", type=int,
                   help="stop (with a checkpoint) at this step, keeping the --steps schedule")
    g.add_argument("--quiet", action="store_true", help="no progress bar or log lines")

    g = p.add_argument_group("data")
    g.add_argument("--image", action="append", metavar="SPEC",
                   help="training image volume (any spec ffnjax.volumes reads, optionally "
                        "SPEC@z0:z1,y0:y1,x0:x1, or SPEC1+SPEC2 stacked along z); repeat for "
                        "several volumes")
    g.add_argument("--labels", action="append", metavar="SPEC",
                   help="label volume of the preceding --image (same shape, integer ids, 0 = "
                        "unlabelled); repeat once per --image")
    g.add_argument("--mask", action="append", metavar="SPEC",
                   help="exclusion mask per volume (non-zero voxels are never centres and "
                        "carry no loss); give one per --image or none")
    g.add_argument("--image-mean", action="append", type=float,
                   help="normalisation mean, once per volume (default 128 for each)")
    g.add_argument("--image-stddev", action="append", type=float,
                   help="normalisation std, once per volume (default 33 for each)")
    g.add_argument("--synthetic-shape", help="z,y,x of the synthetic volume used without --image "
                                             f"(default {','.join(map(str, d.synthetic_shape))})")
    g.add_argument("--synthetic-seed", type=int, help=f"seed of the synthetic volume (default {d.synthetic_seed})")
    g.add_argument("--synthetic-radius", type=float,
                   help=f"median neurite radius of the synthetic volume (default {d.synthetic_radius})")
    g.add_argument("--min-object-size", type=int,
                   help=f"objects smaller than this are background for sampling (default {d.min_object_size})")
    g.add_argument("--cache-dir", help="cache balanced-sampling partitions here (default: none)")
    g.add_argument("--partial-crops", action="store_true", default=None,
                   help="let centres come within FOV//2 of a border (crop voxels outside the "
                        "volume carry no loss) instead of keeping the whole example crop inside")
    g.add_argument("--no-augment", action="store_true", default=None,
                   help="disable reflections and y,x transposition")
    g.add_argument("--brightness", type=float, help=f"brightness jitter amplitude (default {d.brightness})")
    g.add_argument("--contrast", type=float, help=f"contrast jitter amplitude (default {d.contrast})")

    g.add_argument("--val-image", action="append", metavar="SPEC",
                   help="held-out image volume for validation; repeatable")
    g.add_argument("--val-labels", action="append", metavar="SPEC",
                   help="labels of the preceding --val-image; repeatable")
    g.add_argument("--val-every", type=int, help=f"steps between validations (default {d.val_every})")
    g.add_argument("--val-examples", type=int,
                   help=f"fixed held-out examples per validation (default {d.val_examples})")

    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, help=f"convstack depth (default {d.model.depth})")
    g.add_argument("--features", type=int, help=f"features per conv (default {d.model.features})")
    g.add_argument("--fov", help="FOV size z,y,x, odd (default "
                                 f"{','.join(map(str, d.model.fov_size))})")
    g.add_argument("--deltas", help="FOV move step z,y,x (default "
                                    f"{','.join(map(str, d.model.deltas))})")
    g.add_argument("--bfloat16", action="store_true", default=None,
                   help="compute the network in bfloat16 (parameters stay float32)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int,
                   help=f"global batch, a multiple of the device count (default {d.batch_size})")
    g.add_argument("--learning-rate", type=float, help=f"peak learning rate (default {d.learning_rate})")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help=f"(default {d.optimizer})")
    g.add_argument("--warmup-steps", type=int, help=f"linear warmup before cosine decay (default {d.warmup_steps})")
    g.add_argument("--fov-moves", type=int,
                   help=f"lattice radius of in-example FOV moves, 0 = centre only (default {d.fov_moves})")
    g.add_argument("--move-policy", choices=MOVE_POLICIES, help=f"(default {d.move_policy})")
    g.add_argument("--max-moves", type=int,
                   help=f"cap on FOV moves per example beyond the centre, 0 = none (default {d.max_moves})")
    g.add_argument("--move-threshold", type=float, help=f"(default {d.move_threshold})")
    g.add_argument("--update-per-fov", action=argparse.BooleanOptionalAction, default=None,
                   help="one optimiser step per FOV slot, as google/ffn trains; "
                        "--no-update-per-fov: one step per batch on the summed losses of all its "
                        f"FOVs, the same compute (default {d.update_per_fov})")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, help=f"steps between metric lines (default {d.log_every})")
    g.add_argument("--checkpoint-every", type=int, help=f"steps between checkpoints (default {d.checkpoint_every})")
    g.add_argument("--image-every", type=int, help=f"steps between example PNGs (default {d.image_every})")
    g.add_argument("--keep-checkpoints", type=int, help=f"checkpoints kept (default {d.keep_checkpoints})")
    return p


# flag -> TrainConfig field for flags that map one to one
_DIRECT = {
    "steps": "steps", "seed": "seed", "distributed": "distributed", "init_from": "init_from",
    "image": "images", "labels": "labels", "mask": "masks", "image_mean": "image_means",
    "image_stddev": "image_stddevs", "synthetic_shape": "synthetic_shape",
    "synthetic_seed": "synthetic_seed", "synthetic_radius": "synthetic_radius",
    "min_object_size": "min_object_size",
    "cache_dir": "cache_dir", "brightness": "brightness", "contrast": "contrast",
    "batch_size": "batch_size", "learning_rate": "learning_rate", "optimizer": "optimizer",
    "warmup_steps": "warmup_steps", "fov_moves": "fov_moves", "move_policy": "move_policy",
    "max_moves": "max_moves", "update_per_fov": "update_per_fov",
    "move_threshold": "move_threshold", "log_every": "log_every",
    "checkpoint_every": "checkpoint_every", "image_every": "image_every",
    "keep_checkpoints": "keep_checkpoints", "val_image": "val_images", "val_labels": "val_labels",
    "val_every": "val_every", "val_examples": "val_examples",
}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed flags (raises ValueError naming a bad value)."""
    base = TrainConfig()
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path} does not exist")
        base = TrainConfig.from_json(path.read_text())
    changes = {field: getattr(args, flag) for flag, field in _DIRECT.items()
               if getattr(args, flag) is not None}
    if args.no_augment:
        changes["augment"] = False
    if args.partial_crops:
        changes["full_crop_margin"] = False
    model = {k: v for k, v in (("depth", args.depth), ("features", args.features),
                               ("fov_size", args.fov), ("deltas", args.deltas)) if v is not None}
    if args.bfloat16:
        model["compute_dtype"] = "bfloat16"
    if model:
        changes["model"] = dataclasses.replace(base.model, **model)
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    from ffnjax.train_loop import train  # after flag parsing: --help stays fast

    try:
        metrics = train(config, args.workdir, stop_at_step=args.stop_at_step, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        # Bad data is found while loading the volumes, before the first step.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({"workdir": str(Path(args.workdir).absolute()), **metrics}, sort_keys=True))
    return metrics


if __name__ == "__main__":
    main()
