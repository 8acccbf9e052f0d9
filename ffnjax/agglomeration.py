"""Agglomeration: merging the segments of an oversegmentation where the FFN agrees.

The FFN's published results come from an oversegmentation (the consensus of
fills) followed by this step (Januszewski et al. 2018; google/ffn's
`doc/manual.md`, "Agglomeration through resegmentation"):

1. `ffnjax.decision_points`: one point per pair of segments that meet.
2. `ffnjax.resegmentation`: two fresh fills around the point, one seeded in
   each segment, scored against both segments.
3. Here: `MergeRules` decides each pair from its scores; the scores are kept
   in an append-only *results file* (one JSON line per pair, so an
   interrupted run resumes without scoring a pair twice, and other thresholds
   can be tried without refilling); the decisions become a *merge graph*
   (CSV: pair, point, scores, decision), and the accepted pairs a union-find
   over segment ids, guarded so that no merge joins two segments whose own
   fills disagreed (`MergeRules.cannot_link`, `decide_all`): each merged group
   takes its smallest id (`merge_labels`, relabelled with fastremap).

Block by block, for volumes larger than memory: `ffnjax.agglomeration_blocks`.

Python API::

    result = agglomerate(image, seg, params, model_config, options,
                         voxel_size=(8, 8, 8), results_path="out/agglo.jsonl")
    result.labels, result.merges, result.rows          # rows: the merge graph
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import fastremap
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from ffnjax import scale
from ffnjax.config import InferenceOptions, ModelConfig
from ffnjax.decision_points import DecisionPoint, DecisionPointOptions, find_decision_points
from ffnjax.files import write_bytes
from ffnjax.flood import ApplyFn, as_image_array, check_apply_fn, default_apply_fn
from ffnjax.nets import normalize_image
from ffnjax.resegmentation import FillScore, PairResult, ResegmentationConfig, resegment_pairs

RESULTS_FORMAT = "ffnjax-agglomeration-results-1"


@dataclasses.dataclass(frozen=True)
class MergeRules:
    """When a resegmented pair is merged: google/ffn's conservative starting rule.

    All must hold (google/ffn's `doc/manual.md`, "Scoring"):

    * the two fills agree: IoU > `min_iou` in the analysis box;
    * each fill reconstructs each segment: all four fractions (from A of A and
      of B, from B of A and of B) > `min_consistency`;
    * the network was not confused: for at least one fill, deleted voxels /
      fill voxels < `max_deleted_fraction`.

    `cannot_link` (ffnjax's guard; google/ffn has none): accepted pairs are
    joined in `merge_order` (larger contact first), and a pair is refused
    ('chain') when it would put into one object two segments whose own pair
    was scored and rejected because the fills disagreed ('iou' or
    'consistency'). Without it, a small segment that is itself a merger joins
    its two objects through two good-looking pairs (docs/agglomeration.md).
    """

    min_iou: float = 0.8
    min_consistency: float = 0.6
    max_deleted_fraction: float = 0.02
    cannot_link: bool = True

    def __post_init__(self):
        for name in ("min_iou", "min_consistency", "max_deleted_fraction"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
            object.__setattr__(self, name, v)

    def decide(self, r: PairResult) -> tuple[bool, str]:
        """(merge?, why) of this pair alone: 'accepted', 'no_seed', 'iou',
        'consistency' or 'deleted' (the first rule that failed). The
        `cannot_link` guard needs every pair: `decide_all`."""
        if r.from_a is None or r.from_b is None:
            return False, "no_seed"
        if not r.iou > self.min_iou:
            return False, "iou"
        fracs = (r.from_a.frac_a, r.from_a.frac_b, r.from_b.frac_a, r.from_b.frac_b)
        if not min(fracs) > self.min_consistency:
            return False, "consistency"
        if not min(r.from_a.deleted_fraction, r.from_b.deleted_fraction) < self.max_deleted_fraction:
            return False, "deleted"
        return True, "accepted"


# Rejections that are evidence the two segments are different objects.
DISAGREEMENTS = ("iou", "consistency")


def agreement(r: PairResult) -> float:
    """How strongly a pair's fills agree: the least of its IoU and four fractions."""
    if r.from_a is None or r.from_b is None:
        return float("-inf")
    return min(r.iou, r.from_a.frac_a, r.from_a.frac_b, r.from_b.frac_a, r.from_b.frac_b)


def merge_order(r: PairResult) -> tuple[float, float]:
    """Sort key of accepted pairs under `cannot_link`, first joined first: the
    larger contact (a neurite cut in two meets its other half over its whole
    cross-section, a merged fragment its wrong object over a part), then the
    stronger `agreement`."""
    return (-float(r.point.contact), -agreement(r))


def decide_all(results: Sequence[PairResult], rules: MergeRules) -> list[tuple[bool, str]]:
    """(merge?, why) per pair, as `rules.decide`, then the `cannot_link` guard:
    accepted pairs join groups in `merge_order`, and one that would join
    two groups holding a pair rejected in `DISAGREEMENTS` is refused ('chain')."""
    decisions = [rules.decide(r) for r in results]
    if not rules.cannot_link:
        return decisions
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    apart: dict[int, set[int]] = {}          # root -> ids it may not join
    for r, (_, why) in zip(results, decisions):
        if why in DISAGREEMENTS:
            a, b = r.point.a, r.point.b
            apart.setdefault(a, set()).add(b)
            apart.setdefault(b, set()).add(a)
    order = sorted((i for i, (ok, _) in enumerate(decisions) if ok),
                   key=lambda i: merge_order(results[i]))
    for i in order:
        ra, rb = find(results[i].point.a), find(results[i].point.b)
        if ra == rb:
            continue
        if rb in {find(x) for x in apart.get(ra, ())}:
            decisions[i] = (False, "chain")
            continue
        parent[rb] = ra
        apart[ra] = apart.get(ra, set()) | apart.pop(rb, set())
    return decisions


# ----------------------------------------------------------------------------
# Rows: one flat dict per pair (results file lines, merge graph rows)

POINT_FIELDS = ("a", "b", "z", "y", "x", "contact", "gap", "clearance")
FILL_FIELDS = ("seed_z", "seed_y", "seed_x", "voxels", "frac_a", "frac_b", "deleted", "max_edt",
               "steps", "attempts")
ROW_FIELDS = (*POINT_FIELDS, "iou", "seconds",
              *(f"from_{s}_{f}" for s in "ab" for f in FILL_FIELDS))
GRAPH_FIELDS = (*ROW_FIELDS, "merge", "reason")
_INT = {"a", "b", "z", "y", "x", "contact", *(f"from_{s}_{f}" for s in "ab"
                                           for f in ("seed_z", "seed_y", "seed_x", "voxels",
                                                     "deleted", "steps", "attempts"))}


def result_row(r: PairResult) -> dict[str, Any]:
    """A PairResult as one flat dict (ROW_FIELDS; fill fields None without a seed)."""
    p = r.point
    row: dict[str, Any] = {"a": p.a, "b": p.b, "z": p.point[0], "y": p.point[1], "x": p.point[2],
                           "contact": p.contact, "gap": p.gap, "clearance": p.clearance,
                           "iou": r.iou, "seconds": r.seconds}
    for side, f in (("a", r.from_a), ("b", r.from_b)):
        vals = (None,) * len(FILL_FIELDS) if f is None else (
            *f.seed, f.voxels, f.frac_a, f.frac_b, f.deleted, f.max_edt, f.steps, f.attempts)
        row.update({f"from_{side}_{k}": v for k, v in zip(FILL_FIELDS, vals)})
    return row


def _value(key: str, v: Any) -> Any:
    if v is None or v == "":
        return None
    return int(v) if key in _INT else float(v)


def row_result(row: dict[str, Any]) -> PairResult:
    """The PairResult of `result_row` (also from a CSV row of strings)."""
    v = {k: _value(k, row.get(k)) for k in ROW_FIELDS}
    point = DecisionPoint(a=v["a"], b=v["b"], point=(v["z"], v["y"], v["x"]),
                          contact=v["contact"], gap=v["gap"], clearance=v["clearance"])
    fills = []
    for side in "ab":
        f = [v[f"from_{side}_{k}"] for k in FILL_FIELDS]
        fills.append(None if f[0] is None else FillScore(seed=tuple(f[:3]), voxels=f[3],
                                                         frac_a=f[4], frac_b=f[5], deleted=f[6],
                                                         max_edt=f[7], steps=f[8],
                                                         attempts=f[9]))
    return PairResult(point=point, from_a=fills[0], from_b=fills[1], iou=v["iou"],
                      seconds=v["seconds"])


# ----------------------------------------------------------------------------
# The append-only results file (JSON lines: a header, then one line per pair)


def _read_lines(path: Path) -> tuple[list[dict], int]:
    """(parsed complete lines, byte length of the complete lines); a last line
    cut short by an interruption is left out."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    out = []
    for i, line in enumerate(data[:end].splitlines()):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"results file {path} line {i + 1} is not JSON: {e}") from None
    return out, end


def open_results(path: str | os.PathLike, run: str, overwrite: bool = False) -> dict[tuple[int, int], dict]:
    """Rows already scored in the results file at `path` ({(a, b): row}), ready to append to.

    A new (or, with `overwrite`, replaced) file gets a header recording `run`
    (what the scores depend on). An existing file must hold the same `run`; a
    last line cut short by an interruption is dropped.

    Raises:
      ValueError: the file belongs to another run, or is not a results file.
    """
    path = Path(path)
    if overwrite or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, (json.dumps({"format": RESULTS_FORMAT, "run": run}) + "\n").encode())
        return {}
    lines, end = _read_lines(path)
    if not lines or lines[0].get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path} is not an agglomeration results file; pass --overwrite to replace it")
    if lines[0].get("run") != run:
        raise ValueError(f"results file {path} belongs to another run (segmentation, image, model, "
                         f"options or radii differ); pass --overwrite to start afresh.\n"
                         f"saved: {lines[0].get('run')}\nnow:   {run}")
    if end < path.stat().st_size:
        os.truncate(path, end)
    return {(int(r["a"]), int(r["b"])): r for r in lines[1:]}


def append_rows(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Appends rows as JSON lines and syncs them to disk."""
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------
# The merge graph (CSV) and the merged labels


def merge_graph_rows(results: Sequence[PairResult], rules: MergeRules) -> list[dict[str, Any]]:
    """GRAPH_FIELDS rows: every pair's scores with its decision (`decide_all`)."""
    return [{**result_row(r), "merge": int(merge), "reason": why}
            for r, (merge, why) in zip(results, decide_all(results, rules))]


def save_merge_graph(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Writes the merge graph as CSV (atomically)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=GRAPH_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if row.get(k) is None else row[k] for k in GRAPH_FIELDS})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(path, buf.getvalue().encode())


def load_merge_graph(path: str | os.PathLike) -> list[tuple[PairResult, bool, str]]:
    """(PairResult, merge, reason) per row of a CSV written by `save_merge_graph`."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and set(GRAPH_FIELDS) - set(rows[0]):
        raise ValueError(f"{path} is not a merge graph: missing columns "
                         f"{sorted(set(GRAPH_FIELDS) - set(rows[0]))}")
    return [(row_result(r), bool(int(r["merge"])), r["reason"]) for r in rows]


def merge_mapping(pairs: Iterable[tuple[int, int]]) -> dict[int, int]:
    """{id: new id} of every id that `pairs` join to a smaller one: the
    connected components of the pairs (a union-find), each onto its smallest id."""
    pairs = np.asarray([(int(a), int(b)) for a, b in pairs], np.int64).reshape(-1, 2)
    if not len(pairs):
        return {}
    ids = np.unique(pairs)
    index = np.searchsorted(ids, pairs)
    graph = coo_matrix((np.ones(len(pairs)), (index[:, 0], index[:, 1])), shape=(len(ids),) * 2)
    _, comp = connected_components(graph, directed=False)
    smallest = np.full(comp.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(smallest, comp, ids)
    return {int(i): int(smallest[c]) for i, c in zip(ids, comp) if smallest[c] != i}


def relabel(seg: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """A copy of `seg` with the ids of `mapping` replaced (fastremap); others kept."""
    if not mapping:
        return np.array(seg, copy=True)
    return fastremap.remap(seg, mapping, preserve_missing_labels=True, in_place=False)


def merge_labels(seg: np.ndarray, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """`seg` with every group of ids joined by `pairs` (their connected
    components: a union-find) relabelled to the group's smallest id; other ids
    keep theirs."""
    return relabel(seg, merge_mapping(pairs))


# ----------------------------------------------------------------------------
# Everything at once


@dataclasses.dataclass(frozen=True)
class AgglomerationResult:
    """What `agglomerate` did.

    Attributes:
      points: every decision point found.
      results: a PairResult per point (resumed ones read back from the file).
      rows: the merge graph (GRAPH_FIELDS rows, in `points` order).
      merges: the accepted pairs (a, b).
      labels: the agglomerated segmentation (same dtype and shape as the input).
      scored: pairs resegmented in this call (the rest came from the results file).
    """

    points: list[DecisionPoint]
    results: list[PairResult]
    rows: list[dict[str, Any]]
    merges: list[tuple[int, int]]
    labels: np.ndarray
    scored: int


def run_record(shape: Sequence[int], voxel_size: Sequence[float], model_config: ModelConfig,
               options: InferenceOptions, config: ResegmentationConfig,
               point_options: DecisionPointOptions, run_id: str = "") -> str:
    """What a pair's scores depend on, as the results file records it (the
    whole-volume and the block-wise paths write the same record: their scores agree)."""
    return json.dumps({"shape": [int(n) for n in shape], "voxel_size": [float(v) for v in voxel_size],
                       "model": model_config.to_dict(), "options": options.result_dict(),
                       "config": dataclasses.asdict(config),
                       "points": dataclasses.asdict(point_options), "run": run_id}, sort_keys=True)


def scored_already(points: Sequence[DecisionPoint], results_path: str | os.PathLike | None,
                   run: str, overwrite: bool = False
                   ) -> tuple[dict[tuple[int, int], dict], list[DecisionPoint]]:
    """(rows the results file holds for this `run`, the points still to score)."""
    done = open_results(results_path, run, overwrite) if results_path else {}
    return done, [p for p in points if (p.a, p.b) not in done]


def assemble(points: Sequence[DecisionPoint], new: dict[tuple[int, int], PairResult],
             done: dict[tuple[int, int], dict], rules: MergeRules,
             seg: np.ndarray | None) -> AgglomerationResult:
    """The AgglomerationResult of every point's scores (scored now in `new`, or
    read back from `done`), decided by `rules`; `labels` merged from `seg`
    (None: left to the caller)."""
    results = [new.get((p.a, p.b)) or row_result(done[(p.a, p.b)]) for p in points]
    rows = merge_graph_rows(results, rules)
    merges = [(r["a"], r["b"]) for r in rows if r["merge"]]
    return AgglomerationResult(points=list(points), results=results, rows=rows, merges=merges,
                               labels=None if seg is None else merge_labels(seg, merges),  # type: ignore[arg-type]
                               scored=len(new))


def agglomerate(image: Any, seg: np.ndarray, params: Any, model_config: ModelConfig,
                options: InferenceOptions = InferenceOptions(), apply_fn: ApplyFn | None = None,
                *, voxel_size: Sequence[float] = (1, 1, 1),
                config: ResegmentationConfig = ResegmentationConfig(),
                rules: MergeRules = MergeRules(),
                point_options: DecisionPointOptions = DecisionPointOptions(),
                results_path: str | os.PathLike | None = None, run_id: str = "",
                overwrite: bool = False, progress: bool = True,
                on_pairs: Callable[[list[PairResult]], Any] | None = None) -> AgglomerationResult:
    """Finds decision points, resegments every pair not scored yet, merges.

    With `options.downsample` (a model trained at a coarser scale) the work
    runs at that scale and only the merges come back to the native grid.

    Args:
      image: z,y,x raw image (numpy or volume), aligned with `seg`.
      seg: z,y,x integer oversegmentation (0 = background).
      params, model_config, options, apply_fn: the network and its fill
        settings (apply_fn defaults to the convstack).
      voxel_size: z,y,x physical voxel size.
      config, rules, point_options: resegmentation geometry, merge rule,
        decision point search.
      results_path: the append-only results file; a rerun skips every pair
        found there (None: keep nothing).
      run_id: what else the scores depend on (the CLI: specs and checkpoint);
        recorded in the results file and checked on resume.
      overwrite: start the results file afresh.
      progress: a tqdm bar over decision points.
      on_pairs: called with each batch of new results after it is saved.
    """
    arr = as_image_array(image)
    seg = np.asarray(seg)
    if arr.shape != seg.shape:
        raise ValueError(f"image shape {arr.shape} differs from segmentation shape {seg.shape}")
    factors = tuple(int(f) for f in options.downsample)
    if not scale.is_identity(factors):
        # A model that works at a coarser scale resegments there: the image
        # block-averaged and the segmentation subsampled as `ffnjax.segment`
        # does (ids survive), points and scores in coarse voxels; the merges
        # then relabel the native segmentation.
        coarse = agglomerate(
            scale.downsample_image(arr, factors), scale.downsample_labels(seg, factors), params,
            model_config, dataclasses.replace(options, downsample=(1, 1, 1)), apply_fn,
            voxel_size=tuple(float(v) * f for v, f in zip(voxel_size, factors)), config=config,
            rules=rules, point_options=point_options, results_path=results_path, run_id=run_id,
            overwrite=overwrite, progress=progress, on_pairs=on_pairs)
        return dataclasses.replace(coarse, labels=merge_labels(seg, coarse.merges))
    apply_fn = apply_fn or default_apply_fn(model_config)
    check_apply_fn(apply_fn, params, model_config, options.batch_size)
    points = find_decision_points(seg, voxel_size, point_options)
    run = run_record(seg.shape, voxel_size, model_config, options, config, point_options, run_id)
    done, todo = scored_already(points, results_path, run, overwrite)
    image_n = np.asarray(normalize_image(arr, options.image_mean, options.image_stddev))
    per_call = max(1, config.fills_per_call // 2)
    new: dict[tuple[int, int], PairResult] = {}
    accepted = 0   # pairs the rule accepts on their own scores (before the cannot-link guard)
    with tqdm(total=len(points), initial=len(points) - len(todo), desc="agglomerate",
              unit="pair", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), per_call):
            batch = resegment_pairs(image_n, seg, todo[start:start + per_call], params,
                                    model_config, options, apply_fn, config, voxel_size)
            if results_path:
                append_rows(results_path, [result_row(r) for r in batch])
            for r in batch:
                new[(r.point.a, r.point.b)] = r
            if on_pairs is not None:
                on_pairs(batch)
            bar.update(len(batch))
            accepted += sum(rules.decide(r)[0] for r in batch)
            bar.set_postfix_str(f"accepted={accepted}")
    return assemble(points, new, done, rules, seg)
