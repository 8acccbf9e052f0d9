"""The training loop (`ffnjax.train_loop.train`): kill and resume, the NaN guard."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ffnjax import checkpoints
from ffnjax.checkpoints import load_checkpoint
from ffnjax.config import TrainConfig
from ffnjax.train_loop import train


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    config = TrainConfig.smoke(steps=6, log_every=3, checkpoint_every=100, image_every=100)
    first = train(config, tmp_path / "a", stop_at_step=3, progress=False)
    assert first["step"] == 3 and checkpoints.latest_step(tmp_path / "a") == 3
    resumed = train(config, tmp_path / "a", progress=False)
    straight = train(config, tmp_path / "b", progress=False)
    assert resumed["step"] == straight["step"] == 6
    cfg_a, params_a = load_checkpoint(tmp_path / "a")
    cfg_b, params_b = load_checkpoint(tmp_path / "b")
    assert cfg_a == cfg_b == config.model
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                           params_a, params_b)
    np.testing.assert_allclose(resumed["loss"], straight["loss"], rtol=1e-5)
    # The checkpoint's params are the training state's linen tree.
    assert set(params_a) == {"params"} and "conv0_a" in params_a["params"]
    meta = checkpoints.load_meta(tmp_path / "a")
    assert meta["examples_seen"] == 6 * config.batch_size and len(meta["sampler_states"]) == 1
    assert (tmp_path / "a" / "images" / "step_000006.png").is_file()
    assert any((tmp_path / "a" / "tensorboard").iterdir())


def test_nan_guard_names_the_step_range(tmp_path):
    # A vanishing stddev makes the normalised image infinite, so the loss is NaN.
    # Same step configuration as the resume test above: the compiled step is reused.
    config = TrainConfig.smoke(steps=6, log_every=2, checkpoint_every=100, image_every=100,
                               image_stddevs=(1e-45,))
    with pytest.raises(FloatingPointError, match=r"steps 1\.\.2"):
        train(config, tmp_path, progress=False)


def test_a_fine_tuning_run_is_validated_as_it_starts(tmp_path):
    from ffnjax.inputs import load_validation_batch
    from ffnjax.step import evaluate
    from ffnjax.synthetic import make_volume

    image, labels = make_volume((24, 48, 48), seed=3)
    np.save(tmp_path / "val_image.npy", image)
    np.save(tmp_path / "val_labels.npy", labels.astype(np.uint32))
    val = dict(val_images=(str(tmp_path / "val_image.npy"),),
               val_labels=(str(tmp_path / "val_labels.npy"),), val_examples=8, val_every=2)
    source = TrainConfig.smoke(steps=4, checkpoint_every=100, image_every=100, **val)
    first = train(source, tmp_path / "src", progress=False)
    assert "initial_val_loss" not in first and "val_loss" in first   # a new run: no step 0
    tuned = TrainConfig.smoke(steps=2, checkpoint_every=100, image_every=100,
                              init_from=str(tmp_path / "src"), learning_rate=1e-2, **val)
    out = train(tuned, tmp_path / "tuned", progress=False)
    _, params = load_checkpoint(tmp_path / "src")
    start = evaluate(params, load_validation_batch(tuned), tuned)
    np.testing.assert_allclose(out["initial_val_loss"], start["loss"], rtol=1e-5)
    assert out["val_loss"] != out["initial_val_loss"]    # validated again after training
