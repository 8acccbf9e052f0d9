"""Read google/ffn's TensorFlow checkpoints without TensorFlow, and map them onto ffnjax.

A TensorFlow (v1 "V2 format" / v2) checkpoint named by a *prefix* such as
``model.ckpt-27465036`` is two kinds of file:

``PREFIX.index``
    A LevelDB-style sorted string table (SSTable). Its entries map each tensor
    name to a serialised ``BundleEntryProto`` (dtype, shape, shard, byte offset,
    byte size, masked CRC32C of the bytes); the entry with the empty key holds
    the ``BundleHeaderProto`` (number of shards, endianness, version).
``PREFIX.data-SSSSS-of-NNNNN``
    The tensors' raw bytes (little-endian, C order), one file per shard.

This module decodes both by hand: the table layout (footer with magic number,
block handles as varints, blocks of prefix-compressed keys with a restart
array, a 5-byte trailer holding the compression type and a masked CRC32C) and
the handful of protobuf fields it needs. Every block and every tensor is
checked against its checksum. TensorFlow is not needed (a test compares the
result with ``tf.train.load_checkpoint`` where TensorFlow happens to be
installed).

Writing the format (to round-trip small checkpoints in tests, or to export
ffnjax parameters for google/ffn) and google/ffn's forward pass in TensorFlow
ops are references, not part of the library: `benchmarks/tf_reference.py`.

google/ffn's ``convstack_3d`` keeps its weights under the ``seed_update`` scope
as ``conv0_a``, ``conv0_b``, ``conv{i}_a``/``conv{i}_b`` (i = 1 .. depth-1) and
``conv_lom``, each with ``weights`` of shape [d, h, w, in, out] and ``biases``.
FFN feeds TensorFlow tensors shaped [batch, z, y, x, channels] to ``conv3d``,
so d, h, w are z, y, x: the kernels are already in ffnjax's z,y,x,in,out order
and are copied without a transpose (`ffn_params_from_tensors`). Optimiser slots
(``.../Adam``, ``.../Momentum``), ``global_step`` and summary variables are
ignored.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import google_crc32c
import numpy as np

from ffnjax.config import ModelConfig

# ----------------------------------------------------------------------------
# Low-level decodings: varints, masked CRC32C, protobuf wire format.
# ----------------------------------------------------------------------------

TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB / TensorFlow table footer magic number.
FOOTER_SIZE = 48                  # two block handles padded to 40 bytes + 8-byte magic.
BLOCK_TRAILER_SIZE = 5            # compression type byte + masked crc32c.
MASK_DELTA = 0xA282EAD8           # added to a rotated CRC32C when it is stored.


def unmask_crc(masked: int) -> int:
    """The CRC32C behind a stored (masked) checksum.

    LevelDB/TensorFlow store a checksum rotated right by 15 bits plus
    `MASK_DELTA`, so that a checksum of data containing checksums is still
    well distributed; this undoes that (`benchmarks.tf_reference.mask_crc`
    applies it).
    """
    rot = (masked - MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def crc32c(data: bytes | memoryview, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of `data`, continuing from `crc` (0 to start)."""
    return google_crc32c.extend(crc, bytes(data))


