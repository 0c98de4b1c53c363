"""Generation heads: learnable query tokens whose last-layer hidden states drive a decoder.

* :class:`DiffusionHead` (images, audio): queries → connector → the cross-attention conditioning of a diffusers
  transformer, trained with flow matching and sampled with a diffusers scheduler + classifier-free guidance.
* :class:`ForecastHead` (time series): queries (+ the normalized context) → quantile forecasts.

The decoder is a diffusers ``ModelMixin`` nested in a transformers model, which has two pitfalls (DESIGN.md):
``post_init`` would re-initialize it with the LLM's init (so every decoder submodule is flagged as initialized), and
``from_pretrained`` builds it on the meta device, leaving non-persistent buffers such as PixArt's ``pos_embed``
invalid (so decoders are saved as diffusers subfolders and replaced by ``load_decoder`` after loading).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import AudioHeadConfig, DiffusionHeadConfig, ForecastHeadConfig, ImageHeadConfig, head_config
from .decoders import DIFFUSION_DECODERS, decoder_class


def mark_initialized(module: nn.Module) -> None:
    """Keep transformers' ``post_init`` / ``_init_weights`` away from a module built with its own initialization."""
    for sub in module.modules():
        sub._is_hf_initialized = True


class DiffusionHead(nn.Module):
    """``num_queries`` query embeddings, a connector to the decoder's conditioning width, a learned null condition
    for classifier-free guidance, and the diffusers decoder."""

    def __init__(self, config: DiffusionHeadConfig, hidden_size: int):
        super().__init__()
        self.config = config
        n, d = config.num_queries, config.cond_dim
        self.queries = nn.Parameter(torch.randn(n, hidden_size) * 0.02)  # (N, H)
        # The closing LayerNorm keeps the condition at unit scale: measured on a trained tiny model, the query states
        # encoded the requested digit perfectly (linear probe 1.0) but reached the decoder at ~0.1 scale, and the
        # decoder learned to ignore them (unconditional digits, guidance had no effect).
        self.connector = nn.Sequential(
            nn.LayerNorm(hidden_size), nn.Linear(hidden_size, d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d)
        )
        self.null_condition = nn.Parameter(torch.zeros(n + config.prompt_tokens, d))  # (N + P, D)
        self.vae = build_vae(config.vae) if getattr(config, "vae", None) else None
        self.decoder = self.build_decoder()
        mark_initialized(self.decoder)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The decoder's sample shape: the pixels, or the VAE latents of ``size`` × ``size`` images."""
        channels, height, width = self.config.sample_shape
        if self.vae is None:
            return channels, height, width
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.vae.config.latent_channels, height // factor, width // factor

    def build_decoder(self) -> nn.Module:
        cfg = self.config
        kwargs = {k: v for k, v in cfg.decoder.items() if k != "class"}
        channels, height, width = self.latent_shape
        return DIFFUSION_DECODERS.get(cfg.decoder["class"]).build(kwargs, channels, (height, width), cfg.cond_dim)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] → what the decoder denoises (identity in pixel space, scaled latent means with a VAE)."""
        if self.vae is None:
            return x
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return z
        return self.vae.decode(z.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    def load_decoder(self, path: str | Path, **hub_kwargs: Any) -> None:
        """Replace the decoder by the diffusers checkpoint at ``path`` (a local folder or a Hub id + subfolder)."""
        cls = decoder_class(self.config.decoder["class"])
        self.decoder = self._place(cls.from_pretrained(str(path), use_safetensors=True, **hub_kwargs))

    def load_vae(self, path: str | Path, **hub_kwargs: Any) -> None:
        from diffusers import AutoencoderKL

        self.vae = self._place(AutoencoderKL.from_pretrained(str(path), use_safetensors=True, **hub_kwargs))
        self.vae.requires_grad_(False)

    def _place(self, module: nn.Module) -> nn.Module:
        ref = self.queries
        module = module.to(ref.device)
        module = module if ref.dtype == torch.float32 else module.to(dtype=ref.dtype)
        mark_initialized(module)
        return module

    def predict(self, x: torch.Tensor, cond: torch.Tensor, timesteps: torch.Tensor, mask=None) -> torch.Tensor:
        return DIFFUSION_DECODERS.get(self.config.decoder["class"]).predict(self.decoder, x, cond, timesteps, mask)

    def condition(self, states: torch.Tensor) -> torch.Tensor:
        """``(n, T, H)`` last-layer states (the ``N`` queries, then ``prompt_tokens`` prompt states when configured)
        → ``(n, T, D)`` decoder conditioning."""
        return self.connector(states)

    def loss(self, states: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss. ``states (n, T, H)`` (see :meth:`condition`; ``mask (n, T)``, 1 = attend),
        ``targets (n, C, H', W')`` in [-1, 1]. Each item is noised ``noise_samples`` times (the decoder is small next
        to the LLM pass that produced the condition)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        cfg = self.config
        k = cfg.noise_samples
        cond = self.condition(states).repeat_interleave(k, dim=0)  # (n*k, T, D)
        x0 = self.encode(targets).to(cond.dtype).repeat_interleave(k, dim=0)  # (n*k, C, H', W')
        if mask is not None:
            mask = mask.repeat_interleave(k, dim=0)
        if cfg.cond_dropout > 0:
            drop = torch.rand(cond.shape[0], 1, 1, device=cond.device) < cfg.cond_dropout
            cond = torch.where(drop, self.null_condition.to(cond.dtype).expand_as(cond), cond)
            if mask is not None:  # the null condition is attended in full
                mask = torch.where(drop[:, :, 0], torch.ones_like(mask), mask)
        u = compute_density_for_timestep_sampling("logit_normal", cond.shape[0], logit_mean=0.0, logit_std=1.0)
        sigma = u.to(device=cond.device, dtype=cond.dtype)
        sigma = cfg.shift * sigma / (1 + (cfg.shift - 1) * sigma)  # the scheduler's timestep shift
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        velocity = self.predict(x_t, cond, sigma * 1000, mask)
        return F.mse_loss(velocity.float(), (noise - x0).float())

    @torch.no_grad()
    def sample(
        self,
        states: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """``(n, T, H)`` states (+ ``mask (n, T)``; see :meth:`loss`) → ``(n, C, H', W')`` samples in [-1, 1].
        ``generator`` may be a list with one generator per item (diffusers' convention): each item's noise then
        depends on its own generator only, not on the rest of the batch."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.utils.torch_utils import randn_tensor

        cfg = self.config
        steps = int(cfg.num_inference_steps if num_inference_steps is None else num_inference_steps)
        guidance = float(cfg.guidance_scale if guidance_scale is None else guidance_scale)
        if steps < 1 or not 1.0 <= guidance < math.inf:  # nan and inf too (inf drew a black image, nan no guidance)
            from unimoe.errors import ConfigError

            raise ConfigError(
                f"sampling: steps must be >= 1 and guidance a finite number >= 1, got {steps} and {guidance}"
            )
        cond = self.condition(states)  # (n, T, D)
        n = cond.shape[0]
        if guidance > 1.0:
            cond = torch.cat([cond, self.null_condition.to(cond.dtype).expand_as(cond)])
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask)])
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)
        scheduler.set_timesteps(steps, device=cond.device)  # required before every sampling loop
        x = randn_tensor((n, *self.latent_shape), generator=generator, device=cond.device, dtype=torch.float32)
        x = x.to(cond.dtype)
        for t in scheduler.timesteps:
            inp = torch.cat([x, x]) if guidance > 1.0 else x
            velocity = self.predict(inp, cond, t.expand(inp.shape[0]).to(cond.dtype), mask)
            if guidance > 1.0:
                v_cond, v_uncond = velocity.chunk(2)
                velocity = v_uncond + guidance * (v_cond - v_uncond)
            x = scheduler.step(velocity, t, x).prev_sample
        return self.decode(x).clamp(-1.0, 1.0)


