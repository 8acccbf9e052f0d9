"""Forward pass of the FFN convstack: ffnjax's convolution formulations against
TensorFlow on the same CPU, measured in one run with interleaved repeats.

    python benchmarks/forward_bench.py                      # full table
    python benchmarks/forward_bench.py --quick              # small smoke run
    python benchmarks/forward_bench.py --tf-python /work/tfbench/bin/python

Each measured configuration lives in a worker subprocess that compiles once
and then answers "time one call of case i" requests: one JAX worker per host
device count (XLA_FLAGS=--xla_force_host_platform_device_count=D, work spread
over the devices: the batch when it has a FOV per device
(`benchmarks.sharded_forward`), else each FOV in z slabs (`ffnjax.fovsplit`,
what a batch-1 fill uses; `--fov-split channels`: each layer's output
channels, the older split that lost) and, when a Python
with TensorFlow is available, one TensorFlow worker running the same network
with the same weights (checked: outputs are compared). The parent walks all
cases round-robin for every repeat, so slow and fast phases of a noisy machine
hit every case alike, and reports medians. Prints a Markdown table: time per
FOV, GFLOP/s (from `ffnjax.nets.forward_flops`) and the ratio to TensorFlow
at the same batch (below 1: faster than TensorFlow).
"""

from __future__ import annotations

import argparse
import json
import os
import platform as pyplatform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NETS = {
    # google/ffn's published FIB-25 model: depth 12, FOV 33^3.
    "ffn12_33": dict(depth=12, features=32, fov_size=(33, 33, 33), deltas=(8, 8, 8)),
    # ffnjax's ModelConfig() default.
    "default9": dict(depth=9, features=32, fov_size=(17, 33, 33), deltas=(4, 8, 8)),
    # the shipped demo model (models/demo_synthetic) and the FIB-25 nets trained like it.
    "demo5": dict(depth=5, features=16, fov_size=(17, 17, 17), deltas=(4, 4, 4)),
    # 32 features on small cubes: where splitting one FOV over the cores starts to pay
    # (ffnjax.fovsplit.AUTO_MIN_LAYER_FLOPS; 0.12 and 0.27 GFLOP per 3x3x3 convolution).
    "f32_13": dict(depth=5, features=32, fov_size=(13, 13, 13), deltas=(3, 3, 3)),
    "f32_17": dict(depth=5, features=32, fov_size=(17, 17, 17), deltas=(4, 4, 4)),
    # a tiny net for --quick smoke runs.
    "tiny": dict(depth=2, features=8, fov_size=(9, 9, 9), deltas=(2, 2, 2)),
}


# --------------------------------------------------------------------------- workers