def _read_varint(buf: bytes | memoryview, pos: int, what: str) -> tuple[int, int]:
    """Decodes a base-128 varint at `pos`; returns (value, next position)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError(f"truncated varint while reading {what}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError(f"varint longer than 10 bytes while reading {what}")


def _proto_fields(buf: bytes | memoryview, what: str) -> Iterator[tuple[int, int, Any]]:
    """Yields (field number, wire type, value) of a serialised protobuf message.

    Values are ints for wire types 0 (varint), 1 (fixed64) and 5 (fixed32) and
    bytes for wire type 2 (length-delimited). Groups (3, 4) are not used by
    the messages read here and raise ValueError.
    """
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos, what)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos, what)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise ValueError(f"truncated fixed64 in {what}")
            value = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        elif wire == 2:
            n, pos = _read_varint(buf, pos, what)
            if pos + n > len(buf):
                raise ValueError(f"truncated length-delimited field {field} in {what}")
            value = bytes(buf[pos:pos + n])
            pos += n
        elif wire == 5:
            if pos + 4 > len(buf):
                raise ValueError(f"truncated fixed32 in {what}")
            value = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {field}) in {what}")
        yield field, wire, value


# ----------------------------------------------------------------------------
# The protobuf messages: BundleHeaderProto and BundleEntryProto.
# ----------------------------------------------------------------------------

# tensorflow/core/framework/types.proto: DataType enum -> NumPy dtype (little-endian).
TF_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),   # DT_FLOAT
    2: np.dtype("<f8"),   # DT_DOUBLE
    3: np.dtype("<i4"),   # DT_INT32
    4: np.dtype("u1"),    # DT_UINT8
    5: np.dtype("<i2"),   # DT_INT16
    6: np.dtype("i1"),    # DT_INT8
    8: np.dtype("<c8"),   # DT_COMPLEX64
    9: np.dtype("<i8"),   # DT_INT64
    10: np.dtype("?"),    # DT_BOOL
    17: np.dtype("<u2"),  # DT_UINT16
    18: np.dtype("<c16"),  # DT_COMPLEX128
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}
DT_STRING = 7
DT_BFLOAT16 = 14


@dataclasses.dataclass(frozen=True)
class BundleHeader:
    """The checkpoint's ``BundleHeaderProto``: shard count, byte order, format version."""

    num_shards: int = 1
    endianness: int = 0  # 0 = LITTLE, 1 = BIG
    version_producer: int = 1


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One ``BundleEntryProto``: where a tensor's bytes live and how to check them.

    Attributes:
      name: the variable name, e.g. 'seed_update/conv0_a/weights'.
      dtype_code: TensorFlow's DataType enum value (1 = float32 ...).
      shape: the tensor's shape.
      shard_id: which .data-SSSSS-of-NNNNN file holds it.
      offset, size: its byte range in that file.
      crc32c: the masked CRC32C of its bytes, as stored.
      num_slices: > 0 for a partitioned variable (its data lives in slice entries).
    """

    name: str
    dtype_code: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int
    num_slices: int = 0

    @property
    def dtype(self) -> np.dtype | None:
        """NumPy dtype, or None for TensorFlow types NumPy lacks (string, bfloat16)."""
        return TF_DTYPES.get(self.dtype_code)


def _parse_shape(buf: bytes, what: str) -> tuple[int, ...]:
    """TensorShapeProto: repeated Dim dim = 2 (Dim: int64 size = 1), bool unknown_rank = 3."""
    dims = []
    for field, _, value in _proto_fields(buf, what):
        if field == 2:
            size = 0
            for f2, _, v2 in _proto_fields(value, what):
                if f2 == 1:
                    size = v2 - (1 << 64) if v2 >= 1 << 63 else v2
            dims.append(size)
        elif field == 3 and value:
            raise ValueError(f"{what}: tensor of unknown rank cannot be read")
    return tuple(dims)


def parse_entry(name: str, buf: bytes) -> TensorEntry:
    """Decodes a serialised ``BundleEntryProto``.

    Fields: dtype = 1, shape = 2, shard_id = 3, offset = 4, size = 5,
    crc32c = 6 (fixed32), slices = 7 (repeated).
    """
    what = f"index entry {name!r}"
    d: dict[str, Any] = dict(dtype_code=0, shape=(), shard_id=0, offset=0, size=0, crc32c=0,
                             num_slices=0)
    for field, _, value in _proto_fields(buf, what):
        if field == 1:
            d["dtype_code"] = value
        elif field == 2:
            d["shape"] = _parse_shape(value, what)
        elif field == 3:
            d["shard_id"] = value
        elif field == 4:
            d["offset"] = value
        elif field == 5:
            d["size"] = value
        elif field == 6:
            d["crc32c"] = value
        elif field == 7:
            d["num_slices"] += 1
    return TensorEntry(name=name, **d)


def parse_header(buf: bytes) -> BundleHeader:
    """Decodes ``BundleHeaderProto``: num_shards = 1, endianness = 2, version = 3 (VersionDef)."""
    d = dict(num_shards=1, endianness=0, version_producer=0)
    for field, _, value in _proto_fields(buf, "bundle header"):
        if field == 1:
            d["num_shards"] = value
        elif field == 2:
            d["endianness"] = value
        elif field == 3:
            for f2, _, v2 in _proto_fields(value, "bundle header version"):
                if f2 == 1:
                    d["version_producer"] = v2
    return BundleHeader(**d)


# ----------------------------------------------------------------------------
# The SSTable: footer, block handles, blocks.
# ----------------------------------------------------------------------------

def _read_block(data: bytes, offset: int, size: int, path: Path, what: str) -> memoryview:
    """Returns the contents of the block at (offset, size) after checking its trailer."""
    end = offset + size
    if offset < 0 or end + BLOCK_TRAILER_SIZE > len(data):
        raise ValueError(f"{path}: {what} block handle ({offset}, {size}) lies outside the "
                         f"{len(data)}-byte file (truncated index?)")
    contents = memoryview(data)[offset:end]
    ctype = data[end]
    stored = struct.unpack_from("<I", data, end + 1)[0]
    actual = crc32c(data[end:end + 1], crc32c(contents))
    if unmask_crc(stored) != actual:
        raise ValueError(f"{path}: checksum mismatch in {what} block at byte {offset} "
                         f"(stored {unmask_crc(stored):#010x}, computed {actual:#010x}); "
                         "the index file is corrupted")
    if ctype != 0:
        raise ValueError(f"{path}: {what} block at byte {offset} uses compression type {ctype}; "
                         "only uncompressed tables (TensorFlow's default) are supported")
    return contents


def _block_entries(block: memoryview, path: Path, what: str) -> Iterator[tuple[bytes, bytes]]:
    """Yields (key, value) of a table block.

    Each entry is varint shared, varint non_shared, varint value_length, the
    key's non-shared suffix and the value; keys share a prefix with the previous
    key. The block ends with uint32 restart offsets and their uint32 count.
    """
    if len(block) < 4:
        raise ValueError(f"{path}: {what} block too short ({len(block)} bytes)")
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 * (num_restarts + 1)
    if limit < 0:
        raise ValueError(f"{path}: {what} block claims {num_restarts} restarts, more than fit")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _read_varint(block, pos, what)
        non_shared, pos = _read_varint(block, pos, what)
        value_len, pos = _read_varint(block, pos, what)
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise ValueError(f"{path}: malformed entry in {what} block at offset {pos}")
        key = key[:shared] + bytes(block[pos:pos + non_shared])
        pos += non_shared
        yield key, bytes(block[pos:pos + value_len])
        pos += value_len


def _block_handle(buf: bytes | memoryview, pos: int, what: str) -> tuple[int, int, int]:
    offset, pos = _read_varint(buf, pos, what)
    size, pos = _read_varint(buf, pos, what)
    return offset, size, pos


def read_table(path: str | os.PathLike) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of a LevelDB/TensorFlow SSTable file, in key order.

    Raises:
      FileNotFoundError: when the file is missing.
      ValueError: naming the file for a bad magic number, a malformed block or a
        checksum mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint index not found: {path}")
    data = path.read_bytes()
    if len(data) < FOOTER_SIZE:
        raise ValueError(f"{path}: {len(data)} bytes is too short to be a table "
                         f"(the footer alone is {FOOTER_SIZE})")
    footer = data[-FOOTER_SIZE:]
    lo, hi = struct.unpack_from("<II", footer, FOOTER_SIZE - 8)
    if (hi << 32 | lo) != TABLE_MAGIC:
        raise ValueError(f"{path}: bad table magic number {hi << 32 | lo:#018x} "
                         f"(expected {TABLE_MAGIC:#018x}); not a TensorFlow checkpoint index")
    _, _, pos = _block_handle(footer, 0, "footer")  # metaindex: unused by TensorFlow bundles
    index_off, index_size, _ = _block_handle(footer, pos, "footer")
    index = _read_block(data, index_off, index_size, path, "index")
    entries: list[tuple[bytes, bytes]] = []
    for _, handle in _block_entries(index, path, "index"):
        off, size, _ = _block_handle(handle, 0, "index entry")
        block = _read_block(data, off, size, path, "data")
        entries.extend(_block_entries(block, path, "data"))
    return entries


# ----------------------------------------------------------------------------
# Checkpoint reading.
# ----------------------------------------------------------------------------

def checkpoint_prefix(prefix: str | os.PathLike) -> Path:
    """Accepts a checkpoint prefix, or the path of its .index / .data file."""
    p = str(prefix)
    if p.endswith(".index"):
        p = p[: -len(".index")]
    elif ".data-" in Path(p).name:
        p = p[: p.rindex(".data-")]
    return Path(p)


def data_path(prefix: str | os.PathLike, shard: int, num_shards: int) -> Path:
    """The data file of shard `shard`: PREFIX.data-SSSSS-of-NNNNN."""
    return Path(f"{checkpoint_prefix(prefix)}.data-{shard:05d}-of-{num_shards:05d}")


class CheckpointReader:
    """Reads tensors of a TensorFlow checkpoint, verifying every checksum.

    Usage::

        reader = CheckpointReader("model.ckpt-27465036")
        reader.names()                         # every tensor name, sorted
        w = reader.read("seed_update/conv0_a/weights")   # np.ndarray

    Args:
      prefix: the checkpoint prefix (or its .index file).
      verify: check the CRC32C of each tensor's bytes (blocks of the index are
        always checked).

    Raises:
      FileNotFoundError: naming the missing .index or .data file.
      ValueError: naming the file or tensor whose bytes are malformed or whose
        checksum does not match.
    """

    def __init__(self, prefix: str | os.PathLike, verify: bool = True):
        self.prefix = checkpoint_prefix(prefix)
        self.verify = verify
        self.index_path = Path(f"{self.prefix}.index")
        table = read_table(self.index_path)
        self.header = BundleHeader()
        self.entries: dict[str, TensorEntry] = {}
        for key, value in table:
            if key == b"":
                self.header = parse_header(value)
                continue
            name = key.decode("utf-8", errors="replace")
            if _is_slice_key(key):
                continue  # slice entries of partitioned variables: reached via their full entry
            self.entries[name] = parse_entry(name, value)
        if self.header.endianness != 0:
            raise ValueError(f"{self.index_path}: big-endian checkpoints are not supported")
        self._shards: dict[int, np.memmap] = {}

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _shard(self, shard: int) -> np.ndarray:
        if shard not in self._shards:
            path = data_path(self.prefix, shard, self.header.num_shards)
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint data file not found: {path}")
            self._shards[shard] = np.fromfile(path, dtype=np.uint8)
        return self._shards[shard]

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a NumPy array (a copy, in TensorFlow's C order)."""
        if name not in self.entries:
            raise KeyError(f"tensor {name!r} not in checkpoint {self.prefix}; "
                           f"it holds {len(self.entries)} tensors, e.g. {self.names()[:5]}")
        e = self.entries[name]
        if e.num_slices:
            raise ValueError(f"tensor {name!r} in {self.prefix} is a partitioned variable "
                             f"({e.num_slices} slices); partitioned variables are not supported")
        dtype = e.dtype
        if dtype is None:
            kind = {DT_STRING: "string", DT_BFLOAT16: "bfloat16"}.get(e.dtype_code, "unknown")
            raise ValueError(f"tensor {name!r} in {self.prefix} has TensorFlow dtype "
                             f"{e.dtype_code} ({kind}), which this reader does not decode")
        n = int(np.prod(e.shape, dtype=np.int64))
        if n * dtype.itemsize != e.size:
            raise ValueError(f"tensor {name!r}: entry size {e.size} bytes does not match shape "
                             f"{e.shape} of {dtype} ({n * dtype.itemsize} bytes)")
        shard = self._shard(e.shard_id)
        if e.offset + e.size > shard.size:
            raise ValueError(f"tensor {name!r}: bytes {e.offset}..{e.offset + e.size} lie past "
                             f"the end of {data_path(self.prefix, e.shard_id, self.header.num_shards)} "
                             f"({shard.size} bytes); truncated data file?")
        raw = shard[e.offset:e.offset + e.size]
        if self.verify:
            actual = crc32c(raw.tobytes())
            if unmask_crc(e.crc32c) != actual:
                raise ValueError(
                    f"checksum mismatch for tensor {name!r} in "
                    f"{data_path(self.prefix, e.shard_id, self.header.num_shards)} "
                    f"(stored {unmask_crc(e.crc32c):#010x}, computed {actual:#010x}); "
                    "the checkpoint data is corrupted")
        return raw.view(dtype).reshape(e.shape).copy()

    def read_all(self, skip_unreadable: bool = True) -> dict[str, np.ndarray]:
        """Every tensor (string/bfloat16 tensors skipped unless `skip_unreadable` is False)."""
        out = {}
        for name in self.names():
            e = self.entries[name]
            if skip_unreadable and (e.dtype is None or e.num_slices):
                continue
            out[name] = self.read(name)
        return out


