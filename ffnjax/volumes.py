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

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

SUPPORTED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32",
                    "uint64", "int64", "float32", "float64")
# neuroglancer_precomputed has no 64-bit signed ints or doubles.
PRECOMPUTED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "float32")
DEFAULT_CHUNK = 64

_H5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_FORMATS_HELP = ("use 'path.zarr', 'path.n5', 'precomputed://path', 'file.h5:dataset', "
                 "'file.npz:key', 'file.npy' or a TensorStore JSON spec")


# ----------------------------------------------------------------------------
# Spec parsing


@dataclasses.dataclass(frozen=True)
class VolumeSpec:
    """A parsed volume spec.

    Attributes:
      kind: 'zarr' (zarr v3 or v2, decided on open), 'n5', 'precomputed',
        'tensorstore' (a full JSON spec), 'h5', 'npz' or 'npy'.
      path: the local path or kvstore URL ('' for a JSON spec).
      key: the HDF5 dataset or npz key ('' when none).
      ts_spec: the TensorStore JSON spec for a 'tensorstore' kind (else None).
      text: the spec as the user wrote it, for error messages.
    """

    kind: str
    path: str = ""
    key: str = ""
    ts_spec: dict | None = None
    text: str = ""

    @property
    def is_import(self) -> bool:
        """True for the read-only import formats (h5, npz, npy)."""
        return self.kind in ("h5", "npz", "npy")

    @property
    def driver(self) -> str:
        """The TensorStore driver family ('' for imports)."""
        if self.kind == "tensorstore":
            return str(self.ts_spec.get("driver", ""))
        return {"zarr": "zarr3", "n5": "n5", "precomputed": "neuroglancer_precomputed"}.get(self.kind, "")


def parse_spec(spec: str | os.PathLike | dict | VolumeSpec) -> VolumeSpec:
    """Classifies a volume spec without touching the disk.

    Args:
      spec: a short string ('x.zarr', 'x.n5', 'precomputed://x',
        'f.h5:dataset', 'f.npz:key', 'f.npy'), a path object, a TensorStore
        JSON spec (dict or JSON string starting with '{'), or a VolumeSpec.

    Returns:
      A VolumeSpec.

    Raises:
      ValueError: naming the spec when its format cannot be told or the JSON
        is malformed.
    """
    if isinstance(spec, VolumeSpec):
        return spec
    if isinstance(spec, dict):
        if "driver" not in spec:
            raise ValueError(f"TensorStore spec {spec!r} has no 'driver' field")
        return VolumeSpec("tensorstore", ts_spec=dict(spec), text=json.dumps(spec))
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise ValueError(f"volume spec must be a string, path or dict, got {type(spec).__name__}: {spec!r}")
    text = spec.strip()
    if not text:
        raise ValueError(f"empty volume spec; {_FORMATS_HELP}")
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"volume spec {text!r} is not valid JSON: {e}") from e
        if not isinstance(d, dict) or "driver" not in d:
            raise ValueError(f"TensorStore spec {text!r} must be a JSON object with a 'driver' field")
        return VolumeSpec("tensorstore", ts_spec=d, text=text)
    if text.startswith("precomputed://"):
        path = text[len("precomputed://"):]
        if not path:
            raise ValueError(f"volume spec {text!r} names no path after 'precomputed://'")
        return VolumeSpec("precomputed", path=path, text=text)
    stripped = text.rstrip("/")
    low = stripped.lower()
    if low.endswith(".zarr"):
        return VolumeSpec("zarr", path=stripped, text=text)
    if low.endswith(".n5"):
        return VolumeSpec("n5", path=stripped, text=text)
    if low.endswith(".npy"):
        return VolumeSpec("npy", path=stripped, text=text)
    if low.endswith(".npz"):
        return VolumeSpec("npz", path=stripped, text=text)
    if low.endswith(_H5_SUFFIXES):
        raise ValueError(f"volume spec {text!r} names an HDF5 file but no dataset; "
                         "write it as 'file.h5:dataset'")
    # file.h5:dataset / file.npz:key -- split at the last ':' whose left side is such a file.
    for i in range(len(text) - 1, 0, -1):
        if text[i] != ":":
            continue
        left, key = text[:i], text[i + 1:]
        if left.lower().endswith(_H5_SUFFIXES):
            if not key.strip("/"):
                raise ValueError(f"volume spec {text!r} names an empty HDF5 dataset")
            return VolumeSpec("h5", path=left, key=key, text=text)
        if left.lower().endswith(".npz"):
            if not key:
                raise ValueError(f"volume spec {text!r} names an empty npz key")
            return VolumeSpec("npz", path=left, key=key, text=text)
    raise ValueError(f"cannot tell the format of volume spec {text!r}; {_FORMATS_HELP}")


