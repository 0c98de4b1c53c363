"""Audio tasks from real synthesized speech (espeak-ng, see :mod:`unimoe.data.speech`).

- ``speech_words``: which of :data:`SPEECH_WORDS` (the ten digit words + ten short command words) is spoken.
- ``speech_asr``: transcribe a 2–4 word phrase from a small grammar (:func:`asr_phrase`); scored by WER.
- ``gen_speech_words``: "Say the word seven." → the word written, then spoken (a text part, then the audio part
  the head generates; judged by :class:`unimoe.eval.judge_audio.SpokenWordJudge`). Writing the word first is a
  text-guided ("inner monologue") generation: trained with the audio alone the model's query states barely
  depended on the word (judge accuracy 0.12, chance 0.10, after 1,200 steps with ``text_qa``); with the word first,
  0.66.

A *voice* is an English accent × a speaker variant (``en-gb-scotland+m3``). Whole speaker variants are held out:
test clips use only :data:`TEST_VARIANTS` (in every accent), train and validation clips only the others, so a test
voice never appears in training. Each clip draws its own speaking rate, pitch, pitch range, loudness, leading
silence and (for half of the recognition clips) white noise at 15–35 dB SNR. Clips are 16 kHz mono 16-bit WAV,
trimmed to the speech (words ~0.4–0.9 s, phrases ≤ ~2.3 s, so one 2 s Whisper window covers nearly all).

Builds are bit-deterministic: all clips of a task are rendered by one fresh espeak-ng process in a fixed order
(:func:`unimoe.data.speech.synth_batch`), and every random choice comes from the seed.
"""

from __future__ import annotations

import random
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unimoe.data.build import TaskCard, register_builder
from unimoe.data.records import assistant, user_text, write_jsonl
from unimoe.data.speech import (
    DEFAULT_VARIANTS,
    ENGLISH_BASES,
    EspeakSynth,
    SynthRequest,
    resample,
    synth_batch,
    trim_silence,
)

SAMPLE_RATE = 16000
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMAND_WORDS = ("yes", "no", "up", "down", "left", "right", "stop", "go", "red", "blue")
SPEECH_WORDS = DIGIT_WORDS + COMMAND_WORDS

# Held-out speakers (two male, one female): test voices are these variants in every accent.
TEST_VARIANTS = ("m3", "m6", "f2")
TRAIN_VARIANTS = tuple(v for v in DEFAULT_VARIANTS if v not in TEST_VARIANTS)

# speech_asr grammar
COLOURS = ("red", "green", "blue", "yellow", "black", "white")
NOUNS = ("cat", "dog", "house", "car", "tree", "ball", "book", "fish", "bird", "box")
DIRECTIONS = ("left", "right", "up", "down")
VERBS = ("find", "take", "open", "show")

GEN_PROMPTS = (
    "Say the word {w}.",
    "Speak the word {w}.",
    "Please say {w}.",
    "Pronounce the word {w}.",
    "Say {w} out loud.",
    "Read this word aloud: {w}.",
    "Can you say {w}?",
    "Say: {w}",
    "Let me hear you say {w}.",
    "Speak the number {w}.",
)
SOURCE = "espeak-ng speech synthesis (the espeakng-loader wheel's libespeak-ng and voice data)"
LICENSE = "records CC0 (generated); espeak-ng is GPL-3.0-or-later, its synthesized output is not covered"


def voice_split(synth: EspeakSynth | None = None) -> tuple[list[str], list[str]]:
    """``(train_voices, test_voices)``: every available English accent × the train / held-out variants."""
    synth = synth or EspeakSynth()
    return synth.voices(ENGLISH_BASES, TRAIN_VARIANTS), synth.voices(ENGLISH_BASES, TEST_VARIANTS)


def voice_variant(voice: str) -> str:
    return voice.rsplit("+", 1)[-1]


