"""End to end at batch 1: google/ffn's FIB-25 reference crop segmented in google/ffn's mode.

    python -m benchmarks.gffn_crop_bench                    # --fov-split on, then off (~6 min, 2 cores)
    python -m benchmarks.gffn_crop_bench --fov-split on     # the split alone (~2 min)
    python -m benchmarks.gffn_crop_bench --fov-split on --conv-impls direct,depth_split

The crop, model and reference of `experiments.gffn_parity`
(`../shared/data/gffn_reference_fib25`): google/ffn's published depth-12
33^3 model imported, `InferenceOptions.google_ffn()` (batch 1: google/ffn's
exact order), segmented once per `--fov-split` value in this process (each
FOV split over the host devices in z slabs, `ffnjax.fovsplit`, or on one
device), and once per `--conv-impls` value (`ModelConfig.conv_impl`: 'auto',
the direct AVX-512 kernel, depth_split's 2D convolutions, ...). Prints a
Markdown table: network evaluations, wall time without
compilation, seconds per evaluation, whether the FOV path and the
segmentation still equal google/ffn's, and google/ffn's own recorded run
(`summary.json`: its 832 evaluations and wall time on this 2-core machine,
recorded once, not in this run) with the ratio to it. The load average
during the run is printed with the table: quote figures from a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from experiments import gffn_parity


def run_once(split: str, data: Path, impl: str = "auto") -> dict:
    """One segmentation of the crop with `fov_split=split` and `conv_impl=impl`; its figures."""
    from ffnjax import conv
    from ffnjax.config import InferenceOptions
    options = InferenceOptions.google_ffn(fov_split=split)
    t0 = time.perf_counter()
    _, info, agree = gffn_parity.run(options, data, progress=False, conv_impl=impl)
    wall = time.perf_counter() - t0
    c, t = info.counters, info.timings
    steps = c["fov_steps"]
    net_s = t["first_fill"] + t["fill"]
    return {"split": split, "impl": conv.resolve_impl(impl), "evaluations": steps, "net_calls": c["net_calls"],
            "wall_s": wall - t["compile"], "compile_s": t["compile"], "fills_s": net_s,
            "commit_s": t["commit"], "s_per_eval": (wall - t["compile"]) / max(steps, 1),
            "path_equal": agree["positions"]["equal"],
            "segmentation_equal": agree["segmentation"]["identical_up_to_relabelling"]}


def table(rows: list[dict], reference: dict, devices: int) -> str:
    ref_s = float(reference["wall_seconds_2core_cpu_loaded"])
    ref_n = int(reference["predict_calls"])
    load = os.getloadavg()
    out = [f"google/ffn's FIB-25 reference crop (64x128x128), google_ffn mode, batch 1, "
           f"{devices} host device(s); load average after the run {load[0]:.2f} / {load[1]:.2f} / "
           f"{load[2]:.2f}.", "",
           "| run | evaluations | wall s (no compile) | compile s | s / evaluation | vs google/ffn "
           "| path = google/ffn's | segmentation = google/ffn's |",
           "|---|---|---|---|---|---|---|---|",
           f"| google/ffn (recorded, summary.json) | {ref_n} | {ref_s:.1f} | - | "
           f"{ref_s / ref_n:.3f} | 1.00 | - | - |"]
    for r in rows:
        name = {"on": "ffnjax, FOV split in z slabs", "off": "ffnjax, one device",
                "auto": "ffnjax, fov_split auto"}[r["split"]]
        out.append(f"| {name}, {r['impl']} | {r['evaluations']} | {r['wall_s']:.1f} | {r['compile_s']:.1f} | "
                   f"{r['s_per_eval']:.3f} | {r['wall_s'] / ref_s:.2f} | {r['path_equal']} | "
                   f"{r['segmentation_equal']} |")
    out.append("")
    out.append("Fills (network and loop) / commits on the host, seconds: " + "; ".join(
        f"{r['split']} {r['impl']}: {r['fills_s']:.1f} / {r['commit_s']:.2f}" for r in rows))
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gffn_crop_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fov-split", default="on,off",
                   help="comma-separated InferenceOptions.fov_split values, one segmentation "
                        "each, in this order (default: %(default)s)")
    p.add_argument("--conv-impls", default="auto",
                   help="comma-separated ModelConfig.conv_impl values; every --fov-split value "
                        "runs with each (default: %(default)s)")
    p.add_argument("--data", default=str(gffn_parity.DATA), metavar="DIR",
                   help="the shared data folder (default ../shared/data beside the repo)")
    p.add_argument("--out", default="", help="also write the Markdown table to this file")
    args = p.parse_args(argv)
    splits = [s for s in args.fov_split.split(",") if s]
    for s in splits:
        if s not in ("auto", "on", "off"):
            p.error(f"--fov-split: {s!r} is not one of auto, on, off")
    from ffnjax.config import CONV_IMPLS
    impls = [i for i in args.conv_impls.split(",") if i]
    for i in impls:
        if i not in CONV_IMPLS:
            p.error(f"--conv-impls: {i!r} is not one of {', '.join(CONV_IMPLS)}")
    import jax
    rows = [run_once(s, Path(args.data), i) for s in splits for i in impls]
    reference = json.loads((Path(args.data) / gffn_parity.REFERENCE / "summary.json").read_text())
    text = table(rows, reference, jax.device_count())
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
