"""Agglomerate an FFN oversegmentation: resegment where segments meet, merge where the FFN agrees.

    python -m experiments.agglomerate --checkpoint models/demo_synthetic \\
        --image /tmp/agg_s1/image.zarr --segmentation /tmp/agg_s1/ffn.zarr \\
        --output /tmp/agg_s1/agglomerated.zarr --radius 12,16,16

For every pair of segments that touch (or come within --max-distance), a
decision point on their interface (ffnjax.decision_points); around it, two
fresh fills of the network, one seeded in each segment, scored against both
(ffnjax.resegmentation); a pair merges when both fills reconstruct both
segments (google/ffn's rule: --min-iou, --min-consistency,
--max-deleted-fraction; ffnjax.agglomeration.MergeRules). Writes the
agglomerated segmentation (uint64, the input's voxel size and offset) and the
merge graph (CSV: pair, point, scores, decision).

Resumable: each pair's scores are appended to --results (default
OUTPUT.agglomeration.jsonl beside the output) as soon as they exist; a rerun
skips every pair found there, so an interrupted run picks up where it
stopped. The scores do not depend on the merge thresholds: a rerun with other
thresholds (and --overwrite) fills nothing again. --restart scores every pair
afresh.

Distances (--max-distance, --clearance-cap, --seed-radius, --exclusion-radius) count voxels along
the finest axis of the voxel size. InferenceOptions flags left out keep the
values the checkpoint was trained with (as experiments.segment does).
Block-wise runs on Dask are not implemented: the segmentation and image are
read whole.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments import _cli
from experiments.segment import add_option_flags, options_from_args
from ffnjax import interrupt
from ffnjax.volume_spec import parse_spec


def build_parser() -> argparse.ArgumentParser:
    p = _cli.make_parser("agglomerate", __doc__)
    g = p.add_argument_group("run")
    g.add_argument("--checkpoint", required=True, metavar="WORKDIR",
                   help="workdir holding the model (experiments.train or experiments.import_tf)")
    g.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    g.add_argument("--image", required=True, metavar="SPEC",
                   help="image volume; the segmentation's region in it is found by the "
                        "volumes' stored offsets")
    g.add_argument("--segmentation", required=True, metavar="SPEC",
                   help="the oversegmentation to agglomerate (integer ids, 0 = background)")
    g.add_argument("--output", required=True, metavar="SPEC",
                   help="agglomerated segmentation to create (uint64)")
    g.add_argument("--merge-graph", metavar="PATH", default=None,
                   help="merge graph CSV to write (default: OUTPUT.merge-graph.csv beside the output)")
    g.add_argument("--results", metavar="PATH", default=None,
                   help="append-only scores file, one JSON line per pair (default: "
                        "OUTPUT.agglomeration.jsonl beside the output)")
    g.add_argument("--voxel-size", metavar="Z,Y,X", default=None,
                   help="voxel size (default: the segmentation's stored one); only the ratios "
                        "of its sides matter")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (the scores in --results are still reused)")
    g.add_argument("--restart", action="store_true",
                   help="discard --results and score every pair afresh")
    g.add_argument("--info-json", metavar="PATH", default=None,
                   help="write counts and timings as JSON")
    _cli.add_common(g)

    r = p.add_argument_group("resegmentation (ResegmentationConfig, DecisionPointOptions)")
    r.add_argument("--radius", type=_cli.zyx_arg(minimum=1), default=None, metavar="Z,Y,X",
                   help="resegment in 2*radius+1 voxels around each decision point (default 12,16,16)")
    r.add_argument("--analysis-radius", type=_cli.zyx_arg(minimum=1), default=None, metavar="Z,Y,X",
                   help="score in 2*radius+1 voxels around the point, at most --radius "
                        "(default 8,12,12)")
    r.add_argument("--seed-radius", type=float, default=None,
                   help="seeds lie within this distance of the point (default 6)")
    r.add_argument("--max-retries", type=int, default=None,
                   help="further seeds tried on a side whose fill covers less than "
                        "--recovery-fraction of its own segment (default 2)")
    r.add_argument("--recovery-fraction", type=float, default=None,
                   help="see --max-retries (default 0.6)")
    r.add_argument("--exclusion-radius", type=float, default=None,
                   help="a retry's seed lies this far from the seeds tried (default 3)")
    r.add_argument("--fills-per-call", type=int, default=None,
                   help="fills run as one vmapped call: 1 each on its own, 2 both of a pair, "
                        "more several pairs (accelerators; default 1)")
    r.add_argument("--max-distance", type=float, default=None,
                   help="pair segments this close as well as touching ones (default 0: touching only)")
    r.add_argument("--min-contact", type=int, default=None,
                   help="skip touching pairs with fewer contact faces (default 1)")
    r.add_argument("--clearance-cap", type=float, default=None,
                   help="decision points: clearances from other segments are capped here (default 12)")

    m = p.add_argument_group("merge rule (MergeRules; google/ffn's defaults)")
    m.add_argument("--min-iou", type=float, default=None,
                   help="the two fills' IoU in the analysis box must exceed this (default 0.8)")
    m.add_argument("--min-consistency", type=float, default=None,
                   help="each fill must cover more than this fraction of each segment (default 0.6)")
    m.add_argument("--max-deleted-fraction", type=float, default=None,
                   help="one fill's deleted voxels / its voxels must be below this (default 0.02)")
    add_option_flags(p)
    return p


def _fields(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def configs_from_args(args: argparse.Namespace):
    """(ResegmentationConfig, DecisionPointOptions, MergeRules) of the flags given."""
    from ffnjax.agglomeration import MergeRules
    from ffnjax.decision_points import DecisionPointOptions
    from ffnjax.resegmentation import ResegmentationConfig

    config = ResegmentationConfig(**_fields(args, ("radius", "analysis_radius", "seed_radius",
                                                   "max_retries", "recovery_fraction",
                                                   "exclusion_radius", "fills_per_call")))
    points = DecisionPointOptions(**_fields(args, ("max_distance", "min_contact", "clearance_cap")))
    rules = MergeRules(**_fields(args, ("min_iou", "min_consistency", "max_deleted_fraction")))
    return config, points, rules


def beside(output: str, suffix: str, flag: str) -> Path:
    """OUTPUT<suffix> beside a local output volume."""
    vs = parse_spec(output)
    path = getattr(vs, "path", None)
    if vs.kind not in ("zarr", "n5", "precomputed") or not path or "://" in path:
        raise ValueError(f"cannot place a file beside output {output!r}; pass {flag} PATH")
    return Path(path + suffix)


def _exists(spec: str) -> bool:
    vs = parse_spec(spec)
    path = getattr(vs, "path", None)
    return bool(path) and "://" not in path and Path(path).expanduser().exists()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    options_from_args(args)  # bad option values fail before anything is read
    config, point_options, rules = configs_from_args(args)
    graph_path = Path(args.merge_graph) if args.merge_graph else beside(
        args.output, ".merge-graph.csv", "--merge-graph")
    results_path = Path(args.results) if args.results else beside(
        args.output, ".agglomeration.jsonl", "--results")
    if not args.overwrite:
        for out, there in ((args.output, _exists(args.output)), (graph_path, graph_path.exists())):
            if there:
                raise FileExistsError(f"output {out} exists; pass --overwrite to replace it")

    # Here, not at the top: JAX and TensorStore take seconds to load.
    from ffnjax import agglomeration, decision_points
    from ffnjax.checkpoints import inference_defaults, load_checkpoint
    from ffnjax.volumes import create_volume, open_volume

    seg_vol = open_volume(args.segmentation)
    image_vol = open_volume(args.image)
    seg = np.asarray(seg_vol.read((0, 0, 0), seg_vol.shape[:3]))
    if seg.ndim != 3 or not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"--segmentation {args.segmentation} must be a 3D integer volume, got "
                         f"shape {seg.shape} dtype {seg.dtype}")
    start = tuple(int(a) - int(b) for a, b in zip(seg_vol.offset, image_vol.offset))
    end = tuple(s + n for s, n in zip(start, seg.shape))
    if any(s < 0 for s in start) or any(e > n for e, n in zip(end, image_vol.shape)):
        raise ValueError(f"--segmentation {args.segmentation} covers {start}..{end} (z,y,x) of the "
                         f"image, outside --image {args.image} of shape {tuple(image_vol.shape)}")
    image = np.asarray(image_vol.read(start, seg.shape))
    if image.ndim == 4 and image.shape[-1] == 1:
        image = image[..., 0]
    voxel_size = (_cli.numbers(args.voxel_size, "--voxel-size", kind=float, minimum=0, strict=True)
                  or tuple(seg_vol.voxel_size))

    model_config, params = load_checkpoint(args.checkpoint, args.step)
    options = options_from_args(args, inference_defaults(args.checkpoint, args.step))
    run_id = json.dumps({"image": args.image, "segmentation": args.segmentation,
                         "checkpoint": str(Path(args.checkpoint).absolute()), "step": args.step})
    t0 = time.perf_counter()
    try:
        result = agglomeration.agglomerate(
            image, seg, params, model_config, options, voxel_size=voxel_size, config=config,
            rules=rules, point_options=point_options, results_path=results_path, run_id=run_id,
            overwrite=args.restart, progress=not args.quiet)
    except KeyboardInterrupt as e:  # SIGINT / SIGTERM: scored pairs are in the results file
        raise interrupt.with_resume(e, f"the pairs scored so far are kept in {results_path}; "
                                       "rerun the same command to resume") from None
    wall = time.perf_counter() - t0

    out = create_volume(args.output, seg.shape, "uint64", voxel_size=tuple(seg_vol.voxel_size),
                        offset=tuple(seg_vol.offset), overwrite=True)
    out.write((0, 0, 0), result.labels.astype(np.uint64))
    agglomeration.save_merge_graph(graph_path, result.rows)

    reasons: dict[str, int] = {}
    for row in result.rows:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    times = [r.seconds for r in result.results]
    n_before = len(np.unique(seg[seg != 0]))
    n_after = len(np.unique(result.labels[result.labels != 0]))
    summary = {"decision_points": len(result.points), "scored_now": result.scored,
               "merges": len(result.merges), "reasons": reasons,
               "segments_before": n_before, "segments_after": n_after,
               "median_seconds_per_point": float(np.median(times)) if times else 0.0,
               "wall_s": round(wall, 3), "output": args.output, "merge_graph": str(graph_path),
               "results": str(results_path)}
    print(decision_points.describe(result.points))
    print(f"{result.scored} pairs resegmented now, {len(result.points) - result.scored} read from "
          f"{results_path}; {len(result.merges)} merges ({reasons}); segments {n_before} -> "
          f"{n_after}; median {summary['median_seconds_per_point']:.2f} s per point, {wall:.1f} s")
    print(f"wrote {args.output} {tuple(seg.shape)} uint64 and {graph_path}")
    if args.info_json:
        Path(args.info_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.info_json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    _cli.run(main)
