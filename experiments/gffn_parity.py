"""Segment google/ffn's FIB-25 reference crop and measure how far the result is from google/ffn's own.

    python -m experiments.gffn_parity --compat google_ffn      # equal: seeds, FOV path, voxels
    python -m experiments.gffn_parity --min-segment-size 1000  # ffnjax's defaults, the request's size

The reference (`../shared/data/gffn_reference_fib25`, its README says how it
was made) is google/ffn's inference with its published FIB-25 model on a
64x128x128 crop of FIB-25 training_sample2: the seed list, every FOV centre
evaluated in order, and the segmentation. This command imports the same model
(`ffnjax.tf_import`), segments the same crop with the InferenceOptions the
flags give (`--compat`, then the option flags) and prints the agreement
(`agreement`) as JSON. The network runs about 800 FOVs here: minutes on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments import _cli
from ffnjax.config import InferenceOptions, ModelConfig

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
REFERENCE = "gffn_reference_fib25"
CHECKPOINT = "ffn_fib25_checkpoint/model.ckpt-27465036"
MODEL = ModelConfig(depth=12, features=32, fov_size=(33, 33, 33), deltas=(8, 8, 8))
# The crop: raw_z050-099 and raw_z100-149 stacked along z, then this box (z,y,x).
CROP = (slice(10, 74), slice(0, 128), slice(120, 248))


def load_crop(data: str | Path = DATA) -> np.ndarray:
    """The reference crop, uint8 z,y,x (64, 128, 128)."""
    root = Path(data) / "fib25_training_sample2"
    parts = []
    for name in ("raw_z050-099.npz", "raw_z100-149.npz"):
        with np.load(root / name) as z:
            parts.append(z[z.files[0]])
    return np.ascontiguousarray(np.concatenate(parts, axis=0)[CROP])


def load_reference(data: str | Path = DATA) -> dict[str, Any]:
    """google/ffn's output on the crop: 'seeds' (N, 3) and 'positions' (M, 3)
    z,y,x int64 in order, 'segmentation' uint16 z,y,x, 'summary' (its counters)."""
    root = Path(data) / REFERENCE
    with np.load(root / "segmentation.npz") as z:
        seg = z["segmentation"]
    return {"seeds": np.load(root / "seeds_zyx.npy"),
            "positions": np.load(root / "visited_positions_zyx.npy"),
            "segmentation": seg,
            "summary": json.loads((root / "summary.json").read_text())}


def load_model(data: str | Path = DATA):
    """(ModelConfig, params) of google/ffn's published FIB-25 model, imported."""
    from ffnjax.tf_import import import_ffn_checkpoint  # NumPy only, but keep --help fast
    params, _ = import_ffn_checkpoint(str(Path(data) / CHECKPOINT), MODEL)
    return MODEL, params


def _first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    """Index of the first row where two (N, 3) lists differ (one ending counts), or None."""
    n = min(len(a), len(b))
    rows = np.nonzero(np.any(a[:n] != b[:n], axis=1))[0]
    if len(rows):
        return int(rows[0])
    return None if len(a) == len(b) else n


def matched_voxels(seg: np.ndarray, ref: np.ndarray) -> int:
    """Voxels that agree under the best one-to-one relabelling of `seg`'s objects
    onto `ref`'s (background only matches background)."""
    from scipy.optimize import linear_sum_assignment
    a, b = seg.ravel().astype(np.int64), ref.ravel().astype(np.int64)
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    table = np.zeros((len(ua), len(ub)), np.int64)
    np.add.at(table, (ia, ib), 1)
    both_bg = int(table[0, 0]) if ua[0] == 0 and ub[0] == 0 else 0
    objects = table[1 if ua[0] == 0 else 0:, 1 if ub[0] == 0 else 0:]
    rows, cols = linear_sum_assignment(-objects)
    return both_bg + int(objects[rows, cols].sum())


