"""Segment a volume by flood filling with a trained (or imported) FFN.

    python -m experiments.segment --checkpoint runs/fib25 \\
        --image ../shared/data/fib25_training_sample2/raw_z100-149.npz:raw \\
        --output out/fib25_seg.zarr --bbox 0,0,0,50,128,128 --prob-output out/fib25_prob.zarr

Reads the image through ffnjax.volumes (zarr, N5, precomputed://, file.h5:ds,
file.npz:key, file.npy), flood-fills from every seed of the seed policy, and
writes the segmentation (uint64, 0 = background) and optionally the object
probability map (uint8, 0..255) as new volumes with the image's voxel size and
the bbox's offset.

Resumable: the run's state (segmentation so far, next seed, counters) is saved
atomically every --checkpoint-every seconds to --state (by default beside the
output: OUTPUT.segment-state.npz). Re-running the same command after a crash
or kill continues from there and produces exactly the result of an
uninterrupted run; the state file is removed once the outputs are written.

Every InferenceOptions field has a flag below; flags left out keep FFN's usual
defaults (google/ffn's FIB-25 settings use --min-segment-size 1000).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ffnjax.config import CONSENSUS_MODES, SEED_ORDERS, SEED_POLICIES, InferenceOptions

OPTION_HELP = {
    "image_mean": "image normalisation mean: net input is (x - mean) / stddev",
    "image_stddev": "image normalisation standard deviation",
    "init_activation": "probability written at the seed voxel",
    "pad_value": "probability of canvas voxels not visited yet",
    "move_threshold": "a FOV face maximum must reach this probability for a move",
    "segment_threshold": "voxels at or above this probability join the object",
    "min_segment_size": "objects with fewer voxels are dropped (their seed is not retried)",
    "min_boundary_dist": "z,y,x: a seed this close to an existing object is skipped",
    "disconnected_seeds": "a voxel once driven below 0.5 is not revived (google/ffn disco_seeds)",
    "max_steps": "FOV evaluations allowed per object (0: bounded only by the volume)",
    "seed_policy": "'peaks' (maxima of the distance to image edges) or 'grid'",
    "seed_grid_step": "z,y,x spacing of the 'grid' seed policy",
    "seed_order": "'zyx' (ascending z,y,x: google/ffn's order) or 'distance' (deepest seeds "
                  "first: descending distance to the nearest image edge)",
    "batch_size": "FOV positions evaluated per network call (1 = google/ffn's exact order)",
    "consensus": "also segment in reverse seed order and combine both passes (--consensus-mode)",
    "consensus_mode": "'split' (one object per overlapping pair, google/ffn's oversegmentation "
                      "consensus) or 'contested' (keep the forward objects, unlabel voxels the "
                      "reverse pass gives to a non-corresponding object)",
}

CHOICES = {"seed_policy": SEED_POLICIES, "seed_order": SEED_ORDERS,
           "consensus_mode": CONSENSUS_MODES}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per InferenceOptions field (default None = keep the dataclass default)."""
    g = parser.add_argument_group("inference options (InferenceOptions)")
    defaults = InferenceOptions()
    for f in dataclasses.fields(InferenceOptions):
        default = getattr(defaults, f.name)
        help_text = f"{OPTION_HELP.get(f.name, f.name)} (default {default if not isinstance(default, tuple) else ','.join(map(str, default))})"
        if isinstance(default, bool):
            g.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=None, help=help_text)
        elif isinstance(default, tuple):
            g.add_argument(_flag(f.name), dest=f.name, metavar="Z,Y,X", default=None, help=help_text)
        elif f.name in CHOICES:
            g.add_argument(_flag(f.name), dest=f.name, choices=CHOICES[f.name], default=None,
                           help=help_text)
        else:
            g.add_argument(_flag(f.name), dest=f.name, type=type(default), default=None,
                           help=help_text)


