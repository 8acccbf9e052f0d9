"""Block-wise segmentation: stitching, resume, Dask engines, outputs (the grid: test_blockgrid.py)."""

from __future__ import annotations

import json
import os

import cc3d
import numpy as np
import pytest
from scipy.spatial import cKDTree

from ffnjax import blockwise as bw
from ffnjax.volumes import open_volume, read_all, save_volume

SHAPE = (48, 64, 64)
BLOCK = (24, 32, 32)
OVERLAP = (6, 8, 8)


def voronoi_labels(shape=SHAPE, n=40, seed=0, membranes=False) -> np.ndarray:
    """Nearest-seed cells (optionally with 0-valued boundaries between them)."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1, (n, 3)) * np.asarray(shape)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    lab = (cKDTree(pts).query(grid)[1] + 1).reshape(shape).astype(np.uint16)
    if membranes:
        edge = np.zeros(shape, bool)
        for ax in range(3):
            d = np.diff(lab, axis=ax) != 0
            sl = [slice(None)] * 3
            sl[ax] = slice(0, -1)
            edge[tuple(sl)] |= d
        lab[edge] = 0
    return lab


class CCSegmenter:
    """Stand-in segmenter: 6-connected components of the label block.

    Like FFN on a block it sees only the block, so objects leaving the block
    are cut at its faces. `fail_after` makes it raise after that many blocks
    (a crash); `calls` counts blocks segmented by this instance.
    """

    def __init__(self, fail_after: int | None = None):
        self.fail_after = fail_after
        self.calls = 0

    def __call__(self, image):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return cc3d.connected_components(image, connectivity=6)

    def fingerprint(self):
        return {"segmenter": "cc3d-6"}


def bricks(shape, seed=0, lo=9, hi=16) -> np.ndarray:
    """Axis-aligned boxes (a brick wall: slabs, rows, bricks), each lo..hi voxels
    on every axis, ids 1..N. Boxes are where the oracle flood fill provably
    reaches every voxel, so block-wise and whole-volume results can be
    compared voxel for voxel."""
    rng = np.random.default_rng(seed)

    def cuts(n):
        c = [0]
        while n - c[-1] > hi:
            c.append(c[-1] + int(rng.integers(lo, hi + 1)))
        if n - c[-1] < lo:
            c[-1] = n - lo
        return c + [n]

    lab, k = np.zeros(shape, np.uint16), 0
    zc = cuts(shape[0])
    for z0, z1 in zip(zc[:-1], zc[1:]):
        yc = cuts(shape[1])
        for y0, y1 in zip(yc[:-1], yc[1:]):
            xc = cuts(shape[2])
            for x0, x1 in zip(xc[:-1], xc[1:]):
                k += 1
                lab[z0:z1, y0:y1, x0:x1] = k
    return lab


# The shared oracle breaks face-maximum ties towards the FOV centre, so a fill
# covers its whole box (see ffnjax.testing.centre_bias).
from ffnjax.testing import oracle_apply_fn as centred_oracle_apply_fn  # noqa: E402


class RefuseToSegment(bw.FFNSegmenter):
    """An FFN segmenter that must not segment (every block and handoff round is
    already done)."""

    def run(self, image, seeds, prior=None):
        raise AssertionError("a finished block was segmented again")

    __call__ = run


def same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b have the same background and a one-to-one id mapping."""
    if not np.array_equal(a == 0, b == 0):
        return False
    m = a != 0
    pairs = np.unique(np.stack([a[m].astype(np.uint64), b[m].astype(np.uint64)]), axis=1)
    return pairs.shape[1] == np.unique(a[m]).size == np.unique(b[m]).size


@pytest.fixture
def image_spec(tmp_path):
    lab = voronoi_labels()
    spec = str(tmp_path / "image.zarr")
    save_volume(spec, lab, voxel_size=(8, 8, 8))
    return spec, lab


# ----------------------------------------------------------------------------
# Stitching with the stand-in segmenter


