"""Agglomeration before / after, scored against ground truth, at several merge rules.

    python -m benchmarks.agglomeration_bench --segmentation /tmp/agg_s1/ffn.zarr \\
        --groundtruth /tmp/agg_s1/labels.zarr --merge-graph /tmp/agg_s1/agglo_strict.zarr.merge-graph.csv \\
        --box 8:56,8:104,8:104 --voxel-size 1,1,1 --rules 0.8,0.6,0.02 --rules 0.5,0.5,0.05

Reads the scores of one `experiments.agglomerate` run (its merge graph: the
scores do not depend on the rule), re-decides every pair under each
`--rules MIN_IOU,MIN_CONSISTENCY,MAX_DELETED_FRACTION`, merges, and prints one
Markdown row per rule, without and with the cannot-link guard (and one for
the segmentation before): NERL at merge
thresholds 1 and 50, merges per mm at threshold 1, VOI split / merge, adapted
Rand error on the --box, the number of decision points, the merges accepted and
their precision. A merge is correct when the two segments' majority
ground-truth labels (over their voxels with a non-zero label, in the whole
volume) agree.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from experiments import _cli


def majority_labels(seg: np.ndarray, gt: np.ndarray) -> dict[int, int]:
    """{segment id: its most frequent non-zero ground-truth label} (0: none)."""
    keep = (seg != 0) & (gt != 0)
    pairs, counts = np.unique(np.stack([seg[keep], gt[keep]]).astype(np.int64), axis=1,
                              return_counts=True)
    out: dict[int, int] = {}
    best: dict[int, int] = {}
    for (s, g), c in zip(pairs.T, counts):
        if c > best.get(int(s), 0):
            best[int(s)], out[int(s)] = int(c), int(g)
    return out


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = _cli.make_parser("agglomeration_bench", __doc__)
    p.prog = "python -m benchmarks.agglomeration_bench"
    p.add_argument("--segmentation", required=True, metavar="SPEC", help="the oversegmentation")
    p.add_argument("--groundtruth", required=True, metavar="SPEC", help="labels, same frame")
    p.add_argument("--merge-graph", required=True, metavar="CSV",
                   help="merge graph of an experiments.agglomerate run on --segmentation")
    p.add_argument("--rules", action="append", default=None, metavar="IOU,CONS,DEL",
                   help="a merge rule to score (repeatable; default 0.8,0.6,0.02: google/ffn's)")
    p.add_argument("--voxel-size", default="1,1,1", metavar="Z,Y,X",
                   help="voxel size for ERL (default 1,1,1)")
    _cli.add_box_flags(p, "score only this box")
    _cli.add_common(p, "accepted for uniformity")
    args = p.parse_args(argv)
    rule_sets = [_cli.numbers(r, "--rules", n=3, kind=float, minimum=0)
                 for r in (args.rules or ["0.8,0.6,0.02"])]
    voxel_size = _cli.numbers(args.voxel_size, "--voxel-size", kind=float, minimum=0, strict=True)

    from ffnjax import agglomeration as ag
    from ffnjax import erl
    from ffnjax.volumes import read_all

    seg = read_all(args.segmentation)
    gt = read_all(args.groundtruth)
    if seg.shape != gt.shape:
        raise ValueError(f"--segmentation shape {seg.shape} differs from --groundtruth {gt.shape}")
    start, size = _cli.region(args, seg.shape, "segmentation")
    box = tuple(slice(a, a + n) for a, n in zip(start, size))
    graph = ag.load_merge_graph(args.merge_graph)
    majority = majority_labels(seg, gt)
    skeletons = erl.skeletonize(gt[box], voxel_size)

    def score(labels) -> dict:
        rep = erl.evaluate(labels[box], gt[box], voxel_size, skeletons)
        return {"nerl1": rep["erl"]["1"]["nerl"], "nerl50": rep["erl"]["50"]["nerl"],
                "mpm1": rep["erl"]["1"]["merges_per_mm"], "split": rep["voi_split"],
                "merge": rep["voi_merge"], "arand": rep["adapted_rand"]}

    rows = [{"rule": "before", **score(seg), "merges": 0, "correct": 0}]
    results = [r for r, _, _ in graph]
    for (iou, cons, dele), guard in itertools.product(rule_sets, (False, True)):
        rules = ag.MergeRules(min_iou=iou, min_consistency=cons, max_deleted_fraction=dele,
                              cannot_link=guard)
        merges = [(r.point.a, r.point.b) for r, (ok, _) in zip(results, ag.decide_all(results, rules))
                  if ok]
        correct = sum(majority.get(a, -1) == majority.get(b, -2) != 0 for a, b in merges)
        rows.append({"rule": f"{iou:g} / {cons:g} / {dele:g}" + (", cannot-link" if guard else ""),
                     **score(ag.merge_labels(seg, merges)), "merges": len(merges),
                     "correct": correct})
    seconds = np.median([r.seconds for r, _, _ in graph]) if graph else 0.0
    print(f"{len(graph)} decision points, median {seconds:.2f} s per point\n")
    print("| rule (IoU / consistency / deleted) | NERL T=1 / T=50 | merges/mm T=1 | VOI split / "
          "merge | ARAND | merges accepted | precision |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        prec = f"{r['correct'] / r['merges']:.2f} ({r['correct']}/{r['merges']})" if r["merges"] else "-"
        print(f"| {r['rule']} | {r['nerl1']:.3f} / {r['nerl50']:.3f} | {r['mpm1']:.0f} | "
              f"{r['split']:.3f} / {r['merge']:.3f} | {r['arand']:.4f} | {r['merges']} | {prec} |")
    return rows


if __name__ == "__main__":
    _cli.run(main)
