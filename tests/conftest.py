"""Shared test fixtures: the real data beside the repo (skipped when absent), and
a private cache folder for the commands the tests run."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory):
    """XDG_CACHE_HOME in a temporary folder for the whole session: commands run
    by the tests (in process or as subprocesses) keep their JAX compilation
    cache there, not in the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        yield

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, skipping the calling test when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not present: {p}")
    return p


@pytest.fixture
def shared_data():
    """Callable fixture: shared_data('fib25_training_sample2', 'raw_z000-049.npz')."""
    return shared_path
