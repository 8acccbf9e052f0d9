"""Agglomeration: decision points (against a slow reference), pair resegmentation
with the oracle network (a cut object merges, touching objects do not), the merge
graph's round trip, resuming without scoring a pair twice, and the command."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest

from ffnjax import agglomeration as ag
from ffnjax import decision_points as dp
from ffnjax import resegmentation as rs
from ffnjax.config import ModelConfig
from ffnjax.resegmentation import FillScore, PairResult, ResegmentationConfig
from ffnjax.testing import oracle_apply_fn, oracle_options

TINY = ModelConfig(depth=1, features=4, fov_size=(9, 9, 9), deltas=(2, 2, 2))
CONFIG = ResegmentationConfig(radius=(8, 10, 10), analysis_radius=(6, 8, 8))


# ----------------------------------------------------------------------------
# Decision points


def slow_decision_points(seg, voxel_size, cap):
    """The obvious reference: loops over voxels and their 6 neighbours, and
    distances by brute force over every voxel (no EDT)."""
    vs = np.asarray(voxel_size, float) / min(voxel_size)
    shape = seg.shape
    contact, cand = {}, {}
    for p in itertools.product(*map(range, shape)):
        for axis in range(3):
            q = list(p)
            q[axis] += 1
            q = tuple(q)
            if q[axis] >= shape[axis]:
                continue
            u, v = int(seg[p]), int(seg[q])
            if u and v and u != v:
                pair = (min(u, v), max(u, v))
                contact[pair] = contact.get(pair, 0) + 1
                cand.setdefault(pair, set()).update([p, q])
    coords = np.array(list(itertools.product(*map(range, shape))))
    out = []
    for (a, b), pts in sorted(cand.items()):
        others = coords[[seg[tuple(c)] not in (a, b) for c in coords]]
        pts = sorted(pts)
        clear = []
        for p in pts:
            d = min([cap] + [(min(c, n - 1 - c) + 1) * s for c, n, s in zip(p, shape, vs)])
            if len(others):
                d = min(d, float(np.sqrt((((others - p) * vs) ** 2).sum(1)).min()))
            clear.append(d)
        centre = np.mean(pts, axis=0)
        best = max(clear)
        key = [(c < best - dp.TIE, round(float(((np.array(p) - centre) ** 2).sum()), 6), p)
               for p, c in zip(pts, clear)]
        i = min(range(len(pts)), key=lambda k: key[k])
        out.append((a, b, pts[i], contact[(a, b)], clear[i]))
    return out


def random_segmentation(seed, shape=(7, 9, 10), n=6):
    """Nearest-centre cells with a background gap around some of them."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1, (n, 3)) * shape
    grid = np.stack(np.indices(shape), -1)
    d = np.linalg.norm(grid[..., None, :] - centres, axis=-1)
    seg = (np.argmin(d, axis=-1) + 1).astype(np.uint32)
    ds = np.sort(d, axis=-1)
    seg[(ds[..., 1] - ds[..., 0] < 0.4) & (rng.uniform(size=shape) < 0.5)] = 0
    return seg


@pytest.mark.parametrize("seed, voxel_size, shape, n, cap", [
    (0, (1, 1, 1), (7, 9, 10), 6, 3.0), (1, (1, 1, 1), (7, 9, 10), 6, 3.0),
    (2, (2, 1, 1), (7, 9, 10), 6, 3.0), (3, (1, 1, 1), (10, 12, 12), 4, 5.0)])
def test_decision_points_agree_with_a_slow_reference(seed, voxel_size, shape, n, cap):
    seg = random_segmentation(seed, shape, n)
    got = dp.find_decision_points(seg, voxel_size, dp.DecisionPointOptions(clearance_cap=cap))
    want = slow_decision_points(seg, voxel_size, cap)
    assert len(want) >= 5
    assert [(p.a, p.b, p.point, p.contact) for p in got] == [w[:4] for w in want]
    np.testing.assert_allclose([p.clearance for p in got], [w[4] for w in want], atol=1e-4)
    assert all(p.gap == 0 for p in got)