def test_blockwise_equals_whole_volume(tmp_path, image_spec):
    spec, lab = image_spec
    out = str(tmp_path / "seg.zarr")
    s = bw.segment_volume(spec, out, block=BLOCK, overlap=OVERLAP, client="sync",
                          segment_fn=CCSegmenter(), progress=False)
    seg = read_all(out)
    ref = cc3d.connected_components(lab, connectivity=6)
    assert seg.dtype == np.uint64
    assert same_up_to_relabelling(seg, ref)
    ids = np.unique(seg[seg != 0])
    assert ids.tolist() == list(range(1, s.n_objects + 1))  # unique, compact global ids
    assert s.n_objects == int(ref.max())
    assert s.n_blocks == 27 and s.blocks_computed == 27 and s.weak_contacts == []
    assert open_volume(out).voxel_size == (8.0, 8.0, 8.0)
    sizes = np.bincount(seg.ravel().astype(np.int64))
    rec = json.loads((tmp_path / "seg.zarr.blocks" / "reconcile.json").read_text())
    assert rec["n_objects"] == s.n_objects and sizes[1:].sum() == seg.size


def test_too_small_overlap_cuts_are_reported(tmp_path, image_spec):
    spec, lab = image_spec
    out = str(tmp_path / "seg.zarr")
    s = bw.segment_volume(spec, out, block=BLOCK, overlap=OVERLAP, client="sync",
                          segment_fn=CCSegmenter(), min_overlap=150, progress=False)
    seg = read_all(out)
    ref = cc3d.connected_components(lab, connectivity=6)
    assert not same_up_to_relabelling(seg, ref)  # some objects were cut
    assert s.weak_contacts and all(w["voxels"] < 150 for w in s.weak_contacts)
    # Every cut is reported: joining the reported contacts restores the whole-volume result.
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    g = np.array([w["global_ids"] for w in s.weak_contacts])
    n = s.n_objects + 1
    _, comp = connected_components(coo_matrix((np.ones(len(g)), (g[:, 0], g[:, 1])), shape=(n, n)),
                                   directed=False)
    joined = np.where(seg > 0, comp[seg.astype(np.int64)] + 1, 0)
    assert same_up_to_relabelling(joined, ref)


