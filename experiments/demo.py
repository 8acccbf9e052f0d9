"""The main job end to end (what `make demo` runs), on synthetic EM data.

    python -m experiments.demo                  # about 10 minutes on a 2-core CPU
    python -m experiments.demo --from-scratch   # trains the full recipe: about 80 minutes

1. makes a synthetic training volume and a separate test volume (different seed;
   the scored --test-shape plus --test-context voxels of context on every side),
2. trains a small FFN from scratch for --quick-steps on the centre FOV (a couple of
   minutes: progress bar, falling loss, checkpoints, TensorBoard, PNGs), so you see
   the loop work and where its outputs land; with --from-scratch it trains the full
   recipe instead: first on the centre FOV only, then with FOV moves from those
   weights, so the net learns to read its own predictions as flood filling makes
   it, then (with --refine-steps) more FOV-move steps at a lower learning rate,
3. flood-fills the test volume with the shipped demo model (--model, default
   models/demo_synthetic, which --from-scratch made; a quick model is far too
   weak to segment well) or, with --from-scratch, with the model just trained,
4. segments the same volume with the non-learned watershed baseline,
5. scores both on the inner --test-shape against the ground truth (ERL/NERL at
   merge thresholds 1 and 50, VOI, adapted Rand) and prints one summary.

Everything lands under --out (default out/demo, or out/demo_full with
--from-scratch, so the two never resume each other): data/*.zarr, train_quick/
or train_centre/, train/ and train_refine/ (checkpoints, tensorboard, images),
ffn_seg.zarr, baseline_seg.zarr (both of the whole test volume), report.json and
PNG overlays (of the scored region). A rerun with the same --out reuses finished
training phases.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments import _cli
from ffnjax import (baseline, checkpoints, erl, files, interrupt, segmentation, synthetic,
                    train_loop, view, volumes)
from ffnjax.config import CONSENSUS_MODES, InferenceOptions, ModelConfig, TrainConfig

# The demo's own defaults; every field below has a flag that starts from them.
DEMO_MODEL = ModelConfig(depth=5, features=16, fov_size=(17, 17, 17), deltas=(4, 4, 4))
DEMO_TRAINING = TrainConfig(model=DEMO_MODEL, steps=1200, batch_size=4, learning_rate=3e-3,
                            max_moves=4, update_per_fov=True, seed=0)
TRAIN_FIELDS = ("steps", "max_moves", "update_per_fov", "batch_size", "learning_rate", "seed")
DEMO_OPTIONS = InferenceOptions(min_segment_size=200, min_boundary_dist=(0, 0, 0),
                                seed_order="distance")
# The model `make demo` segments with: trained by `python -m experiments.demo --from-scratch`
# (its README says how, when and with what scores).
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo_synthetic"
QUICK_STEPS = 300
# --consensus MODE|none stands for both consensus fields.
OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(InferenceOptions)
                      if f.name not in ("consensus", "consensus_mode"))

MODEL_FLAGS = _cli.with_help(
    _cli.MODEL_FLAGS,
    depth="convstack depth (5: 10 convolutions, so the seed can reach the corners of a 17^3 "
          "FOV in one pass)")
TRAIN_FLAGS = _cli.with_help(
    _cli.TRAIN_FLAGS,
    steps="phase 1: steps on the centre FOV only",
    max_moves="FOV moves per example beyond the centre in phase 2 (0 = every lattice neighbour "
              "the policy takes, about 4x slower)",
    update_per_fov="phases 2 and 3 take one optimiser step per FOV slot, as google/ffn trains "
                   "(--no-update-per-fov: one step per batch on the summed losses of all its "
                   "FOVs, the same compute, measured worse on every test volume)",
    batch_size="examples per step",
    learning_rate="peak learning rate",
    seed="seed of data and training")
OPTION_FLAGS = {
    **_cli.with_help(
        _cli.INFERENCE_FLAGS,
        min_segment_size="objects smaller than this are dropped",
        min_boundary_dist="skip seeds this close (z,y,x) to an existing object (0,0,0: a seed "
                          "next to where an earlier fill stopped starts a new piece there; "
                          "google/ffn's 1,1,1 leaves those parts unsegmented, which measured "
                          "worse on every metric with the demo's small net)",
        seed_order="order seeds are tried in ('distance': deepest first, so each object starts "
                   "from its thickest part; google/ffn's 'zyx' measured worse with the demo's "
                   "small net)"),
    # --batch-size is the training batch here
    "batch_size": dataclasses.replace(_cli.INFERENCE_FLAGS["batch_size"],
                                      names=("--fill-batch-size",)),
}


def build_parser() -> argparse.ArgumentParser:
    p = _cli.make_parser("demo", __doc__)
    p.add_argument("--out", default=None,
                   help="output folder (default out/demo; out/demo_full with --from-scratch)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train the full recipe (phases 1-3 below, about 75 minutes on 2 cores) "
                        "and segment with it, instead of a quick training run and the shipped "
                        "model")
    p.add_argument("--model", default=str(SHIPPED_MODEL),
                   help="checkpoint (workdir or shipped model folder) that segments the test "
                        "volume without --from-scratch (default: the shipped demo model, "
                        "models/demo_synthetic)")
    p.add_argument("--quick-steps", type=int, default=QUICK_STEPS,
                   help=f"steps of the quick from-scratch training shown without "
                        f"--from-scratch (default {QUICK_STEPS}, a couple of minutes; 0 skips it)")
    p.add_argument("--move-steps", type=int, default=4800,
                   help="phase 2: steps with in-example FOV moves, starting from phase 1's "
                        "weights, so the net learns to read its own predictions as flood "
                        "filling makes it (default 4800, about 70 minutes on 2 cores: with one step "
                        "per batch 2400 did not beat the baseline; 0 skips the phase)")
    p.add_argument("--refine-steps", type=int, default=0,
                   help="phase 3: more FOV-move steps from phase 2's weights at a tenth of "
                        "phase 2's learning rate (default 0: no phase 3)")
    p.add_argument("--train-shape", default="80,128,128", help="synthetic training volume z,y,x")
    p.add_argument("--test-shape", default="48,96,96", help="synthetic test volume z,y,x")
    p.add_argument("--test-context", type=int, default=None,
                   help="voxels of context around the scored test region on every side: "
                        "both methods segment the larger volume and are scored on the inner "
                        "--test-shape (default: the FOV radius, so the FFN can place its FOV "
                        "and seeds everywhere in the scored region; 0 scores the whole volume)")
    p.add_argument("--consensus", choices=("none",) + CONSENSUS_MODES, default="contested",
                   help="also segment in reverse seed order and combine the two passes "
                        "(default 'contested': keep the forward objects and unlabel voxels the "
                        "two orders give to different objects, which removes the order-dependent "
                        "contacts that make strict merges; 'split' is google/ffn's "
                        "oversegmentation consensus; 'none' segments once, in half the time)")
    _cli.add_common(p)
    _cli.add_compile_cache(p)
    _cli.add_flags(p.add_argument_group("training (TrainConfig)"), TrainConfig, TRAIN_FLAGS,
                   TRAIN_FIELDS, base=DEMO_TRAINING)
    _cli.add_flags(p.add_argument_group("model (ModelConfig)"), ModelConfig, MODEL_FLAGS,
                   base=DEMO_MODEL)
    _cli.add_flags(p.add_argument_group("segmentation (InferenceOptions)"), InferenceOptions,
                   OPTION_FLAGS, OPTION_FIELDS, base=DEMO_OPTIONS)
    return p


def _zyx(text, flag: str) -> tuple[int, int, int]:
    return _cli.numbers(text, flag, minimum=1)  # type: ignore[return-value]


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The network the demo trains, from its flags."""
    return ModelConfig(**_cli.given(args, ModelConfig, MODEL_FLAGS))


