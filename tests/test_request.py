"""google/ffn's InferenceRequest files (`ffnjax.request`) and
`python -m experiments.segment --request`, plus --mask / --seed-mask /
--init-segmentation: the request maps to the options, model, masks and
outputs it names, and runs end to end on a small volume to the result of the
Python API given the same pieces."""

from __future__ import annotations

import dataclasses
import json

import h5py
import numpy as np
import pytest

from benchmarks import tf_reference
from conftest import shared_path
from experiments import _cli
from experiments import segment as cli
from ffnjax import gffn_output, request, segmentation
from ffnjax.checkpoints import save_model
from ffnjax.config import InferenceOptions, ModelConfig
from ffnjax.restrict import MaskChannel, MaskSource, Restriction
from ffnjax.tf_import import ffn_tensors_from_params
from ffnjax.volumes import open_volume
from test_flood import cell_image, moving_convstack

# google/ffn's convstack always has 32 features; depth 1 keeps it quick.
CFG = ModelConfig(depth=1, features=32, fov_size=(9, 9, 9), deltas=(2, 2, 2))
OPTIONS = """inference_options {
  init_activation: 0.95
  pad_value: 0.05
  move_threshold: 0.9
  min_boundary_dist { x: 1 y: 1 z: 1 }
  segment_threshold: 0.6
  min_segment_size: 20
}"""


