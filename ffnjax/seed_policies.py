"""Every seed policy, by ffnjax's name or google/ffn's, with its arguments.

`make_seeds(context)` returns the (N, 3) int64 z,y,x seeds of the policy named
by `options.seed_policy`, called with the JSON object `options.seed_policy_args`
(google/ffn's `seed_policy_args`), in the order they will be tried. google/ffn's
names (`ffn/inference/seed.py`) are accepted and stored as ffnjax's
(`ffnjax.config.GOOGLE_SEED_POLICIES`):

==================  ======================  =========================================
ffnjax              google/ffn              seeds
==================  ======================  =========================================
peaks               PolicyPeaks             maxima of the distance to image edges
                                            (`ffnjax.seeds`; `peaks_method` picks
                                            ffnjax's or google/ffn's way)
grid                -                       a lattice of step `seed_grid_step` from
                                            the margin (ffnjax's)
peaks2d             PolicyPeaks2d           the same per z section, in 2-D; args
                                            min_distance=7, threshold_abs=2.5,
                                            sort_cmp='ascending' (or 'descending')
max                 PolicyMax               every voxel, brightest first
grid2d              PolicyGrid2d            y,x lattices of step `step`=16 at each
                                            offset of `offsets`, on every section
grid3d              PolicyGrid3d            z,y,x lattices likewise
dense               PolicyDenseSeeds        every voxel of the normalised image above
                                            `threshold`=0.5 (below: `invert`), after
                                            `num_erosions`=0 binary erosions
fill_empty          PolicyFillEmptySpace    maxima of the distance to the objects of
                                            the segmentation the run starts from
                                            (`init_segmentation`)
invert_origins      PolicyInvertOrigins     the seeds of the objects of an earlier run
                                            (`segmentation_dir`, `corner`), last
                                            object first (google/ffn's
                                            forward/reverse consensus)
sequence            SequentialPolicies      `policies`: [[name, {args}], ...] one
                                            after another
reverse             ReverseCoords           `policy_to_reverse` (with the other
                                            args as its own), in reverse order
==================  ======================  =========================================

Each policy is google/ffn's: it sees the image normalised as the network does
(`ffnjax.seeds.google_ffn_normalised`), its random tie-breaking jitter comes
from google/ffn's generator (`ffnjax.seeds.google_ffn_maxima`), and seeds
closer than the FOV radius (`SeedContext.margin`) to the border are dropped
from each policy's list. Exclusion masks (`ffnjax.restrict`) enter as in
google/ffn: 'peaks' treats masked voxels as edges and finds no seed in them
or in an object of the starting segmentation, 'peaks2d' treats move-masked
voxels as edges; every other policy may propose masked seeds, which
`ffnjax.segmentation.seed_allowed` skips.

`seed_order` 'zyx' keeps each policy's own order (ascending z,y,x for peaks
and grid, as google/ffn); 'distance' reorders any policy's seeds by
descending distance to the nearest image edge. An argument a policy does not
take is an error naming it (google/ffn ignores it).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from typing import Any, Callable, Sequence

import edt
import numpy as np
from scipy import ndimage

from ffnjax import seeds as seeds_lib
from ffnjax.config import InferenceOptions, seed_policy_name


@dataclasses.dataclass
class SeedContext:
    """What a seed policy may look at.

    Attributes:
      image: the z,y,x raw image being segmented (not normalised).
      options: the run's InferenceOptions (normalisation, seed_policy and its args).
      margin: z,y,x: seeds closer than this to the border are dropped (the FOV radius).
      segmentation: the labels the run starts from (`init_segmentation`), or None.
      mask: voxels on which no FOV is centred (a move mask), or None.
      seed_mask: voxels where no fill starts, or None.
      corner: z,y,x of this subvolume in the whole image (`invert_origins`
        finds an earlier run's file of the same subvolume by it).
    """

    image: np.ndarray
    options: InferenceOptions = InferenceOptions()
    margin: Sequence[int] = (0, 0, 0)
    segmentation: np.ndarray | None = None
    mask: np.ndarray | None = None
    seed_mask: np.ndarray | None = None
    corner: Sequence[int] = (0, 0, 0)

    @functools.cached_property
    def normalised(self) -> np.ndarray:
        """The image as google/ffn's policies see it (float32, normalised)."""
        return seeds_lib.google_ffn_normalised(self.image, self.options)

    @functools.cached_property
    def edge_distance(self) -> np.ndarray:
        """The unmasked edge-distance map of `options.peaks_method`: what the
        unrestricted peaks and `seed_order='distance'` both read (computed once)."""
        if self.options.peaks_method == "google_ffn":
            return seeds_lib.google_ffn_edge_distance(self.image, self.options)
        return seeds_lib.edge_distance(self.image)

    def excluded(self) -> np.ndarray | None:
        """Voxels no seed may start at: objects, the move mask and the seed
        mask (google/ffn's `get_exclusion_mask`); None when nothing is."""
        parts = [m for m in (None if self.segmentation is None else self.segmentation > 0,
                             self.mask, self.seed_mask) if m is not None]
        return functools.reduce(np.logical_or, parts) if parts else None


def _sorted(points: np.ndarray, reverse: bool = False) -> np.ndarray:
    """`points` (N, 3) in ascending (or descending) lexicographic z,y,x order."""
    points = np.asarray(points, np.int64).reshape(-1, 3)
    order = np.lexsort(points.T[::-1])
    return points[order[::-1] if reverse else order]


def peaks(ctx: SeedContext) -> np.ndarray:
    """`ffnjax.seeds.make_seeds`' peaks; with masks or a starting segmentation,
    google/ffn's PolicyPeaks of today: masked voxels count as edges, and no
    peak lies in an excluded voxel (distance -1 there)."""
    excluded = ctx.excluded()
    google = ctx.options.peaks_method == "google_ffn"
    if excluded is None:  # `seeds.make_seeds`' peaks, on the context's shared map
        find = seeds_lib._google_ffn_peaks if google else seeds_lib._distance_peaks
        return seeds_lib.order_seeds(find(ctx.edge_distance, ctx.margin), "zyx")
    edges = seeds_lib.edge_mask(ctx.normalised if google else ctx.image)
    for m in (ctx.mask, ctx.seed_mask):
        if m is not None:
            edges |= m
    if edges.all():
        return np.zeros((0, 3), np.int64)
    if google:
        dist = ndimage.distance_transform_edt(~edges).astype(np.float32)
    else:
        dist = edt.edt(np.ascontiguousarray(~edges, np.uint8), black_border=False)
    dist = dist.astype(np.float32)
    dist[excluded | ~np.isfinite(dist)] = -1
    if google:
        return _sorted(seeds_lib.google_ffn_maxima(dist))
    return seeds_lib._distance_peaks(dist, None)


def grid(ctx: SeedContext) -> np.ndarray:
    """ffnjax's lattice of step `seed_grid_step`, starting at the margin."""
    return seeds_lib.grid_seeds(ctx.image.shape, ctx.options, ctx.margin)


def peaks2d(ctx: SeedContext, min_distance: int = 7, threshold_abs: float = 2.5,
            sort_cmp: str = "ascending") -> np.ndarray:
    """PolicyPeaks2d: the peaks of each z section's 2-D edge distance."""
    found = []
    for z, section in enumerate(ctx.normalised):
        edges = seeds_lib.edge_mask(section)
        if ctx.mask is not None:
            edges |= ctx.mask[z]
        # scipy as google/ffn: finite on a section without edges (edt gives inf there).
        dist = ndimage.distance_transform_edt(~edges).astype(np.float32)
        yx = seeds_lib.google_ffn_maxima(dist, min_distance, threshold_abs)
        found.append(np.concatenate([np.full((len(yx), 1), z, np.int64), yx], axis=1))
    points = np.concatenate(found) if found else np.zeros((0, 3), np.int64)
    return _sorted(points, reverse=str(sort_cmp).strip().lower().startswith("de"))


def max_intensity(ctx: SeedContext) -> np.ndarray:
    """PolicyMax: every voxel, in descending order of the normalised image
    (ties in the order of NumPy's default argsort, reversed, as google/ffn)."""
    order = np.argsort(ctx.normalised.ravel())[::-1]
    return np.stack(np.unravel_index(order, ctx.image.shape), axis=1).astype(np.int64)


def _lattices(shape: Sequence[int], step: int, offsets: Sequence[int], in_z: bool) -> np.ndarray:
    points = []
    for off in offsets:
        axes = [np.arange(off if in_z else 0, shape[0], step if in_z else 1),
                np.arange(off, shape[1], step), np.arange(off, shape[2], step)]
        points.append(np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3))
    return np.concatenate(points).astype(np.int64) if points else np.zeros((0, 3), np.int64)


