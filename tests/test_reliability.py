"""Nothing lost, nothing silently wrong (issue 22; docs/reliability.md lists
each guarantee with its test here).

Every bad-input case is run through the command's own entry point
(`_cli.run`): exit status 2, exactly one line on stderr naming the culprit,
no traceback, and nothing on disk written or changed (`snapshot`).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments import _cli
from experiments import segment as segment_cli
from experiments import segment_volume as segment_volume_cli
from ffnjax import segmentation
from ffnjax.checkpoints import save_model
from ffnjax.config import ModelConfig
from ffnjax.nets import init_params
from ffnjax.volumes import open_volume, read_all, save_volume

CFG = ModelConfig(depth=1, features=4, fov_size=(9, 9, 9), deltas=(2, 2, 2))
SEGMENT_OPTS = ["--min-segment-size", "20", "--seed-policy", "grid", "--seed-grid-step", "6,8,8",
                "--quiet"]


# ----------------------------------------------------------------------------
# Helpers


def snapshot(*roots) -> dict:
    """Every file under `roots` with its size and modification time, and every
    folder (a folder's own time changes when a command probes it for
    writing, leaving nothing behind)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder"
            for root in roots for p in [root, *sorted(root.rglob("*"))]}


def fails(main, argv, capsys) -> str:
    """Runs a command as a program; asserts exit 2 with one error line and no
    traceback; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _cli.run(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


class MustNotRun(Exception):
    pass


def must_not_run(*args, **kwargs):
    raise MustNotRun("the compute started before the outputs were checked")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny convstack checkpoint, an image (zarr and npz) and labels."""
    root = tmp_path_factory.mktemp("reliability")
    params = jax.jit(lambda key: init_params(CFG, key))(jax.random.PRNGKey(0))
    save_model(root / "ckpt", CFG, jax.tree_util.tree_map(np.asarray, params))
    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, size=(20, 24, 24), dtype=np.uint8)
    labels = (np.arange(20)[:, None, None] // 10 + 1 + np.zeros((20, 24, 24), int)).astype(np.uint32)
    save_volume(str(root / "image.zarr"), image)
    save_volume(str(root / "labels.zarr"), labels)
    np.savez(root / "image.npz", raw=image)
    return root, image, labels


def segment_argv(root, *extra):
    return ["--checkpoint", root / "ckpt", *SEGMENT_OPTS, *extra]


# ----------------------------------------------------------------------------
# Outputs: never an input, never an existing one without --overwrite, writable before compute


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_segment_volume_never_writes_over_its_image(data, tmp_path, capsys, overwrite):
    root, _, labels = data
    spec = str(root / "labels.zarr")
    before = snapshot(root)
    err = fails(segment_volume_cli.main,
                ["--oracle", "--image", spec, "--output", spec, "--workdir", tmp_path / "w",
                 "--block", "20,24,24", "--overlap", "0,0,0", "--scheduler", "sync", "--quiet",
                 *overwrite], capsys)
    assert "--output" in err and "--image" in err and spec in err
    assert snapshot(root) == before and not (tmp_path / "w").exists()
    np.testing.assert_array_equal(read_all(spec), labels)


def test_blockwise_library_refuses_the_image_as_output(data, tmp_path):
    from ffnjax import blockwise
    from ffnjax.testing import oracle_apply_fn, oracle_options

    root, _, labels = data
    spec = str(root / "labels.zarr")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="would overwrite the image"):
            blockwise.segment_volume(spec, spec, None, CFG, oracle_options(), block=(20, 24, 24),
                                     overlap=(0, 0, 0), client="sync", apply_fn=oracle_apply_fn,
                                     workdir=tmp_path / "w", progress=False, overwrite=overwrite)
    np.testing.assert_array_equal(read_all(spec), labels)
    assert not (tmp_path / "w").exists()


