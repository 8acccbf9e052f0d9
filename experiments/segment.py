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

`--request FILE.pbtxt` runs a google/ffn InferenceRequest text file as it
stands (`ffnjax.request`): its image, normalisation, seed policy and args,
model (a TensorFlow checkpoint is imported on the fly), inference options,
masks and init_segmentation, writing google/ffn's seg-X_Y_Z.npz / .prob files
into its segmentation_output_dir for the subvolume at --box's corner. Flags
given beside it win (--image, --checkpoint, any option flag)::

    python -m experiments.segment --request inference_training_sample2.pbtxt \\
        --box 0:64,0:128,120:248

Exclusion masks (`ffnjax.restrict`): --mask SPEC (no FOV is centred on its
non-zero voxels and no fill starts there) and --seed-mask SPEC (no fill starts
there), each repeatable; --init-segmentation SPEC continues those labels (kept
with their ids; new fills do not start in them or take their voxels).
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
    g.add_argument("--request", metavar="FILE.pbtxt", default=None,
                   help="a google/ffn InferenceRequest text file to run (ffnjax.request): it gives "
                        "the image, model, options, masks and output directory; the flags "
                        "given beside it win")
    g.add_argument("--checkpoint", metavar="WORKDIR", default=None,
                   help="workdir holding checkpoints/ (from experiments.train or "
                        "experiments.import_tf); required without --request")
    g.add_argument("--step", type=int, default=None,
                   help="checkpoint step to use (default: the latest)")
    g.add_argument("--image", metavar="SPEC", default=None,
                   help="image volume: x.zarr, x.n5, precomputed://x, file.h5:ds, file.npz:key, "
                        "file.npy, or SPEC@z0:z1,y0:y1,x0:x1 / A+B (stacked along z; both read "
                        "into memory); required without --request")
    g.add_argument("--output", metavar="SPEC", default=None,
                   help="segmentation to create (uint64): x.zarr, x.n5, precomputed://x or a JSON "
                        "spec; required without --request (which writes to its "
                        "segmentation_output_dir)")
    _cli.add_box_flags(g, "segment only this box of the image")
    g.add_argument("--prob-output", metavar="SPEC", default=None,
                   help="also write the probability of each committed voxel (uint8, 255 = 1.0)")
    for flag, what in (("--mask", "no FOV is centred on its non-zero voxels and no fill starts "
                                  "there (google/ffn's masks)"),
                       ("--seed-mask", "no fill starts on its non-zero voxels (google/ffn's "
                                       "seed_masks)")):
        g.add_argument(flag, metavar="SPEC", action="append", default=None,
                       help=f"{what}; read over the image's box; repeatable")
    g.add_argument("--init-segmentation", metavar="SPEC", default=None,
                   help="labels to continue: their objects are kept (ids too) and new fills "
                        "neither start in them nor take their voxels (google/ffn's "
                        "init_segmentation)")
    g.add_argument("--fov-size", "--fov", dest="fov_size", metavar="Z,Y,X", default=None,
                   type=_cli.zyx_arg(),
                   help="expected FOV of the checkpoint; a mismatch is an error (a guard for "
                        "scripts; both spellings accepted)")
    g.add_argument("--state", metavar="PATH", default=None,
                   help="resume state file (default: OUTPUT.segment-state.npz beside a local "
                        "output)")
    g.add_argument("--checkpoint-every", type=float, default=None, metavar="SECONDS",
                   help="save the resume state this often (default 60, or the request's "
                        "checkpoint_interval; 0 = after every seed)")
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


@dataclasses.dataclass
class Job:
    """What one run reads and writes: the flags over `--request`'s values.

    Attributes:
      image, checkpoint: the image spec and the model (a workdir, or a
        TensorFlow checkpoint prefix that a request imports on the fly).
      model_config: the request's model (None: the checkpoint's).
      base: option values under the flags (the request's; empty without one).
      masks, seed_masks: `ffnjax.restrict.MaskSource`s (--mask / --seed-mask,
        then the request's).
      init_segmentation: spec of the labels to continue, or None.
      request: the parsed `ffnjax.request.Request`, or None.
      corner: z,y,x start of the box (names a request's output files).
    """

    image: str
    checkpoint: str
    model_config: Any = None
    base: dict = dataclasses.field(default_factory=dict)
    masks: list = dataclasses.field(default_factory=list)
    seed_masks: list = dataclasses.field(default_factory=list)
    init_segmentation: str | None = None
    request: Any = None
    corner: tuple[int, int, int] = (0, 0, 0)


def box_start(args: argparse.Namespace) -> tuple[int, int, int]:
    """z,y,x start of --box / --bbox (0 where open or absent), without the image."""
    box = args.box if args.bbox is None else _cli.bbox_as_box(args.bbox)
    if box is None:
        return (0, 0, 0)
    flag = "--box" if args.bbox is None else "--bbox"
    return tuple(a or 0 for a, _ in _cli.parse_box(box, flag))  # type: ignore[return-value]