def grid2d(ctx: SeedContext, step: int = 16,
           offsets: Sequence[int] = (0, 8, 4, 12, 2, 6, 10, 14)) -> np.ndarray:
    """PolicyGrid2d: for each offset in turn, the y,x lattice of `step` from
    that offset on every z section."""
    return _lattices(ctx.image.shape, int(step), [int(o) for o in offsets], in_z=False)


def grid3d(ctx: SeedContext, step: int = 16,
           offsets: Sequence[int] = (0, 8, 4, 12, 2, 10, 14)) -> np.ndarray:
    """PolicyGrid3d: for each offset in turn, the z,y,x lattice of `step` from it."""
    return _lattices(ctx.image.shape, int(step), [int(o) for o in offsets], in_z=True)


def dense(ctx: SeedContext, threshold: float = 0.5, num_erosions: int = 0,
          invert: bool = False) -> np.ndarray:
    """PolicyDenseSeeds: every voxel where the normalised image exceeds
    `threshold` (is at most it, with `invert`), after `num_erosions` binary
    erosions, in ascending z,y,x. The erosion is scikit-image's
    `binary_erosion` (google/ffn's call; deprecated there since 0.26): the
    6-connected footprint, with the outside of the image counted as set."""
    keep = ctx.normalised > threshold
    if invert:
        keep = ~keep
    footprint = ndimage.generate_binary_structure(3, 1)
    for _ in range(int(num_erosions)):
        keep = ndimage.binary_erosion(keep, footprint, border_value=1)
    return np.argwhere(keep).astype(np.int64)


