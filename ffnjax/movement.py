"""The FOV face-move rule, shared by training's 'max_pred_moves' and the flood fill.

google/ffn moves its field of view by looking at the faces of a small cube
around the centre of the FOV's prediction (`ffn/inference/movement.py`,
`get_scored_move_offsets`, used by `FaceMaxMovementPolicy` at inference and by
`max_pred_offsets` in training). For every axis whose delta is non-zero and
both directions along it:

* the face is the plane at centre +- delta along that axis, restricted to
  centre +- delta along the other two axes (a (2*d+1) x (2*d+1) square, not the
  whole plane of the FOV);
* its score is the face's maximum logit, and the move's offset is the argmax
  voxel of the face relative to the FOV centre (the first maximum in C order
  on ties, as `np.argmax`);
* the move is wanted when the score reaches the threshold (`score >= threshold`;
  google/ffn skips a face when `score < threshold`).

The functions here are pure and shape-static (the faces are fixed slices), so
they run under `jit`, `vmap` and `lax.scan`. What a caller does with a wanted
move differs: the flood fill queues the argmax voxel (google/ffn's inference),
training's lattice moves step to the neighbouring lattice position in that
direction (`ffnjax.fov_moves`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = ["face_directions", "face_maxima", "wanted"]


def face_directions(deltas: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The (axis, sign) of every face `face_maxima` scores, in its order.

    Axes run z, y, x and, along each, the -delta face comes before the +delta
    face; an axis whose delta is 0 has no faces (no move along it).

    Args:
      deltas: the move step z,y,x (`ModelConfig.deltas`).

    Returns:
      A tuple of F (axis, sign) pairs, F = 2 * (number of non-zero deltas).
    """
    return tuple((axis, sign) for axis in range(3) if deltas[axis] != 0 for sign in (-1, 1))


def face_maxima(pred: jax.Array, radius: Sequence[int],
                deltas: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Score and argmax offset of every face of the +-delta cube around the centre.

    Args:
      pred: one FOV's prediction (z, y, x), logits (or probabilities: only the
        order of the values matters).
      radius: the FOV centre z,y,x inside `pred` (`ModelConfig.fov_radius`).
      deltas: the move step z,y,x; each must be at most the radius.

    Returns:
      (scores (F,), offsets (F, 3) int32): the face maxima and the z,y,x
      position of each maximum relative to the centre, in the order of
      `face_directions(deltas)`. `offsets[f, axis] == sign * deltas[axis]`.
    """
    directions = face_directions(deltas)
    if not directions:                                # every delta 0: no move
        return jnp.zeros((0,), pred.dtype), jnp.zeros((0, 3), jnp.int32)
    scores, offsets = [], []
    for axis, sign in directions:
        box = [slice(radius[a] - deltas[a], radius[a] + deltas[a] + 1) for a in range(3)]
        box[axis] = radius[axis] + sign * deltas[axis]
        face = pred[tuple(box)]                       # the square, 2-D
        flat = jnp.argmax(face)                       # first maximum in C order
        scores.append(face.reshape(-1)[flat])         # (not jnp.max: agrees with argmax on NaN)
        i, j = jnp.unravel_index(flat, face.shape)
        others = iter((i, j))
        offsets.append(jnp.stack([jnp.int32(sign * deltas[a]) if a == axis
                                  else (next(others) - deltas[a]).astype(jnp.int32)
                                  for a in range(3)]))
    return jnp.stack(scores), jnp.stack(offsets)


def wanted(scores: jax.Array, threshold: jax.Array | float) -> jax.Array:
    """Which faces want a move: the score reaches the threshold (google/ffn's
    `score >= threshold`; both in the same units, logits in ffnjax)."""
    return scores >= threshold