def test_decision_point_lies_on_a_cut_far_from_other_segments():
    seg = np.zeros((20, 30, 30), np.uint32)
    seg[2:18, 5:25, 5:25] = 1
    seg[2:18, 5:25, 15:25] = 2          # 1 | 2 cut at x = 14/15
    seg[2:18, 25:29, 5:25] = 3          # a third object along y = 25..28
    points = {(p.a, p.b): p for p in dp.find_decision_points(seg)}
    cut = points[(1, 2)]
    assert cut.point[2] in (14, 15) and cut.contact == 16 * 20
    assert cut.point[:2] == (9, 14)     # the middle of the cut's 16 x 20 face (z, y)
    assert points[(1, 3)].contact == 16 * 10
    # With a 1-voxel slab of background in the cut, the pair is found only within a distance.
    seg[:, :, 15] = 0
    assert (1, 2) not in {(p.a, p.b) for p in dp.find_decision_points(seg)}
    far = {(p.a, p.b): p for p in dp.find_decision_points(
        seg, options=dp.DecisionPointOptions(max_distance=2))}[(1, 2)]
    assert far.contact == 0 and 0 < far.gap <= 1 and 14 <= far.point[2] <= 16


# ----------------------------------------------------------------------------
# The oracle: a cut object merges, touching objects do not


def cut_scene():
    """Ground truth: two slabs that touch along y; the segmentation cuts slab 1 at x = 24."""
    gt = np.zeros((40, 48, 48), np.int64)
    gt[4:36, 14:34, 4:44] = 1
    gt[4:36, 34:46, 4:44] = 2
    seg = gt.copy()
    seg[(gt == 1) & (np.arange(48) >= 24)] = 5
    return gt, seg


def run_oracle(gt, seg, **kw):
    return ag.agglomerate(gt, seg, None, TINY, oracle_options(), oracle_apply_fn,
                          config=kw.pop("config", CONFIG), progress=False, **kw)


def test_oracle_agglomeration_merges_the_cut_and_not_the_touching_objects():
    gt, seg = cut_scene()
    res = run_oracle(gt, seg)
    rows = {(r["a"], r["b"]): r for r in res.rows}
    assert set(rows) == {(1, 2), (1, 5), (2, 5)}
    cut = rows[(1, 5)]
    assert cut["x"] in (23, 24) and cut["merge"] == 1 and cut["iou"] == 1.0
    assert min(cut[f"from_{s}_frac_{t}"] for s in "ab" for t in "ab") == 1.0
    for pair in ((1, 2), (2, 5)):
        assert rows[pair]["merge"] == 0 and rows[pair]["reason"] == "iou"
        assert rows[pair]["from_a_frac_a"] == 1.0 and rows[pair]["from_a_frac_b"] == 0.0
    assert res.merges == [(1, 5)]
    np.testing.assert_array_equal(res.labels, gt)


def test_a_fill_that_loses_its_own_segment_is_retried_from_another_seed():
    """Where the oracle's image (the ground truth) has a hole at the first seed
    of A, that fill dies at once; the retry from a seed outside the hole
    rebuilds A and B, and the pair merges. Without retries it does not."""
    gt, seg = cut_scene()
    point = {(p.a, p.b): p for p in dp.find_decision_points(seg)}[(1, 5)]
    box = CONFIG.box_shape(seg.shape)
    corner = np.asarray(rs.subvolume_corner(point.point, box, seg.shape))
    sub = seg[tuple(slice(c, c + b) for c, b in zip(corner, box))]
    first = rs.seed_candidates(sub == 1, np.asarray(point.point) - corner, (4, 4, 4), (1, 1, 1),
                               CONFIG.seed_radius)[0] + corner
    hole = np.linalg.norm(np.indices(gt.shape).T - first, axis=-1).T <= 1.5
    gt[hole] = 0
    rows = {(r["a"], r["b"]): r for r in run_oracle(gt, seg).rows}
    assert rows[(1, 5)]["from_a_attempts"] == 2 and rows[(1, 5)]["from_b_attempts"] == 1
    assert rows[(1, 5)]["merge"] == 1
    assert (rows[(1, 5)]["from_a_seed_z"], rows[(1, 5)]["from_a_seed_y"],
            rows[(1, 5)]["from_a_seed_x"]) != tuple(first)
    once = dataclasses.replace(CONFIG, max_retries=0)
    rows = {(r["a"], r["b"]): r for r in run_oracle(gt, seg, config=once).rows}
    assert rows[(1, 5)]["from_a_attempts"] == 1 and rows[(1, 5)]["merge"] == 0


