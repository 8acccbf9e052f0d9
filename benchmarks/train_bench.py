"""Training throughput: examples/s and the share of step time spent waiting for input.

    python -m benchmarks.train_bench                      # default model, synthetic + FIB-25
    python -m benchmarks.train_bench --small --steps 10   # a tiny net, seconds

For each data source it builds the same pieces `ffnjax.train_loop.train` uses
(balanced sampler, background prefetch thread, the sharded jitted step), runs
`--warmup` steps (compilation), then times `--steps` steps. "input wait" is the
time the loop blocks on the prefetch queue divided by the timed wall time; the
target is below 10% (the next batch is prepared while the device works).
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


def bench(config: TrainConfig, steps: int, warmup: int) -> dict:
    """Times `steps` steps after `warmup` steps; returns examples/s and input wait."""
    t0 = time.perf_counter()
    volumes = load_training_volumes(config)
    sampler = make_sampler(config, volumes)
    setup_s = time.perf_counter() - t0
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
                setup_s=setup_s, warmup_s=compile_s, devices=mesh.size)


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
        r = bench(config, args.steps, args.warmup)
        results[name] = r
        print(f"{name}: {r['examples_per_s']:.2f} examples/s ({r['step_ms']:.0f} ms/step, "
              f"batch {config.batch_size} on {r['devices']} device(s)), input wait "
              f"{100 * r['input_wait_fraction']:.1f}% of step time, {r['moves']:.1f} moves/example; "
              f"setup {r['setup_s']:.1f} s, warmup {r['warmup_s']:.1f} s")
    summary = dict(model=model.to_dict(), batch_size=args.batch_size, fov_moves=args.fov_moves,
                   backend=jax.default_backend(), results=results)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
