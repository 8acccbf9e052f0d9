"""google/ffn's `InferenceRequest` text files, read without TensorFlow.

A migrating lab's inference runs are described by request files such as
google/ffn's `configs/inference_training_sample2.pbtxt`::

    image { hdf5: "grayscale_maps.h5:raw" }
    image_mean: 128
    image_stddev: 33
    seed_policy: "PolicyPeaks"
    model_checkpoint_path: "models/fib25/model.ckpt-27465036"
    model_name: "convstack_3d.ConvStack3DFFNModel"
    model_args: "{\\"depth\\": 12, \\"fov_size\\": [33, 33, 33], \\"deltas\\": [8, 8, 8]}"
    segmentation_output_dir: "results/fib25/training2"
    inference_options { init_activation: 0.95 pad_value: 0.05 move_threshold: 0.9
                        min_boundary_dist { x: 1 y: 1 z: 1 } segment_threshold: 0.6
                        min_segment_size: 1000 }

`read_request(path)` parses one with protobuf's own text-format parser into
message classes built here at run time from the fields of google/ffn's
`inference.proto` (`request_message_class`; no generated code, no
TensorFlow), so the grammar is protobuf's and a field google/ffn does not
have is an error naming it. `Request` is what ffnjax makes of it:

* `image`, `init_segmentation`, mask volumes: a `DecoratedVolume`'s `hdf5`
  'file:dataset' becomes the `ffnjax.volumes` spec 'file:dataset'; ffnjax
  also accepts `tensorstore: "<JSON spec>"` there (any TensorStore spec);
  `volinfo` volumes and `decorator_specs` are Google-internal: an error.
* the options: `InferenceOptions.google_ffn(...)` with the request's
  normalisation, `inference_options`, `seed_policy` and `seed_policy_args`
  (`request_options`); google/ffn's proto defaults (0) where the request
  leaves an integer field unset, and an error where it leaves a probability
  or the normalisation unset (google/ffn would take logit(0) = -inf or
  divide by 0). `disco_seed_threshold` < 0 turns the disconnected-seed rule
  off, as in google/ffn.
* the model: `model_name` must be google/ffn's `ConvStack3DFFNModel`;
  `model_args` give depth, fov_size and deltas (x,y,z there, z,y,x in the
  `ModelConfig`); `model_checkpoint_path` is a TensorFlow checkpoint prefix
  (imported on the fly, `ffnjax.tf_import`) or an ffnjax workdir.
* `masks`, `seed_masks`, `shift_mask` (+ `_fov`, `_scale`, `_threshold`):
  `ffnjax.restrict`. A `coordinate_expression` mask (Python that google/ffn
  evals) is refused.
* `segmentation_output_dir`: where the outputs go, in google/ffn's layout
  (`ffnjax.gffn_output`); `checkpoint_interval`: seconds between resume states.

Fields ffnjax does not implement are an error naming them when set to
anything but their default: `reference_histogram`, `histogram_masks`,
`self_prediction`, a `movement_policy_name` other than
FaceMaxMovementPolicy, `movement_policy_args`, `consistency_threshold` > 0,
an alignment other than NO_ALIGNMENT. `batch_size` and
`concurrent_requests` are accepted and change nothing: they batch several
subvolumes in google/ffn, never the FOVs of one fill.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

from ffnjax.config import InferenceOptions, ModelConfig, json_object
from ffnjax.restrict import MaskChannel, MaskSource

# (name, number, type, label, message type or default); google/ffn's inference.proto.
_S, _F, _I32, _I64, _U64, _B = "string", "float", "int32", "int64", "uint64", "bool"
_FIELDS: dict[str, list[tuple]] = {
    "Vector3j": [("x", 1, _I64), ("y", 2, _I64), ("z", 3, _I64)],
    "BoundingBox": [("start", 1, "Vector3j"), ("size", 2, "Vector3j"), ("description", 3, _S),
                    ("object_label", 4, _U64)],
    "DecoratedVolume": [("volinfo", 1, _S, "volume_path"), ("hdf5", 3, _S, "volume_path"),
                        ("tensorstore", 4, _S, "volume_path"), ("decorator_specs", 2, _S)],
    "MaskChannelConfig": [("channel", 1, _I32), ("min_value", 2, _F), ("max_value", 3, _F),
                          ("values", 5, _U64, "repeated"), ("invert", 4, _B)],
    "ImageMaskOptions": [("channels", 1, "MaskChannelConfig", "repeated")],
    "VolumeMaskOptions": [("mask", 1, "DecoratedVolume"),
                          ("channels", 2, "MaskChannelConfig", "repeated")],
    "CoordinateExpressionOptions": [("expression", 1, _S)],
    "MaskConfig": [("volume", 1, "VolumeMaskOptions", "source"),
                   ("image", 2, "ImageMaskOptions", "source"),
                   ("coordinate_expression", 3, "CoordinateExpressionOptions", "source"),
                   ("invert", 4, _B)],
    "InferenceOptions": [("init_activation", 1, _F), ("pad_value", 2, _F),
                         ("move_threshold", 3, _F), ("consistency_threshold", 4, _F),
                         ("disco_seed_threshold", 5, _F), ("min_boundary_dist", 6, "Vector3j"),
                         ("segment_threshold", 7, _F), ("min_segment_size", 8, _I32)],
    "SelfPredictionOptions": [("threshold", 1, _F), ("orig_threshold", 2, _F)],
    "AlignmentOptions": [("type", 1, "AlignType"), ("save_raw", 6, _B)],
    "InferenceRequest": [
        ("image", 24, "DecoratedVolume"), ("image_mean", 2, _F), ("image_stddev", 3, _F),
        ("reference_histogram", 4, _S), ("histogram_masks", 26, "MaskConfig", "repeated"),
        ("masks", 5, "MaskConfig", "repeated"), ("seed_masks", 30, "MaskConfig", "repeated"),
        ("shift_mask", 6, "DecoratedVolume"), ("shift_mask_fov", 22, "BoundingBox"),
        ("shift_mask_scale", 7, _I32), ("shift_mask_threshold", 8, _I32),
        ("movement_policy_name", 9, _S), ("movement_policy_args", 10, _S),
        ("model_name", 11, _S), ("model_args", 12, _S), ("model_checkpoint_path", 13, _S),
        ("batch_size", 27, _I32), ("concurrent_requests", 28, _I32),
        ("inference_options", 14, "InferenceOptions"), ("segmentation_output_dir", 15, _S),
        ("checkpoint_interval", 16, _I32), ("seed_policy", 17, _S), ("seed_policy_args", 19, _S),
        ("self_prediction", 18, "SelfPredictionOptions"),
        ("alignment_options", 20, "AlignmentOptions"),
        ("init_segmentation", 25, "DecoratedVolume")],
}
_ALIGN_TYPES = ("UNKNOWN_ALIGNMENT", "NO_ALIGNMENT", "TRANSLATION", "RIGID", "SIMILARITY", "AFFINE")
CONVSTACK_NAMES = ("convstack_3d.ConvStack3DFFNModel",
                   "ffn.training.models.convstack_3d.ConvStack3DFFNModel")
MOVEMENT_POLICIES = ("", "FaceMaxMovementPolicy", "movement.FaceMaxMovementPolicy",
                     "ffn.inference.movement.FaceMaxMovementPolicy")


@functools.lru_cache(maxsize=1)
def request_message_class():
    """google/ffn's `InferenceRequest` message class, built from `_FIELDS` in
    a private descriptor pool (protobuf's text format then parses requests)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    kinds = descriptor_pb2.FieldDescriptorProto
    scalar = {_S: kinds.TYPE_STRING, _F: kinds.TYPE_FLOAT, _I32: kinds.TYPE_INT32,
              _I64: kinds.TYPE_INT64, _U64: kinds.TYPE_UINT64, _B: kinds.TYPE_BOOL}
    f = descriptor_pb2.FileDescriptorProto(name="ffnjax_inference_request.proto", package="ffn",
                                           syntax="proto2")
    enum = f.enum_type.add(name="AlignType")
    for i, name in enumerate(_ALIGN_TYPES):
        enum.value.add(name=name, number=i)
    for message, fields in _FIELDS.items():
        m = f.message_type.add(name=message)
        oneofs: list[str] = []
        for name, number, kind, *extra in fields:
            field = m.field.add(name=name, number=number)
            field.label = kinds.LABEL_REPEATED if "repeated" in extra else kinds.LABEL_OPTIONAL
            if kind in scalar:
                field.type = scalar[kind]
            else:
                field.type = kinds.TYPE_ENUM if kind == "AlignType" else kinds.TYPE_MESSAGE
                field.type_name = f".ffn.{kind}"
            group = [e for e in extra if e != "repeated"]
            if group:
                if group[0] not in oneofs:
                    oneofs.append(group[0])
                    m.oneof_decl.add(name=group[0])
                field.oneof_index = oneofs.index(group[0])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("ffn.InferenceRequest"))


