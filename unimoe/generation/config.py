"""Typed configs of the generation heads (``UniMoEConfig.generation[modality]``).

A diffusion head (image, audio) turns the last-layer hidden states of ``num_queries`` learnable query tokens into the
cross-attention conditioning of a diffusers transformer decoder; the forecasting head (series) turns them into point
and quantile forecasts. Every field is validated on construction with a message that names it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from unimoe.config_utils import check_positive_ints, config_from_dict
from unimoe.errors import ConfigError


def _tiny_decoder() -> dict[str, Any]:
    return {"class": "PixArtTransformer2DModel", "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2,
            "patch_size": 2}  # fmt: skip


@dataclass
class DiffusionHeadConfig:
    """What every diffusion head shares (the subclasses add the representation and its ``sample_shape``).

    ``decoder`` is ``{"class": <DIFFUSION_DECODERS name>, **architecture kwargs}``; the head fills in the channels,
    sample size and conditioning width. Training is flow matching (rectified flow, as in SD3): ``x_t = (1 - s) x_0
    + s * noise`` with ``s`` drawn logit-normally, the decoder predicts ``noise - x_0``; sampling integrates it with
    diffusers' ``FlowMatchEulerDiscreteScheduler`` and classifier-free guidance (the condition is dropped with
    probability ``cond_dropout`` in training and replaced by a learned null condition).

    The decoder cross-attends to the ``num_queries`` query states and, with ``prompt_tokens`` = P > 0, also to the
    last-layer states of the P tokens before the query run (the request itself, as text-to-image decoders attend to
    their text encoder's states; masked where they are padding). The queries alone suffice when the LLM's states are
    informative (a pretrained LLM, MetaQuery-style). Measured on the tiny preset trained on digit drawing alone
    (400 steps): neither helps there, since the whole last layer became the same for every prompt (spread 1e-4 of
    its norm) and the digits drawn were unconditional; in the mixed recipe the other tasks keep it informative."""

    num_queries: int = 8
    prompt_tokens: int = 0
    cond_dim: int = 32
    decoder: dict[str, Any] = field(default_factory=_tiny_decoder)
    num_inference_steps: int = 20
    guidance_scale: float = 2.0
    cond_dropout: float = 0.1
    noise_samples: int = 4
    shift: float = 1.0
    loss_coef: float = 1.0

    def __post_init__(self) -> None:
        where = f"generation.{self.modality}"
        check_positive_ints(self, ("num_queries", "cond_dim", "num_inference_steps", "noise_samples"), where)
        if not isinstance(self.prompt_tokens, int) or isinstance(self.prompt_tokens, bool) or self.prompt_tokens < 0:
            raise ConfigError(f"{where}.prompt_tokens: must be an integer >= 0, got {self.prompt_tokens!r}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ConfigError(f"{where}.cond_dropout: must be in [0, 1), got {self.cond_dropout}")
        if not 1.0 <= self.guidance_scale < math.inf:
            raise ConfigError(
                f"{where}.guidance_scale: must be a finite number >= 1 (1 = no guidance), got {self.guidance_scale}"
            )
        if self.shift <= 0 or self.loss_coef < 0:
            raise ConfigError(f"{where}: shift must be > 0 and loss_coef >= 0")
        if not isinstance(self.decoder, dict) or "class" not in self.decoder:
            raise ConfigError(f"{where}.decoder: expected a mapping with a 'class' key, got {self.decoder!r}")
        from unimoe.generation.decoders import DIFFUSION_DECODERS

        DIFFUSION_DECODERS.get(self.decoder["class"], field=f"{where}.decoder.class")

    modality = "image"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ImageHeadConfig(DiffusionHeadConfig):
    """Images of ``size`` × ``size`` (``channels`` 1 = greyscale, 3 = RGB) in [-1, 1]; saved images are upscaled
    (nearest) to ``output_size``.

    Pixel space by default (tiny presets). With ``vae`` the decoder works in the latent space of a frozen diffusers
    ``AutoencoderKL`` (real sizes): ``{"pretrained": <local dir or Hub id>, "subfolder": "vae"}`` loads one (e.g.
    a Stable Diffusion VAE), ``{"config": {...}}`` builds one from AutoencoderKL arguments. It is saved with the
    checkpoint as the diffusers subfolder ``vae_image/``."""

    size: int = 16
    channels: int = 1
    output_size: int = 32
    vae: dict[str, Any] | None = None

    modality = "image"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, ("size", "output_size"), "generation.image")
        if self.channels not in (1, 3):
            raise ConfigError(f"generation.image.channels: 1 (greyscale) or 3 (RGB), got {self.channels}")
        if self.vae is not None:
            keys = set(self.vae) if isinstance(self.vae, dict) else set()
            sources = keys & {"pretrained", "config"}
            if not keys <= {"pretrained", "subfolder", "config"} or len(sources) != 1:
                raise ConfigError(
                    "generation.image.vae: expected {'pretrained': path, ['subfolder': name]} or {'config': {...}}, "
                    f"got {self.vae!r}"
                )

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)


@dataclass
class AudioHeadConfig(DiffusionHeadConfig):
    """Log-mel spectrograms of ``n_mels`` × ``frames`` (``frames * hop_length / sample_rate`` seconds), turned into a
    waveform by ``vocoder`` (``griffin_lim``: torchaudio's InverseMelScale + GriffinLim). The dB scale: the
    waveform is peak-normalized, then ``[top_db - range_db, top_db]`` maps to [-1, 1]."""

    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 384
    n_mels: int = 32
    frames: int = 32
    top_db: float = 45.0
    range_db: float = 80.0
    vocoder: str = "griffin_lim"
    griffin_lim_iters: int = 32

    modality = "audio"

    def __post_init__(self) -> None:
        super().__post_init__()
        where = "generation.audio"
        check_positive_ints(
            self, ("sample_rate", "n_fft", "hop_length", "n_mels", "frames", "griffin_lim_iters"), where
        )
        if self.hop_length > self.n_fft:
            raise ConfigError(f"{where}.hop_length: {self.hop_length} is larger than n_fft={self.n_fft}")
        if self.range_db <= 0:
            raise ConfigError(f"{where}.range_db: must be > 0, got {self.range_db}")
        from unimoe.generation.codecs import VOCODERS

        VOCODERS.get(self.vocoder, field=f"{where}.vocoder")

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (1, self.n_mels, self.frames)


@dataclass
class ForecastHeadConfig:
    """Forecasts of up to ``max_horizon`` steps of a prompt's last time series (its first channel), as the
    ``quantiles`` of the predictive distribution (the point forecast is the median), trained with the pinball loss
    in the context's normalized units. ``scaling`` picks those units: ``naive`` (default) measures the series from
    its last observed value in units of its mean absolute one-step change (the in-sample error of the naive
    forecast), so the loss is the scaled error MASE reports and a smooth trending series, whose changes are tiny
    next to its range, weighs as much as a noisy one; ``std`` is the series encoder's instance normalization (mean
    and standard deviation), under which such series hardly enter the loss.

    ``context_skip`` adds ``skip_experts`` linear forecasters of the last ``skip_window`` normalized values
    (DLinear-style), mixed per item by a gate on the query states, to the query-token path: the prompt picks the
    linear model, the LLM's states refine it. Unobserved (padding) steps read as 0, i.e. as the last value. Measured
    on ``ts_forecast`` alone (400 steps, tiny model): MASE 1.36 with ``std`` and one 16-step map, 1.12 with
    ``naive``, 1.08 with a 48-step window, 0.76 with 8 gated forecasters (a global ridge on 48 lags: 1.14; one ridge
    per series: 0.74)."""

    num_queries: int = 4
    max_horizon: int = 24
    default_horizon: int = 12
    quantiles: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    hidden_size: int = 128
    context_skip: bool = True
    skip_window: int = 48
    skip_experts: int = 8
    loss_coef: float = 1.0
    scaling: str = "naive"

    modality = "series"

    def __post_init__(self) -> None:
        where = "generation.series"
        names = ("num_queries", "max_horizon", "default_horizon", "hidden_size", "skip_window", "skip_experts")
        check_positive_ints(self, names, where)
        if self.default_horizon > self.max_horizon:
            raise ConfigError(f"{where}.default_horizon: {self.default_horizon} exceeds max_horizon={self.max_horizon}")
        qs = [float(q) for q in self.quantiles]
        if not qs or any(not 0.0 < q < 1.0 for q in qs) or qs != sorted(set(qs)):
            raise ConfigError(f"{where}.quantiles: increasing distinct values in (0, 1), got {self.quantiles}")
        if 0.5 not in qs:
            raise ConfigError(f"{where}.quantiles: must contain 0.5 (the point forecast), got {self.quantiles}")
        self.quantiles = qs
        if self.loss_coef < 0:
            raise ConfigError(f"{where}.loss_coef: must be >= 0, got {self.loss_coef}")
        if self.scaling not in FORECAST_SCALINGS:
            raise ConfigError(f"{where}.scaling: one of {', '.join(FORECAST_SCALINGS)}, got {self.scaling!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FORECAST_SCALINGS = ("naive", "std")

HEAD_CONFIGS: dict[str, type] = {"image": ImageHeadConfig, "audio": AudioHeadConfig, "series": ForecastHeadConfig}


def head_config(modality: str, spec: dict[str, Any] | Any):
    """The typed config of ``generation[modality]``."""
    if modality not in HEAD_CONFIGS:
        raise ConfigError(f"generation.{modality}: no generation head for this modality; choose one of "
                          f"{', '.join(HEAD_CONFIGS)}")  # fmt: skip
    spec = {k: v for k, v in dict(spec or {}).items() if k != "trainable"}
    return config_from_dict(HEAD_CONFIGS[modality], spec, where=f"generation.{modality}")
