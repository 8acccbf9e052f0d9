"""Volume handles: a volume given as a spec string or as an opened Volume-like object.

Functions that work on whole volumes (`ffnjax.blockwise`, `ffnjax.view`)
accept either a `ffnjax.volumes` spec (``'x.zarr'``, ``'x.npz:labels'``,
``'precomputed://x'``) or an object with ``shape`` / ``voxel_size`` /
``read`` (an opened `ffnjax.volumes.Volume`, or an in-memory stand-in).
`as_volume` turns either into something to read from, opening a spec once
per process and mode (Dask workers call it for every block); `spec_text`
names either in messages.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from ffnjax.volumes import open_volume, parse_spec


@functools.lru_cache(maxsize=8)
def _open_cached(spec: str, mode: str, stamp: tuple):
    del stamp  # part of the cache key only
    return open_volume(spec, mode)


def _local_stamp(spec: str) -> tuple:
    """(inode, mtime) of a local volume path, so a volume replaced on disk is reopened."""
    try:
        path = parse_spec(spec).path
        st = os.stat(path) if path and "://" not in path else None
    except (ValueError, OSError):
        st = None
    return (st.st_ino, st.st_mtime_ns) if st else ()


def as_volume(vol: Any, mode: str = "r"):
    """A Volume from a spec string (opened once per process and kept while the
    file is unchanged) or a Volume-like object as is."""
    if isinstance(vol, (str, os.PathLike)):
        spec = os.fspath(vol)
        return _open_cached(spec, mode, _local_stamp(spec))
    return vol


def spec_text(vol: Any) -> str:
    """The spec a volume was given as, for messages."""
    if isinstance(vol, (str, os.PathLike)):
        return os.fspath(vol)
    spec = getattr(vol, "spec", None)
    return getattr(spec, "text", None) or repr(vol)
