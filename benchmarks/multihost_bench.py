"""Training examples/s: 1 process with 2 devices against 2 processes with 1 device each.

    python -m benchmarks.multihost_bench                  # a few minutes on 2 cores
    python -m benchmarks.multihost_bench --repeats 3 --steps 40

Both sides train the same run through `python -m experiments.train` on this
machine: one process with two XLA:CPU host devices (`FFNJAX_HOST_DEVICES=2`,
`--input-streams 2`), and two processes with one device each joined by
jax.distributed over 127.0.0.1 (gloo collectives), so they draw the same
examples and compute the same steps. The difference is what crossing a
process boundary costs: gradients all-reduced through gloo instead of inside
one XLA program once per FOV slot, the global batch assembled from two
processes, and the per-step SIGTERM agreement.

Each run takes 2 x `--steps` steps; examples/s is the run's own figure for its
second half (the first half holds the compilation). The sides alternate
(1x2, 2x1, 1x2, ...) so a busy phase of the machine hits both, and the ratio
is taken within each pair, then the median over pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_args(args: argparse.Namespace) -> list[str]:
    """The experiments.train flags both sides share."""
    return ["--depth", str(args.depth), "--features", str(args.features), "--fov", args.fov,
            "--deltas", args.deltas, "--synthetic-shape", args.synthetic_shape,
            "--synthetic-radius", "4", "--min-object-size", "50",
            "--batch-size", str(args.batch_size), "--fov-moves", "1", "--max-moves", "2",
            "--move-threshold", "0.01", "--steps", str(2 * args.steps),
            "--log-every", str(args.steps), "--checkpoint-every", str(100 * args.steps),
            "--image-every", str(100 * args.steps), "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, flags: list[str], devices: int) -> subprocess.Popen:
    env = dict(os.environ, FFNJAX_HOST_DEVICES=str(devices), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "experiments.train", "--workdir", str(workdir),
                             *flags], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _examples_per_s(procs: list[subprocess.Popen]) -> float:
    """Process 0's examples/s of the timed second half."""
    results = [p.communicate(timeout=1800) for p in procs]
    for p, (_, err) in zip(procs, results):
        if p.returncode:
            raise SystemExit(f"experiments.train failed ({p.returncode}):\n{err[-3000:]}")
    return float(json.loads(results[0][0].strip().splitlines()[-1])["examples_per_s"])


def one_by_two(workdir: Path, flags: list[str]) -> float:
    return _examples_per_s([_launch(workdir, [*flags, "--input-streams", "2"], devices=2)])


def two_by_one(workdir: Path, flags: list[str]) -> float:
    coordinator = f"127.0.0.1:{_free_port()}"
    return _examples_per_s([_launch(workdir, [*flags, "--coordinator", coordinator,
                                              "--num-processes", "2", "--process-id", str(i)],
                                    devices=1) for i in range(2)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multihost_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    p.add_argument("--repeats", type=int, default=2, help="pairs of runs (default 2)")
    p.add_argument("--depth", type=int, default=2, help="network depth (default 2)")
    p.add_argument("--features", type=int, default=8, help="features per layer (default 8)")
    p.add_argument("--fov", default="17,17,17", help="FOV z,y,x (default 17,17,17)")
    p.add_argument("--deltas", default="4,4,4", help="FOV move z,y,x (default 4,4,4)")
    p.add_argument("--batch-size", type=int, default=4, help="global batch (default 4)")
    p.add_argument("--synthetic-shape", default="32,64,64",
                   help="synthetic training volume z,y,x (default 32,64,64)")
    args = p.parse_args(argv)
    flags = run_args(args)
    load0 = os.getloadavg()[0]
    rates: dict[str, list[float]] = {"1 process x 2 devices": [], "2 processes x 1 device": []}
    with tempfile.TemporaryDirectory(prefix="multihost_bench_") as tmp:
        for r in range(args.repeats):
            rates["1 process x 2 devices"].append(one_by_two(Path(tmp) / f"a{r}", flags))
            rates["2 processes x 1 device"].append(two_by_one(Path(tmp) / f"b{r}", flags))
    ratios = [b / a for a, b in zip(*rates.values())]
    print(f"Training examples/s, depth {args.depth}, {args.features} features, FOV {args.fov}, "
          f"batch {args.batch_size}, FOV moves with one optimiser step per FOV slot, "
          f"{args.steps} timed steps per run; load average {load0:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after, {os.cpu_count()} cores\n")
    print("| configuration | examples/s (median) | each run |\n|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.3g} | "
              f"{', '.join(f'{v:.3g}' for v in values)} |")
    print(f"\nratio 2x1 / 1x2 (within each pair, median): {statistics.median(ratios):.3f} "
          f"(pairs: {', '.join(f'{x:.3f}' for x in ratios)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
