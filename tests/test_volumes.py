"""Volumes: round trips through every driver and import format, geometry
metadata, on-disk axis order, and every bad-input error."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import tensorstore as ts

from ffnjax import volumes
from ffnjax.volumes import create_volume, open_volume, parse_spec, read_all, save_volume

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (6, 9, 11), dtype=np.uint8)
LABELS = RNG.integers(0, 2**40, (6, 9, 11), dtype=np.uint64)

DRIVERS = ["{d}/v.zarr", "{d}/v.n5", "precomputed://{d}/v"]


@pytest.mark.parametrize("fmt", DRIVERS)
@pytest.mark.parametrize("data", [IMAGE, LABELS, LABELS.astype(np.uint32) % 1000,
                                  RNG.standard_normal((6, 9, 11)).astype(np.float32)],
                         ids=["uint8", "uint64", "uint32", "float32"])
def test_round_trip_every_driver(tmp_path, fmt, data):
    spec = fmt.format(d=tmp_path)
    save_volume(spec, data, voxel_size=(40, 8, 4), offset=(3, 5, 7), chunks=(4, 4, 8))
    vol = open_volume(spec)
    assert vol.shape == data.shape and vol.dtype == data.dtype and vol.num_channels is None
    assert vol.voxel_size == (40.0, 8.0, 4.0) and vol.offset == (3, 5, 7)
    assert vol.chunks == (4, 4, 8)
    np.testing.assert_array_equal(vol.read(), data)
    np.testing.assert_array_equal(vol.read((1, 2, 3), (4, 5, 6)), data[1:5, 2:7, 3:9])
    np.testing.assert_array_equal(vol.read((2, 0, 1)), data[2:, :, 1:])


@pytest.mark.parametrize("fmt", DRIVERS)
def test_channel_axis_round_trip(tmp_path, fmt):
    spec = fmt.format(d=tmp_path)
    data = RNG.standard_normal((5, 6, 7, 3)).astype(np.float32)
    save_volume(spec, data, voxel_size=(8, 8, 8))
    vol = open_volume(spec)
    assert vol.shape == (5, 6, 7) and vol.num_channels == 3 and vol.ndim == 4
    np.testing.assert_array_equal(vol.read((1, 1, 1), (2, 3, 4)), data[1:3, 1:4, 1:5])


def test_partial_writes_compose(tmp_path):
    vol = create_volume(tmp_path / "seg.zarr", (6, 9, 11), "uint64")
    vol.write((0, 0, 0), LABELS[:3])
    vol.write((3, 0, 0), LABELS[3:].astype(np.int64) % 7)  # int64 values that fit are cast
    expected = LABELS.copy()
    expected[3:] %= 7
    np.testing.assert_array_equal(open_volume(tmp_path / "seg.zarr").read(), expected)
    # Unwritten volumes read as zeros.
    np.testing.assert_array_equal(create_volume(tmp_path / "z.n5", (2, 3, 4), "uint8").read(),
                                  np.zeros((2, 3, 4), np.uint8))


def test_new_zarr_is_v3_with_attributes(tmp_path):
    save_volume(tmp_path / "a.zarr", IMAGE, voxel_size=(30, 4, 4), offset=(1, 2, 3))
    meta = json.loads((tmp_path / "a.zarr" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["dimension_names"] == ["z", "y", "x"]
    assert meta["attributes"]["voxel_size"] == [30, 4, 4]
    assert meta["attributes"]["offset"] == [1, 2, 3]


def test_precomputed_is_xyz_on_disk_and_segmentation_typed(tmp_path):
    save_volume(f"precomputed://{tmp_path}/seg", LABELS, voxel_size=(40, 8, 4), offset=(3, 5, 7))
    info = json.loads((tmp_path / "seg" / "info").read_text())
    assert info["type"] == "segmentation" and info["data_type"] == "uint64"
    scale = info["scales"][0]
    assert scale["size"] == [11, 9, 6] and scale["resolution"] == [4, 8, 40]
    assert scale["voxel_offset"] == [7, 5, 3] and scale["encoding"] == "compressed_segmentation"
    # Read it back with plain TensorStore, which sees x,y,z,channel in global coordinates.
    raw = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path}/seg/"}).result()
    assert raw.domain.labels == ("x", "y", "z", "channel")
    np.testing.assert_array_equal(raw[7:18, 5:14, 3:9, 0].read().result(), LABELS.transpose(2, 1, 0))
    save_volume(f"precomputed://{tmp_path}/img", IMAGE)
    assert json.loads((tmp_path / "img" / "info").read_text())["type"] == "image"


def test_n5_lists_dimensions_xyz(tmp_path):
    save_volume(tmp_path / "a.n5", IMAGE, voxel_size=(40, 8, 4))
    attrs = json.loads((tmp_path / "a.n5" / "attributes.json").read_text())
    assert attrs["dimensions"] == [11, 9, 6] and attrs["resolution"] == [4, 8, 40]


def test_full_json_spec_and_zarr_v2(tmp_path):
    path = str(tmp_path / "v2.zarr")
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": path},
                     "metadata": {"shape": [6, 9, 11], "chunks": [3, 3, 3], "dtype": "|u1"}},
                    create=True).result()
    store.write(IMAGE).result()
    (tmp_path / "v2.zarr" / ".zattrs").write_text(json.dumps({"voxel_size": [9, 8, 7]}))
    vol = open_volume(path)  # short string: zarr v2 detected
    assert vol.voxel_size == (9, 8, 7)
    np.testing.assert_array_equal(vol.read(), IMAGE)
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}
    np.testing.assert_array_equal(open_volume(spec).read(), IMAGE)
    np.testing.assert_array_equal(open_volume(json.dumps(spec)).read((1, 1, 1), (1, 2, 3)),
                                  IMAGE[1:2, 1:3, 1:4])
    # Creating from a JSON spec.
    new = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "j.zarr")}}
    create_volume(new, (6, 9, 11), "uint8").write((0, 0, 0), IMAGE)
    np.testing.assert_array_equal(read_all(tmp_path / "j.zarr"), IMAGE)


def test_imports_h5_npz_npy(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        d = f.create_dataset("volumes/raw", data=IMAGE)
        d.attrs["resolution"] = (40.0, 4.0, 4.0)   # CREMI: resolution and offset in nm
        d.attrs["offset"] = (80.0, 40.0, 0.0)
    with open_volume(f"{tmp_path}/f.h5:volumes/raw") as vol:
        assert vol.shape == IMAGE.shape and vol.dtype == np.uint8
        assert vol.voxel_size == (40, 4, 4) and vol.offset == (2, 10, 0)
        np.testing.assert_array_equal(vol.read((1, 2, 3), (2, 2, 2)), IMAGE[1:3, 2:4, 3:5])
    np.savez(tmp_path / "f.npz", raw=IMAGE, labels=LABELS)
    np.testing.assert_array_equal(read_all(f"{tmp_path}/f.npz:labels"), LABELS)
    np.savez(tmp_path / "one.npz", only=IMAGE)
    np.testing.assert_array_equal(read_all(f"{tmp_path}/one.npz"), IMAGE)
    np.save(tmp_path / "f.npy", IMAGE)
    np.testing.assert_array_equal(read_all(tmp_path / "f.npy"), IMAGE)



def test_read_all_takes_boxes_and_stacking_in_any_format(tmp_path):
    """`read_spec`'s grammar (`volumes.read_spec`, tested in test_train_cli too)
    works through `read_all`, for TensorStore formats and imports alike."""
    save_volume(tmp_path / "a.zarr", IMAGE)
    np.savez(tmp_path / "b.npz", raw=IMAGE[:2])
    np.testing.assert_array_equal(read_all(f"{tmp_path}/a.zarr@1:4,6:,:5"), IMAGE[1:4, 6:, :5])
    np.testing.assert_array_equal(read_all(f"{tmp_path}/a.zarr@4:,:,:+{tmp_path}/b.npz:raw"),
                                  np.concatenate([IMAGE[4:], IMAGE[:2]]))
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        read_all(f"{tmp_path}/missing.zarr@0:1,:,:")
    # A JSON spec is read whole, never split at '+' or '@'.
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "a.zarr")}}
    np.testing.assert_array_equal(volumes.read_spec(spec), IMAGE)
    np.testing.assert_array_equal(read_all(json.dumps(spec)), IMAGE)

def test_open_input_places_boxes_and_stacks_by_offset(tmp_path):
    """`open_input`: a plain spec opens as `open_volume` does; the grammar reads
    into a read-only Volume whose offset is the first part's stored offset plus
    its box start, and whose voxel size is that part's."""
    save_volume(tmp_path / "a.zarr", IMAGE, voxel_size=(8, 4, 4), offset=(10, 20, 30))
    np.savez(tmp_path / "b.npz", raw=IMAGE[:2])
    plain = volumes.open_input(str(tmp_path / "a.zarr"))
    assert plain.offset == (10, 20, 30) and plain.store is not None
    vol = volumes.open_input(f"{tmp_path}/a.zarr@1:4,6:,:5")
    assert (vol.offset, vol.voxel_size, vol.shape) == ((11, 26, 30), (8.0, 4.0, 4.0), (3, IMAGE.shape[1] - 6, 5))
    np.testing.assert_array_equal(vol.read((1, 0, 0), (2, 2, 2)), IMAGE[2:4, 6:8, :2])
    stack = volumes.open_input(f"{tmp_path}/b.npz:raw+{tmp_path}/a.zarr")
    assert stack.offset == (0, 0, 0) and not stack.writable
    np.testing.assert_array_equal(stack.read(), np.concatenate([IMAGE[:2], IMAGE]))
    with pytest.raises(ValueError, match="read-only"):
        stack.write((0, 0, 0), IMAGE[:1])


