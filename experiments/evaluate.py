"""Score a segmentation against ground truth: ERL, NERL, merges, splits, VOI, ARAND.

    python -m experiments.evaluate --segmentation out/fib25_seg.zarr \\
        --groundtruth ../shared/data/fib25_training_sample2/groundtruth_z000-149.npz:labels \\
        --voxel-size 10,10,10 --json out/fib25_eval.json --png out/fib25_merges.png

    # the non-learned baseline on the same volume
    python -m experiments.evaluate --segmentation baseline \\
        --image ../shared/data/fib25_training_sample2/raw_z100-149.npz:raw \\
        --groundtruth ../shared/data/fib25_training_sample2/groundtruth_z000-149.npz:labels \\
        --gt-offset 100,0,0 --voxel-size 10,10,10

Volumes are read through ffnjax.volumes (zarr, N5, precomputed://, file.h5:ds,
file.npz:key, file.npy). The segmentation's region is found in the ground
truth (and image) by the volumes' stored offsets (so a segmentation written by
`experiments.segment --box` lines up by itself) plus --gt-offset/--image-offset
for imports that store none; --box then crops that region further.

Skeletons come from kimimaro on the ground truth unless --skeletons names a
folder of SWC files (physical x,y,z relative to the ground truth's voxel 0).
ERL is reported at merge threshold 1 (strict) and 50 (tolerant) side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments import _cli
from ffnjax import erl


def build_parser() -> argparse.ArgumentParser:
    p = _cli.make_parser("evaluate", __doc__)
    p.add_argument("--segmentation", required=True, metavar="SPEC",
                   help="segmentation volume spec (x.zarr, f.npz:key, ...), or the word "
                        "'baseline' to score ffnjax.baseline on --image")
    p.add_argument("--groundtruth", required=True, metavar="SPEC",
                   help="ground-truth label volume spec; label 0 = unlabelled, ignored")
    p.add_argument("--image", metavar="SPEC", default=None,
                   help="raw image spec: drawn under the --png outlines; required for "
                        "--segmentation baseline")
    p.add_argument("--skeletons", metavar="DIR", default=None,
                   help="folder of .swc files to use instead of skeletonizing the ground truth")
    p.add_argument("--voxel-size", metavar="Z,Y,X", default=None,
                   help="voxel size in nm (default: the ground truth's stored voxel size; "
                        "required when it stores none, as npy/npz files never do)")
    _cli.add_box_flags(p, "score only this box, in the segmentation's voxel coordinates")
    p.add_argument("--gt-offset", metavar="Z,Y,X", default=None,
                   help="where the segmentation's voxel 0 lies in the ground truth, in "
                        "voxels (default: difference of the volumes' stored offsets)")
    p.add_argument("--image-offset", metavar="Z,Y,X", default=None,
                   help="where the segmentation's voxel 0 lies in the image (default: "
                        "difference of stored offsets)")
    p.add_argument("--merge-thresholds", metavar="T1,T2,...", default="1,50",
                   help="ERL merge thresholds to report: nodes of a skeleton a segment must "
                        "hold before it counts towards a merger (default 1,50)")
    p.add_argument("--min-skeleton-length", type=float, default=0.0, metavar="NM",
                   help="ignore skeletons shorter than this (nm, default 0)")
    p.add_argument("--dust-threshold", type=int, default=100, metavar="VOXELS",
                   help="kimimaro: skip ground-truth objects smaller than this (default 100)")
    p.add_argument("--teasar-scale", type=float, default=1.5,
                   help="kimimaro TEASAR invalidation scale (default 1.5)")
    p.add_argument("--teasar-const", type=float, default=300.0, metavar="NM",
                   help="kimimaro TEASAR invalidation constant in nm (default 300)")
    p.add_argument("--save-skeletons", metavar="DIR", default=None,
                   help="write the skeletons used as SWC files into this folder")
    p.add_argument("--baseline-h", type=float, default=None,
                   help="with --segmentation baseline: seed height h in voxels (BaselineConfig.h, default 5)")
    p.add_argument("--baseline-threshold-offset", type=float, default=None,
                   help="with --segmentation baseline: BaselineConfig.threshold_offset "
                        "(standard deviations added to Otsu's threshold)")
    p.add_argument("--json", metavar="OUT", default=None, help="write the report as JSON here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --json, --png or --save-skeletons folder (otherwise "
                        "that is an error, found before any work)")
    p.add_argument("--png", metavar="OUT", default=None,
                   help="write slices with ground-truth outlines, the segmentation and the "
                        "worst merges (magenta) here")
    _cli.add_common(p, "accepted for uniformity (this command draws no progress bars)")
    return p


def _region(vol, offset: tuple[int, ...] | None, seg_offset, start, size, what: str) -> np.ndarray:
    """Reads `size` at `start` of the segmentation's frame from another volume."""
    if offset is None:
        offset = tuple(int(a) - int(b) for a, b in zip(seg_offset, vol.offset))
    begin = tuple(o + s for o, s in zip(offset, start))
    end = tuple(b + n for b, n in zip(begin, size))
    if any(b < 0 for b in begin) or any(e > n for e, n in zip(end, vol.shape)):
        raise ValueError(f"the scored region {begin}..{end} (z,y,x) lies outside the {what} "
                         f"{vol.spec.text!r} of shape {vol.shape}; check --gt-offset/--image-offset/--box")
    return vol.read(begin, size)


