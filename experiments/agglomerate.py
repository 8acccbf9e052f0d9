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

Block-wise (--block Z,Y,X), for volumes larger than memory: decision points
block by block, each pair's fills on its own subvolume read from the volumes,
one union-find over all accepted pairs, the output written block by block;
the steps run as Dask tasks (--scheduler; default 'sync', in this process).
The merge graph and the output equal the whole-volume run's
(ffnjax.agglomeration_blocks).
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


RESEGMENTATION_FLAGS: dict[str, _cli.Flag] = {
    "radius": _cli.Flag("resegment in 2*radius+1 voxels around each decision point"),
    "analysis_radius": _cli.Flag("score in 2*radius+1 voxels around the point, at most --radius"),
    "seed_radius": _cli.Flag("seeds lie within this distance of the point"),
    "max_retries": _cli.Flag("further seeds tried on a side whose fill covers less than "
                             "--recovery-fraction of its own segment"),
    "recovery_fraction": _cli.Flag("see --max-retries"),
    "exclusion_radius": _cli.Flag("a retry's seed lies this far from the seeds tried"),
    "fills_per_call": _cli.Flag("fills run as one vmapped call: 1 each on its own, 2 both of a "
                                "pair, more several pairs (accelerators)"),
}
POINT_FLAGS: dict[str, _cli.Flag] = {
    "max_distance": _cli.Flag("pair segments this close as well as touching ones (0: touching "
                              "only)"),
    "min_contact": _cli.Flag("skip touching pairs with fewer contact faces"),
    "clearance_cap": _cli.Flag("decision points: clearances from other segments are capped here"),
}
RULE_FLAGS: dict[str, _cli.Flag] = {
    "min_iou": _cli.Flag("the two fills' IoU in the analysis box must exceed this"),
    "min_consistency": _cli.Flag("each fill must cover more than this fraction of each segment"),
    "max_deleted_fraction": _cli.Flag("one fill's deleted voxels / its voxels must be below this"),
    "cannot_link": _cli.Flag("refuse a merge that would join two segments whose own pair was "
                             "rejected because the fills disagreed (ffnjax's guard against "
                             "chains through a merged segment; google/ffn has none)"),
}


def config_tables() -> tuple[tuple[type, dict[str, _cli.Flag]], ...]:
    """(dataclass, its flags) of agglomeration's settings, in the order
    `configs_from_args` returns them: ResegmentationConfig, DecisionPointOptions,
    MergeRules (imported here: they load JAX)."""
    from ffnjax.agglomeration import MergeRules
    from ffnjax.decision_points import DecisionPointOptions
    from ffnjax.resegmentation import ResegmentationConfig

    return ((ResegmentationConfig, RESEGMENTATION_FLAGS), (DecisionPointOptions, POINT_FLAGS),
            (MergeRules, RULE_FLAGS))


def add_model_flags(group) -> None:
    """--checkpoint and --step."""
    group.add_argument("--checkpoint", required=True, metavar="WORKDIR",
                       help="workdir holding the model (experiments.train or experiments.import_tf)")
    group.add_argument("--step", type=int, default=None,
                       help="checkpoint step (default: the latest)")


def add_config_flags(parser) -> None:
    """One flag per field of every `config_tables` dataclass, in one group."""
    group = parser.add_argument_group(
        "agglomeration (ResegmentationConfig, DecisionPointOptions, MergeRules; google/ffn's rule)")
    for cls, table in config_tables():
        _cli.add_flags(group, cls, table)


def build_parser() -> argparse.ArgumentParser:
    p = _cli.make_parser("agglomerate", __doc__)
    g = p.add_argument_group("run")
    add_model_flags(g)
    g.add_argument("--image", required=True, metavar="SPEC",
                   help="image volume (SPEC@z0:z1,y0:y1,x0:x1 and A+B stacks are read into "
                        "memory); the segmentation's region in it is found by the volumes' "
                        "stored offsets")
    g.add_argument("--image-offset", type=_cli.zyx_arg(), default=None, metavar="Z,Y,X",
                   help="where the image's first voxel lies, in voxels (default: its stored "
                        "offset); e.g. 100,0,0 for a slab file of z 100-149 whose segmentation "
                        "records offset 100,0,0")
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
    b = p.add_argument_group("block-wise (ffnjax.agglomeration_blocks)")
    b.add_argument("--block", type=_cli.zyx_arg(minimum=1), default=None, metavar="Z,Y,X",
                   help="work block by block: never read the volumes whole (default: whole)")
    b.add_argument("--scheduler", default=None,
                   help="with --block: 'sync' (this process, the default), 'threads', "
                        "'processes', 'local' (a LocalCluster of --workers processes), or a "
                        "Dask scheduler address tcp://host:8786")
    b.add_argument("--workers", type=int, default=None,
                   help="with --scheduler local: worker processes (default: one per core)")
    b.add_argument("--pairs-per-task", type=int, default=None,
                   help="with --block: decision points resegmented per Dask task (default 8)")
    _cli.add_common(g)
    add_config_flags(p)
    add_option_flags(p)
    return p


def configs_from_args(args: argparse.Namespace):
    """(ResegmentationConfig, DecisionPointOptions, MergeRules) of the flags
    given over the dataclasses' defaults; a bad value is named by its flag."""
    return tuple(_cli.build(cls, table, {}, _cli.given(args, cls, table))
                 for cls, table in config_tables())


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