def test_segment_volume_refuses_an_existing_output_unless_overwrite(data, tmp_path, capsys):
    root, _, labels = data
    out = tmp_path / "seg.zarr"
    save_volume(str(out), np.full((4, 4, 4), 7, np.uint64))  # someone else's volume
    argv = ["--oracle", "--image", root / "labels.zarr", "--output", out, "--block", "20,24,24",
            "--overlap", "0,0,0", "--scheduler", "sync", "--quiet", "--fov", "5,5,5",
            "--deltas", "2,2,2"]
    before = snapshot(tmp_path)
    err = fails(segment_volume_cli.main, argv, capsys)
    assert "--output" in err and "--overwrite" in err and str(out) in err
    assert snapshot(tmp_path) == before
    summary = segment_volume_cli.main([str(a) for a in argv] + ["--overwrite"])
    seg = read_all(str(out))
    assert seg.shape == labels.shape and summary["n_objects"] == 2
    # Rerunning the same command resumes its own run: no --overwrite needed.
    again = segment_volume_cli.main([str(a) for a in argv])
    assert again["blocks_skipped"] == again["n_blocks"]
    np.testing.assert_array_equal(read_all(str(out)), seg)


@pytest.mark.parametrize("flag", ["--output", "--prob-output", "--state", "--info-json"])
def test_segment_never_writes_over_its_image_or_checkpoint(data, tmp_path, capsys, monkeypatch,
                                                            flag):
    root, image, _ = data
    monkeypatch.setattr(segmentation, "segment_state", must_not_run)
    outputs = {"--output": tmp_path / "seg.zarr", "--prob-output": tmp_path / "prob.zarr",
               "--state": tmp_path / "state.npz", "--info-json": tmp_path / "info.json"}
    before = snapshot(root, tmp_path)
    for victim in (root / "image.zarr", root / "ckpt"):
        argv = segment_argv(root, "--image", root / "image.zarr", "--overwrite",
                            *[x for k, v in {**outputs, flag: victim}.items() for x in (k, v)])
        err = fails(segment_cli.main, argv, capsys)
        assert flag in err and str(victim) in err and "another path" in err
    assert snapshot(root, tmp_path) == before
    np.testing.assert_array_equal(read_all(str(root / "image.zarr")), image)


def test_segment_refuses_two_outputs_at_one_path(data, tmp_path, capsys, monkeypatch):
    root, _, _ = data
    monkeypatch.setattr(segmentation, "segment_state", must_not_run)
    out = tmp_path / "seg.zarr"
    err = fails(segment_cli.main, segment_argv(root, "--image", root / "image.zarr", "--output",
                                               out, "--prob-output", out), capsys)
    assert "--output" in err and "--prob-output" in err
    assert list(tmp_path.iterdir()) == []


def test_segment_finds_an_unwritable_output_before_the_fill(data, tmp_path, capsys, monkeypatch):
    # Running as root, permissions do not stop a write: a regular file where the
    # output's folder should be does.
    root, _, _ = data
    monkeypatch.setattr(segmentation, "segment_state", must_not_run)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    before = snapshot(tmp_path)
    for flags in (["--output", blocker / "seg.zarr"],
                  ["--output", tmp_path / "seg.zarr", "--state", blocker / "s.npz"],
                  ["--output", tmp_path / "seg.zarr", "--prob-output", blocker / "p.zarr"]):
        err = fails(segment_cli.main, segment_argv(root, "--image", root / "image.zarr", *flags),
                    capsys)
        assert str(blocker) in err and "not a folder" in err
    assert snapshot(tmp_path) == before


def test_segment_refuses_an_existing_output(data, tmp_path, capsys, monkeypatch):
    root, _, _ = data
    monkeypatch.setattr(segmentation, "segment_state", must_not_run)
    (tmp_path / "info.json").write_text("{}")
    before = snapshot(tmp_path)
    err = fails(segment_cli.main, segment_argv(root, "--image", root / "image.zarr", "--output",
                                               tmp_path / "seg.zarr", "--info-json",
                                               tmp_path / "info.json"), capsys)
    assert "--info-json" in err and "--overwrite" in err
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------
# Images that are not finite