def job_from_args(args: argparse.Namespace) -> Job:
    """The run's `Job`: the flags, over `--request`'s values when given.

    Raises:
      ValueError: --output/--prob-output with --request, a bad request
        (named with its field).
    """
    from ffnjax.restrict import MaskSource
    masks = [MaskSource.nonzero(s) for s in args.mask or ()]
    seed_masks = [MaskSource.nonzero(s) for s in args.seed_mask or ()]
    if args.request is None:
        return Job(args.image, args.checkpoint, masks=masks, seed_masks=seed_masks,
                   init_segmentation=args.init_segmentation, corner=box_start(args))
    from ffnjax.request import read_request
    for flag in ("output", "prob_output"):
        if getattr(args, flag):
            raise ValueError(f"--{flag.replace('_', '-')} cannot be combined with --request: the "
                             "request's segmentation_output_dir receives google/ffn's "
                             "seg-X_Y_Z.npz and .prob files")
    req = read_request(args.request)
    for name, value in (("image", args.image or req.image),
                        ("model_checkpoint_path", args.checkpoint or req.checkpoint),
                        ("segmentation_output_dir", req.output_dir)):
        if not value:
            raise ValueError(f"{args.request}: {name} is unset")
    # A request has no downsample: the model's own (its workdir's facts) must not be overridden.
    base = {k: v for k, v in req.options.to_dict().items() if k != "downsample"}
    return Job(args.image or req.image, args.checkpoint or req.checkpoint, req.model_config,
               base, masks + list(req.masks), seed_masks + list(req.seed_masks),
               args.init_segmentation or req.init_segmentation or None, req, box_start(args))


def output_paths(args: argparse.Namespace, job: Job) -> tuple[dict[str, Any], Path]:
    """({flag: path} of everything the run writes, the resume state's path)."""
    if job.request is None:
        state = Path(args.state) if args.state else default_state_path(args.output)
        return {"--output": args.output, "--prob-output": args.prob_output,
                "--state": str(state), "--info-json": args.info_json}, state
    from ffnjax.gffn_output import subvolume_path
    out = job.request.output_dir
    state = (Path(args.state) if args.state
             else subvolume_path(out, job.corner, "segment-state.npz"))
    return {"segmentation_output_dir": [str(subvolume_path(out, job.corner, "npz")),
                                        str(subvolume_path(out, job.corner, "prob"))],
            "--state": str(state), "--info-json": args.info_json}, state


