"""Segment a FIB-25 crop with google/ffn's published model and score it against the ground truth.

    python -m experiments.fib25_tf_eval --box 27:123,77:173,77:173 --out out/fib25_tf_eval

Imports the TensorFlow checkpoint (no TensorFlow needed; or pass --checkpoint
WORKDIR for a checkpoint already imported with `experiments.import_tf`; the
TF prefix is --tf-checkpoint), flood-fills a crop
of `fib25_training_sample2` with the published inference settings (image mean
128, std 33, init 0.95, pad 0.05, move 0.9, segment 0.6, min size 1000, min
boundary distance 1,1,1, peaks seeds), segments the same crop with the
watershed baseline, and prints VOI split/merge and adapted Rand error of both
against the ground truth (GT label 0 = unlabelled). Writes the two
segmentations (npz), the figures (JSON) and a PNG of a few z slices to --out.

The published model was trained on FIB-25 `validation1`; `training_sample2` is
a different volume, so this is a fair check of the import and of ffnjax's flood
fill, not of ffnjax's training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from experiments import _cli
from ffnjax import erl
from ffnjax.config import InferenceOptions, ModelConfig
from ffnjax.tf_import import import_ffn_checkpoint
from ffnjax.view import save_slices_png

DEFAULT_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
DEFAULT_CHECKPOINT = "ffn_fib25_checkpoint/model.ckpt-27465036"
PUBLISHED_MODEL = dict(depth=12, fov_size=(33, 33, 33), deltas=(8, 8, 8))
# ffn_fib25_checkpoint/inference_training_sample2.pbtxt (seed policy PolicyPeaks).
PUBLISHED_OPTIONS = dict(image_mean=128.0, image_stddev=33.0, init_activation=0.95,
                         pad_value=0.05, move_threshold=0.9, segment_threshold=0.6,
                         min_segment_size=1000, min_boundary_dist=(1, 1, 1), seed_policy="peaks")
RAW_FILES = ((0, "raw_z000-049.npz"), (50, "raw_z050-099.npz"), (100, "raw_z100-149.npz"))
GT_FILE = "groundtruth_z000-149.npz"
FIB25_SHAPE = (150, 250, 250)  # z,y,x of fib25_training_sample2
DEFAULT_BOX = "27:123,77:173,77:173"  # offset 27,77,77, size 96,96,96


def load_fib25_crop(data_dir: str | Path, offset, size) -> tuple[np.ndarray, np.ndarray]:
    """(raw uint8, gt uint16) z,y,x crop of fib25_training_sample2 (raw spans three files)."""
    d = Path(data_dir) / "fib25_training_sample2"
    gt_path = d / GT_FILE
    if not gt_path.is_file():
        raise FileNotFoundError(f"FIB-25 ground truth not found: {gt_path}")
    gt = np.load(gt_path)["labels"]
    lo, hi = np.asarray(offset), np.asarray(offset) + np.asarray(size)
    if (lo < 0).any() or (hi > gt.shape).any() or (np.asarray(size) <= 0).any():
        raise ValueError(f"crop offset {tuple(lo)} size {tuple(size)} does not fit the "
                         f"{gt.shape} volume")
    parts = []
    for z0, name in RAW_FILES:
        z1 = z0 + 50
        a, b = max(lo[0], z0), min(hi[0], z1)
        if a < b:
            path = d / name
            if not path.is_file():
                raise FileNotFoundError(f"FIB-25 raw file not found: {path}")
            parts.append(np.load(path)["raw"][a - z0:b - z0, lo[1]:hi[1], lo[2]:hi[2]])
    raw = np.concatenate(parts, axis=0)
    return raw, gt[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]


def score(seg: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """VOI split/merge and adapted Rand error of `seg` against `gt` (GT label 0 ignored),
    by `ffnjax.erl`. Unsegmented voxels (seg 0) count as one more object, as in
    google/ffn's evaluation.
    """
    split, merge = erl.voi(seg, gt)
    arand = erl.adapted_rand(seg, gt)
    return {"voi_split": float(split), "voi_merge": float(merge),
            "voi_sum": float(split) + float(merge),
            "adapted_rand": float(arand),
            "objects": int(len(np.unique(seg[seg != 0]))),
            "unsegmented_fraction": float((seg == 0).mean())}


def interior(volume: np.ndarray, radius) -> np.ndarray:
    """The part of a crop where a FOV centred on the voxel fits (where FFN may seed)."""
    return volume[tuple(slice(r, s - r) for r, s in zip(radius, volume.shape))]


def parse_args(argv=None) -> argparse.Namespace:
    p = _cli.make_parser("fib25_tf_eval", __doc__)
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="shared data folder holding fib25_training_sample2/ and "
                        "ffn_fib25_checkpoint/ (default ../shared/data)")
    p.add_argument("--tf-checkpoint", default=None, metavar="PREFIX",
                   help=f"TensorFlow checkpoint prefix (default DATA/{DEFAULT_CHECKPOINT})")
    p.add_argument("--checkpoint", default=None, metavar="WORKDIR",
                   help="use an ffnjax workdir (from experiments.import_tf) instead of importing "
                        "the TF checkpoint. A path that is no ffnjax workdir is still taken as a "
                        "TF prefix, as --checkpoint meant here before (deprecated: use "
                        "--tf-checkpoint)")
    p.add_argument("--workdir", default=None, metavar="WORKDIR",
                   help="an ffnjax workdir, as --checkpoint (the older spelling, still accepted)")
    box = p.add_argument_group("crop (default offset 27,77,77, size 96,96,96: ~13 min on 2 busy "
                               "CPU cores; at least the 33^3 FOV)")
    box.add_argument("--box", default=None, metavar="Z0:Z1,Y0:Y1,X0:X1",
                     help="the crop of the 150x250x250 volume, as slices z,y,x (an end may be "
                          f"left open; default {DEFAULT_BOX})")
    box.add_argument("--offset", type=_cli.zyx_arg(minimum=0), default=None, metavar="Z,Y,X",
                     help="crop start z,y,x (with --size: the older spelling of --box)")
    box.add_argument("--size", type=_cli.zyx_arg(minimum=1), default=None, metavar="Z,Y,X",
                     help="crop size z,y,x (with --offset: the older spelling of --box)")
    p.add_argument("--min-size", type=int, default=1000,
                   help="min_segment_size for FFN (published: 1000)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="FOVs per network call during a fill (default 1)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the network's compute dtype (parameters stay float32; default float32)")
    p.add_argument("--skip-baseline", action="store_true", help="do not run the baseline")
    p.add_argument("--reuse", default=None,
                   help="segmentations.npz of an earlier run of the same crop: rescore its FFN "
                        "segmentation instead of flood filling again")
    p.add_argument("--out", default="out/fib25_tf_eval",
                   help="folder for segmentations.npz, metrics.json and slices.png")
    p.add_argument("--overwrite", action="store_true",
                   help="replace those files when --out holds them already (otherwise that is "
                        "an error, found before any work)")
    _cli.add_common(p)
    _cli.add_compile_cache(p)
    return p.parse_args(argv)


def crop(args: argparse.Namespace) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, size) z,y,x of the crop: --box, or the older --offset/--size, or the default.

    Raises:
      ValueError: naming the flags when both spellings are given or the box is bad.
    """
    if args.box is not None and (args.offset is not None or args.size is not None):
        raise ValueError(f"give --box or --offset/--size, not both (got --box {args.box!r})")
    if args.box is None and (args.offset is not None or args.size is not None):
        offset = tuple(args.offset) if args.offset is not None else (27, 77, 77)
        size = tuple(args.size) if args.size is not None else (96, 96, 96)
        return offset, size
    return _cli.box_start_size(args.box or DEFAULT_BOX, FIB25_SHAPE, "--box",
                               "fib25_training_sample2 volume")