def test_parse_spec_kinds():
    assert parse_spec("out/seg.zarr").kind == "zarr"
    assert parse_spec("out/seg.zarr/").path == "out/seg.zarr"
    assert parse_spec("x.N5").kind == "n5"
    p = parse_spec("precomputed://gs://bucket/seg")
    assert (p.kind, p.path) == ("precomputed", "gs://bucket/seg")
    h = parse_spec("/d/a:b/f.hdf5:/volumes/labels/neuron_ids")
    assert (h.kind, h.path, h.key) == ("h5", "/d/a:b/f.hdf5", "/volumes/labels/neuron_ids")
    assert parse_spec("f.npz:raw").key == "raw" and parse_spec("f.npz").key == ""
    assert parse_spec('{"driver": "zarr3", "kvstore": "memory://"}').kind == "tensorstore"
    assert parse_spec("f.npz:raw").is_import and not parse_spec("a.zarr").is_import


def test_memory_kvstore_json_spec():
    spec = {"driver": "zarr3", "kvstore": "memory://mem_test/"}
    vol = create_volume(spec, (4, 5, 6), "uint16", voxel_size=(2, 2, 2))
    vol.write((1, 1, 1), np.full((2, 2, 2), 9, np.uint16))
    assert vol.read((1, 1, 1), (2, 2, 2)).min() == 9 and vol.read().sum() == 9 * 8
    assert vol.voxel_size == (2, 2, 2) and vol.store is not None


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("spec,err,match", [
    ("{tmp}/missing.zarr", FileNotFoundError, "missing.zarr"),
    ("{tmp}/missing.n5", FileNotFoundError, "missing.n5"),
    ("precomputed://{tmp}/missing", FileNotFoundError, "missing"),
    ("{tmp}/missing.h5:raw", FileNotFoundError, "missing.h5"),
    ("{tmp}/missing.npz:raw", FileNotFoundError, "missing.npz"),
    ("{tmp}/f.npz:nokey", ValueError, "'nokey'.*raw"),
    ("{tmp}/f.npz", ValueError, "holds arrays"),
    ("{tmp}/f.h5:nodata", ValueError, "'nodata'.*raw"),
    ("{tmp}/f.h5", ValueError, "no dataset"),
    ("{tmp}/flat.npz:a", ValueError, r"shape \(4, 5\)"),
    ("{tmp}/cplx.npy", ValueError, "complex128"),
    ("{tmp}/empty.zarr", ValueError, "not a zarr array"),
    ("{tmp}/volume.tif", ValueError, "cannot tell the format"),
    ("", ValueError, "empty volume spec"),
    ("{{not json", ValueError, "not valid JSON"),
    ('{{"kvstore": "memory://"}}', ValueError, "'driver'"),
    ('{{"driver": "zarr3", "kvstore": {{"driver": "file", "path": "{tmp}/nope.zarr"}}}}',
     FileNotFoundError, "nope.zarr"),
])
def test_bad_open_raises_named_error(tmp_path, spec, err, match):
    np.savez(tmp_path / "f.npz", raw=IMAGE, labels=IMAGE)
    np.savez(tmp_path / "flat.npz", a=np.zeros((4, 5)))
    np.save(tmp_path / "cplx.npy", np.zeros((2, 2, 2), complex))
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["raw"] = IMAGE
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(err, match=match):
        open_volume(spec.format(tmp=tmp_path))


