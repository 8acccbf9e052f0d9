"""The command-line layer (experiments/_cli.py) and what every `python -m experiments.*`
command shares through it: --help, old flag spellings, the one-line error policy,
boxes, flags generated from the dataclasses, and the checkpoint's inference facts."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import _cli
from ffnjax.config import InferenceOptions, ModelConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
COMMANDS = sorted(p.stem for p in (REPO / "experiments").glob("*.py")
                  if not p.stem.startswith("_"))

# Every flag each command had before the one CLI layer (issue 18); they all keep working.
FLAGS_BEFORE = {
    "agglomerate": "--analysis-radius --checkpoint --fills-per-call --image --max-deleted-fraction "
                   "--max-distance --merge-graph --min-consistency --min-iou --output --overwrite "
                   "--radius --restart --results --segmentation --seed-radius --voxel-size",
    "demo": "--batch-size --consensus --deltas --depth --features --fov --learning-rate "
            "--max-moves --min-boundary-dist --min-segment-size --move-steps --no-update-per-fov "
            "--out --quiet --refine-steps --seed --seed-order --steps --test-context --test-shape "
            "--train-shape --update-per-fov",
    "evaluate": "--baseline-h --baseline-threshold-offset --bbox --dust-threshold --groundtruth "
                "--gt-offset --image --image-offset --json --merge-thresholds "
                "--min-skeleton-length --png --save-skeletons --segmentation --skeletons "
                "--teasar-const --teasar-scale --voxel-size",
    "fib25_tf_eval": "--batch-size --checkpoint --compute-dtype --data --min-size --offset --out "
                     "--reuse --size --skip-baseline --workdir",
    "fib25_eval": "--box --checkpoint --context --data --name --out --overwrite --skip-baseline",
    "gffn_parity": "--compat --data --json --min-segment-size --quiet",
    "import_tf": "--checkpoint --deltas --depth --features --fov --out --step",
    # Commands added since keep the flags they were introduced with.
    "pipeline": "--analysis-radius --block --box --cannot-link --checkpoint --compat --consensus "
                "--image --max-distance --min-contact --min-iou --min-segment-size --out "
                "--overwrite --radius --step",
    "segment": "--batch-size --bbox --checkpoint --checkpoint-every --consensus --consensus-mode "
               "--disconnected-seeds --fov-size --image --image-mean --image-stddev --info-json "
               "--init-activation --max-steps --min-boundary-dist --min-segment-size "
               "--move-threshold --no-consensus --no-disconnected-seeds --output --overwrite "
               "--pad-value --prob-output --quiet --seed-grid-step --seed-order --seed-policy "
               "--segment-threshold --state --step",
    "segment_volume": "--block --checkpoint --chunks --deltas --fov --image --min-overlap "
                      "--no-progress --options --oracle --output --overlap --png --retries "
                      "--scheduler --step --summary --workdir --workers",
    "synthetic": "--anisotropy --mean-radius --out --overwrite --seed --shape --voxel-size",
    "train": "--batch-size --bfloat16 --brightness --cache-dir --checkpoint-every --config "
             "--contrast --deltas --depth --distributed --features --fov --fov-moves --image "
             "--image-every --image-mean --image-stddev --init-from --keep-checkpoints --labels "
             "--learning-rate --log-every --mask --max-moves --min-object-size --move-policy "
             "--move-threshold --no-augment --no-update-per-fov --optimizer --partial-crops "
             "--quiet --seed --steps --stop-at-step --synthetic-radius --synthetic-seed "
             "--synthetic-shape --update-per-fov --val-every --val-examples --val-image "
             "--val-labels --warmup-steps --workdir",
    "view": "--bind --image --no-block --no-viewer --png --port --segmentation --slices",
}


def missing_input_argv(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Per command: arguments naming an input that does not exist, and that input.

    demo and synthetic read no input file; their output folder lies under a
    regular file instead, which they cannot create.
    """
    gone = tmp / "missing"
    blocker = tmp / "a_file"
    blocker.write_text("")
    return {
        "agglomerate": (["--checkpoint", str(gone / "run"), "--image", str(gone / "img.zarr"),
                         "--segmentation", str(gone / "seg.zarr"), "--output",
                         str(tmp / "a.zarr")], str(gone / "seg.zarr")),
        "demo": (["--out", str(blocker / "out"), "--steps", "1"], str(blocker)),
        "evaluate": (["--segmentation", str(gone / "seg.npy"), "--groundtruth",
                      str(gone / "gt.npy")], str(gone)),
        "fib25_tf_eval": (["--tf-checkpoint", str(gone / "model.ckpt"), "--out",
                           str(tmp / "f")], str(gone / "model.ckpt")),
        "fib25_eval": (["--checkpoint", str(gone / "run"), "--out", str(tmp / "e")],
                       str(gone / "run")),
        "gffn_parity": (["--data", str(gone), "--quiet"], str(gone)),
        "import_tf": (["--tf-checkpoint", str(gone / "model.ckpt"), "--out", str(tmp / "i")],
                      str(gone / "model.ckpt")),
        "pipeline": (["--checkpoint", str(gone / "run"), "--image", str(gone / "img.npy"),
                      "--out", str(tmp / "p")], str(gone / "run")),
        "segment": (["--checkpoint", str(gone / "run"), "--image", str(gone / "img.npy"),
                     "--output", str(tmp / "s.zarr")], str(gone / "run")),
        "segment_volume": (["--checkpoint", str(gone / "run"), "--image", str(gone / "img.zarr"),
                            "--output", str(tmp / "v.zarr")], str(gone / "run")),
        "synthetic": (["--out", str(blocker / "out"), "--shape", "8,8,8"], str(blocker)),
        "train": (["--workdir", str(tmp / "t"), "--image", str(gone / "img.npy"), "--labels",
                   str(gone / "lab.npy"), "--quiet"], str(gone / "img.npy")),
        "view": (["--image", str(gone / "img.zarr"), "--segmentation", str(gone / "seg.zarr"),
                  "--png", str(tmp / "m.png"), "--no-viewer"], str(gone)),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every command run as a subprocess, all at once: with --help and with a missing input."""
    tmp = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    bad = missing_input_argv(tmp)
    assert sorted(bad) == COMMANDS, "a new experiments command needs a missing-input case here"
    procs = {}
    for name in COMMANDS:
        for kind, argv in (("help", ["--help"]), ("missing", bad[name][0])):
            procs[name, kind] = subprocess.Popen(
                [sys.executable, "-m", f"experiments.{name}", *argv], cwd=REPO, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[key] = (proc.returncode, stdout, stderr)
    return out, {k: v[1] for k, v in bad.items()}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_answers_help_and_keeps_its_old_flags(runs, name):
    rc, stdout, stderr = runs[0][name, "help"]
    assert rc == 0, stderr
    for flag in FLAGS_BEFORE[name].split():
        assert flag in stdout, f"{name}: {flag} is gone from --help"
    for flag in ("--quiet", "--debug", "--help"):
        assert flag in stdout, f"{name}: {flag}"


@pytest.mark.parametrize("name", COMMANDS)
def test_missing_input_is_one_error_line_and_exit_2(runs, name):
    rc, _, stderr = runs[0][name, "missing"]
    lines = stderr.strip().splitlines()
    assert rc == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and runs[1][name] in lines[0], lines
    assert "Traceback" not in stderr


def test_debug_shows_the_traceback_and_usage_errors_are_one_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "experiments.import_tf", "--tf-checkpoint",
           str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]
    proc = subprocess.run([*cmd, "--debug"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "nothing" in proc.stderr
    proc = subprocess.run(cmd[:3] + ["--fov", "9,9"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "--fov" in proc.stderr


def test_error_line_names_the_file_of_an_os_error():
    e = FileNotFoundError(2, "No such file or directory", "/x/y.npy")
    assert _cli.error_line(e) == "error: no such file or directory, /x/y.npy"
    assert _cli.error_line(ValueError("bad\n  value 3")) == "error: bad value 3"


# ------------------------------------------------------------------ numbers and boxes


def test_numbers_name_the_flag():
    assert _cli.numbers("1, 2,3", "--fov") == (1, 2, 3)
    assert _cli.numbers("1,50", "--t", n=None) == (1, 50)
    assert _cli.numbers("8,4.5,4", "--v", kind=float, minimum=0, strict=True) == (8.0, 4.5, 4.0)
    assert _cli.numbers(None, "--fov") is None
    for text, kw in (("1,2", {}), ("a,b,c", {}), ("0,1,1", dict(minimum=0, strict=True))):
        with pytest.raises(ValueError, match="--flag"):
            _cli.numbers(text, "--flag", **kw)
    with pytest.raises(argparse.ArgumentTypeError, match="three"):
        _cli.zyx_arg()("1,2")


def test_one_box_syntax_and_the_old_bbox_agree():
    shape = (20, 30, 40)
    assert _cli.box_start_size("2:12,0:30,5:", shape) == ((2, 0, 5), (10, 30, 35))
    assert _cli.box_start_size(":,:,:", shape) == ((0, 0, 0), shape)
    assert _cli.bbox_as_box("2,0,5,10,30,35") == "2:12,0:30,5:40"
    for flags, want in (({"box": "2:12,0:30,5:40"}, ((2, 0, 5), (10, 30, 35))),
                        ({"bbox": "2,0,5,10,30,35"}, ((2, 0, 5), (10, 30, 35))),
                        ({}, ((0, 0, 0), shape))):
        args = argparse.Namespace(**{"box": None, "bbox": None, **flags})
        assert _cli.region(args, shape) == want
    with pytest.raises(ValueError, match="--box '0:21,:,:' is empty or reaches outside"):
        _cli.box_start_size("0:21,:,:", shape)
    with pytest.raises(ValueError, match="--box must be z0:z1"):
        _cli.parse_box("0:5,1:2")
    with pytest.raises(ValueError, match="--bbox '0,0,0,21,1,1'.*outside the image"):
        _cli.region(argparse.Namespace(box=None, bbox="0,0,0,21,1,1"), shape, "image")


def test_fib25_crop_from_box_or_offset_and_size():
    from experiments import fib25_tf_eval as fe

    assert fe.crop(fe.parse_args([])) == ((27, 77, 77), (96, 96, 96))
    assert fe.crop(fe.parse_args(["--offset", "60,100,100", "--size", "40,40,40"])) == \
        fe.crop(fe.parse_args(["--box", "60:100,100:140,100:140"])) == ((60, 100, 100), (40, 40, 40))
    with pytest.raises(ValueError, match="not both"):
        fe.crop(fe.parse_args(["--box", "0:40,0:40,0:40", "--size", "40,40,40"]))


# ------------------------------------------------------------------ dataclass flags


def test_every_train_config_field_has_a_train_flag():
    from experiments import train

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    grouped = [f for fs in train.GROUPS.values() for f in fs]
    assert sorted(grouped) == sorted(fields)  # each field in exactly one group
    assert set(_cli.MODEL_FLAGS) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(_cli.INFERENCE_FLAGS) == {f.name for f in dataclasses.fields(InferenceOptions)}
    argv = ["--workdir", "w", "--momentum", "0.5", "--clip-norm", "0", "--end-lr-fraction", "0.1",
            "--seed-prob", "0.9", "--pad-prob", "0.1", "--partition-thresholds", "0.2,0.6",
            "--no-transpose-yx", "--prefetch", "2", "--partial-crops", "--fov-size", "9,9,9",
            "--deltas", "2,2,2", "--conv-impl", "native", "--image", "a.npy", "--labels", "b.npy",
            "--image", "c.npy", "--labels", "d.npy", "--image-mean", "100", "--image-mean", "90"]
    config = train.config_from_args(train.build_parser().parse_args(argv))
    assert (config.momentum, config.clip_norm, config.end_lr_fraction) == (0.5, 0.0, 0.1)
    assert (config.seed_prob, config.pad_prob, config.partition_thresholds) == (0.9, 0.1, (0.2, 0.6))
    assert not config.transpose_yx and config.prefetch == 2 and not config.full_crop_margin
    assert config.model == ModelConfig(fov_size=(9, 9, 9), deltas=(2, 2, 2), conv_impl="native")
    assert config.images == ("a.npy", "c.npy") and config.image_means == (100.0, 90.0)
    assert train.config_from_args(train.build_parser().parse_args(["--workdir", "w"])) == TrainConfig()


def test_segment_and_segment_volume_share_the_option_flags():
    from experiments import segment, segment_volume

    argv = ["--checkpoint", "c", "--image", "i.zarr", "--output", "o.zarr", "--segment-threshold",
            "0.7", "--seed-grid-step", "2,3,4", "--no-disconnected-seeds", "--quiet"]
    a = segment.options_from_args(segment.build_parser().parse_args(argv))
    args = segment_volume.build_parser().parse_args(
        [*argv, "--options", '{"segment_threshold": 0.5, "min_segment_size": 7}'])
    b = segment_volume.options_from_args(args, InferenceOptions())
    assert a == dataclasses.replace(b, min_segment_size=100)  # flags beat --options
    assert a == InferenceOptions(segment_threshold=0.7, seed_grid_step=(2, 3, 4),
                                 disconnected_seeds=False)
    assert args.quiet and segment_volume.build_parser().parse_args(
        ["--image", "i", "--output", "o", "--no-progress"]).quiet


def test_demo_defaults_are_the_demo_recipe():
    from experiments import demo

    args = demo.build_parser().parse_args([])
    assert demo.model_config(args) == ModelConfig(depth=5, features=16, fov_size=(17, 17, 17),
                                                  deltas=(4, 4, 4))
    assert demo.inference_options(args) == InferenceOptions(
        min_segment_size=200, min_boundary_dist=(0, 0, 0), seed_order="distance",
        consensus=True, consensus_mode="contested")
    assert (args.steps, args.move_steps, args.max_moves, args.batch_size, args.learning_rate,
            args.seed, args.update_per_fov) == (1200, 4800, 4, 4, 3e-3, 0, True)
    tweaked = demo.build_parser().parse_args(["--fov-size", "9,9,9", "--deltas", "2,2,2",
                                              "--fill-batch-size", "4", "--bfloat16"])
    assert demo.model_config(tweaked).compute_dtype == "bfloat16"
    assert demo.inference_options(tweaked).batch_size == 4 and tweaked.batch_size == 4


def test_import_tf_takes_the_tf_prefix_under_both_spellings():
    from experiments import import_tf

    old = import_tf.parse_args(["--checkpoint", "p", "--out", "o"])
    new = import_tf.parse_args(["--tf-checkpoint", "p", "--out", "o"])
    assert old.tf_checkpoint == new.tf_checkpoint == "p"
    assert "deprecated" in import_tf.__doc__


# ------------------------------------------------------------------ compile cache

# Every command that compiles JAX code, with the least arguments it parses.
JAX_COMMANDS = {
    "train": ["--workdir", "w"],
    "segment": ["--checkpoint", "c", "--image", "i.zarr", "--output", "o.zarr"],
    "segment_volume": ["--image", "i.zarr", "--output", "o.zarr"],
    "demo": [],
    "fib25_tf_eval": [],
    "fib25_eval": ["--out", "o"],
}


def _parse(name: str, argv: list[str]) -> argparse.Namespace:
    import importlib

    module = importlib.import_module(f"experiments.{name}")
    if hasattr(module, "build_parser"):
        return module.build_parser().parse_args(argv)
    return module.parse_args(argv)


@pytest.mark.parametrize("name", sorted(JAX_COMMANDS))
def test_every_jax_command_takes_the_compile_cache_flags(name):
    base = JAX_COMMANDS[name]
    assert _parse(name, base).compile_cache is _cli.COMPILE_CACHE_DEFAULT
    assert _parse(name, base + ["--no-compile-cache"]).compile_cache is False
    assert _parse(name, base + ["--compile-cache"]).compile_cache is True


@pytest.fixture
def jax_cache_settings():
    """Restores JAX's cache settings and their environment variables after a test
    (use_compile_cache writes both)."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    saved_env = {n.upper(): os.environ.pop(n.upper(), None) for n in names}
    try:
        yield jax.config
    finally:
        for n, v in saved.items():
            jax.config.update(n, v)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_compile_cache_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _cli.compile_cache_dir() == tmp_path / "ffnjax" / "jax-compile"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _cli.compile_cache_dir() == tmp_path / "home" / ".cache" / "ffnjax" / "jax-compile"


def test_use_compile_cache_sets_the_cache_only_when_enabled(jax_cache_settings, monkeypatch,
                                                            tmp_path):
    config = jax_cache_settings
    config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    off = _parse("segment", JAX_COMMANDS["segment"] + ["--no-compile-cache"])
    assert _cli.use_compile_cache(off) is None
    assert config.jax_compilation_cache_dir is None
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
    on = _parse("segment", JAX_COMMANDS["segment"] + ["--compile-cache"])
    path = _cli.use_compile_cache(on)
    assert path == tmp_path / "ffnjax" / "jax-compile"
    assert config.jax_compilation_cache_dir == str(path)
    # CPU compiles take well under JAX's default 1 s minimum: every one is cached.
    assert config.jax_persistent_cache_min_compile_time_secs == 0
    assert config.jax_persistent_cache_min_entry_size_bytes == -1
    # Worker processes started later (Dask) read the same settings from the environment.
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(path)


def test_use_compile_cache_keeps_a_folder_the_user_chose(jax_cache_settings, monkeypatch,
                                                        tmp_path):
    config = jax_cache_settings
    config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert _cli.use_compile_cache(True, tmp_path / "default") == tmp_path / "mine"
    assert config.jax_compilation_cache_dir == str(tmp_path / "mine")
