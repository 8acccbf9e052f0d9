"""`python -m experiments.train`: flags, early failures on bad input, SIGTERM and resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments.train import build_parser, config_from_args, main
from ffnjax import checkpoints

REPO = Path(__file__).resolve().parents[1]
TINY_FLAGS = ["--depth", "1", "--features", "4", "--fov", "9,9,9", "--deltas", "2,2,2",
              "--batch-size", "2", "--synthetic-shape", "24,48,48", "--synthetic-radius", "3",
              "--min-object-size", "20"]


def test_help_documents_every_flag():
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    parser = build_parser()
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in proc.stdout, flag
        assert action.help, f"{action.option_strings} has no help"
    for flag in ("--workdir", "--image", "--labels", "--steps", "--batch-size", "--learning-rate",
                 "--depth", "--features", "--fov", "--deltas"):
        assert flag in proc.stdout


def test_flags_override_config_file(tmp_path):
    from ffnjax.config import ModelConfig, TrainConfig

    base = TrainConfig(model=ModelConfig(depth=3, features=6), steps=77, learning_rate=0.01)
    (tmp_path / "c.json").write_text(base.to_json())
    args = build_parser().parse_args(["--workdir", "w", "--config", str(tmp_path / "c.json"),
                                      "--steps", "5", "--fov", "9,9,9", "--deltas", "2,2,2",
                                      "--image", "a.npy", "--labels", "b.npy", "--bfloat16"])
    config = config_from_args(args)
    assert config.steps == 5 and config.learning_rate == 0.01
    assert config.model == ModelConfig(depth=3, features=6, fov_size=(9, 9, 9), deltas=(2, 2, 2),
                                       compute_dtype="bfloat16")
    assert config.images == ("a.npy",) and config.labels == ("b.npy",)
    assert config.update_per_fov
    args = build_parser().parse_args(["--workdir", "w", "--no-update-per-fov"])
    assert not config_from_args(args).update_per_fov
    (tmp_path / "d.json").write_text(dataclasses.replace(base, update_per_fov=False).to_json())
    from_file = ["--workdir", "w", "--config", str(tmp_path / "d.json")]
    assert not config_from_args(build_parser().parse_args(from_file)).update_per_fov  # absent flag
    assert config_from_args(build_parser().parse_args([*from_file, "--update-per-fov"])).update_per_fov


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_input_fails_before_training_with_a_message(tmp_path, capsys):
    image = np.zeros((10, 20, 20), np.uint8)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "short.npy", np.ones((9, 20, 20), np.uint32))
    np.save(tmp_path / "empty.npy", np.zeros((10, 20, 20), np.uint32))
    wd = tmp_path / "wd"
    common = ["--workdir", str(wd), "--quiet", *TINY_FLAGS]

    err = _fails([*common, "--image", str(tmp_path / "image.npy"),
                  "--labels", str(tmp_path / "short.npy")], capsys)
    assert "(10, 20, 20)" in err and "(9, 20, 20)" in err and "short.npy" in err

    err = _fails([*common, "--image", str(tmp_path / "image.npy"),
                  "--labels", str(tmp_path / "empty.npy")], capsys)
    assert "empty.npy" in err and "empty" in err

    err = _fails([*common, "--image", str(tmp_path / "missing.npy"),
                  "--labels", str(tmp_path / "empty.npy")], capsys)
    assert "missing.npy" in err

    err = _fails([*common, "--image", str(tmp_path / "image.npy")], capsys)
    assert "1 image spec(s) and 0 label spec(s)" in err

    err = _fails([*common, "--fov", "8,9,9"], capsys)
    assert "fov_size must be odd" in err
    assert not (wd / "checkpoints").exists()


def test_box_suffix_cuts_labels_to_the_image(tmp_path):
    from ffnjax.train_loop import read_spec as old_home
    from ffnjax.volumes import read_spec

    assert old_home is read_spec                  # the alias at its former home stays

    labels = np.arange(6 * 4 * 5, dtype=np.uint32).reshape(6, 4, 5)
    np.save(tmp_path / "l.npy", labels)
    np.testing.assert_array_equal(read_spec(f"{tmp_path / 'l.npy'}@2:5,:,1:"), labels[2:5, :, 1:])
    with pytest.raises(ValueError, match="l.npy"):
        read_spec(f"{tmp_path / 'l.npy'}@7:9,:,:")
    # Stacking along z, e.g. an image stored in two files.
    np.save(tmp_path / "m.npy", labels[:2])
    stacked = read_spec(f"{tmp_path / 'l.npy'}@0:3,:,:+{tmp_path / 'm.npy'}")
    np.testing.assert_array_equal(stacked, np.concatenate([labels[:3], labels[:2]]))
    np.save(tmp_path / "n.npy", labels[:, :3])
    with pytest.raises(ValueError, match="cannot stack"):
        read_spec(f"{tmp_path / 'l.npy'}+{tmp_path / 'n.npy'}")


def test_sigterm_saves_a_checkpoint_and_rerun_resumes(tmp_path):
    wd = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "experiments.train", "--workdir", str(wd), *TINY_FLAGS,
           "--steps", "100000", "--log-every", "1", "--checkpoint-every", "100000",
           "--image-every", "100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        deadline = time.time() + 240
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("step 2:"):
                break
            assert time.time() < deadline, "".join(seen)
        assert "tensorboard:" in "".join(seen) and "checkpoints:" in "".join(seen)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    final = json.loads(out.strip().splitlines()[-1])
    saved = checkpoints.latest_step(wd)
    assert saved is not None and 2 <= saved < 100000 and final["step"] == saved
    # Interrupted: exit 128 + SIGTERM and one line saying how to resume.
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == (f"interrupted by SIGTERM: checkpoint saved at step "
                                            f"{saved} in {wd}; rerun the same command to resume")

    again = subprocess.run([*cmd, "--stop-at-step", str(saved + 1), "--quiet"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert checkpoints.latest_step(wd) == saved + 1
    assert json.loads(again.stdout.strip().splitlines()[-1])["step"] == saved + 1


def test_init_from_brings_its_network_unless_flags_name_one(tmp_path):
    import jax

    from ffnjax.config import ModelConfig
    from ffnjax.nets import init_params

    model = ModelConfig(depth=2, features=3, fov_size=(7, 9, 9), deltas=(1, 2, 2))
    params = jax.tree_util.tree_map(np.asarray, init_params(model, jax.random.PRNGKey(0)))
    checkpoints.save_model(tmp_path / "src", model, params)
    args = ["--workdir", str(tmp_path / "w"), "--init-from", str(tmp_path / "src")]
    assert config_from_args(build_parser().parse_args(args)).model == model
    flagged = config_from_args(build_parser().parse_args([*args, "--depth", "3"])).model
    assert flagged.depth == 3 and flagged.fov_size == ModelConfig().fov_size
    assert config_from_args(build_parser().parse_args(args[:2])).model == ModelConfig()
