"""Shared test fixtures: the real data beside the repo (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