def physical_voxel_size(flag: str | None, gt_vol, *others) -> tuple[float, ...]:
    """The voxel size in nm that lengths (ERL, skeletons) are measured in.

    --voxel-size when given, else the ground truth's stored voxel size. A
    ground truth that stores none (npy, npz, an HDF5 dataset or zarr array
    without the attribute) makes --voxel-size required: assuming 1 nm would
    report every length in µm a thousandfold too small, without a word.

    Raises:
      ValueError: naming the ground-truth file and --voxel-size (and the voxel
        size another given volume stores, as a hint) when neither is known.
    """
    if flag is not None:
        return _cli.numbers(flag, "--voxel-size", kind=float, minimum=0, strict=True)
    if gt_vol.voxel_size_stored:
        return gt_vol.voxel_size
    hints = [f"{v.spec.text!r} stores {','.join(f'{x:g}' for x in v.voxel_size)}"
             for v in others if v is not None and v.voxel_size_stored]
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise ValueError(f"the ground truth {gt_vol.spec.text!r} stores no voxel size; pass "
                     f"--voxel-size Z,Y,X in nm{hint}")


def run(args: argparse.Namespace) -> dict:
    from ffnjax.volumes import open_volume  # here, not at the top: TensorStore (~1 s); --help doesn't wait

    thresholds = _cli.numbers(args.merge_thresholds, "--merge-thresholds", n=None)
    _cli.check_outputs(
        {"--json": args.json, "--png": args.png, "--save-skeletons": args.save_skeletons},
        {"--segmentation": None if args.segmentation == "baseline" else args.segmentation,
         "--groundtruth": args.groundtruth, "--image": args.image, "--skeletons": args.skeletons},
        overwrite=args.overwrite)
    gt_vol = open_volume(args.groundtruth)
    img_vol = open_volume(args.image) if args.image else None
    baseline = args.segmentation == "baseline"
    if baseline and img_vol is None:
        raise ValueError("--segmentation baseline needs --image")
    seg_vol = None if baseline else open_volume(args.segmentation)
    frame = img_vol if baseline else seg_vol
    # the frame the segmentation lives in; the baseline lives in the image's
    seg_offset, frame_shape = frame.offset, frame.shape
    start, size = _cli.region(args, frame_shape, "segmentation")
    voxel_size = physical_voxel_size(args.voxel_size, gt_vol, seg_vol, img_vol)

    t0 = time.perf_counter()
    image = None
    if img_vol is not None:
        img_off = _cli.numbers(args.image_offset, "--image-offset")
        image = frame.read(start, size) if baseline else _region(img_vol, img_off, seg_offset, start, size, "image")
        if baseline:  # the baseline segments the image: it must be finite (the PNG copes)
            from ffnjax.volumes import require_finite
            require_finite(image, f"--image {args.image}", start, img_vol.chunks)
    gt_off = _cli.numbers(args.gt_offset, "--gt-offset")
    gt = _region(gt_vol, gt_off, seg_offset, start, size, "ground truth")
    if baseline:
        from ffnjax.baseline import baseline_segmentation  # scikit-image (~1 s): only when asked for
        overrides = {} if args.baseline_h is None else {"h": args.baseline_h}
        if args.baseline_threshold_offset is not None:
            overrides["threshold_offset"] = args.baseline_threshold_offset
        tb = time.perf_counter()
        seg = baseline_segmentation(image, voxel_size=voxel_size, **overrides)
        baseline_seconds = time.perf_counter() - tb
    else:
        seg = seg_vol.read(start, size)
    if seg.ndim != 3 or gt.ndim != 3:
        raise ValueError(f"segmentation and ground truth must be single-channel 3D volumes, "
                         f"got shapes {seg.shape} and {gt.shape}")
    read_seconds = time.perf_counter() - t0

    t_sk = time.perf_counter()
    if args.skeletons:
        skeletons = erl.load_swc_dir(args.skeletons, voxel_size)
        gt_origin = (gt_off or tuple(int(a) - int(b) for a, b in zip(seg_offset, gt_vol.offset)))
        shift = np.asarray(gt_origin) + np.asarray(start)
        skeletons = [erl.Skeleton(s.nodes - shift, s.edges, s.label) for s in skeletons]
    else:
        skeletons = erl.skeletonize(gt, voxel_size, dust_threshold=args.dust_threshold,
                                    teasar_params={"scale": args.teasar_scale,
                                                   "const": args.teasar_const})
    skeleton_seconds = time.perf_counter() - t_sk
    if args.save_skeletons:
        erl.save_swc_dir(args.save_skeletons, skeletons, voxel_size)

    report = erl.evaluate(seg, gt, voxel_size, skeletons, merge_thresholds=thresholds,
                          min_skeleton_length=args.min_skeleton_length)
    report.update({"segmentation": args.segmentation, "groundtruth": args.groundtruth,
                   "bbox_start": list(start), "read_seconds": read_seconds,
                   "skeleton_seconds": skeleton_seconds})
    if baseline:
        report["baseline_seconds"] = baseline_seconds
    if args.png:
        worst = report["erl"][str(thresholds[0])]["worst_merges"]
        report["png"] = str(erl.save_merge_png(args.png, seg, gt, image, worst))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Scores; bad input prints one error line and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except _cli.BAD_INPUT as e:
        return _cli.report_error(e, args.debug)
    print(erl.format_table(report))
    if "baseline_seconds" in report:
        print(f"baseline segmentation took {report['baseline_seconds']:.1f} s")
    print(f"skeletons in {report['skeleton_seconds']:.1f} s, metrics in {report['seconds']:.1f} s")
    for k in ("json", "png"):
        if getattr(args, k):
            print(f"wrote {getattr(args, k)}")
    return 0


if __name__ == "__main__":
    _cli.run(main)
