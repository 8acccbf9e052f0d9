"""The work folder of a block-wise run (`ffnjax.blockwise`): where each block's
result lives, how it is written and read back, and the checks made before any
work (the run record, the output).

Layout of ``<workdir>``::

    run.json                     what the run is (image, geometry, segmenter): a
                                 resume must match it
    blocks/ZZZ_YYY_XXX.npz       a block's labels after its own seeds (round 0)
    blocks/ZZZ_YYY_XXX.json      ... and its metadata, written last: the block is done
    handoff/rK/ZZZ_YYY_XXX.json  the block after handoff round K (`ffnjax.handoff`);
    handoff/rK/ZZZ_YYY_XXX.npz   its labels, when that round changed them (else the
                                 JSON's `labels_file` names an earlier round's)
    reconcile.json               global ids and the weak contacts

Every file is written atomically (`ffnjax.files`), the JSON after the labels,
so a killed task leaves either a finished block or none.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import fastremap
import numpy as np

from ffnjax.blockgrid import Block
from ffnjax.files import overlaps, probe_writable, save_npz, write_json
from ffnjax.handles import spec_text
from ffnjax.volume_spec import local_paths
from ffnjax.volumes import create_volume, open_volume


def default_workdir(output_spec: Any) -> Path:
    """``<output path>.blocks`` beside a local output volume.

    Raises:
      ValueError: for a remote output (gs://, s3://, ...) or an in-memory one,
        where a shared work folder must be named explicitly.
    """
    text = spec_text(output_spec)
    for prefix in ("precomputed://", "file://"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    if "://" in text or text.startswith("{") or not isinstance(output_spec, (str, os.PathLike)):
        raise ValueError(f"cannot derive a local work folder from output {text!r}; pass workdir= "
                         "(a folder every worker can read and write)")
    return Path(text.rstrip("/") + ".blocks")


# ----------------------------------------------------------------------------
# Block results


def block_paths(workdir: str | os.PathLike, block: Block, round_: int = 0) -> tuple[Path, Path]:
    """(labels .npz, metadata .json) of a block's result after handoff round
    `round_` (0: its own seeds only); the JSON is written last and marks it done."""
    d = Path(workdir) / ("blocks" if round_ == 0 else f"handoff/r{round_}")
    return d / f"{block.name}.npz", d / f"{block.name}.json"


def load_block_meta(workdir: str | os.PathLike, block: Block, round_: int = 0) -> dict | None:
    """A finished block's metadata after round `round_`, or None when not done."""
    _, meta = block_paths(workdir, block, round_)
    try:
        return json.loads(meta.read_text())
    except FileNotFoundError:
        return None


def _labels_file(workdir: str | os.PathLike, block: Block, meta: dict | None) -> Path:
    if meta is not None and meta.get("labels_file"):
        return Path(workdir) / meta["labels_file"]
    return block_paths(workdir, block)[0]


def load_block_state(workdir: str | os.PathLike, block: Block,
                     meta: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, tried) of a finished block: uint labels (0 = background, ids
    1..n) of the block's shape, and the (k, 3) seeds tried without an object
    (`ffnjax.segmentation.UNSEGMENTED_SEED`, on the segmenter's grid). `meta`
    (from `load_block_meta`) picks the round; None: round 0."""
    npz = _labels_file(workdir, block, meta)
    with np.load(npz, allow_pickle=False) as z:
        labels = z["labels"]
        tried = z["tried"] if "tried" in z.files else np.zeros((0, 3), np.int64)
    if labels.shape != block.shape:
        raise ValueError(f"{npz} holds labels of shape {labels.shape}, expected {block.shape}")
    return labels, tried


def load_block_labels(workdir: str | os.PathLike, block: Block, meta: dict | None = None) -> np.ndarray:
    """A finished block's local labels (see `load_block_state`)."""
    return load_block_state(workdir, block, meta)[0]


def save_block(workdir: str | os.PathLike, block: Block, round_: int, labels: np.ndarray,
               tried: np.ndarray, started: float, extra: dict) -> dict:
    """Renumbers `labels` 1..n, writes them (with `tried`) and then the metadata
    of round `round_`; returns the metadata (ids and sizes of the objects in
    the block's core, timing, host)."""
    labels, _ = fastremap.renumber(np.asarray(labels), preserve_zero=True)
    labels = fastremap.refit(labels)  # smallest unsigned dtype holding 0..n
    ids, sizes = fastremap.unique(labels[block.core_slices], return_counts=True)
    keep = ids != 0
    npz_path, meta_path = block_paths(workdir, block, round_)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    save_npz(npz_path, {"labels": labels, "tried": np.asarray(tried, np.int64).reshape(-1, 3)},
             compressed=True)
    meta = {"block": block.name, "index": list(block.index), "start": list(block.start),
            "stop": list(block.stop), "round": round_,
            "labels_file": str(npz_path.relative_to(Path(workdir))),
            "n_objects": int(labels.max()) if labels.size else 0,
            "core_ids": ids[keep].astype(np.int64).tolist(),
            "core_sizes": sizes[keep].astype(np.int64).tolist(),
            "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(),
            "host": socket.gethostname(), "pid": os.getpid(), "finished": time.time(), **extra}
    write_json(meta_path, meta)
    return meta


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------
# Checks before any work


def check_run_file(workdir: Path, record: dict, write: bool = True) -> bool:
    """True when `workdir` holds this run's run.json (a resume); refuses one of
    another run. Writes the record when absent (unless `write` is False)."""
    path = workdir / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != record:
            diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
            raise ValueError(f"work folder {workdir} holds blocks of a different run (differs in "
                             f"{diff}); delete it or pass another workdir")
        return True
    if write:
        write_json(path, record)
    return False


def check_output(output: Any, image_spec: Any, workdir: Path, shape, resuming: bool,
                 overwrite: bool) -> bool:
    """Checks the output before any work; returns whether it must be created.

    Refused, naming the output: one that is (or holds, or lies inside) the
    image or the work folder, whatever `overwrite` says; an existing one
    unless this run resumes it (its work folder holds this run's run.json) or
    `overwrite`; one of the wrong shape or dtype when resuming; one that
    cannot be created (`ffnjax.files.probe_writable`).
    """
    if not isinstance(output, (str, os.PathLike)):
        if tuple(output.shape) != tuple(shape):
            raise ValueError(f"output volume has shape {tuple(output.shape)}, image has {tuple(shape)}")
        return False
    text = spec_text(output)
    out_paths = local_paths(output)
    for path in out_paths:
        for ipath in local_paths(image_spec):
            if overlaps(path, ipath):
                raise ValueError(f"output {text!r} would overwrite the image {spec_text(image_spec)!r}"
                                 " (the same path, or one inside the other); write to another path")
        if overlaps(path, workdir):
            raise ValueError(f"output {text!r} and the work folder {workdir} overlap; give each "
                             "its own path")
    exists = any(Path(p).expanduser().exists() for p in out_paths)
    if not out_paths:  # a remote output: ask the store
        try:
            open_volume(output).close()
            exists = True
        except FileNotFoundError:
            exists = False
    if exists and resuming:
        vol = open_volume(output)
        if tuple(vol.shape) != tuple(shape) or vol.dtype.kind not in "iu":
            raise ValueError(f"existing output {text!r} has shape {vol.shape} and dtype "
                             f"{vol.dtype}; the image needs shape {tuple(shape)} with an integer dtype")
        return False
    if exists and not overwrite:
        raise FileExistsError(f"output {text!r} exists and work folder {workdir} holds no run "
                              "that wrote it; pass overwrite=True (--overwrite) to replace it")
    for path in out_paths:
        probe_writable(path, f"output {text!r}")
    return True


def prepare_output(output: Any, shape, voxel_size, chunks, create: bool, replace: bool) -> Any:
    """The output, created as a uint64 volume when `create` (replacing an old
    one when `replace`); checked by `check_output` before any work."""
    if create:
        create_volume(output, shape, "uint64", chunks=chunks, voxel_size=voxel_size,
                      overwrite=replace)
    return output