def asr_phrase(rng: random.Random) -> tuple[str, str]:
    """``(template, transcript)`` of a 2–4 word phrase."""
    kind = rng.choices(["colour_noun", "the_colour_noun", "verb_the_noun", "turn", "go", "digits"],
                       weights=[2, 1, 2, 1, 1, 3])[0]  # fmt: skip
    if kind == "colour_noun":
        words = [rng.choice(COLOURS), rng.choice(NOUNS)]
    elif kind == "the_colour_noun":
        words = ["the", rng.choice(COLOURS), rng.choice(NOUNS)]
    elif kind == "verb_the_noun":
        words = [rng.choice(VERBS), "the", *([rng.choice(COLOURS)] if rng.random() < 0.5 else []), rng.choice(NOUNS)]
    elif kind == "turn":
        words = ["turn", rng.choice(DIRECTIONS), "now"]
    elif kind == "go":
        words = ["go", rng.choice(DIRECTIONS), *([rng.choice(DIGIT_WORDS[1:])] if rng.random() < 0.5 else [])]
    else:
        words = [rng.choice(DIGIT_WORDS) for _ in range(rng.randint(2, 4))]
    return kind, " ".join(words)


# -- rendering --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    """One WAV to write: what espeak-ng says and how it is post-processed."""

    path: str  # relative to the task directory
    request: SynthRequest
    peak: float  # peak amplitude after normalization
    lead_s: float  # leading silence
    snr_db: float | None  # white noise, or None


def plan_clip(rng: random.Random, path: str, text: str, voice: str, *, rate: tuple[int, int],
              noise: bool) -> Clip:  # fmt: skip
    request = SynthRequest(text, voice, rate=rng.randint(*rate), pitch=rng.randint(20, 80),
                           pitch_range=rng.randint(20, 80), seed=rng.randrange(2**31))  # fmt: skip
    snr = round(rng.uniform(15.0, 35.0), 1) if noise and rng.random() < 0.5 else None
    return Clip(path, request, round(rng.uniform(0.3, 0.9), 3), round(rng.uniform(0.0, 0.15), 3), snr)


def render_clips(out: Path, clips: list[Clip], *, fresh_process: bool = True) -> list[float]:
    """Synthesize, trim, resample to 16 kHz, normalize, pad, add noise and write every clip. Returns durations (s)."""
    durations, espeak_rate = [], EspeakSynth().sample_rate
    waves = synth_batch([c.request for c in clips], fresh_process=fresh_process)
    for clip, raw in zip(clips, waves, strict=True):
        audio = resample(trim_silence(raw, 0.005), espeak_rate, SAMPLE_RATE)
        audio = audio * (clip.peak / max(float(np.abs(audio).max()), 1e-6))
        audio = np.concatenate([np.zeros(round(clip.lead_s * SAMPLE_RATE), np.float32), audio])
        if clip.snr_db is not None:
            rms = float(np.sqrt(np.mean(audio**2)))
            noise_rng = np.random.default_rng(clip.request.seed)
            audio = audio + noise_rng.standard_normal(audio.size) * rms / 10 ** (clip.snr_db / 20)
        write_wav(out / clip.path, audio, SAMPLE_RATE)
        durations.append(audio.size / SAMPLE_RATE)
    return durations


