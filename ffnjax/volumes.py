"""3D volumes on disk through TensorStore, always z,y,x in memory.

One small interface for every image or segmentation the library reads or
writes::

    vol = open_volume("out/seg.zarr")            # read-only by default
    vol.shape, vol.dtype, vol.voxel_size, vol.offset
    block = vol.read((0, 0, 0), (32, 64, 64))    # z,y,x start and size
    out = create_volume("out/new.zarr", (64, 128, 128), "uint64",
                        voxel_size=(40, 8, 8))
    out.write((0, 0, 0), labels)

Volume specs (`parse_spec` tells which one a string is):

* ``path.zarr`` -- zarr; new volumes are zarr v3, existing zarr v2 arrays open too.
* ``path.n5`` -- N5.
* ``precomputed://path`` -- neuroglancer_precomputed (``precomputed://gs://...``
  and other TensorStore kvstore URLs work too).
* ``file.h5:dataset`` (also ``.hdf5``/``.hdf``), ``file.npz:key``, ``file.npy``
  -- read-only import of arrays. ``file.npz`` without a key works when the
  archive holds exactly one array.
* a full TensorStore JSON spec, as a dict or a JSON string.

Whole-array reads (`read_spec`, `read_all`) also take ``SPEC@z0:z1,y0:y1,x0:x1``
(only that box) and ``SPEC1+SPEC2`` (stacked along z).

This module is the front: every public name lives here. Underneath, the
library is cut in three, one concept each:

* `ffnjax.volume_spec` -- what a spec string says (`VolumeSpec`,
  `parse_spec`, the box and stacking grammar); pure, no I/O.
* `ffnjax.volume_store` -- the `Volume` handle and `open_volume`: reading and
  writing boxes of existing volumes, their on-disk axis order and geometry.
* this module -- creating volumes (`create_volume`, `save_volume`,
  `copy_volume`) and whole-array reads with the grammar (`read_spec`,
  `read_all`).

Axis conventions. Inside ffnjax every array is z,y,x (with an optional trailing
channel axis: z,y,x,c). neuroglancer_precomputed stores x,y,z,channel and N5 by
convention lists its dimensions x,y,z (fastest first); this module transposes
at that edge so callers never see the on-disk order. zarr is stored z,y,x as is.

Geometry. ``voxel_size`` is the physical size of a voxel in nm (z,y,x) and
``offset`` is the position of voxel (0,0,0) in voxels (z,y,x) in a larger
volume; both are stored with the data (zarr attributes ``voxel_size`` /
``offset``; N5 ``resolution`` / ``offset`` in x,y,z like the N5 viewer; the
native ``resolution`` / ``voxel_offset`` of precomputed) and read back.
``read``/``write`` coordinates always count from the volume's first voxel
(0-based), whatever the offset.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorstore as ts
from tqdm import tqdm

from ffnjax.volume_spec import VolumeSpec, clipped_box, is_json_spec, parse_spec, split_box, uses_grammar
from ffnjax.volume_store import (DEFAULT_CHUNK, PRECOMPUTED_DTYPES, SUPPORTED_DTYPES, Volume, check_dtype,
                                 default_chunks, is_url, kvstore_spec, nonfinite_box, open_volume,
                                 require_finite, to_zyx, zyx_triple)

__all__ = ["DEFAULT_CHUNK", "PRECOMPUTED_DTYPES", "SUPPORTED_DTYPES", "Volume", "VolumeSpec",
           "copy_volume", "create_volume", "default_chunks", "iter_blocks", "nonfinite_box",
           "open_input", "open_volume", "parse_spec", "read_all", "read_spec", "require_finite", "save_volume"]


# ----------------------------------------------------------------------------
# Creating


def _zarr3_codecs(dtype: np.dtype) -> list[dict]:
    # blosc/zstd: fast and compresses EM well; bit-shuffle suits sparse label ids.
    shuffle = "bitshuffle" if dtype.itemsize >= 4 and dtype.kind in "iu" else "shuffle"
    return [{"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 5, "shuffle": shuffle}}]


def _create_metadata(driver: str, shape, dtype: np.dtype, chunks, voxel_size, offset,
                     channels: int | None) -> dict:
    """Driver-specific TensorStore metadata for a new z,y,x[,c] volume."""
    full = list(shape) + ([channels] if channels else [])
    full_chunks = list(chunks) + ([channels] if channels else [])
    if driver == "zarr3":
        return {"metadata": {
            "shape": full, "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": full_chunks}},
            "codecs": _zarr3_codecs(dtype),
            "dimension_names": ["z", "y", "x"] + (["c"] if channels else []),
            "attributes": {"voxel_size": list(voxel_size), "offset": list(offset),
                           "axes": ["z", "y", "x"] + (["c"] if channels else [])},
        }}
    if driver == "n5":
        return {"metadata": {
            "dimensions": full[::-1], "blockSize": full_chunks[::-1], "dataType": dtype.name,
            "compression": {"type": "gzip", "level": 5},
            # N5 viewer convention: x,y,z order like the dimensions (channel first).
            "resolution": ([1] if channels else []) + list(voxel_size)[::-1],
            "offset": ([0] if channels else []) + list(offset)[::-1],
            "units": ([""] if channels else []) + ["nm"] * 3,
        }}
    if driver == "neuroglancer_precomputed":
        seg = dtype.name in ("uint32", "uint64")
        scale = {"size": list(shape)[::-1], "resolution": list(voxel_size)[::-1],
                 "voxel_offset": list(offset)[::-1], "chunk_size": list(chunks)[::-1],
                 "encoding": "compressed_segmentation" if seg else "raw"}
        if seg:
            scale["compressed_segmentation_block_size"] = [8, 8, 8]
        return {"multiscale_metadata": {"type": "segmentation" if seg else "image",
                                        "data_type": dtype.name, "num_channels": channels or 1},
                "scale_metadata": scale}
    raise ValueError(f"cannot create a volume with TensorStore driver {driver!r}; "
                     "supported: zarr3, n5, neuroglancer_precomputed")


def _remove(path: str) -> None:
    p = Path(path).expanduser()
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def create_volume(spec: str | os.PathLike | dict, shape: Sequence[int], dtype: Any, *,
                  chunks: Sequence[int] | None = None,
                  voxel_size: Sequence[float] = (1, 1, 1),
                  offset: Sequence[int] = (0, 0, 0),
                  channels: int | None = None,
                  overwrite: bool = False) -> Volume:
    """Creates a new volume filled with zeros and opens it for writing.

    Args:
      spec: 'x.zarr' (zarr v3), 'x.n5', 'precomputed://x', or a TensorStore
        JSON spec with one of those drivers and a kvstore (its own 'metadata'
        entries override the defaults chosen here).
      shape: size z,y,x.
      dtype: one of SUPPORTED_DTYPES (uint8 for images, uint64 or uint32 for
        segmentations are the usual choices; precomputed stores uint32/uint64
        as a compressed 'segmentation' layer).
      chunks: chunk shape z,y,x; default `default_chunks(shape, voxel_size)`.
      voxel_size: nm per voxel, z,y,x; stored as metadata.
      offset: position of voxel (0,0,0) in voxels, z,y,x; stored as metadata.
      channels: size of a trailing channel axis (None: no channel axis).
      overwrite: replace an existing volume at the path (else it is an error).

    Returns:
      The new Volume, open with mode 'r+'.

    Raises:
      ValueError: for an import spec, bad shape/chunks/dtype/voxel_size.
      FileExistsError: when something exists at the path and overwrite is False.
    """
    vs = parse_spec(spec)
    if vs.is_import:
        raise ValueError(f"{vs.text!r} is a read-only {vs.kind} import; create a .zarr, .n5 or "
                         "precomputed:// volume instead")
    if isinstance(shape, (int, np.integer)) or len(tuple(shape)) != 3:
        raise ValueError(f"shape must be three positive integers z,y,x, got {shape!r} "
                         "(use channels=C for a channel axis)")
    shape = zyx_triple("shape", shape, positive=True)
    voxel_size = zyx_triple("voxel_size", voxel_size, kind=float, positive=True)
    offset = zyx_triple("offset", offset)
    chunks = default_chunks(shape, voxel_size) if chunks is None else zyx_triple("chunks", chunks, positive=True)
    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    if channels is not None and (int(channels) != channels or channels < 1):
        raise ValueError(f"channels must be a positive integer or None, got {channels!r}")
    driver = vs.driver
    allowed = PRECOMPUTED_DTYPES if driver == "neuroglancer_precomputed" else SUPPORTED_DTYPES
    dt = check_dtype(dtype, f"creating {vs.text!r}", allowed)
    if vs.kind == "tensorstore":
        if "kvstore" not in vs.ts_spec:
            raise ValueError(f"TensorStore spec {vs.text!r} has no 'kvstore' to create the volume in")
        base = dict(vs.ts_spec)
        kvstore = base["kvstore"]
    else:
        kvstore = kvstore_spec(vs.path)
        base = {"driver": driver, "kvstore": kvstore}
    meta = _create_metadata(driver, shape, dt, chunks, voxel_size, offset, channels)
    for k, v in meta.items():
        base[k] = {**v, **base.get(k, {})}
    local = None if vs.kind == "tensorstore" or is_url(vs.path) else vs.path
    if local is not None and Path(local).expanduser().exists():
        if not overwrite:
            raise FileExistsError(f"{local} already exists; pass overwrite=True to replace it")
        _remove(local)
    try:
        raw = ts.open(base, create=True, delete_existing=overwrite and local is None).result()
    except Exception as e:  # noqa: BLE001
        if "ALREADY_EXISTS" in str(e):
            raise FileExistsError(f"volume {vs.text!r} already exists; pass overwrite=True") from e
        raise ValueError(f"cannot create volume {vs.text!r}: {str(e).splitlines()[0]}") from e
    view, has_channels = to_zyx(raw, driver)
    return Volume(vs, view, voxel_size=voxel_size, offset=offset, channels=has_channels,
                  chunks=chunks, writable=True)


# ----------------------------------------------------------------------------
# The read grammar: boxes and stacking


def read_spec(spec: str | os.PathLike | dict | VolumeSpec) -> np.ndarray:
    """Reads a volume into memory, with a small grammar on top of `parse_spec`.

    * ``SPEC`` -- the whole volume (anything `open_volume` opens).
    * ``SPEC@z0:z1,y0:y1,x0:x1`` -- only that box, Python slice syntax per axis
      with non-negative bounds (an empty bound is the volume's edge, an end
      past it stops there); e.g. ``labels.npz:labels@0:100,:,:``. The box is
      read by `ffnjax.volume_spec.parse_box`, the parser of every ``--box``.
    * ``SPEC1+SPEC2+...`` -- the parts concatenated along z (e.g. a stack split
      into files); each part may carry its own box, and their y,x(,c) shapes
      must agree.

    A TensorStore JSON spec (a dict, or a string starting with '{') is read
    whole, without the grammar.

    Raises:
      FileNotFoundError / ValueError: naming the (part of the) spec that
        cannot be read, an empty or outside box, or parts that do not stack.
    """
    text = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    if not isinstance(text, str) or is_json_spec(text):
        return _read_box(text, None)
    if "+" in text:
        parts = [read_spec(part) for part in text.split("+")]
        if len({p.shape[1:] for p in parts}) != 1:
            raise ValueError(f"cannot stack {text!r} along z: y,x(,c) shapes differ "
                             f"{[p.shape for p in parts]}")
        return np.concatenate(parts, axis=0)
    return _read_box(*split_box(text))


def _read_box(spec: str | dict | VolumeSpec, box: str | None) -> np.ndarray:
    """The whole volume `spec`, or its `box` (`clipped_box`); any failure names the spec."""
    try:
        with open_volume(spec) as vol:
            shape = tuple(vol.shape[:3])
            start, size = ((0, 0, 0), shape) if box is None else clipped_box(box, shape)
            return np.asarray(vol.read(start, size))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"cannot read volume spec {spec!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 -- any reader failure becomes a message naming the spec
        raise ValueError(f"cannot read volume spec {spec!r}: {e}") from e


# ----------------------------------------------------------------------------
# Conveniences


def open_input(spec: str | os.PathLike | dict | VolumeSpec) -> Volume:
    """A volume to read from, as the commands' input flags take it: `open_volume`,
    or for a string spec in `read_spec`'s grammar (``SPEC@box``, ``A+B``) that
    data read into memory as a read-only Volume. Its offset is the first part's
    stored offset plus that part's box start, its voxel size the first part's,
    so ``raw.npz:raw@100:150,:,:`` lines up with a volume of the whole stack.

    Raises:
      FileNotFoundError / ValueError: as `open_volume` and `read_spec`, naming
        the spec.
    """
    if not uses_grammar(spec):
        return open_volume(spec)
    text = os.fspath(spec)
    data = read_spec(text)
    first, box = split_box(text.split("+")[0])
    with open_volume(first) as vol:
        start = (0, 0, 0) if box is None else clipped_box(box, vol.shape)[0]
        offset = tuple(int(o) + int(a) for o, a in zip(vol.offset, start))
        voxel_size, stored = vol.voxel_size, vol.voxel_size_stored
    return Volume(VolumeSpec(kind="memory", text=text), data, voxel_size=voxel_size,
                  offset=offset, channels=data.ndim == 4, chunks=data.shape[:3], writable=False,
                  voxel_size_stored=stored)


def read_all(spec: str | os.PathLike | dict | VolumeSpec) -> np.ndarray:
    """The whole volume as a NumPy array (z,y,x[,c]); for small volumes. A
    string spec may use `read_spec`'s box (``@z0:z1,y0:y1,x0:x1``) and
    stacking (``A+B``) grammar."""
    if uses_grammar(spec):
        return read_spec(spec)
    with open_volume(spec) as vol:
        return vol.read()


def save_volume(spec: str | os.PathLike | dict, array: np.ndarray, *,
                voxel_size: Sequence[float] = (1, 1, 1), offset: Sequence[int] = (0, 0, 0),
                chunks: Sequence[int] | None = None, overwrite: bool = False) -> Volume:
    """Creates a volume shaped like `array` (z,y,x or z,y,x,c) and writes it.

    Returns the Volume (open 'r+'). Raises like `create_volume`; a 2D or 5D
    array raises ValueError before anything is created.
    """
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise ValueError(f"array of shape {array.shape} is not a 3D volume z,y,x (or z,y,x,c)")
    vol = create_volume(spec, array.shape[:3], array.dtype, chunks=chunks, voxel_size=voxel_size,
                        offset=offset, channels=array.shape[3] if array.ndim == 4 else None,
                        overwrite=overwrite)
    vol.write((0, 0, 0), array)
    return vol


def iter_blocks(shape: Sequence[int], block: Sequence[int]):
    """(start, size) boxes z,y,x tiling `shape` with blocks of `block` (the
    last ones along each axis clipped), in C order."""
    shape, block = zyx_triple("shape", shape, positive=True), zyx_triple("block", block, positive=True)
    for z in range(0, shape[0], block[0]):
        for y in range(0, shape[1], block[1]):
            for x in range(0, shape[2], block[2]):
                start = (z, y, x)
                yield start, tuple(min(b, n - a) for a, b, n in zip(start, block, shape))


def copy_volume(src: str | os.PathLike | dict | VolumeSpec, dst: str | os.PathLike | dict, *,
                chunks: Sequence[int] | None = None, block_bytes: int = 64 << 20,
                overwrite: bool = False, progress: bool = True) -> Volume:
    """Copies a volume into a new one (format conversion, e.g. an h5/npz
    import to zarr or to precomputed for neuroglancer), block by block with a
    progress bar, keeping shape, dtype, channels, voxel size and offset.

    Args:
      src, dst: volume specs; dst must not exist unless overwrite.
      chunks: chunk shape z,y,x of dst (default: `default_chunks`).
      block_bytes: about how much is read and written at once; blocks are
        whole multiples of dst's chunks so no chunk is written twice.
      progress: show a tqdm bar.

    Returns:
      The new Volume, open 'r+'.
    """
    with open_volume(src) as s:
        out = create_volume(dst, s.shape, s.dtype, chunks=chunks, voxel_size=s.voxel_size,
                            offset=s.offset, channels=s.num_channels, overwrite=overwrite)
        item = s.dtype.itemsize * (s.num_channels or 1)
        block = list(out.chunks)
        # Grow the block x, then y, then z, by whole chunks while it fits the budget.
        for ax in (2, 1, 0):
            while block[ax] < s.shape[ax] and math.prod(block) * item * 2 <= block_bytes:
                block[ax] = min(block[ax] * 2, s.shape[ax])
        boxes = list(iter_blocks(s.shape, block))
        for start, size in tqdm(boxes, desc=f"copy to {out.spec.text}", unit="block",
                                disable=not progress or len(boxes) < 2):
            out.write(start, s.read(start, size))
    return out