class LinearForecasters(nn.Module):
    """The forecasting head's context skip: ``K`` linear forecasters (window → horizon, DLinear-style) mixed per item
    by a gate on the LLM's query states, so the prompt ("weekly CO2", "yearly sunspots") picks the linear model —
    a mixture of linear experts in the spirit of Moirai-MoE's token-level specialization, at the size of a few
    small matrices. ``K = 1`` is a single linear map (no gate). Every forecaster starts as the naive forecast
    (repeat the last value), so the skip starts naive whatever the gate picks."""

    def __init__(self, window: int, horizon: int, num_experts: int, gate_dim: int):
        super().__init__()
        self.window = window
        self.weight = nn.Parameter(torch.zeros(num_experts, window, horizon))
        self.bias = nn.Parameter(torch.zeros(num_experts, horizon))
        with torch.no_grad():
            self.weight[:, -1, :] = 1.0
        self.gate = None
        if num_experts > 1:
            self.gate = nn.Sequential(nn.LayerNorm(gate_dim), nn.Linear(gate_dim, num_experts))
            # a random gate: with a uniform one every forecaster would get the same gradient and stay identical
            nn.init.normal_(self.gate[1].weight, std=gate_dim**-0.5)
            nn.init.zeros_(self.gate[1].bias)
        mark_initialized(self)  # transformers' post_init must keep this init

    def forward(self, context: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``context (n, window)``, ``queries (n, D)`` → ``(n, horizon)``."""
        per_expert = torch.einsum("nw,kwh->nkh", context, self.weight) + self.bias  # (n, K, horizon)
        if self.gate is None:
            return per_expert[:, 0]
        mix = self.gate(queries).softmax(dim=-1)  # (n, K)
        return torch.einsum("nk,nkh->nh", mix, per_expert)


class ForecastHead(nn.Module):
    """Quantile forecasts ``(n, max_horizon, Q)`` in the context's normalized units."""

    def __init__(self, config: ForecastHeadConfig, hidden_size: int, context_length: int):
        super().__init__()
        self.config = config
        n, q, h = config.num_queries, len(config.quantiles), config.max_horizon
        self.queries = nn.Parameter(torch.randn(n, hidden_size) * 0.02)
        self.mlp = nn.Sequential(
            nn.LayerNorm(n * hidden_size), nn.Linear(n * hidden_size, config.hidden_size), nn.GELU(),
            nn.Linear(config.hidden_size, h * q),
        )  # fmt: skip
        self.skip = None
        if config.context_skip:
            self.skip = LinearForecasters(min(config.skip_window, context_length), h, config.skip_experts,
                                          gate_dim=n * hidden_size)  # fmt: skip
        # The quantile levels are built from the config on use, not held in a non-persistent buffer: such a buffer
        # is never materialized by from_pretrained's meta-device construction (it would hold garbage).

    def normalize(
        self, values: torch.Tensor, observed: torch.Tensor, encoder_normalized: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The units the head forecasts in (``config.scaling``). ``values`` / ``observed (n, L)`` (left-padded,
        1 = observed), ``encoder_normalized`` = the series encoder's ``(normalized, loc, scale)`` of the same context
        (what ``std`` uses) → ``(normalized (n, L) with 0 at unobserved steps, loc (n,), scale (n,))``."""
        if self.config.scaling == "std":
            return encoder_normalized
        weight = observed.to(values.dtype)
        count = weight.sum(dim=1)
        last = torch.where(count > 0, (weight.cumsum(dim=1) == count[:, None]).to(values.dtype).argmax(dim=1), 0)
        loc = values.gather(1, last[:, None]).squeeze(1) * (count > 0).to(values.dtype)  # last observed value
        both = weight[:, 1:] * weight[:, :-1]  # consecutive observed pairs
        step = ((values[:, 1:] - values[:, :-1]).abs() * both).sum(dim=1) / both.sum(dim=1).clamp_min(1)
        # a constant (or single-value) context has no step size: fall back to the encoder's scale, then to 1
        scale = torch.where(step > 0, step, encoder_normalized[2])
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return (values - loc[:, None]) / scale[:, None] * weight, loc, scale

    def forward(self, query_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``query_states (n, N, H)``, normalized ``context (n, L)`` → ``(n, max_horizon, Q)``."""
        cfg = self.config
        queries = query_states.flatten(1)  # (n, N*H)
        out = self.mlp(queries).view(-1, cfg.max_horizon, len(cfg.quantiles))
        if self.skip is not None:
            out = out + self.skip(context[:, -self.skip.window :], queries).unsqueeze(-1)
        return out

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pinball loss averaged over quantiles and observed target steps. ``target`` / ``mask`` ``(n, H)``."""
        levels = torch.tensor(self.config.quantiles, dtype=prediction.dtype, device=prediction.device)
        error = target.unsqueeze(-1) - prediction  # (n, H, Q)
        pinball = torch.maximum(levels * error, (levels - 1) * error).mean(-1)  # (n, H)
        return (pinball * mask).sum() / mask.sum().clamp_min(1)


def build_vae(spec: dict[str, Any]) -> nn.Module:
    """A frozen ``AutoencoderKL``: loaded from ``pretrained`` (or only shaped from its config when the model is being
    built on the meta device by ``from_pretrained``, which then loads the checkpoint's ``vae_image/``), or built from
    ``config``."""
    from diffusers import AutoencoderKL

    if "config" in spec:
        vae = AutoencoderKL(**spec["config"])
    elif torch.empty(0).device.type == "meta":
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(spec["pretrained"], subfolder=spec.get("subfolder")))
    else:
        vae = AutoencoderKL.from_pretrained(spec["pretrained"], subfolder=spec.get("subfolder"), use_safetensors=True)
    vae.requires_grad_(False)
    mark_initialized(vae)
    return vae


def build_head(modality: str, spec: dict[str, Any], *, hidden_size: int, context_length: int | None = None):
    cfg = head_config(modality, spec)
    if isinstance(cfg, ForecastHeadConfig):
        if context_length is None:
            from unimoe.errors import ConfigError

            raise ConfigError("generation.series: the forecasting head needs a series encoder (encoders.series)")
        return ForecastHead(cfg, hidden_size, context_length)
    return DiffusionHead(cfg, hidden_size)


__all__ = [
    "AudioHeadConfig", "DiffusionHead", "ForecastHead", "ImageHeadConfig", "LinearForecasters", "build_head",
    "mark_initialized",
]  # fmt: skip
