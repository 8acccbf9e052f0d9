"""Skeletons: kimimaro on a tube of known length and axis order, SWC round
trip, and their old import path ffnjax.erl."""

from __future__ import annotations

import numpy as np
import pytest

from ffnjax import erl, skeletons


def test_old_import_path_is_the_same():
    for name in ("Skeleton", "skeletonize", "save_swc", "load_swc", "save_swc_dir", "load_swc_dir",
                 "DEFAULT_TEASAR"):
        assert getattr(erl, name) is getattr(skeletons, name)


def test_kimimaro_tube_length_and_axis_order():
    labels = np.zeros((24, 20, 110), np.uint32)
    zz, yy = np.mgrid[:24, :20]
    disk = (zz - 12) ** 2 + (yy - 10) ** 2 <= 9  # radius 3 voxels around z=12, y=10
    labels[:, :, 5:105][disk] = 3  # tube along x, 100 voxels long
    # anisotropy along x doubles the physical length: a swapped axis order
    # (kimimaro is x,y,z) would leave it at 100
    for vs in [(1, 1, 1), (1, 1, 2), (3, 3, 3)]:
        sks = skeletons.skeletonize(labels, vs, dust_threshold=10)
        assert [s.label for s in sks] == [3]
        sk = sks[0]
        assert sk.nodes[:, 2].min() <= 6 and sk.nodes[:, 2].max() >= 103
        inner = (sk.nodes[:, 2] > 12) & (sk.nodes[:, 2] < 97)  # ends may bend to a corner
        assert np.abs(sk.nodes[inner, 0] - 12).max() <= 1.5
        assert np.abs(sk.nodes[inner, 1] - 10).max() <= 1.5
        assert sk.length(vs) == pytest.approx(100 * vs[2], rel=0.03)
        r = erl.expected_run_length(sks, labels, vs)
        assert r.nerl == pytest.approx(1.0)


def test_swc_round_trip(tmp_path):
    sk = skeletons.Skeleton([[0, 0, 0], [1, 2, 3], [2, 2, 5], [4, 1, 3]], [[0, 1], [1, 2], [1, 3]], 42)
    vs = (40, 8, 8)
    paths = skeletons.save_swc_dir(tmp_path, [sk], vs)
    text = paths[0].read_text().splitlines()
    # physical x,y,z in the file: node 1 lies at x=3*8, y=2*8, z=1*40
    assert any(line.split()[2:5] == ["24", "16", "40"] for line in text if not line.startswith("#"))
    back = skeletons.load_swc_dir(tmp_path, vs)[0]
    assert back.label == 42
    assert back.length(vs) == pytest.approx(sk.length(vs))
    order = [np.flatnonzero((sk.nodes == n).all(1))[0] for n in back.nodes]
    got = {frozenset((order[a], order[b])) for a, b in back.edges}
    assert got == {frozenset(map(int, e)) for e in sk.edges}
    (tmp_path / "bad.swc").write_text("1 0 0 0 0 1 7\n")
    with pytest.raises(ValueError, match="parent 7"):
        skeletons.load_swc(tmp_path / "bad.swc")
    with pytest.raises(FileNotFoundError):
        skeletons.load_swc(tmp_path / "missing.swc")
