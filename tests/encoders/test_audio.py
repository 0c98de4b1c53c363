"""The Whisper audio encoder: decoding (files, arrays, resampling, channels), windowing of long audio, errors that
name the file, forward + backward, local weights (own and transformers checkpoints), and a connector on top."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from unimoe.encoders import MediaError, build_encoder, encoder_class, list_encoders
from unimoe.encoders.audio import AudioEncoder, AudioEncoderConfig, _feature_extractor
from unimoe.errors import ConfigError

SR = 16000
TINY = dict(
    d_model=64,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=128,
    num_mel_bins=80,
    max_source_positions=100,
    window_seconds=2,
    max_windows=4,
)


def tone(seconds: float, rate: int = SR, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def config() -> AudioEncoderConfig:
    return AudioEncoderConfig(**TINY)


@pytest.fixture(scope="module")
def encoder(config) -> AudioEncoder:
    torch.manual_seed(0)
    return build_encoder("audio", {"type": "whisper", **TINY}).eval()


def test_registered_and_spec_resolves():
    assert "whisper" in list_encoders()
    cls, config = encoder_class({"type": "whisper", **TINY}, "audio")
    assert cls is AudioEncoder and cls.modality == "audio"
    assert cls.tokens_per_unit(config) == 100


def test_forward_backward_shape(config):
    torch.manual_seed(0)
    enc = AudioEncoder(config)
    batch = enc.preprocess(enc.load(tone(5.0), config), config)
    values = batch["values"]
    assert values.shape == (3, 80, 200)
    out = enc(values, batch["mask"])
    assert out.shape == (3, AudioEncoder.tokens_per_unit(config), enc.output_dim) == (3, 100, 64)
    assert torch.isfinite(out).all()
    out.pow(2).mean().backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert enc.whisper.conv1.weight.grad.abs().sum() > 0


def test_forward_rejects_wrong_frame_count(encoder):
    with pytest.raises(ValueError, match=r"\(W, 80, 200\)"):
        encoder(torch.zeros(1, 80, 3000))


def test_wav_at_8khz_is_resampled(tmp_path, config):
    path = tmp_path / "tone8k.wav"
    sf.write(path, tone(1.5, rate=8000), 8000, subtype="PCM_16")
    wave = AudioEncoder.load(path, config)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert wave.shape[0] == round(1.5 * SR)
    # still a 440 Hz tone after resampling: the spectrum peaks there
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * SR / len(wave) - 440.0) < 2.0
    # the same through (waveform, rate) and a torch tensor
    via_tuple = AudioEncoder.load((torch.from_numpy(tone(1.5, rate=8000)), 8000), config)
    assert via_tuple.shape == wave.shape
    np.testing.assert_allclose(via_tuple, wave, atol=2e-3)  # PCM_16 quantization only


def test_stereo_becomes_mono(tmp_path, config):
    left, right = tone(1.0), tone(1.0, freq=1000.0) * 0.5
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), SR, subtype="FLOAT")
    expected = (left + right) / 2
    np.testing.assert_allclose(AudioEncoder.load(path, config), expected, atol=1e-6)
    np.testing.assert_allclose(AudioEncoder.load(np.stack([left, right]), config), expected, atol=1e-6)  # (C, N)
    np.testing.assert_allclose(AudioEncoder.load(np.stack([left, right], 1), config), expected, atol=1e-6)  # (N, C)


def test_int16_array_is_scaled(config):
    pcm = (tone(0.5) * 32767).astype(np.int16)
    wave = AudioEncoder.load(pcm, config)
    assert wave.dtype == np.float32
    np.testing.assert_allclose(wave, tone(0.5), atol=1e-4)


def test_long_audio_is_split_into_windows(config):
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(5 * SR)).astype(np.float32) + tone(5.0)
    batch = AudioEncoder.preprocess(wave, config)
    assert batch["values"].shape == (3, 80, 200)
    assert batch["mask"].shape == (3, 100)
    assert batch["mask"][:2].all() and batch["mask"][2].sum() == 50  # the last window holds 1 s of 2
    extractor = _feature_extractor(80, SR, 2.0)
    for i, piece in ((1, wave[2 * SR : 4 * SR]), (2, wave[4 * SR :])):
        alone = extractor(piece, sampling_rate=SR, return_tensors="pt")["input_features"][0]
        torch.testing.assert_close(batch["values"][i], alone, atol=1e-5, rtol=1e-5)
    # windows differ (not one window repeated)
    assert not torch.allclose(batch["values"][0], batch["values"][2])


def test_35s_with_30s_window_gives_two_windows():
    config = AudioEncoderConfig()  # whisper-base sizes; only the feature extractor runs
    wave = tone(35.0)
    batch = AudioEncoder.preprocess(wave, config)
    assert batch["values"].shape == (2, 80, 3000)
    extractor = _feature_extractor(80, SR, 30.0)
    alone = extractor(wave[30 * SR :], sampling_rate=SR, return_tensors="pt")["input_features"][0]
    torch.testing.assert_close(batch["values"][1], alone, atol=1e-5, rtol=1e-5)
    assert batch["mask"][1].sum() == 250  # 5 s of 30 s -> 500 frames -> 250 tokens


def test_other_mel_bin_count():
    config = AudioEncoderConfig(**{**TINY, "num_mel_bins": 40})
    batch = AudioEncoder.preprocess(tone(0.3), config)
    assert batch["values"].shape == (1, 40, 200)
    assert batch["mask"][0].sum() == 15
    assert AudioEncoder(config)(batch["values"]).shape == (1, 100, 64)


def test_max_windows_truncates_or_raises(tmp_path):
    config = AudioEncoderConfig(**TINY)  # 4 windows of 2 s
    wave = tone(9.0)
    assert AudioEncoder.preprocess(wave, config)["values"].shape[0] == 4
    path = tmp_path / "long.wav"
    sf.write(path, wave, SR)
    assert AudioEncoder.load(path, config).shape[0] == 8 * SR  # only the usable audio is decoded
    strict = AudioEncoderConfig(**{**TINY, "truncate": False})
    with pytest.raises(MediaError, match="long.wav.*max_windows"):
        AudioEncoder.load(path, strict)
    with pytest.raises(MediaError, match="max_windows"):
        AudioEncoder.preprocess(wave, strict)


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_flac_and_ogg_round_trip(tmp_path, config, fmt):
    if fmt not in sf.available_formats():
        pytest.skip(f"libsndfile without {fmt}")
    wave = tone(1.0)
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(path, wave, SR, format=fmt)
    back = AudioEncoder.load(path, config)
    assert abs(back.shape[0] - wave.shape[0]) <= 1024  # ogg may pad the last page
    n = min(back.shape[0], wave.shape[0])
    if fmt == "FLAC":
        np.testing.assert_allclose(back[:n], wave[:n], atol=1e-4)
    else:  # lossy: still the same signal
        assert np.corrcoef(back[:n], wave[:n])[0, 1] > 0.95
    assert AudioEncoder.preprocess(back, config)["values"].shape == (1, 80, 200)
    # the same bytes without a file name
    assert AudioEncoder.load(path.read_bytes(), config).shape == back.shape


def test_bad_files_raise_media_error_naming_the_file(tmp_path, config):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.wav"
    big = tmp_path / "big.wav"
    sf.write(big, tone(1.0), SR)
    cases = [(garbage, None, "not a readable audio"), (empty, None, "empty"), (missing, None, "does not exist")]
    cases.append((big, 1000, "above the limit"))
    cases.append((tmp_path, None, "directory"))
    for path, max_bytes, problem in cases:
        with pytest.raises(MediaError, match=problem) as info:
            AudioEncoder.load(path, config, max_bytes=max_bytes)
        assert str(path) in str(info.value)
        assert isinstance(info.value, ValueError)
    with pytest.raises(MediaError, match="bytes.*not a readable audio"):
        AudioEncoder.load(b"RIFF\x00\x00not really a wave", config)


def test_bad_arrays_raise_media_error(config):
    wave = tone(0.5)
    wave[100] = np.nan
    with pytest.raises(MediaError, match="NaN"):
        AudioEncoder.load(wave, config)
    with pytest.raises(MediaError, match="infinite"):
        AudioEncoder.load(np.array([0.0, np.inf, 0.0], dtype=np.float32), config)
    with pytest.raises(MediaError, match="zero samples"):
        AudioEncoder.load(np.zeros(0, dtype=np.float32), config)
    with pytest.raises(MediaError, match="sample rate"):
        AudioEncoder.load((tone(0.1), 0), config)
    with pytest.raises(MediaError, match="1-D or 2-D"):
        AudioEncoder.load(np.zeros((2, 2, 100), dtype=np.float32), config)


def test_load_own_safetensors(tmp_path, config, encoder):
    from safetensors.torch import save_file

    file = tmp_path / "audio.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(file))
    torch.manual_seed(1)
    other = AudioEncoder(config).eval()
    values = AudioEncoder.preprocess(tone(1.0), config)["values"]
    with torch.no_grad():
        assert not torch.allclose(other(values), encoder(values))
        other.load_pretrained(file)
        torch.testing.assert_close(other(values), encoder(values))


@pytest.mark.parametrize("head", [False, True])
def test_load_transformers_whisper_checkpoint(tmp_path, config, head):
    from transformers import WhisperForConditionalGeneration, WhisperModel

    torch.manual_seed(2)
    cls = WhisperForConditionalGeneration if head else WhisperModel
    reference = cls(config.whisper_config()).eval()
    reference.save_pretrained(tmp_path / "whisper")
    encoder = AudioEncoder(config).eval()
    encoder.load_pretrained(tmp_path / "whisper")
    ref_encoder = reference.model.encoder if head else reference.encoder
    values = AudioEncoder.preprocess(tone(1.0), config)["values"]
    with torch.no_grad():
        torch.testing.assert_close(encoder(values), ref_encoder(values).last_hidden_state)


def test_load_checkpoint_with_longer_positions(tmp_path, config):
    from transformers import WhisperModel

    longer = AudioEncoderConfig(**{**TINY, "window_seconds": 3, "max_source_positions": 150})
    torch.manual_seed(3)
    reference = WhisperModel(longer.whisper_config()).eval()
    reference.save_pretrained(tmp_path / "whisper")
    encoder = AudioEncoder(config)
    encoder.load_pretrained(tmp_path / "whisper")
    torch.testing.assert_close(encoder.whisper.embed_positions.weight, reference.encoder.embed_positions.weight[:100])


def test_load_mismatched_checkpoint_is_config_error(tmp_path, config, encoder):
    from safetensors.torch import save_file

    wide = AudioEncoder(AudioEncoderConfig(**{**TINY, "d_model": 32, "encoder_attention_heads": 2}))
    file = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(file))
    with pytest.raises(ConfigError, match="d_model"):
        encoder.load_pretrained(file)
    with pytest.raises(ConfigError, match="not a .safetensors"):
        encoder.load_pretrained(tmp_path / "nothing.bin")
    partial = tmp_path / "partial.safetensors"
    save_file({"whisper.conv1.weight": encoder.whisper.conv1.weight.detach().contiguous()}, str(partial))
    with pytest.raises(ConfigError, match="missing"):
        encoder.load_pretrained(partial)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"max_source_positions": 1500}, "max_source_positions"),
        ({"encoder_attention_heads": 3}, "encoder_attention_heads"),
        ({"window_seconds": 2.01}, "window_seconds"),
        ({"window_seconds": -1}, "window_seconds"),
        ({"sampling_rate": 8000}, "sampling_rate"),
        ({"max_windows": 0}, "max_windows"),
        ({"d_model": 0}, "d_model"),
        ({"dropout": 1.5}, "dropout"),
        ({"attn_implementation": "flash"}, "attn_implementation"),
    ],
)
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ConfigError, match=f"encoders.audio.{field}"):
        AudioEncoderConfig(**{**TINY, **change})


def test_unknown_field_in_spec():
    with pytest.raises(ConfigError, match="encoders.audio.*hidden_size"):
        build_encoder("audio", {"type": "whisper", "hidden_size": 64})


def test_resampler_connector_consumes_encoder_output(config):
    from unimoe.connectors import build_connector

    torch.manual_seed(0)
    enc = AudioEncoder(config)
    connector = build_connector(
        "audio", {"type": "resampler", "num_queries": 8}, input_dim=enc.output_dim, output_dim=64
    )
    batch = AudioEncoder.preprocess(tone(3.0), config)
    tokens = enc(batch["values"], batch["mask"])  # (2, 100, 64)
    out = connector(tokens, batch["mask"])
    assert out.shape == (2, 8, 64)
    assert torch.allclose(connector(tokens), connector(tokens))  # without a mask too
    out.sum().backward()
    assert enc.whisper.layers[0].fc1.weight.grad is not None
    assert connector.queries.grad is not None
