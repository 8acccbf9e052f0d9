"""Pictures of volumes: PNG slices, montages, and a local Neuroglancer viewer.

The one place for looking at data. All inputs are z,y,x.

* Slices of arrays in memory: `overlay` draws one slice (the image in grey,
  labels as outlines or translucent colours), `montage` tiles panels,
  `figure` tiles them with column and row titles, a colour key and notes
  drawn in the picture, `save_slices_png` writes a montage of chosen z
  slices, `save_png` any RGB picture. Colours are a fixed hash of the object id (`label_colors`), so the
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
from PIL import Image, ImageDraw, ImageFont

from ffnjax.handles import as_volume, spec_text

# ----------------------------------------------------------------------------
# Slices in memory


def label_colors(labels: np.ndarray, vivid: bool = False) -> np.ndarray:
    """RGB uint8 colour per voxel from a hash of its id (0 is black).

    The default colours are muted (each channel 96..223); `vivid` gives
    saturated ones instead (the hash picks the hue), which stand out over an
    EM image.
    """
    ids = labels.astype(np.uint64)
    h = (ids * np.uint64(2654435761)) % np.uint64(2**32)
    if vivid:
        hue = (h & np.uint64(1023)).astype(np.float32) / 1024.0
        sat = 0.65 + 0.35 * ((h >> np.uint64(10)) & np.uint64(255)).astype(np.float32) / 255.0
        val = 0.8 + 0.2 * ((h >> np.uint64(18)) & np.uint64(255)).astype(np.float32) / 255.0
        k = (np.asarray((5.0, 3.0, 1.0), np.float32) + hue[..., None] * 6.0) % 6.0
        ramp = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
        rgb = (255.0 * val[..., None] * (1.0 - sat[..., None] * ramp)).astype(np.uint8)
    else:
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
            outline_color: Sequence[int] = (255, 60, 60), vivid: bool = False) -> np.ndarray:
    """An RGB uint8 picture of one slice: the image, with labels as outlines
    (outline=True) or as translucent colours (`alpha`; `vivid`: saturated
    ones, see `label_colors`)."""
    if image2d is None and labels2d is None:
        raise ValueError("overlay needs an image or labels")
    shape = (image2d if image2d is not None else labels2d).shape
    rgb = _gray(image2d) if image2d is not None else np.zeros((*shape, 3), np.uint8)
    if labels2d is not None:
        if outline:
            rgb[boundaries(labels2d)] = np.asarray(outline_color, np.uint8)
        else:
            col = label_colors(labels2d, vivid).astype(np.float32)
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


def _font(size: int):
    """Pillow's bundled font at `size` px (its small bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1


def figure(panels: Sequence[np.ndarray], ncols: int, *, column_titles: Sequence[str] = (),
           row_titles: Sequence[str] = (), legend: Sequence[tuple[Sequence[int], str]] = (),
           banner: str | None = None, notes: dict[int, str] | None = None,
           min_panel: int = 192, pad: int = 6, font_size: int = 14) -> np.ndarray:
    """Equally sized RGB panels tiled row-major into a picture that reads by itself.

    Args:
      panels: RGB uint8 pictures of one shape; small ones are enlarged by a
        whole factor (nearest neighbour, so voxels stay square) until their
        longer side reaches `min_panel` pixels, so the text fits beside them.
      ncols: panels per row.
      column_titles: a title above each column.
      row_titles: a title left of each row.
      legend: (colour, meaning) pairs, drawn below as swatches with text (a
        key to what each colour in the panels means).
      banner: a line in red above everything (a warning that must be seen).
      notes: {panel index: text} written across the middle of that panel on a
        dark band (e.g. 'empty segmentation').

    Returns:
      an RGB uint8 picture on a white background.
    """
    h, w = panels[0].shape[:2]
    if any(p.shape[:2] != (h, w) for p in panels):
        raise ValueError("figure needs panels of one shape")
    k = max(1, -(-min_panel // max(h, w)))
    big = [np.kron(p, np.ones((k, k, 1), np.uint8)) for p in panels]
    h, w = h * k, w * k
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(measure, "Ag", font)[1] + 4
    left = max((_text_size(measure, t, font)[0] for t in row_titles), default=0)
    left = left + 2 * pad if left else pad
    top = pad + (line_h if banner else 0) + (line_h if column_titles else 0)
    nrows = -(-len(big) // ncols)
    width = left + ncols * (w + pad)
    # The key, wrapped into lines no wider than the picture.
    swatch = line_h - 6
    entries = [(tuple(int(c) for c in col), text,
                swatch + 6 + _text_size(measure, text, font)[0] + 3 * pad) for col, text in legend]
    key_lines: list[list[tuple[tuple[int, ...], str, int]]] = []
    for entry in entries:
        if key_lines and sum(e[2] for e in key_lines[-1]) + entry[2] <= width - 2 * pad:
            key_lines[-1].append(entry)
        else:
            key_lines.append([entry])
    height = top + nrows * (h + pad) + (len(key_lines) * line_h + pad if key_lines else 0)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = pad
    if banner:
        draw.text((pad, y), banner, fill=(200, 0, 0), font=font)
        y += line_h
    if column_titles:
        for c, title in enumerate(column_titles[:ncols]):
            tw = _text_size(draw, title, font)[0]
            draw.text((left + c * (w + pad) + max(0, (w - tw) // 2), y), title, fill=(0, 0, 0),
                      font=font)
    for i, p in enumerate(big):
        r, c = divmod(i, ncols)
        x0, y0 = left + c * (w + pad), top + r * (h + pad)
        canvas.paste(Image.fromarray(p), (x0, y0))
        if notes and i in notes:
            tw, th = _text_size(draw, notes[i], font)
            yc = y0 + (h - line_h) // 2
            draw.rectangle((x0, yc, x0 + w - 1, yc + line_h), fill=(30, 30, 30))
            draw.text((x0 + max(2, (w - tw) // 2), yc + 2), notes[i], fill=(255, 255, 255),
                      font=font)
    for r, title in enumerate(row_titles[:nrows]):
        th = _text_size(draw, title, font)[1]
        draw.text((pad, top + r * (h + pad) + (h - th) // 2), title, fill=(0, 0, 0), font=font)
    y = top + nrows * (h + pad)
    for line in key_lines:
        x = pad
        for col, text, span in line:
            draw.rectangle((x, y + 3, x + swatch, y + 3 + swatch), fill=col, outline=(0, 0, 0))
            draw.text((x + swatch + 6, y), text, fill=(0, 0, 0), font=font)
            x += span
        y += line_h
    return np.asarray(canvas)


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
