"""``SpokenWordJudge``: a reference classifier that judges generated spoken words.

It is trained on *real* espeak-ng speech of the training voices only (the held-out test voices of
:mod:`unimoe.data.tasks_audio` are never seen), so its accuracy on held-out voices says how well it recognizes a word
from an unfamiliar speaker. A generation model's score on ``gen_speech_words`` is the fraction of its generated clips
the judge classifies as the requested word.

Features (per clip, at 16 kHz): the waveform is peak-normalized; its 48-band log-mel spectrogram (25 ms windows,
10 ms hop; torchaudio's mel filters) is floored 30 dB below its maximum (background noise disappears under the
floor), cut to the speech (frames 10 dB above the noise floor, the 10th-percentile frame energy, and within 40 dB of
the loudest frame), mean-normalized, and summarized as its per-band mean and standard deviation, a coarse
spectrogram resampled to 12 time steps, and the log speech duration. Classifier: standardized features →
multinomial logistic regression. ``save`` / ``load`` use an ``.npz`` of plain arrays plus a JSON config (no pickle).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from unimoe.errors import UniMoEError

SAMPLE_RATE = 16000
N_FFT, HOP = 400, 160  # 25 ms windows, 10 ms hop
FORMAT_VERSION = 1


class JudgeError(UniMoEError, ValueError):
    """A judge used before fitting, a bad checkpoint file, or inputs that do not fit together."""


class SpokenWordJudge:
    """Which of ``words`` is spoken? ``fit`` → ``predict`` / ``accuracy`` / ``save`` / ``load``."""

    def __init__(self, words: Sequence[str] | None = None, *, n_mels: int = 48, n_steps: int = 12,
                 floor_db: float = 40.0, range_db: float = 30.0, C: float = 0.5):  # fmt: skip
        from unimoe.data.tasks_audio import DIGIT_WORDS

        self.words = list(words) if words is not None else list(DIGIT_WORDS)
        if len(self.words) < 2 or len(set(self.words)) != len(self.words):
            raise JudgeError(f"SpokenWordJudge: words must be at least two distinct words, got {self.words}")
        if not 16 <= n_mels <= 128 or not 2 <= n_steps <= 64:
            raise JudgeError(f"SpokenWordJudge: n_mels must be 16–128 and n_steps 2–64, got {n_mels}, {n_steps}")
        self.n_mels, self.n_steps, self.C = int(n_mels), int(n_steps), float(C)
        self.floor_db, self.range_db = float(floor_db), float(range_db)
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.coef: np.ndarray | None = None  # (n_words, n_features)
        self.intercept: np.ndarray | None = None  # (n_words,)
        self._mel = None

    # -- features ---------------------------------------------------------------------------------------------

    def mel_spectrogram(self, wave: np.ndarray) -> np.ndarray:
        """``(n_mels, frames)`` power mel spectrogram of a 16 kHz waveform: the same numbers as
        ``torchaudio.transforms.MelSpectrogram(16000, n_fft=400, hop_length=160, n_mels=n_mels)`` (centered, reflect
        padding, Hann window, HTK mel scale), computed with numpy: ~50× faster than torch for short clips on a busy
        2-core machine, where torch's two intra-op threads contend."""
        if self._mel is None:
            import torchaudio

            fbank = torchaudio.functional.melscale_fbanks(
                N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, self.n_mels, SAMPLE_RATE
            )
            self._mel = (fbank.numpy().astype(np.float64), torch.hann_window(N_FFT, dtype=torch.float64).numpy())
        fbank, window = self._mel
        padded = np.pad(wave.astype(np.float64), (N_FFT // 2, N_FFT // 2), mode="reflect")
        n_frames = 1 + (padded.size - N_FFT) // HOP
        frames = np.lib.stride_tricks.as_strided(padded, (n_frames, N_FFT), (padded.strides[0] * HOP,
                                                                             padded.strides[0]))  # fmt: skip
        power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # (frames, n_fft / 2 + 1)
        return (power @ fbank).T  # (n_mels, frames)

    def feature(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """One clip → a fixed-length feature vector ``(2 * n_mels + n_mels * n_steps + 1,)``."""
        from unimoe.data.speech import resample

        wave = np.asarray(waveform, dtype=np.float32).reshape(-1)
        if wave.size == 0 or not np.isfinite(wave).all():
            raise JudgeError("SpokenWordJudge: a waveform is empty or has NaN / infinite samples")
        wave = resample(wave, int(sample_rate), SAMPLE_RATE)
        if wave.size < N_FFT:
            wave = np.pad(wave, (0, N_FFT - wave.size))
        wave = wave / max(float(np.abs(wave).max()), 1e-6)
        mel = self.mel_spectrogram(wave)  # (n_mels, T)
        logmel = 10.0 * np.log10(mel + 1e-10)
        logmel = np.maximum(logmel, logmel.max() - self.range_db)  # hides background noise below the speech
        energy = logmel.max(axis=0)  # (T,)
        # speech activity: within floor_db of the loudest frame and 10 dB above the noise floor (10th percentile)
        threshold = max(energy.max() - self.floor_db, np.percentile(energy, 10) + 10.0)
        active = np.flatnonzero(energy >= min(threshold, energy.max()))
        logmel = logmel[:, active[0] : active[-1] + 1]  # (n_mels, T')
        logmel = logmel - logmel.mean(axis=1, keepdims=True).mean()  # loudness-invariant
        frames = logmel.shape[1]
        positions = np.linspace(0, frames - 1, self.n_steps)
        coarse = np.stack([np.interp(positions, np.arange(frames), band) for band in logmel])  # (n_mels, n_steps)
        return np.concatenate([logmel.mean(axis=1), logmel.std(axis=1), coarse.reshape(-1),
                               [np.log(frames)]]).astype(np.float32)  # fmt: skip

    def features(self, waveforms: Sequence[np.ndarray], sample_rates: int | Sequence[int]) -> np.ndarray:
        rates = [sample_rates] * len(waveforms) if isinstance(sample_rates, (int, np.integer)) else list(sample_rates)
        if len(rates) != len(waveforms):
            raise JudgeError(f"SpokenWordJudge: {len(waveforms)} waveforms but {len(rates)} sample rates")
        if not len(waveforms):
            return np.zeros((0, 2 * self.n_mels + self.n_mels * self.n_steps + 1), np.float32)
        return np.stack([self.feature(w, r) for w, r in zip(waveforms, rates)])

    # -- fitting ----------------------------------------------------------------------------------------------

    def fit(self, examples: Sequence[tuple[np.ndarray, int, int]] | None = None, *,
            words: Sequence[str] | None = None, seed: int = 0, clips_per_voice: int = 2,
            voices: Sequence[str] | None = None) -> SpokenWordJudge:  # fmt: skip
        """Fit on ``examples`` = ``[(waveform, sample_rate, label), ...]``, or (when None) on clips it synthesizes
        with espeak-ng: every word × every train voice × ``clips_per_voice`` random rates / pitches."""
        if words is not None:
            self.__init__(
                words,
                n_mels=self.n_mels,
                n_steps=self.n_steps,
                floor_db=self.floor_db,
                range_db=self.range_db,
                C=self.C,
            )
        if examples is None:
            examples = synthesize_examples(self.words, seed=seed, clips_per_voice=clips_per_voice, voices=voices)
        labels = np.asarray([label for _, _, label in examples], dtype=np.int64)
        if labels.size == 0 or labels.min() < 0 or labels.max() >= len(self.words):
            raise JudgeError(f"SpokenWordJudge.fit: labels must index words (0..{len(self.words) - 1})")
        if len(np.unique(labels)) < 2:
            raise JudgeError("SpokenWordJudge.fit: examples of at least two words are needed")
        x = self.features([w for w, _, _ in examples], [r for _, r, _ in examples])
        from sklearn.linear_model import LogisticRegression

        self.mean = x.mean(axis=0)
        self.scale = x.std(axis=0) + 1e-6
        model = LogisticRegression(C=self.C, max_iter=2000, random_state=seed)
        model.fit((x - self.mean) / self.scale, labels)
        coef = np.zeros((len(self.words), x.shape[1]), np.float64)
        intercept = np.full(len(self.words), -1e9)  # a word with no examples is never predicted
        if len(model.classes_) == 2:  # sklearn's binary form: one row for class 1
            coef[model.classes_[1]], intercept[model.classes_[1]] = model.coef_[0], model.intercept_[0]
            coef[model.classes_[0]], intercept[model.classes_[0]] = 0.0, 0.0
        else:
            coef[model.classes_], intercept[model.classes_] = model.coef_, model.intercept_
        self.coef, self.intercept = coef, intercept
        return self

    # -- prediction -------------------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if self.coef is None:
            raise JudgeError("SpokenWordJudge is not fitted: call fit(...) or SpokenWordJudge.load(path)")

    def predict_proba(self, waveforms: Sequence[np.ndarray], sample_rates: int | Sequence[int]) -> np.ndarray:
        self._check_fitted()
        x = (self.features(waveforms, sample_rates) - self.mean) / self.scale
        logits = x @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, waveforms: Sequence[np.ndarray], sample_rates: int | Sequence[int]) -> list[int]:
        """The index (into ``words``) of the word each clip most likely says."""
        return [int(i) for i in self.predict_proba(waveforms, sample_rates).argmax(axis=1)]

    def predict_words(self, waveforms: Sequence[np.ndarray], sample_rates: int | Sequence[int]) -> list[str]:
        return [self.words[i] for i in self.predict(waveforms, sample_rates)]

    def accuracy(self, waveforms: Sequence[np.ndarray], sample_rates: int | Sequence[int],
                 labels: Sequence[int | str]) -> float:  # fmt: skip
        """Fraction of clips judged to say their label (an index into ``words`` or the word itself)."""
        if len(labels) != len(waveforms):
            raise JudgeError(f"SpokenWordJudge.accuracy: {len(waveforms)} waveforms but {len(labels)} labels")
        if not labels:
            return 0.0
        index = {w: i for i, w in enumerate(self.words)}
        targets = [index.get(label, -1) if isinstance(label, str) else int(label) for label in labels]
        predictions = self.predict(waveforms, sample_rates)
        return float(np.mean([p == t for p, t in zip(predictions, targets)]))

    # -- persistence ------------------------------------------------------------------------------------------

    def config(self) -> dict:
        return {"format": FORMAT_VERSION, "words": self.words, "n_mels": self.n_mels, "n_steps": self.n_steps,
                "floor_db": self.floor_db, "range_db": self.range_db, "C": self.C,
                "sample_rate": SAMPLE_RATE}  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """An ``.npz`` with the arrays and the config as a JSON string (loads with ``allow_pickle=False``)."""
        self._check_fitted()
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, config=np.array(json.dumps(self.config())), mean=self.mean, scale=self.scale, coef=self.coef,
                 intercept=self.intercept)  # fmt: skip
        return path

    @classmethod
    def load(cls, path: str | Path) -> SpokenWordJudge:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                config = json.loads(str(data["config"]))
                arrays = {k: data[k] for k in ("mean", "scale", "coef", "intercept")}
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            raise JudgeError(f"{path}: not a SpokenWordJudge file ({err})") from None
        if config.get("format") != FORMAT_VERSION:
            raise JudgeError(f"{path}: judge format {config.get('format')!r}, expected {FORMAT_VERSION}")
        judge = cls(config["words"], n_mels=config["n_mels"], n_steps=config["n_steps"], floor_db=config["floor_db"],
                    range_db=config["range_db"], C=config["C"])  # fmt: skip
        n_features = 2 * judge.n_mels + judge.n_mels * judge.n_steps + 1
        if arrays["coef"].shape != (len(judge.words), n_features) or arrays["mean"].shape != (n_features,):
            raise JudgeError(f"{path}: array shapes do not match the config")
        judge.mean, judge.scale, judge.coef, judge.intercept = (arrays[k] for k in ("mean", "scale", "coef",
                                                                                    "intercept"))  # fmt: skip
        return judge


def synthesize_examples(words: Sequence[str], *, seed: int = 0, clips_per_voice: int = 2,
                        voices: Sequence[str] | None = None, test_voices: bool = False,
                        fresh_process: bool = True) -> list[tuple[np.ndarray, int, int]]:  # fmt: skip
    """``[(waveform, sample_rate, label)]``: every word × voice × ``clips_per_voice`` random rate / pitch settings,
    spoken by espeak-ng. ``voices`` defaults to the train voices of :mod:`unimoe.data.tasks_audio` (the held-out
    test voices with ``test_voices=True``)."""
    import random

    from unimoe.data.speech import EspeakSynth, SynthRequest, synth_batch
    from unimoe.data.tasks_audio import voice_split

    if voices is None:
        train_voices, held_out = voice_split()
        voices = held_out if test_voices else train_voices
    rng = random.Random(f"judge/{seed}/{int(test_voices)}")
    plan = []
    for label, word in enumerate(words):
        for voice in voices:
            for _ in range(clips_per_voice):
                request = SynthRequest(word, voice, rate=rng.randint(120, 230), pitch=rng.randint(20, 80),
                                       pitch_range=rng.randint(20, 80), seed=rng.randrange(2**31))  # fmt: skip
                plan.append((label, request))
    waves = synth_batch([r for _, r in plan], fresh_process=fresh_process)
    rate = EspeakSynth().sample_rate
    return [(wave, rate, label) for (label, _), wave in zip(plan, waves, strict=True)]
