"""`python -m experiments.segment`: outputs, resuming after a kill, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import segment as cli
from ffnjax import segmentation
from ffnjax.checkpoints import save_model
from ffnjax.config import InferenceOptions, ModelConfig
from ffnjax.volumes import open_volume

from test_flood import cell_image, moving_convstack

CFG = ModelConfig(depth=1, features=4, fov_size=(9, 9, 9), deltas=(2, 2, 2))
OPTS = ["--min-segment-size", "20", "--seed-policy", "grid", "--seed-grid-step", "4,5,5", "--quiet"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny convstack checkpoint whose fills move (scaled output layer) and a toy image."""
    root = tmp_path_factory.mktemp("segcli")
    params = moving_convstack(CFG)
    save_model(root / "ckpt", CFG, params)
    img = np.zeros((24, 32, 32), np.uint8)
    img[2:22, 2:30, 2:30] = cell_image()
    np.savez(root / "img.npz", raw=img)
    return root, params, img


def run(root, *extra):
    return cli.main(["--checkpoint", str(root / "ckpt"), "--image", f"{root}/img.npz:raw", *OPTS,
                     *extra])


def test_cli_matches_the_python_api_and_writes_volumes(setup, tmp_path):
    root, params, img = setup
    out, prob = tmp_path / "seg.zarr", tmp_path / "prob.zarr"
    summary = run(root, "--output", str(out), "--prob-output", str(prob), "--bbox", "2,2,2,20,28,28",
                  "--info-json", str(tmp_path / "info.json"))
    seg = open_volume(str(out)).read()
    assert seg.dtype == np.uint64 and seg.shape == (20, 28, 28)
    opts = InferenceOptions(min_segment_size=20, seed_policy="grid", seed_grid_step=(4, 5, 5))
    want, info = segmentation.segment(img[2:22, 2:30, 2:30], params, CFG, opts, progress=False)
    np.testing.assert_array_equal(seg, want)
    assert summary["objects"] == info.counters["committed"] >= 2
    p = open_volume(str(prob)).read()
    assert p.dtype == np.uint8 and np.all((p > 0) <= (seg > 0))
    assert np.all(p[seg > 0] >= np.floor(255 * 0.6))  # committed voxels passed the threshold
    assert tuple(open_volume(str(out)).offset) == (2, 2, 2)
    rec = json.loads((tmp_path / "info.json").read_text())
    assert len(rec["objects_list"]) == summary["objects"]
    assert not (tmp_path / "seg.zarr.segment-state.npz").exists()


def test_image_may_be_a_stack_or_a_box_of_files(setup, tmp_path):
    """--image in the read grammar (slabs stacked with '+', a box with '@'): the
    same segmentation as the array itself, placed by the box's offset."""
    root, params, img = setup
    np.savez(tmp_path / "top.npz", raw=img[:10])
    np.savez(tmp_path / "bottom.npz", raw=img[10:])
    out = tmp_path / "seg.zarr"
    cli.main(["--checkpoint", str(root / "ckpt"), "--image",
              f"{tmp_path}/top.npz:raw@2:,:,:+{tmp_path}/bottom.npz:raw", *OPTS,
              "--output", str(out), "--quiet"])
    opts = InferenceOptions(min_segment_size=20, seed_policy="grid", seed_grid_step=(4, 5, 5))
    want, _ = segmentation.segment(img[2:], params, CFG, opts, progress=False)
    got = open_volume(str(out))
    np.testing.assert_array_equal(got.read(), want)
    assert got.offset == (2, 0, 0)


class Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_result(setup, tmp_path, monkeypatch):
    root, _, _ = setup
    full = tmp_path / "full.zarr"
    run(root, "--output", str(full))
    out = tmp_path / "seg.zarr"
    state_path = tmp_path / "seg.zarr.segment-state.npz"
    real_save = segmentation.save_state
    saves = []

    def save_then_kill(path, state):
        real_save(path, state)
        saves.append(state.seed_index)
        if len(saves) == 3:
            raise Killed

    monkeypatch.setattr(segmentation, "save_state", save_then_kill)
    with pytest.raises(Killed):
        run(root, "--output", str(out), "--checkpoint-every", "0")
    monkeypatch.setattr(segmentation, "save_state", real_save)
    assert state_path.exists() and not out.exists()
    assert segmentation.load_state(state_path).seed_index == saves[-1]
    run(root, "--output", str(out), "--checkpoint-every", "0")
    np.testing.assert_array_equal(open_volume(str(out)).read(), open_volume(str(full)).read())
    assert not state_path.exists()
    # A finished output is not overwritten by accident.
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(root, "--output", str(out))


