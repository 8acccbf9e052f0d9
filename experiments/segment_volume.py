"""Segment a whole volume block by block on Dask and write one global segmentation.

    python -m experiments.segment_volume --checkpoint WORKDIR --image SPEC --output SPEC \
        --block 128,256,256 [--overlap 32,32,32] [--scheduler ADDRESS]

Volumes are any `ffnjax.volumes` spec: 'x.zarr', 'x.n5', 'precomputed://x'
(also 'f.h5:dataset', 'f.npz:key' for the input). Rerunning the same command
resumes: finished blocks are kept in '<output>.blocks/'. See
`ffnjax.blockwise.segment_volume`. An existing output that the work folder's
run did not write is refused unless --overwrite; the output is never the
image, --overwrite or not.

Inference options come, each overriding the one before, from: the values the
checkpoint was trained with (normalisation, seed and pad probabilities:
`ffnjax.checkpoints.inference_defaults`), else InferenceOptions' defaults;
--options (JSON); one flag per InferenceOptions field, as in experiments.segment.

Run it once, on one machine: on a cluster of hosts the Dask scheduler spreads
the blocks over the workers (one per accelerator) and this command drives it
with --scheduler. Started once per host (srun with several tasks, a TPU pod's
--worker=all, jax.distributed) every copy would segment every block, so it
refuses, naming what it saw (`ffnjax.multihost.launch_reasons`); recipes in
docs/multihost.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from experiments import _cli
from ffnjax import interrupt, multihost
from ffnjax.blockwise import segment_volume
from ffnjax.dask_tasks import TasksFailed
from ffnjax.view import save_montage
from ffnjax.config import InferenceOptions, ModelConfig

ORACLE_MODEL = ModelConfig(depth=1, features=1, fov_size=(9, 9, 9), deltas=(3, 3, 3))


def _options(text: str | None, base: InferenceOptions) -> InferenceOptions:
    """`base` with the fields of --options (a JSON object or a JSON file) replaced."""
    if not text:
        return base
    p = Path(text)
    raw = p.read_text() if not text.lstrip().startswith("{") and p.exists() else text
    if not raw.lstrip().startswith("{"):
        raise ValueError(f"--options must be a JSON object or a JSON file, got {text!r}")
    try:
        return InferenceOptions.from_dict({**base.to_dict(), **json.loads(raw)})
    except json.JSONDecodeError as e:
        raise ValueError(f"--options is not valid JSON ({e}), got {text!r}") from None


def options_from_args(args: argparse.Namespace, base: InferenceOptions) -> InferenceOptions:
    """`base`, then --options, then the InferenceOptions flags given."""
    with_json = _options(args.options, base)
    return _cli.build(InferenceOptions, _cli.INFERENCE_FLAGS, with_json.to_dict(),
                      _cli.given(args, InferenceOptions, _cli.INFERENCE_FLAGS))


def build_parser() -> argparse.ArgumentParser:
    ap = _cli.make_parser("segment_volume", __doc__)
    ap.add_argument("--checkpoint", help="training/import workdir holding the model "
                    "(ffnjax.checkpoints layout); not needed with --oracle")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--image", required=True, help="input image volume spec (z,y,x)")
    ap.add_argument("--output", required=True,
                    help="output segmentation spec: x.zarr, x.n5 or precomputed://x (uint64; created "
                         "when absent, reused when resuming)")
    ap.add_argument("--block", default="128,256,256", type=_cli.zyx_arg(minimum=1),
                    help="block size z,y,x (default 128,256,256)")
    ap.add_argument("--overlap", default=None, type=_cli.zyx_arg(minimum=0),
                    help="voxels shared by neighbouring blocks z,y,x: at least twice the FOV "
                         "radius (the FOV size - 1), the default, so that every object the "
                         "whole-volume run finds is found block-wise (docs/blockwise.md)")
    ap.add_argument("--scheduler", default=None,
                    help="Dask scheduler address (tcp://host:8786) to run on an existing cluster, "
                         "or 'sync'/'threads'/'processes' for Dask's local schedulers; default: "
                         "a LocalCluster on this machine")
    ap.add_argument("--workers", type=int, default=None,
                    help="worker processes of the default LocalCluster (default: one per core on "
                         "CPU, one per accelerator)")
    ap.add_argument("--min-overlap", type=int, default=1,
                    help="shared voxels needed to join two objects across an overlap (default 1)")
    ap.add_argument("--workdir", default=None,
                    help="folder for per-block results, shared by all workers (default "
                         "<output>.blocks)")
    ap.add_argument("--options", default=None,
                    help="InferenceOptions overrides as a JSON object or a JSON file, e.g. "
                         "'{\"segment_threshold\": 0.6, \"min_segment_size\": 1000}' (the "
                         "option flags below override it in turn)")
    ap.add_argument("--chunks", default=None, type=_cli.zyx_arg(minimum=1),
                    help="chunk shape z,y,x of a new output volume")
    ap.add_argument("--retries", type=int, default=1,
                    help="times a failed block task is tried again before the run reports it "
                         "(default 1); finished blocks are kept either way")
    ap.add_argument("--png", default=None, help="also write a PNG montage of z slices here")
    ap.add_argument("--summary", default=None, help="also write the run summary as JSON here")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing --output (and --summary, --png) that no run in the "
                         "work folder wrote (otherwise that is an error; resuming needs no flag)")
    ap.add_argument("--oracle", action="store_true",
                    help="check the pipeline without a model: the image is a label volume and "
                         "the oracle network (ffnjax.testing) fills its objects")
    geometry = _cli.with_help(
        _cli.MODEL_FLAGS, fov_size="FOV size z,y,x: the oracle's with --oracle, else a guard "
                                   "(a checkpoint of another FOV is an error)",
        deltas="FOV moves z,y,x: the oracle's with --oracle, else a guard (a checkpoint with "
               "other deltas is an error)")
    for name in ("fov_size", "deltas"):
        shown = ",".join(map(str, getattr(ORACLE_MODEL, name)))
        geometry[name] = dataclasses.replace(
            geometry[name], default_text=f"{shown} with --oracle, else the checkpoint's")
    _cli.add_flags(ap, ModelConfig, geometry, ("fov_size", "deltas"))
    _cli.add_common(ap, "hide the progress bars", quiet_aliases=("--no-progress",))
    _cli.add_compile_cache(ap)
    g = ap.add_argument_group("inference options (InferenceOptions)")
    _cli.add_flags(g, InferenceOptions, _cli.INFERENCE_FLAGS_FROM_CHECKPOINT)
    return ap


def workdir_of(args: argparse.Namespace) -> Path:
    from ffnjax.blockfiles import default_workdir

    return Path(args.workdir) if args.workdir else default_workdir(args.output)


def check_paths(args: argparse.Namespace) -> None:
    """The output checks of `_cli.check_outputs`, before the model loads: a
    rerun that resumes (the work folder holds a run.json) may find its
    outputs in place."""
    workdir = workdir_of(args)
    resuming = (workdir / "run.json").exists()
    _cli.check_outputs(
        {"--output": args.output, "--workdir": str(workdir), "--summary": args.summary,
         "--png": args.png},
        {"--image": args.image, "--checkpoint": args.checkpoint}, overwrite=args.overwrite,
        existing_ok=("--workdir",) + (("--output", "--summary", "--png") if resuming else ()))
def refuse_multi_process() -> None:
    """Raises ValueError when this looks like one of several copies of the command."""
    reasons = multihost.launch_reasons()
    if reasons:
        raise ValueError(f"segment_volume runs once and spreads blocks over Dask workers, but "
                         f"this process is one of several launched together "
                         f"({'; '.join(reasons)}), so every copy would segment every block; "
                         f"start it once with --scheduler tcp://HOST:8786 (docs/multihost.md)")


def main(argv: list[str] | None = None) -> dict | int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_multi_process()
    _cli.use_compile_cache(args)  # Dask workers started below inherit it
    check_paths(args)
    if args.oracle:
        from ffnjax.testing import oracle_apply_fn, oracle_options  # loads JAX: only when asked for
        model_config = ModelConfig(depth=1, features=1,
                                   fov_size=args.fov or ORACLE_MODEL.fov_size,
                                   deltas=args.deltas or ORACLE_MODEL.deltas)
        params, apply_fn = None, oracle_apply_fn
        options = options_from_args(args, oracle_options(seed_policy="grid",
                                                         seed_grid_step=model_config.deltas))
    else:
        if not args.checkpoint:
            parser.error("--checkpoint is required (or --oracle to check the pipeline)")
        options_from_args(args, InferenceOptions())  # bad options fail before the model loads
        from ffnjax.checkpoints import inference_defaults, load_checkpoint  # loads JAX: after flag checks
        model_config, params = load_checkpoint(args.checkpoint, args.step)
        for flag, name in (("--fov", "fov_size"), ("--deltas", "deltas")):
            asked = getattr(args, _cli.dest_of(name, _cli.MODEL_FLAGS))
            if asked is not None and tuple(asked) != tuple(getattr(model_config, name)):
                raise ValueError(f"checkpoint {args.checkpoint} has {name} "
                                 f"{getattr(model_config, name)} (z,y,x) but {flag} asks for "
                                 f"{tuple(asked)}")
        apply_fn = None
        options = options_from_args(
            args, InferenceOptions(**inference_defaults(args.checkpoint, args.step)))
    try:
        summary = segment_volume(
            args.image, args.output, params, model_config, options, block=args.block,
            overlap=args.overlap, client=args.scheduler, apply_fn=apply_fn,
            min_overlap=args.min_overlap, workdir=args.workdir, n_workers=args.workers,
            chunks=args.chunks, retries=args.retries, progress=not args.quiet,
            overwrite=args.overwrite)
    except KeyboardInterrupt as e:  # SIGINT / SIGTERM: finished blocks are on disk
        raise interrupt.with_resume(e, f"finished blocks are kept in {workdir_of(args)}; rerun the "
                                       "same command to resume") from None
    except TasksFailed as e:  # one line: exit 2 for bad input (a NaN block), else 1
        if e.bad_input:
            raise ValueError(str(e)) from e
        if args.debug:
            raise
        print(_cli.error_line(e), file=sys.stderr)
        return 1
    print(summary)
    if summary.weak_contacts:
        print(f"{len(summary.weak_contacts)} possible cuts (objects touching across an overlap with "
              f"fewer than {args.min_overlap} shared voxels): see {summary.workdir}/reconcile.json")
    d = summary.to_dict()
    if args.summary:
        Path(args.summary).write_text(json.dumps(d, indent=2))
    if args.png:
        print("montage:", save_montage(args.png, args.image, args.output))
    return d


if __name__ == "__main__":
    _cli.run(main)
