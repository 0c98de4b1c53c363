"""Connectors between an encoder's tokens ``(N, T, D_enc)`` and the LLM's hidden size ``(N, T', H)``.

* ``mlp`` — LLaVA-1.5's 2-layer GELU projector, with optional average pooling of ``pool`` neighbouring tokens
  (fewer LLM tokens for long token streams such as audio).
* ``resampler`` — Perceiver / Q-Former style: ``num_queries`` learnable queries cross-attend to the encoder tokens
  (``num_layers`` blocks of cross-attention + MLP), so every item costs a fixed token budget.

``norm`` (``mlp``) normalizes every output token (``layernorm`` / ``rmsnorm``) and multiplies it by a learnable gain
that starts at ``norm_scale``. Why: an encoder trained from scratch has no fixed output scale — in the offline tiny
recipe the image connector's tokens grew to ~200× the norm of the text embeddings they sit among, which starves the
encoder of gradient (the decoder's RMSNorm divides it by that norm) and lets one modality's tokens dominate the
residual stream. A normalized output keeps media tokens at the text embeddings' scale whatever the encoder does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unimoe.config_utils import check_positive_ints, config_from_dict
from unimoe.errors import ConfigError
from unimoe.registry import Registry

CONNECTORS: Registry[type[nn.Module]] = Registry("connector type")


NORMS = ("none", "layernorm", "rmsnorm")


@dataclass
class MLPProjectorConfig:
    pool: int = 1
    hidden_mult: float = 1.0
    norm: str = "none"  # none | layernorm | rmsnorm: normalize each output token (see the module docstring)
    norm_scale: float = 1.0  # initial gain of the normalized output (the per-element RMS it starts at)

    def __post_init__(self) -> None:
        check_positive_ints(self, ("pool",), "connectors.*")
        if self.norm not in NORMS:
            raise ConfigError(f"connectors.*.norm: unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        if not self.norm_scale > 0:
            raise ConfigError(f"connectors.*.norm_scale: must be > 0, got {self.norm_scale}")


class OutputNorm(nn.Module):
    """LayerNorm or RMSNorm without affine parameters, times a learnable per-channel ``gain`` that starts at
    ``scale``. Not an ``nn.LayerNorm``: transformers' weight initialization resets every ``*LayerNorm`` /
    ``*RMSNorm`` weight to 1, which would undo ``scale``."""

    def __init__(self, dim: int, kind: str, scale: float, eps: float = 1e-6):
        super().__init__()
        self.kind = kind
        self.eps = eps
        self.gain = nn.Parameter(torch.full((dim,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            x = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        else:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.gain


@CONNECTORS.register("mlp")
class MLPProjector(nn.Module):
    Config = MLPProjectorConfig

    def __init__(self, config: MLPProjectorConfig, *, input_dim: int, output_dim: int):
        super().__init__()
        self.config = config
        hidden = int(output_dim * config.hidden_mult)
        self.linear_1 = nn.Linear(input_dim, hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, output_dim)
        # only built when asked for, so checkpoints of connectors without it keep their exact parameter set
        self.norm = None if config.norm == "none" else OutputNorm(output_dim, config.norm, config.norm_scale)

    @staticmethod
    def num_tokens(config: MLPProjectorConfig, encoder_tokens: int) -> int:
        return -(-encoder_tokens // config.pool)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, T, D)`` → ``(N, ceil(T / pool), H)``."""
        if self.config.pool > 1:
            # average pool along the token axis; the last window may be shorter (ceil_mode)
            tokens = F.avg_pool1d(tokens.transpose(1, 2), self.config.pool, ceil_mode=True).transpose(1, 2)
        out = self.linear_2(self.act(self.linear_1(tokens)))
        return out if self.norm is None else self.norm(out)


@dataclass
class QueryResamplerConfig:
    num_queries: int = 16
    num_layers: int = 1
    num_heads: int = 4
    mlp_ratio: float = 2.0

    def __post_init__(self) -> None:
        check_positive_ints(self, ("num_queries", "num_layers", "num_heads"), "connectors.*")


class _ResamplerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, queries: torch.Tensor, context: torch.Tensor, key_padding_mask: torch.Tensor | None):
        kv = self.norm_kv(context)
        attended, _ = self.attn(self.norm_q(queries), kv, kv, key_padding_mask=key_padding_mask, need_weights=False)
        queries = queries + attended
        return queries + self.mlp(self.norm_mlp(queries))


@CONNECTORS.register("resampler")
class QueryResampler(nn.Module):
    """Learnable queries in the LLM width cross-attending to the (projected) encoder tokens."""

    Config = QueryResamplerConfig
    accepts_token_mask = True

    def __init__(self, config: QueryResamplerConfig, *, input_dim: int, output_dim: int):
        super().__init__()
        if output_dim % config.num_heads != 0:
            raise ConfigError(
                f"connectors.*.num_heads: the LLM hidden size {output_dim} is not divisible by {config.num_heads}"
            )
        self.config = config
        self.input_proj = nn.Linear(input_dim, output_dim)
        self.queries = nn.Parameter(torch.randn(config.num_queries, output_dim) * 0.02)
        self.blocks = nn.ModuleList(
            _ResamplerBlock(output_dim, config.num_heads, config.mlp_ratio) for _ in range(config.num_layers)
        )
        self.norm_out = nn.LayerNorm(output_dim)

    @staticmethod
    def num_tokens(config: QueryResamplerConfig, encoder_tokens: int) -> int:
        return config.num_queries

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, T, D)`` (+ ``mask (N, T)`` True = real token) → ``(N, num_queries, H)``."""
        context = self.input_proj(tokens)  # (N, T, H)
        queries = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (N, Q, H)
        key_padding_mask = ~mask.bool() if mask is not None else None
        for block in self.blocks:
            queries = block(queries, context, key_padding_mask)
        return self.norm_out(queries)


def _split_spec(spec: dict[str, Any], modality: str) -> tuple[type[nn.Module], Any]:
    spec = dict(spec)
    name = spec.pop("type", "mlp")
    cls = CONNECTORS.get(name, field=f"connectors.{modality}.type")
    try:
        return cls, config_from_dict(cls.Config, spec, where=f"connectors.{modality}")
    except ConfigError as err:  # the configs name their fields "connectors.*.": say which connector it is
        raise ConfigError(str(err).replace("connectors.*.", f"connectors.{modality}.")) from None


def build_connector(modality: str, spec: dict[str, Any], *, input_dim: int, output_dim: int) -> nn.Module:
    cls, config = _split_spec(spec, modality)
    return cls(config, input_dim=input_dim, output_dim=output_dim)


def connector_tokens(modality: str, spec: dict[str, Any], encoder_tokens: int) -> int:
    """How many LLM tokens one encoder unit of ``encoder_tokens`` tokens becomes (no network built)."""
    cls, config = _split_spec(spec, modality)
    return cls.num_tokens(config, encoder_tokens)
