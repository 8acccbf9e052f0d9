"""Every seed policy of `ffnjax.seed_policies` against a direct construction
of google/ffn's (`ffn/inference/seed.py`, restated here with NumPy, SciPy and
scikit-image), their names, their arguments, and google/ffn's origins files."""

from __future__ import annotations

import sys
import types
from collections import namedtuple

import numpy as np
import pytest
from scipy import ndimage
from skimage.feature import peak_local_max

from ffnjax import gffn_output, seed_policies as sp, seeds as seeds_lib
from ffnjax.config import GOOGLE_SEED_POLICIES, InferenceOptions
from test_flood import cell_image

MARGIN = (4, 4, 4)


def run(name, args=None, margin=MARGIN, image=None, **ctx):
    opts = InferenceOptions(seed_policy=name, seed_policy_args=args or {})
    return sp.make_seeds(sp.SeedContext(cell_image() if image is None else image, opts, margin,
                                        **ctx))


def normalised(image):
    return (image.astype(np.float32) - np.float32(128)) / np.float32(33)


def inside(points, shape, margin=MARGIN):
    points = np.asarray(points, np.int64).reshape(-1, 3)
    m, hi = np.array(margin), np.array(shape) - np.array(margin)
    return points[np.all((points >= m) & (points < hi), axis=1)]


def jittered_peaks(values, **kw):
    """google/ffn's _find_peaks."""
    noise = np.random.RandomState(seed=42).rand(*values.shape) * 1e-4
    return peak_local_max(values + noise, threshold_rel=0, **kw)


def test_google_names_are_accepted_and_stored_as_ffnjaxs():
    # Policies with required arguments refuse options without them at once.
    required = {"invert_origins": "segmentation_dir", "sequence": "policies",
                "reverse": "policy_to_reverse"}
    for google, ours in GOOGLE_SEED_POLICIES.items():
        assert set(sp.POLICIES) >= {ours}
        if ours in required:
            with pytest.raises(ValueError, match=rf"'{ours}' needs argument\(s\) \['{required[ours]}'\]"):
                InferenceOptions(seed_policy=google)
            continue
        assert InferenceOptions(seed_policy=google).seed_policy == ours
    with pytest.raises(ValueError, match="PolicyPeaks2d"):
        InferenceOptions(seed_policy="PolicyTipTracer")
    o = InferenceOptions(seed_policy="PolicyGrid2d", seed_policy_args='{"step": 4}')
    assert InferenceOptions.from_json(o.to_json()) == o and o.seed_policy_args == '{"step": 4}'
    with pytest.raises(ValueError, match="seed_policy_args: expected a JSON object"):
        InferenceOptions(seed_policy_args="[1]")
    with pytest.raises(ValueError, match=r"takes no argument\(s\) \['stride'\]"):
        run("grid2d", {"stride": 4})
    with pytest.raises(ValueError, match=r"takes no argument\(s\) \['stride'\]"):
        InferenceOptions(seed_policy="PolicyGrid2d", seed_policy_args='{"stride": 4}')
    with pytest.raises(ValueError, match="needs argument"):
        run("invert_origins")


def test_peaks_without_masks_are_ffnjax_seeds():
    img = cell_image()
    for method in ("ffnjax", "google_ffn"):
        for order in ("zyx", "distance"):
            opts = InferenceOptions(peaks_method=method, seed_order=order)
            np.testing.assert_array_equal(sp.make_seeds(sp.SeedContext(img, opts, MARGIN)),
                                          seeds_lib.make_seeds(img, opts, MARGIN))


def test_masked_peaks_are_google_ffns_policy_peaks():
    img = cell_image(shape=(24, 32, 32), n=14)
    mask = np.zeros(img.shape, bool)
    mask[:, 20:] = True
    seg = np.zeros(img.shape, np.int64)
    seg[10:14, 4:12, 4:12] = 5
    got = sp.make_seeds(sp.SeedContext(img, InferenceOptions.google_ffn(), MARGIN, segmentation=seg,
                                       seed_mask=mask))
    # PolicyPeaks.init_coords with a restrictor's seed mask and a segmentation.
    edges = ndimage.generic_gradient_magnitude(normalised(img), ndimage.sobel)
    filt = edges > ndimage.gaussian_filter(edges, 49.0 / 6.0, mode="reflect")
    filt[mask] = True
    dt = ndimage.distance_transform_edt(1 - filt).astype(np.float32)
    dt[mask | (seg > 0)] = -1
    want = inside(sorted(map(tuple, jittered_peaks(dt, min_distance=3, threshold_abs=0))),
                  img.shape)
    np.testing.assert_array_equal(got, want)
    assert len(got) >= 3 and not (mask | (seg > 0))[tuple(got.T)].any()