def test_seeds_near_the_border_and_the_order_of_candidates():
    mask = np.zeros((20, 20, 20), bool)
    mask[:, :, :10] = True
    # The point lies on the border (x = 0): no voxel within the seed radius holds a FOV.
    cands = rs.seed_candidates(mask, (10, 10, 0), (4, 4, 4), (1, 1, 1), 3.0)
    assert len(cands) and cands[:, 2].min() >= 4 and np.all(mask[tuple(cands.T)])
    dist = np.linalg.norm(cands - (10, 10, 0), axis=1)
    assert dist.max() <= 4 + 3.0 + 1e-9
    # deepest: farthest from the mask's face at x = 10 (the box's own faces are no boundary)
    assert tuple(cands[0]) == (10, 10, 4)
    assert rs.next_seed(cands, [tuple(cands[0])], (1, 1, 1), 2.0) is not None
    assert np.linalg.norm(np.subtract(rs.next_seed(cands, [tuple(cands[0])], (1, 1, 1), 2.0),
                                      cands[0])) >= 2.0
    assert rs.next_seed(cands, [tuple(c) for c in cands], (1, 1, 1), 0.0) is None
    thin = np.zeros_like(mask)
    thin[:, :, :4] = True                   # no voxel holds a whole FOV
    assert len(rs.seed_candidates(thin, (10, 10, 0), (4, 4, 4), (1, 1, 1), 3.0)) == 0


def test_fills_batched_in_one_call_equal_fills_one_at_a_time():
    gt, seg = cut_scene()
    one = run_oracle(gt, seg)
    batched = run_oracle(gt, seg, config=ResegmentationConfig(
        radius=CONFIG.radius, analysis_radius=CONFIG.analysis_radius, fills_per_call=4))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(batched.rows) == strip(one.rows)


def test_merge_rules_follow_google_ffns_thresholds():
    point = dp.DecisionPoint(1, 2, (0, 0, 0), 5, 0.0, 3.0)
    fill = FillScore((0, 0, 0), voxels=1000, frac_a=0.9, frac_b=0.9, deleted=0, max_edt=4.0,
                     steps=10)
    ok = PairResult(point, fill, fill, iou=0.9, seconds=0.0)
    rules = ag.MergeRules()
    assert rules.decide(ok) == (True, "accepted")
    assert rules.decide(PairResult(point, fill, fill, 0.8, 0.0)) == (False, "iou")
    thin = FillScore((0, 0, 0), 1000, 0.9, 0.6, 0, 4.0, 10)
    assert rules.decide(PairResult(point, fill, thin, 0.9, 0.0)) == (False, "consistency")
    confused = FillScore((0, 0, 0), 1000, 0.9, 0.9, 20, 4.0, 10)
    assert rules.decide(PairResult(point, confused, fill, 0.9, 0.0)) == (True, "accepted")
    assert rules.decide(PairResult(point, confused, confused, 0.9, 0.0)) == (False, "deleted")
    assert rules.decide(PairResult(point, None, fill, 1.0, 0.0)) == (False, "no_seed")
    assert ag.MergeRules(min_iou=0.7).decide(PairResult(point, fill, fill, 0.8, 0.0))[0]
    with pytest.raises(ValueError, match="min_iou"):
        ag.MergeRules(min_iou=1.5)