def fill_empty(ctx: SeedContext) -> np.ndarray:
    """PolicyFillEmptySpace: maxima (min_distance 2, above 0.5) of the
    distance to the voxels of the starting segmentation (`init_segmentation`),
    ascending z,y,x. With no segmented voxel there is no distance to find a
    maximum of: no seeds."""
    empty = np.ones(ctx.image.shape, bool) if ctx.segmentation is None else ctx.segmentation == 0
    if empty.all():
        return np.zeros((0, 3), np.int64)
    dist = edt.edt(np.ascontiguousarray(empty, np.uint8)).astype(np.float32)
    return _sorted(seeds_lib.google_ffn_maxima(dist, 2, 0.5))


def invert_origins(ctx: SeedContext, segmentation_dir: str,
                   corner: Sequence[int] | None = None) -> np.ndarray:
    """PolicyInvertOrigins: the seeds of the objects of an earlier run of this
    subvolume (`ffnjax.gffn_output.load_origins` of `segmentation_dir` at
    `corner`, z,y,x, default the context's), highest id first."""
    from ffnjax.gffn_output import load_origins
    origins = load_origins(segmentation_dir, ctx.corner if corner is None else corner)
    return np.asarray([origins[k].start_zyx for k in sorted(origins, reverse=True)],
                      np.int64).reshape(-1, 3)


