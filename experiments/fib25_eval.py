"""Score FFN checkpoints and the watershed baseline on FIB-25's held-out slab, side by side.

    python -m experiments.fib25_eval --checkpoint runs/fib25_20nm \\
        --checkpoint runs/fib25_tf --out out/fib25_eval

The convention of `fib25_training_sample2`: train on z 0-99, validate on
z 100-149. Every --checkpoint (an ffnjax workdir: trained here, fine-tuned or
imported with `experiments.import_tf`) segments the whole held-out slab
(`--box`, default 100:150,:,:) with its own inference facts (normalisation,
seed / pad probabilities, scale) and the inference flags given here; the
watershed baseline segments the same slab. All are scored on the same inner
region, `--context` voxels inside every face (default: the largest FOV radius
of the checkpoints, in native voxels), as one scores a block of a large
volume: a FOV-based method cannot seed within a FOV radius of the border.
Scores: ERL / NERL at merge thresholds 1 and 50 along kimimaro skeletons of
the ground truth, merges and splits, VOI split / merge and the adapted Rand
error; one table is printed and written to OUT/report.json, with OUT/<name>.zarr
for each segmentation (a rerun reuses them unless --overwrite) and a PNG
overlay of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments import _cli
from experiments.fib25_tf_eval import DEFAULT_DATA, FIB25_SHAPE, load_fib25_crop
from experiments.segment import add_option_flags, options_from_args
from ffnjax import erl, files, interrupt, view, volume_spec

VOXEL_SIZE = (10.0, 10.0, 10.0)  # nm, fib25_training_sample2
HELD_OUT = "100:150,:,:"


def build_parser() -> argparse.ArgumentParser:
    p = _cli.make_parser("fib25_eval", __doc__)
    g = p.add_argument_group("run")
    g.add_argument("--checkpoint", action="append", default=[], metavar="WORKDIR",
                   help="an ffnjax workdir to score (repeat for several); none scores the "
                        "baseline alone")
    g.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="a name per --checkpoint for the table and file names (default: the "
                        "workdir's folder name)")
    g.add_argument("--out", required=True, help="output folder (segmentations, report.json, PNGs)")
    g.add_argument("--data", default=str(DEFAULT_DATA),
                   help="shared data folder holding fib25_training_sample2/ (default ../shared/data)")
    g.add_argument("--box", default=HELD_OUT, metavar="Z0:Z1,Y0:Y1,X0:X1",
                   help=f"the slab of the 150x250x250 volume to segment (default {HELD_OUT}: the "
                        "held-out z 100-149)")
    g.add_argument("--context", type=int, default=None, metavar="VOXELS",
                   help="score only voxels this far inside every face of the slab (default: the "
                        "largest FOV radius of the checkpoints, times their downsampling)")
    g.add_argument("--overwrite", action="store_true",
                   help="segment again even where OUT/<name>.zarr exists")
    g.add_argument("--skip-baseline", action="store_true", help="score the checkpoints only")
    _cli.add_common(g)
    _cli.add_compile_cache(g)
    add_option_flags(p)
    return p


def _names(args: argparse.Namespace) -> list[str]:
    if args.name and len(args.name) != len(args.checkpoint):
        raise ValueError(f"--name is given {len(args.name)} times but --checkpoint "
                         f"{len(args.checkpoint)} times; give one name per checkpoint or none")
    names = args.name or [Path(c).resolve().name for c in args.checkpoint]
    if len(set(names)) != len(names) or "baseline" in names:
        raise ValueError(f"checkpoint names {names} must be distinct and not 'baseline'; "
                         "pass --name")
    return names


def _context(args: argparse.Namespace, models: Sequence[tuple[Any, Any]]) -> int:
    """The scored region's margin: --context, else the largest native FOV radius."""
    if args.context is not None:
        if args.context < 0:
            raise ValueError(f"--context must be >= 0, got {args.context}")
        return args.context
    radii = [r * f for config, options in models
             for r, f in zip(config.fov_radius, options.downsample)]
    return max(radii, default=0)


def score_region(seg: np.ndarray, gt: np.ndarray, inner: tuple[slice, ...],
                 skeletons: Sequence[Any]) -> dict:
    """`ffnjax.erl.evaluate` of the inner region at 10 nm."""
    return erl.evaluate(seg[inner], gt[inner], VOXEL_SIZE, skeletons)