def parse_request_text(text: str, where: str = "request") -> Any:
    """The InferenceRequest message of `text`; ValueError naming `where`, the
    line and the field on a syntax error or an unknown field."""
    from google.protobuf import text_format
    message = request_message_class()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ValueError(f"{where}: {e} (google/ffn's InferenceRequest fields: "
                         f"docs/google_ffn_parity.md)") from None
    return message


def volume_spec(volume: Any, field: str, where: str) -> str:
    """The `ffnjax.volumes` spec of a DecoratedVolume message ('' when unset)."""
    kind = volume.WhichOneof("volume_path")
    if volume.HasField("decorator_specs"):
        raise ValueError(f"{where}: {field}.decorator_specs is not supported (google/ffn's "
                         "VolumeStore decorators)")
    if kind is None:
        return ""
    if kind == "volinfo":
        raise ValueError(f"{where}: {field}.volinfo is not supported (Google-internal "
                         "VolumeStore); give the volume as hdf5: 'file:dataset' or tensorstore")
    text = getattr(volume, kind)
    if kind == "hdf5" and len(text.split(":")) != 2:
        raise ValueError(f"{where}: {field}.hdf5 must be 'file_path:dataset', got {text!r}")
    return text


def mask_sources(configs: Any, field: str, where: str) -> tuple[MaskSource, ...]:
    """`ffnjax.restrict.MaskSource`s of repeated MaskConfig messages."""
    out = []
    for i, c in enumerate(configs):
        kind, name = c.WhichOneof("source"), f"{field}[{i}]"
        if kind == "coordinate_expression":
            raise ValueError(f"{where}: {name}.coordinate_expression is not supported (google/ffn "
                             "evaluates it as Python); give the mask as a volume")
        if kind is None:
            raise ValueError(f"{where}: {name} has no source (volume or image)")
        spec = volume_spec(c.volume.mask, f"{name}.volume.mask", where) if kind == "volume" else ""
        if kind == "volume" and not spec:
            raise ValueError(f"{where}: {name}.volume.mask names no volume")
        channels = tuple(MaskChannel(ch.channel, ch.min_value, ch.max_value, tuple(ch.values),
                                     ch.invert) for ch in getattr(c, kind).channels)
        out.append(MaskSource(spec, channels, c.invert))
    return tuple(out)