def _is_slice_key(key: bytes) -> bool:
    """Slice entries of partitioned variables have keys starting with a NUL byte."""
    return key[:1] == b"\x00"


def read_checkpoint(prefix: str | os.PathLike, names: Iterable[str] | None = None,
                    verify: bool = True) -> dict[str, np.ndarray]:
    """Tensors of a TensorFlow checkpoint by name (all readable ones by default)."""
    reader = CheckpointReader(prefix, verify=verify)
    if names is None:
        return reader.read_all()
    return {n: reader.read(n) for n in names}


# ----------------------------------------------------------------------------
# google/ffn convstack_3d <-> ffnjax.nets.ConvStack3D.
# ----------------------------------------------------------------------------

FFN_SCOPE = "seed_update"


def ffn_layer_names(depth: int) -> list[str]:
    """google/ffn's convolution scopes for a convstack of `depth` (= ffnjax's param names)."""
    names = ["conv0_a", "conv0_b"]
    for i in range(1, depth):
        names += [f"conv{i}_a", f"conv{i}_b"]
    return names + ["conv_lom"]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """TensorFlow variable name -> shape for `config` (kernels z,y,x,in,out)."""
    f = config.features
    shapes = {}
    for layer in ffn_layer_names(config.depth):
        if layer == "conv_lom":
            k, cin, cout = (1, 1, 1), f, 1
        else:
            k, cin, cout = (3, 3, 3), (2 if layer == "conv0_a" else f), f
        shapes[f"{FFN_SCOPE}/{layer}/weights"] = (*k, cin, cout)
        shapes[f"{FFN_SCOPE}/{layer}/biases"] = (cout,)
    return shapes


