"""Flood-fill throughput: segmented voxels/s, FOV steps/s, and the share of wall
time spent outside the network's forward passes (target: below 10%).

    python -m benchmarks.segment_bench                       # both models, both data sets
    python -m benchmarks.segment_bench --models small --data synthetic \\
        --shape 32,64,64 --max-seeds 20 --batch-sizes 1,4    # a quick run

For each model ('default' = `ModelConfig()`, depth 9, 32 features, FOV
17x33x33, deltas 4,8,8; 'small' = depth 2, 8 features, FOV 9x17x17, deltas
2,4,4), data set and batch size the script segments one volume and reports:

* voxels/s: segmented voxels / segmentation wall time,
* steps/s: FOV evaluations / segmentation wall time,
* outside: 1 - (network calls x time of one forward call) / wall time, where
  the forward time is measured separately by a jitted loop of forward calls
  of the same batch shape (so it is the pure network cost on this device),
* loop ms/step: the same segmentation driven by the bare oracle (no
  convstack), wall time per FOV step: the machinery around the network
  measured directly (oracle runs only; the bare oracle breaks face-maximum
  ties differently, so its step count differs a little), and "direct" =
  loop ms/step x steps / wall time, the share of wall time this machinery
  takes. The two estimates agree on a quiet machine; under load from other
  processes the forward-based one is unreliable (it can even go negative),
  the direct one much less so.

Segmentation wall time is the seed loop after compilation (the fill is
compiled and warmed up on one seed first) and excludes the seed policy, which
is reported on its own.

Networks. Without `--checkpoint` no trained weights are needed: the network is
the convstack with random weights (so every call costs what the real one does)
whose output is replaced by the oracle's answer for the label volume it is fed
(`ffnjax.testing.oracle_apply_fn`, plus 1e-6 x tanh(convstack), which keeps
the convstack in the compiled program without changing any decision). The fill
then behaves like a perfect network on that data. Seeds come from the peaks
policy on the *raw* image. With `--checkpoint WORKDIR` the real network runs on
the raw image instead (its FOV replaces the model list).

Data. 'synthetic': `ffnjax.synthetic.make_volume` of --shape; 'fib25': a crop
(--fib25-bbox) of ../shared/data/fib25_training_sample2 (raw_z000-049 and the
ground truth), skipped when absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ffnjax import flood, seeds as seeds_lib, segmentation
from ffnjax.config import InferenceOptions, ModelConfig
from ffnjax.nets import init_params, make_apply_fn, normalize_image
from ffnjax.testing import ORACLE_OPTIONS, oracle_apply_fn

MODELS = {
    "default": ModelConfig(),
    "small": ModelConfig(depth=2, features=8, fov_size=(9, 17, 17), deltas=(2, 4, 4)),
}
FIB25 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fib25_training_sample2"


def oracle_driven_convstack(config: ModelConfig):
    """apply_fn with the convstack's cost and the oracle's decisions."""
    net = make_apply_fn(config)

    def apply_fn(params, image_fov, mask_logits_fov):
        cost = net(params, image_fov, mask_logits_fov)
        return oracle_apply_fn(None, image_fov, mask_logits_fov) + 1e-6 * jnp.tanh(cost)

    return apply_fn


def forward_seconds(apply_fn, params, config: ModelConfig, batch: int, reps: int = 20,
                    trials: int = 5) -> float:
    """Seconds per forward call of `batch` FOVs: a jitted chain of `reps` calls,
    best of `trials` (other load on the machine only ever adds time)."""
    shape = (batch, *config.fov_size, 1)
    img = jax.random.normal(jax.random.PRNGKey(0), shape)

    @jax.jit
    def chain(mask):
        return jax.lax.fori_loop(0, reps, lambda i, m: apply_fn(params, img, m), mask)

    mask = jnp.zeros(shape, jnp.float32)
    chain(mask).block_until_ready()
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        chain(mask).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best / reps


def load_data(name: str, shape, bbox) -> tuple[np.ndarray, np.ndarray] | None:
    if name == "synthetic":
        from ffnjax.synthetic import make_volume

        return make_volume(shape, seed=0)
    if name == "fib25":
        if not FIB25.exists():
            print(f"fib25 data not found at {FIB25}; skipped", file=sys.stderr)
            return None
        z0, y0, x0, dz, dy, dx = bbox
        if z0 + dz > 50:
            raise ValueError(f"--fib25-bbox {bbox} must stay within z 0..50 (raw_z000-049)")
        sel = np.s_[z0:z0 + dz, y0:y0 + dy, x0:x0 + dx]
        raw = np.load(FIB25 / "raw_z000-049.npz")["raw"][sel]
        labels = np.load(FIB25 / "groundtruth_z000-149.npz")["labels"][sel]
        return raw, labels
    raise ValueError(f"unknown data set {name!r}; expected 'synthetic' or 'fib25'")


def loop_overhead_ms(config: ModelConfig, image: np.ndarray, seeds: np.ndarray,
                     options: InferenceOptions) -> float:
    """Milliseconds per FOV step of the whole segment loop with the bare oracle
    (no convstack): the cost of the machinery around the network (queue, cuts,
    writes, face maxima, host commits), measured directly."""
    spec = flood.FillSpec.from_configs(image.shape, config, options)
    image_dev = normalize_image(image, options.image_mean, options.image_stddev)
    flood.run_fill(spec, oracle_apply_fn, None, image_dev, seeds[0]).canvas.block_until_ready()
    t0 = time.perf_counter()
    _, info = segmentation.segment(image, None, config, options, oracle_apply_fn, seeds=seeds, progress=False)
    wall = time.perf_counter() - t0 - info.timings["seeds"]
    return 1e3 * wall / max(info.counters["fov_steps"], 1)


def bench_one(config: ModelConfig, params, apply_fn, image: np.ndarray, seeds: np.ndarray,
              options: InferenceOptions, oracle: bool = True) -> dict[str, Any]:
    """Segments `image` from `seeds` after a warm-up fill; returns the figures."""
    if len(seeds) == 0:
        raise ValueError("no seeds to benchmark (volume too small for the FOV?)")
    spec = flood.FillSpec.from_configs(image.shape, config, options)
    image_dev = normalize_image(image, options.image_mean, options.image_stddev)
    t0 = time.perf_counter()
    flood.run_fill(spec, apply_fn, params, image_dev, seeds[0]).canvas.block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    seg, info = segmentation.segment(image, params, config, options, apply_fn, seeds=seeds, progress=False)
    wall = time.perf_counter() - t0 - info.timings["seeds"]
    # The network exactly as the fill calls it (split over the host devices
    # as the fill splits it, see ffnjax.flood.fill_devices).
    mesh = flood.fill_devices(spec, apply_fn)
    fwd = forward_seconds(flood.fill_network(apply_fn, mesh), params, config, options.batch_size)
    # An ideal fill evaluates one FOV per lattice cell and keeps all of its
    # prod(deltas) voxels: the forward pass then allows this many voxels/s.
    ideal = float(np.prod(config.deltas)) * options.batch_size / fwd
    c = info.counters
    loop_ms = loop_overhead_ms(config, image, seeds, options) if oracle else float("nan")
    return {
        "batch_size": options.batch_size, "seeds": len(seeds), "objects": c["committed"],
        "segmented_voxels": int(np.count_nonzero(seg)), "fov_steps": c["fov_steps"],
        "net_calls": c["net_calls"], "wall_s": round(wall, 3), "compile_s": round(compile_s, 2),
        "forward_ms": round(1e3 * fwd, 3),
        "voxels_per_s": round(np.count_nonzero(seg) / wall, 1),
        "steps_per_s": round(c["fov_steps"] / wall, 2),
        "outside_fraction": round(1.0 - c["net_calls"] * fwd / wall, 4),
        "ideal_voxels_per_s": round(ideal, 1),
        "of_ideal": round(np.count_nonzero(seg) / wall / ideal, 3),
        "devices": 1 if mesh is None else int(mesh.devices.size),
        "fill_s": round(info.timings["fill"], 3), "commit_s": round(info.timings["commit"], 3),
        "loop_ms_per_step": round(loop_ms, 4),
        "outside_fraction_direct": round(loop_ms * 1e-3 * c["fov_steps"] / wall, 4),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.segment_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="default,small",
                   help="comma list of 'default', 'small' (default both)")
    p.add_argument("--data", default="synthetic,fib25", help="comma list of 'synthetic', 'fib25'")
    p.add_argument("--shape", default="64,128,128", help="synthetic volume shape z,y,x (default 64,128,128)")
    p.add_argument("--fib25-bbox", default="0,0,0,50,128,128",
                   help="crop of fib25_training_sample2 z0,y0,x0,dz,dy,dx within z<50 (default 0,0,0,50,128,128)")
    p.add_argument("--batch-sizes", default="1,4", help="comma list of InferenceOptions.batch_size (default 1,4)")
    p.add_argument("--max-seeds", type=int, default=0, help="use only the first N seeds (0: all)")
    p.add_argument("--min-segment-size", type=int, default=100, help="InferenceOptions.min_segment_size (default 100)")
    p.add_argument("--checkpoint", default=None, metavar="WORKDIR",
                   help="benchmark this trained model on the raw image instead of the oracle-driven convstacks")
    p.add_argument("--json", default=None, metavar="PATH", help="also write all rows as JSON")
    return p


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    bbox = tuple(int(v) for v in args.fib25_bbox.split(","))
    batches = [int(b) for b in args.batch_sizes.split(",")]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{jax.local_device_count()} local device(s)")
    if args.checkpoint:
        from ffnjax.checkpoints import load_checkpoint

        cfg, params = load_checkpoint(args.checkpoint)
        models = {"checkpoint": (cfg, params, make_apply_fn(cfg))}
    else:
        models = {}
        for name in args.models.split(","):
            if name not in MODELS:
                raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
            cfg = MODELS[name]
            params = jax.jit(lambda k, c=cfg: init_params(c, k))(jax.random.PRNGKey(0))
            models[name] = (cfg, params, oracle_driven_convstack(cfg))
    rows = []
    for data_name in args.data.split(","):
        data = load_data(data_name, shape, bbox)
        if data is None:
            continue
        raw, labels = data
        for model_name, (cfg, params, apply_fn) in models.items():
            t0 = time.perf_counter()
            seeds = seeds_lib.peaks_seeds(raw, margin=cfg.fov_radius)
            seed_s = time.perf_counter() - t0
            if args.max_seeds:
                seeds = seeds[:args.max_seeds]
            image = raw if args.checkpoint else labels.astype(np.float32)
            extra = {} if args.checkpoint else ORACLE_OPTIONS
            for b in batches:
                opts = InferenceOptions(**extra, batch_size=b, min_segment_size=args.min_segment_size)
                row = {"data": data_name, "shape": list(raw.shape), "model": model_name,
                       "seed_policy_s": round(seed_s, 3),
                       **bench_one(cfg, params, apply_fn, image, seeds, opts,
                                   oracle=not args.checkpoint)}
                rows.append(row)
                print(f"{data_name:9s} {model_name:8s} batch {b:2d}: {row['voxels_per_s']:>10.1f} voxels/s "
                      f"{row['steps_per_s']:>8.2f} steps/s  outside forward {100 * row['outside_fraction']:5.1f}% "
                      f"(direct {100 * row['outside_fraction_direct']:4.1f}%)  "
                      f"({row['objects']} objects, {row['fov_steps']} steps, {row['net_calls']} calls, "
                      f"{row['forward_ms']} ms/call on {row['devices']} device(s), "
                      f"{100 * row['of_ideal']:.0f}% of an ideal fill's voxels/s, "
                      f"loop without net {row['loop_ms_per_step']} ms/step, "
                      f"wall {row['wall_s']} s)", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