def request_text(root, checkpoint, *extra, options=OPTIONS):
    return "\n".join([
        f'image {{ hdf5: "{root}/img.h5:raw" }}', "image_mean: 128", "image_stddev: 33",
        'seed_policy: "PolicyGrid3d"', 'seed_policy_args: "{\\"step\\": 4, \\"offsets\\": [4]}"',
        f'model_checkpoint_path: "{checkpoint}"', 'model_name: "convstack_3d.ConvStack3DFFNModel"',
        'model_args: "{\\"depth\\": 1, \\"fov_size\\": [9, 9, 9], \\"deltas\\": [2, 2, 2]}"',
        f'segmentation_output_dir: "{root}/out"', "checkpoint_interval: 0", options, *extra])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 32-feature depth-1 convstack whose fills move, as an ffnjax workdir and
    as a TensorFlow checkpoint; an image, a mask and labels as HDF5."""
    root = tmp_path_factory.mktemp("request")
    params = moving_convstack(CFG, key=1, kernel_scale=2.0)
    save_model(root / "ckpt", CFG, params)
    tf_reference.write_checkpoint(root / "model.ckpt-7", ffn_tensors_from_params(params))
    img = np.zeros((24, 32, 32), np.uint8)
    img[2:22, 2:30, 2:30] = cell_image()
    mask = np.zeros(img.shape, np.uint8)
    mask[:, :, 15:18] = 3
    labels = np.zeros(img.shape, np.uint32)
    labels[6:12, 6:14, 20:28] = 42
    with h5py.File(root / "img.h5", "w") as f:
        f["raw"], f["mask"], f["labels"] = img, mask, labels
    return root, params, img, mask, labels


def test_the_reference_request_gives_the_google_ffn_mode():
    req = request.read_request(shared_path("gffn_reference_fib25", "request.pbtxt"))
    assert req.options == InferenceOptions.google_ffn()
    assert req.model_config == ModelConfig(depth=12, features=32, fov_size=(33, 33, 33),
                                           deltas=(8, 8, 8))
    assert (req.image, req.output_dir, req.checkpoint) == (
        "crop.h5:raw", "out", "models/fib25/model.ckpt-27465036")
    published = request.read_request(
        shared_path("ffn_fib25_checkpoint", "inference_training_sample2.pbtxt"))
    assert published.options == req.options and published.checkpoint_interval == 1800
    assert published.image == "third_party/neuroproof_examples/training_sample2/grayscale_maps.h5:raw"


def test_request_fields_map_and_unknown_or_unsupported_ones_are_named():
    text = request_text("/d", "/m/ckpt", 'masks { volume { mask { hdf5: "/d/m.h5:m" } '
                        "channels { channel: 0 values: [1, 2] invert: true } } invert: true }",
                        'seed_masks { image { channels { min_value: 0 max_value: 10 } } }',
                        'init_segmentation { tensorstore: "{\\"driver\\": \\"zarr\\"}" }',
                        'shift_mask { hdf5: "/d/s.h5:s" } shift_mask_scale: 2 '
                        'shift_mask_threshold: 3 shift_mask_fov { start { x: -1 y: -2 z: 0 } '
                        'size { x: 3 y: 5 z: 1 } }',
                        options=OPTIONS.replace("20\n}", "20\n  disco_seed_threshold: -1\n}"))
    req = request.request_from_text(text)
    assert req.masks == (MaskSource("/d/m.h5:m", (MaskChannel(values=(1, 2), invert=True),),
                                    invert=True),)
    assert req.seed_masks == (MaskSource("", (MaskChannel(0, 0.0, 10.0),)),)
    assert req.init_segmentation == '{"driver": "zarr"}'
    assert (req.shift_mask, req.shift_mask_scale, req.shift_mask_threshold) == ("/d/s.h5:s", 2, 3)
    assert req.shift_mask_fov == ((0, -2, -1), (1, 5, 3))  # z,y,x
    o = req.options
    assert (o.seed_policy, json.loads(o.seed_policy_args)) == ("grid3d", {"offsets": [4],
                                                                          "step": 4})
    assert not o.disconnected_seeds and o.min_segment_size == 20
    assert req.model_config == dataclasses.replace(CFG, features=32)
    bad = {"bogus_field: 1": "no field named \"bogus_field\"",
           "inference_options { bogus: 1 }": "multiple \"inference_options\"",
           "self_prediction { threshold: 0.5 }": "self_prediction",
           'init_segmentation { volinfo: "x.volinfo" }': "init_segmentation.volinfo",
           'masks { coordinate_expression { expression: "z > 3" } }': "coordinate_expression",
           'movement_policy_name: "MyPolicy"': "MyPolicy"}
    for extra, message in bad.items():
        with pytest.raises(ValueError, match=message):
            request.request_from_text(request_text("/d", "/m/ckpt", extra), "r.pbtxt")
    with pytest.raises(ValueError, match=r"seed policy 'grid3d' takes no argument\(s\) \['stride'\]"):
        request.request_from_text(request_text("/d", "/m/ckpt").replace("step", "stride"))
    with pytest.raises(ValueError, match="consistency_threshold"):
        request.request_from_text(request_text("/d", "/m/ckpt", options=OPTIONS.replace(
            "20\n}", "20\n  consistency_threshold: 0.5\n}")))


def _args(path, *extra):
    """The parsed flags of a --request run, in the mode main() gives them."""
    args = cli.build_parser().parse_args(["--request", str(path), *extra])
    args.compat = "google_ffn"
    return args


def _run_request(path, *extra):
    return cli.main(["--request", str(path), "--quiet", *extra])


def _expected(root, params, img, options, **kw):
    seg, info = segmentation.segment(img, params, CFG, options, progress=False, **kw)
    return seg, info


@pytest.mark.parametrize("model", ["ckpt", "model.ckpt-7"])
def test_a_request_runs_end_to_end(setup, model):
    """An ffnjax workdir and a TensorFlow checkpoint imported on the fly give
    the same result, equal to the Python API's with the request's pieces."""
    root, params, img, mask, labels = setup
    out = root / "out"
    text = request_text(root, root / model, f'masks {{ volume {{ mask {{ hdf5: "{root}/img.h5:mask" '
                        "} channels { min_value: 1 max_value: 255 } } }",
                        f'init_segmentation {{ hdf5: "{root}/img.h5:labels" }}')
    path = root / f"request_{model}.pbtxt"
    path.write_text(text)
    summary = _run_request(path, "--overwrite")
    saved = out / "0" / "0" / "seg-0_0_0.npz"
    assert summary["output"] == str(saved)
    with np.load(saved) as z:
        seg, ids, zyx = z["segmentation"], z["origin_ids"], z["origin_zyx"]
        assert str(z["request"]) == text
    opts = request.read_request(path).options
    want, info = _expected(root, params, img, opts, init_segmentation=labels,
                           restriction=Restriction(mask=mask > 0))
    np.testing.assert_array_equal(seg, want)
    assert seg.dtype == np.uint8 and info.counters["committed"] >= 2
    assert np.all(seg[labels > 0] == 42) and ids.min() == 43
    np.testing.assert_array_equal(zyx, [o.seed for o in info.objects])
    with np.load(out / "0" / "0" / "seg-0_0_0.prob") as z:
        assert np.all((z["qprob"] > 0) == (seg > 0)) and np.all(z["qprob"][labels > 0] == 255)
    # The forward/reverse consensus of google/ffn: the same request, seeds inverted.
    inv = root / "inv.pbtxt"
    inv.write_text(text.replace('seed_policy: "PolicyGrid3d"', 'seed_policy: "PolicyInvertOrigins"')
                   .replace('\\"step\\": 4, \\"offsets\\": [4]', f'\\"segmentation_dir\\": \\"{out}\\"')
                   .replace(f'"{root}/out"', f'"{root}/out_inv"'))
    _run_request(inv, "--overwrite")
    # = the forward run's seeds, highest id first, through the Python API.
    fwd = gffn_output.load_origins(out, (0, 0, 0))
    inv_seeds = np.asarray([fwd[k].start_zyx for k in sorted(fwd, reverse=True)], np.int64)
    with np.load(root / "out_inv" / "0" / "0" / "seg-0_0_0.npz") as z:
        seg_inv, inv_zyx = z["segmentation"], z["origin_zyx"]
    want_inv, info_inv = _expected(root, params, img, opts, init_segmentation=labels,
                                   restriction=Restriction(mask=mask > 0), seeds=inv_seeds)
    np.testing.assert_array_equal(seg_inv, want_inv)
    np.testing.assert_array_equal(inv_zyx, [o.seed for o in info_inv.objects])
    assert tuple(inv_zyx[0]) == tuple(inv_seeds[0]) and len(inv_seeds) >= 2


def test_a_box_names_the_subvolume_and_flags_win(setup):
    root, params, img, _, _ = setup
    path = root / "plain.pbtxt"
    path.write_text(request_text(root, root / "ckpt"))
    _run_request(path, "--box", "2:22,2:30,2:30", "--min-segment-size", "40", "--overwrite")
    with np.load(root / "out" / "2" / "2" / "seg-2_2_2.npz") as z:
        seg = z["segmentation"]
    opts = dataclasses.replace(request.read_request(path).options, min_segment_size=40)
    # The command's own path: the request's options as the base, a flag over them.
    args = _args(path, "--move-threshold", "0.8", "--min-segment-size", "40")
    assert cli.options_from_args(args, cli.job_from_args(args).base) == \
        InferenceOptions.google_ffn(**{**opts.to_dict(), "move_threshold": 0.8})   # proto floats
    want, _ = _expected(root, params, img[2:22, 2:30, 2:30], opts)
    np.testing.assert_array_equal(seg, want)
    # A request sets no downsample: a model trained at a coarser scale keeps its own.
    facts = {"downsample": (2, 2, 2)}
    assert cli.options_from_args(_args(path), {**facts, **cli.job_from_args(_args(path)).base}
                                 ).downsample == (2, 2, 2)


def test_bad_requests_are_one_error_line_and_exit_2(setup, tmp_path, capsys):
    root = setup[0]
    cases = {"unknown.pbtxt": (request_text(root, root / "ckpt", "bogus: 3"), "bogus"),
             "noout.pbtxt": (request_text(root, root / "ckpt").replace(
                 f'segmentation_output_dir: "{root}/out"', ""), "segmentation_output_dir")}
    for name, (text, what) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit) as e:
            _cli.run(cli.main, ["--request", str(tmp_path / name), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and what in err[0] and name in err[0], err
    with pytest.raises(SystemExit) as e:
        _cli.run(cli.main, ["--request", str(tmp_path / "unknown.pbtxt"), "--output", "o.zarr"])
    assert e.value.code == 2 and "--output cannot be combined" in capsys.readouterr().err


def test_mask_and_init_segmentation_flags(setup, tmp_path):
    root, _, img, mask, labels = setup
    small = ModelConfig(depth=1, features=4, fov_size=(9, 9, 9), deltas=(2, 2, 2))
    params = moving_convstack(small)
    save_model(tmp_path / "small", small, params)
    np.save(tmp_path / "seedmask.npy", (np.arange(32) < 10)[None, :, None] * np.ones(img.shape))
    out = tmp_path / "seg.zarr"
    cli.main(["--checkpoint", str(tmp_path / "small"), "--image", f"{root}/img.h5:raw",
              "--output", str(out), "--mask", f"{root}/img.h5:mask", "--seed-mask",
              str(tmp_path / "seedmask.npy"), "--init-segmentation", f"{root}/img.h5:labels",
              "--seed-policy", "grid", "--seed-grid-step", "3,4,4", "--min-segment-size", "20",
              "--quiet"])
    seg = open_volume(str(out)).read()
    opts = InferenceOptions(seed_policy="grid", seed_grid_step=(3, 4, 4), min_segment_size=20)
    seed_mask = np.load(tmp_path / "seedmask.npy") > 0
    want, info = segmentation.segment(img, params, small, opts, progress=False,
                                      init_segmentation=labels,
                                      restriction=Restriction(mask=mask > 0, seed_mask=seed_mask))
    np.testing.assert_array_equal(seg, want)
    assert info.counters["skipped_masked"] > 0 and np.all(seg[labels > 0] == 42)

    # A box's segmentation (stored with the box's offset) continues in a second
    # run on the same box: it is read where it lies, not from its corner.
    box, first, second = (slice(4, 20), slice(2, 30), slice(3, 29)), tmp_path / "a.zarr", tmp_path / "b.zarr"
    base = ["--checkpoint", str(tmp_path / "small"), "--image", f"{root}/img.h5:raw", "--box",
            "4:20,2:30,3:29", "--seed-policy", "grid", "--min-segment-size", "20", "--quiet"]
    cli.main(base + ["--output", str(first), "--seed-grid-step", "4,6,6"])
    part = open_volume(str(first))
    assert part.offset == (4, 2, 3)
    cli.main(base + ["--output", str(second), "--init-segmentation", str(first),
                     "--seed-grid-step", "3,4,4"])
    want, _ = segmentation.segment(img[box], params, small, opts, progress=False,
                                   init_segmentation=part.read())
    np.testing.assert_array_equal(open_volume(str(second)).read(), want)
    with pytest.raises(SystemExit) as e:   # a box the init segmentation does not cover
        _cli.run(cli.main, base[:4] + ["--box", "0:20,2:30,3:29", "--output", str(tmp_path / "c.zarr"),
                                       "--init-segmentation", str(first), "--quiet"])
    assert e.value.code == 2
