"""google/ffn's per-subvolume output files, written and read without TensorFlow.

google/ffn's `Runner` writes every subvolume it segments under the request's
`segmentation_output_dir`, named by the subvolume's corner X, Y, Z (voxels,
in the whole image)::

    DIR/X/Y/seg-X_Y_Z.npz    'segmentation' (the smallest unsigned dtype that
                             holds the ids), 'origins' (id -> seed, FOV
                             steps, seconds), 'request', 'counters'
    DIR/X/Y/seg-X_Y_Z.prob   'qprob': uint8 probability of each object voxel

(older runs: DIR/seg-X_Y_Z.npz). `python -m experiments.segment --request`
writes the same two files, so that google/ffn's downstream tools find the
segmentation where they look for it and `PolicyInvertOrigins`
(`ffnjax.seed_policies`) finds a run's seeds. One difference: google/ffn
pickles its origins (a dict of `OriginInfo` named tuples), ffnjax writes them
as three plain arrays ('origin_ids', 'origin_zyx', 'origin_iters'), since a
pickle names the class that wrote it. `load_origins` reads both; google/ffn's
pickle is read by an unpickler that builds nothing but NumPy arrays, plain
containers and `OriginInfo` (any other class in the file is an error).

'qprob' is ffnjax's probability map (`ffnjax.segmentation.quantize_probability`:
round(255 p)); google/ffn bins p into 255 equal bins (`np.digitize`), so a
value may differ by one.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from collections import namedtuple
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ffnjax.files import save_npz

OriginInfo = namedtuple("OriginInfo", ["start_zyx", "iters", "walltime_sec"])
OriginInfo.__doc__ = "How an object was made: its seed z,y,x, FOV steps and seconds (google/ffn's)."


def _corner(corner: Sequence[int]) -> tuple[int, int, int]:
    c = tuple(int(v) for v in corner)
    if len(c) != 3:
        raise ValueError(f"a subvolume corner is three integers z,y,x, got {corner!r}")
    return c  # type: ignore[return-value]


def subvolume_path(output_dir: str | os.PathLike, corner: Sequence[int], suffix: str = "npz",
                   legacy: bool = False) -> Path:
    """DIR/X/Y/seg-X_Y_Z.SUFFIX for the subvolume at `corner` (z,y,x), or
    DIR/seg-X_Y_Z.SUFFIX with `legacy` (google/ffn's older layout)."""
    z, y, x = _corner(corner)
    name = f"seg-{x}_{y}_{z}.{suffix}"
    return Path(output_dir) / name if legacy else Path(output_dir) / str(x) / str(y) / name


def find_subvolume(output_dir: str | os.PathLike, corner: Sequence[int]) -> Path | None:
    """The segmentation file of the subvolume at `corner` in either layout, or None."""
    for legacy in (False, True):
        path = subvolume_path(output_dir, corner, "npz", legacy)
        if path.is_file():
            return path
    return None


def reduce_id_bits(labels: np.ndarray) -> np.ndarray:
    """`labels` (ids >= 0) in the smallest of uint8/16/32/64 that holds the largest id."""
    return labels.astype(np.min_scalar_type(int(labels.max()) if labels.size else 0))


def save_subvolume(output_dir: str | os.PathLike, corner: Sequence[int], labels: np.ndarray,
                   origins: Mapping[int, OriginInfo], probabilities: np.ndarray | None = None,
                   request_text: str = "", counters: Mapping[str, Any] | None = None) -> Path:
    """Writes seg-X_Y_Z.npz (and seg-X_Y_Z.prob when `probabilities`, uint8) atomically.

    Args:
      labels: z,y,x ids, 0 = background.
      origins: {id: OriginInfo} of the objects this run made.
      request_text: the request it ran (stored as google/ffn stores it).
      counters: run counters, stored as JSON text.

    Returns:
      the segmentation file's path.
    """
    ids = np.asarray(sorted(int(k) for k in origins), np.int64)
    arrays = {
        "segmentation": reduce_id_bits(np.asarray(labels)),
        "origin_ids": ids,
        "origin_zyx": np.asarray([origins[i].start_zyx for i in ids], np.int64).reshape(-1, 3),
        "origin_iters": np.asarray([origins[i].iters for i in ids], np.int64),
        "origin_walltime_sec": np.asarray([origins[i].walltime_sec for i in ids], np.float64),
        "request": np.asarray(request_text),
        "counters": np.asarray(json.dumps(dict(counters or {}), sort_keys=True)),
    }
    path = subvolume_path(output_dir, corner, "npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    if probabilities is not None:
        save_npz(subvolume_path(output_dir, corner, "prob"),
                 {"qprob": np.asarray(probabilities, np.uint8)}, compressed=True)
    save_npz(path, arrays, compressed=True)
    return path


class _OriginsUnpickler(pickle.Unpickler):
    """Builds NumPy arrays, plain containers and OriginInfo only."""

    ALLOWED = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
               for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("ffn.inference.storage", "OriginInfo"):
            return OriginInfo
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to build {module}.{name}")


def _pickled_origins(path: Path) -> dict[int, OriginInfo]:
    """google/ffn's pickled 'origins' entry of `path` (an .npz), read safely."""
    with zipfile.ZipFile(path) as z, z.open("origins.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"{path}: 'origins' has .npy format version {version}")
        _, _, dtype = read_header(f)
        if not dtype.hasobject:
            raise ValueError(f"{path}: 'origins' is not google/ffn's pickled dict")
        try:
            array = _OriginsUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            raise ValueError(f"{path}: cannot read google/ffn's 'origins': {e}") from None
    origins = array.item() if isinstance(array, np.ndarray) else array
    if not isinstance(origins, dict):
        raise ValueError(f"{path}: 'origins' is not a dict of OriginInfo")
    return {int(k): OriginInfo(*v) for k, v in origins.items()}


def load_origins(output_dir: str | os.PathLike, corner: Sequence[int]) -> dict[int, OriginInfo]:
    """{id: OriginInfo} of the subvolume at `corner` (z,y,x) under
    `output_dir`, written by ffnjax (`save_subvolume`) or by google/ffn.

    Raises:
      ValueError: no segmentation there, or no origins in it.
    """
    path = find_subvolume(output_dir, corner)
    if path is None:
        raise ValueError(f"no segmentation of the subvolume at corner {tuple(corner)} (z,y,x) "
                         f"in {output_dir} (looked for {subvolume_path(output_dir, corner)})")
    with np.load(path, allow_pickle=False) as z:
        if "origin_ids" in z.files:
            return {int(i): OriginInfo(tuple(int(v) for v in zyx), int(n), float(t))
                    for i, zyx, n, t in zip(z["origin_ids"], z["origin_zyx"], z["origin_iters"],
                                            z["origin_walltime_sec"])}
        if "origins" not in z.files:
            raise ValueError(f"{path} holds no origins (keys {z.files})")
    return _pickled_origins(path)
