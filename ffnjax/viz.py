"""Pictures people look at: PNG slices with label outlines or coloured objects.

All inputs are z,y,x arrays. Colours are a fixed hash of the object id, so the
same id has the same colour in every picture.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def label_colors(labels: np.ndarray) -> np.ndarray:
    """RGB uint8 colour per voxel from a hash of its id (0 is black)."""
    ids = labels.astype(np.uint64)
    h = (ids * np.uint64(2654435761)) % np.uint64(2**32)
    rgb = np.stack([(h >> np.uint64(s)) & np.uint64(255) for s in (0, 8, 16)], -1).astype(np.uint8)
    rgb = (rgb // 2 + 96).astype(np.uint8)
    rgb[ids == 0] = 0
    return rgb


def boundaries(labels2d: np.ndarray) -> np.ndarray:
    """True where a pixel's label differs from its right or lower neighbour."""
    b = np.zeros(labels2d.shape, bool)
    b[:-1, :] |= labels2d[:-1, :] != labels2d[1:, :]
    b[:, :-1] |= labels2d[:, :-1] != labels2d[:, 1:]
    return b


def _gray(image2d: np.ndarray) -> np.ndarray:
    img = image2d.astype(np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5])
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat((img * 255).astype(np.uint8)[..., None], 3, -1)


def overlay(image2d: np.ndarray | None, labels2d: np.ndarray | None = None, *,
            outline: bool = True, alpha: float = 0.35,
            outline_color: Sequence[int] = (255, 60, 60)) -> np.ndarray:
    """An RGB uint8 picture of one slice: the image, with labels as outlines
    (outline=True) or as translucent colours."""
    if image2d is None and labels2d is None:
        raise ValueError("overlay needs an image or labels")
    shape = (image2d if image2d is not None else labels2d).shape
    rgb = _gray(image2d) if image2d is not None else np.zeros((*shape, 3), np.uint8)
    if labels2d is not None:
        if outline:
            rgb[boundaries(labels2d)] = np.asarray(outline_color, np.uint8)
        else:
            col = label_colors(labels2d).astype(np.float32)
            a = np.where(labels2d[..., None] > 0, alpha if image2d is not None else 1.0, 0.0)
            rgb = (rgb * (1 - a) + col * a).astype(np.uint8)
    return rgb


def montage(panels: Sequence[np.ndarray], ncols: int | None = None, pad: int = 4) -> np.ndarray:
    """Tiles equally-tall RGB panels into one picture (row-major)."""
    ncols = ncols or len(panels)
    h = max(p.shape[0] for p in panels)
    w = max(p.shape[1] for p in panels)
    nrows = -(-len(panels) // ncols)
    out = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, np.uint8)
    for i, p in enumerate(panels):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y:y + p.shape[0], x:x + p.shape[1]] = p
    return out


def default_slices(depth: int, n: int = 4) -> list[int]:
    """n z-indices spread evenly through a volume of the given depth."""
    return sorted({int(round(v)) for v in np.linspace(0, depth - 1, n + 2)[1:-1]})


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def save_slices_png(path: str | os.PathLike, image: np.ndarray | None,
                    labels: np.ndarray | None = None, segmentation: np.ndarray | None = None,
                    z_slices: Sequence[int] | None = None) -> Path:
    """Writes a montage: for each chosen z slice, the image with label outlines,
    and (when given) the segmentation as coloured objects. Returns the path."""
    vol = next(v for v in (image, labels, segmentation) if v is not None)
    zs = list(z_slices) if z_slices is not None else default_slices(vol.shape[0])
    panels = []
    for z in zs:
        img = image[z] if image is not None else None
        panels.append(overlay(img, labels[z] if labels is not None else None))
        if segmentation is not None:
            panels.append(overlay(img, segmentation[z], outline=False))
    ncols = 2 if segmentation is not None else min(len(panels), 4)
    return save_png(path, montage(panels, ncols=ncols))