def options_from_args(args: argparse.Namespace) -> InferenceOptions:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(InferenceOptions)
             if getattr(args, f.name, None) is not None}
    return InferenceOptions(**given)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.segment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--checkpoint", required=True, metavar="WORKDIR",
                   help="workdir holding checkpoints/ (from experiments.train or experiments.import_tf)")
    g.add_argument("--step", type=int, default=None,
                   help="checkpoint step to use (default: the latest)")
    g.add_argument("--image", required=True, metavar="SPEC",
                   help="image volume: x.zarr, x.n5, precomputed://x, file.h5:ds, file.npz:key, file.npy")
    g.add_argument("--output", required=True, metavar="SPEC",
                   help="segmentation to create (uint64): x.zarr, x.n5, precomputed://x or a JSON spec")
    g.add_argument("--bbox", metavar="Z0,Y0,X0,DZ,DY,DX", default=None,
                   help="segment only this box of the image: start and size, z,y,x (default: all)")
    g.add_argument("--prob-output", metavar="SPEC", default=None,
                   help="also write the probability of each committed voxel (uint8, 255 = 1.0)")
    g.add_argument("--fov-size", metavar="Z,Y,X", default=None,
                   help="expected FOV of the checkpoint; a mismatch is an error (a guard for scripts)")
    g.add_argument("--state", metavar="PATH", default=None,
                   help="resume state file (default: OUTPUT.segment-state.npz beside a local output)")
    g.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="save the resume state this often (default 60; 0 = after every seed)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (otherwise an existing output is an error "
                        "unless a resume state for it exists)")
    g.add_argument("--info-json", metavar="PATH", default=None,
                   help="write counters, timings and per-object records as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    add_option_flags(p)
    return p


def parse_bbox(text: str | None, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, size) z,y,x from 'z0,y0,x0,dz,dy,dx' (None: the whole volume).

    Raises:
      ValueError: naming the bbox when it is malformed or leaves the volume.
    """
    shape = tuple(int(s) for s in shape)[:3]
    if text is None:
        return (0, 0, 0), shape
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",")]
    except ValueError as e:
        raise ValueError(f"--bbox must be six integers z0,y0,x0,dz,dy,dx, got {text!r}") from e
    if len(vals) != 6:
        raise ValueError(f"--bbox must be six integers z0,y0,x0,dz,dy,dx, got {text!r}")
    start, size = tuple(vals[:3]), tuple(vals[3:])
    if any(s < 0 for s in start) or any(s <= 0 for s in size):
        raise ValueError(f"--bbox {text!r}: start must be >= 0 and size > 0")
    if any(a + b > n for a, b, n in zip(start, size, shape)):
        raise ValueError(f"--bbox {text!r} (start {start}, size {size}) reaches outside the "
                         f"image of shape {shape} (z,y,x)")
    return start, size


def default_state_path(output: str) -> Path:
    """OUTPUT.segment-state.npz beside a local output volume."""
    from ffnjax.volumes import parse_spec

    vs = parse_spec(output)
    path = getattr(vs, "path", None)
    if vs.kind not in ("zarr", "n5", "precomputed") or not path or "://" in path:
        raise ValueError(f"cannot place a resume state beside output {output!r}; pass --state PATH")
    return Path(path + ".segment-state.npz")


def _output_exists(spec: str) -> bool:
    from ffnjax.volumes import parse_spec

    vs = parse_spec(spec)
    path = getattr(vs, "path", None)
    return bool(path) and "://" not in path and Path(path).expanduser().exists()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)

    from ffnjax import flood, segmentation
    from ffnjax.checkpoints import load_checkpoint
    from ffnjax.volumes import create_volume, open_volume

    model_config, params = load_checkpoint(args.checkpoint, args.step)
    if args.fov_size is not None:
        want = tuple(int(v) for v in args.fov_size.split(","))
        if want != tuple(model_config.fov_size):
            raise ValueError(f"checkpoint {args.checkpoint} has FOV {model_config.fov_size} (z,y,x) "
                             f"but --fov-size asks for {want}")

    image = open_volume(args.image)
    start, size = parse_bbox(args.bbox, image.shape)
    raw = np.asarray(image.read(start, size))
    if raw.ndim == 4 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    flood.check_image_shape(raw.shape, model_config.fov_size)

    state_path = Path(args.state) if args.state else default_state_path(args.output)
    state = segmentation.load_state(state_path) if state_path.exists() else None
    outputs = [args.output] + ([args.prob_output] if args.prob_output else [])
    if state is None and not args.overwrite:
        for out in outputs:
            if _output_exists(out):
                raise FileExistsError(f"output {out} exists; pass --overwrite to replace it")
    run_id = json.dumps({"image": args.image, "start": list(start), "size": list(size),
                         "checkpoint": str(Path(args.checkpoint).absolute()), "step": args.step,
                         "prob": bool(args.prob_output)})
    if state is not None:
        print(f"resuming from {state_path}: seed {state.seed_index} of {len(state.seeds)}, "
              f"{len(state.objects)} objects so far", file=sys.stderr)

    t0 = time.perf_counter()
    state, info = segmentation.segment_state(
        raw, params, model_config, options, state=state,
        keep_probabilities=bool(args.prob_output),
        checkpoint_fn=lambda s: segmentation.save_state(state_path, s),
        checkpoint_every_s=args.checkpoint_every, progress=not args.quiet, run_id=run_id)
    seg = segmentation.final_segmentation(state, options)

    voxel_size = tuple(image.voxel_size)
    offset = tuple(int(o) + int(s) for o, s in zip(image.offset, start))
    out = create_volume(args.output, seg.shape, "uint64", voxel_size=voxel_size, offset=offset,
                        overwrite=True)
    out.write((0, 0, 0), seg)
    if args.prob_output:
        prob = np.where(seg > 0, state.probabilities, 0).astype(np.uint8)
        pout = create_volume(args.prob_output, seg.shape, "uint8", voxel_size=voxel_size,
                             offset=offset, overwrite=True)
        pout.write((0, 0, 0), prob)
    state_path.unlink(missing_ok=True)

    wall = time.perf_counter() - t0
    c = info.counters
    summary = {
        "objects": int(len(np.unique(seg)) - (1 if (seg == 0).any() else 0)),
        "segmented_voxels": int(np.count_nonzero(seg)),
        "volume_voxels": int(seg.size),
        "seeds": info.num_seeds, "counters": c,
        "timings": {k: round(v, 4) for k, v in info.timings.items()},
        "wall_s": round(wall, 3),
        "fov_steps_per_s": round(c["fov_steps"] / max(info.timings["fill"] + info.timings["compile"], 1e-9), 2),
        "output": args.output, "prob_output": args.prob_output,
    }
    print(f"{info.summary()}\nwrote {args.output} {tuple(seg.shape)} uint64"
          + (f" and {args.prob_output} uint8" if args.prob_output else ""))
    if args.info_json:
        Path(args.info_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.info_json).write_text(json.dumps(
            {**summary, "objects_list": [o.to_dict() for o in info.objects]}, indent=1))
    return summary


if __name__ == "__main__":
    main()