# ----------------------------------------------------------------------------
# Small validators


def _check_dtype(dtype: Any, where: str, allowed: Sequence[str] = SUPPORTED_DTYPES) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"{where}: unsupported dtype {dtype!r}; supported: {list(allowed)}") from e
    if dt.name not in allowed:
        raise ValueError(f"{where}: unsupported dtype {dt.name!r}; supported: {list(allowed)}")
    return dt


def _triple(name: str, value: Any, *, kind=int, positive: bool = False,
            nonneg: bool = False) -> tuple:
    try:
        t = tuple(value)
    except TypeError as e:
        raise ValueError(f"{name} must be three numbers z,y,x, got {value!r}") from e
    if len(t) != 3:
        raise ValueError(f"{name} must be three numbers z,y,x, got {value!r}")
    try:
        if kind is int:
            if any(float(v) != int(v) for v in t):
                raise ValueError
            t = tuple(int(v) for v in t)
        else:
            t = tuple(float(v) for v in t)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be three {'integers' if kind is int else 'numbers'} z,y,x, "
                         f"got {value!r}") from e
    if positive and any(v <= 0 for v in t):
        raise ValueError(f"{name} must be positive, got {t}")
    if nonneg and any(v < 0 for v in t):
        raise ValueError(f"{name} must be non-negative, got {t}")
    return t


def default_chunks(shape: Sequence[int], voxel_size: Sequence[float] = (1, 1, 1),
                   base: int = DEFAULT_CHUNK) -> tuple[int, int, int]:
    """Chunk shape z,y,x for EM: about `base` voxels along the finest axis and
    proportionally fewer along coarser ones (so a chunk is roughly isotropic
    in nm), clipped to the volume."""
    finest = min(voxel_size)
    return tuple(int(max(1, min(s, round(base * finest / v)))) for s, v in zip(shape, voxel_size))


def _is_url(path: str) -> bool:
    return "://" in path


def _kvstore(path: str) -> Any:
    if _is_url(path):
        return path if path.endswith("/") else path + "/"
    return {"driver": "file", "path": str(Path(path).expanduser().resolve()) + "/"}


def _kv_read_json(kvstore: Any, key: str) -> dict | None:
    """Reads a small JSON file beside a TensorStore array (None if absent)."""
    try:
        kv = ts.KvStore.open(kvstore).result()
        r = kv.read(key).result()
    except Exception:  # noqa: BLE001 - an unreadable sidecar only loses metadata
        return None
    if r.state != "value":
        return None
    try:
        return json.loads(bytes(r.value).decode())
    except (ValueError, UnicodeDecodeError):
        return None


# ----------------------------------------------------------------------------
# The Volume object