def test_cannot_link_refuses_a_chain_through_a_merged_fragment():
    # Segment 3 is a fragment holding parts of two objects: it agrees with 1 (large contact)
    # and with 2 (small contact), while 1 and 2 disagree with each other.
    good = FillScore((0, 0, 0), 1000, 0.9, 0.9, 0, 4.0, 10)
    apart = FillScore((0, 0, 0), 1000, 0.9, 0.1, 0, 4.0, 10)
    pair = lambda a, b, contact, fill, iou: PairResult(  # noqa: E731
        dp.DecisionPoint(a, b, (0, 0, 0), contact, 0.0, 3.0), fill, fill, iou, 0.0)
    results = [pair(2, 3, 50, good, 0.95), pair(1, 3, 400, good, 0.85), pair(1, 2, 300, apart, 0.9),
               pair(4, 5, 10, good, 0.9)]
    decided = ag.decide_all(results, ag.MergeRules())
    assert decided == [(False, "chain"), (True, "accepted"), (False, "consistency"),
                       (True, "accepted")]
    assert [r.point.a for r in results if ag.merge_order(r) == min(map(ag.merge_order, results))] == [1]
    # Without the guard union-find joins 1 and 2 through 3, as google/ffn would.
    loose = ag.decide_all(results, ag.MergeRules(cannot_link=False))
    assert loose == [ag.MergeRules().decide(r) for r in results]
    merged = ag.merge_labels(np.array([[[1, 2, 3]]]), [(r.point.a, r.point.b) for r, (ok, _)
                                                        in zip(results, loose) if ok])
    assert merged.tolist() == [[[1, 1, 1]]]
    # A rejection that is no evidence of two objects (a side without a seed) links nothing apart.
    results[2] = PairResult(results[2].point, None, apart, 0.0, 0.0)
    assert [ok for ok, _ in ag.decide_all(results, ag.MergeRules())] == [True, True, False, True]
    # Rows carry the guarded decision.
    rows = ag.merge_graph_rows(results, ag.MergeRules())
    assert [r["reason"] for r in rows] == ["accepted", "accepted", "no_seed", "accepted"]


def test_merge_labels_is_a_union_find_onto_the_smallest_id():
    seg = np.array([[[0, 3, 7, 9, 4, 12]]], np.uint64)
    out = ag.merge_labels(seg, [(7, 9), (9, 12), (3, 4)])
    assert out.tolist() == [[[0, 3, 7, 7, 3, 7]]] and out.dtype == np.uint64
    np.testing.assert_array_equal(ag.merge_labels(seg, []), seg)


# ----------------------------------------------------------------------------
# Files: merge graph, results, resuming


def test_merge_graph_round_trips(tmp_path):
    point = dp.DecisionPoint(3, 8, (4, 5, 6), 12, 0.0, 2.5)
    fill = FillScore((4, 5, 2), 321, 0.75, 0.5, 3, 4.25, 17, attempts=2)
    results = [PairResult(point, fill, fill, 0.875, 0.125),
               PairResult(dp.DecisionPoint(8, 9, (1, 2, 3), 0, 1.5, 1.0), None, None, 0.0, 0.5)]
    rows = ag.merge_graph_rows(results, ag.MergeRules(min_iou=0.5, min_consistency=0.4))
    path = ag.save_merge_graph(tmp_path / "graph.csv", rows)
    back = ag.load_merge_graph(path)
    assert [b[0] for b in back] == results
    assert [(b[1], b[2]) for b in back] == [(True, "accepted"), (False, "no_seed")]
    assert path.read_text().splitlines()[0].split(",") == list(ag.GRAPH_FIELDS)


def test_resume_after_an_interruption_scores_no_pair_twice(tmp_path):
    gt, seg = cut_scene()
    path = tmp_path / "results.jsonl"
    first = []

    def stop_after_one(batch):
        first.extend(batch)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_oracle(gt, seg, results_path=path, on_pairs=stop_after_one)
    with open(path, "a") as f:
        f.write('{"a": 1, "b": 2, "z"')  # a line cut short by the kill
    again = []
    res = run_oracle(gt, seg, results_path=path, on_pairs=again.extend)
    assert len(first) == 1 and len(again) == 2 and res.scored == 2
    done = {(r.point.a, r.point.b) for r in first}
    assert done.isdisjoint((r.point.a, r.point.b) for r in again)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["format"] == ag.RESULTS_FORMAT
    assert sorted((r["a"], r["b"]) for r in lines[1:]) == [(1, 2), (1, 5), (2, 5)]
    assert res.merges == [(1, 5)]
    # A third run scores nothing; a run with other settings refuses the file.
    assert run_oracle(gt, seg, results_path=path).scored == 0
    other = ResegmentationConfig(radius=(8, 11, 11), analysis_radius=(6, 8, 8))
    with pytest.raises(ValueError, match="another run"):
        run_oracle(gt, seg, results_path=path, config=other)
    assert run_oracle(gt, seg, results_path=path, config=other, overwrite=True).scored == 3


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="analysis_radius"):
        ResegmentationConfig(radius=(4, 4, 4), analysis_radius=(5, 4, 4))
    with pytest.raises(ValueError, match="voxel_size"):
        dp.find_decision_points(np.zeros((3, 3, 3), np.uint8), (1, 0, 1))
    with pytest.raises(ValueError, match="integer"):
        dp.find_decision_points(np.zeros((3, 3, 3), np.float32))
    assert math.isinf(FillScore((0, 0, 0), 0, 0, 0, 0, 0, 0).deleted_fraction)


