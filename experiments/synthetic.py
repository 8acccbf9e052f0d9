"""Write a synthetic EM-like volume (image, dense labels, preview PNG).

    python -m experiments.synthetic --out out/synthetic --shape 128,128,128 --seed 0

writes DIR/image.zarr (uint8), DIR/labels.zarr (uint32) and DIR/preview.png,
and prints their paths with a short summary.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from experiments import _cli
from ffnjax import synthetic
from ffnjax.volumes import save_volume


def main(argv: list[str] | None = None) -> dict:
    p = _cli.make_parser("synthetic", __doc__)
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--shape", type=_cli.zyx_arg(minimum=1), default=(128, 128, 128),
                   help="volume size z,y,x in voxels (default 128,128,128)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same volume (default 0)")
    p.add_argument("--anisotropy", type=float, default=1.0,
                   help="z voxel size relative to x/y, e.g. 2 for 2x coarser z (default 1)")
    p.add_argument("--voxel-size", type=float, default=8.0,
                   help="x/y voxel size in nm stored with the volumes; z is this times "
                        "--anisotropy (default 8)")
    p.add_argument("--mean-radius", type=float, default=synthetic.SyntheticConfig.mean_radius,
                   help="median neurite radius in x/y voxels (default %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing volumes and preview in --out (otherwise any of them "
                        "existing is an error, found before anything is written)")
    _cli.add_common(p, "accepted for uniformity (this command draws no progress bars)")
    args = p.parse_args(argv)

    out = Path(args.out)
    paths = {"image": str(out / "image.zarr"), "labels": str(out / "labels.zarr")}
    # All three outputs checked before the first is written: none is replaced without --overwrite.
    _cli.check_outputs({"--out": [*paths.values(), str(out / "preview.png")]}, {},
                       overwrite=args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config = synthetic.SyntheticConfig(mean_radius=args.mean_radius)
    image, labels = synthetic.make_volume(args.shape, seed=args.seed, anisotropy=args.anisotropy,
                                          config=config)
    seconds = time.perf_counter() - t0
    voxel_size = (args.voxel_size * args.anisotropy, args.voxel_size, args.voxel_size)
    save_volume(paths["image"], image, voxel_size=voxel_size, overwrite=args.overwrite)
    save_volume(paths["labels"], labels, voxel_size=voxel_size, overwrite=args.overwrite)
    paths["preview"] = str(synthetic.save_preview(out / "preview.png", image, labels))
    sizes = synthetic.object_sizes(labels)
    print(f"generated {args.shape} (seed {args.seed}, anisotropy {args.anisotropy}) in {seconds:.1f} s: "
          f"{len(sizes)} objects, median {int(np.median(sizes))} voxels "
          f"(min {int(sizes.min())}, max {int(sizes.max())}); "
          f"image mean {image.mean():.1f} std {image.std():.1f}")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


if __name__ == "__main__":
    _cli.run(main)
