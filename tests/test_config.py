"""ModelConfig / InferenceOptions: defaults, JSON round trips, validation."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from ffnjax import InferenceOptions, ModelConfig, logit


def test_model_defaults_match_issue():
    cfg = ModelConfig()
    assert (cfg.depth, cfg.features) == (9, 32)
    assert cfg.fov_size == (17, 33, 33) and cfg.deltas == (4, 8, 8)
    assert cfg.compute_dtype == "float32"
    assert cfg.fov_radius == (8, 16, 16)


@pytest.mark.parametrize("cfg", [
    ModelConfig(),
    ModelConfig(depth=12, features=32, fov_size=(33, 33, 33), deltas=(8, 8, 8), compute_dtype="bfloat16"),
    ModelConfig(depth=1, features=4, fov_size=(9, 9, 9), deltas=(0, 2, 2), conv_impl="native"),
])
def test_model_json_round_trip(cfg):
    text = cfg.to_json()
    d = json.loads(text)
    assert d["fov_size"] == list(cfg.fov_size)  # plain JSON lists, not Python tuples
    back = ModelConfig.from_json(text)
    assert back == cfg and hash(back) == hash(cfg)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("opts", [
    InferenceOptions(),
    InferenceOptions(image_mean=140.0, image_stddev=30.5, move_threshold=0.8, min_boundary_dist=(0, 2, 2),
                     seed_policy="grid", seed_grid_step=(4, 8, 8), batch_size=8, consensus=True,
                     disconnected_seeds=False, max_steps=100),
])
def test_inference_json_round_trip(opts):
    back = InferenceOptions.from_json(opts.to_json())
    assert back == opts
    for f in dataclasses.fields(InferenceOptions):
        assert type(getattr(back, f.name)) is type(getattr(opts, f.name)), f.name


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().depth = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        InferenceOptions().pad_value = 0.1  # type: ignore[misc]


def test_string_and_list_triples_are_normalised():
    assert ModelConfig(fov_size="9,9,9", deltas=[2, 2, 2]).fov_size == (9, 9, 9)
    assert ModelConfig(fov_size=[9, 11, 13], deltas="2,2,2").deltas == (2, 2, 2)
    assert InferenceOptions(seed_grid_step="2,4,4").seed_grid_step == (2, 4, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(depth=0), "depth"),
    (dict(features=0), "features"),
    (dict(fov_size=(16, 33, 33)), "odd"),
    (dict(fov_size=(17, 33)), "fov_size"),
    (dict(fov_size="a,b,c"), "fov_size"),
    (dict(fov_size=(17, -33, 33)), "positive"),
    (dict(deltas=(9, 8, 8)), "deltas"),
    (dict(deltas=(-1, 8, 8)), "non-negative"),
    (dict(compute_dtype="float16"), "compute_dtype"),
    (dict(conv_impl="magic"), "conv_impl"),
])
def test_model_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(init_activation=1.0), "init_activation"),
    (dict(pad_value=0.0), "pad_value"),
    (dict(move_threshold=1.5), "move_threshold"),
    (dict(segment_threshold=-0.1), "segment_threshold"),
    (dict(image_stddev=0), "image_stddev"),
    (dict(seed_policy="random"), "seed_policy"),
    (dict(seed_grid_step=(0, 8, 8)), "seed_grid_step"),
    (dict(min_boundary_dist=(1, 1)), "min_boundary_dist"),
    (dict(batch_size=0), "batch_size"),
    (dict(min_segment_size=-1), "min_segment_size"),
])
def test_inference_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InferenceOptions(**kwargs)


@pytest.mark.parametrize("cls,text,match", [
    (ModelConfig, "{not json", "invalid JSON"),
    (ModelConfig, "[1, 2]", "JSON object"),
    (ModelConfig, '{"depth": 3, "fetaures": 8}', "fetaures"),
    (InferenceOptions, '{"move_treshold": 0.5}', "move_treshold"),
    (ModelConfig, '{"fov_size": [8, 8, 8]}', "odd"),
])
def test_from_json_errors(cls, text, match):
    with pytest.raises(ValueError, match=match):
        cls.from_json(text)


def test_logit():
    assert logit(0.5) == 0.0
    assert logit(0.95) == pytest.approx(math.log(19))
    assert logit(0.05) == pytest.approx(-logit(0.95))
    for p in (0.0, 1.0, -0.2, 2.0):
        with pytest.raises(ValueError, match="probability"):
            logit(p)