def agreement(seeds: np.ndarray, positions: np.ndarray | None, segmentation: np.ndarray,
              reference: dict[str, Any]) -> dict[str, Any]:
    """How a run on the crop compares with google/ffn's (`load_reference`).

    Returns a JSON-friendly dict: the seed lists (equal, counts, common
    seeds), the FOV paths (equal, lengths, common prefix, the first position
    where they part), and the segmentations: object and voxel counts,
    'identical_up_to_relabelling', 'matched_voxel_fraction' (voxels agreeing
    under the best one-to-one relabelling), the adapted Rand error and the
    variation of information (split, merge: nats; scikit-image's
    definitions, the reference as ground truth).
    """
    from skimage.metrics import adapted_rand_error, variation_of_information
    ref_seeds, ref_pos, ref_seg = (reference["seeds"], reference["positions"],
                                   reference["segmentation"])
    seeds = np.asarray(seeds, np.int64).reshape(-1, 3)
    seg = np.asarray(segmentation).astype(np.int64)
    ref = ref_seg.astype(np.int64)
    common = set(map(tuple, seeds.tolist())) & set(map(tuple, ref_seeds.tolist()))
    out: dict[str, Any] = {
        "seeds": {"equal": bool(np.array_equal(seeds, ref_seeds)), "ours": len(seeds),
                  "reference": len(ref_seeds), "common": len(common)}}
    if positions is not None:
        positions = np.asarray(positions, np.int64).reshape(-1, 3)
        k = _first_difference(positions, ref_pos)
        path: dict[str, Any] = {"equal": k is None, "ours": len(positions),
                                "reference": len(ref_pos),
                                "common_prefix": len(positions) if k is None else k}
        if k is not None:
            path["first_difference"] = {
                "index": k,
                "ours": positions[k].tolist() if k < len(positions) else None,
                "reference": ref_pos[k].tolist() if k < len(ref_pos) else None}
        out["positions"] = path
    pairs = np.unique(np.stack([seg.ravel(), ref.ravel()]), axis=1)
    bijective = (len(pairs[0]) == len(np.unique(pairs[0])) == len(np.unique(pairs[1]))
                 and bool(np.all((pairs[0] == 0) == (pairs[1] == 0))))
    are, _, _ = adapted_rand_error(ref, seg)
    split, merge = variation_of_information(ref, seg)
    out["segmentation"] = {
        "identical_up_to_relabelling": bijective,
        "objects": {"ours": int(len(np.unique(seg[seg > 0]))),
                    "reference": int(len(np.unique(ref[ref > 0])))},
        "segmented_voxels": {"ours": int(np.count_nonzero(seg)),
                             "reference": int(np.count_nonzero(ref))},
        "matched_voxel_fraction": round(matched_voxels(seg, ref) / seg.size, 6),
        "adapted_rand_error": round(float(are), 6),
        "vi_split": round(float(split), 6), "vi_merge": round(float(merge), 6)}
    return out


def run(options: InferenceOptions, data: str | Path = DATA, progress: bool = True,
        conv_impl: str | None = None) -> tuple[np.ndarray, Any, dict[str, Any]]:
    """Segments the crop with `options` (and the model's convolutions computed by
    `conv_impl`, when given); returns (segmentation, SegmentInfo, agreement)."""
    from ffnjax.segmentation import segment  # loads JAX
    image, reference = load_crop(data), load_reference(data)
    model_config, params = load_model(data)
    if conv_impl is not None:
        model_config = dataclasses.replace(model_config, conv_impl=conv_impl)
    seg, info = segment(image, params, model_config, options, progress=progress,
                        record_positions=True)
    return seg, info, agreement(info.seeds, info.positions, seg, reference)


def build_parser():
    p = _cli.make_parser("gffn_parity", __doc__)
    g = p.add_argument_group("run")
    g.add_argument("--data", default=str(DATA), metavar="DIR",
                   help="the shared data folder (default ../shared/data beside the repo)")
    g.add_argument("--json", metavar="PATH", default=None, help="also write the agreement here")
    _cli.add_common(g)
    o = p.add_argument_group("inference options (InferenceOptions)")
    _cli.add_compat_flag(o)
    _cli.add_flags(o, InferenceOptions, _cli.INFERENCE_FLAGS)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    options = _cli.inference_options(args)
    for path in (Path(args.data) / REFERENCE, Path(args.data) / "fib25_training_sample2"):
        if not path.is_dir():
            raise FileNotFoundError(2, "No such file or directory", str(path))
    t0 = time.perf_counter()
    _, info, result = run(options, args.data, progress=not args.quiet)
    result = {"options": options.to_dict(), **result,
              "fov_steps": info.counters["fov_steps"], "wall_s": round(time.perf_counter() - t0, 1)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    _cli.run(main)