def main(argv=None) -> int:
    args = parse_args(argv)
    _cli.use_compile_cache(args)
    from ffnjax import segmentation  # here, not at the top: loads JAX (seconds); --help doesn't wait

    offset, size = crop(args)
    ckpt = args.workdir or args.checkpoint
    out = Path(args.out)
    written = [str(out / name) for name in ("segmentations.npz", "metrics.json", "slices_ffn.png",
                                            "slices_baseline.png")]
    _cli.check_outputs({"--out": written},
                       {"--data": str(Path(args.data) / "fib25_training_sample2"),
                        "--checkpoint": ckpt, "--tf-checkpoint": args.tf_checkpoint,
                        "--reuse": args.reuse}, overwrite=args.overwrite)
    if args.workdir or (ckpt and (Path(ckpt) / "checkpoints").is_dir()):
        from ffnjax.checkpoints import load_checkpoint  # loads Orbax: only for an ffnjax workdir
        config, params = load_checkpoint(ckpt)
        source = str(Path(ckpt).resolve())
    else:
        config = ModelConfig(**PUBLISHED_MODEL)
        prefix = args.tf_checkpoint or ckpt or str(Path(args.data) / DEFAULT_CHECKPOINT)
        params, provenance = import_ffn_checkpoint(prefix, config)
        source = provenance["checkpoint"]
    config = dataclasses.replace(config, compute_dtype=args.compute_dtype)
    options = InferenceOptions(**{**PUBLISHED_OPTIONS, "min_segment_size": args.min_size,
                                  "batch_size": args.batch_size})
    raw, gt = load_fib25_crop(args.data, offset, size)
    print(f"model {source}: {config}")
    print(f"crop offset {offset} size {raw.shape} of fib25_training_sample2; "
          f"{len(np.unique(gt[gt != 0]))} GT objects")

    if args.reuse:
        previous = np.load(args.reuse)
        if previous["ffn"].shape != raw.shape or not np.array_equal(previous["raw"], raw):
            raise ValueError(f"--reuse {args.reuse} holds a different crop than offset "
                             f"{offset} size {size}")
        seg = previous["ffn"]
        t_ffn = float(previous["ffn_seconds"]) if "ffn_seconds" in previous else None
        t_ffn = t_ffn if t_ffn is not None and np.isfinite(t_ffn) else None
        steps = int(previous["ffn_fov_steps"]) if "ffn_fov_steps" in previous else -1
        print(f"FFN: reusing the segmentation in {args.reuse}")
    else:
        t0 = time.perf_counter()
        seg, info = segmentation.segment(raw, params, config, options, progress=not args.quiet)
        t_ffn = time.perf_counter() - t0
        steps = int(info.counters.get("fov_steps", -1))
        print(f"FFN: {info.summary()}")
    segs = {"raw": raw, "gt": gt, "ffn": seg}
    timings = {"ffn": t_ffn}
    if not args.skip_baseline:
        from ffnjax.baseline import baseline_segmentation  # scikit-image (~1 s): only when run
        t0 = time.perf_counter()
        segs["baseline"] = baseline_segmentation(raw)
        timings["baseline"] = time.perf_counter() - t0

    results = {"crop_offset": list(offset), "crop_size": list(raw.shape), "compute_dtype": config.compute_dtype,
               "batch_size": options.batch_size,
               "model": source, "options": options.to_dict(), "metrics": "ffnjax.erl",
               "ffn_fov_steps": steps}
    radius = config.fov_radius
    for name in ("ffn", "baseline"):
        if name in segs:
            results[name] = {**score(segs[name], gt), "seconds": timings[name]}
            results[f"{name}_interior"] = score(interior(segs[name], radius),
                                                interior(gt, radius))
    print(f"\nmetrics: {results['metrics']}; interior = the crop less a FOV radius "
          f"{radius} at each face (where FFN can seed)")
    print(f"{'method':<19} {'VOI split':>9} {'VOI merge':>9} {'VOI sum':>8} "
          f"{'ARAND':>7} {'objects':>7} {'unseg':>6} {'time s':>8}")
    for name in ("ffn", "baseline", "ffn_interior", "baseline_interior"):
        if name in results:
            r = results[name]
            print(f"{name:<19} {r['voi_split']:9.3f} {r['voi_merge']:9.3f} {r['voi_sum']:8.3f} "
                  f"{r['adapted_rand']:7.3f} {r['objects']:7d} {r['unsegmented_fraction']:6.3f} "
                  f"{r.get('seconds') or float('nan'):8.1f}")

    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "segmentations.npz", **segs, ffn_seconds=np.nan if t_ffn is None
                        else t_ffn, ffn_fov_steps=steps)
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    png = save_slices_png(out / "slices_ffn.png", raw, gt, seg)
    if "baseline" in segs:
        save_slices_png(out / "slices_baseline.png", raw, gt, segs["baseline"])
    print(f"wrote {out / 'metrics.json'}, {out / 'segmentations.npz'}, {png}")
    return 0


if __name__ == "__main__":
    _cli.run(main)
