"""Ctrl-C (SIGINT) and SIGTERM act within seconds, save what resumes, and end
every long command with one line saying how to resume (issue 22)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ffnjax import interrupt, segmentation
from ffnjax.checkpoints import save_model
from ffnjax.config import ModelConfig
from ffnjax.nets import init_params
from ffnjax.testing import oracle_apply_fn, oracle_options
from ffnjax.volumes import open_volume, read_all, save_volume

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")


def send_later(signum: int, seconds: float) -> threading.Timer:
    """Sends `signum` to this process after `seconds` (from a timer thread);
    the timer records when."""
    timer = threading.Timer(seconds, lambda: (setattr(timer, "sent", time.perf_counter()),
                                              os.kill(os.getpid(), signum)))
    timer.start()
    return timer


def test_a_signal_stops_a_long_fill_within_a_second_and_the_saved_state_resumes():
    """The fill runs in chunks of FILL_CHUNK_STEPS steps, so a signal that
    arrives during a fill of seconds stops it at once; the state saved is the
    one before that seed, and resuming it gives the uninterrupted result."""
    labels = np.ones((40, 96, 96), np.uint16)
    labels[:, :, 72:] = 2
    model = ModelConfig(depth=1, features=1, fov_size=(9, 17, 17), deltas=(1, 4, 4))
    options = oracle_options(seed_policy="grid", seed_grid_step=(100, 100, 100))
    seeds = np.array([[20, 48, 36], [20, 48, 84]])
    whole, info = segmentation.segment(labels, None, model, options, oracle_apply_fn,
                                       seeds=seeds, progress=False)  # also compiles the fill
    # A fill to cut: the signal comes a quarter into it (timed on this machine,
    # so a faster or slower machine moves both), long before it would end.
    fill_s = info.timings["first_fill"]
    assert fill_s > 0.4, info.timings

    saved = []
    with interrupt.handling():
        timer = send_later(signal.SIGTERM, 0.25 * fill_s)
        with pytest.raises(interrupt.Interrupted) as e:
            segmentation.segment(labels, None, model, options, oracle_apply_fn, seeds=seeds,
                                 progress=False, checkpoint_fn=saved.append,
                                 checkpoint_every_s=1e9)
        stopped = time.perf_counter()
        timer.join()
    assert e.value.name == "SIGTERM" and e.value.exit_code == 143
    assert stopped - timer.sent < 1.0, stopped - timer.sent
    state = saved[-1]
    assert state.seed_index == 0 and state.counters["fills"] == 0 and not (state.segmentation > 0).any()
    resumed, again = segmentation.segment(labels, None, model, options, oracle_apply_fn,
                                          state=state, progress=False)
    np.testing.assert_array_equal(resumed, whole)
    assert again.counters == info.counters


def test_a_signal_waits_for_the_end_of_a_deferred_block_and_a_second_one_does_not():
    marks = []
    with interrupt.handling():
        with pytest.raises(interrupt.Interrupted):
            with interrupt.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                marks.append("the first block ran to its end")
    assert interrupt.pending() is None  # handling() forgets its signals
    with interrupt.handling():
        with pytest.raises(interrupt.Interrupted):
            with interrupt.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                marks.append("the first signal waits")
                os.kill(os.getpid(), signal.SIGINT)  # the second acts at once
                time.sleep(0.05)
                marks.append("not reached")
        assert interrupt.pending() == signal.SIGINT
    assert marks == ["the first block ran to its end", "the first signal waits"]
    assert interrupt.pending() is None


def test_flagging_marks_a_signal_without_raising_and_a_second_one_raises():
    """Inside `handling()` (as every command runs), `flagging()` turns the first
    SIGTERM into a flag the loop polls, not an exception; the second acts at
    once; worker threads' check() never sees it; the outer handler comes back."""
    with interrupt.handling():
        outer = signal.getsignal(signal.SIGTERM)
        with interrupt.flagging():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert interrupt.flagged() == signal.SIGTERM and interrupt.pending() is None
            interrupt.check()                       # nothing raised
            with pytest.raises(interrupt.Interrupted) as e:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
            assert e.value.name == "SIGTERM"
        assert interrupt.flagged() is None and signal.getsignal(signal.SIGTERM) is outer