def checkpoint_depth(names: Iterable[str], scope: str = FFN_SCOPE) -> int | None:
    """The convstack depth implied by the variable names (None when no conv{i}_a is found)."""
    levels = set()
    for n in names:
        parts = n.split("/")
        if len(parts) == 3 and parts[0] == scope and parts[1].startswith("conv") \
                and parts[1].endswith("_a") and parts[1][4:-2].isdigit():
            levels.add(int(parts[1][4:-2]))
    return max(levels) + 1 if levels else None


def check_variables(shapes: Mapping[str, tuple[int, ...]], config: ModelConfig) -> None:
    """Checks that a checkpoint's variables fit a ConvStack3D of `config`.

    Args:
      shapes: TensorFlow variable name -> shape of every variable found (names
        outside the convstack are ignored).
      config: the ModelConfig the parameters are for.

    Raises:
      ValueError: listing every missing or mis-shaped variable, and naming the
        depth the checkpoint has when it differs from `config.depth`.
    """
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in shapes]
    wrong = [f"{n}: expected {expected[n]}, found {tuple(shapes[n])}"
             for n in expected if n in shapes and tuple(shapes[n]) != expected[n]]
    found_depth = checkpoint_depth(shapes)
    problems = []
    if found_depth is not None and found_depth != config.depth:
        problems.append(f"checkpoint holds a convstack of depth {found_depth} "
                        f"(conv0 .. conv{found_depth - 1}) but depth {config.depth} was requested")
    if missing:
        problems.append(f"missing variables: {missing}")
    if wrong:
        problems.append("mis-shaped variables: " + "; ".join(wrong))
    if problems:
        raise ValueError("cannot map the TensorFlow checkpoint onto ConvStack3D: "
                         + " | ".join(problems))


