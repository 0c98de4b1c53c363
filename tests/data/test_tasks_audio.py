"""Speech tasks: the espeak-ng wrapper (non-silent audio, errors, bit-determinism in a fresh process), and the
``speech_words`` / ``speech_asr`` / ``gen_speech_words`` builders on small variants (valid records, WAVs that the
audio encoder loads, held-out voices, deterministic builds)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from unimoe.data import tasks_audio as ta
from unimoe.data.build import DATA_BUILDERS, list_tasks
from unimoe.data.records import read_split
from unimoe.data.speech import EspeakSynth, SpeechError, SynthRequest, _Espeak, default_paths, resample, synth_batch
from unimoe.encoders.audio import AudioEncoder

TINY_AUDIO = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=80,
                  max_source_positions=100, window_seconds=2, max_windows=4)  # fmt: skip
SMALL = {
    "speech_words": lambda out: ta.build_speech_words(out, 0, n_train=40, n_val=8, n_test=20),
    "speech_asr": lambda out: ta.build_speech_asr(out, 0, n_train=30, n_val=6, n_test=12),
    "gen_speech_words": lambda out: ta.build_gen_speech_words(out, 0, n_train=20, n_val=10, test_per_word=2),
}


def rms(wave: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))


# -- the synthesizer -------------------------------------------------------------------------------------------


def test_synth_speaks_a_word():
    synth = EspeakSynth()
    wave, rate = synth.synth("seven", voice="en-us+m3", rate=160, pitch=40)
    assert rate == synth.sample_rate == 22050
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 0.2 < wave.size / rate < 1.5
    assert rms(wave) > 0.02 and np.abs(wave).max() <= 1.0


def test_voices_and_variants():
    synth = EspeakSynth()
    assert {"m1", "m7", "f1", "f4"} <= set(synth.variant_names())
    voices = synth.voices()
    assert "en-us+m3" in voices and "en+f2" in voices and len(voices) >= 40
    train, test = ta.voice_split(synth)
    assert len(train) >= 8 and len(test) >= 3


def test_synth_errors():
    synth = EspeakSynth()
    with pytest.raises(SpeechError, match="no voice 'xx-yy\\+zz'"):
        synth.synth("seven", voice="xx-yy+zz")
    with pytest.raises(SpeechError, match="rate"):
        synth.synth("seven", rate=20)
    with pytest.raises(SpeechError, match="empty"):
        synth.synth("  ")
    _, data = default_paths()
    with pytest.raises(SpeechError, match="cannot load libespeak-ng"):
        _Espeak("/nonexistent/libespeak-ng.so", data)


def test_synth_batch_is_bit_deterministic_in_a_fresh_process():
    requests = [SynthRequest("seven", "en-us+m3", 150, 30, seed=1), SynthRequest("go left", "en+f2", 200, 70, seed=2)]
    requests = requests * 3
    EspeakSynth().synth("something else first", "en-029+m1")  # this process's state must not matter
    a = list(synth_batch(requests))
    b = list(synth_batch(requests))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # in-process synthesis of the same request differs only by pitch jitter: about the same length
    c = list(synth_batch(requests[:1], fresh_process=False))[0]
    assert abs(c.size - a[0].size) < 0.05 * a[0].size


def test_resample_length():
    wave = np.random.default_rng(0).standard_normal(22050).astype(np.float32)
    assert resample(wave, 22050, 16000).shape == (16000,)


# -- builders --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("audio_tasks")
    out = {}
    for name, build in SMALL.items():
        (root / name).mkdir()
        out[name] = (root / name, build(root / name))
    return out


def test_builders_registered():
    names = list_tasks()
    for name in SMALL:
        assert name in names and DATA_BUILDERS.get(name).modality == "audio"


@pytest.mark.parametrize("name", list(SMALL))
def test_records_are_valid_and_audio_loads(built, name):
    task_dir, card = built[name]
    config = AudioEncoder.Config(**TINY_AUDIO)
    assert card.name == name and card.modality == "audio"
    for split, size in card.sizes.items():
        records = read_split(task_dir, split)
        assert len(records) == size > 0
        raw = [json.loads(line) for line in (task_dir / f"{split}.jsonl").read_text().splitlines()]
        for record, plain in zip(records, raw):
            assert record["id"].startswith(f"{name}/{split}/")
            answer = record["answer"]
            assert answer == answer.lower() and answer.replace(" ", "").isalpha()
            audio = [p for m in plain["messages"] if isinstance(m["content"], list) for p in m["content"]
                     if p["type"] == "audio"]  # fmt: skip
            assert len(audio) == 1 and audio[0]["path"].startswith("media/")  # relative to the task dir
            if name == "gen_speech_words":
                text, audio_part = plain["messages"][-1]["content"]  # the word in text, then the audio
                assert text == {"type": "text", "text": answer} and audio_part["type"] == "audio"
                assert answer in plain["messages"][0]["content"][-1]["text"]
                assert record["choices"][record["meta"]["label"]] == answer
            else:
                assert plain["messages"][-1]["content"] == answer
                assert plain["messages"][0]["content"][0]["type"] == "audio"
            if name == "speech_words":
                assert record["choices"] == list(ta.SPEECH_WORDS)
        for record in records[:3]:  # the encoder reads what we wrote: 16 kHz, non-silent, under 2.5 s
            path = next(p["path"] for m in record["messages"] if isinstance(m["content"], list)
                        for p in m["content"] if p["type"] == "audio")  # fmt: skip
            wave = AudioEncoder.load(path, config)
            assert 0.15 * 16000 < wave.size <= 2.5 * 16000 and rms(wave) > 0.01
            features = AudioEncoder.preprocess(wave, config)
            assert features["values"].shape[1:] == (80, 200)


@pytest.mark.parametrize("name", list(SMALL))
def test_test_voices_are_held_out(built, name):
    task_dir, _ = built[name]
    variants = {}
    for split in ("train", "validation", "test"):
        variants[split] = {ta.voice_variant(r["meta"]["voice"]) for r in read_split(task_dir, split)}
    assert variants["test"] <= set(ta.TEST_VARIANTS)
    assert not (variants["train"] | variants["validation"]) & variants["test"]
    assert len(variants["train"]) >= 4


def test_clip_durations(built):
    import soundfile as sf

    for name, (task_dir, _) in built.items():
        for wav in (task_dir / "media").glob("*.wav"):
            info = sf.info(str(wav))
            assert info.samplerate == 16000 and info.channels == 1
            assert 0.15 < info.duration <= 2.5, (name, wav.name, info.duration)


def test_word_tasks_are_balanced(built):
    task_dir, _ = built["speech_words"]
    labels = [r["meta"]["label"] for r in read_split(task_dir, "test")]
    assert sorted(labels) == list(range(20))
    task_dir, _ = built["gen_speech_words"]
    test = read_split(task_dir, "test")
    assert [r["meta"]["label"] for r in test] == [w for w in range(10) for _ in range(2)]


def _tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_build_is_deterministic(built, tmp_path):
    again = tmp_path / "speech_words"
    again.mkdir()
    SMALL["speech_words"](again)
    assert _tree_hash(again) == _tree_hash(built["speech_words"][0])
    other = tmp_path / "other_seed"
    other.mkdir()
    ta.build_speech_words(other, 1, n_train=40, n_val=8, n_test=20)
    assert _tree_hash(other) != _tree_hash(again)