def table(rows: dict[str, dict]) -> str:
    """Markdown table of every scored segmentation."""
    lines = ["| method | NERL T=1 / T=50 | merges T=1 / T=50 | splits T=1 | VOI split / merge (sum) "
             "| adapted Rand | segment s |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        e1, e50 = r["scores"]["erl"]["1"], r["scores"]["erl"]["50"]
        s = r["scores"]
        lines.append(f"| {name} | {e1['nerl']:.3f} / {e50['nerl']:.3f} | {e1['merges']} / "
                     f"{e50['merges']} | {e1['splits']} | {s['voi_split']:.3f} / "
                     f"{s['voi_merge']:.3f} ({s['voi']:.3f}) | {s['adapted_rand']:.3f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return evaluate(args)
    except KeyboardInterrupt as e:  # SIGINT / SIGTERM: finished segmentations are kept
        raise interrupt.with_resume(e, f"segmentations finished so far are kept in {args.out}; "
                                       "rerun the same command to reuse them") from None


def evaluate(args: argparse.Namespace) -> dict:
    """Segments, scores and reports as `main` says."""
    names = _names(args)
    options_from_args(args)  # bad option values fail before anything is read
    start, size = volume_spec.clipped_box(args.box, FIB25_SHAPE)
    _cli.use_compile_cache(args)

    # Here, not at the top: JAX and TensorStore take seconds to load; --help and bad flags don't wait.
    from ffnjax import baseline, segmentation
    from ffnjax.checkpoints import inference_defaults, load_checkpoint
    from ffnjax.volumes import open_volume, save_volume

    models = []
    for ckpt in args.checkpoint:
        config, params = load_checkpoint(ckpt)
        models.append((config, options_from_args(args, inference_defaults(ckpt)), params))
    raw, gt = load_fib25_crop(args.data, start, size)
    context = _context(args, [(c, o) for c, o, _ in models])
    if any(2 * context >= n for n in raw.shape):
        raise ValueError(f"--context {context} leaves nothing of the {raw.shape} slab to score")
    inner = tuple(slice(context, n - context) for n in raw.shape)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    skeletons = erl.skeletonize(gt[inner], VOXEL_SIZE)
    print(f"scored region: slab {args.box} (offset {start}), {context} voxels of context, inner "
          f"{tuple(s.stop - s.start for s in inner)}; {len(skeletons)} skeletons in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    rows: dict[str, dict] = {}
    runs = [(n, m) for n, m in zip(names, models)]
    if not args.skip_baseline:
        runs.append(("baseline", None))
    for name, model in runs:
        path = out / f"{name}.zarr"
        t0 = time.perf_counter()
        reused = path.exists() and not args.overwrite
        if reused:
            with open_volume(str(path)) as vol:
                seg = np.asarray(vol.read((0, 0, 0), tuple(vol.shape[:3])))
            if seg.shape != raw.shape:
                raise ValueError(f"{path} has shape {seg.shape}, not the slab's {raw.shape}; "
                                 "pass --overwrite to segment again")
        elif model is None:
            seg = baseline.baseline_segmentation(raw, voxel_size=VOXEL_SIZE)
        else:
            config, options, params = model
            seg, info = segmentation.segment(raw, params, config, options, progress=not args.quiet)
            print(f"{name}: {info.summary()}", flush=True)
        seconds = time.perf_counter() - t0
        if not reused:  # written beside, then moved into place: a rerun reuses whole volumes only
            tmp = path.with_name(files.temp_path(path).name + ".zarr")  # .zarr: a volume spec
            try:
                save_volume(str(tmp), seg, voxel_size=VOXEL_SIZE, offset=start)
                with interrupt.deferred():
                    if path.exists():
                        shutil.rmtree(path)
                    os.replace(tmp, path)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
        scores = score_region(seg, gt, inner, skeletons)
        view.save_slices_png(out / f"{name}_overlay.png", raw[inner], gt[inner], seg[inner])
        rows[name] = {"scores": scores, "seconds": seconds, "reused": reused,
                      "checkpoint": None if model is None else args.checkpoint[names.index(name)],
                      "options": None if model is None else model[1].to_dict()}
        e1, e50 = scores["erl"]["1"], scores["erl"]["50"]
        print(f"{name}: NERL {e1['nerl']:.3f} / {e50['nerl']:.3f}, VOI {scores['voi_split']:.3f} / "
              f"{scores['voi_merge']:.3f}, ARAND {scores['adapted_rand']:.3f}"
              + (" (segmentation reused)" if reused else f" ({seconds:.0f} s)"), flush=True)

    report = {"box": args.box, "offset": list(start), "context": context,
              "scored_shape": [s.stop - s.start for s in inner], "voxel_size": list(VOXEL_SIZE),
              "n_skeletons": len(skeletons), "rows": rows}
    files.write_bytes(out / "report.json", json.dumps(report, indent=2, default=str).encode())
    print()
    print(table(rows))
    print(f"\nwrote {out}/report.json, <name>.zarr and <name>_overlay.png")
    return report


if __name__ == "__main__":
    _cli.run(main)
