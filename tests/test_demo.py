"""The main job end to end (`make demo`) on tiny settings: every step runs for
real and the report agrees with the pieces computed directly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import demo
from ffnjax import baseline, checkpoints, erl, segmentation, volumes


def tiny_args(out):
    """The demo's flags at tiny settings (seconds, not minutes), writing to `out`."""
    return demo.build_parser().parse_args([
        "--out", str(out), "--from-scratch", "--steps", "6", "--move-steps", "3",
        "--refine-steps", "2",
        "--batch-size", "2",
        "--train-shape", "24,48,48", "--test-shape", "24,40,40", "--depth", "1", "--features", "4",
        "--fov", "9,9,9", "--deltas", "2,2,2", "--min-segment-size", "20", "--quiet"])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    args = tiny_args(out)
    report = demo.run_demo(args)
    return out, report


def test_demo_writes_every_output(demo_run):
    out, report = demo_run
    for name in ("report.json", "ffn_overlay.png", "baseline_overlay.png",
                 "data/test_preview.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text())["scores"].keys() == {"ffn", "baseline"}
    seg = volumes.read_all(str(out / "ffn_seg.zarr"))
    # The test volume carries the FOV radius (4) of context on every side.
    assert seg.shape == (32, 48, 48) and seg.dtype == np.uint64
    assert report["scored_region"] == {"offset": [4, 4, 4], "shape": [24, 40, 40]}
    # Phase 1 (centre FOV) 6 steps, phase 2 (FOV moves) 3 steps from its weights,
    # phase 3 (refinement) 2 steps from phase 2's.
    assert report["training"]["step"] == 11
    assert report["training"]["centre FOV"]["step"] == 6
    assert report["training"]["FOV moves"]["step"] == 3
    assert report["training"]["refinement"]["step"] == 2
    assert report["training"]["centre FOV"]["moves"] == 0
    assert (out / "train_centre" / "checkpoints" / "6").is_dir()
    assert (out / "train" / "checkpoints" / "3").is_dir()
    assert (out / "train_refine" / "checkpoints" / "2").is_dir()
    refine = json.loads((out / "train_refine" / "train_config.json").read_text())
    assert refine["init_from"] == str(out / "train")
    assert refine["learning_rate"] == pytest.approx(demo.build_parser().get_default("learning_rate") / 30)
    # Phases with FOV moves take one optimiser step per FOV slot unless told otherwise.
    moves = json.loads((out / "train" / "train_config.json").read_text())
    assert moves["update_per_fov"] and refine["update_per_fov"]
    assert not demo.build_parser().parse_args(["--no-update-per-fov"]).update_per_fov


def test_demo_scores_equal_a_direct_computation(demo_run):
    out, report = demo_run
    image = volumes.read_all(str(out / "data" / "test_image.zarr"))
    labels = volumes.read_all(str(out / "data" / "test_labels.zarr"))
    base = baseline.baseline_segmentation(image)  # segmented with the context...
    np.testing.assert_array_equal(base, volumes.read_all(str(out / "baseline_seg.zarr")))
    inner = (slice(4, 28), slice(4, 44), slice(4, 44))  # ...scored on the inner region
    split, merge = erl.voi(base[inner], labels[inner])
    assert report["scores"]["baseline"]["voi_split"] == pytest.approx(split)
    assert report["scores"]["baseline"]["voi_merge"] == pytest.approx(merge)
    assert report["scores"]["baseline"]["shape"] == [24, 40, 40]
    seg = volumes.read_all(str(out / "ffn_seg.zarr"))
    assert report["scores"]["ffn"]["adapted_rand"] == pytest.approx(
        erl.adapted_rand(seg[inner], labels[inner]))


def test_demo_segments_with_its_inference_options(demo_run):
    # By default: deepest seeds first, and the contested-voxel consensus of two seed orders.
    out, report = demo_run
    options = demo.inference_options(tiny_args(out))
    assert (options.seed_order, options.consensus, options.consensus_mode) == (
        "distance", True, "contested")
    assert report["segmentation"]["options"] == options.to_dict()
    config, params = checkpoints.load_checkpoint(out / "train_refine")
    image = volumes.read_all(str(out / "data" / "test_image.zarr"))
    seg, _ = segmentation.segment(image, params, config, options, progress=False)
    np.testing.assert_array_equal(seg, volumes.read_all(str(out / "ffn_seg.zarr")))
    args = tiny_args(out)
    args.consensus = "none"
    assert not demo.inference_options(args).consensus


def test_test_context_defaults_to_the_fov_radius_and_rejects_negatives(tmp_path):
    args = tiny_args(tmp_path)
    model = demo.model_config(args)
    assert demo.test_context(args, model) == 4
    args.fov = "9,17,17"
    assert demo.test_context(args, demo.model_config(args)) == 8
    args.test_context = 0
    assert demo.test_context(args, model) == 0
    args.test_context = -1
    with pytest.raises(ValueError, match="--test-context"):
        demo.test_context(args, model)


def test_refinement_without_phase_2_is_refused_before_writing(tmp_path):
    args = tiny_args(tmp_path / "out")
    args.move_steps = 0
    with pytest.raises(ValueError, match="--refine-steps 2 .*--move-steps is 0"):
        demo.run_demo(args)
    assert not (tmp_path / "out").exists()


def test_summary_table_lists_every_metric(demo_run):
    report = demo_run[1]
    table = demo.summary_table(report)
    for label in ("NERL, merge thr 1", "NERL, merge thr 50", "VOI split", "VOI merge",
                  "adapted Rand error", "time (s)"):
        assert label in table


def test_rerunning_the_demo_resumes_instead_of_retraining(demo_run):
    out, first = demo_run
    args = tiny_args(out)
    again = demo.run_demo(args)
    for phase in ("centre FOV", "FOV moves", "refinement"):
        assert "loss" not in again["training"][phase]
    # Same checkpoint and same test volume: the same segmentation and scores.
    assert again["scores"]["ffn"]["adapted_rand"] == first["scores"]["ffn"]["adapted_rand"]


def quick_args(out, model, *extra):
    """The default (quick) demo at tiny settings, segmenting with `model`."""
    return demo.build_parser().parse_args([
        "--out", str(out), "--model", str(model), "--quick-steps", "3", "--batch-size", "2",
        "--train-shape", "24,48,48", "--test-shape", "24,40,40", "--depth", "1", "--features", "4",
        "--fov", "9,9,9", "--deltas", "2,2,2", "--min-segment-size", "20", "--quiet", *extra])


def test_default_demo_trains_briefly_and_segments_with_the_given_model(demo_run, tmp_path):
    trained = demo_run[0] / "train_refine"
    out = tmp_path / "quick"
    report = demo.run_demo(quick_args(out, trained))
    quick = report["training"]["quick start (centre FOV)"]
    assert quick["step"] == 3 and not quick["reused"] and quick["moves"] == 0
    assert (out / "train_quick" / "checkpoints" / "3").is_dir()
    assert not (out / "train").exists() and not (out / "train_centre").exists()
    assert report["model"]["path"] == str(trained) and report["model"]["shipped"]
    # The segmentation is the given model's, not the quick run's.
    config, params = checkpoints.load_checkpoint(trained)
    image = volumes.read_all(str(out / "data" / "test_image.zarr"))
    options = demo.inference_options(quick_args(out, trained))
    seg, _ = segmentation.segment(image, params, config, options, progress=False)
    saved = volumes.read_all(str(out / "ffn_seg.zarr"))
    np.testing.assert_array_equal(seg, saved)
    # Counts are of the final segmentation (not both consensus passes added up).
    assert report["segmentation"]["objects"] == len(np.unique(saved[saved > 0]))
    assert report["segmentation"]["voxels"] == np.count_nonzero(saved)
    table = demo.summary_table(report)
    assert f"FFN segmented with the shipped model: {trained}" in table
    assert "FFN ahead of the baseline on NERL at both merge thresholds: " in table
    # A rerun reuses the quick checkpoint and says so instead of "0 s train".
    again = demo.run_demo(quick_args(out, trained))
    assert again["training"]["reused"] and "training reused" in demo.summary_table(again)


def test_quick_and_full_demos_never_share_an_output_folder():
    parse = demo.build_parser().parse_args
    assert demo.output_folder(parse([])) == demo.Path("out/demo")
    assert demo.output_folder(parse(["--from-scratch"])) == demo.Path("out/demo_full")
    assert demo.output_folder(parse(["--out", "x"])) == demo.Path("x")
    assert parse([]).model == str(demo.SHIPPED_MODEL)


def test_a_missing_model_is_refused_before_writing(tmp_path):
    args = quick_args(tmp_path / "out", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        demo.run_demo(args)
    assert not (tmp_path / "out").exists()


def test_the_printed_tensorboard_command_runs(monkeypatch):
    # The demo ends with "training curves: TENSORBOARD --logdir OUT"; that
    # command must exist (TensorBoard is a dependency, not only tensorboardX).
    import shlex
    import subprocess

    _, tensorboard = demo._commands()
    argv = shlex.split(tensorboard)
    assert "pip install" not in tensorboard, "TensorBoard is not installed"
    done = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip()[0].isdigit(), done.stderr
    # Without TensorBoard the line says how to install it instead.
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(demo.Path, "is_file", lambda self: False)
    assert "pip install tensorboard" in demo._commands()[1]


# ------------------------------------------------------------------ the summary, fast
# The demo with training and flood filling replaced by stand-ins: the summary's
# counts and training times must come from what was saved and what ran.


def _fake_model_and_fill(monkeypatch, trained_phases=()):
    """Stand-ins: a checkpoint that 'exists', a fill that labels three boxes while
    its counters add up two consensus passes (42 objects, twice the volume), and
    a trainer that trains the phases named in `trained_phases` and finds every
    other one already trained."""
    from ffnjax.config import ModelConfig

    model = ModelConfig(depth=1, features=4, fov_size=(9, 9, 9), deltas=(2, 2, 2))
    monkeypatch.setattr(demo.checkpoints, "latest_step", lambda path: 1)
    monkeypatch.setattr(demo.checkpoints, "load_checkpoint", lambda path: (model, None))

    def fill(image, params, config, options, progress=True):
        seg = np.zeros(image.shape, np.uint64)
        seg[2:10, 2:10, 2:10], seg[12:20, 5:30, 5:9], seg[3:6, 20:38, 20:38] = 4, 7, 9
        info = _segment_info(passes=2, committed=42, voxels=2 * seg.size, fills=50)
        return seg, info

    def train(config, workdir, progress=True, **_):
        if workdir.name in trained_phases:
            return {"step": config.steps, "loss": 0.5, "f1": 0.1, "moves": 0.0}
        return {"step": config.steps}

    monkeypatch.setattr(demo.segmentation, "segment", fill)
    monkeypatch.setattr(demo.train_loop, "train", train)


def _segment_info(passes, **counts):
    counters = {**dict.fromkeys(segmentation.COUNTER_NAMES, 0), **counts}
    timings = dict.fromkeys(("seeds", "compile", "first_fill", "fill", "commit", "total"), 0.0)
    return segmentation.SegmentInfo([], counters, timings, num_seeds=30, passes=passes)


def _fast_args(out, *extra):
    return demo.build_parser().parse_args([
        "--out", str(out), "--model", "stand-in", "--train-shape", "16,32,32",
        "--test-shape", "16,32,32", "--depth", "1", "--features", "4", "--fov", "9,9,9",
        "--deltas", "2,2,2", "--quiet", *extra])


def test_summary_counts_the_saved_segmentation_not_both_passes(monkeypatch, tmp_path, capsys):
    _fake_model_and_fill(monkeypatch)
    report = demo.run_demo(_fast_args(tmp_path, "--quick-steps", "0"))
    saved = volumes.read_all(str(tmp_path / "ffn_seg.zarr"))
    objects, voxels = len(np.unique(saved[saved > 0])), int(np.count_nonzero(saved))
    assert objects == 3 and voxels < saved.size  # not the fill's 42 objects, 2x the volume
    assert (report["segmentation"]["objects"], report["segmentation"]["voxels"]) == (objects, voxels)
    table = demo.summary_table(report)
    row = next(line for line in table.splitlines() if line.startswith("objects / labelled voxels"))
    assert f"{objects} / {voxels:,}" in row and "42" not in row
    base = volumes.read_all(str(tmp_path / "baseline_seg.zarr"))
    assert f"{len(np.unique(base[base > 0])):,} / {np.count_nonzero(base):,}" in row
    # The progress line leads with the saved counts; the fill's own line says
    # that its counts add up both passes.
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[3/5]"))
    assert f": {objects} objects, {voxels:,} of {saved.size:,} voxels labelled" in line
    assert "no training" in table


def test_summary_says_when_training_was_reused(monkeypatch, tmp_path):
    # Every phase already trained: no time is reported as training time.
    _fake_model_and_fill(monkeypatch)
    args = _fast_args(tmp_path / "all", "--from-scratch", "--steps", "4", "--move-steps", "2",
                      "--refine-steps", "2")
    table = demo.summary_table(demo.run_demo(args))
    assert "training reused from an earlier run" in table and "s train" not in table
    # Only the last phase trained: its time, and how many phases were reused.
    _fake_model_and_fill(monkeypatch, trained_phases=("train_refine",))
    args.out = str(tmp_path / "part")
    report = demo.run_demo(args)
    assert report["training"]["reused_phases"] == 2 and not report["training"]["reused"]
    assert "s train (2 of 3 phases reused)" in demo.summary_table(report)