class Volume:
    """A 3D (optionally multi-channel) volume in z,y,x order.

    Do not construct directly: use `open_volume` or `create_volume`.

    Attributes:
      spec: the VolumeSpec it was opened from.
      shape: (z, y, x) size in voxels (channels not included).
      dtype: NumPy dtype of the voxels.
      voxel_size: (z, y, x) voxel size in nm (floats).
      offset: (z, y, x) position of voxel (0,0,0), in voxels.
      num_channels: the size of the trailing channel axis, or None when the
        volume has none.
      chunks: (z, y, x) storage chunk shape (align blockwise work to it).
      writable: whether `write` is allowed.
      store: the TensorStore view in z,y,x[,c] order (None for h5/npz/npy
        imports), for callers that want asynchronous I/O.
    """

    def __init__(self, spec: VolumeSpec, array: Any, *, voxel_size, offset,
                 channels: bool, chunks, writable: bool, closer=None):
        self.spec = spec
        self._array = array
        self._is_ts = isinstance(array, ts.TensorStore)
        full = tuple(int(s) for s in array.shape)
        self.shape: tuple[int, int, int] = full[:3]  # type: ignore[assignment]
        self.num_channels: int | None = full[3] if channels else None
        self.dtype = np.dtype(array.dtype.numpy_dtype if self._is_ts else array.dtype)
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.offset = tuple(int(v) for v in offset)
        self.chunks = tuple(int(c) for c in chunks[:3])
        self.writable = writable
        self._closer = closer

    @property
    def store(self) -> ts.TensorStore | None:
        return self._array if self._is_ts else None

    @property
    def ndim(self) -> int:
        """3, or 4 with a channel axis."""
        return 3 if self.num_channels is None else 4

    def __repr__(self) -> str:
        ch = "" if self.num_channels is None else f", channels={self.num_channels}"
        return (f"Volume({self.spec.text!r}, shape={self.shape}{ch}, dtype={self.dtype.name}, "
                f"voxel_size={self.voxel_size}, offset={self.offset})")

    def _box(self, start: Any, size: Any) -> tuple[slice, slice, slice]:
        start = _triple("start", start, nonneg=False)
        size = _triple("size", self.shape if size is None else size)
        if any(s <= 0 for s in size):
            raise ValueError(f"box size must be positive, got size={size} for volume {self.spec.text!r}")
        if any(a < 0 for a in start) or any(a + s > n for a, s, n in zip(start, size, self.shape)):
            raise ValueError(
                f"box start={start} size={size} (end={tuple(a + s for a, s in zip(start, size))}) "
                f"lies outside volume {self.spec.text!r} of shape {self.shape} (z,y,x)")
        return tuple(slice(a, a + s) for a, s in zip(start, size))  # type: ignore[return-value]

    def read(self, start: Sequence[int] = (0, 0, 0), size: Sequence[int] | None = None) -> np.ndarray:
        """Reads the box [start, start + size) (z,y,x) into a NumPy array.

        Args:
          start: first voxel z,y,x (0-based, ignoring `offset`).
          size: box size z,y,x; None reads to the end of the volume.

        Returns:
          An array of shape size (plus the channel axis when present).

        Raises:
          ValueError: naming the box and the volume shape when the box is not
            entirely inside the volume.
        """
        if size is None:
            start = _triple("start", start, nonneg=True)
            size = tuple(n - a for n, a in zip(self.shape, start))
        box = self._box(start, size)
        if self._is_ts:
            return np.asarray(self._array[box].read().result())
        return np.asarray(self._array[box])

    def write(self, start: Sequence[int], array: np.ndarray) -> None:
        """Writes `array` (z,y,x[,c]) at `start`, after checking everything first.

        Integer arrays of another integer type are accepted when every value
        fits; float arrays are never silently truncated into integer volumes.

        Raises:
          ValueError: naming the problem (read-only volume, wrong number of
            axes or channels, box outside the volume, values that do not fit
            the dtype); nothing is written then.
        """
        if not self.writable:
            raise ValueError(f"volume {self.spec.text!r} is open read-only; "
                             "open it with mode='r+' (h5/npz/npy imports are always read-only)")
        array = np.asarray(array)
        if array.ndim != self.ndim:
            raise ValueError(f"array of shape {array.shape} has {array.ndim} axes but volume "
                             f"{self.spec.text!r} needs {self.ndim} (z,y,x{',c' if self.ndim == 4 else ''})")
        if self.num_channels is not None and array.shape[3] != self.num_channels:
            raise ValueError(f"array has {array.shape[3]} channels but volume {self.spec.text!r} "
                             f"has {self.num_channels}")
        box = self._box(start, array.shape[:3])
        array = _cast_for_write(array, self.dtype, self.spec.text)
        self._array[box].write(array).result()

    def close(self) -> None:
        """Releases an open HDF5 file (a no-op otherwise)."""
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cast_for_write(array: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    if array.dtype == dtype:
        return array
    src = array.dtype
    if src.kind == "b":
        return array.astype(dtype)
    if src.kind in "iu" and dtype.kind in "iu":
        if array.size:
            lo, hi = int(array.min()), int(array.max())
            info = np.iinfo(dtype)
            if lo < info.min or hi > info.max:
                raise ValueError(f"values in [{lo}, {hi}] do not fit dtype {dtype.name} of volume {where!r}")
        return array.astype(dtype)
    if src.kind in "iuf" and dtype.kind == "f":
        return array.astype(dtype)
    raise ValueError(f"cannot write {src.name} data into {dtype.name} volume {where!r} without "
                     "loss; cast it explicitly first")


# ----------------------------------------------------------------------------
# Opening


def open_volume(spec: str | os.PathLike | dict | VolumeSpec, mode: str = "r") -> Volume:
    """Opens an existing volume.

    Args:
      spec: see `parse_spec`.
      mode: 'r' (read-only) or 'r+' (read and write; TensorStore formats only).

    Returns:
      A Volume in z,y,x order.

    Raises:
      FileNotFoundError: naming the path when it does not exist.
      ValueError: for a bad spec or mode, a missing dataset/key, an array that
        is not 3D (or 4D with channels last), or an unsupported dtype.
    """
    if mode not in ("r", "r+"):
        raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
    vs = parse_spec(spec)
    if vs.is_import:
        if mode != "r":
            raise ValueError(f"{vs.kind} import {vs.text!r} is read-only; convert it to .zarr to write")
        return _open_import(vs)
    return _open_ts(vs, mode)


def _require_exists(path: str, what: str) -> None:
    if not _is_url(path) and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"{what} not found: {path}")