def inference_options(args: argparse.Namespace) -> InferenceOptions:
    """The flood-fill settings the demo segments its test volume with, from its flags."""
    consensus = {} if args.consensus == "none" else dict(consensus=True, consensus_mode=args.consensus)
    return InferenceOptions(**_cli.given(args, InferenceOptions, OPTION_FLAGS, OPTION_FIELDS),
                            **consensus)


def test_context(args: argparse.Namespace, model: ModelConfig) -> int:
    """Context voxels around the scored test region (default: the largest FOV radius).

    A FOV-based method cannot centre its FOV, hence cannot seed, within a FOV
    radius of a volume's border; segmenting a larger volume and scoring its
    interior (as one does with any block of a big volume) scores both methods
    where each had the context it needs.
    """
    if args.test_context is None:
        return max(f // 2 for f in model.fov_size)
    if args.test_context < 0:
        raise ValueError(f"--test-context must be >= 0, got {args.test_context}")
    return int(args.test_context)


def output_folder(args: argparse.Namespace) -> Path:
    """--out, or the default for the run kind (the quick demo and the full recipe
    never share a folder, so neither resumes the other's checkpoints)."""
    if args.out:
        return Path(args.out)
    return Path("out/demo_full" if args.from_scratch else "out/demo")


def training_phases(args: argparse.Namespace, out: Path, model: ModelConfig,
                    specs: dict[str, str]) -> list[tuple[str, Path, TrainConfig]]:
    """(name, workdir, config) of each training phase, in order.

    Without --from-scratch: one quick centre-FOV run of --quick-steps (none for 0).
    With it: the full recipe (centre FOV, FOV moves, optional refinement).
    """
    base = TrainConfig(model=model, images=(specs["train_image"],),
                       labels=(specs["train_labels"],), batch_size=args.batch_size,
                       seed=args.seed, steps=args.steps, learning_rate=args.learning_rate,
                       warmup_steps=min(20, args.steps // 10), fov_moves=0)
    if not args.from_scratch:
        if args.quick_steps <= 0:
            return []
        return [("quick start (centre FOV)", out / "train_quick",
                 dataclasses.replace(base, steps=args.quick_steps,
                                     warmup_steps=min(20, args.quick_steps // 10)))]
    phases = [("centre FOV", out / "train_centre" if args.move_steps else out / "train", base)]
    if args.move_steps:
        moves = dataclasses.replace(
            base, steps=args.move_steps, fov_moves=1, max_moves=args.max_moves,
            update_per_fov=args.update_per_fov,
            learning_rate=args.learning_rate / 3, warmup_steps=min(10, args.move_steps // 10),
            init_from=str(phases[0][1]))
        phases.append(("FOV moves", out / "train", moves))
        if args.refine_steps:
            phases.append(("refinement", out / "train_refine", dataclasses.replace(
                moves, steps=args.refine_steps, learning_rate=moves.learning_rate / 10,
                warmup_steps=min(10, args.refine_steps // 10), init_from=str(out / "train"))))
    return phases


def run_demo(args: argparse.Namespace) -> dict:
    """Runs the five steps; returns the report written to report.json."""
    if args.refine_steps and not args.move_steps:
        raise ValueError(f"--refine-steps {args.refine_steps} refines phase 2's weights, but "
                         f"--move-steps is 0 (no phase 2)")
    if args.quick_steps < 0:
        raise ValueError(f"--quick-steps must be >= 0, got {args.quick_steps}")
    if not args.from_scratch and checkpoints.latest_step(args.model) is None:
        raise FileNotFoundError(f"--model {args.model}: no ffnjax checkpoint there (the shipped "
                                f"demo model is models/demo_synthetic; --from-scratch trains one)")
    # The model that segments: the shipped one (read first, so that the test volume's
    # context fits its FOV), or the last training phase's with --from-scratch.
    given = None if args.from_scratch else checkpoints.load_checkpoint(args.model)
    out = output_folder(args)
    if not args.from_scratch and files.overlaps(out, args.model):
        raise ValueError(f"--out {out} and --model {args.model} overlap: the demo would write "
                         "its data and training runs into the model it reads; choose another --out")
    (out / "data").mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    report: dict = {"settings": vars(args).copy()}

    # 1. Data --------------------------------------------------------------------
    t0 = time.perf_counter()
    train_img, train_lab = synthetic.make_volume(_zyx(args.train_shape, "--train-shape"), seed=args.seed)
    model = model_config(args)
    context = test_context(args, model if given is None else given[0])
    scored = _zyx(args.test_shape, "--test-shape")
    test_img, test_lab = synthetic.make_volume(tuple(s + 2 * context for s in scored),
                                               seed=args.seed + 1)
    inner = tuple(slice(context, context + n) for n in scored)
    report["scored_region"] = {"offset": [context] * 3, "shape": list(scored)}
    specs = {}
    for name, arr in (("train_image", train_img), ("train_labels", train_lab),
                      ("test_image", test_img), ("test_labels", test_lab)):
        specs[name] = str(out / "data" / f"{name}.zarr")
        volumes.save_volume(specs[name], arr, overwrite=True)
    synthetic.save_preview(out / "data" / "test_preview.png", test_img, test_lab)
    print(f"[1/5] synthetic data: train {train_img.shape} ({len(np.unique(train_lab))} objects), "
          f"test {test_img.shape} ({len(np.unique(test_lab))} objects; scored: the inner "
          f"{'x'.join(map(str, scored))}) "
          f"in {time.perf_counter() - t0:.1f} s -> {out / 'data'}")

    # 2. Training ------------------------------------------------------------------
    phases = training_phases(args, out, model, specs)
    report["training"] = {}
    trained_s = 0.0
    for name, workdir, config in phases:
        config = dataclasses.replace(config, log_every=max(1, config.steps // 6),
                                     checkpoint_every=max(1, config.steps // 3),
                                     image_every=max(1, config.steps // 3))
        t1 = time.perf_counter()
        # A rerun with more steps trains further; the warmup follows the steps.
        metrics = train_loop.train(config, workdir, progress=progress,
                                   allow_config_change=("warmup_steps",))
        seconds = time.perf_counter() - t1
        report["training"][name] = dict(metrics, seconds=seconds, reused="loss" not in metrics)
        if "loss" in metrics:
            trained_s += seconds
            print(f"[2/5] {name}: trained to step {metrics['step']} in {seconds:.0f} s: "
                  f"loss {metrics['loss']:.3f}, F1@0.9 {metrics['f1']:.3f}, "
                  f"{metrics['moves']:.1f} moves/example -> {workdir} "
                  f"(checkpoints/, tensorboard/, images/)")
        else:  # a rerun: the checkpoint in workdir had already reached its steps
            print(f"[2/5] {name}: {workdir} already holds step {metrics['step']}; nothing left to "
                  f"train (use a new --out or more steps to train further)")
    report["training"]["seconds"] = trained_s
    report["training"]["phases"] = len(phases)
    report["training"]["reused_phases"] = sum(
        bool(report["training"][name]["reused"]) for name, _, _ in phases)
    report["training"]["reused"] = bool(phases) and all(
        report["training"][name]["reused"] for name, _, _ in phases)
    report["training"]["step"] = sum(c.steps for _, _, c in phases)

    # 3. Flood fill ------------------------------------------------------------------
    segment_with = phases[-1][1] if args.from_scratch else Path(args.model)
    trained_config, params = checkpoints.load_checkpoint(segment_with) if given is None else given
    report["model"] = {"path": str(segment_with), "shipped": not args.from_scratch,
                       "config": trained_config.to_dict()}
    options = inference_options(args)
    t0 = time.perf_counter()
    seg, info = segmentation.segment(test_img, params, trained_config, options, progress=progress)
    seg_s = time.perf_counter() - t0
    volumes.save_volume(str(out / "ffn_seg.zarr"), seg, overwrite=True)
    objects = int(len(np.unique(seg[seg > 0])))
    report["segmentation"] = dict(options=options.to_dict(), seconds=seg_s, objects=objects,
                                  voxels=int(np.count_nonzero(seg)), volume_voxels=int(seg.size),
                                  voxels_per_s=seg.size / seg_s, summary=info.summary(),
                                  timings=info.timings)
    # Counts of the saved segmentation; info's counters add up every pass of consensus.
    print(f"[3/5] FFN ({segment_with}) segmented {seg.shape} in {seg_s:.0f} s: {objects} objects, "
          f"{np.count_nonzero(seg):,} of {seg.size:,} voxels labelled -> {out / 'ffn_seg.zarr'}\n"
          f"      {info.summary()}")

    # 4. Baseline -------------------------------------------------------------------
    t0 = time.perf_counter()
    base = baseline.baseline_segmentation(test_img)
    base_s = time.perf_counter() - t0
    volumes.save_volume(str(out / "baseline_seg.zarr"), base, overwrite=True)
    report["baseline_segmentation"] = dict(objects=int(len(np.unique(base[base > 0]))),
                                           voxels=int(np.count_nonzero(base)))
    print(f"[4/5] watershed baseline in {base_s:.1f} s: "
          f"{report['baseline_segmentation']['objects']} segments")

    # 5. Evaluation -------------------------------------------------------------------
    t0 = time.perf_counter()
    img_in, lab_in = test_img[inner], test_lab[inner]
    skeletons = erl.skeletonize(lab_in)
    scores = {name: erl.evaluate(s[inner], lab_in, skeletons=skeletons)
              for name, s in (("ffn", seg), ("baseline", base))}
    report["scores"] = scores
    report["baseline_seconds"] = base_s
    view.save_slices_png(out / "ffn_overlay.png", img_in, lab_in, seg[inner])
    view.save_slices_png(out / "baseline_overlay.png", img_in, lab_in, base[inner])
    print(f"[5/5] scored both on the inner {'x'.join(map(str, scored))} against "
          f"{len(skeletons)} ground-truth skeletons in {time.perf_counter() - t0:.0f} s")

    report["ffn_ahead_on_nerl"] = all(
        scores["ffn"]["erl"][t]["nerl"] > scores["baseline"]["erl"][t]["nerl"] for t in ("1", "50"))
    files.write_bytes(out / "report.json", json.dumps(report, indent=2, default=str).encode())
    print()
    print(summary_table(report))
    python, tensorboard = _commands()
    print(f"\nOutputs under {out}/: report.json, ffn_overlay.png, baseline_overlay.png, "
          f"ffn_seg.zarr, baseline_seg.zarr, train*/ (checkpoints, tensorboard, images)\n"
          f"  view in Neuroglancer: {python} -m experiments.view --image {specs['test_image']} "
          f"--segmentation {out / 'ffn_seg.zarr'}\n"
          f"  training curves:      {tensorboard} --logdir {out}")
    return report


def _commands() -> tuple[str, str]:
    """How to call this interpreter and its TensorBoard from the current folder
    (`.venv/bin/python` after `make demo`, which does not activate the venv).

    TensorBoard is a dependency, so its script normally sits beside the
    interpreter; where it does not (a user-site install), `python -m
    tensorboard.main` still runs it, and without TensorBoard the line says how
    to install it instead of printing a command that fails.
    """
    python = Path(sys.executable)
    try:
        python = python.relative_to(Path.cwd())
    except ValueError:
        pass
    script = Path(sys.executable).parent / "tensorboard"
    if script.is_file():
        return str(python), str(python.parent / "tensorboard")
    if importlib.util.find_spec("tensorboard") is not None:
        return str(python), f"{python} -m tensorboard.main"
    return str(python), f"{python} -m pip install tensorboard && {python} -m tensorboard.main"


def summary_table(report: dict) -> str:
    """The one summary: which model segmented, times and every metric, FFN next to
    the baseline, and whether the FFN is ahead on NERL at both merge thresholds."""
    s = report["scores"]
    model = report.get("model", {})
    training = report["training"]
    if not training["step"]:
        trained = "no training"
    elif training["reused"]:
        trained = "training reused from an earlier run"
    elif training.get("reused_phases"):
        trained = (f"{training['seconds']:.0f} s train ({training['reused_phases']} of "
                   f"{training['phases']} phases reused)")
    else:
        trained = f"{training['seconds']:.0f} s train"
    seg = report["segmentation"]
    rows = [("", "FFN", "baseline"),
            ("time (s)", f"{trained} + {seg['seconds']:.0f} segment",
             f"{report['baseline_seconds']:.1f}")]
    # Counted on the saved segmentations (ffn_seg.zarr, baseline_seg.zarr), whole volume.
    base = report.get("baseline_segmentation")
    rows.append(("objects / labelled voxels", f"{seg['objects']:,} / {seg['voxels']:,}",
                 f"{base['objects']:,} / {base['voxels']:,}" if base else "-"))
    for t in ("1", "50"):
        rows.append((f"ERL (voxels), merge thr {t}", f"{s['ffn']['erl'][t]['erl']:.1f}",
                     f"{s['baseline']['erl'][t]['erl']:.1f}"))
        rows.append((f"NERL, merge thr {t}", f"{s['ffn']['erl'][t]['nerl']:.3f}",
                     f"{s['baseline']['erl'][t]['nerl']:.3f}"))
        rows.append((f"merges / splits, thr {t}",
                     f"{s['ffn']['erl'][t]['merges']} / {s['ffn']['erl'][t]['splits']}",
                     f"{s['baseline']['erl'][t]['merges']} / {s['baseline']['erl'][t]['splits']}"))
    for key, label in (("voi_split", "VOI split (bits)"), ("voi_merge", "VOI merge (bits)"),
                       ("adapted_rand", "adapted Rand error")):
        rows.append((label, f"{s['ffn'][key]:.3f}", f"{s['baseline'][key]:.3f}"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    if model:
        kind = "the shipped model" if model.get("shipped") else "the model trained above"
        lines.append(f"FFN segmented with {kind}: {model['path']}")
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
    if "ffn_ahead_on_nerl" in report:
        lines.append("FFN ahead of the baseline on NERL at both merge thresholds: "
                     + ("yes" if report["ffn_ahead_on_nerl"] else "no"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cli.use_compile_cache(args)
    try:
        run_demo(args)
    except KeyboardInterrupt as e:  # SIGINT / SIGTERM: training saved a checkpoint first
        raise interrupt.with_resume(e, f"data, finished phases and training checkpoints are kept "
                                       f"in {output_folder(args)}; rerun the same command to "
                                       "resume") from None
    return 0


if __name__ == "__main__":
    _cli.run(main)