def test_nonfinite_box_finds_the_first_bad_chunk():
    from ffnjax.volumes import nonfinite_box, require_finite

    a = np.zeros((20, 24, 24), np.float32)
    assert nonfinite_box(a, (8, 8, 8)) is None
    a[17, 1, 1] = np.inf
    a[12, 20, 3] = np.nan  # first in z,y,x order
    assert nonfinite_box(a, (8, 8, 8)) == ((8, 16, 0), (16, 24, 8))
    assert nonfinite_box(a[16:], (8, 8, 8)) == ((0, 0, 0), (4, 8, 8))  # a clipped chunk
    with pytest.raises(ValueError, match=r"--image x\.zarr holds NaN .* box 108:116,16:24,0:8"):
        require_finite(a, "--image x.zarr", start=(100, 0, 0), chunks=(8, 8, 8))
    assert nonfinite_box(np.full((4, 4, 4), 255, np.uint8)) is None  # integers: finite by type


@pytest.fixture(scope="module")
def nan_image(data):
    root = data[0]
    image = data[1].astype(np.float32)
    image[12, 20, 3] = np.nan
    spec = str(root / "nan_image.zarr")
    save_volume(spec, image, chunks=(8, 8, 8))
    np.save(root / "nan_image.npy", image)
    return spec, str(root / "nan_image.npy")


def test_segment_refuses_an_image_with_nan(data, nan_image, tmp_path, capsys, monkeypatch):
    root = data[0]
    monkeypatch.setattr(segmentation, "segment_state", must_not_run)
    err = fails(segment_cli.main, segment_argv(root, "--image", nan_image[0], "--output",
                                               tmp_path / "seg.zarr"), capsys)
    assert nan_image[0] in err and "NaN" in err and "8:16,16:24,0:8" in err
    assert list(tmp_path.iterdir()) == []


def test_segment_volume_refuses_an_image_with_nan(data, nan_image, tmp_path, capsys):
    root = data[0]
    err = fails(segment_volume_cli.main,
                ["--checkpoint", root / "ckpt", "--image", nan_image[0], "--output",
                 tmp_path / "seg.zarr", "--block", "20,24,24", "--overlap", "0,0,0",
                 "--scheduler", "sync", "--quiet"], capsys)
    assert nan_image[0] in err and "NaN" in err and "8:16,16:24,0:8" in err
    assert not (tmp_path / "seg.zarr").exists()


def test_train_refuses_an_image_with_nan_before_any_step(data, nan_image, tmp_path, capsys):
    from experiments import train

    root = data[0]
    err = fails(train.main, ["--workdir", tmp_path / "run", "--image", nan_image[1],
                             "--labels", f"{root / 'labels.zarr'}", "--depth", "1", "--features",
                             "4", "--fov", "9,9,9", "--deltas", "2,2,2", "--batch-size", "2",
                             "--min-object-size", "1", "--steps", "2", "--quiet"], capsys)
    assert nan_image[1] in err and "NaN" in err and "8:16,16:24,0:8" not in err
    assert "box 0:20,0:24,0:24" in err  # a .npy has no chunks: 64-voxel boxes
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------
# Training: a resume keeps its configuration; unreadable checkpoints are skipped


