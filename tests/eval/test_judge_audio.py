"""SpokenWordJudge: fitted on train-voice espeak-ng speech, it recognizes digit words from held-out voices, is at
chance on noise, and saves / loads without pickle."""

from __future__ import annotations

import time

import numpy as np
import pytest

from unimoe.data.tasks_audio import DIGIT_WORDS, TEST_VARIANTS, voice_split, voice_variant
from unimoe.eval.judge_audio import JudgeError, SpokenWordJudge, synthesize_examples


@pytest.fixture(scope="module")
def judge() -> SpokenWordJudge:
    start = time.perf_counter()
    judge = SpokenWordJudge(DIGIT_WORDS).fit(seed=0)
    assert time.perf_counter() - start < 30  # 3–6 s on a shared 2-core machine
    return judge


@pytest.fixture(scope="module")
def held_out() -> list[tuple[np.ndarray, int, int]]:
    return synthesize_examples(DIGIT_WORDS, seed=1, clips_per_voice=1, test_voices=True)


def test_held_out_voices_are_not_in_training():
    train, test = voice_split()
    assert {voice_variant(v) for v in test} == set(TEST_VARIANTS)
    assert not {voice_variant(v) for v in train} & set(TEST_VARIANTS)


def test_accuracy_on_held_out_voices(judge, held_out):
    waves, rates, labels = zip(*held_out)
    assert len(held_out) >= 10 * len(TEST_VARIANTS)
    assert judge.accuracy(list(waves), list(rates), list(labels)) >= 0.9
    # also resampled to 16 kHz, quieter, after 0.1 s of silence, in white noise at 20 dB SNR
    from unimoe.data.speech import resample

    rng = np.random.default_rng(0)
    noisy = []
    for w, r in zip(waves, rates):
        clip = np.concatenate([np.zeros(1600, np.float32), 0.2 * resample(w, r, 16000)])
        noise = rng.standard_normal(clip.size) * np.sqrt(np.mean(clip**2)) / 10
        noisy.append((clip + noise).astype(np.float32))
    assert judge.accuracy(noisy, 16000, [DIGIT_WORDS[i] for i in labels]) >= 0.9


def test_noise_is_at_chance(judge):
    rng = np.random.default_rng(0)
    noise = [rng.standard_normal(int(rng.integers(4000, 16000))).astype(np.float32) * 0.1 for _ in range(100)]
    labels = [i % 10 for i in range(100)]
    assert judge.accuracy(noise, 16000, labels) <= 0.25


def test_save_load_round_trip(judge, held_out, tmp_path):
    path = judge.save(tmp_path / "judge")
    assert path.suffix == ".npz"
    with np.load(path, allow_pickle=False) as data:  # plain arrays only
        assert set(data.files) == {"config", "mean", "scale", "coef", "intercept"}
    loaded = SpokenWordJudge.load(path)
    assert loaded.words == list(DIGIT_WORDS)
    waves, rates, _ = zip(*held_out[:20])
    np.testing.assert_allclose(loaded.predict_proba(waves, rates), judge.predict_proba(waves, rates), atol=1e-6)
    assert loaded.predict(waves, rates) == judge.predict(waves, rates)
    (tmp_path / "bad.npz").write_bytes(b"not a judge")
    with pytest.raises(JudgeError, match="not a SpokenWordJudge"):
        SpokenWordJudge.load(tmp_path / "bad.npz")


def test_fit_on_given_examples_and_errors():
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    examples = [((np.sin(2 * np.pi * f * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32), 16000, label)
                for label, f in ((0, 300.0), (1, 2500.0)) for _ in range(10)]  # fmt: skip
    judge = SpokenWordJudge(["low", "high"]).fit(examples)
    assert judge.predict_words([examples[0][0], examples[-1][0]], 16000) == ["low", "high"]
    with pytest.raises(JudgeError, match="not fitted"):
        SpokenWordJudge().predict([examples[0][0]], 16000)
    with pytest.raises(JudgeError, match="labels"):
        SpokenWordJudge(["a", "b"]).fit([(examples[0][0], 16000, 5)])
    with pytest.raises(JudgeError, match="distinct"):
        SpokenWordJudge(["a", "a"])


def test_mel_matches_torchaudio():
    import torch
    import torchaudio

    wave = np.random.default_rng(0).standard_normal(7000).astype(np.float32)
    judge = SpokenWordJudge(n_mels=40)
    reference = torchaudio.transforms.MelSpectrogram(16000, n_fft=400, hop_length=160, n_mels=40)(
        torch.from_numpy(wave)
    )
    np.testing.assert_allclose(judge.mel_spectrogram(wave), reference.numpy(), rtol=1e-4, atol=1e-4)
