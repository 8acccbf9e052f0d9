"""google/ffn's published procedure in one command: forward and reverse fills,
their consensus, then agglomeration.

    python -m experiments.pipeline --checkpoint runs/fib25_tf \\
        --image ../shared/data/fib25_training_sample2/raw_z100-149.npz:raw \\
        --out out/pipeline --min-segment-size 1000

Runs `experiments.segment` with --consensus (the forward pass and the pass in
reverse seed order, combined into an oversegmentation: --consensus-mode split
is google/ffn's) into OUT/oversegmentation.zarr, then `experiments.agglomerate`
on it with the same network and options into OUT/agglomerated.zarr (its merge
graph and scores beside it), and writes OUT/pipeline.json with both commands'
summaries. Every inference option flag goes to both steps; the resegmentation
and merge-rule flags to agglomeration. Each step resumes as its own command
does: a finished oversegmentation is reused (--overwrite segments again), and
agglomeration skips the pairs its results file holds. --block agglomerates
block by block (experiments.agglomerate --block).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

from experiments import _cli
from experiments import agglomerate as agglomerate_cmd
from experiments import segment as segment_cmd
from ffnjax.config import InferenceOptions


def build_parser() -> argparse.ArgumentParser:
    p = _cli.make_parser("pipeline", __doc__)
    g = p.add_argument_group("run")
    agglomerate_cmd.add_model_flags(g)
    g.add_argument("--image", required=True, metavar="SPEC", help="image volume to segment")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="folder for oversegmentation.zarr, agglomerated.zarr and pipeline.json")
    _cli.add_box_flags(g, "segment only this box of the image")
    g.add_argument("--overwrite", action="store_true",
                   help="segment again and replace the outputs (agglomeration scores are reused)")
    g.add_argument("--block", type=_cli.zyx_arg(minimum=1), default=None, metavar="Z,Y,X",
                   help="agglomerate block by block (default: the whole volume at once)")
    _cli.add_common(g)
    segment_cmd.add_option_flags(p)
    agglomerate_cmd.add_config_flags(p)
    return p


def step_argvs(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(segment's argv, agglomerate's argv) for the flags given."""
    out = Path(args.out)
    options = _cli.given(args, InferenceOptions, _cli.INFERENCE_FLAGS)
    options.setdefault("consensus", True)
    common = ["--checkpoint", args.checkpoint, "--image", args.image]
    common += ["--step", str(args.step)] if args.step is not None else []
    common += ["--compat", args.compat] if args.compat else []
    common += ["--quiet"] if args.quiet else []
    common += ["--debug"] if args.debug else []
    seg = [*common, "--output", str(out / "oversegmentation.zarr"),
           "--info-json", str(out / "segment.json"),
           *_cli.flags_of(options, _cli.INFERENCE_FLAGS)]
    if args.box is not None or args.bbox is not None:
        seg += ["--box", args.box] if args.box is not None else ["--bbox", args.bbox]
    agg = [*common, "--segmentation", str(out / "oversegmentation.zarr"),
           "--output", str(out / "agglomerated.zarr"), "--info-json", str(out / "agglomerate.json"),
           *_cli.flags_of(options, _cli.INFERENCE_FLAGS)]
    for cls, table in agglomerate_cmd.config_tables():
        agg += _cli.flags_of(_cli.given(args, cls, table), table)
    agg += ["--block", ",".join(map(str, args.block))] if args.block else []
    return seg, agg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    seg_argv, agg_argv = step_argvs(args)
    # Bad values fail here, before anything is segmented.
    agglomerate_cmd.configs_from_args(agglomerate_cmd.build_parser().parse_args(agg_argv))
    segment_cmd.options_from_args(segment_cmd.build_parser().parse_args(seg_argv))
    out = Path(args.out)
    overseg = out / "oversegmentation.zarr"
    t0 = time.perf_counter()
    if overseg.exists() and not args.overwrite:
        print(f"reusing {overseg} (pass --overwrite to segment again)")
        seg_summary = json.loads((out / "segment.json").read_text()) if (out / "segment.json").exists() else {}
    else:
        seg_summary = segment_cmd.main([*seg_argv, *(["--overwrite"] if args.overwrite else [])])
    t1 = time.perf_counter()
    agg_summary = agglomerate_cmd.main([*agg_argv, "--overwrite"])
    t2 = time.perf_counter()
    summary = {"segment": seg_summary, "agglomerate": agg_summary,
               "segment_s": round(t1 - t0, 3), "agglomerate_s": round(t2 - t1, 3),
               "oversegmentation": str(overseg), "output": str(out / "agglomerated.zarr"),
               "segment_argv": seg_argv, "agglomerate_argv": agg_argv}
    (out / "pipeline.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"pipeline: oversegmentation {t1 - t0:.1f} s, agglomeration {t2 - t1:.1f} s "
          f"({agg_summary['merges']} merges); wrote {out / 'agglomerated.zarr'} and "
          f"{out / 'pipeline.json'}")
    return summary


if __name__ == "__main__":
    _cli.run(main)
