"""Ground-truth skeletons: one per object, from kimimaro or SWC files.

A `Skeleton` is one ground-truth object's centre lines: nodes in *voxel*
coordinates z,y,x (floats allowed) and edges between node indices, each a
straight segment. They are what `ffnjax.erl.expected_run_length` walks along.

* `skeletonize` runs kimimaro's TEASAR on a dense ground-truth label volume
  (kimimaro works in x,y,z and physical units; the conversion happens here).
* `save_swc` / `load_swc` (and the `_dir` forms, one ``LABEL.swc`` per
  object) hold skeletons in SWC files, which store physical x,y,z: the voxel
  size converts at save and load time.

Lengths (`Skeleton.length`) are in the units of ``voxel_size`` (nm when it is
in nm).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import kimimaro
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Skeleton:
    """One ground-truth object's skeleton.

    Attributes:
      nodes: (N, 3) float array of voxel coordinates z,y,x (voxel centres are
        integers; node i lies in voxel ``round(nodes[i])``).
      edges: (E, 2) int array of node indices; each edge is a straight
        segment between two nodes.
      label: the ground-truth id the skeleton belongs to.
    """

    nodes: np.ndarray
    edges: np.ndarray
    label: int = 0

    def __post_init__(self):
        nodes = np.asarray(self.nodes, dtype=np.float64).reshape(-1, 3) if np.size(self.nodes) else np.zeros((0, 3))
        edges = np.asarray(self.edges, dtype=np.int64).reshape(-1, 2) if np.size(self.edges) else np.zeros((0, 2), np.int64)
        if edges.size and (edges.min() < 0 or edges.max() >= len(nodes)):
            raise ValueError(f"skeleton {self.label}: edge indices must lie in [0, {len(nodes)}), "
                             f"got range [{edges.min()}, {edges.max()}]")
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "label", int(self.label))

    def edge_lengths(self, voxel_size: Sequence[float] = (1, 1, 1)) -> np.ndarray:
        """(E,) physical length of every edge (units of ``voxel_size``)."""
        vs = _voxel_size(voxel_size)
        d = (self.nodes[self.edges[:, 0]] - self.nodes[self.edges[:, 1]]) * vs
        return np.sqrt((d * d).sum(axis=1))

    def length(self, voxel_size: Sequence[float] = (1, 1, 1)) -> float:
        """Total physical length (sum of edge lengths)."""
        return float(self.edge_lengths(voxel_size).sum())


def _voxel_size(voxel_size: Sequence[float]) -> np.ndarray:
    vs = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if vs.shape != (3,) or not np.all(vs > 0):
        raise ValueError(f"voxel_size must be three positive numbers (z,y,x), got {voxel_size!r}")
    return vs


# kimimaro's TEASAR defaults, except that lengths scale with the voxel size
# in the callers' units; "const" is in physical units (nm for nm voxels).
DEFAULT_TEASAR = {"scale": 1.5, "const": 300}


def skeletonize(labels: np.ndarray, voxel_size: Sequence[float] = (1, 1, 1),
                **kimimaro_options: Any) -> list[Skeleton]:
    """Skeletonizes every object of a dense label volume with kimimaro (TEASAR).

    Args:
      labels: z,y,x integer label volume; 0 is background.
      voxel_size: physical voxel size z,y,x (kimimaro's ``anisotropy``).
      **kimimaro_options: passed to ``kimimaro.skeletonize``. Defaults here:
        ``teasar_params={"scale": 1.5, "const": 300}`` (invalidation radius
        ``scale * distance_to_boundary + const`` in physical units; a given
        dict is merged over these defaults), ``dust_threshold=100`` (objects
        with fewer voxels are skipped), ``fix_branching=True``,
        ``fix_borders=True``, ``progress=False``, ``parallel=1``.

    Returns:
      Skeletons sorted by label, nodes in voxel coordinates z,y,x.

    kimimaro works in x,y,z on Fortran-ordered arrays and returns vertices in
    physical units; both are converted here so callers only see z,y,x voxels.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3D z,y,x volume, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    vs = _voxel_size(voxel_size)
    opts = {"dust_threshold": 100, "fix_branching": True, "fix_borders": True,
            "progress": False, "parallel": 1}
    opts.update(kimimaro_options)
    teasar = dict(DEFAULT_TEASAR)
    teasar.update(opts.pop("teasar_params", None) or {})
    if labels.dtype.kind == "i":
        if labels.size and labels.min() < 0:
            raise ValueError("labels must be non-negative")
        labels = labels.astype(np.uint64)
    result = kimimaro.skeletonize(labels.transpose(2, 1, 0), teasar_params=teasar,
                                  anisotropy=tuple(float(v) for v in vs[::-1]), **opts)
    out = []
    for label in sorted(result):
        sk = result[label]
        nodes = np.asarray(sk.vertices, np.float64)[:, ::-1] / vs
        out.append(Skeleton(nodes, np.asarray(sk.edges, np.int64), int(label)))
    return out


def save_swc(path: str | os.PathLike, skeleton: Skeleton,
             voxel_size: Sequence[float] = (1, 1, 1)) -> Path:
    """Writes one skeleton as SWC (physical x,y,z, one tree per connected part).

    Node ids are 1-based; each node's parent is its neighbour on a
    breadth-first tree of the edges (a root gets parent -1). Cycles, which SWC
    cannot hold, lose their closing edge. The label goes into a comment line.
    """
    vs = _voxel_size(voxel_size)
    n = len(skeleton.nodes)
    adj: list[list[int]] = [[] for _ in range(n)]
    for a, b in skeleton.edges:
        adj[a].append(int(b))
        adj[b].append(int(a))
    parent = np.full(n, -2, np.int64)
    order = []
    for root in range(n):
        if parent[root] != -2:
            continue
        parent[root] = -1
        queue = [root]
        while queue:
            v = queue.pop(0)
            order.append(v)
            for w in adj[v]:
                if parent[w] == -2:
                    parent[w] = v
                    queue.append(w)
    new_id = np.empty(n, np.int64)
    new_id[order] = np.arange(1, n + 1)
    xyz = skeleton.nodes[:, ::-1] * vs[::-1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# ffnjax skeleton label {skeleton.label}\n")
        f.write(f"# voxel_size_zyx {vs[0]:g} {vs[1]:g} {vs[2]:g}\n")
        for v in order:
            p = -1 if parent[v] == -1 else int(new_id[parent[v]])
            x, y, z = xyz[v]
            f.write(f"{new_id[v]} 0 {x:.6g} {y:.6g} {z:.6g} 1 {p}\n")
    return path


def load_swc(path: str | os.PathLike, voxel_size: Sequence[float] = (1, 1, 1),
             label: int | None = None) -> Skeleton:
    """Reads an SWC file (physical x,y,z) into a Skeleton in voxel z,y,x.

    Args:
      path: the .swc file.
      voxel_size: z,y,x voxel size in the file's units (coordinates are
        divided by it).
      label: the skeleton's label; by default the ``# ffnjax skeleton label``
        comment when present, else the digits in the file name, else 0.

    Raises:
      FileNotFoundError: when the file is missing.
      ValueError: naming the file and line when a line is malformed or a
        parent id does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SWC file not found: {path}")
    vs = _voxel_size(voxel_size)
    ids, coords, parents = [], [], []
    file_label = None
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if not s:
                continue
            if s.startswith("#"):
                parts = s[1:].split()
                if parts[:3] == ["ffnjax", "skeleton", "label"] and len(parts) > 3:
                    file_label = int(parts[3])
                continue
            parts = s.split()
            if len(parts) < 7:
                raise ValueError(f"{path}:{lineno}: SWC lines need 7 fields "
                                 f"(id type x y z radius parent), got {s!r}")
            try:
                ids.append(int(parts[0]))
                coords.append([float(parts[2]), float(parts[3]), float(parts[4])])
                parents.append(int(float(parts[6])))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: malformed SWC line {s!r}: {e}") from e
    index = {i: k for k, i in enumerate(ids)}
    if len(index) != len(ids):
        raise ValueError(f"{path}: duplicate node ids")
    edges = []
    for k, p in enumerate(parents):
        if p < 0:
            continue
        if p not in index:
            raise ValueError(f"{path}: node {ids[k]} names parent {p}, which does not exist")
        edges.append((index[p], k))
    nodes = np.asarray(coords, np.float64).reshape(-1, 3)[:, ::-1] / vs
    if label is None:
        digits = "".join(c for c in path.stem if c.isdigit())
        label = file_label if file_label is not None else (int(digits) if digits else 0)
    return Skeleton(nodes, np.asarray(edges, np.int64).reshape(-1, 2), label)


def load_swc_dir(directory: str | os.PathLike,
                 voxel_size: Sequence[float] = (1, 1, 1)) -> list[Skeleton]:
    """Every ``*.swc`` in a directory (sorted by name) as Skeletons."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"skeleton directory not found: {directory}")
    files = sorted(directory.glob("*.swc"))
    if not files:
        raise FileNotFoundError(f"no .swc files in {directory}")
    return [load_swc(p, voxel_size) for p in files]


def save_swc_dir(directory: str | os.PathLike, skeletons: Iterable[Skeleton],
                 voxel_size: Sequence[float] = (1, 1, 1)) -> list[Path]:
    """Writes each skeleton as ``DIRECTORY/LABEL.swc``."""
    directory = Path(directory)
    return [save_swc(directory / f"{sk.label}.swc", sk, voxel_size) for sk in skeletons]
