"""Block-wise scaling: time per voxel and peak memory per worker as blocks grow 1 -> 8 -> 27.

    python -m benchmarks.blockwise_bench [--block 32 --overlap 8 --grids 1,2,3 --workers 2]

For each grid size n the volume is exactly n x n x n blocks (side
n * (block - overlap) + overlap), cut from one synthetic volume
(`ffnjax.synthetic.make_volume`), and segmented by
`ffnjax.blockwise.segment_volume` on a fresh `LocalCluster` of worker
processes. Each worker compiles the flood fill once before timing starts
(warm-up on a dummy block), so the figures are steady state. Reported per run:

* wall time per voxel of the whole run (segment + match + write),
* task time per voxel: summed in-task segmentation seconds / voxels,
* peak resident memory of the worker processes (max over blocks of the
  worker's `ru_maxrss` after the block).

Flat columns are the claim: work is per block, memory is bounded by the block
size. The default model is the oracle network fed the synthetic labels (no
training needed); `--checkpoint WORKDIR` benchmarks a real model on the
synthetic image instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ffnjax import blockwise as bw
from ffnjax.config import InferenceOptions, ModelConfig
from ffnjax.volumes import save_volume


def _warm_up(segmenter: bw.FFNSegmenter, block: tuple[int, int, int], image: np.ndarray) -> float:
    """Runs the segmenter once on a block of real data (compiles its flood fill)."""
    t = time.perf_counter()
    segmenter(np.ascontiguousarray(image[:block[0], :block[1], :block[2]]))
    return time.perf_counter() - t


def run(grids=(1, 2, 3), block=32, overlap=8, workers=2, checkpoint=None, seed=0,
        fov=(9, 9, 9), deltas=(3, 3, 3), progress=False) -> list[dict]:
    """Benchmarks one LocalCluster run per grid size; returns one dict per run."""
    from distributed import Client, LocalCluster
    from ffnjax import synthetic

    stride = block - overlap
    side = max(grids) * stride + overlap
    image, labels = synthetic.make_volume((side, side, side), seed=seed)
    if checkpoint:
        from ffnjax.checkpoints import load_checkpoint
        model_config, params = load_checkpoint(checkpoint)
        segmenter = bw.FFNSegmenter(params, model_config, InferenceOptions())
        volume = image
    else:
        from ffnjax.testing import oracle_apply_fn, oracle_options
        model_config = ModelConfig(depth=1, features=1, fov_size=fov, deltas=deltas)
        segmenter = bw.FFNSegmenter(None, model_config,
                                    oracle_options(seed_policy="grid", seed_grid_step=deltas),
                                    oracle_apply_fn)
        volume = labels.astype(np.uint32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in grids:
            size = n * stride + overlap
            spec = str(Path(tmp) / f"image_{n}.zarr")
            save_volume(spec, np.ascontiguousarray(volume[:size, :size, :size]))
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                              dashboard_address=None, silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
                warm = client.run(_warm_up, segmenter, (block,) * 3, volume)
                summary = bw.segment_volume(spec, str(Path(tmp) / f"seg_{n}.zarr"),
                                            block=(block,) * 3, overlap=(overlap,) * 3,
                                            client=client, segment_fn=segmenter, progress=progress)
            metas = [json.loads(p.read_text()) for p in
                     (Path(tmp) / f"seg_{n}.zarr.blocks" / "blocks").glob("*.json")]
            voxels = size ** 3
            rows.append({
                "blocks": summary.n_blocks, "volume": [size] * 3, "voxels": voxels,
                "objects": summary.n_objects, "wall_s": summary.seconds["total"],
                "wall_us_per_voxel": 1e6 * summary.seconds["total"] / voxels,
                "task_us_per_voxel": 1e6 * sum(m["seconds"] for m in metas) / voxels,
                "task_us_per_block_voxel": 1e6 * sum(m["seconds"] for m in metas)
                / (summary.n_blocks * block ** 3),
                "peak_worker_rss_mb": summary.peak_worker_rss_mb,
                "warm_up_s": max(warm.values()),
                "seconds": summary.seconds})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.blockwise_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=32, help="cubic block side in voxels (default 32)")
    ap.add_argument("--overlap", type=int, default=8, help="overlap in voxels (default 8)")
    ap.add_argument("--grids", default="1,2,3",
                    help="blocks per axis for each run (default 1,2,3: 1, 8, 27 blocks)")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
    ap.add_argument("--checkpoint", default=None,
                    help="model workdir; default: the oracle network on synthetic labels")
    ap.add_argument("--seed", type=int, default=0, help="synthetic volume seed")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    args = ap.parse_args(argv)
    grids = tuple(int(g) for g in args.grids.split(","))
    rows = run(grids, args.block, args.overlap, args.workers, args.checkpoint, args.seed,
               progress=args.progress)
    print(f"{'blocks':>6} {'volume':>12} {'objects':>7} {'wall s':>7} {'wall us/vox':>11} "
          f"{'task us/vox':>11} {'task us/block-vox':>17} {'peak RSS MiB':>12}")
    for r in rows:
        print(f"{r['blocks']:>6} {'x'.join(map(str, r['volume'])):>12} {r['objects']:>7} "
              f"{r['wall_s']:>7.1f} {r['wall_us_per_voxel']:>11.2f} {r['task_us_per_voxel']:>11.2f} "
              f"{r['task_us_per_block_voxel']:>17.2f} {r['peak_worker_rss_mb']:>12.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
