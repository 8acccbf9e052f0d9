"""Reporting an evaluation: a plain-text table and a PNG of the worst merges.

`ffnjax.erl.evaluate` computes the figures as one JSON-ready dict;
`format_table` prints it for people and `save_merge_png` shows where the
segmentation merged ground-truth objects (pictures come from `ffnjax.view`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ffnjax import view


def format_table(report: dict) -> str:
    """A plain-text table of an `evaluate` report."""
    lines = [f"{'merge threshold':>16} {'ERL (um)':>10} {'max ERL (um)':>13} {'NERL':>7} "
             f"{'merges':>7} {'merges/mm':>10} {'splits':>7}"]
    for t, r in report["erl"].items():
        rate = r.get("merges_per_mm", float("nan"))  # reports written before it existed
        lines.append(f"{t:>16} {r['erl_um']:>10.3f} {r['max_erl_um']:>13.3f} {r['nerl']:>7.3f} "
                     f"{r['merges']:>7d} {rate:>10.4g} {r['splits']:>7d}")
    lines.append(f"VOI split {report['voi_split']:.3f}  merge {report['voi_merge']:.3f}  "
                 f"total {report['voi']:.3f} bits   adapted Rand error {report['adapted_rand']:.4f}")
    lines.append(f"{report['n_skeletons']} skeletons, {report['skeleton_length'] / 1000:.2f} um; "
                 f"{report['n_segments']} segments vs {report['n_gt_objects']} GT objects; "
                 f"shape {tuple(report['shape'])}, voxel {tuple(report['voxel_size'])}")
    return "\n".join(lines)


# The colours of the merge PNG, named once for its drawing and its key.
GT_BOUNDARY = (255, 60, 60)
SEGMENT_BOUNDARY = (255, 255, 0)
MERGE = (255, 0, 255)


def save_merge_png(path: str | os.PathLike, segmentation: np.ndarray, groundtruth: np.ndarray,
                   image: np.ndarray | None = None, merging_segments: Sequence[int] = (),
                   n_worst: int = 3, n_slices: int = 3) -> Path:
    """Writes a PNG: per chosen z slice (one row each, titled with its z), the
    image with ground-truth outlines, the segmentation with a colour per
    segment, and the segment boundaries with the worst merges filled in
    magenta. Columns have titles and a key below says what each colour means;
    an empty segmentation says so in the picture.

    Slices are those where the worst merging segments have the most voxels
    (evenly spread slices when there is no merger). ``merging_segments`` is
    `ERLResult.merging_segments` (worst first).
    """
    # Imported here: ffnjax.erl imports this module to re-export its names
    # (ffnjax.erl.save_merge_png is public API), so a top-level import of
    # ffnjax.erl would be a cycle.
    from ffnjax.erl import _check_pair

    seg, gt = _check_pair(segmentation, groundtruth)
    worst = [int(s) for s in merging_segments[:n_worst]]
    if worst:
        per_z = np.isin(seg, worst).sum(axis=(1, 2))
        zs = sorted(int(z) for z in np.argsort(-per_z, kind="stable")[:n_slices] if per_z[z] > 0)
    else:
        zs = view.default_slices(seg.shape[0], n_slices)
    empty = not seg.any()
    panels, notes = [], {}
    for z in zs:
        img = image[z] if image is not None else None
        panels.append(view.overlay(img, gt[z], outline=True, outline_color=GT_BOUNDARY))
        colours = view.overlay(img, seg[z], outline=False, alpha=0.6, vivid=True)
        colours[view.boundaries(seg[z])] = 0  # segments apart where colours are alike
        if empty or not seg[z].any():
            notes[len(panels)] = "empty segmentation" if empty else "no segment in this slice"
        panels.append(colours)
        m = view.overlay(img, seg[z], outline=True, outline_color=SEGMENT_BOUNDARY)
        m[np.isin(seg[z], worst)] = MERGE
        m[view.boundaries(gt[z])] = GT_BOUNDARY
        panels.append(m)
    merges = (f"worst merging segments (ids {', '.join(map(str, worst))})" if worst
              else "worst merging segments (none)")
    legend = [(GT_BOUNDARY, "ground-truth boundary"), (SEGMENT_BOUNDARY, "segment boundary"),
              (MERGE, merges), ((40, 170, 230), "a colour per segment"),
              ((0, 0, 0), "between segments"),
              ((128, 128, 128), "no colour: unlabelled") if image is not None
              else ((0, 0, 0), "black: unlabelled")]
    banner = ("EMPTY SEGMENTATION: no voxel is labelled, nothing to show" if empty else None)
    picture = view.figure(panels, 3, column_titles=("ground truth", "segmentation",
                                                     "worst merges"),
                          row_titles=[f"z {z}" for z in zs], legend=legend, banner=banner,
                          notes=notes)
    return view.save_png(path, picture)
