"""Time the published FFN convstack's forward pass in JAX and in TensorFlow, side by side.

    python -m benchmarks.forward_tf_vs_jax --batch 1 --repeats 5

Both run the same weights (google/ffn's FIB-25 checkpoint when present, random
weights of the same shape otherwise) on the same normalised FIB-25 (or random)
FOVs, on the CPU unless JAX/TensorFlow see an accelerator. The TensorFlow side
needs `tensorflow` (never an ffnjax dependency: install it in a separate
environment); without it only JAX is timed. Prints milliseconds per call,
FOVs per second, GFLOP/s and the largest logit difference between the two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.tf_reference import tensorflow_forward
from ffnjax.config import ModelConfig, logit
from ffnjax.nets import forward_flops, init_params, make_apply_fn, param_count
from ffnjax.tf_import import CheckpointReader, ffn_params_from_tensors, ffn_tensors_from_params

DEFAULT_CKPT = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
                / "ffn_fib25_checkpoint").resolve() / "model.ckpt-27465036"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.forward_tf_vs_jax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT),
                   help="google/ffn checkpoint prefix (random weights when it is missing)")
    p.add_argument("--depth", type=int, default=12, help="convstack depth (default 12)")
    p.add_argument("--fov", default="33,33,33", help="FOV z,y,x (default 33,33,33)")
    p.add_argument("--batch", type=int, default=1, help="FOVs per call (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up (default 5)")
    p.add_argument("--no-tf", action="store_true", help="time JAX only")
    return p.parse_args(argv)


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(first-call seconds incl. compilation, per-call seconds of the next `repeats`)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times


def main(argv=None) -> int:
    args = parse_args(argv)
    fov = tuple(int(v) for v in args.fov.split(","))
    config = ModelConfig(depth=args.depth, fov_size=fov, deltas=tuple(s // 4 for s in fov))
    if Path(f"{args.checkpoint}.index").is_file():
        tensors = CheckpointReader(args.checkpoint).read_all()
        params = ffn_params_from_tensors(tensors, config)
        source = args.checkpoint
    else:
        params = jax.tree_util.tree_map(np.asarray, init_params(config, 0))
        tensors = ffn_tensors_from_params(params)
        source = "random weights"
    rng = np.random.default_rng(0)
    image = rng.normal(size=(args.batch, *fov, 1)).astype(np.float32)
    mask = np.full((args.batch, *fov, 1), logit(0.05), np.float32)
    mask[(slice(None), *(s // 2 for s in fov), 0)] = logit(0.95)
    flops = forward_flops(config, args.batch)
    print(f"{source}: depth {args.depth}, FOV {fov}, batch {args.batch}, "
          f"{param_count(config):,} parameters, {flops / 1e9:.1f} GFLOP per call")
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}")

    apply_fn = jax.jit(make_apply_fn(config))
    p_dev, i_dev, m_dev = jax.device_put(params), jnp.asarray(image), jnp.asarray(mask)
    out = {}

    def run_jax():
        out["jax"] = apply_fn(p_dev, i_dev, m_dev).block_until_ready()

    rows = [("jax", *timed(run_jax, args.repeats))]
    if not args.no_tf:
        try:
            import tensorflow as tf
        except ImportError:
            print("tensorflow not importable: timing JAX only")
        else:
            print(f"TensorFlow {tf.__version__}")
            fn = tensorflow_forward(tensors, args.depth, image, mask, jit=True)
            i_tf, m_tf = tf.constant(image), tf.constant(mask)

            def run_tf():
                out["tf"] = fn(i_tf, m_tf).numpy()

            rows.append(("tensorflow", *timed(run_tf, args.repeats)))
    print(f"\n{'impl':<11} {'first s':>8} {'median ms':>10} {'FOV/s':>7} {'GFLOP/s':>8}")
    for name, first, times in rows:
        med = statistics.median(times)
        print(f"{name:<11} {first:8.2f} {med * 1e3:10.1f} {args.batch / med:7.2f} "
              f"{flops / med / 1e9:8.1f}")
    if "tf" in out:
        print(f"max |JAX - TF| logits: {np.abs(np.asarray(out['jax']) - out['tf']).max():.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
