"""Audio / speech encoder: Whisper's encoder over fixed-length log-mel windows.

Long audio is not cut at 30 s: the waveform is split into consecutive windows of ``window_seconds`` (the last one is
zero-padded by the feature extractor) and every window is one *unit* of ``max_source_positions`` tokens (the encoder's
second convolution halves the ``2 * max_source_positions`` mel frames). At most ``max_windows`` windows are kept; with
``truncate=True`` (the default) the audio after ``max_windows * window_seconds`` is dropped, with ``truncate=False``
longer audio raises :class:`MediaError`.

Where we depart from Whisper: the window length is configurable (Whisper is trained on 30 s windows only; a shorter
window needs ``max_source_positions = window_seconds * sampling_rate / 320``, and pretrained position embeddings are
sliced to that length by :meth:`AudioEncoder.load_pretrained`). Each window's log-mel features are normalized on
their own (Whisper's ``max - 8`` floor), exactly as if the window had been given to ``WhisperFeatureExtractor`` alone.
"""

from __future__ import annotations

import functools
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimoe.config_utils import check_positive_ints
from unimoe.errors import ConfigError

from .base import ENCODERS, MediaEncoder, MediaError, check_size

HOP_LENGTH = 160  # Whisper's STFT hop (10 ms at 16 kHz); two mel frames per encoder token
N_FFT = 400
_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass
class AudioEncoderConfig:
    """Whisper encoder sizes (defaults: whisper-base) and the windowing of the input audio.

    ``window_seconds * sampling_rate / 160`` mel frames per window must equal ``2 * max_source_positions``
    (whisper-base: 30 s → 3000 frames → 1500 tokens; the tiny preset: 2 s → 200 frames → 100 tokens)."""

    d_model: int = 512
    encoder_layers: int = 6
    encoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    num_mel_bins: int = 80
    max_source_positions: int = 1500
    sampling_rate: int = 16000
    window_seconds: float = 30.0
    max_windows: int = 8
    truncate: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation_function: str = "gelu"
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        check_positive_ints(
            self,
            ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins"),
            "encoders.audio",
        )
        if self.d_model % self.encoder_attention_heads != 0:
            raise ConfigError(
                f"encoders.audio.encoder_attention_heads: d_model={self.d_model} is not divisible by "
                f"{self.encoder_attention_heads} heads"
            )
        if not isinstance(self.sampling_rate, int) or self.sampling_rate < 16000:
            raise ConfigError(
                f"encoders.audio.sampling_rate: must be an integer >= 16000 (Whisper's mel filters reach 8 kHz), "
                f"got {self.sampling_rate!r}"
            )
        if not isinstance(self.window_seconds, (int, float)) or self.window_seconds <= 0:
            raise ConfigError(f"encoders.audio.window_seconds: must be > 0, got {self.window_seconds!r}")
        samples = self.window_seconds * self.sampling_rate
        if abs(samples - round(samples)) > 1e-6 or round(samples) % (2 * HOP_LENGTH) != 0:
            raise ConfigError(
                f"encoders.audio.window_seconds: {self.window_seconds} s at {self.sampling_rate} Hz is "
                f"{samples:g} samples, not a multiple of {2 * HOP_LENGTH} (two 160-sample mel hops per token)"
            )
        expected = round(samples) // (2 * HOP_LENGTH)
        if self.max_source_positions != expected:
            raise ConfigError(
                f"encoders.audio.max_source_positions: a {self.window_seconds} s window at {self.sampling_rate} Hz "
                f"gives {2 * expected} mel frames, so max_source_positions must be {expected}, got "
                f"{self.max_source_positions!r} (or change window_seconds)"
            )
        if not isinstance(self.max_windows, int) or self.max_windows < 1:
            raise ConfigError(f"encoders.audio.max_windows: must be an integer >= 1, got {self.max_windows!r}")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"encoders.audio.{name}: must be in [0, 1), got {getattr(self, name)!r}")
        if self.attn_implementation not in _ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"encoders.audio.attn_implementation: {self.attn_implementation!r} is not one of "
                f"{', '.join(_ATTN_IMPLEMENTATIONS)}"
            )

    @property
    def window_samples(self) -> int:
        return round(self.window_seconds * self.sampling_rate)

    def whisper_config(self):
        from transformers import WhisperConfig

        config = WhisperConfig(
            d_model=self.d_model,
            encoder_layers=self.encoder_layers,
            encoder_attention_heads=self.encoder_attention_heads,
            encoder_ffn_dim=self.encoder_ffn_dim,
            num_mel_bins=self.num_mel_bins,
            max_source_positions=self.max_source_positions,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            activation_dropout=self.activation_dropout,
            activation_function=self.activation_function,
            # the decoder is never built; keep its config small and consistent
            decoder_layers=1,
            decoder_attention_heads=self.encoder_attention_heads,
            decoder_ffn_dim=self.encoder_ffn_dim,
        )
        config._attn_implementation = self.attn_implementation
        return config


