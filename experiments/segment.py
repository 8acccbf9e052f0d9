"""Segment a volume by flood filling with a trained (or imported) FFN.

    python -m experiments.segment --checkpoint runs/fib25 \\
        --image ../shared/data/fib25_training_sample2/raw_z100-149.npz:raw \\
        --output out/fib25_seg.zarr --box 0:50,0:128,0:128 --prob-output out/fib25_prob.zarr

Reads the image through ffnjax.volumes (zarr, N5, precomputed://, file.h5:ds,
file.npz:key, file.npy), flood-fills from every seed of the seed policy, and
writes the segmentation (uint64, 0 = background) and optionally the object
probability map (uint8, 0..255) as new volumes with the image's voxel size and
the box's offset.

Resumable: the run's state (segmentation so far, next seed, counters) is saved
atomically every --checkpoint-every seconds to --state (by default beside the
output: OUTPUT.segment-state.npz). Re-running the same command after a crash
or kill continues from there and produces exactly the result of an
uninterrupted run; the state file is removed once the outputs are written.

Every InferenceOptions field has a flag below. Flags left out keep the values
the checkpoint's model was trained with (image normalisation, seed and pad
probabilities: `ffnjax.checkpoints.inference_defaults`), else FFN's usual
defaults (google/ffn's FIB-25 settings use --min-segment-size 1000).

`--compat google_ffn` infers exactly as google/ffn does (its seeds, the FOV
positions it evaluates and its objects, voxel for voxel, with the same model):
for users who migrate and want their old segmentations back
(docs/google_ffn_parity.md). A published google/ffn model, imported::

    python -m experiments.import_tf --tf-checkpoint model.ckpt-27465036 \\
        --depth 12 --fov 33,33,33 --deltas 8,8,8 --out out/fib25_tf
    python -m experiments.segment --checkpoint out/fib25_tf --compat google_ffn \\
        --image crop.h5:raw --output out/seg.zarr
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments import _cli
from ffnjax import interrupt
from ffnjax.config import InferenceOptions
from ffnjax.volume_spec import parse_spec


def add_option_flags(parser, table=_cli.INFERENCE_FLAGS_FROM_CHECKPOINT) -> None:
    """One flag per InferenceOptions field (default None: keep the checkpoint's or dataclass's)."""
    g = parser.add_argument_group("inference options (InferenceOptions)")
    _cli.add_compat_flag(g)
    _cli.add_flags(g, InferenceOptions, table)


def options_from_args(args: argparse.Namespace, defaults: dict | None = None) -> InferenceOptions:
    """InferenceOptions of the flags given, over `defaults` (e.g. the checkpoint's
    `ffnjax.checkpoints.inference_defaults`), over the `--compat` mode's
    values (the dataclass defaults without it)."""
    return _cli.inference_options(args, defaults)


def build_parser() -> argparse.ArgumentParser:
    p = _cli.make_parser("segment", __doc__)
    g = p.add_argument_group("run")
    g.add_argument("--checkpoint", required=True, metavar="WORKDIR",
                   help="workdir holding checkpoints/ (from experiments.train or experiments.import_tf)")
    g.add_argument("--step", type=int, default=None,
                   help="checkpoint step to use (default: the latest)")
    g.add_argument("--image", required=True, metavar="SPEC",
                   help="image volume: x.zarr, x.n5, precomputed://x, file.h5:ds, file.npz:key, file.npy")
    g.add_argument("--output", required=True, metavar="SPEC",
                   help="segmentation to create (uint64): x.zarr, x.n5, precomputed://x or a JSON spec")
    _cli.add_box_flags(g, "segment only this box of the image")
    g.add_argument("--prob-output", metavar="SPEC", default=None,
                   help="also write the probability of each committed voxel (uint8, 255 = 1.0)")
    g.add_argument("--fov-size", "--fov", dest="fov_size", metavar="Z,Y,X", default=None,
                   type=_cli.zyx_arg(),
                   help="expected FOV of the checkpoint; a mismatch is an error (a guard for "
                        "scripts; both spellings accepted)")
    g.add_argument("--state", metavar="PATH", default=None,
                   help="resume state file (default: OUTPUT.segment-state.npz beside a local output)")
    g.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="save the resume state this often (default 60; 0 = after every seed)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (otherwise an existing output is an error "
                        "unless a resume state for it exists)")
    g.add_argument("--info-json", metavar="PATH", default=None,
                   help="write counters, timings and per-object records as JSON")
    _cli.add_common(g)
    _cli.add_compile_cache(g)
    add_option_flags(p)
    return p


def default_state_path(output: str) -> Path:
    """OUTPUT.segment-state.npz beside a local output volume."""
    vs = parse_spec(output)
    path = getattr(vs, "path", None)
    if vs.kind not in ("zarr", "n5", "precomputed") or not path or "://" in path:
        raise ValueError(f"cannot place a resume state beside output {output!r}; pass --state PATH")
    return Path(path + ".segment-state.npz")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    options_from_args(args)  # bad option values fail before the checkpoint is read
    _cli.use_compile_cache(args)
    # Outputs before anything is read or computed: never an input, never an existing
    # output unless --overwrite or resuming, and writable (found now, not after the fill).
    state_path = Path(args.state) if args.state else default_state_path(args.output)
    resuming = state_path.exists()
    _cli.check_outputs(
        {"--output": args.output, "--prob-output": args.prob_output, "--state": str(state_path),
         "--info-json": args.info_json},
        {"--image": args.image, "--checkpoint": args.checkpoint}, overwrite=args.overwrite,
        existing_ok=("--state",) + (("--output", "--prob-output", "--info-json") if resuming else ()))

    # Here, not at the top: JAX and TensorStore take seconds to load; --help and bad flags don't wait.
    from ffnjax import flood, scale, segmentation
    from ffnjax.checkpoints import inference_defaults, load_checkpoint
    from ffnjax.volumes import create_volume, open_volume, require_finite

    model_config, params = load_checkpoint(args.checkpoint, args.step)
    options = options_from_args(args, inference_defaults(args.checkpoint, args.step))
    if args.fov_size is not None and tuple(args.fov_size) != tuple(model_config.fov_size):
        raise ValueError(f"checkpoint {args.checkpoint} has FOV {model_config.fov_size} (z,y,x) "
                         f"but --fov-size asks for {tuple(args.fov_size)}")

    image = open_volume(args.image)
    start, size = _cli.region(args, image.shape, "image")
    raw = np.asarray(image.read(start, size))
    if raw.ndim == 4 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    require_finite(raw, f"--image {args.image}", start, image.chunks)
    flood.check_image_shape(scale.coarse_shape(raw.shape, options.downsample), model_config.fov_size)

    state = segmentation.load_state(state_path) if resuming else None
    run_id = json.dumps({"image": args.image, "start": list(start), "size": list(size),
                         "checkpoint": str(Path(args.checkpoint).absolute()), "step": args.step,
                         "prob": bool(args.prob_output)})
    if state is not None:
        print(f"resuming from {state_path}: seed {state.seed_index} of {len(state.seeds)}, "
              f"{len(state.objects)} objects so far", file=sys.stderr)

    t0 = time.perf_counter()
    try:
        state, info = segmentation.segment_state(
            raw, params, model_config, options, state=state,
            keep_probabilities=bool(args.prob_output),
            checkpoint_fn=lambda s: segmentation.save_state(state_path, s),
            checkpoint_every_s=args.checkpoint_every, progress=not args.quiet, run_id=run_id)
    except KeyboardInterrupt as e:  # SIGINT / SIGTERM: segment_state saved the state
        raise interrupt.with_resume(e, f"the state is saved in {state_path}; rerun the same "
                                       "command to resume") from None
    seg = segmentation.final_segmentation(state, options, raw.shape[:3])

    voxel_size = tuple(image.voxel_size)
    offset = tuple(int(o) + int(s) for o, s in zip(image.offset, start))
    out = create_volume(args.output, seg.shape, "uint64", voxel_size=voxel_size, offset=offset,
                        overwrite=True)
    out.write((0, 0, 0), seg)
    if args.prob_output:
        prob = scale.upsample_labels(state.probabilities, options.downsample, seg.shape)
        prob = np.where(seg > 0, prob, 0).astype(np.uint8)
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
        "fov_steps_per_s": round(c["fov_steps"] / max(info.timings["fill"] + info.timings["first_fill"], 1e-9), 2),
        "output": args.output, "prob_output": args.prob_output,
    }
    print(f"{info.summary()}\nwrote {args.output} {tuple(seg.shape)} uint64: "
          f"{summary['objects']} objects, {summary['segmented_voxels']:,} of "
          f"{summary['volume_voxels']:,} voxels labelled"
          + (f"; and {args.prob_output} uint8" if args.prob_output else ""))
    if args.info_json:
        Path(args.info_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.info_json).write_text(json.dumps(
            {**summary, "objects_list": [o.to_dict() for o in info.objects]}, indent=1))
    return summary


if __name__ == "__main__":
    _cli.run(main)
