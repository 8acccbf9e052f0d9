"""`import ffnjax` gives XLA:CPU one host device per core unless told otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _devices(**env_overrides) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "FFNJAX_HOST_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", **env_overrides)
    return subprocess.run([sys.executable, "-c", "import ffnjax, jax; print(jax.device_count())"],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)


def _count(**env_overrides) -> int:
    r = _devices(**env_overrides)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


def test_one_host_device_per_core_by_default():
    assert _count() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("env, expect", [
    ({"FFNJAX_HOST_DEVICES": "3"}, 3),
    ({"FFNJAX_HOST_DEVICES": "0"}, 1),      # 0: leave XLA alone (its default is one device)
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=5"}, 5),
    ({"JAX_NUM_CPU_DEVICES": "4"}, 4),
])
def test_the_users_choice_wins(env, expect):
    assert _count(**env) == expect


def test_a_bad_setting_names_the_variable():
    r = _devices(FFNJAX_HOST_DEVICES="two")
    assert r.returncode != 0
    assert "FFNJAX_HOST_DEVICES" in r.stderr and "'two'" in r.stderr
