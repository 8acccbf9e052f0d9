"""Checkpoints carry the inference facts their model was trained with
(`ffnjax.checkpoints.inference_defaults`)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ffnjax import checkpoints
from ffnjax.config import InferenceOptions, ModelConfig, TrainConfig
from ffnjax.nets import init_params

CFG = ModelConfig(depth=1, features=4, fov_size=(9, 9, 9), deltas=(2, 2, 2))


@pytest.fixture(scope="module")
def params():
    p = jax.jit(lambda key: init_params(CFG, key))(jax.random.PRNGKey(0))
    return jax.tree_util.tree_map(np.asarray, p)


def test_save_model_records_the_facts_it_is_given(tmp_path, params):
    checkpoints.save_model(tmp_path / "a", CFG, params, inference=InferenceOptions(
        image_mean=140.0, image_stddev=20.0, init_activation=0.9, pad_value=0.1, max_steps=3))
    assert checkpoints.inference_defaults(tmp_path / "a") == dict(
        image_mean=140.0, image_stddev=20.0, init_activation=0.9, pad_value=0.1)
    checkpoints.save_model(tmp_path / "b", CFG, params, inference={"image_mean": 100})
    assert checkpoints.inference_defaults(tmp_path / "b") == {"image_mean": 100.0}
    # None recorded (an imported TF model): segmenters keep InferenceOptions' defaults.
    checkpoints.save_model(tmp_path / "c", CFG, params, meta={"provenance": {"x": 1}})
    assert checkpoints.inference_defaults(tmp_path / "c") == {}
    with pytest.raises(ValueError, match="move_threshold"):
        checkpoints.save_model(tmp_path / "d", CFG, params, inference={"move_threshold": 0.5})
    with pytest.raises(FileNotFoundError, match="nothing"):
        checkpoints.inference_defaults(tmp_path / "nothing")


def test_training_meta_gives_the_facts_old_runs_included():
    train = TrainConfig(seed_prob=0.9, pad_prob=0.2).to_dict()
    legacy = dict(train_config=train, image_means=[120.0, 7.0], image_stddevs=[30.0, 1.0])
    want = dict(image_mean=120.0, image_stddev=30.0, init_activation=0.9, pad_value=0.2)
    assert checkpoints.inference_facts(legacy) == want  # the first volume's, as validation
    assert checkpoints.save_args({}, CFG, legacy)["meta"].item["inference"] == want
    assert checkpoints.inference_facts({"provenance": {}}) == {}


def test_a_training_checkpoint_carries_its_normalisation(tmp_path):
    from ffnjax.train_loop import train

    config = TrainConfig.smoke(steps=1, checkpoint_every=1, image_every=1, log_every=1,
                               seed_prob=0.9, pad_prob=0.1, image_means=(130.0,),
                               image_stddevs=(30.0,))
    train(config, tmp_path / "run", progress=False)
    assert checkpoints.inference_defaults(tmp_path / "run") == dict(
        image_mean=130.0, image_stddev=30.0, init_activation=0.9, pad_value=0.1)
    assert checkpoints.load_meta(tmp_path / "run")["inference"]["image_mean"] == 130.0
