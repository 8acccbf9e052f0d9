"""Multi-process training (`ffnjax.multihost`, `experiments.train --coordinator`):
two processes on 127.0.0.1 behave as two hosts (gloo collectives on CPU).

The subprocess tests start real processes, each with its own host device count
(FFNJAX_HOST_DEVICES), and carry the `multihost` marker: the default run skips
them, `make test-multihost` runs them (about 20-60 s each on 2 busy cores).
The rest run here, in this process, in the default run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import _cli
from experiments import segment_volume as segment_volume_cli
from experiments import train as train_cli
from ffnjax import checkpoints, multihost
from ffnjax.config import TrainConfig
from ffnjax.inputs import load_training_volumes, process_sampler, restore_streams

REPO = Path(__file__).resolve().parents[1]
TINY = ["--depth", "1", "--features", "4", "--fov", "9,9,9", "--deltas", "2,2,2",
        "--synthetic-shape", "24,48,48", "--synthetic-radius", "3", "--min-object-size", "20",
        "--batch-size", "2"]
# FOV moves on (a low threshold and a cap of 2 moves make examples take them),
# one optimiser step per FOV slot (the default), checkpoints every 2 steps.
RUN = [*TINY, "--fov-moves", "1", "--move-threshold", "0.01", "--max-moves", "2", "--steps", "8",
       "--warmup-steps", "0", "--log-every", "4", "--checkpoint-every", "2", "--image-every", "4",
       "--keep-checkpoints", "5"]
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir: Path, args: list[str], devices: int = 1) -> subprocess.Popen:
    """experiments.train in a process of its own with `devices` host devices;
    its output goes to files beside the workdir (a pipe nobody reads could
    fill up and stop it)."""
    env = dict(os.environ, FFNJAX_HOST_DEVICES=str(devices), JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)          # the parent's device count must not leak in
    workdir.parent.mkdir(parents=True, exist_ok=True)
    logs = [workdir.parent / f"{workdir.name}.{time.monotonic_ns()}.{s}" for s in ("out", "err")]
    with open(logs[0], "w") as out, open(logs[1], "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "experiments.train", "--workdir",
                                 str(workdir), *args], cwd=REPO, env=env, stdout=out, stderr=err)
    proc.logs = logs
    return proc


def _start_processes(workdir: Path, args: list[str], n: int = 2, port: int | None = None,
                     per_process: dict[int, list[str]] | None = None) -> list[subprocess.Popen]:
    port = port or _free_port()
    return [_start(workdir, [*args, *(per_process or {}).get(i, []), "--coordinator",
                             f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)])
            for i in range(n)]


def _finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[tuple[int, str, str]]:
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.time(), 0.1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, *(log.read_text() for log in p.logs)) for p in procs]


def _saved(workdir: Path) -> bool:
    """Whether a finished checkpoint is in the workdir (Orbax renames a step's
    folder to its number once every process has written it); read without
    opening a CheckpointManager beside the running processes."""
    return any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*"))


def _params(workdir: Path):
    return checkpoints.load_checkpoint(workdir)[1]


def _assert_same_params(a, b):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                           a, b)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """An uninterrupted 2 processes x 1 device run of RUN: (workdir, results)."""
    wd = tmp_path_factory.mktemp("mh") / "two_by_one"
    results = _finish(_start_processes(wd, RUN))
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    return wd, results


# ----------------------------------------------------------------------------
# Two real processes
# ----------------------------------------------------------------------------

@pytest.mark.multihost
def test_two_processes_equal_one_process_with_two_devices(two_process_run, tmp_path):
    wd2, results = two_process_run
    one = _start(tmp_path / "one_by_two", [*RUN, "--input-streams", "2"], devices=2)
    (rc, out, err), = _finish([one])
    assert rc == 0, err[-3000:]
    assert "on 2 device(s)" in out and "on 2 device(s)" in results[0][1]   # same mesh size
    # Only process 0 prints the log lines and writes events and PNGs.
    assert "step 8:" in results[0][1] and "step 8:" not in results[1][1]
    final = [json.loads(r[1].strip().splitlines()[-1]) for r in results]
    assert final[0]["moves"] > 0                     # the FOV moves were exercised
    assert final[0]["loss"] == final[1]["loss"]      # metrics reduced over processes
    _assert_same_params(_params(wd2), _params(tmp_path / "one_by_two"))
    # The same examples: the two runs end with the same sampler streams.
    assert checkpoints.load_meta(wd2)["sampler_states"] == \
        checkpoints.load_meta(tmp_path / "one_by_two")["sampler_states"]
    assert len(list((wd2 / "images").glob("*.png"))) == 2
    assert len(list((wd2 / "tensorboard").iterdir())) == 1


@pytest.mark.multihost
def test_sigkill_of_one_process_then_restart_resumes_the_same_run(two_process_run, tmp_path):
    wd = tmp_path / "killed"
    procs = _start_processes(wd, RUN)
    try:
        deadline = time.time() + TIMEOUT
        while not _saved(wd):                           # a checkpoint exists: kill mid-run
            assert time.time() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGKILL)
        procs[0].send_signal(signal.SIGKILL)            # the survivor would wait for its peer
    finally:
        _finish(procs)
    killed_at = checkpoints.latest_step(wd)
    assert killed_at is not None and killed_at < 8
    results = _finish(_start_processes(wd, RUN))
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    assert f"resuming from step {killed_at}" in results[0][1]
    assert checkpoints.latest_step(wd) == 8
    _assert_same_params(_params(wd), _params(two_process_run[0]))


@pytest.mark.multihost
def test_sigterm_on_one_process_stops_both_at_one_checkpoint(tmp_path):
    wd = tmp_path / "terminated"
    procs = _start_processes(wd, [*TINY, "--steps", "100000", "--checkpoint-every", "2",
                                  "--log-every", "2", "--image-every", "100000", "--quiet"])
    try:
        deadline = time.time() + TIMEOUT
        while not _saved(wd):
            assert time.time() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGTERM)            # process 1 only
    finally:
        results = _finish(procs)
    for rc, out, err in results:  # both stop, interrupted, and say how to resume
        assert rc == 143 and "interrupted by SIGTERM: checkpoint saved" in err, err[-3000:]
    steps = [json.loads(out.strip().splitlines()[-1])["step"] for _, out, _ in results]
    assert steps[0] == steps[1] == checkpoints.latest_step(wd) < 100000


@pytest.mark.multihost
def test_mismatches_fail_fast_with_one_error_line(tmp_path):
    # A process with other flags: both processes name it and exit 2.
    mismatch = _start_processes(tmp_path / "mismatch", [*TINY, "--steps", "2"],
                                per_process={1: ["--learning-rate", "0.01"]})
    # A coordinator that never answers: nothing listens at the port.
    silent = _start(tmp_path / "silent", [*TINY, "--coordinator", f"127.0.0.1:{_free_port()}",
                                          "--num-processes", "2", "--process-id", "1",
                                          "--init-timeout", "3"])
    # A coordinator port in use by another program.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = _start(tmp_path / "taken", [*TINY, "--coordinator",
                                            f"127.0.0.1:{busy.getsockname()[1]}",
                                            "--num-processes", "2", "--process-id", "0",
                                            "--init-timeout", "3"])
        t0 = time.time()
        results = _finish([*mismatch, silent, taken], timeout=120)
    elapsed = time.time() - t0
    for rc, _, err in results[:2]:
        assert rc == 2 and err.strip().splitlines()[-1].startswith(
            "error: process 1 was started with a different configuration from process 0 "
            "(learning_rate: 0.01 vs 0.001)"), err[-2000:]
    rc, _, err = results[2]
    assert rc == 2 and "error: multi-process start timed out after 3 s (process 1 of 2" in err
    assert "nothing answers at 127.0.0.1:" in err and "--init-timeout" in err
    rc, _, err = results[3]
    assert rc == 2 and err.strip().splitlines()[-1].startswith(
        "error: process 0 cannot serve the coordinator on port"), err[-2000:]
    assert elapsed < 90


# ----------------------------------------------------------------------------
# In this process
# ----------------------------------------------------------------------------

def test_n_processes_draw_what_one_process_with_n_streams_draws():
    config = TrainConfig.smoke(batch_size=4)
    volumes = load_training_volumes(config)
    one = process_sampler(dataclasses.replace(config, input_streams=2), volumes)
    shares = [process_sampler(config, volumes, p, 2) for p in range(2)]
    for _ in range(2):
        whole = one.batch(4)
        parts = [s.batch(2) for s in shares]
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
    # The default single process draws the one stream it always drew (stream 0).
    assert process_sampler(config, volumes).get_state() == \
        process_sampler(config, volumes, 0, 2).get_state()
    # A checkpoint of 2 streams resumes in one process only with --input-streams 2.
    saved = [s.get_state() for s in shares]
    restore_streams(one, saved)
    assert one.get_state() == saved
    with pytest.raises(ValueError, match="holds 2 sampler stream.*--input-streams 2"):
        restore_streams(process_sampler(config, volumes), saved)
    with pytest.raises(ValueError, match="input_streams 3 must be a multiple of the process count 2"):
        process_sampler(TrainConfig.smoke(batch_size=6, input_streams=3), volumes, 0, 2)


def test_single_process_agreements_are_local():
    assert multihost.allgather_json({"a": 1}) == [{"a": 1}]
    assert multihost.any_process(True) and not multihost.any_process(False)
    multihost.check_same_config(TrainConfig.smoke())
    multihost.check_same("a step", 3)


@pytest.mark.parametrize("argv, match", [
    (["--coordinator", "127.0.0.1:1234"], "--coordinator needs --num-processes and --process-id"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     r"--process-id must lie in 0..1"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "0", "--init-timeout", "0"],
     "--init-timeout must be positive"),
])
def test_train_flags_of_the_explicit_form_are_checked(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--workdir", "w", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(match, err[0])


def test_segment_volume_refuses_a_launch_per_host(monkeypatch, capsys):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE",
                 "PMI_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(name, raising=False)
    assert multihost.launch_reasons() == []
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0")
    assert multihost.launch_reasons() == []           # one task, one host: a single launch
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0,t1")
    with pytest.raises(SystemExit) as e:
        _cli.run(segment_volume_cli.main, ["--oracle", "--image", "x.zarr", "--output", "y.zarr"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SLURM_STEP_NUM_TASKS=4" in err[0]
    assert "TPU_WORKER_HOSTNAMES lists 2 hosts" in err[0] and "--scheduler" in err[0]