def _check_array(vs: VolumeSpec, shape: Sequence[int], dtype: Any) -> None:
    if len(shape) not in (3, 4):
        raise ValueError(f"volume {vs.text!r} has shape {tuple(shape)}: expected 3 axes z,y,x "
                         "(or 4 with a trailing channel axis)")
    _check_dtype(dtype, f"volume {vs.text!r}")


def _open_import(vs: VolumeSpec) -> Volume:
    _require_exists(vs.path, f"{vs.kind} file")
    closer = None
    voxel_size, offset = (1.0, 1.0, 1.0), (0, 0, 0)
    if vs.kind == "npy":
        arr = np.load(vs.path, mmap_mode="r", allow_pickle=False)
    elif vs.kind == "npz":
        with np.load(vs.path, allow_pickle=False) as z:
            keys = list(z.keys())
            key = vs.key
            if not key:
                if len(keys) != 1:
                    raise ValueError(f"{vs.path} holds arrays {keys}; name one as '{vs.path}:KEY'")
                key = keys[0]
            if key not in keys:
                raise ValueError(f"npz key {key!r} not in {vs.path}; it holds {keys}")
            arr = z[key]
    else:
        import h5py
        f = h5py.File(vs.path, "r")
        if vs.key not in f or not isinstance(f[vs.key], h5py.Dataset):
            names: list[str] = []
            f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
            f.close()
            raise ValueError(f"HDF5 dataset {vs.key!r} not in {vs.path}; datasets: {names}")
        arr = f[vs.key]
        attrs = dict(arr.attrs)
        vs_attr = attrs.get("voxel_size", attrs.get("resolution"))
        if vs_attr is not None and np.size(vs_attr) == 3:
            voxel_size = tuple(float(v) for v in np.ravel(vs_attr))
        if "offset" in attrs and np.size(attrs["offset"]) == 3:
            off = np.ravel(attrs["offset"]).astype(float)
            # CREMI convention: 'resolution' comes with an offset in nm.
            if "resolution" in attrs and "voxel_size" not in attrs:
                off = off / np.asarray(voxel_size)
            offset = tuple(int(round(v)) for v in off)
        closer = f.close
    try:
        _check_array(vs, arr.shape, arr.dtype)
    except ValueError:
        if closer:
            closer()
        raise
    chunks = getattr(arr, "chunks", None) or arr.shape
    return Volume(vs, arr, voxel_size=voxel_size, offset=offset, channels=arr.ndim == 4,
                  chunks=chunks, writable=False, closer=closer)


def _zarr_version(path: str) -> int:
    """3 or 2 for an existing local zarr array (URLs: try v3 first)."""
    if _is_url(path):
        return 2 if _kv_read_json(_kvstore(path), ".zarray") is not None else 3
    p = Path(path).expanduser()
    if (p / "zarr.json").exists():
        return 3
    if (p / ".zarray").exists():
        return 2
    raise ValueError(f"{path} is not a zarr array (no zarr.json or .zarray inside)")


def _short_ts_spec(vs: VolumeSpec) -> dict:
    if vs.kind == "zarr":
        return {"driver": "zarr3" if _zarr_version(vs.path) == 3 else "zarr", "kvstore": _kvstore(vs.path)}
    if vs.kind == "n5":
        return {"driver": "n5", "kvstore": _kvstore(vs.path)}
    if vs.kind == "precomputed":
        return {"driver": "neuroglancer_precomputed", "kvstore": _kvstore(vs.path)}
    return dict(vs.ts_spec)


def _to_zyx(store: ts.TensorStore, driver: str) -> tuple[ts.TensorStore, bool]:
    """The store as z,y,x[,c] with a 0-based domain; returns (view, has_channels)."""
    if driver == "neuroglancer_precomputed":
        store = store[ts.d["z", "y", "x", "channel"].transpose[:]]
        if store.shape[3] == 1:
            store = store[ts.d["channel"][store.domain[3].inclusive_min]]
    elif driver == "n5":
        store = store.T  # N5 lists dimensions x,y,z (fastest first).
    store = store.translate_to[(0,) * store.rank]
    return store, store.rank == 4