# -- decoding ----------------------------------------------------------------------------------------------------


def _to_float(array: np.ndarray, source: Any) -> np.ndarray:
    """Integer PCM → [-1, 1] floats; float arrays as they are."""
    if array.dtype == np.uint8:
        return (array.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / float(np.iinfo(array.dtype).max + 1)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise MediaError(source, f"expected a numeric waveform, got dtype {array.dtype}")


def _to_mono(array: np.ndarray, source: Any) -> np.ndarray:
    """``(samples,)``, ``(channels, samples)`` or ``(samples, channels)`` → ``(samples,)`` (channel mean).

    A 2-D array's channel axis is its short one (at most 16 channels)."""
    if array.ndim == 1:
        return array
    if array.ndim == 2:
        rows, cols = array.shape
        if rows <= 16 and rows <= cols:
            return array.mean(axis=0)
        if cols <= 16 and cols < rows:
            return array.mean(axis=1)
        raise MediaError(
            source, f"cannot tell the channel axis of a {array.shape} waveform; pass (samples,) or (channels, samples)"
        )
    raise MediaError(source, f"expected a 1-D or 2-D waveform, got shape {array.shape}")


def _decode(source: str | Path | bytes, config: AudioEncoderConfig) -> tuple[np.ndarray, int]:
    """Decode a file or bytes with soundfile → ``((frames, channels) float32, sample_rate)``.

    Only the audio that can be used is read (``max_windows`` windows), so a long file costs no more than that."""
    import soundfile as sf

    if isinstance(source, (str, Path)) and Path(source).is_dir():
        raise MediaError(source, "is a directory, expected an audio file")
    handle = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        with sf.SoundFile(handle) as file:
            rate = int(file.samplerate)
            total = file.frames
            limit = math.ceil(config.max_windows * config.window_seconds * rate)
            if total > limit and not config.truncate:
                raise MediaError(
                    source,
                    f"audio is {total / rate:.1f} s, longer than max_windows * window_seconds = "
                    f"{config.max_windows * config.window_seconds:g} s (encoders.audio.max_windows, truncate=false)",
                )
            data = file.read(frames=min(total, limit) if total > 0 else limit, dtype="float32", always_2d=True)
    except MediaError:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError, OSError, EOFError) as err:
        problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MediaError(source, f"not a readable audio file ({problem})") from None
    return data, rate