# ----------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """A tiny convstack checkpoint whose fills move, the cut scene as image and segmentation."""
    from ffnjax.checkpoints import save_model
    from ffnjax.volumes import save_volume
    from test_flood import moving_convstack

    root = tmp_path_factory.mktemp("agglo_cli")
    save_model(root / "ckpt", TINY, moving_convstack(TINY))
    gt, seg = cut_scene()
    save_volume(str(root / "image.zarr"), (gt * 60).astype(np.uint8), voxel_size=(8, 8, 8))
    save_volume(str(root / "seg.zarr"), seg.astype(np.uint64), voxel_size=(8, 8, 8))
    return root


def test_command_writes_outputs_reuses_scores_and_guards_outputs(cli_setup, capsys):
    from experiments import agglomerate as cli
    from ffnjax.volumes import open_volume

    root = cli_setup
    argv = ["--checkpoint", str(root / "ckpt"), "--image", str(root / "image.zarr"),
            "--segmentation", str(root / "seg.zarr"), "--output", str(root / "out.zarr"),
            "--radius", "8,10,10", "--analysis-radius", "6,8,8", "--quiet"]
    summary = cli.main(argv)
    assert summary["decision_points"] == summary["scored_now"] == 3
    out = open_volume(str(root / "out.zarr"))
    assert out.dtype == np.uint64 and out.shape == (40, 48, 48)
    assert tuple(out.voxel_size) == (8, 8, 8)
    graph = ag.load_merge_graph(root / "out.zarr.merge-graph.csv")
    assert len(graph) == 3
    with pytest.raises(FileExistsError, match="--overwrite"):
        cli.main(argv)
    loose = ["--min-iou", "0", "--min-consistency", "0", "--max-deleted-fraction", "1"]
    again = cli.main([*argv, "--overwrite", *loose])
    assert again["scored_now"] == 0 and again["merges"] >= summary["merges"]
    rules = ag.MergeRules(min_iou=0, min_consistency=0, max_deleted_fraction=1)
    regraph = ag.load_merge_graph(root / "out.zarr.merge-graph.csv")
    assert [r for r, _, _ in regraph] == [r for r, _, _ in graph]
    assert [m for _, m, _ in regraph] == [rules.decide(r)[0] for r, _, _ in graph]
    with pytest.raises(ValueError, match="analysis_radius"):
        cli.main([*argv, "--overwrite", "--analysis-radius", "9,8,8"])


def test_command_block_by_block_equals_the_whole_volume_run(cli_setup):
    from experiments import agglomerate as cli
    from ffnjax.volumes import read_all

    root = cli_setup
    base = ["--checkpoint", str(root / "ckpt"), "--image", str(root / "image.zarr"),
            "--segmentation", str(root / "seg.zarr"), "--radius", "8,10,10",
            "--analysis-radius", "6,8,8", "--quiet", "--min-iou", "0.5"]
    whole = cli.main([*base, "--output", str(root / "whole.zarr")])
    blocks = cli.main([*base, "--output", str(root / "blocks.zarr"), "--block", "16,20,20",
                       "--scheduler", "threads", "--pairs-per-task", "2"])
    assert blocks["scored_now"] == whole["scored_now"] == blocks["decision_points"] == 3
    assert blocks["merges"] == whole["merges"]
    np.testing.assert_array_equal(read_all(str(root / "blocks.zarr")), read_all(str(root / "whole.zarr")))
    strip = lambda path: [(r, m, w) for r, m, w in ag.load_merge_graph(path)]  # noqa: E731
    assert ([(dataclasses.replace(r, seconds=0), m) for r, m, _ in strip(root / "blocks.zarr.merge-graph.csv")]
            == [(dataclasses.replace(r, seconds=0), m) for r, m, _ in strip(root / "whole.zarr.merge-graph.csv")])
    with pytest.raises(ValueError, match="--scheduler works block by block only"):
        cli.main([*base, "--output", str(root / "x.zarr"), "--scheduler", "threads"])


