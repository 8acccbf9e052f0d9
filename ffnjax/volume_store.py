"""The Volume handle: opening existing volumes and reading and writing boxes.

`open_volume` opens what `ffnjax.volume_spec.parse_spec` names: zarr (v3 or
v2), N5 and neuroglancer_precomputed through TensorStore, and h5/npz/npy as
read-only imports. Every `Volume` is z,y,x[,c] in memory whatever the on-disk
order, and carries its voxel size and offset (read from the stored metadata
here; `ffnjax.volumes.create_volume` writes the same metadata). The
user-facing overview, with examples, is `ffnjax.volumes`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import tensorstore as ts

from ffnjax.volume_spec import VolumeSpec, parse_spec

SUPPORTED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32",
                    "uint64", "int64", "float32", "float64")
# neuroglancer_precomputed has no 64-bit signed ints or doubles.
PRECOMPUTED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "float32")
DEFAULT_CHUNK = 64


# ----------------------------------------------------------------------------
# Small validators


def check_dtype(dtype: Any, where: str, allowed: Sequence[str] = SUPPORTED_DTYPES) -> np.dtype:
    """`dtype` as a NumPy dtype, or a ValueError naming `where` when it is not one of `allowed`."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"{where}: unsupported dtype {dtype!r}; supported: {list(allowed)}") from e
    if dt.name not in allowed:
        raise ValueError(f"{where}: unsupported dtype {dt.name!r}; supported: {list(allowed)}")
    return dt


def zyx_triple(name: str, value: Any, *, kind=int, positive: bool = False,
               nonneg: bool = False) -> tuple:
    """`value` as three ints (or floats: kind=float) z,y,x, or a ValueError naming `name`."""
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


def is_url(path: str) -> bool:
    """True for a kvstore URL (gs://, s3://, memory://, ...), False for a local path."""
    return "://" in path


def kvstore_spec(path: str) -> Any:
    """The TensorStore kvstore of a volume's directory: the URL itself, or a
    'file' driver on the absolute local path."""
    if is_url(path):
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


