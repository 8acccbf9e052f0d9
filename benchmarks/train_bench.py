"""Training throughput: examples/s and the share of step time spent waiting for input.

    python -m benchmarks.train_bench                      # default model, synthetic + FIB-25
    python -m benchmarks.train_bench --small --steps 10   # a tiny net, seconds
    python -m benchmarks.train_bench --demo-model --data fib25 --augmentations each

For each data source it builds the same pieces `ffnjax.train_loop.train` uses
(balanced sampler, background prefetch thread, the sharded jitted step), runs
`--warmup` steps (compilation), then times `--steps` steps. "input wait" is the
time the loop blocks on the prefetch queue divided by the timed wall time; the
target is below 10% (the next batch is prepared while the device works).
"batch ms" is the host time to build one batch, measured alone before the run.

`--augmentations each` repeats the timing with the default augmentation
(reflections, y,x transposition), then with every opt-in augmentation of
`ffnjax.augment` alone, applied to every example (probability 1: the worst
case), then with all of them together; the compiled step is shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ffnjax.config import ModelConfig, TrainConfig
from ffnjax.inputs import Prefetcher, load_training_volumes, make_sampler
from ffnjax.step import AXIS, init_state, make_mesh, make_optimizer, make_sharded_step

FIB25 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fib25_training_sample2"


def fib25_specs() -> dict:
    """Image/label specs of FIB-25 z 0-99 (two 50-slice image files stacked along z,
    and a box of the 150-slice label file)."""
    return dict(images=(f"{FIB25 / 'raw_z000-049.npz'}:raw+{FIB25 / 'raw_z050-099.npz'}:raw",),
                labels=(f"{FIB25 / 'groundtruth_z000-149.npz'}:labels@0:100,:,:",))


# Each opt-in augmentation at its benchmark setting: applied to every example.
OPT_IN = {"permute_axes": dict(permute_axes=True),
          "elastic": dict(elastic_alpha=2.0, elastic_sigma=8.0),
          "rotation_2d": dict(rotation_degrees=10.0),
          "rotation_3d": dict(rotation_degrees=10.0, rotation_3d=True),
          "misalign": dict(misalign_prob=1.0, misalign_max=8),
          "missing_section": dict(missing_section_prob=1.0),
          "out_of_focus": dict(out_of_focus_prob=1.0, out_of_focus_sigma=2.0)}


def augmentation_variants(which: str, cubic: bool) -> dict[str, dict]:
    """{name: TrainConfig overrides} of the augmentation settings to time."""
    if which == "default":
        return {"default": {}}
    opt_in = {k: v for k, v in OPT_IN.items() if cubic or k != "permute_axes"}
    every = {k: v for o in opt_in.values() for k, v in o.items()}
    if which == "all":
        return {"all": every}
    return {"default": {}, **opt_in, "all": every}


def bench(config: TrainConfig, steps: int, warmup: int, volumes=None) -> dict:
    """Times `steps` steps after `warmup` steps; returns examples/s and input wait."""
    t0 = time.perf_counter()
    volumes = load_training_volumes(config) if volumes is None else volumes
    sampler = make_sampler(config, volumes)
    setup_s = time.perf_counter() - t0
    stream = sampler.get_state()        # the timed run then draws the usual batches
    t0 = time.perf_counter()
    for _ in range(3):
        sampler.batch(config.batch_size)
    batch_ms = 1000 * (time.perf_counter() - t0) / 3
    sampler.set_state(stream)
    mesh = make_mesh()
    by_example = NamedSharding(mesh, P(AXIS))
    optimizer = make_optimizer(config)
    state = jax.device_put(init_state(config, optimizer[0]), NamedSharding(mesh, P()))
    step = make_sharded_step(config, mesh, optimizer)
    prefetch = Prefetcher(sampler, config.batch_size, config.prefetch)
    try:
        def one(state):
            batch, _, waited = prefetch.get()
            batch = {k: jax.make_array_from_process_local_data(by_example, v) for k, v in batch.items()}
            state, metrics = step(state, batch)
            return state, metrics, waited

        t0 = time.perf_counter()
        for _ in range(warmup):
            state, metrics, _ = one(state)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        waited, moves = 0.0, []
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics, w = one(state)
            waited += w
            moves.append(metrics["moves"])
        jax.block_until_ready(state)
        wall = time.perf_counter() - t0
    finally:
        prefetch.close()
    return dict(examples_per_s=steps * config.batch_size / wall, step_ms=1000 * wall / steps,
                input_wait_fraction=waited / wall, moves=float(np.mean(jax.device_get(moves))),
                setup_s=setup_s, warmup_s=compile_s, devices=mesh.size, batch_ms=batch_ms)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("synthetic", "fib25", "both"), default="both",
                   help="training data to sample from (default both; fib25 is skipped when "
                        "../shared/data is absent)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first, incl. compilation (default 2)")
    p.add_argument("--batch-size", type=int, default=4, help="global batch (default 4)")
    p.add_argument("--fov-moves", type=int, default=1, help="in-example FOV lattice radius (default 1)")
    p.add_argument("--small", action="store_true",
                   help="tiny net (depth 2, 8 features, FOV 9^3, deltas 2) instead of the default model")
    p.add_argument("--demo-model", action="store_true",
                   help="the model `make demo` trains (experiments.demo's defaults)")
    p.add_argument("--augmentations", choices=("default", "all", "each"), default="default",
                   help="the augmentations to time: the default ones, every opt-in one of "
                        "ffnjax.augment together, or each alone then all (default: default)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    if args.small:
        model = ModelConfig(depth=2, features=8, fov_size=(9, 9, 9), deltas=(2, 2, 2))
    elif args.demo_model:
        from experiments.demo import build_parser, model_config
        model = model_config(build_parser().parse_args([]))
    else:
        model = ModelConfig()
    base = TrainConfig(model=model, batch_size=args.batch_size, fov_moves=args.fov_moves,
                       steps=args.steps + args.warmup, warmup_steps=0)
    sources = {"synthetic": dict(synthetic_shape=(48, 96, 96) if args.small else (64, 128, 128),
                                 synthetic_radius=3.0 if args.small else 6.0),
               "fib25": fib25_specs()}
    names = ["synthetic", "fib25"] if args.data == "both" else [args.data]
    results = {}
    for name in names:
        if name == "fib25" and not FIB25.is_dir():
            print(f"fib25: skipped ({FIB25} not present)")
            continue
        config = dataclasses.replace(base, **sources[name])
        volumes = load_training_volumes(config)
        cubic = len(set(config.crop_size)) == 1
        for aug_name, overrides in augmentation_variants(args.augmentations, cubic).items():
            r = bench(dataclasses.replace(config, **overrides), args.steps, args.warmup, volumes)
            key = name if args.augmentations == "default" else f"{name}/{aug_name}"
            results[key] = dict(r, augmentation=overrides)
            print(f"{key}: {r['examples_per_s']:.2f} examples/s ({r['step_ms']:.0f} ms/step, "
                  f"batch {config.batch_size} on {r['devices']} device(s)), input wait "
                  f"{100 * r['input_wait_fraction']:.1f}% of step time (batch {r['batch_ms']:.0f} "
                  f"ms on the host), {r['moves']:.1f} moves/example; "
                  f"setup {r['setup_s']:.1f} s, warmup {r['warmup_s']:.1f} s")
    summary = dict(model=model.to_dict(), batch_size=args.batch_size, fov_moves=args.fov_moves,
                   augmentations=args.augmentations, backend=jax.default_backend(),
                   results=results)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