def test_pipeline_command_runs_consensus_then_agglomeration(cli_setup, capsys):
    from experiments import agglomerate as cli
    from experiments import pipeline
    from ffnjax.volumes import open_volume, read_all

    root = cli_setup
    out = root / "pipe"
    argv = ["--checkpoint", str(root / "ckpt"), "--image", str(root / "image.zarr"),
            "--out", str(out), "--box", "0:40,0:48,4:48", "--min-segment-size", "50",
            "--max-steps", "4", "--seed-policy", "grid", "--seed-grid-step", "10,10,10",
            "--max-distance", "12",
            "--radius", "8,10,10", "--analysis-radius", "6,8,8", "--min-iou", "0.5", "--quiet"]
    summary = pipeline.main(argv)
    seg_argv, agg_argv = summary["segment_argv"], summary["agglomerate_argv"]
    assert "--consensus" in seg_argv and "--min-segment-size" in agg_argv
    assert summary["agglomerate"]["decision_points"] >= 1 and summary["segment"]
    assert agg_argv[agg_argv.index("--min-iou") + 1] == "0.5"
    overseg = open_volume(str(out / "oversegmentation.zarr"))
    assert tuple(overseg.offset) == (0, 0, 4) and overseg.shape == (40, 48, 44)
    # The agglomeration step is the agglomerate command on the oversegmentation.
    direct = cli.main([*agg_argv[:agg_argv.index("--output")], "--output", str(root / "direct.zarr"),
                       *agg_argv[agg_argv.index("--output") + 2:], "--results",
                       str(root / "direct.jsonl")])
    assert direct["merges"] == summary["agglomerate"]["merges"]
    np.testing.assert_array_equal(read_all(str(root / "direct.zarr")),
                                  read_all(str(out / "agglomerated.zarr")))
    assert json.loads((out / "pipeline.json").read_text())["output"] == str(out / "agglomerated.zarr")
    # A rerun reuses the oversegmentation and every score.
    again = pipeline.main(argv)
    assert again["agglomerate"]["scored_now"] == 0
    assert "reusing" in capsys.readouterr().out


def test_command_places_a_slab_image_with_image_offset(cli_setup):
    from experiments import agglomerate as cli
    from ffnjax.volumes import read_all, save_volume

    root = cli_setup
    gt, seg = cut_scene()
    # A slab file starting at z 4 that records no offset, and a segmentation of it that does.
    save_volume(str(root / "slab.zarr"), (gt[4:] * 60).astype(np.uint8), voxel_size=(8, 8, 8))
    save_volume(str(root / "slab_seg.zarr"), seg[4:].astype(np.uint64), voxel_size=(8, 8, 8),
                offset=(4, 0, 0))
    base = ["--checkpoint", str(root / "ckpt"), "--segmentation", str(root / "slab_seg.zarr"),
            "--radius", "8,10,10", "--analysis-radius", "6,8,8", "--quiet"]
    with pytest.raises(ValueError, match="--image-offset"):
        cli.main([*base, "--image", str(root / "slab.zarr"), "--output", str(root / "o1.zarr")])
    placed = cli.main([*base, "--image", str(root / "slab.zarr"), "--image-offset", "4,0,0",
                       "--output", str(root / "o2.zarr")])
    whole = cli.main([*base, "--image", str(root / "image.zarr"), "--output", str(root / "o3.zarr"),
                      "--results", str(root / "o3.jsonl")])
    assert placed["merges"] == whole["merges"] and placed["decision_points"] == whole["decision_points"]
    np.testing.assert_array_equal(read_all(str(root / "o2.zarr")), read_all(str(root / "o3.zarr")))
