"""Synthetic neuropil: deterministic, dense, connected objects of sane size,
dark membranes exactly on label boundaries, FFN-like intensity statistics."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest

from ffnjax import synthetic
from ffnjax.volumes import open_volume

SHAPE = (48, 64, 64)


@pytest.fixture(scope="module")
def vol():
    return synthetic.make_volume(SHAPE, seed=3)


def test_types_shapes_and_determinism(vol):
    image, labels = vol
    assert image.shape == labels.shape == SHAPE
    assert image.dtype == np.uint8 and labels.dtype == np.uint32
    image2, labels2 = synthetic.make_volume(SHAPE, seed=3)
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(labels, labels2)
    other, _ = synthetic.make_volume(SHAPE, seed=4)
    assert np.mean(other != image) > 0.5


def test_labels_dense_consecutive_and_connected(vol):
    _, labels = vol
    assert labels.min() == 1
    ids = np.unique(labels)
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    # Each id is exactly one 6-connected component.
    assert cc3d.connected_components(labels, connectivity=6).max() == len(ids)


def test_object_sizes_in_sane_range(vol):
    _, labels = vol
    sizes = synthetic.object_sizes(labels)
    assert sizes.sum() == labels.size
    assert 5 <= len(sizes) <= 200
    assert sizes.min() >= synthetic.SyntheticConfig().min_fragment
    assert 2_000 <= np.median(sizes) <= 100_000


def test_objects_are_elongated(vol):
    """Neurites are tubes: the largest objects' principal axis is much longer
    than the smallest (spheres or slabs would give ratios near 1)."""
    _, labels = vol
    sizes = synthetic.object_sizes(labels)
    ratios = []
    for i in np.argsort(sizes)[::-1][:5] + 1:
        coords = np.argwhere(labels == i).astype(float)
        ev = np.linalg.eigvalsh(np.cov(coords.T))
        ratios.append(np.sqrt(ev[-1] / ev[0]))
    assert np.median(ratios) > 2.0


def test_membranes_lie_on_boundaries(vol):
    image, labels = vol
    mem = synthetic.membrane_mask(labels)
    # membrane_mask computed another way: a 6-neighbourhood max != min filter.
    from scipy import ndimage as ndi
    fp = ndi.generate_binary_structure(3, 1)
    other = ndi.maximum_filter(labels, footprint=fp, mode="nearest") != \
        ndi.minimum_filter(labels, footprint=fp, mode="nearest")
    np.testing.assert_array_equal(mem, other)
    # Membranes are dark: far below the interior on average, and the darkest
    # voxels of the image are nearly all within one voxel of a boundary.
    assert image[mem].mean() < image[~mem].mean() - 40
    near = ndi.binary_dilation(mem, fp)
    dark = image <= np.percentile(image, 5)
    assert near[dark].mean() > 0.9
    # Every boundary is visible: averaged over each pair of touching objects,
    # the membrane is darker than both interiors.
    a, b = labels[:, :, :-1], labels[:, :, 1:]
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], -1)[a != b], axis=0)
    interior = np.bincount(labels[~mem], weights=image[~mem], minlength=labels.max() + 1) / \
        np.maximum(np.bincount(labels[~mem], minlength=labels.max() + 1), 1)
    side = (a != b)
    lo = np.minimum(a, b)[side].astype(np.int64) * (labels.max() + 1) + np.maximum(a, b)[side]
    val = (image[:, :, :-1][side].astype(float) + image[:, :, 1:][side]) / 2
    key = pairs[:, 0].astype(np.int64) * (labels.max() + 1) + pairs[:, 1]
    mean_mem = np.array([val[lo == k].mean() for k in key])
    assert np.all(mean_mem < np.minimum(interior[pairs[:, 0]], interior[pairs[:, 1]]))


def test_intensity_statistics_like_normalised_em(vol):
    image, _ = vol
    assert abs(image.mean() - 128) < 5 and abs(image.std() - 33) < 5


@pytest.mark.parametrize("anisotropy", [1.0, 2.0])
def test_no_gaps_in_membranes(anisotropy):
    """A net must be able to stop at every boundary: across (nearly) every
    face between two objects, the darker voxel is darker than three quarters
    of the cytoplasm."""
    image, labels = synthetic.make_volume((32, 48, 48), seed=6, anisotropy=anisotropy)
    cytoplasm_q25 = np.percentile(image[~synthetic.membrane_mask(labels)], 25)
    bright = []
    for ax in range(3):
        lab, img = np.moveaxis(labels, ax, 0), np.moveaxis(image, ax, 0)
        face = lab[1:] != lab[:-1]
        bright.append(np.minimum(img[1:], img[:-1])[face] > cytoplasm_q25)
    assert np.mean(np.concatenate(bright)) < 0.002


@pytest.mark.parametrize("anisotropy", [1.0, 2.0])
def test_anisotropy_scales_boundary_rate_in_z(anisotropy):
    """Objects are isotropic in physical space, so label changes per voxel
    step along z happen `anisotropy` times as often as along y/x."""
    cfg = synthetic.SyntheticConfig(mean_radius=4)
    _, labels = synthetic.make_volume((32, 64, 64), seed=1, anisotropy=anisotropy, config=cfg)
    rate_z = np.mean(labels[1:] != labels[:-1])
    rate_yx = (np.mean(labels[:, 1:] != labels[:, :-1]) + np.mean(labels[:, :, 1:] != labels[:, :, :-1])) / 2
    assert rate_z / rate_yx == pytest.approx(anisotropy, rel=0.2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        synthetic.make_volume((64, 64))
    with pytest.raises(ValueError, match="shape"):
        synthetic.make_volume((4, 64, 64))
    with pytest.raises(ValueError, match="anisotropy"):
        synthetic.make_volume((16, 16, 16), anisotropy=0)
    with pytest.raises(ValueError, match="fill"):
        synthetic.SyntheticConfig(fill=0)


def test_cli_writes_volumes_and_png(tmp_path):
    from experiments import synthetic as cli
    paths = cli.main(["--out", str(tmp_path), "--shape", "16,24,24", "--seed", "2",
                      "--anisotropy", "2"])
    image, labels = synthetic.make_volume((16, 24, 24), seed=2, anisotropy=2.0)
    img_vol = open_volume(paths["image"])
    np.testing.assert_array_equal(img_vol.read(), image)
    np.testing.assert_array_equal(open_volume(paths["labels"]).read(), labels)
    assert img_vol.voxel_size == (16.0, 8.0, 8.0)
    from PIL import Image
    png = Image.open(paths["preview"])
    assert png.size[0] > 24 and png.mode == "RGB"
    with pytest.raises(FileExistsError):
        cli.main(["--out", str(tmp_path), "--shape", "16,24,24"])


@pytest.mark.slow
def test_default_128_cube_is_fast_and_sane():
    import time
    t0 = time.perf_counter()
    image, labels = synthetic.make_volume((128, 128, 128), seed=0)
    assert time.perf_counter() - t0 < 20  # a few seconds on an idle core
    sizes = synthetic.object_sizes(labels)
    assert 20 <= len(sizes) <= 150 and 10_000 <= np.median(sizes) <= 300_000
    assert abs(image.mean() - 128) < 3 and abs(image.std() - 33) < 3
