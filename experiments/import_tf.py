"""Import a google/ffn TensorFlow convstack checkpoint as an ffnjax Orbax checkpoint.

    python -m experiments.import_tf \\
        --checkpoint ../shared/data/ffn_fib25_checkpoint/model.ckpt-27465036 \\
        --depth 12 --fov 33,33,33 --deltas 8,8,8 --out out/fib25_tf

TensorFlow is not needed. google/ffn's `model_args` give the depth and its
`fov_size`/`deltas` in x,y,z order; for the published cubic models the order
does not matter, otherwise pass them here as z,y,x. The result loads with
`ffnjax.checkpoints.load_checkpoint(OUT)` like any trained checkpoint; the
provenance (source path, global step, ignored variables) is in its meta.
"""

from __future__ import annotations

import argparse
import sys

from ffnjax.checkpoints import save_model
from ffnjax.config import ModelConfig
from ffnjax.nets import param_count
from ffnjax.tf_import import import_ffn_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.import_tf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="TensorFlow checkpoint prefix (PREFIX.index and PREFIX.data-* must exist)")
    p.add_argument("--depth", type=int, default=12,
                   help="convstack depth (google/ffn model_args 'depth'; default 12)")
    p.add_argument("--features", type=int, default=32,
                   help="channels of each hidden convolution (google/ffn uses 32; default 32)")
    p.add_argument("--fov", default="33,33,33", help="field of view z,y,x (default 33,33,33)")
    p.add_argument("--deltas", default="8,8,8", help="FOV move step z,y,x (default 8,8,8)")
    p.add_argument("--out", required=True, help="ffnjax workdir to write the Orbax checkpoint into")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step to save under (default: the TF global_step, else 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = ModelConfig(depth=args.depth, features=args.features, fov_size=args.fov,
                             deltas=args.deltas)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        params, provenance = import_ffn_checkpoint(args.checkpoint, config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    step = args.step if args.step is not None else (provenance["global_step"] or 0)
    path = save_model(args.out, config, params, step=step, meta={"provenance": provenance})
    print(f"imported {provenance['tensors_imported']} of {provenance['tensors_in_checkpoint']} "
          f"tensors ({param_count(config):,} parameters) from {provenance['checkpoint']}")
    print(f"ignored: {', '.join(provenance['ignored']) or 'nothing'}")
    print(f"model config: {config.to_json()}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
