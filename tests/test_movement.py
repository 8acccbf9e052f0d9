"""The face-move rule (`ffnjax.movement`): a plain-NumPy reference of google/ffn's
`get_scored_move_offsets`, and the flood fill's own implementation of it."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from ffnjax import flood, movement

# (fov_size, deltas): isotropic, anisotropic, a zero delta (no faces along z),
# and deltas equal to the radius (the square is the whole plane).
GEOMETRIES = [((7, 7, 7), (2, 2, 2)), ((5, 9, 11), (2, 4, 3)), ((5, 7, 7), (0, 2, 2)),
              ((5, 5, 5), (2, 2, 2))]


def _reference(pred: np.ndarray, radius, deltas) -> tuple[list[float], list[tuple[int, ...]]]:
    """Scores and z,y,x offsets of each face in plain NumPy: the plane at
    centre +- delta along one axis, cut to centre +- delta along the others;
    its first maximum in C order (np.argmax)."""
    scores, offsets = [], []
    for axis in range(3):
        if deltas[axis] == 0:
            continue
        for sign in (-1, 1):
            box = [slice(radius[a] - deltas[a], radius[a] + deltas[a] + 1) for a in range(3)]
            box[axis] = radius[axis] + sign * deltas[axis]
            face = pred[tuple(box)]
            where = np.unravel_index(np.argmax(face), face.shape)
            rel = [int(w) - deltas[a] for w, a in zip(where, [a for a in range(3) if a != axis])]
            rel.insert(axis, sign * deltas[axis])
            scores.append(float(face[where]))
            offsets.append(tuple(rel))
    return scores, offsets


def _random_pred(fov, seed: int, ties: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if ties:   # a few distinct values: many faces hold their maximum more than once
        return rng.integers(-2, 3, fov).astype(np.float32)
    return rng.normal(size=fov).astype(np.float32)


@pytest.mark.parametrize("fov, deltas", GEOMETRIES)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_face_maxima_equal_numpy_reference_and_flood(fov, deltas, ties):
    radius = tuple(s // 2 for s in fov)
    spec = SimpleNamespace(radius=radius, deltas=deltas)   # all `flood._face_moves` reads
    fn = jax.jit(lambda p: movement.face_maxima(p, radius, deltas))
    directions = movement.face_directions(deltas)
    for seed in range(5):
        pred = _random_pred(fov, seed, ties)
        scores, offsets = (np.asarray(a) for a in fn(pred))
        ref_scores, ref_offsets = _reference(pred, radius, deltas)
        np.testing.assert_array_equal(scores, ref_scores)
        assert [tuple(int(v) for v in o) for o in offsets] == ref_offsets
        assert len(directions) == len(ref_scores)
        for (axis, sign), o in zip(directions, offsets):
            assert o[axis] == sign * deltas[axis]
        # The flood fill's rule gives the same faces, in the same order.
        pos = np.array([10, 20, 30], np.int32)
        f_scores, f_targets, f_rels = (np.asarray(a) for a in flood._face_moves(spec, pred, pos))
        np.testing.assert_array_equal(f_scores, scores)
        np.testing.assert_array_equal(f_rels, offsets)
        np.testing.assert_array_equal(f_targets, pos + offsets)


def test_a_face_at_the_threshold_moves():
    # google/ffn skips a face only when its score is below the threshold.
    scores = np.array([0.5, 1.0, 1.5], np.float32)
    np.testing.assert_array_equal(np.asarray(movement.wanted(scores, 1.0)), [False, True, True])


def test_no_faces_without_deltas():
    assert movement.face_directions((0, 0, 0)) == ()
    scores, offsets = movement.face_maxima(np.zeros((3, 3, 3), np.float32), (1, 1, 1), (0, 0, 0))
    assert scores.shape == (0,) and offsets.shape == (0, 3)
    assert movement.face_directions((0, 2, 1)) == ((1, -1), (1, 1), (2, -1), (2, 1))