def write_wav(path: Path, audio: np.ndarray, rate: int) -> None:
    """16-bit mono PCM WAV (stdlib ``wave``: about twice as fast as soundfile for short clips)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def _duration_stats(durations: list[float]) -> str:
    d = np.asarray(durations)
    return f"min {d.min():.2f} s, mean {d.mean():.2f} s, max {d.max():.2f} s"


def _split_voices(split: str, train_voices: list[str], test_voices: list[str]) -> list[str]:
    return test_voices if split == "test" else train_voices


# -- speech_words -----------------------------------------------------------------------------------------------


def build_speech_words(out: Path, seed: int, *, n_train: int = 2400, n_val: int = 240, n_test: int = 400,
                       words: tuple[str, ...] = SPEECH_WORDS) -> TaskCard:  # fmt: skip
    rng = random.Random(f"speech_words/{seed}")
    train_voices, test_voices = voice_split()
    prompt = "What word is spoken?"
    clips, records = [], {}
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        voices = _split_voices(split, train_voices, test_voices)
        labels = [i % len(words) for i in range(n)]
        rng.shuffle(labels)
        records[split] = []
        for i, label in enumerate(labels):
            clip = plan_clip(rng, f"media/{split}_{i:05d}.wav", words[label], rng.choice(voices), rate=(110, 230),
                             noise=True)  # fmt: skip
            clips.append(clip)
            records[split].append({
                "id": f"speech_words/{split}/{i:05d}",
                "messages": [user_text(prompt, {"type": "audio", "path": clip.path}), assistant(words[label])],
                "answer": words[label],
                "choices": list(words),
                "meta": {"label": label, **_clip_meta(clip)},
            })  # fmt: skip
    durations = render_clips(out, clips)
    sizes = {split: write_jsonl(out / f"{split}.jsonl", recs) for split, recs in records.items()}
    return TaskCard(
        name="speech_words",
        modality="audio",
        source=SOURCE,
        license=LICENSE,
        split_rule=f"whole speakers held out: test uses voice variants {', '.join(TEST_VARIANTS)} (every accent), "
        f"train and validation the other {len(TRAIN_VARIANTS)} variants; words balanced per split",
        description=f"Spoken-word recognition: a 16 kHz clip of one of {len(words)} English words (the ten digit "
        "words and ten short command words) spoken by espeak-ng with a random accent, speaker, rate, pitch, "
        "loudness and optional noise; answer the word.",
        sizes=sizes,
        extra={
            "vocabulary": ", ".join(words),
            "metric": "accuracy (exact match)",
            "voices": f"train {len(train_voices)}, test {len(test_voices)}",
            "clip durations": _duration_stats(durations),
        },  # fmt: skip
    )


def _clip_meta(clip: Clip) -> dict[str, object]:
    r = clip.request
    return {"voice": r.voice, "rate": r.rate, "pitch": r.pitch, "snr_db": clip.snr_db}


@register_builder("speech_words", modality="audio", version=1)
def _speech_words(out: Path, seed: int) -> TaskCard:
    return build_speech_words(out, seed)


# -- speech_asr -------------------------------------------------------------------------------------------------


def build_speech_asr(out: Path, seed: int, *, n_train: int = 2400, n_val: int = 240, n_test: int = 400) -> TaskCard:
    rng = random.Random(f"speech_asr/{seed}")
    train_voices, test_voices = voice_split()
    prompt = "Transcribe the speech."
    clips, records = [], {}
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        voices = _split_voices(split, train_voices, test_voices)
        records[split] = []
        for i in range(n):
            template, text = asr_phrase(rng)
            clip = plan_clip(rng, f"media/{split}_{i:05d}.wav", text, rng.choice(voices), rate=(140, 230), noise=True)
            clips.append(clip)
            records[split].append({
                "id": f"speech_asr/{split}/{i:05d}",
                "messages": [user_text(prompt, {"type": "audio", "path": clip.path}), assistant(text)],
                "answer": text,
                "meta": {"template": template, **_clip_meta(clip)},
            })  # fmt: skip
    durations = render_clips(out, clips)
    vocabulary = sorted({*COLOURS, *NOUNS, *DIRECTIONS, *VERBS, *DIGIT_WORDS, "the", "turn", "now", "go"})
    sizes = {split: write_jsonl(out / f"{split}.jsonl", recs) for split, recs in records.items()}
    return TaskCard(
        name="speech_asr",
        modality="audio",
        source=SOURCE,
        license=LICENSE,
        split_rule=f"whole speakers held out: test uses voice variants {', '.join(TEST_VARIANTS)} (every accent), "
        f"train and validation the other {len(TRAIN_VARIANTS)} variants",
        description="Short-phrase transcription: 2–4 word phrases from a small grammar ('red cat', 'find the blue "
        "box', 'turn left now', 'go up five', digit strings 'three five nine') spoken by espeak-ng with a random "
        "accent, speaker, rate, pitch, loudness and optional noise; the answer is the lowercase transcript.",
        sizes=sizes,
        extra={
            "metric": "WER (word error rate, lower is better)",
            "vocabulary": f"{len(vocabulary)} words: " + ", ".join(vocabulary),
            "voices": f"train {len(train_voices)}, test {len(test_voices)}",
            "clip durations": _duration_stats(durations),
        },  # fmt: skip
    )


@register_builder("speech_asr", modality="audio", version=1)
def _speech_asr(out: Path, seed: int) -> TaskCard:
    return build_speech_asr(out, seed)


# -- gen_speech_words -------------------------------------------------------------------------------------------


def build_gen_speech_words(out: Path, seed: int, *, n_train: int = 1200, n_val: int = 120,
                           test_per_word: int = len(GEN_PROMPTS)) -> TaskCard:  # fmt: skip
    rng = random.Random(f"gen_speech_words/{seed}")
    train_voices, test_voices = voice_split()
    words = DIGIT_WORDS
    clips, records = [], {}
    for split in ("train", "validation", "test"):
        voices = _split_voices(split, train_voices, test_voices)
        if split == "test":  # every prompt template for every word
            items = [(w, k % len(GEN_PROMPTS)) for w in range(len(words)) for k in range(test_per_word)]
        else:
            n = n_train if split == "train" else n_val
            items = [(i % len(words), rng.randrange(len(GEN_PROMPTS))) for i in range(n)]
            rng.shuffle(items)
        records[split] = []
        for i, (label, template) in enumerate(items):
            word = words[label]
            clip = plan_clip(rng, f"media/{split}_{i:05d}.wav", word, rng.choice(voices), rate=(130, 210),
                             noise=False)  # fmt: skip
            clips.append(clip)
            records[split].append({
                "id": f"gen_speech_words/{split}/{i:05d}",
                "messages": [user_text(GEN_PROMPTS[template].format(w=word)),
                             assistant([{"type": "text", "text": word}, {"type": "audio", "path": clip.path}])],
                "answer": word,
                "choices": list(words),
                "meta": {"label": label, "template": template, **_clip_meta(clip)},
            })  # fmt: skip
    durations = render_clips(out, clips)
    sizes = {split: write_jsonl(out / f"{split}.jsonl", recs) for split, recs in records.items()}
    return TaskCard(
        name="gen_speech_words",
        modality="audio",
        source=SOURCE,
        license=LICENSE,
        split_rule=f"reference audio of test uses the held-out voice variants {', '.join(TEST_VARIANTS)}; train "
        f"and validation targets the other {len(TRAIN_VARIANTS)}; test has {test_per_word} prompts per digit word",
        description="Speech generation: 'Say the word seven.' → the assistant writes the word, then speaks it (a text "
        "part before the audio part, so the LM loss makes the model state what it will say right before the audio "
        "head's queries read the states). Training targets are clean espeak-ng renderings (train voices); generated "
        "audio is scored by SpokenWordJudge "
        "(unimoe.eval.judge_audio), a log-mel + logistic-regression word classifier fitted on train-voice speech.",
        sizes=sizes,
        extra={
            "vocabulary": ", ".join(words),
            "metric": "judge accuracy (generated audio classified as the word)",
            "prompts": " | ".join(GEN_PROMPTS),
            "clip durations": _duration_stats(durations),
        },  # fmt: skip
    )


@register_builder("gen_speech_words", modality="audio", version=2)
def _gen_speech_words(out: Path, seed: int) -> TaskCard:
    return build_gen_speech_words(out, seed)
