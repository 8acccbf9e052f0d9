"""Atomic writes (a failed write leaves the old file; no shared temporary names)
and the one digest helper."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading

import numpy as np
import pytest

from ffnjax import files


def test_write_formats_round_trip(tmp_path):
    assert files.write_bytes(tmp_path / "b.bin", b"abc").read_bytes() == b"abc"
    assert json.loads(files.write_json(tmp_path / "j.json", {"a": [1, 2]}).read_text()) == {"a": [1, 2]}
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    np.testing.assert_array_equal(np.load(files.save_npy(tmp_path / "a.npy", a)), a)
    for compressed in (False, True):
        p = files.save_npz(tmp_path / f"z{compressed}.npz", {"a": a, "b": a.T}, compressed=compressed)
        with np.load(p) as z:
            np.testing.assert_array_equal(z["b"], a.T)
    # the name is kept exactly (np.save given a path would append .npy)
    assert (tmp_path / "a.npy").exists() and not list(tmp_path.glob(".*"))


def test_write_that_raises_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.npz"
    files.save_npz(path, {"x": np.zeros(3)})
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="crash"):
        with files.atomic_write(path) as f:
            f.write(b"half a file")
            raise RuntimeError("simulated crash mid-write")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.npz"]


def test_serialiser_that_fails_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.npy"
    files.save_npy(path, np.arange(3))
    # np.save writes the 128-byte header, then pickling the lambda fails
    unpicklable = np.array([lambda: 0, 1], dtype=object)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # AttributeError for a local lambda
        files.save_npy(path, unpicklable)
    np.testing.assert_array_equal(np.load(path), np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


def test_failed_replace_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.npy"
    files.save_npy(path, np.ones(4))

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        files.save_npy(path, np.zeros(4))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(path), np.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


def test_two_writers_never_share_a_temporary_name(tmp_path):
    target = tmp_path / "x.bin"
    assert files.temp_path(target) != files.temp_path(target)
    assert files.temp_path(target).parent == tmp_path
    assert files.temp_path(target).name.startswith(".x.bin.tmp-")
    # both writers open their temporary files before either finishes
    with files.atomic_write(target) as a, files.atomic_write(target) as b:
        assert a.name != b.name
        a.write(b"first")
        b.write(b"second")
    assert target.read_bytes() == b"first"  # a's block closed last (the inner one, b, first)


def test_concurrent_writers_leave_one_whole_version(tmp_path):
    target = tmp_path / "x.bin"
    payloads = [bytes([i]) * 100_000 for i in range(8)]
    threads = [threading.Thread(target=files.write_bytes, args=(target, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_bytes() in payloads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_digest_equals_hashlib_directly():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    t = a.transpose(2, 0, 1)  # not C-contiguous: hashed in C order of its own shape
    expected = hashlib.sha256()
    for piece in (b"head", "text".encode(), a.tobytes(), t.tobytes(), np.ones(3, bool).tobytes()):
        expected.update(piece)
    assert files.digest([b"head", "text", a, t, np.ones(3, bool)]) == expected.hexdigest()
    assert files.digest([a], "sha1") == hashlib.sha1(a.tobytes()).hexdigest()
    assert files.digest([]) == hashlib.sha256().hexdigest()
    # pieces are concatenated: shape only counts when it is fed
    assert files.digest([a]) == files.digest([a.reshape(-1)])
    assert files.digest([str(a.shape), a]) != files.digest([str(a.reshape(-1).shape), a])
