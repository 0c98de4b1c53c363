"""Which diffusers transformers a diffusion head can use, and how each is built and called.

The class is configuration (``decoder: {"class": "PixArtTransformer2DModel", ...}``). Their forward signatures
differ (PixArt wants ``added_cond_kwargs`` and predicts a learned variance too; SD3 wants pooled projections), so
each registered decoder is a small adapter with ``build`` and ``predict``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from unimoe.registry import Registry


@dataclass(frozen=True)
class DecoderAdapter:
    #: (architecture kwargs, channels, (height, width), conditioning width) -> the diffusers model
    build: Callable[[dict[str, Any], int, tuple[int, int], int], nn.Module]
    #: (model, x_t (n, C, H, W), conditioning (n, T, D), timesteps (n,) in [0, 1000], conditioning mask (n, T) with
    #: 1 = attend, or None) -> velocity (n, C, H, W)
    predict: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    model_class: str


DIFFUSION_DECODERS: Registry[DecoderAdapter] = Registry("diffusion decoder")


def decoder_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, DIFFUSION_DECODERS.get(name).model_class)


def _inner_dim(kwargs: dict[str, Any]) -> int:
    return int(kwargs.get("num_attention_heads", 2)) * int(kwargs.get("attention_head_dim", 16))


def _build_pixart(kwargs: dict[str, Any], channels: int, size: tuple[int, int], cond_dim: int) -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    if size[0] != size[1]:
        raise ValueError(f"PixArtTransformer2DModel needs square samples, got {size}")
    return PixArtTransformer2DModel(
        **{"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "patch_size": 2, **kwargs},
        in_channels=channels, out_channels=2 * channels, sample_size=size[0],
        cross_attention_dim=_inner_dim(kwargs), caption_channels=cond_dim,
    )  # fmt: skip


def _predict_pixart(model: nn.Module, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, mask=None) -> torch.Tensor:
    out = model(x, encoder_hidden_states=cond, timestep=t, encoder_attention_mask=mask,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})  # fmt: skip
    return out.sample[:, : x.shape[1]]  # the second half of the channels is the learned variance


def _build_sana(kwargs: dict[str, Any], channels: int, size: tuple[int, int], cond_dim: int) -> nn.Module:
    from diffusers import SanaTransformer2DModel

    kwargs = {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "patch_size": 1, **kwargs}
    heads = kwargs.pop("num_cross_attention_heads", kwargs["num_attention_heads"])
    head_dim = kwargs.pop("cross_attention_head_dim", kwargs["attention_head_dim"])
    return SanaTransformer2DModel(
        **kwargs, in_channels=channels, out_channels=channels, sample_size=max(size),
        num_cross_attention_heads=heads, cross_attention_head_dim=head_dim, cross_attention_dim=heads * head_dim,
        caption_channels=cond_dim,
    )  # fmt: skip


def _predict_sana(model: nn.Module, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, mask=None) -> torch.Tensor:
    return model(x, encoder_hidden_states=cond, timestep=t, encoder_attention_mask=mask).sample


def _build_sd3(kwargs: dict[str, Any], channels: int, size: tuple[int, int], cond_dim: int) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    kwargs = {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "patch_size": 2, **kwargs}
    return SD3Transformer2DModel(
        **kwargs, in_channels=channels, out_channels=channels, sample_size=max(size),
        joint_attention_dim=cond_dim, caption_projection_dim=_inner_dim(kwargs), pooled_projection_dim=cond_dim,
        pos_embed_max_size=max(size) // kwargs["patch_size"],
    )  # fmt: skip


def _predict_sd3(model: nn.Module, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, mask=None) -> torch.Tensor:
    # SD3's joint attention takes no mask: masked tokens are zeroed, and the pooled projection averages the others
    if mask is None:
        pooled = cond.mean(dim=1)
    else:
        weight = mask.to(cond.dtype).unsqueeze(-1)
        cond = cond * weight
        pooled = cond.sum(dim=1) / weight.sum(dim=1).clamp_min(1)
    return model(x, encoder_hidden_states=cond, pooled_projections=pooled, timestep=t).sample


DIFFUSION_DECODERS.register("PixArtTransformer2DModel")(
    DecoderAdapter(_build_pixart, _predict_pixart, "PixArtTransformer2DModel")
)
DIFFUSION_DECODERS.register("SanaTransformer2DModel")(
    DecoderAdapter(_build_sana, _predict_sana, "SanaTransformer2DModel")
)
DIFFUSION_DECODERS.register("SD3Transformer2DModel")(DecoderAdapter(_build_sd3, _predict_sd3, "SD3Transformer2DModel"))

__all__ = ["DIFFUSION_DECODERS", "DecoderAdapter", "decoder_class"]