def _zyx(vector: Any) -> tuple[int, int, int]:
    return int(vector.z), int(vector.y), int(vector.x)


def _refuse_unsupported(r: Any, where: str) -> None:
    """ValueError naming the first set field that ffnjax does not implement."""
    io = r.inference_options
    problems = [
        (r.reference_histogram or len(r.histogram_masks), "reference_histogram / histogram_masks "
         "(histogram matching)"),
        (r.HasField("self_prediction"), "self_prediction (self-prediction halting)"),
        (r.movement_policy_name not in MOVEMENT_POLICIES,
         f"movement_policy_name {r.movement_policy_name!r} (only FaceMaxMovementPolicy)"),
        (r.movement_policy_args, "movement_policy_args"),
        (io.consistency_threshold > 0, "inference_options.consistency_threshold > 0 (repeated "
         "predictions at one position)"),
        (r.alignment_options.type not in (0, 1), "alignment_options.type other than NO_ALIGNMENT"),
        (r.alignment_options.save_raw, "alignment_options.save_raw")]
    for bad, what in problems:
        if bad:
            raise ValueError(f"{where}: {what} is not supported by ffnjax")


def request_options(r: Any, where: str = "request") -> InferenceOptions:
    """The InferenceOptions a parsed request asks for (see the module docstring)."""
    io = r.inference_options
    for msg, name in [(r, "image_mean"), (r, "image_stddev")] + [
            (io, n) for n in ("init_activation", "pad_value", "move_threshold",
                              "segment_threshold")]:
        if not msg.HasField(name):
            prefix = "" if msg is r else "inference_options."
            raise ValueError(f"{where}: {prefix}{name} is unset (google/ffn would use 0); set it")
    if not r.seed_policy:
        raise ValueError(f"{where}: seed_policy is unset (e.g. seed_policy: \"PolicyPeaks\")")
    disco = io.disco_seed_threshold
    try:
        options = InferenceOptions.google_ffn(
            image_mean=r.image_mean, image_stddev=r.image_stddev,
            init_activation=io.init_activation, pad_value=io.pad_value,
            move_threshold=io.move_threshold, segment_threshold=io.segment_threshold,
            min_segment_size=io.min_segment_size, min_boundary_dist=_zyx(io.min_boundary_dist),
            disconnected_seeds=disco >= 0, disco_active_fraction=max(disco, 0.0),
            seed_policy=r.seed_policy, seed_policy_args=r.seed_policy_args)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return options


def request_model(r: Any, where: str = "request") -> ModelConfig | None:
    """The ModelConfig of `model_name` / `model_args` (None when both are unset)."""
    if not r.model_name and not r.model_args:
        return None
    if r.model_name not in CONVSTACK_NAMES:
        raise ValueError(f"{where}: model_name {r.model_name!r} is not google/ffn's "
                         f"convstack ({CONVSTACK_NAMES[0]})")
    args = json_object(f"{where}: model_args", r.model_args or "{}")
    unknown = sorted(set(args) - {"depth", "fov_size", "deltas"})
    if unknown:
        raise ValueError(f"{where}: model_args may give depth, fov_size and deltas, got {unknown}")
    try:
        return ModelConfig(depth=args.get("depth", 9), features=32,
                           fov_size=tuple(args["fov_size"])[::-1],
                           deltas=tuple(args["deltas"])[::-1])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: model_args {r.model_args!r}: {e}") from None