def _before_after(counts: dict) -> str:
    return (f" (segments {counts['segments_before']} -> {counts['segments_after']})"
            if counts else "")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    options_from_args(args)  # bad option values fail before anything is read
    config, point_options, rules = configs_from_args(args)
    if not args.block:
        for flag in ("scheduler", "workers", "pairs_per_task"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} works block by block only; add --block Z,Y,X")
    if args.pairs_per_task is not None and args.pairs_per_task < 1:
        raise ValueError(f"--pairs-per-task must be >= 1, got {args.pairs_per_task}")
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
    from ffnjax.volumes import create_volume, open_input, open_volume

    seg_vol = open_volume(args.segmentation)
    image_vol = open_input(args.image)
    shape = tuple(int(n) for n in seg_vol.shape[:3])
    if not np.issubdtype(seg_vol.dtype, np.integer) or (seg_vol.num_channels or 1) != 1:
        raise ValueError(f"--segmentation {args.segmentation} must be a 3D integer volume, got "
                         f"shape {tuple(seg_vol.shape)} dtype {seg_vol.dtype}")
    image_offset = args.image_offset if args.image_offset is not None else image_vol.offset
    start = tuple(int(a) - int(b) for a, b in zip(seg_vol.offset, image_offset))
    end = tuple(s + n for s, n in zip(start, shape))
    if any(s < 0 for s in start) or any(e > n for e, n in zip(end, image_vol.shape)):
        raise ValueError(f"--segmentation {args.segmentation} (offset {tuple(seg_vol.offset)}) "
                         f"covers {start}..{end} (z,y,x) of the image, outside --image {args.image} "
                         f"of shape {tuple(image_vol.shape)} at offset {tuple(image_offset)}; "
                         "--image-offset says where the image lies")
    voxel_size = (_cli.numbers(args.voxel_size, "--voxel-size", kind=float, minimum=0, strict=True)
                  or tuple(seg_vol.voxel_size))

    model_config, params = load_checkpoint(args.checkpoint, args.step)
    options = options_from_args(args, inference_defaults(args.checkpoint, args.step))
    run_id = json.dumps({"image": args.image, "segmentation": args.segmentation,
                         "checkpoint": str(Path(args.checkpoint).absolute()), "step": args.step})
    common = dict(voxel_size=voxel_size, config=config, rules=rules, point_options=point_options,
                  results_path=results_path, run_id=run_id, overwrite=args.restart,
                  progress=not args.quiet)
    t0 = time.perf_counter()
    try:
        if args.block:
            from ffnjax import agglomeration_blocks as blocks
            from ffnjax.dask_tasks import engine

            sched = None if args.scheduler == "local" else (args.scheduler or "sync")
            with engine(sched, 1, args.workers) as eng:
                result = blocks.agglomerate_blocks(
                    blocks.Region(args.image, start, shape), args.segmentation, params,
                    model_config, options, block=args.block, engine=eng,
                    pairs_per_task=args.pairs_per_task or 8, **common)
                create_volume(args.output, shape, "uint64", voxel_size=tuple(seg_vol.voxel_size),
                              offset=tuple(seg_vol.offset), overwrite=True)
                blocks.relabel_blocks(args.segmentation, args.output,
                                      agglomeration.merge_mapping(result.merges), args.block,
                                      engine=eng, progress=not args.quiet)
        else:
            seg = np.asarray(seg_vol.read((0, 0, 0), shape))
            image = np.asarray(image_vol.read(start, shape))
            if image.ndim == 4 and image.shape[-1] == 1:
                image = image[..., 0]
            result = agglomeration.agglomerate(image, seg, params, model_config, options, **common)
            out = create_volume(args.output, shape, "uint64", voxel_size=tuple(seg_vol.voxel_size),
                                offset=tuple(seg_vol.offset), overwrite=True)
            out.write((0, 0, 0), result.labels.astype(np.uint64))
    except KeyboardInterrupt as e:  # SIGINT / SIGTERM: scored pairs are in the results file
        raise interrupt.with_resume(e, f"the pairs scored so far are kept in {results_path}; "
                                       "rerun the same command to resume") from None
    wall = time.perf_counter() - t0
    agglomeration.save_merge_graph(graph_path, result.rows)

    reasons: dict[str, int] = {}
    for row in result.rows:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    times = [r.seconds for r in result.results]
    merged_away = len(agglomeration.merge_mapping(result.merges))
    counts = {}
    if result.labels is not None:   # whole volume: the ids before and after, as cheap as reading
        counts = {"segments_before": int(len(np.unique(seg[seg != 0]))),
                  "segments_after": int(len(np.unique(result.labels[result.labels != 0])))}
    summary = {"decision_points": len(result.points), "scored_now": result.scored,
               "merges": len(result.merges), "reasons": reasons,
               "segments_merged_away": merged_away, **counts, "block": args.block,
               "median_seconds_per_point": float(np.median(times)) if times else 0.0,
               "wall_s": round(wall, 3), "output": args.output, "merge_graph": str(graph_path),
               "results": str(results_path)}
    print(decision_points.describe(result.points))
    print(f"{result.scored} pairs resegmented now, {len(result.points) - result.scored} read from "
          f"{results_path}; {len(result.merges)} merges ({reasons}); {merged_away} segments "
          f"joined to others{_before_after(counts)}; median {summary['median_seconds_per_point']:.2f} s per point, {wall:.1f} s")
    print(f"wrote {args.output} {shape} uint64 and {graph_path}")
    if args.info_json:
        Path(args.info_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.info_json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    _cli.run(main)
