"""The augmentations of `ffnjax.augment`: each geometric one applied identically to image,
labels and weight (checked against transforming the whole volume), the section artefacts
changing only the image, and the sampler stream staying exactly resumable."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from scipy import ndimage

from ffnjax.augment import AugmentOptions, Deformation, Sections, rotation_matrix, sample
from ffnjax.config import TrainConfig
from ffnjax.examples import Augmentation, BalancedSampler, TrainingVolume, crop, make_example
from ffnjax.inputs import load_training_volumes, make_sampler


def _volume(shape, seed=4, block=3):
    """Blocky labels and an image that is a function of them plus a smooth ramp."""
    rng = np.random.default_rng(seed)
    labels = np.kron(rng.integers(1, 40, [s // block + 1 for s in shape]),
                     np.ones((block,) * 3, np.uint32))[:shape[0], :shape[1], :shape[2]]
    ramp = np.add.outer(np.add.outer(np.arange(shape[0]), np.arange(shape[1])), np.arange(shape[2]))
    image = ((labels * 11 + ramp) % 256).astype(np.uint8)
    return image, labels.astype(np.uint64) * (2**40)   # ids beyond float32's exact range


@pytest.mark.parametrize("axes,flips", [((0, 2, 1), (False, False, False)),
                                        ((2, 0, 1), (True, False, True)),
                                        ((1, 2, 0), (False, True, False))])
def test_axis_permutation_equals_cropping_the_permuted_volume(axes, flips):
    image, labels = _volume((21, 21, 21))
    vol = TrainingVolume(image, labels, mean=0.0, stddev=1.0)
    centre, size = (9, 10, 11), (7, 7, 7)
    ex = make_example(vol, centre, size, Augmentation(flips, axes=axes))
    t_img, t_lab, t_centre = image, labels, list(centre)
    for axis, f in enumerate(flips):
        if f:
            t_img, t_lab = np.flip(t_img, axis), np.flip(t_lab, axis)
            t_centre[axis] = image.shape[axis] - 1 - t_centre[axis]
    t_img, t_lab = np.transpose(t_img, axes), np.transpose(t_lab, axes)
    t_centre = [t_centre[a] for a in axes]
    np.testing.assert_array_equal(ex["labels"], crop(t_lab, t_centre, size)[0])
    np.testing.assert_array_equal(ex["image"], crop(t_img, t_centre, size)[0].astype(np.float32))


def _deformations():
    rng = np.random.default_rng(0)
    return {
        "rotation_2d": Deformation(rotation=rotation_matrix((1, 0, 0), math.radians(17))),
        "rotation_3d": Deformation(rotation=rotation_matrix((0.3, -1.0, 0.5), math.radians(11))),
        "elastic": Deformation(elastic=rng.normal(0, 2.0, (3, 3, 5, 5)), spacing=4.0),
        "misalign": Deformation(misalign=(2, 3, -2)),
        "all": Deformation(rotation=rotation_matrix((1, 0.2, 0), 0.2),
                           elastic=rng.normal(0, 1.5, (3, 3, 5, 5)), spacing=4.0,
                           misalign=(7, -4, 1)),
    }


@pytest.mark.parametrize("name", list(_deformations()))
def test_deformation_equals_resampling_the_whole_volume(name):
    deformation = _deformations()[name]
    image, labels = _volume((16, 30, 30))
    mask = np.zeros(labels.shape, bool)
    mask[:, :, 20:] = True
    vol = TrainingVolume(image, labels, mask=mask, mean=100.0, stddev=20.0)
    # Near a border: part of the needed context lies outside the volume.
    centre, size = (5, 12, 15), (9, 15, 15)
    ex = make_example(vol, centre, size, Augmentation(deformation=deformation))
    # Reference: the same coordinates, moved to volume coordinates, on the whole volume.
    coords = deformation.coordinates(size) + (np.asarray(centre) - np.asarray(size) // 2)[
        :, None, None, None]
    ref_img = ndimage.map_coordinates(image.astype(np.float64), coords, order=1,
                                      mode="grid-constant")   # the volume continued by zeros
    # Labels and weight: the nearest voxel, floor(c + 0.5); outside the volume 0.
    nearest = np.floor(coords + 0.5).astype(int)
    top = np.asarray(labels.shape)[:, None, None, None] - 1
    inside = np.all((nearest >= 0) & (nearest <= top), axis=0)
    at = tuple(np.clip(nearest, 0, top))
    ref_lab = np.where(inside, labels[at], 0)
    ref_w = np.where(inside, ~mask[at], False)
    # ... which is scipy's order-0 interpolation away from the border.
    far = np.all((coords >= 0.5) & (coords <= top - 0.5), axis=0)
    np.testing.assert_array_equal(ref_w[far], ndimage.map_coordinates(
        (~mask).astype(float), coords, order=0)[far] > 0.5)
    np.testing.assert_allclose(ex["image"] * 20.0 + 100.0, ref_img, atol=2e-3)
    np.testing.assert_array_equal(ex["labels"], ref_lab)
    assert ex["labels"].dtype == labels.dtype
    np.testing.assert_array_equal(ex["weight"], ref_w.astype(np.float32))
    assert 0 < ex["weight"].mean() < 1
    # The centre voxel keeps its label, so the target is the sampled object.
    c = tuple(s // 2 for s in size)
    assert ex["labels"][c] == labels[centre]
    np.testing.assert_array_equal(ex["target"] > 0.5, ex["labels"] == labels[centre])


def test_rotation_by_a_quarter_turn_about_z_is_rot90_of_the_crop():
    image, labels = _volume((9, 21, 21))
    vol = TrainingVolume(image, labels, mean=0.0, stddev=1.0)
    quarter = Deformation(rotation=rotation_matrix((1, 0, 0), math.pi / 2))
    ex = make_example(vol, (4, 10, 10), (5, 11, 11), Augmentation(deformation=quarter))
    plain = make_example(vol, (4, 10, 10), (5, 11, 11))
    np.testing.assert_array_equal(ex["labels"], np.rot90(plain["labels"], -1, axes=(1, 2)))
    np.testing.assert_allclose(ex["image"], np.rot90(plain["image"], -1, axes=(1, 2)), atol=1e-4)


def test_misalignment_shifts_the_sections_on_the_far_side_of_the_centre():
    image, labels = _volume((20, 30, 30))
    vol = TrainingVolume(image, labels, mean=0.0, stddev=1.0)
    centre, size = (10, 15, 15), (9, 11, 11)
    start = np.asarray(centre) - np.asarray(size) // 2
    for z0, side in ((6, range(6, 9)), (3, range(0, 3))):       # centre section is 4
        shift = Deformation(misalign=(z0, 2, -3))
        ex = make_example(vol, centre, size, Augmentation(deformation=shift))
        for z in range(9):
            dy, dx = (2, -3) if z in side else (0, 0)
            zz, ys, xs = start[0] + z, start[1] + dy, start[2] + dx
            want = labels[zz, ys:ys + 11, xs:xs + 11]
            np.testing.assert_array_equal(ex["labels"][z], want, err_msg=f"z0 {z0} z {z}")
            np.testing.assert_allclose(ex["image"][z], image[zz, ys:ys + 11, xs:xs + 11], atol=1e-3)


@pytest.mark.parametrize("sections", [Sections(missing=2), Sections(blurred=5, blur_sigma=1.5),
                                      Sections(missing=0, blurred=6)])
def test_section_artefacts_change_only_the_chosen_image_sections(sections):
    image, labels = _volume((16, 24, 24))
    mask = np.zeros(labels.shape, bool)
    mask[3] = True
    vol = TrainingVolume(image, labels, mask=mask, mean=50.0, stddev=10.0)
    aug = Augmentation((True, False, True), transpose_yx=True, contrast=1.2, brightness=0.1)
    plain = make_example(vol, (8, 12, 12), (7, 11, 11), aug)
    ex = make_example(vol, (8, 12, 12), (7, 11, 11), dataclasses.replace(aug, sections=sections))
    for k in ("labels", "target", "weight"):
        np.testing.assert_array_equal(ex[k], plain[k])
    # The artefacts act on the volume's own sections, before the z reflection.
    raw = crop(image, (8, 12, 12), (7, 11, 11))[0].astype(np.float32)
    changed = {s for s in (sections.missing, sections.blurred) if s >= 0}
    to_out = lambda z: 6 - z                      # noqa: E731  (z is reflected)
    for z in range(7):
        same = np.array_equal(ex["image"][to_out(z)], plain["image"][to_out(z)])
        assert same == (z not in changed), z
    norm = lambda a: np.swapaxes(((a - 50.0) / 10.0 * 1.2 + 0.1)[:, ::-1], 0, 1)  # noqa: E731
    if sections.blurred >= 0:
        want = ndimage.gaussian_filter(raw[sections.blurred], sections.blur_sigma, mode="reflect")
        np.testing.assert_allclose(ex["image"][to_out(sections.blurred)], norm(want), rtol=1e-5)
    if sections.missing >= 0:
        section = ex["image"][to_out(sections.missing)]
        assert np.ptp(section) < 1e-5 and abs(np.ptp(raw[sections.missing])) > 10


ALL_ON = AugmentOptions(permute_axes=True, elastic_alpha=2.0, elastic_sigma=4.0,
                        rotation_degrees=15.0, rotation_3d=True, misalign_prob=0.5, misalign_max=3,
                        missing_section_prob=0.5, out_of_focus_prob=0.5, out_of_focus_sigma=1.5)


def test_sample_draws_each_option_and_nothing_when_all_are_off():
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    axes, deformation, sections = sample(rng, AugmentOptions(), (9, 9, 9))
    assert (axes, deformation, sections) == ((0, 1, 2), None, None)
    assert rng.bit_generator.state == state
    seen = {"axes": set(), "misalign": 0, "missing": 0, "blurred": 0}
    for _ in range(60):
        axes, deformation, sections = sample(rng, ALL_ON, (9, 9, 9))
        seen["axes"].add(axes)
        assert deformation is not None and deformation.elastic.shape == (3, 3, 3, 3)
        assert np.allclose(deformation.rotation @ deformation.rotation.T, np.eye(3))
        seen["misalign"] += deformation.misalign is not None
        seen["missing"] += sections is not None and sections.missing >= 0
        seen["blurred"] += sections is not None and sections.blurred >= 0
        coords = deformation.coordinates((9, 9, 9))
        np.testing.assert_allclose(coords[:, 4, 4, 4], 4.0, atol=1e-9)   # the centre stays put
    assert seen["axes"] == set(itertools.permutations(range(3)))
    assert all(10 < seen[k] < 50 for k in ("misalign", "missing", "blurred")), seen


def test_elastic_displacement_is_smooth_and_of_the_asked_size():
    rng = np.random.default_rng(1)
    _, deformation, _ = sample(rng, AugmentOptions(elastic_alpha=3.0, elastic_sigma=6.0),
                               (25, 25, 25))
    shift = deformation.coordinates((25, 25, 25)) - np.indices((25, 25, 25))
    assert 0.5 < np.abs(shift).mean() < 6.0
    steps = [np.abs(np.diff(shift, axis=a)).max() for a in (1, 2, 3)]
    assert max(steps) < 0.2 * np.abs(shift).max(), steps      # neighbours move together


def _sampler(volumes, **kw):
    return BalancedSampler(volumes, (9, 9, 9), (6, 6, 6), min_size=20, seed=3, **kw)


def test_sampler_with_every_augmentation_resumes_exactly_and_off_changes_nothing():
    volumes = load_training_volumes(TrainConfig.smoke(min_object_size=20))
    sampler = _sampler(volumes, extra=ALL_ON)
    sampler.batch(3)
    state = sampler.get_state()
    first = sampler.batch(4)
    sampler.set_state(state)
    again = sampler.batch(4)
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    # Every option off draws the same stream as a sampler without them.
    a, b = _sampler(volumes).batch(4), _sampler(volumes, extra=AugmentOptions()).batch(4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_permutation_needs_a_cubic_crop_and_the_config_passes_options_through():
    with pytest.raises(ValueError, match="cubic"):
        TrainConfig(permute_axes=True)            # crop 25,49,49
    config = TrainConfig.smoke(min_object_size=20, permute_axes=True, elastic_alpha=1.0,
                               out_of_focus_prob=0.3)
    sampler = make_sampler(config, load_training_volumes(config))
    assert sampler.extra == AugmentOptions(permute_axes=True, elastic_alpha=1.0,
                                           out_of_focus_prob=0.3)
    with pytest.raises(ValueError, match="cubic"):
        BalancedSampler(load_training_volumes(config), (9, 11, 11), (4, 5, 5), min_size=20,
                        extra=AugmentOptions(permute_axes=True))