def load_audio(source: Any, config: AudioEncoderConfig, *, max_bytes: int | None = None) -> np.ndarray:
    """A path / bytes (wav, flac, ogg, mp3, ... via soundfile), a waveform array (assumed at
    ``config.sampling_rate``), ``(waveform, sample_rate)`` or ``{"array", "sampling_rate"}`` → a mono float32
    waveform ``(samples,)`` at ``config.sampling_rate``. Bad input raises :class:`MediaError` naming the source."""
    rate: int | None = None
    if isinstance(source, dict) and "array" in source:
        source, rate = source["array"], source.get("sampling_rate")
    elif isinstance(source, tuple):
        if len(source) != 2:
            raise MediaError(source, "expected a (waveform, sample_rate) tuple")
        source, rate = source
    if isinstance(source, (str, Path, bytes, bytearray)):
        if rate is not None:
            raise MediaError(source, "a sample rate goes with a waveform array, not with a file")
        check_size(source, max_bytes)
        data, rate = _decode(source, config)
        wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]  # (frames, channels) -> (frames,)
    elif isinstance(source, (np.ndarray, torch.Tensor, list)):
        array = source.detach().cpu().float().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
        wave = _to_mono(_to_float(array, source), source)
    else:
        raise MediaError(source, "expected a path, bytes, a waveform array or a (waveform, sample_rate) tuple")
    if rate is None:
        rate = config.sampling_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise MediaError(source, f"sample rate must be a positive integer, got {rate!r}")
    if wave.size == 0:
        raise MediaError(source, "audio has zero samples")
    if not np.isfinite(wave).all():
        raise MediaError(source, "audio contains NaN or infinite samples")
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if int(rate) != config.sampling_rate:
        import torchaudio.functional as AF

        wave = AF.resample(torch.from_numpy(wave), int(rate), config.sampling_rate).numpy()
        if wave.size == 0:
            raise MediaError(source, f"audio is too short to resample from {rate} Hz to {config.sampling_rate} Hz")
    return wave


# -- features ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _feature_extractor(num_mel_bins: int, sampling_rate: int, window_seconds: float):
    from transformers import WhisperFeatureExtractor

    samples = round(window_seconds * sampling_rate)
    extractor = WhisperFeatureExtractor(
        feature_size=num_mel_bins,
        sampling_rate=sampling_rate,
        hop_length=HOP_LENGTH,
        n_fft=N_FFT,
        chunk_length=int(window_seconds) if float(window_seconds).is_integer() else window_seconds,
    )
    extractor.n_samples = samples  # an integer even for a fractional window (chunk_length * sampling_rate)
    extractor.nb_max_frames = samples // HOP_LENGTH
    return extractor


def split_windows(wave: np.ndarray, config: AudioEncoderConfig, source: Any = None) -> list[np.ndarray]:
    """Consecutive ``window_seconds`` slices (the last may be shorter), at most ``max_windows`` of them."""
    n = config.window_samples
    count = max(1, math.ceil(len(wave) / n))
    if count > config.max_windows:
        if not config.truncate:
            raise MediaError(
                wave if source is None else source,
                f"audio is {len(wave) / config.sampling_rate:.1f} s, longer than max_windows * window_seconds = "
                f"{config.max_windows * config.window_seconds:g} s (encoders.audio.max_windows, truncate=false)",
            )
        count = config.max_windows
    return [wave[i * n : (i + 1) * n] for i in range(count)]


