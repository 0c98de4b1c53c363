"""DigitImageJudge: accurate on held-out real digits, chance on noise, deterministic, safe save/load."""

import time

import numpy as np
import pytest

from unimoe.data.tasks_vision import digit_png_image, digit_splits, load_digit_images
from unimoe.eval.judge_image import DigitImageJudge, image_features


@pytest.fixture(scope="module")
def judge():
    return DigitImageJudge.fit(seed=0)


@pytest.fixture(scope="module")
def held_out():
    """The suite's test digits (never seen by the judge), as the 32×32 PNG images the suite writes."""
    images, labels = load_digit_images()
    test = digit_splits(labels, 0)["test"]
    return [digit_png_image(images[i]) for i in test], labels[test].tolist(), images[test]


def test_fit_is_fast_and_deterministic(judge):
    DigitImageJudge.fit(seed=0)  # imports warm
    start = time.perf_counter()
    again = DigitImageJudge.fit(seed=0)
    assert time.perf_counter() - start < 2.0
    assert np.array_equal(again.support_vectors, judge.support_vectors)
    assert np.array_equal(again.dual_coef, judge.dual_coef)
    assert judge.meta["seed"] == 0 and judge.meta["n_train"] > 1000


def test_accuracy_on_held_out_real_digits(judge, held_out):
    pictures, labels, raw = held_out
    assert len(labels) > 300
    assert judge.accuracy(pictures, labels) >= 0.95
    # other sizes and array inputs read the same: 8×8 uint8 0..255, 64×64 float 0..1, CHW
    assert judge.accuracy([np.rint(x.astype(np.float64) * 255 / 16).astype(np.uint8) for x in raw], labels) >= 0.95
    big = [np.asarray(p.resize((64, 64)), dtype=np.float32) / 255.0 for p in pictures[:50]]
    assert judge.accuracy(big, labels[:50]) >= 0.9
    chw = [np.moveaxis(np.asarray(p), -1, 0) for p in pictures[:50]]
    assert judge.predict(chw) == judge.predict(pictures[:50])


def test_features_recover_sklearn_scale(held_out):
    pictures, _, raw = held_out
    feats = image_features(pictures[:20])
    assert feats.shape == (20, 64)
    assert np.abs(feats - raw[:20].reshape(20, 64)).max() < 0.05


def test_chance_on_noise(judge):
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(300)]
    assert judge.accuracy(noise, rng.integers(0, 10, 300).tolist()) < 0.3
    blank = [np.zeros((32, 32), dtype=np.uint8)] * 10
    assert judge.accuracy(blank, list(range(10))) < 0.3  # an empty canvas is not every digit


def test_matches_sklearn_svc(judge):
    """Our numpy one-vs-one vote reproduces sklearn's SVC predictions."""
    from sklearn.svm import SVC

    images, labels = load_digit_images()
    split = digit_splits(labels, 0)
    x = images[split["train"]].reshape(-1, 64) / 16.0
    svc = SVC(kernel="rbf", gamma="scale").fit(x, labels[split["train"]])
    rng = np.random.default_rng(1)
    probe = np.concatenate([images[split["test"]].reshape(-1, 64).astype(np.float64), rng.random((200, 64)) * 16])
    assert np.array_equal(judge.predict_features(probe), svc.predict(probe / 16.0))


def test_save_load_roundtrip(judge, held_out, tmp_path):
    pictures, _, _ = held_out
    path = judge.save(tmp_path / "judge.npz")
    with np.load(path, allow_pickle=False) as data:  # plain arrays only
        assert "support_vectors" in data.files
    loaded = DigitImageJudge.load(path)
    assert loaded.predict(pictures) == judge.predict(pictures)
    assert loaded.meta == judge.meta and loaded.gamma == judge.gamma
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a DigitImageJudge"):
        DigitImageJudge.load(tmp_path / "other.npz")


def test_mismatched_lengths(judge):
    with pytest.raises(ValueError):
        judge.accuracy([np.zeros((8, 8))], [1, 2])
    assert judge.predict([]) == []
