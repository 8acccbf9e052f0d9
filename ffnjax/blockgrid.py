"""The block grid: overlapping subvolumes over a volume, whose cores partition it.

`ffnjax.blockwise` segments a large volume one block at a time. The blocks lie
on a regular grid of `block`-sized boxes; neighbouring blocks share `overlap`
voxels along each axis, and the last block on an axis is shifted back to end
at the volume edge, so every block has the full size (one compiled network
serves all of them). Each block's *core* is its part of the volume after the
overlap with each neighbour is split at its middle: the cores partition the
volume, and a block writes only its core to the output.

Diagonal neighbours need no matching: on a regular grid the overlap of two
diagonal blocks lies inside a face-adjacent block, so `neighbour_pairs` lists
face-adjacent pairs only.

Everything is z,y,x, end-exclusive.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

from ffnjax.config import _as_zyx


def axis_starts(size: int, block: int, overlap: int) -> list[int]:
    """Block starts along one axis.

    Blocks have length `min(block, size)`, consecutive starts are
    `block - overlap` apart, and the last block is shifted back to end exactly
    at `size` (so it overlaps its neighbour by at least `overlap`).

    Raises:
      ValueError: when overlap >= block on an axis that needs several blocks.
    """
    if block >= size:
        return [0]
    stride = block - overlap
    if stride <= 0:
        raise ValueError(f"overlap {overlap} must be smaller than the block size {block}")
    n = math.ceil((size - block) / stride) + 1
    return [min(i * stride, size - block) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Block:
    """One subvolume of the grid (all z,y,x, end-exclusive).

    Attributes:
      index: grid position.
      start, stop: the voxels the block reads and segments.
      core_start, core_stop: the voxels this block writes to the output; the
        cores of all blocks partition the volume.
    """

    index: tuple[int, int, int]
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    core_start: tuple[int, int, int]
    core_stop: tuple[int, int, int]

    @property
    def name(self) -> str:
        return "_".join(f"{i:03d}" for i in self.index)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def core_slices(self) -> tuple[slice, slice, slice]:
        """The core as slices into the block's own array."""
        return tuple(slice(c0 - s, c1 - s) for s, c0, c1 in
                     zip(self.start, self.core_start, self.core_stop))  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class BlockGrid:
    """A regular grid of overlapping blocks over a volume of `shape`.

    Args:
      shape: volume size z,y,x.
      block: block size z,y,x (clipped to the volume).
      overlap: voxels shared by neighbouring blocks, z,y,x. It is also each
        block's context: objects are matched across it, and its middle is where
        one block's output hands over to the next. Use at least the FOV size.
    """

    shape: tuple[int, int, int]
    block: tuple[int, int, int]
    overlap: tuple[int, int, int]

    def __post_init__(self):
        object.__setattr__(self, "shape", _as_zyx("shape", self.shape))
        object.__setattr__(self, "block", _as_zyx("block", self.block))
        object.__setattr__(self, "overlap", _as_zyx("overlap", self.overlap, positive=False))
        for ax, (s, b, o) in enumerate(zip(self.shape, self.block, self.overlap)):
            if b < s and o >= b:
                raise ValueError(f"overlap {self.overlap} must be smaller than block {self.block} "
                                 f"along axis {'zyx'[ax]} (volume shape {self.shape})")

    @functools.cached_property
    def starts(self) -> tuple[list[int], list[int], list[int]]:
        return tuple(axis_starts(s, b, o) for s, b, o in
                     zip(self.shape, self.block, self.overlap))  # type: ignore[return-value]

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(len(s) for s in self.starts)  # type: ignore[return-value]

    def _axis_blocks(self, ax: int) -> list[tuple[int, int, int, int]]:
        """(start, stop, core_start, core_stop) per block along axis `ax`."""
        size, length = self.shape[ax], min(self.block[ax], self.shape[ax])
        starts = self.starts[ax]
        stops = [s + length for s in starts]
        # Split each overlap [starts[i], stops[i-1]) at its middle.
        cuts = [0] + [(starts[i] + stops[i - 1]) // 2 for i in range(1, len(starts))] + [size]
        return [(a, b, cuts[i], cuts[i + 1]) for i, (a, b) in enumerate(zip(starts, stops))]

    @functools.cached_property
    def blocks(self) -> list[Block]:
        """All blocks in z,y,x raster order."""
        axes = [self._axis_blocks(ax) for ax in range(3)]
        out = []
        for i, bz in enumerate(axes[0]):
            for j, by in enumerate(axes[1]):
                for k, bx in enumerate(axes[2]):
                    out.append(Block((i, j, k), (bz[0], by[0], bx[0]), (bz[1], by[1], bx[1]),
                                     (bz[2], by[2], bx[2]), (bz[3], by[3], bx[3])))
        return out

    def __len__(self) -> int:
        return math.prod(self.grid_shape)

    def block_at(self, index: Sequence[int]) -> Block:
        gz, gy, gx = self.grid_shape
        i, j, k = index
        return self.blocks[(i * gy + j) * gx + k]

    def neighbour_pairs(self) -> list[tuple[Block, Block]]:
        """Face-adjacent block pairs (lower, upper), each once."""
        pairs = []
        for b in self.blocks:
            for ax in range(3):
                nxt = list(b.index)
                nxt[ax] += 1
                if nxt[ax] < self.grid_shape[ax]:
                    pairs.append((b, self.block_at(nxt)))
        return pairs


def overlap_box(a: Block, b: Block) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The intersection [start, stop) of two blocks (empty if stop <= start on an axis)."""
    start = tuple(max(x, y) for x, y in zip(a.start, b.start))
    stop = tuple(min(x, y) for x, y in zip(a.stop, b.stop))
    return start, stop