def _inputs(net: dict, batch: int, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    shape = (batch, *net["fov_size"], 1)
    return rng.normal(size=shape).astype("float32"), rng.normal(size=shape).astype("float32")


def _serve(cases, run_case, first_outputs=None) -> None:
    """Worker loop: print one JSON 'ready' line, then one timing line per request."""
    out = sys.stdout
    print(json.dumps({"ready": True, "outputs": first_outputs or {}}), file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        print(json.dumps({"seconds": run_case(req["case"])}), file=out, flush=True)


def jax_worker(args) -> None:
    """Compiles every (net, impl, dtype, batch) case, saves weights for the TF worker."""
    import numpy as np
    import jax
    sys.path.insert(0, str(REPO))
    from benchmarks.sharded_forward import sharded_forward
    from ffnjax import fovsplit, nets
    from ffnjax.config import ModelConfig
    from ffnjax.tf_import import ffn_tensors_from_params

    spec = json.loads(args.worker_spec)
    fns, feeds = [], []
    outputs = {}
    for case in spec["cases"]:
        net = NETS[case["net"]]
        cfg = ModelConfig(**net, conv_impl=case["impl"], compute_dtype=case["dtype"])
        params = nets.init_params(cfg, 0)
        apply_fn = nets.make_apply_fn(cfg)
        img, msk = _inputs(net, case["batch"])
        img, msk = jax.device_put(img), jax.device_put(msk)
        if jax.device_count() > 1 and case["batch"] < jax.device_count() and spec["fov_split"] == "z":
            jitted = jax.jit(fovsplit.split_apply(apply_fn, fovsplit.z_mesh(jax.local_devices())))
            fn = lambda p=params, j=jitted, i=img, m=msk: j(p, i, m)  # noqa: E731
        elif jax.device_count() > 1:
            split = "batch" if case["batch"] >= jax.device_count() else "channels"
            fn = lambda p=params, a=apply_fn, i=img, m=msk, s=split: sharded_forward(  # noqa: E731
                a, p, i, m, split=s)
        else:
            jitted = jax.jit(apply_fn)
            fn = lambda p=params, j=jitted, i=img, m=msk: j(p, i, m)  # noqa: E731
        y = fn().block_until_ready()
        fns.append(fn)
        key = case["net"]
        wpath = Path(spec["tmpdir"]) / f"{key}_weights.npz"
        if not wpath.exists():  # the TF worker runs the same weights
            np.savez(wpath, **ffn_tensors_from_params(params))  # google/ffn's variable names
        if case["batch"] == 1 and case["dtype"] == "float32" and key not in outputs:
            outputs[key] = np.asarray(y).ravel()[:: max(1, y.size // 4096)].tolist()

    def run_case(i: int) -> float:
        t = time.perf_counter()
        fns[i]().block_until_ready()
        return time.perf_counter() - t

    _serve(spec["cases"], run_case, outputs)


def tf_worker(args) -> None:
    """The same convstack in TensorFlow (tf.nn.conv3d under tf.function, oneDNN)."""
    import numpy as np
    import tensorflow as tf
    sys.path.insert(0, str(REPO))
    from benchmarks.tf_reference import tensorflow_forward

    spec = json.loads(args.worker_spec)
    fns = []
    outputs = {}
    for case in spec["cases"]:
        net = NETS[case["net"]]
        w = np.load(Path(spec["tmpdir"]) / f"{case['net']}_weights.npz")
        img, msk = _inputs(net, case["batch"])
        # The importer's TensorFlow reference of the same convstack, compiled once.
        forward = tensorflow_forward({k: w[k] for k in w.files}, net["depth"], img, msk, jit=True)
        img, msk = tf.constant(img), tf.constant(msk)
        y = forward(img, msk).numpy()
        fns.append(lambda f=forward, i=img, m=msk: f(i, m).numpy())
        if case["batch"] == 1 and case["net"] not in outputs:
            outputs[case["net"]] = y.ravel()[:: max(1, y.size // 4096)].tolist()

    def run_case(i: int) -> float:
        t = time.perf_counter()
        fns[i]()
        return time.perf_counter() - t

    _serve(spec["cases"], run_case, outputs)


# --------------------------------------------------------------------------- parent

class Worker:
    """A worker subprocess answering timing requests over stdin/stdout."""

    def __init__(self, python: str, kind: str, cases: list[dict], tmpdir: str, env: dict,
                 fov_split: str = "z"):
        self.cases = cases
        spec = json.dumps({"cases": cases, "tmpdir": tmpdir, "fov_split": fov_split})
        self.proc = subprocess.Popen(
            [python, __file__, "--worker", kind, "--worker-spec", spec],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env, cwd=str(REPO))
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            raise RuntimeError(f"{kind} worker failed to start:\n{err[-3000:]}")
        self.outputs = json.loads(line)["outputs"]

    def time(self, i: int) -> float:
        self.proc.stdin.write(json.dumps({"case": i}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker died:\n{self.proc.stderr.read()[-3000:]}")
        return json.loads(line)["seconds"]

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()


def _has_tf(python: str) -> bool:
    if not python or not Path(python).exists():
        return False
    r = subprocess.run([python, "-c", "import tensorflow"], capture_output=True)
    return r.returncode == 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return pyplatform.processor() or "unknown CPU"


def run(args) -> str:
    import numpy as np
    sys.path.insert(0, str(REPO))
    from ffnjax.config import ModelConfig
    from ffnjax.nets import forward_flops

    tmpdir = tempfile.mkdtemp(prefix="forward_bench_")
    base_env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    base_env["JAX_PLATFORMS"] = "cpu"
    jax_workers, tf_worker_ = [], None
    for d in args.devices:
        cases = [dict(net=n, impl=i, dtype=t, batch=b)
                 for n in args.nets for i in args.impls for t in args.dtypes for b in args.batches]
        env = dict(base_env, XLA_FLAGS=f"--xla_force_host_platform_device_count={d}")
        print(f"compiling {len(cases)} JAX cases on {d} host device(s)...", file=sys.stderr, flush=True)
        w = Worker(sys.executable, "jax", cases, tmpdir, env, args.fov_split)
        w.devices = d
        jax_workers.append(w)
    use_tf = _has_tf(args.tf_python)
    if use_tf:
        cases = [dict(net=n, batch=b) for n in args.nets for b in args.batches]
        print(f"compiling {len(cases)} TensorFlow cases...", file=sys.stderr, flush=True)
        tf_worker_ = Worker(args.tf_python, "tf", cases, tmpdir, base_env)
    else:
        print(f"no TensorFlow at --tf-python {args.tf_python!r}: JAX only", file=sys.stderr)

    workers = jax_workers + ([tf_worker_] if tf_worker_ else [])
    times = {(id(w), i): [] for w in workers for i in range(len(w.cases))}
    for r in range(args.repeats):
        order = workers if r % 2 == 0 else workers[::-1]
        for w in order:
            for i in range(len(w.cases)):
                times[(id(w), i)].append(w.time(i))
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    load = os.getloadavg()
    for w in workers:
        w.close()

    tf_med = {}
    if tf_worker_:
        for i, c in enumerate(tf_worker_.cases):
            tf_med[(c["net"], c["batch"])] = float(np.median(times[(id(tf_worker_), i)]))
    lines = [
        f"Forward pass, {_cpu_name()}, {len(os.sched_getaffinity(0))} cores, "
        f"median of {args.repeats} interleaved repeats; load average during the run "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.",
        "",
        "| net | impl | dtype | host devices (split) | batch | ms / FOV | GFLOP/s | JAX / TF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in args.nets:
        cfg = ModelConfig(**NETS[n])
        for b in args.batches:
            if (n, b) in tf_med:
                s = tf_med[(n, b)]
                lines.append(f"| {n} | TensorFlow (oneDNN) | float32 | - | {b} | {1e3 * s / b:.1f} | "
                             f"{forward_flops(cfg, b) / s / 1e9:.1f} | 1.00 |")
            for w in jax_workers:
                for i, c in enumerate(w.cases):
                    if c["net"] != n or c["batch"] != b:
                        continue
                    s = float(np.median(times[(id(w), i)]))
                    ratio = f"{s / tf_med[(n, b)]:.2f}" if (n, b) in tf_med else "-"
                    single = " (z slabs)" if args.fov_split == "z" else " (channels)"
                    split = "" if w.devices == 1 else (" (batch)" if b >= w.devices else single)
                    lines.append(f"| {n} | {c['impl']} | {c['dtype']} | {w.devices}{split} | {b} | "
                                 f"{1e3 * s / b:.1f} | {forward_flops(cfg, b) / s / 1e9:.1f} | {ratio} |")
    if tf_worker_:
        lines.append("")
        for n in args.nets:
            a = np.asarray(jax_workers[0].outputs.get(n, []))
            t = np.asarray(tf_worker_.outputs.get(n, []))
            if a.size and a.size == t.size:
                lines.append(f"Same network check ({n}, batch 1, float32): max |JAX - TF| "
                             f"over {a.size} sampled logits = {np.max(np.abs(a - t)):.2e}.")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default="ffn12_33,default9",
                   help=f"comma-separated nets to time, from {sorted(NETS)} (default: %(default)s)")
    p.add_argument("--impls", default="native,depth_split,stacked_z,auto",
                   help="comma-separated conv formulations (ffnjax.conv.IMPLS or 'auto'; default: %(default)s)")
    p.add_argument("--dtypes", default="float32",
                   help="comma-separated compute dtypes, float32 and/or bfloat16 (default: %(default)s)")
    p.add_argument("--batches", default="1,2,4", help="comma-separated FOV batch sizes (default: %(default)s)")
    p.add_argument("--devices", default="1,2",
                   help="comma-separated host device counts, one JAX worker each (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per case, interleaved (default: %(default)s)")
    p.add_argument("--fov-split", choices=("z", "channels"), default="z",
                   help="how a batch smaller than the device count is spread over the devices: "
                        "'z' (each FOV in z slabs, ffnjax.fovsplit, as a batch-1 fill runs) or "
                        "'channels' (each layer's output channels; default: %(default)s)")
    p.add_argument("--tf-python", default="/work/tfbench/bin/python",
                   help="a Python with tensorflow for the side-by-side run; skipped when it lacks TF "
                        "(default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny net, batch 1 and 2, 3 repeats")
    p.add_argument("--out", default="", help="also write the Markdown table to this file")
    p.add_argument("--worker", choices=("jax", "tf"), help=argparse.SUPPRESS)
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    if args.quick:
        args.nets, args.batches, args.repeats = "tiny", "1,2", 3
    args.nets = [n for n in args.nets.split(",") if n]
    for n in args.nets:
        if n not in NETS:
            p.error(f"unknown net {n!r}; choose from {sorted(NETS)}")
    args.impls = [i for i in args.impls.split(",") if i]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.devices = [int(d) for d in args.devices.split(",") if d]
    if args.repeats < 1 or any(b < 1 for b in args.batches) or any(d < 1 for d in args.devices):
        p.error("repeats, batches and devices must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker == "jax":
        return jax_worker(args)
    if args.worker == "tf":
        return tf_worker(args)
    table = run(args)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
