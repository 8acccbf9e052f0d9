"""Files a later run reads back: written atomically, named by a digest of what they hold.

Block-wise results, run records, the resumable segmentation state and cached
partitions are all read by a later (possibly resumed) run, so a crash must
never leave half a file where a whole one is expected. `atomic_write` is the
one way ffnjax writes them:

1. the bytes go to a temporary file *beside* the target (same folder, so the
   same filesystem), named ``.NAME.tmp-<random hex>``: two writers of one
   target never share a temporary file, and no reader looks at dot-files;
2. the file is flushed and ``fsync``-ed, so its bytes are on disk;
3. ``os.replace`` puts it in place in one step (atomic on POSIX and Windows),
   and the folder is ``fsync``-ed so the new name survives a power cut too.

A crash before step 3 leaves the old file (or none) untouched; a writer that
raises removes its temporary file; a writer killed outright leaves only a
temporary file, which nothing reads. When two writers race, the last
``os.replace`` wins and each reader sees one whole version.

`write_bytes`, `write_json`, `save_npy` and `save_npz` are `atomic_write` for
the formats the package writes.

`overlaps` and `probe_writable` are the checks a command makes before any
work: it never writes where it reads, and learns that it cannot write before
it computes, not after.

`digest` is the one content hash: hashlib over a sequence of pieces
(bytes, str as UTF-8, NumPy arrays as their raw C-order bytes), for resume
checks and cache keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside `path`: ``.NAME.tmp-<32 hex digits>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Opens a temporary binary file that becomes `path` when the block ends.

        with atomic_write(path) as f:
            np.save(f, array)

    On a normal exit the file is fsync-ed and moved onto `path` with
    ``os.replace``; when the block raises, the temporary file is removed,
    `path` is left as it was and the exception propagates. The folder must
    exist.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Makes a rename in `folder` durable where the OS allows it (POSIX);
    a no-op on systems that cannot open a folder for fsync."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically. Returns the path."""
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Writes `obj` as JSON to `path` atomically. Returns the path."""
    return write_bytes(path, json.dumps(obj, indent=indent).encode())


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """`np.save` to `path` atomically (the name is kept as given). Returns the path."""
    with atomic_write(path) as f:
        np.save(f, array)
    return Path(path)


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], *,
             compressed: bool = False) -> Path:
    """`np.savez` (or `np.savez_compressed`) of `arrays` to `path` atomically.
    Returns the path."""
    with atomic_write(path) as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return Path(path)


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when paths `a` and `b` are the same file or folder, or one lies
    inside the other, after resolving symbolic links, '..' and '~'.

    Writing to `a` then can change what is read from `b` (replacing a folder
    removes everything inside it).
    """
    ra, rb = (Path(p).expanduser().resolve() for p in (a, b))
    return ra == rb or ra in rb.parents or rb in ra.parents


def probe_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Checks, without leaving anything behind, that `path` can be created.

    The nearest existing folder on the way to `path` (the path itself when it
    is a folder that exists) must be a folder in which a file can be created:
    a temporary file is created there and removed at once. Folders still
    missing below it are not created.

    Raises:
      NotADirectoryError: naming the path and the file that stands where a
        folder is needed.
      PermissionError: naming the path and the folder that refuses the write
        (read-only, no permission, ...).
    """
    target = Path(path).expanduser().absolute()
    folder = target if target.is_dir() else target.parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {what} {path}: {folder} is not a folder")
    probe = folder / f".{target.name}.probe-{uuid.uuid4().hex}"
    try:
        with open(probe, "xb"):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write {what} {path}: folder {folder} is not writable "
                              f"({e.strerror or e})") from e
    with contextlib.suppress(OSError):
        os.unlink(probe)


def digest(pieces: Iterable[bytes | str | np.ndarray], algorithm: str = "sha256") -> str:
    """Hex digest of `pieces` fed to one hashlib hash in order.

    bytes are fed as they are, str as UTF-8, NumPy arrays as their raw bytes
    in C order (without shape or dtype: feed those as a piece of their own
    when two arrays of the same bytes must differ). `algorithm` is any name
    `hashlib.new` knows.
    """
    h = hashlib.new(algorithm)
    for piece in pieces:
        if isinstance(piece, str):
            piece = piece.encode()
        elif isinstance(piece, np.ndarray):
            piece = np.ascontiguousarray(piece)
        h.update(piece)
    return h.hexdigest()


def cache_home(*parts: str) -> Path:
    """ffnjax's folder for caches a later run reuses: $XDG_CACHE_HOME/ffnjax/PARTS, or
    ~/.cache/ffnjax/PARTS when XDG_CACHE_HOME is unset or empty."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "ffnjax", *parts)
