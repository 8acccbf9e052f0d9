"""The one command-line layer shared by every `python -m experiments.*` command.

Five things every command does the same way:

- **Parsing numbers.** `numbers` reads comma-separated numbers ('z,y,x' and
  friends) and names the flag in its error; `zyx_arg` is its argparse type.
- **Boxes.** One syntax, `z0:z1,y0:y1,x0:x1` (Python slices without a step,
  either end may be left open), given with `--box` and read by the one box
  parser, `ffnjax.volume_spec.parse_box`, that the `SPEC@box` grammar of
  volume specs uses too. The older `--bbox z0,y0,x0,dz,dy,dx` (start and size)
  stays accepted and is converted to it (`region`).
- **Flags from the frozen dataclasses.** `add_flags` makes one flag per field
  of `TrainConfig`, `ModelConfig` or `InferenceOptions` (type, choices, z,y,x
  triples, repeatable per-volume lists and on/off switches follow from the
  field's annotation); `given` reads back the fields a user set. The help text
  of each field lives once, in `MODEL_FLAGS`, `TRAIN_FLAGS` and
  `INFERENCE_FLAGS`; a command may override a field's text or default.
- **Outputs.** `check_outputs` runs before any work: no output may be (or
  hold, or lie inside) a path the command reads, --overwrite or not; an
  existing output is refused unless --overwrite (or the command resumes it);
  an output that cannot be created is found before the compute, not after.
- **Errors.** A bad input ends the command with exactly one line
  `error: <what>, <which file/flag/value>` on stderr and exit status 2, no
  traceback; `--debug` re-raises with it (`run`, `report_error`). Usage errors
  found by argparse get the same one line (`Parser.error`).
- **Interruption.** Ctrl-C (SIGINT) and SIGTERM stop a command within
  seconds (`ffnjax.interrupt`): it saves what it can resume from, prints one
  line `interrupted by SIGTERM: <what was saved; how to resume>` and exits
  with 128 + the signal number (`run`).
- **JAX's persistent compilation cache.** Every command that compiles JAX
  code has `--compile-cache` / `--no-compile-cache` (`add_compile_cache`) and
  calls `use_compile_cache(args)` after parsing: compiled programs are kept
  under `compile_cache_dir()` ($XDG_CACHE_HOME/ffnjax/jax-compile, else
  ~/.cache/ffnjax/jax-compile), so a rerun loads them instead of compiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

from ffnjax import files, interrupt, volume_spec
from ffnjax.config import (COMPUTE_DTYPES, CONSENSUS_MODES, CONV_IMPLS, FOV_SPLITS,
                           GOOGLE_SEED_POLICIES, IMAGE_MEAN, IMAGE_STDDEV, INFERENCE_FACTS,
                           INFERENCE_MODES, LOSS_NORMALIZATIONS, MOVE_POLICIES, OPTIMIZERS,
                           PEAKS_METHODS, SCHEDULES, SEED_ORDERS, SEED_POLICIES, InferenceOptions,
                           ModelConfig, TrainConfig)

# Exceptions that mean "the input is bad" (their message names the input);
# anything else is a bug and keeps its traceback.
BAD_INPUT = (ValueError, OSError)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------

def error_line(e: BaseException) -> str:
    """The one stderr line for a bad input: 'error: <what>, <which>'.

    An OSError raised by the operating system (errno, strerror, filename) reads
    'error: no such file or directory, PATH'; any other message is kept as it
    is (ffnjax's messages name their input) with line breaks folded.
    """
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        names = ", ".join(str(n) for n in (e.filename, e.filename2) if n is not None)
        text = f"{e.strerror[0].lower()}{e.strerror[1:]}, {names}"
    else:
        text = str(e) or type(e).__name__
    return "error: " + " ".join(text.split())


def report_error(e: BaseException, debug: bool = False) -> int:
    """Prints `error_line(e)` to stderr and returns 2; with `debug`, re-raises `e`."""
    if debug:
        raise e
    print(error_line(e), file=sys.stderr)
    return 2


NOTHING_TO_RESUME = "nothing was saved to resume from; rerun the command to start again"


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """Runs a command's `main(argv)` as a program and exits.

    Bad input (BAD_INPUT) becomes one stderr line and exit status 2 unless
    `--debug` is among the arguments. SIGINT and SIGTERM stop it
    (`ffnjax.interrupt.handling`) with one line, `interrupted by <signal>:
    <how to resume>` (the `resume` the command attached, else
    NOTHING_TO_RESUME), and exit status 128 + the signal number. Otherwise
    the exit status is main's return value when that is an int, else 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with interrupt.handling():
            result = main(argv)
    except BAD_INPUT as e:
        raise SystemExit(report_error(e, "--debug" in argv)) from None
    except KeyboardInterrupt as e:
        stop = e if isinstance(e, interrupt.Interrupted) else interrupt.Interrupted()
        print(f"interrupted by {stop.name}: {stop.resume or NOTHING_TO_RESUME}", file=sys.stderr,
              flush=True)
        raise SystemExit(stop.exit_code) from None
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line too (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {' '.join(message.split())}; see {self.prog} --help\n")


def make_parser(command: str, doc: str | None) -> Parser:
    """The parser of `python -m experiments.<command>` with its module docstring."""
    return Parser(prog=f"python -m experiments.{command}", description=doc,
                  formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common(group, quiet: str = "no progress bars", quiet_aliases: Sequence[str] = ()) -> None:
    """`--quiet` (with old spellings `quiet_aliases`) and `--debug`, in every command."""
    note = f" (also spelled {', '.join(quiet_aliases)})" if quiet_aliases else ""
    group.add_argument("--quiet", *quiet_aliases, dest="quiet", action="store_true",
                       help=quiet + note)
    group.add_argument("--debug", action="store_true",
                       help="on bad input show the Python traceback instead of one error line")


# ----------------------------------------------------------------------------
# JAX's persistent compilation cache
# ----------------------------------------------------------------------------

# On by default: see add_compile_cache for what it saves.
COMPILE_CACHE_DEFAULT = True


def compile_cache_dir() -> Path:
    """Where the commands keep compiled JAX programs: $XDG_CACHE_HOME/ffnjax/jax-compile,
    or ~/.cache/ffnjax/jax-compile when XDG_CACHE_HOME is unset or empty."""
    return files.cache_home("jax-compile")


def add_compile_cache(group, default: bool = COMPILE_CACHE_DEFAULT) -> None:
    """`--compile-cache` / `--no-compile-cache`, for commands that compile JAX code."""
    state = "on" if default else "off"
    group.add_argument(
        "--compile-cache", action=argparse.BooleanOptionalAction, default=default,
        help=f"keep compiled JAX programs in {compile_cache_dir()} ($XDG_CACHE_HOME/ffnjax/"
             f"jax-compile) so that a rerun with the same model and shapes loads them instead of "
             f"compiling again; --no-compile-cache compiles afresh and writes nothing there "
             f"(default {state})")


def use_compile_cache(args: Any, directory: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache when `args.compile_cache` is true.

    Call it after parsing and before anything is compiled. Every compiled
    program is cached, however quick its compile or small its executable (JAX's
    defaults skip those under a second or a few bytes, which on CPU is most of
    them). A cache directory the user chose (JAX_COMPILATION_CACHE_DIR) is kept.
    The settings also go into the environment, so worker processes started
    later (segment_volume's Dask workers) cache into the same place.

    Args:
      args: parsed flags (or anything with a `compile_cache` attribute; a bool
        is taken as the answer itself).
      directory: the cache folder (default `compile_cache_dir()`).

    Returns:
      the cache folder in use, or None when the cache stays off.
    """
    enabled = args if isinstance(args, bool) else getattr(args, "compile_cache", False)
    if not enabled:
        return None
    import jax  # here: only commands that compile pay for importing JAX

    chosen = jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    path = Path(chosen or directory or compile_cache_dir()).expanduser()
    settings = {"jax_compilation_cache_dir": str(path),
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": -1}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)
    return path


# ----------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------

def paths_of(value: Any) -> list[str]:
    """The local paths a flag's value names: those of a volume spec (its read
    grammar included, `ffnjax.volume_spec.local_paths`), else the value as a
    plain file or folder path (a JSON report, a PNG, a workdir); none for a
    remote URL. A list or tuple gives the paths of each of its values (the
    files a command writes into its --out folder)."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in paths_of(v)]
    found = volume_spec.local_paths(value)
    if found:
        return found
    text = str(value)
    if "://" in text or volume_spec.is_json_spec(value):
        return []
    return [text]


def check_outputs(outputs: Mapping[str, Any], inputs: Mapping[str, Any], *,
                  overwrite: bool = False, existing_ok: Collection[str] = ()) -> None:
    """Refuses, before any work and without writing anything, outputs that
    would lose data or be found unwritable only after the compute.

    Args:
      outputs: {flag: what it names (a volume spec or a path, or a list of
        them; None = not given)} of everything the command writes.
      inputs: {flag: volume spec or path} of everything it reads.
      overwrite: the user passed --overwrite: existing outputs may be replaced.
      existing_ok: output flags whose existing path is expected (a resume
        file, the output of a run being resumed).

    Raises:
      ValueError: an output that is, holds or lies inside an input (whatever
        `overwrite` says), or two outputs at one path.
      FileExistsError: an existing output without --overwrite.
      NotADirectoryError / PermissionError: an output that cannot be created
        (`ffnjax.files.probe_writable`).
    """
    outs = [(flag, value, path) for flag, value in outputs.items() for path in paths_of(value)]
    ins = [(flag, value, path) for flag, value in inputs.items() for path in paths_of(value)]
    for oflag, ovalue, opath in outs:
        for iflag, ivalue, ipath in ins:
            if files.overlaps(opath, ipath):
                raise ValueError(f"{oflag} {ovalue} would overwrite the input {iflag} {ivalue} "
                                 "(the same path, or one inside the other); write to another "
                                 "path (--overwrite never allows this)")
    for i, (aflag, avalue, apath) in enumerate(outs):
        for bflag, bvalue, bpath in outs[i + 1:]:
            if aflag != bflag and files.overlaps(apath, bpath):
                raise ValueError(f"{aflag} {avalue} and {bflag} {bvalue} name the same path "
                                 "(or one lies inside the other); give each its own")
    for flag, _, path in outs:
        p = Path(path).expanduser()
        if (p.exists() or p.is_symlink()) and not overwrite and flag not in existing_ok:
            raise FileExistsError(f"{flag} {path} exists; pass --overwrite to replace it")
    for flag, _, path in outs:
        files.probe_writable(path, f"{flag}")


# ----------------------------------------------------------------------------
# Numbers and boxes
# ----------------------------------------------------------------------------

def numbers(text: Any, flag: str, n: int | None = 3, kind: type = int,
            minimum: float | None = None, strict: bool = False) -> tuple | None:
    """`n` comma-separated numbers of `kind` ('z,y,x' by default), or None for None.

    Args:
      text: 'a,b,c' (a tuple or list is accepted as already split).
      flag: the flag named in the error message.
      n: how many numbers (None: one or more).
      minimum: smallest allowed value (with `strict`, values must exceed it).

    Raises:
      ValueError: naming the flag and the text when it does not parse or does not fit.
    """
    if text is None:
        return None
    parts = text.replace(" ", "").split(",") if isinstance(text, str) else list(text)
    what = {int: "integers", float: "numbers"}.get(kind, kind.__name__)
    if minimum is not None:
        what = f"{what} {'>' if strict else '>='} {minimum:g}"
    count = "one or more" if n is None else {1: "one", 3: "three", 6: "six"}.get(n, str(n))
    shape = " z,y,x" if n == 3 else ""
    problem = ValueError(f"{flag} must be {count} comma-separated {what}{shape}, got {text!r}")
    try:
        vals = tuple(kind(v) for v in parts)
    except (TypeError, ValueError):
        raise problem from None
    if (n is not None and len(vals) != n) or not vals or (minimum is not None and any(
            v < minimum or (strict and v == minimum) for v in vals)):
        raise problem
    return vals


def zyx_arg(kind: type = int, n: int | None = 3, minimum: float | None = None,
            strict: bool = False) -> Callable[[str], tuple]:
    """An argparse `type=` reading `numbers`; argparse names the flag itself."""
    def convert(text: str) -> tuple:
        try:
            return numbers(text, "value", n, kind, minimum, strict)  # type: ignore[return-value]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None
    convert.__name__ = "z,y,x" if n == 3 else "list"
    return convert


def parse_box(text: str, flag: str = "--box") -> tuple[tuple[int | None, int | None], ...]:
    """'z0:z1,y0:y1,x0:x1' as three (start, stop) pairs; None where an end is left open.

    The one box parser, `ffnjax.volume_spec.parse_box` (the `SPEC@box` read
    grammar uses it too), with the flag named in its error.

    Raises:
      ValueError: naming the flag when the text is not three non-negative slices.
    """
    return volume_spec.parse_box(text, flag)


def bbox_as_box(text: str, flag: str = "--bbox") -> str:
    """The old 'z0,y0,x0,dz,dy,dx' (start and size) as the box 'z0:z1,y0:y1,x0:x1'.

    Raises:
      ValueError: naming the flag when it is not six integers, a start < 0 or a size <= 0.
    """
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        vals = []
    if len(vals) != 6:
        raise ValueError(f"{flag} must be six integers z0,y0,x0,dz,dy,dx, got {text!r}")
    start, size = vals[:3], vals[3:]
    if any(s < 0 for s in start) or any(s <= 0 for s in size):
        raise ValueError(f"{flag} {text!r}: start must be >= 0 and size > 0")
    return ",".join(f"{a}:{a + s}" for a, s in zip(start, size))


def box_start_size(box: str, shape: Sequence[int], flag: str = "--box", what: str = "volume",
                   given: str | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, size) z,y,x of a box inside a volume of `shape` (open ends reach its faces).

    Args:
      given: the text the user typed, when `box` was converted from it (named
        in the error).

    Raises:
      ValueError: naming the flag and the shape when the box is empty or leaves the volume.
    """
    shape = tuple(int(s) for s in shape)[:3]
    pairs = parse_box(box, flag)
    start = tuple(0 if a is None else a for a, _ in pairs)
    stop = tuple(n if b is None else b for (_, b), n in zip(pairs, shape))
    if any(b <= a for a, b in zip(start, stop)) or any(b > n for b, n in zip(stop, shape)):
        typed = f"{given!r} (box {box})" if given is not None else repr(box)
        raise ValueError(f"{flag} {typed} is empty or reaches outside the {what} of shape "
                         f"{shape} (z,y,x)")
    return start, tuple(b - a for a, b in zip(start, stop))


def add_box_flags(group, what: str) -> None:
    """`--box z0:z1,y0:y1,x0:x1` and its older spelling `--bbox z0,y0,x0,dz,dy,dx`."""
    g = group.add_mutually_exclusive_group()
    g.add_argument("--box", metavar="Z0:Z1,Y0:Y1,X0:X1", default=None,
                   help=f"{what}, as slices z,y,x (an end may be left open; default: all)")
    g.add_argument("--bbox", metavar="Z0,Y0,X0,DZ,DY,DX", default=None,
                   help="the same box as start and size z,y,x (the older spelling, still "
                        "accepted: it is converted to --box)")


def region(args: argparse.Namespace, shape: Sequence[int], what: str = "volume"
           ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, size) of `--box` or `--bbox` in a volume of `shape`; the whole volume by default.

    Raises:
      ValueError: naming the flag and its text when malformed or outside the volume.
    """
    if getattr(args, "bbox", None) is not None:
        return box_start_size(bbox_as_box(args.bbox), shape, "--bbox", what, given=args.bbox)
    if getattr(args, "box", None) is not None:
        return box_start_size(args.box, shape, "--box", what)
    return (0, 0, 0), tuple(int(s) for s in shape)[:3]


# ----------------------------------------------------------------------------
# Flags generated from the frozen dataclasses
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Flag:
    """How one dataclass field appears on the command line.

    Attributes:
      help: what the field does (its default is appended).
      names: option strings, the first is the main one (default '--field-name').
      aliases: other spellings accepted (older names kept working); the help
        says so.
      consts: extra switches that set the field to a fixed value, e.g.
        (('--bfloat16', 'bfloat16'),).
      repeat: the flag is given once per volume (collects a list).
      default_text: what the help calls the default (default: the field's value).
    """

    help: str
    names: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    consts: tuple[tuple[str, Any], ...] = ()
    repeat: bool = False
    default_text: str | None = None


CHOICES = {"optimizer": OPTIMIZERS, "move_policy": MOVE_POLICIES, "compute_dtype": COMPUTE_DTYPES,
           "conv_impl": CONV_IMPLS, "seed_policy": SEED_POLICIES + tuple(GOOGLE_SEED_POLICIES),
           "seed_order": SEED_ORDERS,
           "consensus_mode": CONSENSUS_MODES, "schedule": SCHEDULES,
           "loss_normalization": LOSS_NORMALIZATIONS, "peaks_method": PEAKS_METHODS,
           "fov_split": FOV_SPLITS}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def dest_of(name: str, table: Mapping[str, Flag]) -> str:
    """The argparse attribute of field `name`: its main option without dashes."""
    flag = table.get(name)
    main = flag.names[0] if flag is not None and flag.names else _option(name)
    return main.lstrip("-").replace("-", "_")


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if value else "none"
    return "none" if value == "" else str(value)


def add_flags(group, cls: type, table: Mapping[str, Flag], fields: Sequence[str] | None = None,
              base: Any = None) -> None:
    """Adds one flag per field of the frozen dataclass `cls` (all fields by default).

    Args:
      group: a parser or argument group.
      table: the Flag of every field added.
      fields: which fields, in this order.
      base: an instance whose values become the flags' argparse defaults (a
        command with its own defaults, like the demo). Without one every
        default is None, so an absent flag keeps whatever the caller merges it
        into (a config file, a checkpoint's facts, the dataclass default), and
        the help shows `cls()`'s value.
    """
    hints = typing.get_type_hints(cls)
    shown = base if base is not None else cls()
    for name in fields or [f.name for f in dataclasses.fields(cls)]:
        flag, hint = table[name], hints[name]
        names = flag.names or (_option(name),)
        default = None if base is None else getattr(base, name)
        help_text = f"{flag.help} (default {flag.default_text or _shown(getattr(shown, name))})"
        if flag.aliases:
            help_text += f"; also spelled {', '.join(flag.aliases)}"
        kw: dict[str, Any] = dict(dest=dest_of(name, table), default=default,
                                  help=help_text.replace("%", "%%"))
        args = typing.get_args(hint)
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple and flag.repeat:
            kw.update(action="append", type=args[0], metavar="SPEC" if args[0] is str else "V")
        elif typing.get_origin(hint) is tuple:
            variable = len(args) == 2 and args[1] is Ellipsis
            kw.update(type=zyx_arg(args[0], None if variable else len(args)),
                      metavar="V1,V2,..." if variable else "Z,Y,X")
        elif name in CHOICES:
            kw["choices"] = CHOICES[name]
        else:
            kw["type"] = hint
        group.add_argument(*names, *flag.aliases, **kw)
        for option, value in flag.consts:
            same = (("--" if value else "--no-") + names[0][2:]) if hint is bool else f"{names[0]} {value}"
            group.add_argument(option, dest=kw["dest"], action="store_const", const=value,
                               default=default, help=f"same as {same}")


def given(args: argparse.Namespace, cls: type, table: Mapping[str, Flag],
          fields: Sequence[str] | None = None) -> dict[str, Any]:
    """{field: value} of the flags of `cls` that hold a value (None = not given)."""
    names = fields or [f.name for f in dataclasses.fields(cls)]
    values = {name: getattr(args, dest_of(name, table), None) for name in names}
    return {k: v for k, v in values.items() if v is not None}


def build(cls: type, table: Mapping[str, Flag], base: Mapping[str, Any],
          flags: Mapping[str, Any]) -> Any:
    """`cls(**base, **flags)`, where a bad value given by one flag is named by
    that flag: 'error: --batch-size 0: batch_size must be >= 1, got 0'.

    Args:
      base: values from elsewhere (a checkpoint's facts, a config file).
      flags: {field: value} of the flags given (`given`).

    Raises:
      ValueError: the dataclass's message, prefixed with the flag and its
        value when that flag's value alone is refused the same way.
    """
    try:
        return cls(**{**base, **flags})
    except ValueError as e:
        for name, value in flags.items():
            try:
                cls(**{name: value})
            except ValueError as alone:
                if str(alone) != str(e):   # refused with other values too: not this flag alone
                    continue
                flag = table.get(name)
                option = flag.names[0] if flag is not None and flag.names else _option(name)
                raise ValueError(f"{option} {_shown(value)}: {e}") from e
        raise


def flags_of(values: Mapping[str, Any], table: Mapping[str, Flag]) -> list[str]:
    """The command-line flags that give `values` ({field: value}, e.g. `given`)
    to a command whose flags come from `table`: the inverse of parsing them."""
    out: list[str] = []
    for name, value in values.items():
        flag = table[name]
        option = flag.names[0] if flag.names else _option(name)
        if isinstance(value, bool):
            out.append(option if value else "--no-" + option[2:])
        elif isinstance(value, (tuple, list)):
            out += [option, ",".join(str(v) for v in value)]
        else:
            out += [option, str(value)]
    return out


def with_help(table: Mapping[str, Flag], **texts: str) -> dict[str, Flag]:
    """A copy of `table` where the named fields get a command's own help text."""
    return {k: dataclasses.replace(f, help=texts[k]) if k in texts else f for k, f in table.items()}


MODEL_FLAGS: dict[str, Flag] = {
    "depth": Flag("convstack depth: residual levels counting the input pair (google/ffn "
                  "model_args 'depth')"),
    "features": Flag("features (channels) of every hidden convolution"),
    "fov_size": Flag("field of view z,y,x, odd", names=("--fov",), aliases=("--fov-size",)),
    "deltas": Flag("FOV move step z,y,x"),
    "compute_dtype": Flag("the network's compute dtype (parameters stay float32)",
                          consts=(("--bfloat16", "bfloat16"),)),
    "conv_impl": Flag("how 3x3x3 convolutions are computed ('auto': the fastest correct one "
                      "for the backend; 'native': lax.conv)"),
}

INFERENCE_FLAGS: dict[str, Flag] = {
    "image_mean": Flag("image normalisation mean: net input is (x - mean) / stddev"),
    "image_stddev": Flag("image normalisation standard deviation"),
    "init_activation": Flag("probability written at the seed voxel"),
    "pad_value": Flag("probability of canvas voxels not visited yet"),
    "move_threshold": Flag("a FOV face maximum must reach this probability for a move"),
    "segment_threshold": Flag("voxels at or above this probability join the object"),
    "min_segment_size": Flag("objects with fewer voxels are dropped (their seed is not retried)"),
    "min_boundary_dist": Flag("z,y,x: a seed this close to an existing object is skipped"),
    "disconnected_seeds": Flag("a voxel once driven below 0.5 is not revived (google/ffn "
                               "disco_seeds)"),
    "max_steps": Flag("FOV evaluations allowed per object (0: bounded only by the volume)"),
    "seed_policy": Flag("where fills start: 'peaks' (maxima of the distance to image edges), "
                        "'grid', or another policy of ffnjax.seed_policies; google/ffn's names "
                        "(PolicyPeaks2d, SequentialPolicies, ...) are accepted too"),
    "seed_policy_args": Flag("the seed policy's arguments as a JSON object (google/ffn's "
                             "seed_policy_args), e.g. '{\"min_distance\": 3}'"),
    "seed_grid_step": Flag("z,y,x spacing of the 'grid' seed policy"),
    "seed_order": Flag("'zyx' (ascending z,y,x: google/ffn's order) or 'distance' (deepest "
                       "seeds first: descending distance to the nearest image edge)"),
    "batch_size": Flag("FOV positions evaluated per network call (1 = google/ffn's exact order)"),
    "consensus": Flag("also segment in reverse seed order and combine both passes "
                      "(--consensus-mode)"),
    "consensus_mode": Flag("'split' (one object per overlapping pair, google/ffn's "
                           "oversegmentation consensus) or 'contested' (keep the forward "
                           "objects, unlabel voxels the reverse pass gives to a "
                           "non-corresponding object)"),
    "downsample": Flag("z,y,x factors: segment the image downsampled by these (block mean) "
                       "and write labels on the native grid (ffnjax.scale)"),
    "peaks_method": Flag("how the 'peaks' seed policy finds its maxima: 'ffnjax' or "
                         "'google_ffn' (google/ffn's PolicyPeaks exactly)"),
    "disco_active_fraction": Flag("with --disconnected-seeds, freeze only FOVs where more than "
                                  "this fraction of the prediction reaches --move-threshold "
                                  "(google/ffn's disco_seed_threshold); negative: always"),
    "skip_segmented": Flag("do not evaluate FOVs centred on voxels of earlier objects "
                           "(google/ffn's Canvas.is_valid_pos)"),
    "fov_split": Flag("with --batch-size 1 on a CPU, split each FOV's forward pass over the "
                      "host devices (one per core) by z slabs, as fast as the cores allow and "
                      "equal to one device's result: 'auto' where it pays (nets whose 3x3x3 "
                      "convolution costs >= 0.2 GFLOP per FOV, e.g. google/ffn's depth-12 "
                      "33^3), 'on', 'off' (ffnjax.fovsplit)"),
}

def _default_text(obj: Any, name: str) -> str:
    """A default as help prints it: numbers with :g, z,y,x triples as 'z,y,x'."""
    v = getattr(obj, name)
    return ",".join(str(x) for x in v) if isinstance(v, tuple) else f"{v:g}"


def add_compat_flag(group) -> None:
    """`--compat NAME`: a named inference mode (`InferenceOptions.<NAME>`) under the flags."""
    group.add_argument("--compat", choices=INFERENCE_MODES, default=None,
                       help="infer as this implementation does: 'google_ffn' is "
                            "InferenceOptions.google_ffn() (google/ffn's seeds, FOV moves and "
                            "objects, voxel for voxel with the same model: "
                            "docs/google_ffn_parity.md), 'ffnjax' the defaults; option flags "
                            "given beside it win (default ffnjax)")


def inference_options(args: argparse.Namespace, defaults: Mapping[str, Any] | None = None
                      ) -> InferenceOptions:
    """InferenceOptions of the option flags given, over `defaults` (e.g. a
    checkpoint's facts), in the mode of `--compat` (ffnjax's when absent); a
    bad value is named by its flag (`build`)."""
    mode = getattr(InferenceOptions, getattr(args, "compat", None) or "ffnjax")
    return build(mode, INFERENCE_FLAGS, defaults or {},
                 given(args, InferenceOptions, INFERENCE_FLAGS))


# The InferenceOptions a checkpoint records from its training (see
# ffnjax.checkpoints.inference_defaults); their help says where the default comes from.
INFERENCE_FLAGS_FROM_CHECKPOINT: dict[str, Flag] = {
    **INFERENCE_FLAGS,
    **{k: dataclasses.replace(INFERENCE_FLAGS[k], default_text=(
        f"the value the checkpoint was trained with, else {_default_text(InferenceOptions(), k)}"))
       for k in INFERENCE_FACTS},
}

TRAIN_FLAGS: dict[str, Flag] = {
    # run
    "steps": Flag("total optimiser steps"),
    "seed": Flag("seed of parameters, sampler and move orders"),
    "distributed": Flag("join a multi-process run whose coordinator, process count and id "
                        "come from the cluster (TPU pod, SLURM, Kubernetes, "
                        "JAX_COORDINATOR_ADDRESS); each process feeds its share of the batch"),
    "input_streams": Flag("independent sampler streams the global batch is drawn from, each "
                          "seeded by its index; the processes split them evenly, so one process "
                          "with --input-streams N sees what N processes see",
                          default_text="0: one per process"),
    "init_from": Flag("workdir whose latest parameters (its EMA when it kept one) start a "
                      "fresh run (e.g. an imported google/ffn model); without model flags or "
                      "--config the network is the one it holds"),
    # data
    "images": Flag("training image volume (any spec ffnjax.volumes reads, optionally "
                   "SPEC@z0:z1,y0:y1,x0:x1, or SPEC1+SPEC2 stacked along z); repeat for several "
                   "volumes", names=("--image",), repeat=True),
    "labels": Flag("label volume of the preceding --image (same shape, integer ids, 0 = "
                   "unlabelled); repeat once per --image", repeat=True),
    "masks": Flag("exclusion mask per volume (non-zero voxels are never centres and carry no "
                  "loss); give one per --image or none", names=("--mask",), repeat=True),
    "image_means": Flag("normalisation mean, once per volume", names=("--image-mean",),
                        repeat=True, default_text=f"{IMAGE_MEAN:g} for each"),
    "image_stddevs": Flag("normalisation std, once per volume", names=("--image-stddev",),
                          repeat=True, default_text=f"{IMAGE_STDDEV:g} for each"),
    "synthetic_shape": Flag("z,y,x of the synthetic volume used without --image"),
    "synthetic_seed": Flag("seed of the synthetic volume"),
    "synthetic_radius": Flag("median neurite radius of the synthetic volume"),
    "min_object_size": Flag("objects smaller than this are background for sampling"),
    "partition_thresholds": Flag("balanced sampling: increasing bin edges in (0, 1) of the "
                                 "fraction of same-object voxels around a centre (google/ffn's "
                                 "compute_partitions)"),
    "cache_dir": Flag("cache balanced-sampling partitions here"),
    "downsample": Flag("z,y,x factors: train at this coarser scale (images block-averaged, "
                       "labels subsampled; ffnjax.scale); the checkpoint records them and "
                       "segment defaults to them"),
    "full_crop_margin": Flag("centres keep the whole example crop inside the volume; "
                             "--no-full-crop-margin (or --partial-crops) lets them come within "
                             "FOV//2 of a border, crop voxels outside carrying no loss",
                             consts=(("--partial-crops", False),)),
    "augment": Flag("random reflections and y,x transposition (--no-augment turns every "
                    "augmentation off)"),
    "transpose_yx": Flag("with --augment, also transpose y and x at random"),
    "brightness": Flag("brightness jitter amplitude"),
    "contrast": Flag("contrast jitter amplitude"),
    "permute_axes": Flag("random permutation of all three axes (a cubic crop: isotropic voxels); "
                         "replaces the y,x transposition"),
    "elastic_alpha": Flag("elastic warp: displacement std in voxels (0 = off)"),
    "elastic_sigma": Flag("elastic warp: spacing in voxels of the smooth displacement's "
                          "control points"),
    "rotation_degrees": Flag("random rotation up to this angle (0 = off), about z unless "
                             "--rotation-3d"),
    "rotation_3d": Flag("rotate about a random 3-D axis (isotropic voxels) instead of z"),
    "misalign_prob": Flag("probability of a section misalignment: every section from a random "
                          "z on shifts in y,x"),
    "misalign_max": Flag("largest misalignment shift in voxels"),
    "missing_section_prob": Flag("probability that one image section is replaced by the "
                                 "crop's mean"),
    "out_of_focus_prob": Flag("probability that one image section is blurred"),
    "out_of_focus_sigma": Flag("Gaussian sigma (voxels, in y,x) of the out-of-focus blur"),
    "prefetch": Flag("batches prepared ahead by the background input thread"),
    "val_images": Flag("held-out image volume for validation; repeatable", names=("--val-image",),
                       repeat=True),
    "val_labels": Flag("labels of the preceding --val-image; repeatable", repeat=True),
    "val_every": Flag("steps between validations"),
    "val_examples": Flag("fixed held-out examples per validation"),
    # optimisation
    "batch_size": Flag("global batch, a multiple of the device count"),
    "learning_rate": Flag("peak learning rate"),
    "optimizer": Flag("'adam' or 'sgd' (with --momentum)"),
    "momentum": Flag("momentum of --optimizer sgd"),
    "warmup_steps": Flag("linear warmup before cosine decay"),
    "end_lr_fraction": Flag("the cosine decay ends at learning rate times this"),
    "clip_norm": Flag("global gradient-norm clipping (0 disables)"),
    "clip_value": Flag("per-entry gradient clipping to +-this (google/ffn: 0.7; 0 disables)"),
    "schedule": Flag("learning rate after the warmup: 'cosine' decay to --end-lr-fraction, "
                     "'constant', or 'exponential' (times --lr-decay-factor every "
                     "--lr-decay-steps)"),
    "lr_decay_factor": Flag("--schedule exponential: the factor per --lr-decay-steps"),
    "lr_decay_steps": Flag("--schedule exponential: steps per decay"),
    "loss_normalization": Flag("'weight' (loss sum over the summed weight) or 'voxels' "
                               "(over every FOV voxel: google/ffn's reduce_mean)"),
    "ema_decay": Flag("keep a moving average of the weights with this decay (0 = none); "
                      "checkpoints serve it for inference"),
    "fov_moves": Flag("lattice radius of in-example FOV moves, 0 = centre only"),
    "move_policy": Flag("'fixed' (centre, then shuffled neighbours) or 'max_pred_moves' "
                        "(inference's face-max rule)"),
    "max_moves": Flag("cap on FOV moves per example beyond the centre, 0 = none"),
    "move_threshold": Flag("probability a move needs"),
    "update_per_fov": Flag("one optimiser step per FOV slot, as google/ffn trains; "
                           "--no-update-per-fov: one step per batch on the summed losses of all "
                           "its FOVs, the same compute"),
    "seed_prob": Flag("initial mask probability at the centre voxel and soft target inside; "
                      "recorded in the checkpoint as inference's --init-activation"),
    "pad_prob": Flag("initial mask probability elsewhere and soft target outside; recorded in "
                     "the checkpoint as inference's --pad-value"),
    # logging and checkpoints
    "log_every": Flag("steps between metric lines"),
    "checkpoint_every": Flag("steps between checkpoints"),
    "image_every": Flag("steps between example PNGs"),
    "keep_checkpoints": Flag("checkpoints kept"),
}
