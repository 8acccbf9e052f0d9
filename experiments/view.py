"""Look at an image and a segmentation in a local Neuroglancer viewer.

    python -m experiments.view --image SPEC --segmentation SPEC

Starts Neuroglancer's web server on 127.0.0.1 (only this machine can connect;
use `ssh -L PORT:127.0.0.1:PORT host` to look from elsewhere), prints the URL
to open in a browser and serves until Ctrl-C. zarr/N5/precomputed volumes are
streamed chunk by chunk. `--png` writes a slice montage instead of (or as well
as) serving; `--no-block` builds the viewer, prints its URL and state, and exits.
"""

from __future__ import annotations

import argparse
import json
import time

from experiments import _cli
from ffnjax.view import make_viewer, save_montage


def build_parser() -> argparse.ArgumentParser:
    ap = _cli.make_parser("view", __doc__)
    ap.add_argument("--image", default=None, help="image volume spec (z,y,x)")
    ap.add_argument("--segmentation", default=None, help="segmentation volume spec (z,y,x)")
    ap.add_argument("--bind", default="127.0.0.1",
                    help="address the viewer's server listens on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=0, help="server port (default: any free port)")
    ap.add_argument("--png", default=None,
                    help="write a PNG montage of z slices (image | coloured objects) here")
    ap.add_argument("--slices", type=int, default=4, help="z slices in the montage (default 4)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing --png (otherwise that is an error)")
    ap.add_argument("--no-block", action="store_true",
                    help="build the viewer, print its URL and state JSON, and exit")
    ap.add_argument("--no-viewer", action="store_true",
                    help="only write --png (required with it), start no server")
    _cli.add_common(ap, "accepted for uniformity (this command draws no progress bars)")
    return ap


def main(argv: list[str] | None = None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.image is None and args.segmentation is None:
        parser.error("give --image, --segmentation or both")
    if args.no_viewer and not args.png:
        parser.error("--no-viewer starts no viewer and leaves only --png to do, but no --png was "
                     "given; add --png OUT.png or drop --no-viewer")
    if args.png:
        if args.image is None or args.segmentation is None:
            parser.error("--png needs both --image and --segmentation")
        _cli.check_outputs({"--png": args.png},
                           {"--image": args.image, "--segmentation": args.segmentation},
                           overwrite=args.overwrite)
        print("montage:", save_montage(args.png, args.image, args.segmentation, n_slices=args.slices))
    if args.no_viewer:
        return None
    viewer = make_viewer(args.image, args.segmentation, bind_address=args.bind, port=args.port)
    print(viewer.get_viewer_url(), flush=True)
    if args.no_block:
        print(json.dumps(viewer.state.to_json(), indent=1))
        return viewer
    print("serving; press Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    return viewer


if __name__ == "__main__":
    _cli.run(main)
