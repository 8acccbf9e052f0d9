"""The main job end to end (what `make demo` runs), on synthetic EM data.

    python -m experiments.demo                  # about 80 minutes on a 2-core CPU
    python -m experiments.demo --steps 600 --move-steps 300 --out out/quick   # ~10 min, weaker

1. makes a synthetic training volume and a separate test volume (different seed;
   the scored --test-shape plus --test-context voxels of context on every side),
2. trains a small FFN on the first (progress bar, checkpoints, TensorBoard, PNGs):
   first on the centre FOV only, then with FOV moves from those weights, so the
   net learns to read its own predictions as flood filling makes it, then
   (with --refine-steps) more FOV-move steps at a lower learning rate,
3. flood-fills the test volume with the trained checkpoint,
4. segments the same volume with the non-learned watershed baseline,
5. scores both on the inner --test-shape against the ground truth (ERL/NERL at
   merge thresholds 1 and 50, VOI, adapted Rand) and prints one summary.

Everything lands under --out: data/*.zarr, train_centre/, train/ and train_refine/
(the phases' checkpoints, tensorboard, images), ffn_seg.zarr, baseline_seg.zarr
(both of the whole test volume), report.json and PNG overlays (of the scored region).
A rerun with the same --out reuses finished phases.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from experiments import _cli
from ffnjax import erl, viz
from ffnjax.config import CONSENSUS_MODES, InferenceOptions, ModelConfig, TrainConfig

# The demo's own defaults; every field below has a flag that starts from them.
DEMO_MODEL = ModelConfig(depth=5, features=16, fov_size=(17, 17, 17), deltas=(4, 4, 4))
DEMO_TRAINING = TrainConfig(model=DEMO_MODEL, steps=1200, batch_size=4, learning_rate=3e-3,
                            max_moves=4, update_per_fov=True, seed=0)
TRAIN_FIELDS = ("steps", "max_moves", "update_per_fov", "batch_size", "learning_rate", "seed")
DEMO_OPTIONS = InferenceOptions(min_segment_size=200, min_boundary_dist=(0, 0, 0),
                                seed_order="distance")
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
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
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


def run_demo(args: argparse.Namespace) -> dict:
    """Runs the five steps; returns the report written to report.json."""
    # Here, not at the top: JAX, TensorStore and scikit-image take seconds to load; --help doesn't wait.
    from ffnjax import baseline, checkpoints, segmentation, synthetic, train_loop, volumes

    if args.refine_steps and not args.move_steps:
        raise ValueError(f"--refine-steps {args.refine_steps} refines phase 2's weights, but "
                         f"--move-steps is 0 (no phase 2)")
    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    report: dict = {"settings": vars(args).copy()}

    # 1. Data --------------------------------------------------------------------
    t0 = time.perf_counter()
    train_img, train_lab = synthetic.make_volume(_zyx(args.train_shape, "--train-shape"), seed=args.seed)
    model = model_config(args)
    context = test_context(args, model)
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
    base = TrainConfig(model=model, images=(specs["train_image"],),
                       labels=(specs["train_labels"],), batch_size=args.batch_size,
                       seed=args.seed, steps=args.steps, learning_rate=args.learning_rate,
                       warmup_steps=min(20, args.steps // 10), fov_moves=0)
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
    t0 = time.perf_counter()
    report["training"] = {}
    for name, workdir, config in phases:
        config = dataclasses.replace(config, log_every=max(1, config.steps // 6),
                                     checkpoint_every=max(1, config.steps // 3),
                                     image_every=max(1, config.steps // 3))
        t1 = time.perf_counter()
        metrics = train_loop.train(config, workdir, progress=progress)
        report["training"][name] = dict(metrics, seconds=time.perf_counter() - t1)
        if "loss" in metrics:
            print(f"[2/5] {name}: trained to step {metrics['step']} in "
                  f"{time.perf_counter() - t1:.0f} s: loss {metrics['loss']:.3f}, "
                  f"F1@0.9 {metrics['f1']:.3f}, {metrics['moves']:.1f} moves/example -> {workdir}")
        else:  # a rerun: the checkpoint in workdir had already reached its steps
            print(f"[2/5] {name}: {workdir} already holds step {metrics['step']}; nothing left to "
                  f"train (use a new --out or more steps to train further)")
    train_s = time.perf_counter() - t0
    report["training"]["seconds"] = train_s
    report["training"]["step"] = sum(c.steps for _, _, c in phases)

    # 3. Flood fill ------------------------------------------------------------------
    workdir = phases[-1][1]
    trained_config, params = checkpoints.load_checkpoint(workdir)
    options = inference_options(args)
    t0 = time.perf_counter()
    seg, info = segmentation.segment(test_img, params, trained_config, options, progress=progress)
    seg_s = time.perf_counter() - t0
    volumes.save_volume(str(out / "ffn_seg.zarr"), seg, overwrite=True)
    report["segmentation"] = dict(options=options.to_dict(), seconds=seg_s,
                                  objects=len(np.unique(seg[seg > 0])),
                                  voxels_per_s=seg.size / seg_s, summary=info.summary())
    print(f"[3/5] FFN segmented {seg.shape} in {seg_s:.0f} s: {info.summary()}")

    # 4. Baseline -------------------------------------------------------------------
    t0 = time.perf_counter()
    base = baseline.baseline_segmentation(test_img)
    base_s = time.perf_counter() - t0
    volumes.save_volume(str(out / "baseline_seg.zarr"), base, overwrite=True)
    print(f"[4/5] watershed baseline in {base_s:.1f} s: {len(np.unique(base)) - 1} segments")

    # 5. Evaluation -------------------------------------------------------------------
    t0 = time.perf_counter()
    img_in, lab_in = test_img[inner], test_lab[inner]
    skeletons = erl.skeletonize(lab_in)
    scores = {name: erl.evaluate(s[inner], lab_in, skeletons=skeletons)
              for name, s in (("ffn", seg), ("baseline", base))}
    report["scores"] = scores
    report["baseline_seconds"] = base_s
    viz.save_slices_png(out / "ffn_overlay.png", img_in, lab_in, seg[inner])
    viz.save_slices_png(out / "baseline_overlay.png", img_in, lab_in, base[inner])
    print(f"[5/5] scored both on the inner {'x'.join(map(str, scored))} against "
          f"{len(skeletons)} ground-truth skeletons in {time.perf_counter() - t0:.0f} s")

    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print()
    print(summary_table(report))
    print(f"\nOutputs under {out}/: report.json, ffn_overlay.png, baseline_overlay.png, "
          f"ffn_seg.zarr, baseline_seg.zarr, train*/ (checkpoints, tensorboard, images)\n"
          f"  view in Neuroglancer: python -m experiments.view --image {specs['test_image']} "
          f"--segmentation {out / 'ffn_seg.zarr'}\n"
          f"  training curves:      tensorboard --logdir {out}")
    return report


def summary_table(report: dict) -> str:
    """The one summary: times and every metric, FFN next to the baseline."""
    rows = [("", "FFN", "baseline")]
    s = report["scores"]
    rows.append(("time (s)", f"{report['training']['seconds']:.0f} train + "
                 f"{report['segmentation']['seconds']:.0f} segment", f"{report['baseline_seconds']:.1f}"))
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
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_demo(args)
    return 0


if __name__ == "__main__":
    _cli.run(main)
