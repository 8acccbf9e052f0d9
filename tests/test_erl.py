"""Metrics: hand-checked ERL cases, VOI/ARAND against scikit-image, a
real-data figure and the evaluate CLI. (Skeletons: test_skeletons.py; the
table and PNG: test_report.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error, variation_of_information

from ffnjax import erl
from tests.conftest import shared_path


def line_skeleton(n: int, label: int = 1, y: int = 0, z: int = 0) -> erl.Skeleton:
    """n nodes along x at unit spacing, n-1 unit edges."""
    nodes = np.stack([np.full(n, z), np.full(n, y), np.arange(n)], 1)
    edges = np.stack([np.arange(n - 1), np.arange(1, n)], 1)
    return erl.Skeleton(nodes, edges, label)


# ---------------------------------------------------------------- ERL by hand


def test_erl_two_segments_hand_figure():
    sk = line_skeleton(11)
    seg = np.zeros((1, 1, 11), np.uint32)
    seg[0, 0, :5], seg[0, 0, 5:] = 3, 4
    r = erl.expected_run_length([sk], seg)
    # runs 4 and 5, the crossing edge counts for nothing: (16 + 25) / 10
    assert r.erl == pytest.approx(4.1)
    assert r.max_erl == pytest.approx(10.0)
    assert r.nerl == pytest.approx(0.41)
    assert (r.merges, r.splits, r.n_skeletons) == (0, 1, 1)


def test_erl_voxel_size_scales_lengths():
    sk = line_skeleton(11)
    seg = np.zeros((1, 1, 11), np.uint32)
    seg[0, 0, :5], seg[0, 0, 5:] = 3, 4
    r = erl.expected_run_length([sk], seg, voxel_size=(40, 8, 8))  # skeleton runs along x
    assert r.erl == pytest.approx(4.1 * 8)
    assert r.total_length == pytest.approx(80.0)
    assert r.nerl == pytest.approx(0.41)


def test_erl_run_in_pieces_and_background():
    # segment 5 on nodes 0-3 and 7-10, background on 4-6: runs 3 + 3 = 6 in
    # one segment; edges touching background add nothing.
    sk = line_skeleton(11)
    seg = np.full((1, 1, 11), 5, np.uint32)
    seg[0, 0, 4:7] = 0
    r = erl.expected_run_length([sk], seg)
    assert r.erl == pytest.approx(36 / 10)
    assert r.splits == 0


def test_merger_adds_nothing_to_either_skeleton():
    a, b = line_skeleton(11, 1, y=0), line_skeleton(11, 2, y=2)
    seg = np.zeros((1, 3, 11), np.uint32)
    seg[0, 0], seg[0, 2] = 1, 2
    seg[0, 0, 6:] = 9
    seg[0, 2, 8:] = 9  # segment 9 holds nodes of both skeletons
    r = erl.expected_run_length([a, b], seg)
    assert r.merges == 1 and r.merging_segments == (9,)
    # a keeps a run of 5 in segment 1, b a run of 7 in segment 2
    assert r.erl == pytest.approx((25 + 49) / 20)
    assert r.max_erl == pytest.approx(10.0)
    # the worst-merge list reports the skeleton length lost inside segment 9
    assert r.merged_length[0] == pytest.approx(4 + 2)


def test_merge_threshold_tolerates_small_touches():
    a, b = line_skeleton(11, 1, y=0), line_skeleton(11, 2, y=2)
    seg = np.zeros((1, 3, 11), np.uint32)
    seg[0, 0] = 1
    seg[0, 2] = 2
    seg[0, 2, 10] = 1  # one node of b touches a's segment
    strict = erl.expected_run_length([a, b], seg, merge_threshold=1)
    tolerant = erl.expected_run_length([a, b], seg, merge_threshold=2)
    assert strict.merges == 1 and strict.erl == pytest.approx(81 / 20)  # only b's run of 9 in 2
    assert tolerant.merges == 0 and tolerant.erl == pytest.approx((100 + 81) / 20)


def test_perfect_segmentation_has_nerl_one_and_relabel_invariance():
    rng = np.random.default_rng(0)
    sks = [line_skeleton(n, label=i + 1, y=2 * i) for i, n in enumerate((5, 9, 12))]
    seg = np.zeros((1, 6, 12), np.uint32)
    for i, sk in enumerate(sks):
        seg[0, 2 * i, :len(sk.nodes)] = sk.label
    r = erl.expected_run_length(sks, seg)
    assert r.nerl == pytest.approx(1.0) and r.erl == pytest.approx((16 + 64 + 121) / 23)
    # break it, then relabel with a random permutation: same figures
    seg[0, 2, 4:] = 7
    seg[0, 4, 7:] = 7
    perm = rng.permutation(1000)[:8] + 1
    perm[0] = 0
    relabelled = perm[seg]
    r1, r2 = erl.expected_run_length(sks, seg), erl.expected_run_length(sks, relabelled)
    assert (r1.erl, r1.merges, r1.splits) == (r2.erl, r2.merges, r2.splits)
    assert r1.merges == 1 and r1.nerl < 1


def test_mask_and_length_threshold_drop_nodes_and_skeletons():
    long, short = line_skeleton(11, 1, y=0), line_skeleton(3, 2, y=1)
    seg = np.ones((1, 2, 11), np.uint32)
    mask = np.ones(seg.shape, bool)
    mask[0, 0, 8:] = False
    r = erl.expected_run_length([long, short], seg, mask=mask, min_skeleton_length=5)
    # short skeleton dropped (so no merger); long one cut to 8 nodes, 7 edges
    assert r.n_skeletons == 1 and r.merges == 0
    assert r.total_length == pytest.approx(7) and r.nerl == pytest.approx(1)
    assert r.nodes_outside == 3
    # without the length threshold the two skeletons merge in segment 1
    assert erl.expected_run_length([long, short], seg).merges == 1


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="edge indices"):
        erl.Skeleton(np.zeros((2, 3)), [[0, 2]])
    with pytest.raises(ValueError, match="voxel_size"):
        erl.expected_run_length([line_skeleton(3)], np.ones((1, 1, 3), int), voxel_size=(1, 0, 1))
    with pytest.raises(ValueError, match="shape"):
        erl.voi(np.ones((2, 2, 2), int), np.ones((2, 2, 3), int))
    with pytest.raises(ValueError, match="no labelled"):
        erl.adapted_rand(np.ones((2, 2, 2), int), np.zeros((2, 2, 2), int))


# ------------------------------------------------------- VOI / ARAND vs skimage


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voi_and_arand_equal_scikit_image(seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 6, (9, 10, 11)).astype(np.uint16)
    # a segmentation correlated with gt, with label 0 and large ids present
    seg = np.where(rng.random(gt.shape) < 0.7, gt.astype(np.int64) * 1000 + 3,
                   rng.integers(0, 8, gt.shape)).astype(np.uint64)
    split, merge = erl.voi(seg, gt)
    ref = variation_of_information(gt, seg.astype(np.int64), ignore_labels=(0,))
    assert split == pytest.approx(ref[0], abs=1e-10)
    assert merge == pytest.approx(ref[1], abs=1e-10)
    err, prec, rec = erl.adapted_rand(seg, gt, return_precision_recall=True)
    ref_err, ref_p, ref_r = adapted_rand_error(gt, seg.astype(np.int64))
    assert err == pytest.approx(ref_err, abs=1e-12)
    # scikit-image's precision/recall names are swapped relative to CREMI's
    assert (prec, rec) == pytest.approx((ref_r, ref_p))


def test_voi_split_merge_directions_and_invariance():
    gt = np.zeros((1, 1, 8), np.uint8)
    gt[..., :4], gt[..., 4:] = 1, 2
    over = np.arange(8, dtype=np.uint32).reshape(gt.shape)   # every voxel its own segment
    under = np.full(gt.shape, 5, np.uint32)                   # one segment for all
    assert erl.voi(over, gt) == pytest.approx((2.0, 0.0))     # H(seg|gt) = log2 4
    assert erl.voi(under, gt) == pytest.approx((0.0, 1.0))    # H(gt|seg) = 1 bit
    assert erl.voi(gt * 7 + 100, gt) == (0.0, 0.0)
    assert erl.adapted_rand(gt.astype(np.uint64) << 40, gt) == 0.0


# ---------------------------------------------------------------- real data


def test_fib25_groundtruth_against_itself():
    path = shared_path("fib25_training_sample2", "groundtruth_z000-149.npz")
    gt = np.load(path)["labels"][100:132, :96, :96]
    sks = erl.skeletonize(gt, (8, 8, 8), dust_threshold=200)
    assert len(sks) > 10
    r = erl.expected_run_length(sks, gt, (8, 8, 8))
    assert r.nerl == pytest.approx(1.0) and r.merges == 0 and r.splits == 0
    assert erl.voi(gt, gt) == (0.0, 0.0)
    # each GT object split in two along x: NERL clearly below 1, VOI merge stays 0
    half = gt.astype(np.uint64) * 2 + (np.arange(96) >= 48)
    half[gt == 0] = 0
    rh = erl.expected_run_length(sks, half, (8, 8, 8))
    assert rh.nerl < 0.95 and rh.merges == 0 and rh.splits > 0
    assert erl.voi(half, gt)[1] == pytest.approx(0, abs=1e-12)


# ------------------------------------------------------------------ CLI


def test_evaluate_cli(tmp_path, capsys):
    from experiments import evaluate as cli

    labels = np.zeros((8, 16, 40), np.uint32)
    labels[1:7, 1:7, 2:38] = 1
    labels[1:7, 9:15, 2:38] = 2
    seg = labels.astype(np.uint64) * 5
    seg[:, :, 20:] = np.where(seg[:, :, 20:] == 10, 11, seg[:, :, 20:])  # split object 2
    np.savez(tmp_path / "v.npz", gt=labels, seg=seg, big_gt=np.pad(labels, ((3, 0), (0, 0), (0, 0))))
    out = tmp_path / "r.json"
    rc = cli.main(["--segmentation", f"{tmp_path}/v.npz:seg", "--groundtruth", f"{tmp_path}/v.npz:gt",
                   "--voxel-size", "10,10,10", "--dust-threshold", "10", "--json", str(out),
                   "--png", str(tmp_path / "p.png")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "NERL" in text and "adapted Rand" in text
    rep = json.loads(out.read_text())
    direct = erl.evaluate(seg, labels, (10, 10, 10), skeleton_options={"dust_threshold": 10})
    for t in ("1", "50"):
        assert rep["erl"][t]["erl"] == pytest.approx(direct["erl"][t]["erl"])
        assert rep["erl"][t]["splits"] == 1 and rep["erl"][t]["merges"] == 0
    assert rep["voi_split"] == pytest.approx(direct["voi_split"]) and rep["voi_merge"] == 0
    assert (tmp_path / "p.png").exists()
    # --gt-offset finds the same region in a larger ground truth
    rc = cli.main(["--segmentation", f"{tmp_path}/v.npz:seg", "--groundtruth", f"{tmp_path}/v.npz:big_gt",
                   "--gt-offset", "3,0,0", "--voxel-size", "10,10,10", "--dust-threshold", "10",
                   "--json", str(out), "--overwrite"])
    assert rc == 0 and json.loads(out.read_text())["voi_split"] == pytest.approx(direct["voi_split"])
    # bad flags fail early, naming the flag
    assert cli.main(["--segmentation", f"{tmp_path}/v.npz:seg", "--groundtruth",
                     f"{tmp_path}/v.npz:gt", "--bbox", "0,0,0,9,1,1"]) == 2
    assert "--bbox" in capsys.readouterr().err
    assert cli.main(["--segmentation", "baseline", "--groundtruth", f"{tmp_path}/v.npz:gt"]) == 2
    assert "--image" in capsys.readouterr().err


def test_evaluate_cli_swc_skeletons_and_help(tmp_path, capsys):
    from experiments import evaluate as cli

    labels = np.zeros((8, 16, 40), np.uint32)
    labels[1:7, 1:7, 2:38] = 1
    labels[1:7, 9:15, 2:38] = 2
    seg = labels.copy()
    seg[:, :, 25:] = 0  # both objects lose a third
    np.savez(tmp_path / "v.npz", gt=labels, seg=seg)
    base = ["--segmentation", f"{tmp_path}/v.npz:seg", "--groundtruth", f"{tmp_path}/v.npz:gt",
            "--voxel-size", "20,10,10", "--dust-threshold", "10"]
    assert cli.main(base + ["--save-skeletons", str(tmp_path / "swc"), "--json", str(tmp_path / "a.json")]) == 0
    assert sorted(p.name for p in (tmp_path / "swc").iterdir()) == ["1.swc", "2.swc"]
    assert cli.main(base + ["--skeletons", str(tmp_path / "swc"), "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / n).read_text())["erl"]["1"] for n in ("a.json", "b.json"))
    assert a["erl"] == pytest.approx(b["erl"]) and 0.3 < a["nerl"] < 0.7
    # a bbox of the right part, SWC skeletons shifted into it: nodes outside dropped
    assert cli.main(base + ["--skeletons", str(tmp_path / "swc"), "--bbox", "0,0,20,8,16,20",
                            "--json", str(tmp_path / "c.json")]) == 0
    c = json.loads((tmp_path / "c.json").read_text())["erl"]["1"]
    assert c["nodes_outside"] > 0 and 0 < c["nerl"] < 0.5
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "--merge-thresholds" in capsys.readouterr().out


def test_evaluate_cli_needs_a_voxel_size_the_ground_truth_does_not_store(tmp_path, capsys):
    # npz stores no voxel size: scoring it in µm as if voxels were 1 nm would be
    # silently meaningless, so --voxel-size is required; a stored one is used.
    from experiments import evaluate as cli
    from ffnjax.volumes import save_volume

    labels = np.zeros((8, 16, 40), np.uint32)
    labels[1:7, 1:7, 2:38] = 1
    labels[1:7, 9:15, 2:38] = 2
    np.savez(tmp_path / "v.npz", gt=labels)
    save_volume(str(tmp_path / "seg.zarr"), labels, voxel_size=(40, 8, 8))
    base = ["--segmentation", f"{tmp_path}/seg.zarr", "--dust-threshold", "10"]
    out = tmp_path / "r.json"
    assert cli.main(base + ["--groundtruth", f"{tmp_path}/v.npz:gt", "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path}/v.npz:gt" in err[0] and "--voxel-size" in err[0]
    assert "40,8,8" in err[0]  # the segmentation's stored size, offered as a hint
    assert not out.exists()
    assert cli.main(base + ["--groundtruth", f"{tmp_path}/v.npz:gt", "--voxel-size", "20,10,10",
                            "--json", str(out)]) == 0
    assert json.loads(out.read_text())["voxel_size"] == [20, 10, 10]
    # A ground truth that stores its voxel size needs no flag, and its own size is used.
    save_volume(str(tmp_path / "gt.zarr"), labels, voxel_size=(30, 6, 6))
    out2 = tmp_path / "r2.json"
    assert cli.main(base + ["--groundtruth", f"{tmp_path}/gt.zarr", "--json", str(out2)]) == 0
    rep = json.loads(out2.read_text())
    assert rep["voxel_size"] == [30, 6, 6]
    one_voxel = erl.evaluate(labels, labels, (1, 1, 1), skeleton_options={"dust_threshold": 10})
    assert rep["skeleton_length"] > 5 * one_voxel["skeleton_length"]