def _ts_error(vs: VolumeSpec, e: Exception) -> Exception:
    msg = str(e)
    if "NOT_FOUND" in msg:
        return FileNotFoundError(f"volume {vs.text!r} not found: {msg.splitlines()[0]}")
    return ValueError(f"cannot open volume {vs.text!r}: {msg.splitlines()[0]}")


def _open_ts(vs: VolumeSpec, mode: str) -> Volume:
    if vs.kind != "tensorstore":
        _require_exists(vs.path, f"{vs.kind} volume")
    spec = _short_ts_spec(vs)
    driver = spec.get("driver", "")
    try:
        raw = ts.open(spec, read=True, write=(mode == "r+")).result()
    except Exception as e:  # noqa: BLE001 - TensorStore raises ValueError/others with a status text
        raise _ts_error(vs, e) from e
    view, channels = _to_zyx(raw, driver)
    _check_array(vs, view.shape, view.dtype.numpy_dtype)
    voxel_size, offset = _read_geometry(raw, spec, driver)
    chunks = view.chunk_layout.read_chunk.shape or view.shape
    return Volume(vs, view, voxel_size=voxel_size, offset=offset, channels=channels,
                  chunks=chunks, writable=(mode == "r+"))


def _read_geometry(raw: ts.TensorStore, spec: dict, driver: str):
    """voxel_size (nm) and offset (voxels), both z,y,x, from the stored metadata."""
    voxel_size, offset = (1.0, 1.0, 1.0), (0, 0, 0)
    meta = raw.spec().to_json().get("metadata", {})
    if driver == "neuroglancer_precomputed":
        sm = raw.spec().to_json().get("scale_metadata", {})
        voxel_size = tuple(float(v) for v in sm.get("resolution", (1, 1, 1)))[::-1]
        offset = tuple(int(v) for v in sm.get("voxel_offset", (0, 0, 0)))[::-1]
        return voxel_size, offset
    if driver == "zarr3":
        attrs = meta.get("attributes", {}) or {}
        reverse = False
    elif driver == "zarr":
        attrs = _kv_read_json(spec["kvstore"], ".zattrs") or {}
        reverse = False
    elif driver == "n5":
        attrs = _kv_read_json(spec["kvstore"], "attributes.json") or {}
        attrs = {"voxel_size": attrs.get("resolution"), "offset": attrs.get("offset")}
        reverse = True
    else:
        return voxel_size, offset
    # Stored lists follow the on-disk axis order (x,y,z[,c] reversed for N5);
    # bring them to z,y,x[,c] and keep the spatial part.
    v, o = attrs.get("voxel_size") or attrs.get("resolution"), attrs.get("offset")
    if isinstance(v, list) and len(v) >= 3:
        voxel_size = tuple(float(x) for x in (v[::-1] if reverse else v)[:3])
    if isinstance(o, list) and len(o) >= 3:
        offset = tuple(int(round(float(x))) for x in (o[::-1] if reverse else o)[:3])
    return voxel_size, offset


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
    shape = _triple("shape", shape, positive=True)
    voxel_size = _triple("voxel_size", voxel_size, kind=float, positive=True)
    offset = _triple("offset", offset)
    chunks = default_chunks(shape, voxel_size) if chunks is None else _triple("chunks", chunks, positive=True)
    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    if channels is not None and (int(channels) != channels or channels < 1):
        raise ValueError(f"channels must be a positive integer or None, got {channels!r}")
    driver = vs.driver
    allowed = PRECOMPUTED_DTYPES if driver == "neuroglancer_precomputed" else SUPPORTED_DTYPES
    dt = _check_dtype(dtype, f"creating {vs.text!r}", allowed)
    if vs.kind == "tensorstore":
        if "kvstore" not in vs.ts_spec:
            raise ValueError(f"TensorStore spec {vs.text!r} has no 'kvstore' to create the volume in")
        base = dict(vs.ts_spec)
        kvstore = base["kvstore"]
    else:
        kvstore = _kvstore(vs.path)
        base = {"driver": driver, "kvstore": kvstore}
    meta = _create_metadata(driver, shape, dt, chunks, voxel_size, offset, channels)
    for k, v in meta.items():
        base[k] = {**v, **base.get(k, {})}
    local = None if vs.kind == "tensorstore" or _is_url(vs.path) else vs.path
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
    view, has_channels = _to_zyx(raw, driver)
    return Volume(vs, view, voxel_size=voxel_size, offset=offset, channels=has_channels,
                  chunks=chunks, writable=True)