def test_bad_mode_and_read_only(tmp_path):
    save_volume(tmp_path / "a.zarr", IMAGE)
    with pytest.raises(ValueError, match="mode"):
        open_volume(tmp_path / "a.zarr", mode="w")
    with pytest.raises(ValueError, match="read-only"):
        open_volume(tmp_path / "a.zarr").write((0, 0, 0), IMAGE)
    np.save(tmp_path / "f.npy", IMAGE)
    with pytest.raises(ValueError, match="read-only"):
        open_volume(tmp_path / "f.npy", mode="r+")
    with pytest.raises(ValueError, match="read-only"):
        create_volume(f"{tmp_path}/f.npz:raw", (2, 2, 2), "uint8")


@pytest.mark.parametrize("start,size", [((0, 0, 0), (7, 9, 11)), ((-1, 0, 0), (1, 1, 1)),
                                        ((5, 8, 10), (1, 1, 2)), ((0, 0, 0), (0, 1, 1)),
                                        ((0, 0), (1, 1, 1))])
def test_box_outside_volume(tmp_path, start, size):
    save_volume(tmp_path / "a.zarr", IMAGE)
    with pytest.raises(ValueError, match="outside volume|positive|three"):
        open_volume(tmp_path / "a.zarr").read(start, size)


def test_bad_writes_leave_data_untouched(tmp_path):
    vol = save_volume(tmp_path / "a.zarr", IMAGE)
    vol = open_volume(tmp_path / "a.zarr", mode="r+")
    bad = [((4, 0, 0), np.zeros((3, 9, 11), np.uint8), "outside volume"),
           ((0, 0, 0), np.zeros((9, 11), np.uint8), "axes"),
           ((0, 0, 0), np.full((2, 2, 2), 300, np.int32), "do not fit"),
           ((0, 0, 0), np.full((2, 2, 2), 1.5), "without loss"),
           ((0, 0, 0), np.zeros((2, 2, 2, 2), np.uint8), "axes")]
    for start, arr, match in bad:
        with pytest.raises(ValueError, match=match):
            vol.write(start, arr)
    np.testing.assert_array_equal(open_volume(tmp_path / "a.zarr").read(), IMAGE)
    ch = create_volume(tmp_path / "c.zarr", (2, 2, 2), "float32", channels=3)
    with pytest.raises(ValueError, match="channels"):
        ch.write((0, 0, 0), np.zeros((2, 2, 2, 2), np.float32))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(shape=(4, 5), dtype="uint8"), ValueError, "shape"),
    (dict(shape=(4, 5, 0), dtype="uint8"), ValueError, "positive"),
    (dict(shape=(4, 5, 6), dtype="complex64"), ValueError, "unsupported dtype"),
    (dict(shape=(4, 5, 6), dtype="not-a-dtype"), ValueError, "unsupported dtype"),
    (dict(shape=(4, 5, 6), dtype="uint8", voxel_size=(0, 1, 1)), ValueError, "voxel_size"),
    (dict(shape=(4, 5, 6), dtype="uint8", chunks=(1, 2)), ValueError, "chunks"),
    (dict(shape=(4, 5, 6), dtype="uint8", channels=0), ValueError, "channels"),
])
def test_bad_create_raises(tmp_path, kwargs, err, match):
    with pytest.raises(err, match=match):
        create_volume(tmp_path / "a.zarr", **kwargs)
    assert not (tmp_path / "a.zarr").exists()