def nonfinite_box(array: np.ndarray, chunks: Sequence[int] | None = None
                  ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(start, stop) z,y,x of the chunk that holds the first NaN or infinity
    of `array` (in C order), or None when every value is finite.

    Checked slab by slab (one chunk row along z at a time), so the temporary
    mask never exceeds one slab; integer and boolean arrays are finite by
    type and cost nothing.

    Args:
      array: z,y,x[,c].
      chunks: the box grid z,y,x to report in (the volume's storage chunks);
        default 64 voxels along each axis.
    """
    array = np.asarray(array)
    if array.dtype.kind not in "fc" or array.size == 0:
        return None
    chunks = tuple(int(c) for c in (chunks or (DEFAULT_CHUNK,) * 3))[:3]
    for z0 in range(0, array.shape[0], chunks[0]):
        slab = array[z0:z0 + chunks[0]]
        bad = ~np.isfinite(slab)
        if bad.any():
            first = np.unravel_index(int(np.argmax(bad)), bad.shape)
            voxel = (z0 + int(first[0]), int(first[1]), int(first[2]))
            start = tuple(v // c * c for v, c in zip(voxel, chunks))
            stop = tuple(min(a + c, n) for a, c, n in zip(start, chunks, array.shape))
            return start, stop
    return None


def require_finite(array: np.ndarray, what: str, start: Sequence[int] = (0, 0, 0),
                   chunks: Sequence[int] | None = None) -> np.ndarray:
    """`array` as it is when every value is finite (`nonfinite_box`), else a
    ValueError naming `what` (the image's flag and spec) and the first chunk
    box z0:z1,y0:y1,x0:x1 holding a NaN or infinity, in volume coordinates
    (`start` is where `array` was read from; chunk boxes count from it)."""
    box = nonfinite_box(array, chunks)
    if box is None:
        return array
    text = ",".join(f"{a + o}:{b + o}" for a, b, o in zip(*box, start))
    raise ValueError(f"{what} holds NaN or infinite values in box {text} (z,y,x; the first such "
                     "chunk); an image must be finite everywhere: fix or crop it")


# ----------------------------------------------------------------------------
# The Volume object


class Volume:
    """A 3D (optionally multi-channel) volume in z,y,x order.

    Do not construct directly: use `open_volume` or `create_volume`.

    Attributes:
      spec: the VolumeSpec it was opened from.
      shape: (z, y, x) size in voxels (channels not included).
      dtype: NumPy dtype of the voxels.
      voxel_size: (z, y, x) voxel size in nm (floats); (1, 1, 1) when the
        volume stores none (see `voxel_size_stored`).
      voxel_size_stored: whether `voxel_size` was read from the volume's own
        metadata. False for formats that carry none (npy, npz; HDF5 datasets
        and zarr/N5 arrays without a voxel_size/resolution attribute): their
        (1, 1, 1) is a placeholder, not a measurement.
      offset: (z, y, x) position of voxel (0,0,0), in voxels.
      num_channels: the size of the trailing channel axis, or None when the
        volume has none.
      chunks: (z, y, x) storage chunk shape (align blockwise work to it).
      writable: whether `write` is allowed.
      store: the TensorStore view in z,y,x[,c] order (None for h5/npz/npy
        imports), for callers that want asynchronous I/O.
    """

    def __init__(self, spec: VolumeSpec, array: Any, *, voxel_size, offset,
                 channels: bool, chunks, writable: bool, closer=None,
                 voxel_size_stored: bool = True):
        self.spec = spec
        self._array = array
        self._is_ts = isinstance(array, ts.TensorStore)
        full = tuple(int(s) for s in array.shape)
        self.shape: tuple[int, int, int] = full[:3]  # type: ignore[assignment]
        self.num_channels: int | None = full[3] if channels else None
        self.dtype = np.dtype(array.dtype.numpy_dtype if self._is_ts else array.dtype)
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.voxel_size_stored = bool(voxel_size_stored)
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
        start = zyx_triple("start", start, nonneg=False)
        size = zyx_triple("size", self.shape if size is None else size)
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
            start = zyx_triple("start", start, nonneg=True)
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
    if not is_url(path) and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"{what} not found: {path}")


def _check_array(vs: VolumeSpec, shape: Sequence[int], dtype: Any) -> None:
    if len(shape) not in (3, 4):
        raise ValueError(f"volume {vs.text!r} has shape {tuple(shape)}: expected 3 axes z,y,x "
                         "(or 4 with a trailing channel axis)")
    check_dtype(dtype, f"volume {vs.text!r}")


def _open_import(vs: VolumeSpec) -> Volume:
    _require_exists(vs.path, f"{vs.kind} file")
    closer = None
    voxel_size, offset, stored = (1.0, 1.0, 1.0), (0, 0, 0), False
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
            voxel_size, stored = tuple(float(v) for v in np.ravel(vs_attr)), True
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
                  chunks=chunks, writable=False, closer=closer, voxel_size_stored=stored)


def _zarr_version(path: str) -> int:
    """3 or 2 for an existing local zarr array (URLs: try v3 first)."""
    if is_url(path):
        return 2 if _kv_read_json(kvstore_spec(path), ".zarray") is not None else 3
    p = Path(path).expanduser()
    if (p / "zarr.json").exists():
        return 3
    if (p / ".zarray").exists():
        return 2
    raise ValueError(f"{path} is not a zarr array (no zarr.json or .zarray inside)")


def _short_ts_spec(vs: VolumeSpec) -> dict:
    if vs.kind == "zarr":
        return {"driver": "zarr3" if _zarr_version(vs.path) == 3 else "zarr", "kvstore": kvstore_spec(vs.path)}
    if vs.kind == "n5":
        return {"driver": "n5", "kvstore": kvstore_spec(vs.path)}
    if vs.kind == "precomputed":
        return {"driver": "neuroglancer_precomputed", "kvstore": kvstore_spec(vs.path)}
    return dict(vs.ts_spec)


def to_zyx(store: ts.TensorStore, driver: str) -> tuple[ts.TensorStore, bool]:
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
    view, channels = to_zyx(raw, driver)
    _check_array(vs, view.shape, view.dtype.numpy_dtype)
    voxel_size, offset = _read_geometry(raw, spec, driver)
    chunks = view.chunk_layout.read_chunk.shape or view.shape
    return Volume(vs, view, voxel_size=voxel_size or (1.0, 1.0, 1.0), offset=offset,
                  channels=channels, chunks=chunks, writable=(mode == "r+"),
                  voxel_size_stored=voxel_size is not None)


def _read_geometry(raw: ts.TensorStore, spec: dict, driver: str):
    """voxel_size (nm) and offset (voxels), both z,y,x, from the stored metadata;
    voxel_size is None when the metadata holds none."""
    voxel_size, offset = None, (0, 0, 0)
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