def smoke(**overrides):
    from ffnjax.config import TrainConfig

    base = dict(steps=4, log_every=2, checkpoint_every=2, image_every=100, keep_checkpoints=5)
    return TrainConfig.smoke(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke run with checkpoints at steps 2 and 4."""
    from ffnjax.train_loop import train

    workdir = tmp_path_factory.mktemp("trained") / "run"
    train(smoke(), workdir, progress=False)
    return workdir


def copy_of(workdir, tmp_path):
    import shutil

    return shutil.copytree(workdir, tmp_path / "run")


def test_resume_with_another_config_is_refused_listing_the_fields(trained, tmp_path, monkeypatch):
    import dataclasses

    from ffnjax import train_loop
    from ffnjax.config import ModelConfig

    workdir = copy_of(trained, tmp_path)
    before = snapshot(workdir)
    # Refused before any data is read.
    monkeypatch.setattr(train_loop, "load_training_volumes", must_not_run)
    config = smoke()
    for changed, fields in (
            (dict(learning_rate=config.learning_rate * 30), ["learning_rate 0.003 -> 0.09"]),
            (dict(synthetic_seed=5, fov_moves=0), ["synthetic_seed 0 -> 5", "fov_moves 1 -> 0"])):
        with pytest.raises(ValueError, match="--allow-config-change") as e:
            train_loop.train(smoke(**changed), workdir, progress=False)
        assert all(f in str(e.value) for f in fields) and str(workdir) in str(e.value)
    # Another network or optimiser: the "different model" message, not an Orbax dump.
    deeper = dataclasses.replace(config.model, depth=2)
    other_fov = ModelConfig(depth=1, features=4, fov_size=(11, 11, 11), deltas=(2, 2, 2))
    for changed, field in ((dict(model=deeper), "model.depth 1 -> 2"),
                           (dict(model=other_fov), "model.fov_size 9,9,9 -> 11,11,11"),
                           (dict(optimizer="sgd"), "optimizer adam -> sgd")):
        with pytest.raises(ValueError, match="different model or optimiser") as e:
            train_loop.train(smoke(**changed), workdir, progress=False,
                             allow_config_change=[field.split()[0]])
        assert field in str(e.value) and len(str(e.value).splitlines()) == 1
    with pytest.raises(ValueError, match="'lr' is not a training or model field"):
        train_loop.train(config, workdir, progress=False, allow_config_change=["lr"])
    assert snapshot(workdir) == before


def test_train_command_refuses_a_changed_resume_in_one_line(trained, tmp_path, capsys):
    from experiments import train

    workdir = copy_of(trained, tmp_path)
    before = snapshot(workdir)
    err = fails(train.main, ["--workdir", workdir, "--config", workdir / "train_config.json",
                             "--learning-rate", "0.09", "--quiet"], capsys)
    assert "learning_rate 0.003 -> 0.09" in err and "--allow-config-change learning_rate" in err
    assert snapshot(workdir) == before


def test_allowed_and_safe_changes_resume_and_are_recorded(trained, tmp_path):
    from ffnjax import checkpoints, resume
    from ffnjax.train_loop import train

    workdir = copy_of(trained, tmp_path)
    assert [h["kind"] for h in resume.read_history(workdir)] == ["new"]
    # steps (extending the run) and the logging periods may change without a flag.
    metrics = train(smoke(steps=5, log_every=1, learning_rate=0.01), workdir, progress=False,
                    allow_config_change=["--learning-rate"])
    assert metrics["step"] == 5 and checkpoints.latest_step(workdir) == 5
    history = resume.read_history(workdir)
    assert [h["kind"] for h in history] == ["new", "resume"]
    assert history[1]["step"] == 4 and history[1]["allowed"] == ["learning_rate"]
    assert history[1]["changed"] == {"steps": {"from": 4, "to": 5},
                                     "log_every": {"from": 2, "to": 1},
                                     "learning_rate": {"from": 0.003, "to": 0.01}}


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_load_checkpoint_names_the_folder_and_file_that_fail(trained, tmp_path, capsys):
    from ffnjax import checkpoints

    workdir = copy_of(trained, tmp_path)
    meta = workdir / "checkpoints" / "4" / "state" / "_METADATA"
    truncate(meta)
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.load_checkpoint(workdir)
    assert str(workdir / "checkpoints" / "4") in str(e.value) and str(meta) in str(e.value)
    assert len(str(e.value).splitlines()) == 1
    checkpoints.load_checkpoint(workdir, step=2)   # the older one still reads
    # A data file TensorStore reads: the same one line, naming that file.
    workdir2 = copy_of(trained, tmp_path / "b")
    state = workdir2 / "checkpoints" / "4" / "state"
    for data in (p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"):
        truncate(data)
    err = fails(segment_cli.main, ["--checkpoint", workdir2, "--image", data_image(tmp_path),
                                   "--output", tmp_path / "seg.zarr", "--quiet"], capsys)
    assert str(workdir2 / "checkpoints" / "4") in err and str(state) in err


def data_image(tmp_path):
    np.save(tmp_path / "img.npy", np.full((12, 12, 12), 128, np.uint8))
    return tmp_path / "img.npy"


def test_training_falls_back_to_the_newest_checkpoint_that_restores(trained, tmp_path, capsys):
    from ffnjax import checkpoints
    from ffnjax.train_loop import train

    workdir = copy_of(trained, tmp_path)
    truncate(workdir / "checkpoints" / "4" / "state" / "_METADATA")
    capsys.readouterr()
    metrics = train(smoke(steps=6), workdir, progress=False)
    err = capsys.readouterr().err
    assert "skipped checkpoint 4" in err and "_METADATA" in err and "step 2" in err
    assert metrics["step"] == 6 and checkpoints.latest_step(workdir) == 6
    # The unreadable checkpoint is kept aside, and step 4 was saved again.
    assert (workdir / "checkpoints_unreadable" / "4" / "state" / "_METADATA").is_file()
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit()) == [2, 4, 6]
    checkpoints.load_checkpoint(workdir, step=4)


# ----------------------------------------------------------------------------
# Bad input: exit 2, one line naming the culprit, nothing written


def test_a_bad_option_value_names_its_flag_and_value(data, tmp_path, capsys):
    root = data[0]
    err = fails(segment_cli.main, segment_argv(root, "--image", root / "image.zarr", "--output",
                                               tmp_path / "seg.zarr", "--batch-size", "0"), capsys)
    assert "--batch-size 0" in err and "batch_size must be >= 1" in err
    err = fails(segment_volume_cli.main, ["--checkpoint", root / "ckpt", "--image",
                                          root / "image.zarr", "--output", tmp_path / "v.zarr",
                                          "--max-steps", "-1"], capsys)
    assert "--max-steps -1" in err
    from experiments import train
    err = fails(train.main, ["--workdir", tmp_path / "w", "--steps", "0"], capsys)
    assert "--steps 0: steps must be >= 1" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["npz key", "box", "fov", "existing", "unwritable"])
def test_segment_bad_input_is_one_line_and_writes_nothing(data, tmp_path, capsys, monkeypatch,
                                                          case):
    root = data[0]
    monkeypatch.setattr(segmentation, "segment_state", must_not_run)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    (tmp_path / "old.zarr").mkdir()
    out = tmp_path / "seg.zarr"
    argv, culprit = {
        "npz key": (["--image", f"{root / 'image.npz'}:nokey", "--output", out], "'nokey'"),
        "box": (["--image", root / "image.zarr", "--output", out, "--box", "0:30,:,:"],
                "--box '0:30,:,:'"),
        "fov": (["--image", root / "image.zarr", "--output", out, "--fov-size", "17,17,17"],
                "(17, 17, 17)"),
        "existing": (["--image", root / "image.zarr", "--output", tmp_path / "old.zarr"],
                     "--output"),
        "unwritable": (["--image", root / "image.zarr", "--output", blocker / "seg.zarr"],
                       str(blocker)),
    }[case]
    before = snapshot(root, tmp_path)
    assert culprit in fails(segment_cli.main, segment_argv(root, *argv), capsys)
    assert snapshot(root, tmp_path) == before


def test_train_bad_input_is_one_line_and_writes_nothing(data, tmp_path, capsys):
    from experiments import train

    root = data[0]
    np.save(tmp_path / "short.npy", np.ones((9, 24, 24), np.uint32))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    common = ["--depth", "1", "--features", "4", "--fov", "9,9,9", "--deltas", "2,2,2",
              "--batch-size", "2", "--quiet"]
    image = root / "image.zarr"
    cases = [
        (["--workdir", tmp_path / "w", "--image", f"{root / 'image.npz'}:nokey", "--labels",
          root / "labels.zarr"], "'nokey'"),
        (["--workdir", tmp_path / "w", "--image", image, "--labels", tmp_path / "short.npy"],
         "short.npy"),
        (["--workdir", tmp_path / "w", "--image", f"{image}@30:40,:,:", "--labels",
          root / "labels.zarr"], "outside"),
        (["--workdir", blocker / "w", "--image", image, "--labels", root / "labels.zarr"],
         str(blocker)),
        (["--workdir", image, "--image", image, "--labels", root / "labels.zarr"], "workdir"),
    ]
    before = snapshot(root, tmp_path)
    for argv, culprit in cases:
        assert culprit in fails(train.main, [*argv, *common], capsys)
    assert snapshot(root, tmp_path) == before


# ----------------------------------------------------------------------------
# The other commands that write: the same output rules


def test_synthetic_checks_every_output_before_writing_any(tmp_path, capsys):
    from experiments import synthetic

    save_volume(str(tmp_path / "labels.zarr"), np.ones((2, 2, 2), np.uint32))
    before = snapshot(tmp_path)
    err = fails(synthetic.main, ["--out", tmp_path, "--shape", "8,8,8"], capsys)
    assert str(tmp_path / "labels.zarr") in err and "--overwrite" in err
    assert snapshot(tmp_path) == before      # image.zarr was not written first
    paths = synthetic.main(["--out", str(tmp_path), "--shape", "8,8,8", "--overwrite"])
    assert read_all(paths["labels"]).shape == (8, 8, 8)


def test_evaluate_and_view_refuse_to_overwrite_a_report_or_an_input(data, tmp_path, capsys):
    from experiments import evaluate, view

    root = data[0]
    (tmp_path / "r.json").write_text("{}")
    before = snapshot(root, tmp_path)
    common = ["--segmentation", root / "labels.zarr", "--groundtruth", root / "labels.zarr"]
    assert "--json" in fails(evaluate.main, [*common, "--json", tmp_path / "r.json"], capsys)
    err = fails(evaluate.main, [*common, "--png", root / "labels.zarr", "--overwrite"], capsys)
    assert "--png" in err and "--segmentation" in err
    (tmp_path / "m.png").write_text("")
    before = snapshot(root, tmp_path)
    err = fails(view.main, ["--image", root / "image.zarr", "--segmentation", root / "labels.zarr",
                            "--png", tmp_path / "m.png", "--no-viewer"], capsys)
    assert "--png" in err and "--overwrite" in err
    assert snapshot(root, tmp_path) == before


def test_import_tf_never_replaces_a_checkpoint_without_overwrite(data, tmp_path, capsys):
    from experiments import import_tf

    root = data[0]
    import shutil
    shutil.copytree(root / "ckpt", tmp_path / "wd")
    before = snapshot(tmp_path)
    err = fails(import_tf.main, ["--tf-checkpoint", tmp_path / "model.ckpt", "--out",
                                 tmp_path / "wd", "--step", "0"], capsys)
    assert "--out" in err and "holds checkpoints" in err and "--overwrite" in err
    assert snapshot(tmp_path) == before


def test_segment_volume_refuses_a_fov_the_checkpoint_lacks(data, tmp_path, capsys):
    # --fov used to be read with --oracle only and silently ignored with a checkpoint.
    root = data[0]
    for flags, culprit in ((["--fov", "17,17,17"], "--fov asks for (17, 17, 17)"),
                           (["--deltas", "4,4,4"], "--deltas asks for (4, 4, 4)")):
        err = fails(segment_volume_cli.main,
                    ["--checkpoint", root / "ckpt", "--image", root / "image.zarr", "--output",
                     tmp_path / "seg.zarr", "--block", "20,24,24", "--overlap", "0,0,0",
                     "--scheduler", "sync", "--quiet", *flags], capsys)
        assert culprit in err and ("(9, 9, 9)" in err or "(2, 2, 2)" in err)
    assert list(tmp_path.iterdir()) == []
    # The oracle keeps its defaults.
    args = segment_volume_cli.build_parser().parse_args(["--image", "i", "--output", "o"])
    assert args.fov is None and args.deltas is None