@pytest.mark.parametrize("args", [{}, {"min_distance": 2, "threshold_abs": 0.5,
                                       "sort_cmp": "descending"}])
def test_peaks2d_is_google_ffns(args):
    img = cell_image(shape=(12, 40, 40), n=16)
    mask = np.zeros(img.shape, bool)
    mask[:, :, :6] = True
    got = run("PolicyPeaks2d", args, image=img, mask=mask)
    kw = {"min_distance": 7, "threshold_abs": 2.5, "sort_cmp": "ascending", **args}
    found = []
    for z in range(img.shape[0]):
        section = normalised(img)[z]
        edges = ndimage.generic_gradient_magnitude(section, ndimage.sobel)
        filt = edges > ndimage.gaussian_filter(edges, 49.0 / 6.0, mode="reflect")
        filt[mask[z]] = True
        dt = ndimage.distance_transform_edt(1 - filt).astype(np.float32)
        found += [(z, y, x) for y, x in jittered_peaks(dt, min_distance=kw["min_distance"],
                                                       threshold_abs=kw["threshold_abs"])]
    want = inside(sorted(found, reverse=kw["sort_cmp"] == "descending"), img.shape)
    np.testing.assert_array_equal(got, want)
    assert len(got) >= 5


def test_max_is_every_voxel_brightest_first():
    img = cell_image()
    got = run("PolicyMax")
    flat = normalised(img).ravel()
    order = np.argsort(flat)[::-1]  # google/ffn's expression (ties as NumPy breaks them)
    zz, yy, xx = np.mgrid[tuple(slice(0, s) for s in img.shape)]
    want = inside(np.stack([zz.flat[order], yy.flat[order], xx.flat[order]], 1), img.shape)
    np.testing.assert_array_equal(got, want)
    values = img[tuple(got.T)]
    assert np.all(np.diff(values.astype(int)) <= 0)


@pytest.mark.parametrize("name,args,offsets,in_z", [
    ("PolicyGrid2d", {}, (0, 8, 4, 12, 2, 6, 10, 14), False),
    ("PolicyGrid2d", {"step": 5, "offsets": [1, 3]}, (1, 3), False),
    ("PolicyGrid3d", {}, (0, 8, 4, 12, 2, 10, 14), True),
    ("PolicyGrid3d", {"step": 4, "offsets": [2, 0]}, (2, 0), True)])
def test_grids_are_google_ffns_loops(name, args, offsets, in_z):
    img = cell_image(shape=(20, 36, 36))
    step = args.get("step", 16)
    want = []
    for off in offsets:
        for z in range(off if in_z else 0, img.shape[0], step if in_z else 1):
            for y in range(off, img.shape[1], step):
                for x in range(off, img.shape[2], step):
                    want.append((z, y, x))
    np.testing.assert_array_equal(run(name, args, image=img), inside(want, img.shape))


@pytest.mark.parametrize("args", [{}, {"threshold": 1.2, "num_erosions": 2},
                                  {"threshold": -1.0, "invert": True}])
def test_dense_seeds_are_google_ffns(args):
    img = cell_image()
    kw = {"threshold": 0.5, "num_erosions": 0, "invert": False, **args}
    x = normalised(img) > kw["threshold"]
    if kw["invert"]:
        x = ~x
    for _ in range(kw["num_erosions"]):  # skimage.morphology.binary_erosion's defaults
        x = ndimage.binary_erosion(x, ndimage.generate_binary_structure(3, 1), border_value=1)
    want = inside(np.array(np.where(x)).T, img.shape)
    got = run("PolicyDenseSeeds", args)
    np.testing.assert_array_equal(got, want)
    assert len(got) > 10


