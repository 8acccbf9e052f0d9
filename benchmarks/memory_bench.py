"""Peak memory of flood-filling a whole volume (target: a 250^3 volume within a few GB).

    python -m benchmarks.memory_bench                    # 250^3 synthetic volume, default model
    python -m benchmarks.memory_bench --shape 64,64,64   # quick

Segments a synthetic volume of --shape with `ffnjax.segmentation.segment` and reports
the process's peak resident memory (on CPU, JAX's device buffers live in host
memory, so this covers the device-side canvas, queue and network activations
as well as the host-side segmentation), next to the sizes of the volume-sized
arrays a fill needs: the float32 image and canvas on the device, the canvas
copied back per object, and the int64 segmentation.

The network is the oracle-driven convstack of `segment_bench` (the real
network's compiled program and activations, the oracle's decisions, so the
fill visits every object the way a perfect network would); `--max-seeds` and
`--max-steps` bound the run time, since memory does not grow with the number
of objects or steps.
The baseline RSS (after imports and data generation, before segmenting) is
reported separately, so the figure for segmentation is the difference.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def rss_mib() -> float:
    """Current resident set size of this process, MiB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="250,250,250", help="volume z,y,x (default 250,250,250)")
    p.add_argument("--model", choices=("default", "small"), default="default",
                   help="network whose cost the fill carries (default: ModelConfig())")
    p.add_argument("--max-seeds", type=int, default=3, help="seeds to fill (default 3)")
    p.add_argument("--max-steps", type=int, default=200,
                   help="FOV steps per fill at most (default 200; memory does not depend on it)")
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))

    import jax
    from benchmarks.segment_bench import MODELS, oracle_driven_convstack
    from ffnjax import nets, seeds as seeds_lib, segmentation, synthetic
    from ffnjax.config import InferenceOptions
    from ffnjax.testing import ORACLE_OPTIONS

    t0 = time.perf_counter()
    _, labels = synthetic.make_volume(shape, seed=0)
    image = labels.astype(np.float32)
    del labels
    config = MODELS[args.model]
    params = nets.init_params(config, 0)
    apply_fn = oracle_driven_convstack(config)
    options = InferenceOptions(**ORACLE_OPTIONS, min_segment_size=100, max_steps=args.max_steps)
    seeds = seeds_lib.grid_seeds(shape, options, margin=config.fov_radius)
    seeds = seeds[np.random.default_rng(0).permutation(len(seeds))[:args.max_seeds]]
    setup_s = time.perf_counter() - t0
    base = rss_mib()
    t0 = time.perf_counter()
    seg, info = segmentation.segment(image, params, config, options, apply_fn, seeds=seeds, progress=False)
    wall = time.perf_counter() - t0
    peak = peak_rss_mib()
    n = int(np.prod(shape))
    arrays = {"image float32 (host + device)": 2 * 4 * n, "canvas float32 (device + host copy)": 2 * 4 * n,
              "segmentation int64 (host)": 8 * n}
    print(f"volume {shape} ({n / 1e6:.1f} M voxels), model {args.model} {config.fov_size}, "
          f"{jax.local_device_count()} {jax.default_backend()} device(s)")
    print(f"setup (data, params) {setup_s:.1f} s; segmenting {len(seeds)} seeds: {wall:.1f} s, "
          f"{info.counters['fov_steps']} FOV steps, {int(np.count_nonzero(seg))} voxels segmented")
    print("| | MiB |\n|---|---|")
    print(f"| RSS before segmenting (imports, data, params) | {base:.0f} |")
    print(f"| peak RSS of the process | {peak:.0f} |")
    print(f"| peak - before = what segmenting added | {peak - base:.0f} |")
    for name, size in arrays.items():
        print(f"| {name} | {size / 2**20:.0f} |")
    return dict(shape=shape, base_mib=base, peak_mib=peak, added_mib=peak - base, seconds=wall)


if __name__ == "__main__":
    main()