def test_training_stops_on_sigint_after_saving_a_checkpoint_and_resumes(tmp_path):
    """Ctrl-C used to kill training with a KeyboardInterrupt and no checkpoint of
    the steps since the last periodic one; now it stops at the end of a step
    with a checkpoint of it, like SIGTERM."""
    from ffnjax import checkpoints
    from ffnjax.config import TrainConfig
    from ffnjax.train_loop import train

    config = TrainConfig.smoke(steps=100000, log_every=1000, checkpoint_every=100000,
                               image_every=100000)
    with interrupt.handling():
        timer = send_later(signal.SIGINT, 4.0)
        with pytest.raises(interrupt.Interrupted) as e:
            train(config, tmp_path / "run", progress=False)
        timer.join()
    saved = checkpoints.latest_step(tmp_path / "run")
    assert e.value.name == "SIGINT" and e.value.exit_code == 130
    assert saved is not None and 1 <= saved < 100000 and e.value.result["step"] == saved
    assert e.value.resume == (f"checkpoint saved at step {saved} in {tmp_path / 'run'}; rerun the "
                              "same command to resume")
    assert train(config, tmp_path / "run", stop_at_step=saved + 1, progress=False)["step"] == saved + 1


# ----------------------------------------------------------------------------
# The commands, as programs


def wait_for(proc, path: Path, timeout: float = 240):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def stop(proc, signum) -> tuple[int, str, float]:
    """Sends `signum`; returns (exit status, stderr, seconds to exit)."""
    t = time.perf_counter()
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, time.perf_counter() - t


@pytest.fixture(scope="module")
def flooding_checkpoint(tmp_path_factory):
    """A tiny convstack whose fills flood (constant high logits) and a cell image."""
    from test_flood import cell_image

    root = tmp_path_factory.mktemp("interrupt")
    config = ModelConfig(depth=1, features=4, fov_size=(9, 9, 9), deltas=(2, 2, 2))
    params = jax.tree_util.tree_map(np.asarray, jax.jit(lambda k: init_params(config, k))(
        jax.random.PRNGKey(0)))
    lom = params["params"]["conv_lom"]
    lom["kernel"] = lom["kernel"] * 8.0
    lom["bias"] = lom["bias"] + 4.0
    save_model(root / "ckpt", config, params)
    img = np.concatenate([cell_image((20, 28, 28), seed=s) for s in range(3)], axis=1)
    np.savez(root / "img.npz", raw=np.tile(img, (2, 1, 3)))
    return root


def test_segment_stops_on_sigint_saves_its_state_and_resumes_to_the_same_result(
        flooding_checkpoint, tmp_path):
    from experiments import segment as cli

    root = flooding_checkpoint
    args = ["--checkpoint", str(root / "ckpt"), "--image", f"{root}/img.npz:raw",
            "--min-segment-size", "20", "--seed-policy", "grid", "--seed-grid-step", "2,3,3",
            "--quiet"]
    ref = tmp_path / "ref.zarr"
    cli.main([*args, "--output", str(ref)])

    out, state = tmp_path / "seg.zarr", tmp_path / "seg.zarr.segment-state.npz"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.segment", *args, "--output",
                             str(out), "--checkpoint-every", "0"], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(proc, state)
    code, err, seconds = stop(proc, signal.SIGINT)
    lines = err.strip().splitlines()
    assert code == 130 and seconds < 10, (code, seconds, err[-2000:])
    assert lines[-1] == (f"interrupted by SIGINT: the state is saved in {state}; rerun the same "
                         "command to resume"), err[-2000:]
    assert "Traceback" not in err and not out.exists()
    assert segmentation.load_state(state).seed_index > 0

    cli.main([*args, "--output", str(out)])
    np.testing.assert_array_equal(read_all(str(out)), read_all(str(ref)))
    assert not state.exists()