@dataclasses.dataclass
class Request:
    """What a google/ffn InferenceRequest asks ffnjax to do (`read_request`).

    Attributes:
      image: the image's `ffnjax.volumes` spec.
      checkpoint: `model_checkpoint_path`: a TensorFlow checkpoint prefix or an ffnjax workdir.
      model_config: from model_name / model_args, or None (take the workdir's).
      options: the InferenceOptions (`request_options`).
      output_dir: `segmentation_output_dir`.
      masks, seed_masks: `ffnjax.restrict.MaskSource`s of `masks` / `seed_masks`.
      shift_mask: spec of the 2-channel shift volume ('' for none), with
        shift_mask_fov ((start, size) z,y,x relative to a position, or None:
        the model's FOV), shift_mask_scale and shift_mask_threshold.
      init_segmentation: spec of the labels to continue ('' for none).
      checkpoint_interval: seconds between resume states (0: unset).
      text: the request as written.
    """

    image: str
    checkpoint: str
    model_config: ModelConfig | None
    options: InferenceOptions
    output_dir: str
    masks: tuple[MaskSource, ...] = ()
    seed_masks: tuple[MaskSource, ...] = ()
    shift_mask: str = ""
    shift_mask_fov: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
    shift_mask_scale: int = 1
    shift_mask_threshold: int = 0
    init_segmentation: str = ""
    checkpoint_interval: int = 0
    text: str = ""


def request_from_text(text: str, where: str = "request") -> Request:
    """`Request` of request text (`where` names it in errors)."""
    r = parse_request_text(text, where)
    _refuse_unsupported(r, where)
    shift = volume_spec(r.shift_mask, "shift_mask", where)
    if shift and (r.shift_mask_scale < 1 or not r.HasField("shift_mask_threshold")):
        raise ValueError(f"{where}: a shift_mask needs shift_mask_scale >= 1 and "
                         "shift_mask_threshold (google/ffn would use 0)")
    fov = None
    if r.HasField("shift_mask_fov"):
        fov = (_zyx(r.shift_mask_fov.start), _zyx(r.shift_mask_fov.size))
    return Request(
        image=volume_spec(r.image, "image", where), checkpoint=r.model_checkpoint_path,
        model_config=request_model(r, where), options=request_options(r, where),
        output_dir=r.segmentation_output_dir,
        masks=mask_sources(r.masks, "masks", where),
        seed_masks=mask_sources(r.seed_masks, "seed_masks", where),
        shift_mask=shift, shift_mask_fov=fov, shift_mask_scale=max(r.shift_mask_scale, 1),
        shift_mask_threshold=r.shift_mask_threshold,
        init_segmentation=volume_spec(r.init_segmentation, "init_segmentation", where),
        checkpoint_interval=r.checkpoint_interval, text=text)


def read_request(path: str | os.PathLike) -> Request:
    """`Request` of google/ffn's InferenceRequest text file at `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "no such request file", str(path))
    return request_from_text(path.read_text(), str(path))


def is_tf_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a TensorFlow checkpoint prefix (PATH.index exists)."""
    return Path(str(path) + ".index").is_file()


def load_model(checkpoint: str, model_config: ModelConfig | None, step: int | None = None
               ) -> tuple[ModelConfig, Any, dict]:
    """(ModelConfig, params, inference facts) of a request's model.

    A TensorFlow checkpoint prefix is imported on the fly with `model_config`
    (required then; no facts); an ffnjax workdir is loaded, and must have the
    request's depth, FOV and deltas when the request gives them.
    """
    if is_tf_checkpoint(checkpoint):
        if model_config is None:
            raise ValueError(f"{checkpoint} is a TensorFlow checkpoint: the request must give "
                             "model_name and model_args (depth, fov_size, deltas)")
        from ffnjax.tf_import import import_ffn_checkpoint
        params, _ = import_ffn_checkpoint(checkpoint, model_config)
        return model_config, params, {}
    from ffnjax.checkpoints import inference_defaults, load_checkpoint
    config, params = load_checkpoint(checkpoint, step)
    if model_config is not None:
        want = (model_config.depth, model_config.fov_size, model_config.deltas)
        have = (config.depth, config.fov_size, config.deltas)
        if want != have:
            raise ValueError(f"the request's model_args ask for depth, fov_size, deltas (z,y,x) "
                             f"{want}; checkpoint {checkpoint} holds {have}")
    return config, params, inference_defaults(checkpoint, step)
