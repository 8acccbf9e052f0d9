"""Writing google/ffn TensorFlow checkpoints, and google/ffn's forward pass in TensorFlow.

References for tests and benchmarks, beside the library's reader
(`ffnjax.tf_import`, which imports nothing from here):

- `write_checkpoint` writes tensors in TensorFlow's own checkpoint layout
  (`tf.train.load_checkpoint` reads it): the data file, and the ``.index``
  SSTable of ``BundleEntryProto`` records with masked CRC32C checksums. Tests
  round-trip small checkpoints through `ffnjax.tf_import.CheckpointReader`;
  with `ffnjax.tf_import.ffn_tensors_from_params` it also exports ffnjax
  parameters for google/ffn's Saver.
- `tensorflow_forward` is google/ffn's ``convstack_3d`` in TensorFlow ops:
  the ground truth the JAX network is compared with (tests/test_tf_import.py)
  and timed against (benchmarks/forward_bench.py, forward_tf_vs_jax.py).

Usage::

    from benchmarks.tf_reference import tensorflow_forward, write_checkpoint
    prefix = write_checkpoint(tmp / "model.ckpt-1", ffn_tensors_from_params(params))
    logits = tensorflow_forward(tensors, depth, image, mask_logits)  # needs tensorflow
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ffnjax.tf_import import (FFN_SCOPE, FOOTER_SIZE, MASK_DELTA, TABLE_MAGIC, TF_DTYPES,
                              BundleHeader, TensorEntry, checkpoint_prefix, crc32c, data_path)

# ----------------------------------------------------------------------------
# Encodings: masked CRC32C, varints, protobuf wire format, the two messages.
# ----------------------------------------------------------------------------

def mask_crc(crc: int) -> int:
    """LevelDB/TensorFlow's checksum masking: rotate right by 15 and add `MASK_DELTA`.

    Stored checksums are masked so that a checksum of data containing
    checksums is still well distributed (`ffnjax.tf_import.unmask_crc` undoes it).
    """
    crc &= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + MASK_DELTA) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    """Encodes a non-negative int as a base-128 varint."""
    if value < 0:
        value &= (1 << 64) - 1  # protobuf encodes negative int64 as 10-byte two's complement
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _pb_varint(field: int, value: int) -> bytes:
    return _varint(field << 3 | 0) + _varint(value)


def _pb_bytes(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _pb_fixed32(field: int, value: int) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<I", value)


_DTYPE_CODES = {dt: code for code, dt in TF_DTYPES.items()}


def encode_entry(entry: TensorEntry) -> bytes:
    """Serialises a `TensorEntry` as a ``BundleEntryProto`` (inverse of `parse_entry`)."""
    shape = b"".join(_pb_bytes(2, _pb_varint(1, int(s))) for s in entry.shape)
    out = _pb_varint(1, entry.dtype_code) + _pb_bytes(2, shape)
    if entry.shard_id:
        out += _pb_varint(3, entry.shard_id)
    if entry.offset:
        out += _pb_varint(4, entry.offset)
    if entry.size:
        out += _pb_varint(5, entry.size)
    return out + _pb_fixed32(6, entry.crc32c)


def encode_header(header: BundleHeader) -> bytes:
    out = _pb_varint(1, header.num_shards)
    if header.endianness:
        out += _pb_varint(2, header.endianness)
    return out + _pb_bytes(3, _pb_varint(1, header.version_producer))


# ----------------------------------------------------------------------------
# The SSTable and the checkpoint.
# ----------------------------------------------------------------------------

def _build_block(items: list[tuple[bytes, bytes]], restart_interval: int = 16) -> bytes:
    """A table block with prefix-compressed keys (restart every `restart_interval`)."""
    out, restarts, prev = bytearray(), [0], b""
    for i, (key, value) in enumerate(items):
        if i and i % restart_interval == 0:
            restarts.append(len(out))
            prev = b""
        shared = 0
        while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
            shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        out += key[shared:] + value
        prev = key
    out += b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))
    return bytes(out)


def write_table(path: str | os.PathLike, items: Iterable[tuple[bytes, bytes]],
                block_size: int = 4096) -> None:
    """Writes sorted (key, value) pairs as an uncompressed LevelDB/TensorFlow SSTable.

    Data blocks are cut once they exceed `block_size` bytes (TensorFlow's
    default); each index entry's key is the last key of its block.
    """
    items = list(items)
    keys = [k for k, _ in items]
    if keys != sorted(keys) or len(set(keys)) != len(keys):
        raise ValueError("table keys must be unique and sorted")
    out = bytearray()

    def emit(contents: bytes) -> bytes:
        handle = _varint(len(out)) + _varint(len(contents))
        trailer_type = b"\x00"
        crc = mask_crc(crc32c(trailer_type, crc32c(contents)))
        out.extend(contents + trailer_type + struct.pack("<I", crc))
        return handle

    index_items, current, current_size = [], [], 0
    for key, value in items:
        current.append((key, value))
        current_size += len(key) + len(value) + 3
        if current_size >= block_size:
            index_items.append((key, emit(_build_block(current))))
            current, current_size = [], 0
    if current or not index_items:
        index_items.append((current[-1][0] if current else b"", emit(_build_block(current))))
    meta_handle = emit(_build_block([]))
    index_handle = emit(_build_block(index_items, restart_interval=1))
    footer = meta_handle + index_handle
    footer += b"\x00" * (FOOTER_SIZE - 8 - len(footer))
    footer += struct.pack("<II", TABLE_MAGIC & 0xFFFFFFFF, TABLE_MAGIC >> 32)
    Path(path).write_bytes(bytes(out) + footer)


def write_checkpoint(prefix: str | os.PathLike, tensors: Mapping[str, Any],
                     block_size: int = 4096) -> Path:
    """Writes `tensors` as a single-shard TensorFlow checkpoint (PREFIX.index + data).

    The layout is TensorFlow's own (`tf.train.load_checkpoint` reads it), so
    ffnjax parameters exported with `ffn_tensors_from_params` can be restored by
    google/ffn's Saver. `block_size` is the table's data block size (small
    values exercise multi-block indexes in tests).

    Returns:
      The prefix written.
    """
    prefix = checkpoint_prefix(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    entries, blobs, offset = [], [], 0
    for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
        if not name:
            raise ValueError("tensor names must be non-empty (the empty key holds the header)")
        arr = np.asarray(tensors[name], order="C")
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        code = _DTYPE_CODES.get(np.dtype(dtype))
        if code is None:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} has no TensorFlow equivalent here")
        raw = arr.astype(dtype, copy=False).tobytes()
        entries.append(TensorEntry(name=name, dtype_code=code, shape=tuple(arr.shape), shard_id=0,
                                   offset=offset, size=len(raw), crc32c=mask_crc(crc32c(raw))))
        blobs.append(raw)
        offset += len(raw)
    data_path(prefix, 0, 1).write_bytes(b"".join(blobs))
    items = [(b"", encode_header(BundleHeader()))]
    items += [(e.name.encode("utf-8"), encode_entry(e)) for e in entries]
    write_table(f"{prefix}.index", items, block_size=block_size)
    return prefix


# ----------------------------------------------------------------------------
# google/ffn convstack_3d in TensorFlow.
# ----------------------------------------------------------------------------

def tensorflow_forward(tensors: Mapping[str, np.ndarray], depth: int, image: np.ndarray,
                       mask_logits: np.ndarray, *, jit: bool = False):
    """google/ffn's ``convstack_3d`` forward pass written with TensorFlow ops.

    It needs ``tensorflow``, which ffnjax never depends on: the import stays
    inside the call, so this module imports (and writes checkpoints) without it.

    Args:
      tensors: google/ffn variable name -> array (`CheckpointReader.read_all()`
        or `ffn_tensors_from_params`).
      depth: the convstack depth.
      image, mask_logits: float32 [batch, z, y, x, 1] arrays, FFN's layout.
      jit: return a compiled ``tf.function`` of (image, mask_logits) instead of
        evaluating once (for timing).

    Returns:
      The logits as a NumPy array, or the ``tf.function`` when `jit` is True.
    """
    import tensorflow as tf  # noqa: PLC0415  (optional, reference only)

    weights = {n: tf.constant(np.asarray(t, np.float32)) for n, t in tensors.items()
               if n.startswith(f"{FFN_SCOPE}/")}

    def conv(x, layer):
        w, b = weights[f"{FFN_SCOPE}/{layer}/weights"], weights[f"{FFN_SCOPE}/{layer}/biases"]
        return tf.nn.conv3d(x, w, strides=[1, 1, 1, 1, 1], padding="SAME") + b

    def forward(image, mask):
        net = tf.concat([image, mask], axis=4)
        net = tf.nn.relu(conv(net, "conv0_a"))
        net = conv(net, "conv0_b")
        for i in range(1, depth):
            skip = net
            net = tf.nn.relu(conv(tf.nn.relu(net), f"conv{i}_a"))
            net = conv(net, f"conv{i}_b") + skip
        return mask + conv(tf.nn.relu(net), "conv_lom")

    if jit:
        return tf.function(forward, jit_compile=False)
    return forward(tf.constant(image, tf.float32), tf.constant(mask_logits, tf.float32)).numpy()