def test_segment_volume_stops_on_sigterm_mid_fill_and_resumes(tmp_path):
    """One object filling most of a 40x96x112 block: SIGTERM during its fill
    ends the run within seconds; the rerun finishes it."""
    labels = np.ones((40, 96, 192), np.uint16)
    labels[:, :, 96:] = 2
    spec = str(tmp_path / "labels.zarr")
    save_volume(spec, labels)
    args = ["--oracle", "--image", spec, "--fov", "9,17,17", "--deltas", "2,4,4",
            "--block", "40,96,112", "--overlap", "8,16,32", "--scheduler", "sync", "--quiet"]
    out, work = tmp_path / "seg.zarr", tmp_path / "seg.zarr.blocks"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.segment_volume", *args,
                             "--output", str(out)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(proc, work / "run.json")
    time.sleep(3.0)  # past compiling, inside the first block's fill of ~10 s
    code, err, seconds = stop(proc, signal.SIGTERM)
    assert code == 143 and seconds < 10, (code, seconds, err[-2000:])
    assert err.strip().splitlines()[-1] == (f"interrupted by SIGTERM: finished blocks are kept in "
                                            f"{work}; rerun the same command to resume"), err
    assert not out.exists()

    from experiments import segment_volume as cli

    d = cli.main([*args, "--output", str(out)])
    assert d["n_objects"] == 2 and d["blocks_computed"] + d["blocks_skipped"] == 2
    model = ModelConfig(depth=1, features=1, fov_size=(9, 17, 17), deltas=(2, 4, 4))
    whole, _ = segmentation.segment(labels, None, model, oracle_options(
        seed_policy="grid", seed_grid_step=(2, 4, 4)), oracle_apply_fn, progress=False)
    seg = open_volume(str(out)).read()
    assert np.array_equal(seg != 0, whole != 0) and len(np.unique(seg[seg != 0])) == 2


@pytest.mark.parametrize("command, target, argv, says", [
    ("agglomerate", "ffnjax.agglomeration.agglomerate", None, "pairs scored so far are kept in"),
    ("demo", "experiments.demo.run_demo", ["--out", "{tmp}/demo"], "are kept in {tmp}/demo"),
    ("fib25_eval", "experiments.fib25_eval.evaluate", ["--checkpoint", "x", "--out", "{tmp}/ev"],
     "kept in {tmp}/ev; rerun"),
])
def test_every_long_command_says_how_to_resume(command, target, argv, says, tmp_path,
                                                monkeypatch, capsys):
    import importlib

    from experiments import _cli

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        raise AssertionError("the signal did not stop the command")

    module = importlib.import_module(f"experiments.{command}")
    if command == "agglomerate":
        argv = agglomerate_argv(tmp_path)
    monkeypatch.setattr(target, interrupted)
    with pytest.raises(SystemExit) as e:
        _cli.run(module.main, [a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 143 and err[-1].startswith("interrupted by SIGTERM: "), err
    assert says.format(tmp=tmp_path) in err[-1] and "rerun the same command" in err[-1], err


def agglomerate_argv(tmp_path) -> list[str]:
    """A tiny checkpoint, image and segmentation agglomerate accepts."""
    config = ModelConfig(depth=1, features=2, fov_size=(5, 5, 5), deltas=(1, 1, 1))
    params = jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.PRNGKey(0)))
    save_model(tmp_path / "ckpt", config, params)
    seg = np.zeros((12, 12, 12), np.uint32)
    seg[:, :, :6], seg[:, :, 6:] = 1, 2
    save_volume(str(tmp_path / "seg.zarr"), seg)
    save_volume(str(tmp_path / "img.zarr"), np.full((12, 12, 12), 128, np.uint8))
    return ["--checkpoint", str(tmp_path / "ckpt"), "--image", str(tmp_path / "img.zarr"),
            "--segmentation", str(tmp_path / "seg.zarr"), "--output", str(tmp_path / "agg.zarr")]


def test_without_a_resumable_state_the_line_says_so(capsys):
    from experiments import _cli

    def main(argv):
        raise KeyboardInterrupt  # Python's own SIGINT handling, outside ffnjax's

    with pytest.raises(SystemExit) as e:
        _cli.run(main, [])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == f"interrupted by SIGINT: {_cli.NOTHING_TO_RESUME}"