def log_mel_windows(wave: Any, config: AudioEncoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(samples,)`` → Whisper log-mel features ``(W, num_mel_bins, 2 * max_source_positions)`` and the token mask
    ``(W, max_source_positions)`` (True where the token sees real audio, False over the last window's padding)."""
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().float().numpy()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise MediaError(wave, f"expected a mono waveform (samples,), got shape {wave.shape}; use AudioEncoder.load")
    chunks = split_windows(wave, config)
    extractor = _feature_extractor(config.num_mel_bins, config.sampling_rate, float(config.window_seconds))
    features = extractor(
        chunks,
        sampling_rate=config.sampling_rate,
        max_length=config.window_samples,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )["input_features"].float()  # (W, n_mels, 2 * P)
    tokens = config.max_source_positions
    mask = torch.zeros(len(chunks), tokens, dtype=torch.bool)
    for i, chunk in enumerate(chunks):
        frames = math.ceil(len(chunk) / HOP_LENGTH)  # mel frames that see real samples
        mask[i, : min(tokens, math.ceil(frames / 2))] = True  # the stride-2 conv halves the frames
    return features, mask


# -- the encoder -------------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A ``.safetensors`` file, or a directory with ``model.safetensors`` or a sharded index."""
    from safetensors.torch import load_file

    if path.is_dir():
        single = path / "model.safetensors"
        index = path / "model.safetensors.index.json"
        if single.is_file():
            return load_file(str(single)), str(single)
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for name in files:
                # only the encoder shards are needed, but a shard may mix both; load and filter later
                state.update(load_file(str(path / name)))
            return state, str(index)
        raise ConfigError(f"audio encoder pretrained: {path} holds no model.safetensors (or sharded index)")
    if not path.is_file() or path.suffix != ".safetensors":
        raise ConfigError(f"audio encoder pretrained: {path} is not a .safetensors file or directory")
    return load_file(str(path)), str(path)


_PREFIXES = ("whisper.", "model.encoder.", "encoder.")


def whisper_encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our own state dict (``whisper.*``), a ``WhisperForConditionalGeneration`` (``model.encoder.*``), a
    ``WhisperModel`` (``encoder.*``) or a bare ``WhisperEncoder`` state dict → ``WhisperEncoder`` keys."""
    for prefix in _PREFIXES:
        if any(key.startswith(prefix) for key in state):
            return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return dict(state)


@ENCODERS.register("whisper")
class AudioEncoder(MediaEncoder):
    """transformers' ``WhisperEncoder`` on log-mel windows: ``(W, n_mels, 2P)`` → ``(W, P, d_model)``."""

    modality = "audio"
    Config = AudioEncoderConfig

    def __init__(self, config: AudioEncoderConfig):
        super().__init__(config)
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        self.whisper = WhisperEncoder(config.whisper_config())

    @property
    def output_dim(self) -> int:
        return self.config.d_model

    @classmethod
    def load(cls, source: Any, config: AudioEncoderConfig, *, max_bytes: int | None = None) -> np.ndarray:
        return load_audio(source, config, max_bytes=max_bytes)

    @classmethod
    def preprocess(cls, media: Any, config: AudioEncoderConfig) -> dict[str, torch.Tensor]:
        """→ ``{"values": (W, num_mel_bins, 2 * max_source_positions), "mask": (W, max_source_positions)}``."""
        values, mask = log_mel_windows(media, config)
        return {"values": values, "mask": mask}

    @classmethod
    def tokens_per_unit(cls, config: AudioEncoderConfig) -> int:
        return config.max_source_positions

    def forward(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``values (W, n_mels, 2P)`` → ``(W, P, d_model)``. Whisper attends over the padded silence by design (it is
        trained that way), so ``mask`` is accepted for the contract and not used here; connectors may use it."""
        expected = (self.config.num_mel_bins, 2 * self.config.max_source_positions)
        if values.dim() != 3 or tuple(values.shape[1:]) != expected:
            raise ValueError(
                f"audio encoder: expected values of shape (W, {expected[0]}, {expected[1]}), got {tuple(values.shape)}"
                "; build them with AudioEncoder.preprocess and the same config"
            )
        weight = self.whisper.conv1.weight
        return self.whisper(input_features=values.to(weight.dtype)).last_hidden_state  # (W, P, D)

    def load_pretrained(self, path: str | Path) -> None:
        """Local weights: this encoder's own state dict, or a transformers Whisper checkpoint (a directory or
        ``.safetensors`` file of ``WhisperModel`` / ``WhisperForConditionalGeneration``; the decoder is ignored).

        A checkpoint with more positions than ``max_source_positions`` (e.g. 1500 for a shorter window) has its
        position table sliced to the first ``max_source_positions`` rows."""
        path = Path(path)
        state, where = _read_safetensors(path)
        state = whisper_encoder_state(state)
        own = self.whisper.state_dict()
        key = "embed_positions.weight"
        if key in state and key in own and state[key].shape[0] > own[key].shape[0] == self.config.max_source_positions:
            state[key] = state[key][: own[key].shape[0]]
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ConfigError(
                f"audio encoder pretrained: {where} does not match the Whisper encoder "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
        if wrong:
            name, got, want = wrong[0]
            raise ConfigError(
                f"audio encoder pretrained: {where}: {name} has shape {got}, the encoder config needs {want} "
                "(set encoders.audio d_model / encoder_layers / encoder_ffn_dim / num_mel_bins to the checkpoint's)"
            )
        self.whisper.load_state_dict(state, strict=True)