def test_create_existing_and_overwrite(tmp_path):
    save_volume(tmp_path / "a.zarr", IMAGE)
    with pytest.raises(FileExistsError, match="a.zarr"):
        create_volume(tmp_path / "a.zarr", (2, 2, 2), "uint8")
    np.testing.assert_array_equal(read_all(tmp_path / "a.zarr"), IMAGE)
    create_volume(tmp_path / "a.zarr", (2, 2, 2), "uint16", overwrite=True)
    assert open_volume(tmp_path / "a.zarr").shape == (2, 2, 2)
    with pytest.raises(ValueError, match="int64"):
        create_volume(f"precomputed://{tmp_path}/p", (2, 2, 2), "int64")
    with pytest.raises(ValueError, match="2D|3D"):
        save_volume(tmp_path / "b.zarr", np.zeros((3, 3)))


@pytest.mark.parametrize("dst", ["{d}/out.zarr", "precomputed://{d}/out", "{d}/out.n5"])
def test_copy_volume_converts_formats(tmp_path, dst):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["seg"] = LABELS
        f["seg"].attrs["voxel_size"] = (40, 8, 8)
    out = volumes.copy_volume(f"{tmp_path}/f.h5:seg", dst.format(d=tmp_path), chunks=(2, 4, 4),
                              block_bytes=2 * 4 * 8 * 8 * 2)  # forces many blocks
    back = open_volume(dst.format(d=tmp_path))
    assert back.voxel_size == (40, 8, 8) and back.dtype == np.uint64 and out.chunks == (2, 4, 4)
    np.testing.assert_array_equal(back.read(), LABELS)