def ffn_params_from_tensors(tensors: Mapping[str, np.ndarray], config: ModelConfig
                            ) -> dict[str, Any]:
    """Maps google/ffn convstack tensors onto `ffnjax.nets.ConvStack3D` parameters.

    Args:
      tensors: TensorFlow variable name -> array (e.g. `CheckpointReader.read_all()`);
        names outside the convstack (optimiser slots, global_step) are ignored.
      config: the ModelConfig the parameters are for (depth and features must match).

    Returns:
      ``{'params': {'conv0_a': {'kernel': (3,3,3,2,F), 'bias': (F,)}, ...}}`` as
      float32 NumPy arrays; kernels keep TensorFlow's [d, h, w, in, out] = z,y,x,in,out
      order.

    Raises:
      ValueError: as `check_variables`.
    """
    check_variables({n: np.shape(t) for n, t in tensors.items()}, config)
    params: dict[str, Any] = {}
    for layer in ffn_layer_names(config.depth):
        params[layer] = {
            "kernel": np.asarray(tensors[f"{FFN_SCOPE}/{layer}/weights"], np.float32),
            "bias": np.asarray(tensors[f"{FFN_SCOPE}/{layer}/biases"], np.float32),
        }
    return {"params": params}


def ffn_tensors_from_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of `ffn_params_from_tensors`: ffnjax parameters -> google/ffn variable names."""
    tree = params["params"] if "params" in params else params
    out = {}
    for layer, p in tree.items():
        out[f"{FFN_SCOPE}/{layer}/weights"] = np.asarray(p["kernel"], np.float32)
        out[f"{FFN_SCOPE}/{layer}/biases"] = np.asarray(p["bias"], np.float32)
    return out


def import_ffn_checkpoint(prefix: str | os.PathLike, config: ModelConfig
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a google/ffn convstack checkpoint into ffnjax parameters.

    Args:
      prefix: checkpoint prefix, e.g. '.../model.ckpt-27465036'.
      config: the matching ModelConfig (google/ffn's model_args give depth,
        fov_size and deltas; features are 32 in every published model).

    Returns:
      (params, provenance): the linen parameter tree and a JSON-friendly dict
      describing the source (path, global_step, tensor count, ignored names).
    """
    reader = CheckpointReader(prefix)
    check_variables({n: e.shape for n, e in reader.entries.items()}, config)
    wanted = expected_shapes(config)
    # Read only the convstack (and the step); optimiser slots are left on disk.
    params = ffn_params_from_tensors({n: reader.read(n) for n in wanted}, config)
    step = None
    if "global_step" in reader and reader.entries["global_step"].dtype is not None:
        step = int(reader.read("global_step").reshape(-1)[0])
    provenance = {
        "source": "google/ffn TensorFlow checkpoint",
        "checkpoint": str(Path(reader.prefix).resolve()),
        "global_step": step,
        "tensors_in_checkpoint": len(reader.entries),
        "tensors_imported": len(wanted),
        "ignored": sorted(n for n in reader.names() if n not in wanted),
    }
    return params, provenance
