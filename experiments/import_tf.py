"""Import a google/ffn TensorFlow convstack checkpoint as an ffnjax Orbax checkpoint.

    python -m experiments.import_tf \\
        --tf-checkpoint ../shared/data/ffn_fib25_checkpoint/model.ckpt-27465036 \\
        --depth 12 --fov 33,33,33 --deltas 8,8,8 --out out/fib25_tf

TensorFlow is not needed. google/ffn's `model_args` give the depth and its
`fov_size`/`deltas` in x,y,z order; for the published cubic models the order
does not matter, otherwise pass them here as z,y,x. The result loads with
`ffnjax.checkpoints.load_checkpoint(OUT)` like any trained checkpoint; the
provenance (source path, global step, ignored variables) is in its meta.

`--tf-checkpoint` was called `--checkpoint` before; that spelling still works
but is deprecated: in every other command --checkpoint is an ffnjax workdir.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments import _cli
from ffnjax.checkpoints import save_model
from ffnjax.config import ModelConfig
from ffnjax.nets import param_count
from ffnjax.tf_import import import_ffn_checkpoint


IMPORT_MODEL = ModelConfig(depth=12, features=32, fov_size=(33, 33, 33), deltas=(8, 8, 8))


def parse_args(argv=None) -> argparse.Namespace:
    p = _cli.make_parser("import_tf", __doc__)
    p.add_argument("--tf-checkpoint", "--checkpoint", dest="tf_checkpoint", required=True,
                   metavar="PREFIX",
                   help="TensorFlow checkpoint prefix (PREFIX.index and PREFIX.data-* must "
                        "exist); --checkpoint is the old, deprecated spelling")
    _cli.add_flags(p, ModelConfig, _cli.with_help(
        _cli.MODEL_FLAGS, features="channels of each hidden convolution (google/ffn uses 32)"),
        base=IMPORT_MODEL)
    p.add_argument("--out", required=True, help="ffnjax workdir to write the Orbax checkpoint into")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step to save under (default: the TF global_step, else 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out that holds checkpoints already, replacing the one "
                        "at the same step (otherwise that is an error)")
    _cli.add_common(p, "accepted for uniformity (this command draws no progress bars)")
    return p.parse_args(argv)


def check_out(args: argparse.Namespace) -> None:
    """--out may not hold the TF checkpoint, nor (without --overwrite) checkpoints already:
    the import would add to or replace them."""
    prefix = Path(args.tf_checkpoint)
    _cli.check_outputs({"--out": args.out},
                       {"--tf-checkpoint": [str(prefix.with_name(prefix.name + ".index"))]},
                       existing_ok=("--out",))
    held = Path(args.out) / "checkpoints"
    if not args.overwrite and held.is_dir() and any(held.iterdir()):
        raise FileExistsError(f"--out {args.out} holds checkpoints already ({held}); pass "
                              "--overwrite to write into it, or choose another --out")


def main(argv=None) -> int:
    """Imports; bad input prints one error line and returns 2."""
    args = parse_args(argv)
    try:
        config = ModelConfig(**_cli.given(args, ModelConfig, _cli.MODEL_FLAGS))
        check_out(args)
        params, provenance = import_ffn_checkpoint(args.tf_checkpoint, config)
    except _cli.BAD_INPUT as e:
        return _cli.report_error(e, args.debug)
    step = args.step if args.step is not None else (provenance["global_step"] or 0)
    path = save_model(args.out, config, params, step=step, meta={"provenance": provenance})
    print(f"imported {provenance['tensors_imported']} of {provenance['tensors_in_checkpoint']} "
          f"tensors ({param_count(config):,} parameters) from {provenance['checkpoint']}")
    print(f"ignored: {', '.join(provenance['ignored']) or 'nothing'}")
    print(f"model config: {config.to_json()}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    _cli.run(main)