def test_iter_blocks_tile_exactly():
    seen = np.zeros((7, 9, 10), int)
    for (z, y, x), (a, b, c) in volumes.iter_blocks(seen.shape, (3, 4, 5)):
        seen[z:z + a, y:y + b, x:x + c] += 1
    assert (seen == 1).all()


def test_default_chunks_follow_anisotropy():
    assert volumes.default_chunks((500, 500, 500)) == (64, 64, 64)
    assert volumes.default_chunks((500, 500, 500), (40, 8, 8)) == (13, 64, 64)
    assert volumes.default_chunks((10, 500, 20)) == (10, 64, 20)


# ---------------------------------------------------------------------------
# Real data beside the repo


def test_gala_medulla_npz(shared_data):
    path = shared_data("gala_fibsem_medulla", "train.npz")
    raw, labels = open_volume(f"{path}:raw"), open_volume(f"{path}:labels")
    assert raw.shape == labels.shape == (50, 100, 200)
    assert raw.dtype == np.uint8 and labels.dtype == np.uint16
    block = labels.read((10, 20, 30), (5, 6, 7))
    assert block.shape == (5, 6, 7)
    assert len(np.unique(labels.read())) > 10


def test_fib25_training_sample2_npz(shared_data):
    shared_path = shared_data
    for name in ("raw_z000-049.npz", "raw_z050-099.npz", "raw_z100-149.npz"):
        vol = open_volume(f"{shared_path('fib25_training_sample2', name)}:raw")
        assert vol.shape == (50, 250, 250) and vol.dtype == np.uint8
    gt = open_volume(f"{shared_path('fib25_training_sample2', 'groundtruth_z000-149.npz')}:labels")
    assert gt.shape == (150, 250, 250) and gt.dtype == np.uint16
    raw = open_volume(f"{shared_path('fib25_training_sample2', 'raw_z000-049.npz')}:raw").read()
    assert 60 < raw.mean() < 200 and raw.std() > 10  # real EM contrast, not blank


def test_voxel_size_stored_says_whether_the_volume_carries_one(tmp_path):
    # Import formats without metadata report the (1, 1, 1) placeholder and say so,
    # so that callers measuring lengths can ask for the real size.
    np.savez(tmp_path / "a.npz", x=IMAGE)
    np.save(tmp_path / "a.npy", IMAGE)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["plain"] = IMAGE
        f["sized"] = IMAGE
        f["sized"].attrs["resolution"] = (40, 8, 8)
    for spec in (f"{tmp_path}/a.npz:x", f"{tmp_path}/a.npy", f"{tmp_path}/a.h5:plain"):
        vol = open_volume(spec)
        assert vol.voxel_size == (1, 1, 1) and not vol.voxel_size_stored, spec
    assert open_volume(f"{tmp_path}/a.h5:sized").voxel_size_stored
    # A zarr v2 array written by another tool, without attributes.
    ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "bare.zarr")},
             "metadata": {"shape": [2, 3, 4], "dtype": "|u1"}}, create=True).result()
    assert not open_volume(tmp_path / "bare.zarr").voxel_size_stored
    for fmt in DRIVERS:
        save_volume(fmt.format(d=tmp_path / "s"), IMAGE, voxel_size=(40, 8, 4))
        vol = open_volume(fmt.format(d=tmp_path / "s"))
        assert vol.voxel_size_stored and vol.voxel_size == (40, 8, 4), fmt
