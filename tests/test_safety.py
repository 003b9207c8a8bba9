"""The NSFW checker: the decision rule is diffusers', the thresholds are forced to test our wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pulid_flux.engine.download import MissingWeightsError
from pulid_flux.engine.safety import SafetyChecker


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    noise = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    return [Image.new("RGB", (64, 48), (200, 30, 30)), noise, Image.new("RGB", (33, 77), (10, 220, 90))]


def _is_black(image: Image.Image) -> bool:
    return not np.asarray(image).any()


@pytest.fixture(scope="module")
def checker() -> SafetyChecker:
    return SafetyChecker.random(seed=0)


@pytest.fixture(autouse=True)
def _restore_thresholds(checker):
    concept = checker.model.concept_embeds_weights.detach().clone()
    special = checker.model.special_care_embeds_weights.detach().clone()
    yield
    with torch.no_grad():
        checker.model.concept_embeds_weights.copy_(concept)
        checker.model.special_care_embeds_weights.copy_(special)


def _set_thresholds(checker, concept: float, special: float) -> None:
    with torch.no_grad():
        checker.model.concept_embeds_weights.fill_(concept)
        checker.model.special_care_embeds_weights.fill_(special)


def test_random_checker_is_deterministic_and_flags_nothing_by_default(checker):
    other = SafetyChecker.random(seed=0)
    for a, b in zip(checker.model.state_dict().values(), other.model.state_dict().values()):
        assert torch.equal(a, b)
    different = SafetyChecker.random(seed=1)
    assert not torch.equal(checker.model.concept_embeds, different.model.concept_embeds)

    images = _images()
    out, flags = checker.check(images)
    assert flags == [False, False, False]
    assert all(o is i for o, i in zip(out, images))


def test_everything_flagged_gives_black_images_of_the_same_size(checker):
    # A cosine similarity is >= -1, so a threshold of -2 makes every concept score positive.
    _set_thresholds(checker, concept=-2.0, special=5.0)
    images = _images()
    out, flags = checker.check(images)
    assert flags == [True, True, True]
    assert [o.size for o in out] == [i.size for i in images]
    assert [o.mode for o in out] == [i.mode for i in images]
    assert all(_is_black(o) for o in out)
    assert not any(_is_black(i) for i in images)  # the inputs are left alone


def test_nothing_flagged_keeps_images(checker):
    _set_thresholds(checker, concept=2.0, special=2.0)
    images = _images()
    out, flags = checker.check(images)
    assert flags == [False, False, False]
    for o, i in zip(out, images):
        assert np.array_equal(np.asarray(o), np.asarray(i))


def test_flags_follow_each_image(checker):
    images = _images()[:2]
    _, concept = checker.scores(images)
    # Put one concept's threshold halfway between the two images' similarities.
    idx = int(np.argmax(np.abs(concept[0] - concept[1])))
    assert abs(concept[0, idx] - concept[1, idx]) > 0.01  # random embeddings separate them
    _set_thresholds(checker, concept=5.0, special=5.0)
    with torch.no_grad():
        checker.model.concept_embeds_weights[idx] = float(concept[:, idx].mean())
    expected = [bool(concept[0, idx] > concept[1, idx]), bool(concept[1, idx] > concept[0, idx])]
    out, flags = checker.check(images)
    assert flags == expected
    assert [_is_black(o) for o in out] == expected


def test_special_care_makes_the_concept_check_stricter(checker):
    images = _images()[:1]
    special, concept = checker.scores(images)
    # Concept 0 sits just 0.005 below its threshold; a special-care hit adds 0.01.
    _set_thresholds(checker, concept=5.0, special=5.0)
    with torch.no_grad():
        checker.model.concept_embeds_weights[0] = float(concept[0, 0]) + 0.005
    assert checker.check(images)[1] == [False]
    with torch.no_grad():
        checker.model.special_care_embeds_weights[0] = float(special[0, 0]) - 0.5
    assert checker.check(images)[1] == [True]


def test_batches_larger_than_one_forward_pass(checker, monkeypatch):
    import pulid_flux.engine.safety as safety

    monkeypatch.setattr(safety, "CHECK_BATCH_SIZE", 2)
    _set_thresholds(checker, concept=-2.0, special=5.0)
    out, flags = checker.check(_images() * 2)
    assert flags == [True] * 6 and len(out) == 6
    assert checker.check([]) == ([], [])


def test_save_and_load_offline(checker, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _set_thresholds(checker, concept=-2.0, special=5.0)
    checker.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "preprocessor_config.json").is_file()

    loaded = SafetyChecker.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    for (name, a), b in zip(checker.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.processor.crop_size == checker.processor.crop_size
    images = _images()
    _, flags = loaded.check(images)
    assert flags == [True, True, True]
    assert np.allclose(loaded.scores(images)[1], checker.scores(images)[1], atol=1e-6)

    from pulid_flux.engine.safety import load_safety_checker

    assert load_safety_checker(tmp_path).check(images)[1] == [True, True, True]
    assert load_safety_checker(None, tiny=True).check(images)[1] == [False, False, False]
    with pytest.raises(ValueError):
        load_safety_checker(None)


def test_missing_directory_names_the_download_command(tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        SafetyChecker.from_pretrained(tmp_path / "safety-checker")
    message = str(info.value)
    assert str(tmp_path / "safety-checker" / "config.json") in message
    assert "pulid-flux download --dest" in message and "--only safety-checker" in message