def test_bad_input(setup, tmp_path):
    root, _, _ = setup
    with pytest.raises(ValueError, match="outside the image"):
        run(root, "--output", str(tmp_path / "a.zarr"), "--bbox", "0,0,0,30,10,10")
    with pytest.raises(ValueError, match="six integers"):
        run(root, "--output", str(tmp_path / "a.zarr"), "--bbox", "0,0,0,10,10")
    with pytest.raises(ValueError, match="smaller than the network's FOV"):
        run(root, "--output", str(tmp_path / "a.zarr"), "--bbox", "0,0,0,5,20,20")
    with pytest.raises(ValueError, match="has FOV"):
        run(root, "--output", str(tmp_path / "a.zarr"), "--fov-size", "33,33,33")
    with pytest.raises(FileNotFoundError):
        cli.main(["--checkpoint", str(tmp_path / "nothing"), "--image", f"{root}/img.npz:raw",
                  "--output", str(tmp_path / "a.zarr")])
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", str(root / "ckpt")])  # missing --image/--output


def test_help_documents_every_option_flag():
    text = subprocess.run([sys.executable, "-m", "experiments.segment", "--help"], check=True,
                          capture_output=True, text=True, cwd=Path(__file__).parents[1]).stdout
    for name in InferenceOptions.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert "--bbox" in text and "--prob-output" in text and "--state" in text


def test_choice_flags_become_options_and_reject_unknown_values():
    parser = cli.build_parser()
    base = ["--checkpoint", "c", "--image", "i.npz:raw", "--output", "o.zarr"]
    args = parser.parse_args(base + ["--seed-order", "distance", "--consensus",
                                     "--consensus-mode", "contested", "--seed-policy", "grid"])
    opts = cli.options_from_args(args)
    assert (opts.seed_order, opts.consensus, opts.consensus_mode, opts.seed_policy) == (
        "distance", True, "contested", "grid")
    assert cli.options_from_args(parser.parse_args(base)) == InferenceOptions()
    for flag in ("--seed-order", "--consensus-mode", "--seed-policy"):
        with pytest.raises(SystemExit):
            parser.parse_args(base + [flag, "bogus"])


def test_segment_accepts_a_volume_object(setup):
    root, params, img = setup
    opts = InferenceOptions(min_segment_size=20, seed_policy="grid", seed_grid_step=(4, 5, 5))
    vol = open_volume(f"{root}/img.npz:raw")
    a, _ = segmentation.segment(vol, params, CFG, opts, progress=False)
    b, _ = segmentation.segment(img, params, CFG, opts, progress=False)
    np.testing.assert_array_equal(a, b)
    assert a.max() > 0


class Captured(Exception):
    pass


def test_options_default_to_the_checkpoints_training_facts(setup, tmp_path, monkeypatch):
    root, params, _ = setup
    save_model(tmp_path / "ckpt", CFG, params, inference={"image_mean": 100.0, "pad_value": 0.1})
    seen = []

    def capture(raw, params, model_config, options, **kw):
        seen.append(options)
        raise Captured

    monkeypatch.setattr(segmentation, "segment_state", capture)
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--image", f"{root}/img.npz:raw",
            "--output", str(tmp_path / "a.zarr"), "--quiet"]
    for extra in ([], ["--image-mean", "90"]):
        with pytest.raises(Captured):
            cli.main([*argv, *extra])
    assert (seen[0].image_mean, seen[0].pad_value, seen[0].image_stddev) == (100.0, 0.1, 33.0)
    assert (seen[1].image_mean, seen[1].pad_value) == (90.0, 0.1)  # a flag overrides


def test_segment_volume_defaults_to_the_checkpoints_training_facts(setup, tmp_path, monkeypatch):
    from experiments import segment_volume

    root, params, _ = setup
    save_model(tmp_path / "ckpt", CFG, params, inference={"image_stddev": 20.0})
    seen = []

    def capture(image, output, params, model_config, options, **kw):
        seen.append(options)
        raise Captured

    monkeypatch.setattr(segment_volume, "segment_volume", capture)
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--image", "i.zarr", "--output", "o.zarr"]
    for extra in ([], ["--options", '{"image_stddev": 25}'], ["--image-stddev", "30"]):
        with pytest.raises(Captured):
            segment_volume.main([*argv, *extra])
    assert [o.image_stddev for o in seen] == [20.0, 25.0, 30.0]
    assert seen[0] == InferenceOptions(image_stddev=20.0)


def test_downsample_flag_segments_coarse_and_writes_the_native_grid(setup, tmp_path):
    root, params, img = setup
    out = tmp_path / "seg.zarr"
    run(root, "--output", str(out), "--downsample", "2,2,2", "--seed-grid-step", "2,3,3")
    seg = open_volume(str(out)).read()
    assert seg.shape == img.shape
    opts = InferenceOptions(min_segment_size=20, seed_policy="grid", seed_grid_step=(2, 3, 3),
                            downsample=(2, 2, 2))
    want, info = segmentation.segment(img, params, CFG, opts, progress=False)
    np.testing.assert_array_equal(seg, want)
    assert info.counters["committed"] >= 1
