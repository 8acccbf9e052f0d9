"""The block grid: cores partition the volume, overlaps are at least as asked,
bad geometry is refused; and its old import path ffnjax.blockwise."""

from __future__ import annotations

import numpy as np
import pytest

from ffnjax import blockgrid, blockwise, dask_tasks


def test_old_import_path_is_the_same():
    for name in ("Block", "BlockGrid", "axis_starts", "overlap_box"):
        assert getattr(blockwise, name) is getattr(blockgrid, name)
    assert blockwise.LOCAL_SCHEDULERS is dask_tasks.LOCAL_SCHEDULERS


@pytest.mark.parametrize("shape,block,overlap", [
    ((48, 64, 64), (24, 32, 32), (6, 8, 8)),
    ((50, 61, 7), (20, 32, 32), (4, 5, 2)),
    ((10, 10, 10), (16, 16, 16), (4, 4, 4)),
    ((33, 40, 29), (11, 13, 10), (0, 3, 1)),
])
def test_grid_cores_partition_volume(shape, block, overlap):
    grid = blockgrid.BlockGrid(shape, block, overlap)
    cover = np.zeros(shape, np.int32)
    inside = np.zeros(shape, np.int32)
    for b in grid.blocks:
        assert b.shape == tuple(min(x, s) for x, s in zip(block, shape))  # one size for all
        assert all(0 <= s and e <= n for s, e, n in zip(b.start, b.stop, shape))
        assert all(s <= c0 < c1 <= e for s, c0, c1, e in zip(b.start, b.core_start, b.core_stop, b.stop))
        cover[tuple(slice(a, e) for a, e in zip(b.core_start, b.core_stop))] += 1
        inside[tuple(slice(a, e) for a, e in zip(b.start, b.stop))] += 1
    assert (cover == 1).all()  # cores partition the volume
    assert (inside >= 1).all()
    for a, b in grid.neighbour_pairs():
        start, stop = blockgrid.overlap_box(a, b)
        ax = next(i for i in range(3) if a.index[i] != b.index[i])
        assert stop[ax] - start[ax] >= overlap[ax]  # at least the requested overlap
    g = grid.grid_shape
    assert len(grid.neighbour_pairs()) == sum(
        (g[ax] - 1) * int(np.prod(g)) // g[ax] for ax in range(3))


def test_grid_rejects_bad_geometry():
    with pytest.raises(ValueError, match="overlap"):
        blockgrid.BlockGrid((64, 64, 64), (16, 16, 16), (16, 2, 2))
    with pytest.raises(ValueError, match="block"):
        blockgrid.BlockGrid((64, 64, 64), (16, 0, 16), (2, 2, 2))
