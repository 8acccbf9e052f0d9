"""Shared test fixtures: the real data beside the repo (skipped when absent), and
a private cache folder for the commands the tests run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# The AVX-512 convolution kernel (ffnjax.cpu_kernel) is compiled once per machine
# for the tests, outside the user's ~/.cache, and shared by every xdist worker and
# subprocess. Set here, at import, because collection already asks for it.
os.environ.setdefault("FFNJAX_KERNEL_DIR", str(Path(tempfile.gettempdir())
                                              / f"ffnjax-test-kernels-{os.getuid()}"))


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
