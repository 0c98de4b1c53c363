"""Media ↔ the tensors a diffusion head learns: pixels in [-1, 1], and scaled log-mel spectrograms with a vocoder.

Written by hand because they are a few lines over torchaudio / PIL: what matters is that the same numbers go in
(training targets) and come out (sampling), so both directions live side by side here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from unimoe.registry import Registry

from .config import AudioHeadConfig, ImageHeadConfig


# ----------------------------------------------------------------------------- images
def image_target(source: Any, config: ImageHeadConfig, *, max_bytes: int | None = None) -> torch.Tensor:
    """An image (path, bytes, PIL, array) → ``(channels, size, size)`` in [-1, 1] (box-filtered resize)."""
    from PIL import Image

    from unimoe.encoders.image import load_image

    image = load_image(source, max_bytes=max_bytes).convert("L" if config.channels == 1 else "RGB")
    image = image.resize((config.size, config.size), Image.Resampling.BOX)
    array = np.asarray(image, dtype=np.float32).reshape(config.size, config.size, config.channels)
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous()  # (C, S, S)


def tensor_to_image(x: torch.Tensor, config: ImageHeadConfig):
    """``(channels, size, size)`` in [-1, 1] → a PIL image upscaled (nearest) to ``output_size``."""
    from PIL import Image

    array = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(
        array[..., 0] if config.channels == 1 else array, mode="L" if config.channels == 1 else "RGB"
    )
    if config.output_size != config.size:
        image = image.resize((config.output_size, config.output_size), Image.Resampling.NEAREST)
    return image


# ----------------------------------------------------------------------------- audio
class MelCodec:
    """Waveform ↔ ``(1, n_mels, frames)`` scaled log-mel (torchaudio transforms; built once per config)."""

    def __init__(self, config: AudioHeadConfig):
        import torchaudio

        self.config = config
        self.mel = torchaudio.transforms.MelSpectrogram(
            config.sample_rate, n_fft=config.n_fft, hop_length=config.hop_length, n_mels=config.n_mels, power=2.0
        )

    @property
    def num_samples(self) -> int:
        return self.config.frames * self.config.hop_length

    def encode(self, wave: np.ndarray) -> torch.Tensor:
        """Mono float waveform at ``sample_rate`` → ``(1, n_mels, frames)`` in [-1, 1] (peak-normalized, padded or
        cut to ``frames``)."""
        cfg = self.config
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        wave = wave / max(float(np.abs(wave).max()) if wave.size else 0.0, 1e-6)
        wave = np.pad(wave, (0, max(0, self.num_samples - wave.size)))[: self.num_samples]
        power = self.mel(torch.from_numpy(wave))[:, : cfg.frames]  # (n_mels, frames)
        db = 10.0 * torch.log10(power + 1e-10)
        x = (db - cfg.top_db) / (cfg.range_db / 2) + 1.0  # top_db -> 1, top_db - range_db -> -1
        return x.clamp(-1.0, 1.0).unsqueeze(0)

    def to_power(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of the scaling in :meth:`encode`: ``(..., n_mels, frames)`` → mel power."""
        cfg = self.config
        db = (x.float().clamp(-1.0, 1.0) - 1.0) * (cfg.range_db / 2) + cfg.top_db
        power = 10.0 ** (db / 10.0)
        return torch.where(x <= -1.0, torch.zeros_like(power), power)  # the floor is silence

    def decode(self, x: torch.Tensor) -> np.ndarray:
        """``(1, n_mels, frames)`` → a float32 waveform with the configured vocoder (peak 0.9)."""
        wave = VOCODERS.get(self.config.vocoder)(self, self.to_power(x[0]))
        peak = float(np.abs(wave).max()) if wave.size else 0.0
        return (wave * (0.9 / peak) if peak > 0 else wave).astype(np.float32)


#: Mel power ``(n_mels, frames)`` → waveform. A neural vocoder plugs in here under a new name.
VOCODERS: Registry = Registry("vocoder")


@VOCODERS.register("griffin_lim")
def griffin_lim(codec: MelCodec, power: torch.Tensor) -> np.ndarray:
    import torchaudio

    cfg = codec.config
    inverse = torchaudio.transforms.InverseMelScale(cfg.n_fft // 2 + 1, cfg.n_mels, cfg.sample_rate)
    vocoder = torchaudio.transforms.GriffinLim(
        n_fft=cfg.n_fft, hop_length=cfg.hop_length, power=2.0, n_iter=cfg.griffin_lim_iters
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # Griffin-Lim starts from random phases: keep the waveform a function of the spectrogram
    try:
        wave = vocoder(inverse(power.float()))
    finally:
        torch.random.set_rng_state(generator_state)
    return wave.numpy()


def audio_target(
    source: Any, config: AudioHeadConfig, codec: MelCodec, *, max_bytes: int | None = None
) -> torch.Tensor:
    from unimoe.encoders.audio import AudioEncoderConfig, load_audio

    wave = load_audio(source, AudioEncoderConfig(sampling_rate=config.sample_rate), max_bytes=max_bytes)
    return codec.encode(wave)


__all__ = ["VOCODERS", "MelCodec", "audio_target", "image_target", "tensor_to_image"]
