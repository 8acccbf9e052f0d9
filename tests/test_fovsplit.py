"""One FOV's forward pass split over host devices by z slabs (`ffnjax.fovsplit`):
equal to one device for the network, inside a fill and for a whole
segmentation, on 2 and 4 simulated devices; when 'auto' splits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from ffnjax import conv, fovsplit, nets
from ffnjax.config import InferenceOptions, ModelConfig
from ffnjax.testing import oracle_apply_fn

FFN12 = ModelConfig(depth=12, fov_size=(33, 33, 33), deltas=(8, 8, 8))
TINY = ModelConfig(depth=1, features=4, fov_size=(9, 9, 9), deltas=(2, 2, 2))


def test_split_devices_auto_on_off():
    cpus = ["d0", "d1", "d2", "d3"]
    auto = InferenceOptions()
    assert fovsplit.split_devices(FFN12, auto, cpus[:2], "cpu") == 2
    assert fovsplit.split_devices(FFN12, auto, cpus, "cpu") == 4
    assert fovsplit.split_devices(FFN12, auto, cpus[:1], "cpu") == 1
    assert fovsplit.split_devices(TINY, auto, cpus, "cpu") == 1          # too small to gain
    assert fovsplit.split_devices(TINY, InferenceOptions(fov_split="on"), cpus, "cpu") == 4
    assert fovsplit.split_devices(FFN12, InferenceOptions(fov_split="off"), cpus, "cpu") == 1
    assert fovsplit.split_devices(FFN12, InferenceOptions(batch_size=2), cpus, "cpu") == 1
    assert fovsplit.split_devices(FFN12, auto, cpus, "gpu") == 1
    thin = ModelConfig(depth=1, features=4, fov_size=(3, 9, 9), deltas=(1, 2, 2))
    assert fovsplit.split_devices(thin, InferenceOptions(fov_split="on"), cpus, "cpu") == 3
    with pytest.raises(ValueError, match="fov_split"):
        InferenceOptions(fov_split="z")


def test_a_run_resumes_whichever_way_it_splits():
    """fov_split is how, not what: resume checks leave it out (and so keep the
    fingerprints of runs saved before it existed)."""
    from ffnjax.segmentation import run_fingerprint
    on, off = InferenceOptions(fov_split="on"), InferenceOptions(fov_split="off")
    assert run_fingerprint((9, 9, 9), TINY, on) == run_fingerprint((9, 9, 9), TINY, off)
    assert "fov_split" not in run_fingerprint((9, 9, 9), TINY, on)
    assert on.result_dict() == off.result_dict() != InferenceOptions(batch_size=2).result_dict()


def test_blocks_run_in_parallel_leave_fovs_whole():
    """segment_volume turns 'auto' off when its blocks already fill the cores."""
    from ffnjax import dask_tasks
    assert dask_tasks.runs_in_parallel(None, 8, 2)
    assert not dask_tasks.runs_in_parallel(None, 8, 1)
    assert not dask_tasks.runs_in_parallel(None, 1, None)        # one block: one worker
    assert dask_tasks.runs_in_parallel("processes", 8, None)
    assert not dask_tasks.runs_in_parallel("sync", 8, None)


def test_only_the_convstack_is_splittable():
    assert fovsplit.splittable(nets.make_apply_fn(TINY))
    assert not fovsplit.splittable(oracle_apply_fn)
    with pytest.raises(ValueError, match="size and depth"):
        with conv.depth_parallel("z", 0, 3):
            pass


def test_unsplit_outside_a_mesh_is_unchanged():
    """Without the context, conv3d is the plain formulation (the refactored
    depth_split equals lax.conv); with one device the split is the identity."""
    import numpy as np
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 6, 7, 3))
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 3, 4)) / 9.0
    mesh = fovsplit.z_mesh(jax.local_devices()[:1])
    split = jax.jit(fovsplit.split_apply(lambda p, a, b: conv.conv3d(a, k, "depth_split") + b,
                                         mesh))(None, x, x[..., :1])
    want = conv.conv3d(x, k, "native") + x[..., :1]
    np.testing.assert_allclose(np.asarray(split), np.asarray(want), rtol=1e-4, atol=1e-4)


_SPLIT = r"""
import json, numpy as np, jax, jax.numpy as jnp
from ffnjax import cpu_kernel, flood, fovsplit, nets, segmentation
from ffnjax.config import InferenceOptions, ModelConfig
import tests.test_flood as t