def test_resume_after_crash_loses_no_block_and_repeats_none(tmp_path, image_spec):
    spec, lab = image_spec
    out = str(tmp_path / "seg.zarr")
    work = tmp_path / "seg.zarr.blocks"
    crashing = CCSegmenter(fail_after=10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        bw.segment_volume(spec, out, block=BLOCK, overlap=OVERLAP, client="sync",
                          segment_fn=crashing, progress=False)
    done = sorted(p.name for p in (work / "blocks").glob("*.json"))
    assert len(done) == 10
    # A task killed mid-write leaves only a temporary file, which is ignored.
    (work / "blocks" / ".001_001_001.npz.tmp-dead").write_bytes(b"partial")
    stamps = {p: os.stat(work / "blocks" / p).st_mtime_ns for p in done}

    again = CCSegmenter()
    s = bw.segment_volume(spec, out, block=BLOCK, overlap=OVERLAP, client="sync",
                          segment_fn=again, progress=False)
    assert again.calls == 27 - 10  # none done twice
    assert (s.blocks_computed, s.blocks_skipped) == (17, 10)
    assert all(os.stat(work / "blocks" / p).st_mtime_ns == t for p, t in stamps.items())
    assert len(list((work / "blocks").glob("*.json"))) == 27  # none lost
    assert same_up_to_relabelling(read_all(out), cc3d.connected_components(lab, connectivity=6))

    # A finished run resumes to a no-op for segmentation.
    third = CCSegmenter()
    s3 = bw.segment_volume(spec, out, block=BLOCK, overlap=OVERLAP, client="sync",
                           segment_fn=third, progress=False)
    assert third.calls == 0 and s3.blocks_skipped == 27


def test_workdir_of_another_run_is_refused(tmp_path, image_spec):
    spec, _ = image_spec
    out = str(tmp_path / "seg.zarr")
    bw.segment_volume(spec, out, block=BLOCK, overlap=OVERLAP, client="sync",
                      segment_fn=CCSegmenter(), progress=False)
    with pytest.raises(ValueError, match="different run"):
        bw.segment_volume(spec, out, block=(24, 32, 32), overlap=(4, 8, 8), client="sync",
                          segment_fn=CCSegmenter(), progress=False)


def test_local_cluster_two_workers_equals_sync(tmp_path, image_spec):
    from distributed import Client, LocalCluster

    spec, _ = image_spec
    ref_out, out = str(tmp_path / "sync.zarr"), str(tmp_path / "dist.zarr")
    bw.segment_volume(spec, ref_out, block=BLOCK, overlap=OVERLAP, client="sync",
                      segment_fn=CCSegmenter(), progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        s = bw.segment_volume(spec, out, block=BLOCK, overlap=OVERLAP, client=client,
                              segment_fn=CCSegmenter(), progress=False)
        workers = {json.loads(p.read_text())["pid"] for p in
                   (tmp_path / "dist.zarr.blocks" / "blocks").glob("*.json")}
        # The same cluster reached through its scheduler address (as --scheduler does).
        by_address = str(tmp_path / "addr.zarr")
        bw.segment_volume(spec, by_address, block=BLOCK, overlap=OVERLAP,
                          client=cluster.scheduler_address, segment_fn=CCSegmenter(), progress=False)
    assert s.blocks_computed == 27
    assert np.array_equal(read_all(out), read_all(ref_out))  # same ids, not only up to relabelling
    assert np.array_equal(read_all(by_address), read_all(ref_out))
    assert workers == {os.getpid()}  # threads of this process (processes=False)


def test_threads_scheduler_and_precomputed_output(tmp_path, image_spec):
    spec, lab = image_spec
    out = "precomputed://" + str(tmp_path / "seg_pc")
    bw.segment_volume(spec, out, block=BLOCK, overlap=OVERLAP, client="threads",
                      segment_fn=CCSegmenter(), progress=False)
    vol = open_volume(out)
    assert vol.dtype == np.uint64 and vol.voxel_size == (8.0, 8.0, 8.0)
    info = json.loads((tmp_path / "seg_pc" / "info").read_text())
    assert info["type"] == "segmentation"
    assert same_up_to_relabelling(vol.read(), cc3d.connected_components(lab, connectivity=6))


def test_default_workdir():
    assert str(bw.default_workdir("a/b/seg.zarr")) == "a/b/seg.zarr.blocks"
    assert str(bw.default_workdir("precomputed://a/seg/")) == "a/seg.blocks"
    with pytest.raises(ValueError, match="workdir"):
        bw.default_workdir("precomputed://gs://bucket/seg")


# ----------------------------------------------------------------------------
# The real flood fill with the oracle network

ORACLE_SHAPE = (42, 54, 54)
# Block starts (0, 12 / 0, 18) are multiples of the deltas, so every block sees
# the same FOV lattice as the whole volume, and the overlap (18) keeps every core
# voxel at least one FOV radius + 4 inside its block.
ORACLE_BLOCK = (30, 36, 36)
ORACLE_OVERLAP = (18, 18, 18)


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory):
    from ffnjax.config import ModelConfig
    from ffnjax.segmentation import segment
    from ffnjax.testing import oracle_options

    tmp = tmp_path_factory.mktemp("oracle")
    lab = bricks(ORACLE_SHAPE)
    spec = str(tmp / "labels.zarr")
    save_volume(spec, lab, voxel_size=(16, 8, 8))
    mc = ModelConfig(depth=1, features=4, fov_size=(9, 9, 9), deltas=(3, 3, 3))
    opts = oracle_options(min_segment_size=0, seed_policy="grid", seed_grid_step=(3, 3, 3))
    whole, _ = segment(lab, None, mc, opts, apply_fn=centred_oracle_apply_fn, progress=False)
    out = str(tmp / "seg.zarr")
    summary = bw.segment_volume(spec, out, None, mc, opts, block=ORACLE_BLOCK, overlap=ORACLE_OVERLAP,
                                client="sync", apply_fn=centred_oracle_apply_fn, progress=False)
    return dict(tmp=tmp, labels=lab, spec=spec, config=mc, options=opts, whole=whole, out=out,
                summary=summary)


def test_oracle_blockwise_equals_whole_volume(oracle_run):
    r = oracle_run
    seg, whole = read_all(r["out"]), r["whole"]
    assert same_up_to_relabelling(whole, r["labels"])  # the oracle recovers every box
    assert same_up_to_relabelling(seg, whole)  # block-wise == whole volume, up to relabelling
    s = r["summary"]
    assert s.n_blocks == 8 and s.grid_shape == (2, 2, 2) and s.weak_contacts == []
    assert np.unique(seg[seg != 0]).tolist() == list(range(1, s.n_objects + 1))
    assert s.n_objects == int(r["labels"].max())


def test_oracle_cuts_from_a_strict_min_overlap_are_reported(oracle_run, tmp_path):
    """Reconciling the same blocks with a min_overlap larger than some contacts
    cuts those objects, and exactly those contacts are reported."""
    r = oracle_run
    out = str(tmp_path / "strict.zarr")
    s = bw.segment_volume(r["spec"], out, block=ORACLE_BLOCK, overlap=ORACLE_OVERLAP, client="sync",
                          segment_fn=RefuseToSegment(None, r["config"], r["options"],
                                                     centred_oracle_apply_fn),
                          workdir=r["tmp"] / "seg.zarr.blocks", min_overlap=3000, progress=False)
    assert s.blocks_skipped == 8 and s.blocks_computed == 0
    seg = read_all(out)
    assert s.n_objects > r["summary"].n_objects and s.weak_contacts
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    g = np.array([w["global_ids"] for w in s.weak_contacts])
    n = s.n_objects + 1
    _, comp = connected_components(coo_matrix((np.ones(len(g)), (g[:, 0], g[:, 1])), shape=(n, n)),
                                   directed=False)
    assert same_up_to_relabelling(np.where(seg > 0, comp[seg.astype(np.int64)] + 1, 0), r["whole"])


def test_oracle_local_cluster_two_workers_equals_sync(oracle_run, tmp_path):
    from distributed import Client, LocalCluster

    r = oracle_run
    out = str(tmp_path / "dist.zarr")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        s = bw.segment_volume(r["spec"], out, None, r["config"], r["options"], block=ORACLE_BLOCK,
                              overlap=ORACLE_OVERLAP, client=client,
                              apply_fn=centred_oracle_apply_fn, progress=False)
    assert s.blocks_computed == 8
    assert np.array_equal(read_all(out), read_all(r["out"]))


def test_montage_and_viewer(oracle_run, tmp_path):
    import urllib.request

    from PIL import Image

    r = oracle_run
    png = bw.save_montage(tmp_path / "m.png", r["spec"], r["out"], z_slices=[5, 30])
    pic = np.asarray(Image.open(png))
    assert pic.shape[2] == 3 and pic.shape[0] > 2 * 54 and pic.shape[1] > 2 * 54
    viewer = bw.make_viewer(r["spec"], r["out"])
    url = viewer.get_viewer_url()
    assert url.startswith("http://127.0.0.1:")
    state = viewer.state.to_json()
    assert [(l["name"], l["type"]) for l in state["layers"]] == [("image", "image"),
                                                                ("segmentation", "segmentation")]
    assert state["dimensions"]["z"][0] == pytest.approx(16e-9)
    with urllib.request.urlopen(url, timeout=20) as resp:
        assert resp.status == 200


def test_cli_segment_volume_and_view(tmp_path):
    from experiments import segment_volume as cli
    from experiments import view

    lab = bricks((24, 36, 36), seed=3)
    spec = str(tmp_path / "labels.zarr")
    save_volume(spec, lab)
    out = "precomputed://" + str(tmp_path / "seg")
    d = cli.main(["--oracle", "--image", spec, "--output", out, "--block", "24,24,24",
                  "--overlap", "12,12,12", "--scheduler", "sync", "--no-progress",
                  "--png", str(tmp_path / "m.png"), "--summary", str(tmp_path / "s.json")])
    assert d["n_blocks"] == 4 and d["blocks_computed"] == 4
    assert json.loads((tmp_path / "s.json").read_text())["n_objects"] == d["n_objects"]
    seg = open_volume(out).read()
    assert seg.dtype == np.uint64 and np.unique(seg[seg > 0]).size == d["n_objects"]
    assert (tmp_path / "m.png").stat().st_size > 0
    viewer = view.main(["--image", spec, "--segmentation", out, "--no-block"])
    assert "segmentation" in [l.name for l in viewer.state.layers]
    with pytest.raises(SystemExit):
        cli.main(["--image", spec, "--output", str(tmp_path / "x.zarr")])  # no model


def test_fib25_ground_truth_stitches_exactly(shared_data, tmp_path):
    """Real neurite geometry: block-wise connected components of a FIB-25
    ground-truth crop (27 blocks) equal the whole-crop connected components."""
    gt = shared_data("fib25_training_sample2", "groundtruth_z000-149.npz")
    with np.load(gt) as z:
        lab = np.ascontiguousarray(z["labels"][:48, :96, :96])
    spec = str(tmp_path / "gt.zarr")
    save_volume(spec, lab)
    out = str(tmp_path / "seg.zarr")
    s = bw.segment_volume(spec, out, block=(20, 40, 40), overlap=(6, 12, 12), client="sync",
                          segment_fn=CCSegmenter(), progress=False)
    ref = cc3d.connected_components(lab, connectivity=6)  # 0 stays background
    assert s.n_blocks == 27
    assert same_up_to_relabelling(read_all(out), ref)
    assert s.n_objects == int(ref.max()) and s.weak_contacts == []


# ----------------------------------------------------------------------------
# A block task that fails: retried, then reported; the rest kept; a rerun does the rest

MARK = 999  # a label placed in one voxel that only block 000_000_000 reads


class FailsOnMarkedBlock(CCSegmenter):
    """Connected components, raising on the block holding MARK `times` times
    (None: every time)."""

    def __init__(self, times=None):
        super().__init__()
        self.times, self.failed = times, 0

    def __call__(self, image):
        if (image == MARK).any() and (self.times is None or self.failed < self.times):
            self.failed += 1
            raise RuntimeError("injected fault")
        return super().__call__(image)


@pytest.fixture
def marked_spec(tmp_path):
    lab = voronoi_labels()
    lab[5, 5, 5] = MARK
    spec = str(tmp_path / "image.zarr")
    save_volume(spec, lab)
    return spec, lab


def test_a_failing_block_is_retried_then_reported_and_a_rerun_computes_only_it(tmp_path, marked_spec):
    from ffnjax.dask_tasks import TasksFailed

    spec, lab = marked_spec
    flaky = FailsOnMarkedBlock(times=1)
    s = bw.segment_volume(spec, str(tmp_path / "flaky.zarr"), block=BLOCK, overlap=OVERLAP,
                          client="sync", segment_fn=flaky, retries=1, progress=False)
    assert flaky.failed == 1 and s.blocks_computed == 27  # the retry succeeded

    out, work = str(tmp_path / "seg.zarr"), tmp_path / "seg.zarr.blocks"
    broken = FailsOnMarkedBlock()
    with pytest.raises(TasksFailed) as e:
        bw.segment_volume(spec, out, block=BLOCK, overlap=OVERLAP, client="sync",
                          segment_fn=broken, retries=2, progress=False)
    assert broken.failed == 3 and broken.calls == 26     # 1 + 2 retries; every other block ran
    msg = str(e.value)
    assert "1 of 27 segment tasks failed (tried 3 times each): block 000_000_000: " \
           "RuntimeError: injected fault" in msg and "rerun the same command" in msg
    failures = json.loads((work / "failures.json").read_text())["failures"]
    assert [f["label"] for f in failures] == ["block 000_000_000"]
    assert "injected fault" in failures[0]["traceback"]
    assert len(list((work / "blocks").glob("*.json"))) == 26 and not os.path.exists(out)

    again = CCSegmenter()
    s = bw.segment_volume(spec, out, block=BLOCK, overlap=OVERLAP, client="sync",
                          segment_fn=again, progress=False)
    assert again.calls == 1 and (s.blocks_computed, s.blocks_skipped) == (1, 26)
    assert same_up_to_relabelling(read_all(out), cc3d.connected_components(lab, connectivity=6))
    assert not (work / "failures.json").exists()


def test_a_failing_block_on_a_cluster_is_reported_with_its_index(tmp_path, marked_spec):
    from distributed import Client, LocalCluster

    from ffnjax.dask_tasks import TasksFailed

    spec, _ = marked_spec
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        with pytest.raises(TasksFailed, match="block 000_000_000: RuntimeError: injected fault"):
            bw.segment_volume(spec, str(tmp_path / "seg.zarr"), block=BLOCK, overlap=OVERLAP,
                              client=client, segment_fn=FailsOnMarkedBlock(), progress=False)
    assert len(list((tmp_path / "seg.zarr.blocks" / "blocks").glob("*.json"))) == 26


def test_cli_reports_a_failed_block_in_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    from experiments import _cli
    from experiments import segment_volume as cli

    lab = bricks((24, 36, 36), seed=3)
    spec = str(tmp_path / "labels.zarr")
    save_volume(spec, lab)
    argv = ["--oracle", "--image", spec, "--output", str(tmp_path / "seg.zarr"), "--block",
            "24,24,24", "--overlap", "12,12,12", "--scheduler", "sync", "--quiet"]
    real = bw.segment_block

    def faulty(image, workdir, block, segment_fn):
        if block.name == "000_000_001":
            raise RuntimeError("injected fault")
        return real(image, workdir, block, segment_fn)

    monkeypatch.setattr(bw, "segment_block", faulty)
    with pytest.raises(SystemExit) as e:
        _cli.run(cli.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1, err
    assert "block 000_000_001: RuntimeError: injected fault" in err[0] and "rerun" in err[0]
    monkeypatch.setattr(bw, "segment_block", real)
    d = cli.main(argv)
    assert (d["blocks_computed"], d["blocks_skipped"]) == (1, 3)