def sequence(ctx: SeedContext, policies: Sequence[Any]) -> np.ndarray:
    """SequentialPolicies: each [name, {args}] of `policies` in turn."""
    if isinstance(policies, (str, bytes)) or not isinstance(policies, Sequence):
        raise ValueError(f"seed policy 'sequence': policies must be a list of [name, {{args}}] "
                         f"pairs, got {policies!r}")
    found = []
    for entry in policies:
        if not (isinstance(entry, Sequence) and len(entry) == 2 and isinstance(entry[1], dict)):
            raise ValueError(f"seed policy 'sequence': each entry of policies must be "
                             f"[name, {{args}}], got {entry!r}")
        found.append(policy_seeds(str(entry[0]), entry[1], ctx))
    return np.concatenate(found) if found else np.zeros((0, 3), np.int64)


def reverse(ctx: SeedContext, policy_to_reverse: str, **policy_args: Any) -> np.ndarray:
    """ReverseCoords: `policy_to_reverse`'s seeds (with `policy_args`), last first."""
    return policy_seeds(policy_to_reverse, policy_args, ctx)[::-1]


POLICIES: dict[str, Callable[..., np.ndarray]] = {
    "peaks": peaks, "grid": grid, "peaks2d": peaks2d, "max": max_intensity, "grid2d": grid2d,
    "grid3d": grid3d, "dense": dense, "fill_empty": fill_empty,
    "invert_origins": invert_origins, "sequence": sequence, "reverse": reverse,
}


def check_args(name: str, args: dict[str, Any]) -> None:
    """Raises ValueError naming the policy and argument when `args` does not
    fit the policy `name` (either name): unknown or missing arguments."""
    policy = POLICIES[seed_policy_name(name)]
    params = list(inspect.signature(policy).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        known = [p.name for p in params if p.kind is not p.VAR_KEYWORD]
        unknown = []
    else:
        known = [p.name for p in params]
        unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(f"seed policy {name!r} takes no argument(s) {unknown}; its arguments: "
                         f"{known or 'none'}")
    missing = [p.name for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD
               and p.name not in args]
    if missing:
        raise ValueError(f"seed policy {name!r} needs argument(s) {missing} (seed_policy_args)")


def policy_seeds(name: str, args: dict[str, Any], ctx: SeedContext) -> np.ndarray:
    """The seeds of policy `name` (either name) with `args`, in its order,
    less those closer than `ctx.margin` to the border; (N, 3) int64 z,y,x."""
    check_args(name, args)
    found = np.asarray(POLICIES[seed_policy_name(name)](ctx, **args), np.int64).reshape(-1, 3)
    return found[seeds_lib.inside_margin(found, ctx.image.shape, ctx.margin)]


def options_args(options: InferenceOptions) -> dict[str, Any]:
    """`options.seed_policy_args` as a dict, checked against the policy."""
    args = json.loads(options.seed_policy_args) if options.seed_policy_args else {}
    check_args(options.seed_policy, args)
    return args


def make_seeds(ctx: SeedContext) -> np.ndarray:
    """The seeds of `ctx.options.seed_policy` with its args, in `seed_order`."""
    image = np.asarray(ctx.image)
    if image.ndim != 3 or image.size == 0:
        raise ValueError(f"image must be a non-empty z,y,x volume, got shape {image.shape}")
    for name in ("segmentation", "mask", "seed_mask"):
        arr = getattr(ctx, name)
        if arr is not None and np.shape(arr) != image.shape:
            raise ValueError(f"{name} has shape {np.shape(arr)}, the image {image.shape}")
    opts = ctx.options
    found = policy_seeds(opts.seed_policy, options_args(opts), ctx)
    if opts.seed_order == "zyx":
        return found
    # The policy's own order breaks ties (a reversed policy stays reversed among equals).
    return found[np.argsort(-ctx.edge_distance[tuple(found.T)], kind="stable")]