n = jax.device_count()
out = {"devices": n, "forward": []}
rng = np.random.default_rng(0)
mesh = fovsplit.z_mesh(jax.local_devices())
for depth, feats, fov, dtype in [(2, 4, (9, 9, 9), "float32"),    # z = 9: slabs padded on 2 and 4
                                 (3, 8, (8 + 1, 11, 7), "bfloat16"),
                                 (2, 4, (5, 9, 7), "float32"),    # 4 devices: the last slab all padding
                                 (2, 16, (9, 9, 9), "float32")]:  # 16 features: the direct kernel
    cfg = ModelConfig(depth=depth, features=feats, fov_size=fov, deltas=(1, 1, 1), compute_dtype=dtype)
    p, f = nets.init_params(cfg, 0), nets.make_apply_fn(cfg)
    img, msk = (rng.normal(size=(2, *fov, 1)).astype("float32") for _ in range(2))
    a = np.asarray(jax.jit(f)(p, img, msk))
    split = jax.jit(fovsplit.split_apply(f, mesh))
    b = np.asarray(split(p, img, msk))
    out["forward"].append([dtype, float(np.abs(a - b).max() / np.abs(a).max())])
    if feats == 16:  # the split net calls the direct kernel where it is available
        out["direct"] = [cpu_kernel.available(), cpu_kernel.TARGET in split.lower(p, img, msk).as_text()]

# A fill with the split: a convstack whose output layer is pushed up so that it moves.
cfg = ModelConfig(depth=2, features=4, fov_size=(9, 9, 9), deltas=(2, 2, 2))
p = nets.init_params(cfg, 1)
p["params"]["conv_lom"]["bias"] = jnp.full((1,), 6.0)
img = t.cell_image((24, 28, 28))
fills = {}
split_calls = []                      # the fill itself must build the split network
_split_apply = fovsplit.split_apply
def _counted(*a, **k):
    split_calls.append(1)
    return _split_apply(*a, **k)
fovsplit.split_apply = _counted
for split in ("off", "on"):
    opt = InferenceOptions(fov_split=split)
    spec = flood.FillSpec.from_configs(img.shape, cfg, opt)
    mesh = flood.fill_devices(spec, flood.default_apply_fn(cfg))
    before = len(split_calls)
    prob, tr = flood.fill(img, (12, 14, 14), p, cfg, opt, with_trace=True)
    fills[split] = (prob, tr, 1 if mesh is None else int(mesh.devices.size), len(split_calls) - before)
fovsplit.split_apply = _split_apply
out["fill_devices"] = [fills["off"][2], fills["on"][2]]
out["split_built"] = [fills["off"][3], fills["on"][3]]
out["steps"] = [fills["off"][1]["steps"], fills["on"][1]["steps"]]
out["same_positions"] = bool(np.array_equal(fills["off"][1]["positions"], fills["on"][1]["positions"]))
out["prob_err"] = float(np.abs(fills["off"][0] - fills["on"][0]).max())

if n == 2:  # a whole segmentation, google/ffn's mode (skip_segmented and all)
    segs = {}
    for split in ("off", "on"):
        opt = InferenceOptions.google_ffn(fov_split=split, min_segment_size=20, seed_policy="grid",
                                          seed_grid_step=(6, 7, 7))
        seg, info = segmentation.segment(img, p, cfg, opt, progress=False)
        segs[split] = (seg, info.counters["fov_steps"], info.counters["committed"])
    out["segment_same"] = bool(np.array_equal(segs["off"][0], segs["on"][0]))
    out["segment_steps"] = [segs["off"][1], segs["on"][1]]
    out["segment_objects"] = segs["on"][2]
print(json.dumps(out))
"""


@pytest.mark.parametrize("devices", [2, 4])
def test_split_equals_one_device_in_the_net_the_fill_and_the_segmentation(devices):
    """On 2 and 4 host devices: the split network equals the unsplit one
    (float32 and bfloat16, slabs padded, a slab of padding only), a batch-1
    fill with the split evaluates the same FOVs in the same order with the
    same probabilities, and (2 devices) a google/ffn-mode segmentation is
    the same."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "FFNJAX_HOST_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    r = subprocess.run([sys.executable, "-c", _SPLIT], capture_output=True, text=True, env=env,
                       cwd=str(Path(__file__).resolve().parents[1]), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == devices
    for dtype, err in out["forward"]:
        assert err < (2e-2 if dtype == "bfloat16" else 1e-5), (dtype, err)
    assert out["direct"][1] == out["direct"][0]
    assert out["fill_devices"] == [1, devices]
    assert out["split_built"][0] == 0 and out["split_built"][1] >= 1, out["split_built"]
    assert out["steps"][0] == out["steps"][1] >= 8
    assert out["same_positions"]
    assert out["prob_err"] < 1e-5
    if devices == 2:
        assert out["segment_same"]
        assert out["segment_steps"][0] == out["segment_steps"][1] > 20
        assert out["segment_objects"] >= 2