def read_box(spec: str, start: Sequence[int], size: Sequence[int], flag: str,
             frame: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """The box of volume `spec` as z,y,x (a single channel axis dropped).

    `start` counts from the voxel at `frame` (the image's stored offset), and
    `spec`'s own stored offset places it in that frame: a segmentation that
    `segment --box` wrote (its offset: the box's) is read at the right place.
    """
    from ffnjax.volumes import open_input
    with open_input(spec) as vol:
        local = tuple(int(f) + int(s) - int(o) for f, s, o in zip(frame, start, vol.offset))
        if any(v < 0 for v in local) or any(v + n > m for v, n, m in zip(local, size, vol.shape)):
            end = tuple(int(f) + int(s) + int(n) for f, s, n in zip(frame, start, size))
            raise ValueError(
                f"{flag} {spec}: the image box {tuple(int(f) + int(s) for f, s in zip(frame, start))}"
                f"..{end} (z,y,x, with the image's offset) is not inside it: it holds "
                f"{vol.offset}..{tuple(o + m for o, m in zip(vol.offset, vol.shape))} "
                "(its stored offset and shape)")
        data = np.asarray(vol.read(local, size))
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{flag} {spec}: expected a z,y,x volume, got shape {data.shape}")
    return data


def restriction_for(job: Job, start, size, raw: np.ndarray, fov_size: Sequence[int]):
    """The run's `ffnjax.restrict.Restriction` over the box (None when unrestricted)."""
    from ffnjax import restrict
    req = job.request
    shift = None
    if req is not None and req.shift_mask:
        fov = req.shift_mask_fov or (tuple(-(f // 2) for f in fov_size), tuple(fov_size))
        shift = restrict.read_shift_restriction(req.shift_mask, req.shift_mask_threshold, *fov,
                                                req.shift_mask_scale, start, size)
    r = restrict.Restriction(restrict.build_mask(job.masks, start, size, raw),
                             restrict.build_mask(job.seed_masks, start, size, raw), shift)
    return None if r.seeds() is None else r


def write_request_outputs(job: Job, state, seg: np.ndarray, prob: np.ndarray,
                          counters: dict) -> Path:
    """google/ffn's seg-X_Y_Z.npz and .prob of the finished run (`ffnjax.gffn_output`)."""
    from ffnjax.gffn_output import OriginInfo, save_subvolume
    origins = {o.id: OriginInfo(tuple(o.seed), o.steps, o.fill_s) for o in state.objects}
    return save_subvolume(job.request.output_dir, job.corner, seg, origins, prob,
                          request_text=job.request.text, counters=counters)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [f"--{f}" for f in ("checkpoint", "image", "output") if not getattr(args, f)]
    if args.request is None and missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or run a "
                     "google/ffn request: --request FILE.pbtxt)")
    if args.request is not None and args.compat is None:
        args.compat = "google_ffn"  # a request's option flags are proto floats too
    job = job_from_args(args)
    options_from_args(args, job.base)  # bad values (seed policy arguments too) fail now
    _cli.use_compile_cache(args)
    # Outputs before anything is read or computed: never an input, never an existing
    # output unless --overwrite or resuming, and writable (found now, not after the fill).
    outputs, state_path = output_paths(args, job)
    resuming = state_path.exists()
    inputs = {"--image": job.image, "--checkpoint": job.checkpoint, "--request": args.request,
              "--init-segmentation": job.init_segmentation,
              "--mask": [m.volume for m in job.masks + job.seed_masks if m.volume]}
    _cli.check_outputs(outputs, inputs, overwrite=args.overwrite,
                       existing_ok=("--state",) + (tuple(outputs) if resuming else ()))

    # Here, not at the top: JAX and TensorStore take seconds to load; --help and bad flags don't wait.
    from ffnjax import flood, scale, segmentation
    from ffnjax.request import load_model
    from ffnjax.volumes import create_volume, open_input, open_volume, require_finite

    model_config, params, facts = load_model(job.checkpoint, job.model_config, args.step)
    options = options_from_args(args, {**facts, **job.base})
    if args.fov_size is not None and tuple(args.fov_size) != tuple(model_config.fov_size):
        raise ValueError(f"checkpoint {job.checkpoint} has FOV {model_config.fov_size} (z,y,x) "
                         f"but --fov-size asks for {tuple(args.fov_size)}")

    image = open_input(job.image)
    start, size = _cli.region(args, image.shape, "image")
    raw = np.asarray(image.read(start, size))
    if raw.ndim == 4 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    require_finite(raw, f"--image {job.image}", start, image.chunks)
    flood.check_image_shape(scale.coarse_shape(raw.shape, options.downsample), model_config.fov_size)
    restriction = restriction_for(job, start, size, raw, model_config.fov_size)
    init = (None if job.init_segmentation is None
            else read_box(job.init_segmentation, start, size, "--init-segmentation", image.offset))

    state = segmentation.load_state(state_path) if resuming else None
    keep_prob = bool(args.prob_output) or job.request is not None
    run_id = json.dumps({"image": job.image, "start": list(start), "size": list(size),
                         "checkpoint": str(Path(job.checkpoint).absolute()), "step": args.step,
                         "prob": keep_prob, "request": args.request,
                         "masks": [dataclasses.astuple(m) for m in job.masks],
                         "seed_masks": [dataclasses.astuple(m) for m in job.seed_masks],
                         "init": job.init_segmentation})
    if state is not None:
        print(f"resuming from {state_path}: seed {state.seed_index} of {len(state.seeds)}, "
              f"{len(state.objects)} objects so far", file=sys.stderr)
    every = args.checkpoint_every
    if every is None:
        every = float(job.request.checkpoint_interval if job.request is not None
                      and job.request.checkpoint_interval > 0 else 60.0)

    t0 = time.perf_counter()
    try:
        state, info = segmentation.segment_state(
            raw, params, model_config, options, state=state, keep_probabilities=keep_prob,
            checkpoint_fn=lambda s: segmentation.save_state(state_path, s),
            checkpoint_every_s=every, progress=not args.quiet, run_id=run_id,
            restriction=restriction, init_segmentation=init, corner=start)
    except KeyboardInterrupt as e:  # SIGINT / SIGTERM: segment_state saved the state
        raise interrupt.with_resume(e, f"the state is saved in {state_path}; rerun the same "
                                       "command to resume") from None
    seg = segmentation.final_segmentation(state, options, raw.shape[:3])
    prob = None
    if keep_prob:
        prob = scale.upsample_labels(state.probabilities, options.downsample, seg.shape)
        prob = np.where(seg > 0, prob, 0).astype(np.uint8)

    if job.request is not None:
        written = str(write_request_outputs(job, state, seg, prob, info.counters))
    else:
        written = args.output
        voxel_size = tuple(image.voxel_size)
        offset = tuple(int(o) + int(s) for o, s in zip(image.offset, start))
        out = create_volume(args.output, seg.shape, "uint64", voxel_size=voxel_size,
                            offset=offset, overwrite=True)
        out.write((0, 0, 0), seg)
        if args.prob_output:
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
        "output": written, "prob_output": args.prob_output,
    }
    print(f"{info.summary()}\nwrote {written} {tuple(seg.shape)}"
          f"{' uint64' if job.request is None else ''}: "
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
