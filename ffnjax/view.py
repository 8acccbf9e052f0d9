"""Pictures of volumes: PNG slices, montages, and a local Neuroglancer viewer.

The one place for looking at data. All inputs are z,y,x.

* Slices of arrays in memory: `overlay` draws one slice (the image in grey,
  labels as outlines or translucent colours), `montage` tiles panels,
  `save_slices_png` writes a montage of chosen z slices, `save_png` any RGB
  picture. Colours are a fixed hash of the object id (`label_colors`), so the
  same id has the same colour in every picture.
* Volumes on disk (any `ffnjax.volumes` spec, or an opened Volume):
  `save_montage` reads only the chosen z slices (`read_slices`), so memory is
  bounded by the slices, not the volume; `make_viewer` serves image and
  segmentation to a browser, chunk by chunk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ffnjax.handles import as_volume, spec_text

# ----------------------------------------------------------------------------
# Slices in memory


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
    """Writes an RGB uint8 picture as PNG (creating its folder). Returns the path."""
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


# ----------------------------------------------------------------------------
# Volumes: slice montages and the Neuroglancer viewer


def read_slices(spec: Any, z_slices: Sequence[int]) -> np.ndarray:
    """Whole z slices of a volume stacked as (len(z_slices), y, x); memory is
    bounded by the slices, not the volume."""
    vol = as_volume(spec)
    _, ny, nx = vol.shape
    return np.stack([vol.read((int(z), 0, 0), (1, ny, nx))[0] for z in z_slices])


def save_montage(path: str | os.PathLike, image_spec: Any, segmentation_spec: Any,
                 n_slices: int = 4, z_slices: Sequence[int] | None = None) -> Path:
    """A PNG of a few z slices: each image slice beside it with the
    segmentation's objects in colour. Returns the path."""
    shape = as_volume(segmentation_spec).shape
    if tuple(as_volume(image_spec).shape[:3]) != tuple(shape):
        raise ValueError(f"image {spec_text(image_spec)!r} and segmentation "
                         f"{spec_text(segmentation_spec)!r} differ in shape")
    zs = list(z_slices) if z_slices is not None else default_slices(shape[0], n_slices)
    bad = [z for z in zs if not 0 <= z < shape[0]]
    if bad:
        raise ValueError(f"z slices {bad} outside the volume depth {shape[0]}")
    image = read_slices(image_spec, zs)
    seg = read_slices(segmentation_spec, zs)
    return save_slices_png(path, image, segmentation=seg, z_slices=range(len(zs)))


def _ng_source(vol: Any, coords: Any, segmentation: bool):
    import neuroglancer  # see make_viewer
    data = getattr(vol, "store", None)
    if data is None:  # h5/npz/npy imports and in-memory volumes: read into memory
        data = vol.read()
    return neuroglancer.LocalVolume(data, dimensions=coords,
                                    volume_type="segmentation" if segmentation else "image")


def make_viewer(image_spec: Any = None, segmentation_spec: Any = None, *,
                bind_address: str = "127.0.0.1", port: int = 0):
    """A local Neuroglancer viewer showing the image and the segmentation.

    Volumes are served lazily from their TensorStore (zarr/N5/precomputed),
    chunk by chunk as the browser asks; import formats (h5/npz/npy) are read
    into memory. The viewer's web server binds to `bind_address` (loopback by
    default, so only this machine can see the data).

    Returns:
      a `neuroglancer.Viewer`; `viewer.get_viewer_url()` is the address to open.
    """
    # Imported here, not at the top: neuroglancer takes over a second to import
    # and this module is also imported for PNGs alone (training, evaluation).
    import neuroglancer
    if image_spec is None and segmentation_spec is None:
        raise ValueError("make_viewer needs an image, a segmentation, or both")
    neuroglancer.set_server_bind_address(bind_address, port)
    viewer = neuroglancer.Viewer()
    first = as_volume(image_spec if image_spec is not None else segmentation_spec)
    coords = neuroglancer.CoordinateSpace(names=["z", "y", "x"], units="nm",
                                          scales=list(getattr(first, "voxel_size", (1, 1, 1))))
    with viewer.txn() as s:
        s.dimensions = coords
        if image_spec is not None:
            s.layers["image"] = neuroglancer.ImageLayer(source=_ng_source(as_volume(image_spec), coords, False))
        if segmentation_spec is not None:
            seg = as_volume(segmentation_spec)
            if image_spec is not None and tuple(seg.shape) != tuple(first.shape[:3]):
                raise ValueError(f"segmentation {spec_text(segmentation_spec)!r} has shape {seg.shape}, "
                                 f"image {spec_text(image_spec)!r} has {first.shape[:3]}")
            s.layers["segmentation"] = neuroglancer.SegmentationLayer(source=_ng_source(seg, coords, True))
        s.position = [n / 2 for n in first.shape[:3]]
    return viewer