# ----------------------------------------------------------------------------
# The read grammar: boxes and stacking

_BOX = re.compile(r"^(.*)@(\d*:\d*),(\d*:\d*),(\d*:\d*)$")


def read_spec(spec: str | os.PathLike | dict | VolumeSpec) -> np.ndarray:
    """Reads a volume into memory, with a small grammar on top of `parse_spec`.

    * ``SPEC`` -- the whole volume (anything `open_volume` opens).
    * ``SPEC@z0:z1,y0:y1,x0:x1`` -- only that box, Python slice syntax per axis
      with non-negative bounds (an empty bound is the volume's edge);
      e.g. ``labels.npz:labels@0:100,:,:``.
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
    if not isinstance(text, str) or text.lstrip().startswith("{"):
        return _read_box(text, None)
    if "+" in text:
        parts = [read_spec(part) for part in text.split("+")]
        if len({p.shape[1:] for p in parts}) != 1:
            raise ValueError(f"cannot stack {text!r} along z: y,x(,c) shapes differ "
                             f"{[p.shape for p in parts]}")
        return np.concatenate(parts, axis=0)
    m = _BOX.match(text)
    return _read_box(m.group(1), m.groups()[1:]) if m else _read_box(text, None)


def _uses_grammar(spec: Any) -> bool:
    """True for a string spec with a box suffix or '+' stacking (`read_spec`)."""
    return (isinstance(spec, str) and not spec.lstrip().startswith("{")
            and ("+" in spec or _BOX.match(spec) is not None))


def _box_start_size(box: Sequence[str], shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, size) z,y,x of the box 'a:b' strings inside `shape` (slice rules).

    Raises ValueError when the box is empty or outside the volume."""
    sl = [slice(*[int(v) if v else None for v in r.split(":")]) for r in box]
    rng = [range(n)[s] for s, n in zip(sl, shape)]
    if any(len(r) == 0 or r.step != 1 for r in rng):
        raise ValueError(f"box {tuple(box)} is empty or outside the volume of shape {tuple(shape)}")
    return tuple(r.start for r in rng), tuple(len(r) for r in rng)


def _read_box(spec: str | dict | VolumeSpec, box: Sequence[str] | None) -> np.ndarray:
    """The whole volume `spec`, or its `box`; any failure names the spec."""
    try:
        with open_volume(spec) as vol:
            shape = tuple(vol.shape[:3])
            start, size = ((0, 0, 0), shape) if box is None else _box_start_size(box, shape)
            return np.asarray(vol.read(start, size))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"cannot read volume spec {spec!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 -- any reader failure becomes a message naming the spec
        raise ValueError(f"cannot read volume spec {spec!r}: {e}") from e


# ----------------------------------------------------------------------------
# Conveniences


def read_all(spec: str | os.PathLike | dict | VolumeSpec) -> np.ndarray:
    """The whole volume as a NumPy array (z,y,x[,c]); for small volumes. A
    string spec may use `read_spec`'s box (``@z0:z1,y0:y1,x0:x1``) and
    stacking (``A+B``) grammar."""
    if _uses_grammar(spec):
        return read_spec(spec)
    with open_volume(spec) as vol:
        return vol.read()


def as_array(data: Any) -> np.ndarray:
    """A NumPy array from an array, a Volume, or a volume spec."""
    if isinstance(data, Volume):
        return data.read()
    if isinstance(data, (str, os.PathLike, dict, VolumeSpec)):
        return read_all(data)
    return np.asarray(data)


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
    shape, block = _triple("shape", shape, positive=True), _triple("block", block, positive=True)
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
    from tqdm import tqdm

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


def volume_info(spec: str | os.PathLike | dict | VolumeSpec) -> dict:
    """Shape, dtype, voxel size, offset, channels and chunks of a volume, as a dict."""
    with open_volume(spec) as vol:
        return {"spec": vol.spec.text, "shape": list(vol.shape), "dtype": vol.dtype.name,
                "voxel_size": list(vol.voxel_size), "offset": list(vol.offset),
                "channels": vol.num_channels, "chunks": list(vol.chunks),
                "nbytes": int(math.prod(vol.shape) * (vol.num_channels or 1) * vol.dtype.itemsize)}
