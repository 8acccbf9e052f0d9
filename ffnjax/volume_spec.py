"""What a volume spec string says, read without touching the disk.

Two small grammars, both pure (no I/O, no TensorStore), so that every reader
and every command agrees on them:

* `parse_spec` tells the format of one volume spec: ``path.zarr``, ``path.n5``,
  ``precomputed://path``, ``file.h5:dataset``, ``file.npz:key``, ``file.npy``
  or a TensorStore JSON spec (see `ffnjax.volumes` for what each means).
* The read grammar on top of it (`ffnjax.volumes.read_spec` applies it):
  ``SPEC@z0:z1,y0:y1,x0:x1`` cuts a box and ``SPEC1+SPEC2`` stacks along z.
  `parse_box` is the one parser of the box syntax ``z0:z1,y0:y1,x0:x1``; the
  commands' ``--box`` flag (`experiments._cli`) reads it too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

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
# Boxes and stacking

BOX_SYNTAX = "z0:z1,y0:y1,x0:x1"


def parse_box(text: str, name: str = "box") -> tuple[tuple[int | None, int | None], ...]:
    """'z0:z1,y0:y1,x0:x1' as three (start, stop) pairs; None where an end is left open.

    Python slices without a step, one per axis z,y,x, each end a non-negative
    integer or left open (the volume's face); whitespace is ignored. E.g.
    ``'0:100,:,:'`` is ((0, 100), (None, None), (None, None)).

    Args:
      text: the box.
      name: what the error calls it (a command passes its flag, '--box').

    Raises:
      ValueError: naming `name` and the text when it is not three such slices.
    """
    problem = ValueError(f"{name} must be {BOX_SYNTAX} (non-negative integers, an end may "
                         f"be left open), got {text!r}")
    parts = "".join(text.split()).split(",")
    if len(parts) != 3 or any(p.count(":") != 1 for p in parts):
        raise problem
    pairs = [p.split(":") for p in parts]
    if any(end and not end.isdecimal() for pair in pairs for end in pair):
        raise problem
    return tuple(tuple(int(end) if end else None for end in pair) for pair in pairs)  # type: ignore[return-value]


def split_box(text: str) -> tuple[str, str | None]:
    """('SPEC', 'z0:z1,y0:y1,x0:x1') for 'SPEC@z0:z1,y0:y1,x0:x1', else (text, None).

    Only a valid box after the last '@' counts, so a path that merely holds
    an '@' (``runs/a@b/img.zarr``) stays one spec.
    """
    spec, at, box = text.rpartition("@")
    if not at:
        return text, None
    try:
        parse_box(box)
    except ValueError:
        return text, None
    return spec, box


def local_paths(spec: Any) -> list[str]:
    """The local files or folders a volume spec reads or writes (no I/O).

    Follows the read grammar (``SPEC@box``, ``A+B``): one path per part. A
    ``precomputed://`` spec gives its path, ``file.npz:key`` and
    ``file.h5:dataset`` their file, a TensorStore JSON spec its 'file' kvstore
    path. Remote stores (gs://, s3://, memory://...) and unparseable specs give
    nothing: there is no local path to compare.
    """
    if isinstance(spec, VolumeSpec):
        parts = [spec]
    elif isinstance(spec, dict) or is_json_spec(spec):
        parts = [spec]
    else:
        text = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
        if not isinstance(text, str):
            return []
        parts = [split_box(part)[0] for part in text.split("+")] if "+" in text else \
            [split_box(text)[0]]
    paths = []
    for part in parts:
        try:
            vs = parse_spec(part)
        except ValueError:
            continue
        path = vs.path
        if vs.kind == "tensorstore":
            kv = (vs.ts_spec or {}).get("kvstore")
            path = kv.get("path", "") if isinstance(kv, dict) and kv.get("driver") == "file" else ""
        if path.startswith("file://"):
            path = path[len("file://"):]
        if path and "://" not in path:
            paths.append(path)
    return paths


def is_json_spec(spec: Any) -> bool:
    """True for a TensorStore JSON spec: a dict, or a string starting with '{'."""
    return isinstance(spec, dict) or (isinstance(spec, str) and spec.lstrip().startswith("{"))


def uses_grammar(spec: Any) -> bool:
    """True for a string spec with a box suffix or '+' stacking (the read
    grammar); a JSON spec never uses it."""
    return (isinstance(spec, str) and not is_json_spec(spec)
            and ("+" in spec or split_box(spec)[1] is not None))


def clipped_box(box: str, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, size) z,y,x of the box text inside `shape`, by Python's slice
    rules (an end past the volume's face stops at it).

    Raises:
      ValueError: for a malformed box (`parse_box`), or one that is empty or
        lies outside the volume.
    """
    pairs = parse_box(box)
    ranges = [range(n)[slice(a, b)] for (a, b), n in zip(pairs, shape)]
    if any(len(r) == 0 for r in ranges):
        raise ValueError(f"box {tuple(''.join(box.split()).split(','))} is empty or outside the "
                         f"volume of shape {tuple(shape)}")
    return tuple(r.start for r in ranges), tuple(len(r) for r in ranges)