def test_fill_empty_space_seeds_the_gaps_of_the_starting_segmentation():
    img = cell_image(shape=(24, 32, 32))
    seg = np.ones(img.shape, np.int64)
    seg[:, 16:] = 2
    seg[6:18, 5:13, 6:26] = 0  # two gaps
    seg[8:16, 18:28, 10:22] = 0
    got = run("PolicyFillEmptySpace", image=img, segmentation=seg)
    dt = ndimage.distance_transform_edt(seg == 0).astype(np.float32)
    want = inside(sorted(map(tuple, jittered_peaks(dt, min_distance=2, threshold_abs=0.5))),
                  img.shape)
    np.testing.assert_array_equal(got, want)
    assert len(got) >= 1 and not seg[tuple(got.T)].any()
    assert len(run("PolicyFillEmptySpace", image=img)) == 0  # nothing segmented yet


def test_sequence_and_reverse_chain_their_policies():
    a, b = run("grid3d", {"step": 6}), run("PolicyPeaks")
    seq = {"policies": [["PolicyGrid3d", {"step": 6}], ["peaks", {}]]}
    np.testing.assert_array_equal(run("SequentialPolicies", seq), np.concatenate([a, b]))
    np.testing.assert_array_equal(
        run("ReverseCoords", {"policy_to_reverse": "PolicyGrid3d", "step": 6}), a[::-1])
    with pytest.raises(ValueError, match=r"\[name, \{args\}\]"):
        run("sequence", {"policies": [["peaks"]]})
    with pytest.raises(ValueError, match="takes no argument"):
        run("sequence", {"policies": [["grid3d", {"stride": 2}]]})


def test_distance_order_reorders_any_policy():
    img = cell_image()
    opts = InferenceOptions(seed_policy="grid3d", seed_policy_args={"step": 6},
                            seed_order="distance")
    got = sp.make_seeds(sp.SeedContext(img, opts, MARGIN))
    dist = seeds_lib.edge_distance(img)[tuple(got.T)]
    assert np.all(np.diff(dist) <= 0) and len(got) == len(run("grid3d", {"step": 6}))


def test_invert_origins_reads_ffnjax_and_google_ffn_files(tmp_path, monkeypatch):
    corner = (10, 20, 30)
    origins = {1: gffn_output.OriginInfo((5, 6, 7), 3, 0.5),
               3: gffn_output.OriginInfo((8, 9, 10), 1, 0.1),
               2: gffn_output.OriginInfo((6, 6, 6), 2, 0.2)}
    labels = np.zeros((20, 20, 20), np.int64)
    ours = tmp_path / "ours"
    path = gffn_output.save_subvolume(ours, corner, labels, origins, request_text="r")
    assert path == ours / "30" / "20" / "seg-30_20_10.npz"
    assert gffn_output.load_origins(ours, corner) == origins
    want = np.array([(8, 9, 10), (6, 6, 6), (5, 6, 7)])  # highest id first
    img = cell_image(shape=(20, 20, 20))
    got = run("PolicyInvertOrigins", {"segmentation_dir": str(ours)}, image=img, corner=corner)
    np.testing.assert_array_equal(got, want)
    # google/ffn's file: origins pickled as a dict of ffn.inference.storage.OriginInfo.
    fake = types.ModuleType("ffn.inference.storage")
    theirs_t = namedtuple("OriginInfo", ["start_zyx", "iters", "walltime_sec"])
    theirs_t.__module__ = "ffn.inference.storage"
    fake.OriginInfo = theirs_t
    for name in ("ffn", "ffn.inference"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "ffn.inference.storage", fake)
    legacy = tmp_path / "theirs" / "seg-30_20_10.npz"
    legacy.parent.mkdir()
    np.savez_compressed(legacy, segmentation=labels.astype(np.uint8), origins={
        k: theirs_t(*v) for k, v in origins.items()})
    monkeypatch.delitem(sys.modules, "ffn.inference.storage")
    got = run("invert_origins", {"segmentation_dir": str(tmp_path / "theirs"),
                                 "corner": list(corner)}, image=img)
    np.testing.assert_array_equal(got, want)
    # Anything but arrays, containers and OriginInfo is refused, not built.
    evil = tmp_path / "evil" / "seg-30_20_10.npz"
    evil.parent.mkdir()
    np.savez(evil, origins=np.array({1: types.SimpleNamespace(a=1)}, dtype=object))
    with pytest.raises(ValueError, match="refusing to build types.SimpleNamespace"):
        gffn_output.load_origins(evil.parent, corner)
    with pytest.raises(ValueError, match="no segmentation of the subvolume"):
        gffn_output.load_origins(tmp_path, corner)
