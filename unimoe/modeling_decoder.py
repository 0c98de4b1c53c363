"""The text decoder under UniMoE: transformers' attention, norm and rotary embedding of a registered family (Qwen2,
Qwen3, Llama) around FFNs that are :class:`~unimoe.moe.SparseMoEBlock` on the MoE layers.

Read top to bottom: the decoder family registry, the text model's output, one decoder layer, the text model. The
multimodal model that wraps it (encoders, connectors, generation heads, the LM head) is in
:mod:`unimoe.modeling_unimoe`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.utils import ModelOutput

from unimoe.configuration_unimoe import UniMoEConfig
from unimoe.moe import RouterStats, SparseMoEBlock
from unimoe.registry import Registry


# ----------------------------------------------------------------------------- decoder families
class DecoderFamily(NamedTuple):
    attention: type[nn.Module]
    norm: type[nn.Module]
    rotary: type[nn.Module]
    mlp: type[nn.Module]


DECODER_FAMILIES: Registry[DecoderFamily] = Registry("decoder family")


def _register_families() -> None:
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.qwen2 import modeling_qwen2 as qwen2
    from transformers.models.qwen3 import modeling_qwen3 as qwen3

    DECODER_FAMILIES.register("qwen2")(
        DecoderFamily(qwen2.Qwen2Attention, qwen2.Qwen2RMSNorm, qwen2.Qwen2RotaryEmbedding, qwen2.Qwen2MLP)
    )
    DECODER_FAMILIES.register("qwen3")(
        DecoderFamily(qwen3.Qwen3Attention, qwen3.Qwen3RMSNorm, qwen3.Qwen3RotaryEmbedding, qwen3.Qwen3MLP)
    )
    DECODER_FAMILIES.register("llama")(
        DecoderFamily(llama.LlamaAttention, llama.LlamaRMSNorm, llama.LlamaRotaryEmbedding, llama.LlamaMLP)
    )


_register_families()


# ----------------------------------------------------------------------------- outputs
@dataclass
class UniMoEModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    modality_loss: torch.Tensor | None = None
    router_stats: tuple[RouterStats, ...] | None = None
    inputs_embeds: torch.Tensor | None = None  # (B, S, H) with the media tokens, when output_inputs_embeds=True


# ----------------------------------------------------------------------------- decoder
class UniMoEDecoderLayer(nn.Module):
    """Pre-norm attention + FFN, with the FFN a :class:`SparseMoEBlock` on MoE layers and the family MLP elsewhere."""

    def __init__(self, config: UniMoEConfig, layer_idx: int):
        super().__init__()
        tc = config.text_config
        family = DECODER_FAMILIES.get(tc.model_type, field="text_config.model_type")
        self.self_attn = family.attention(tc, layer_idx)
        self.input_layernorm = family.norm(tc.hidden_size, eps=tc.rms_norm_eps)
        self.post_attention_layernorm = family.norm(tc.hidden_size, eps=tc.rms_norm_eps)
        moe = config.moe_config
        self.is_moe = moe.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = SparseMoEBlock(
                moe, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size, modalities=config.modalities
            )
        else:
            self.mlp = family.mlp(tc)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        past_key_values: Cache | None,
        token_mask: torch.Tensor | None,
        modality_ids: torch.Tensor | None,
        output_router_stats: bool,
        compute_router_losses: bool = True,
        forced_experts: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        moe_out = None
        if self.is_moe:
            moe_out = self.mlp(
                hidden_states,
                token_mask=token_mask,
                modality_ids=modality_ids,
                output_stats=output_router_stats,
                compute_losses=compute_router_losses,
                forced_experts=forced_experts,
            )
            hidden_states = moe_out.hidden_states
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states, moe_out


class UniMoETextModel(nn.Module):
    """Embeddings, decoder layers, final norm. Parameter names follow transformers' decoders (``embed_tokens``,
    ``layers.N.self_attn``, ``layers.N.mlp``, ``norm``) so dense checkpoints map onto it by name."""

    def __init__(self, config: UniMoEConfig):
        super().__init__()
        tc = config.text_config
        family = DECODER_FAMILIES.get(tc.model_type, field="text_config.model_type")
        self.config = tc
        self.embed_tokens = nn.Embedding(tc.vocab_size, tc.hidden_size, getattr(tc, "pad_token_id", None))
        self.layers = nn.ModuleList(UniMoEDecoderLayer(config, i) for i in range(tc.num_hidden_layers))
        self.norm = family.norm(tc.hidden_size, eps=tc.rms_norm_eps)
        self.rotary_emb = family.rotary(config=tc)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        modality_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_router_stats: bool = False,
        compute_router_losses: bool = True,
        forced_experts: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> UniMoEModelOutput:
        batch, seq, _ = inputs_embeds.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(seq, device=inputs_embeds.device) + past).unsqueeze(0)  # (1, S)

        # Padding mask of the *current* tokens (a generation step's 2D mask also covers the cache).
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -seq:].bool()  # (B, S)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        all_hidden = [hidden_states] if output_hidden_states else None
        moe_outputs = []
        for layer in self.layers:
            hidden_states, moe_out = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                token_mask=token_mask,
                modality_ids=modality_ids,
                output_router_stats=output_router_stats,
                compute_router_losses=compute_router_losses,
                forced_experts=forced_experts,
                **kwargs,
            )
            if moe_out is not None:
                moe_outputs.append(moe_out)
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        hidden_states = self.norm(hidden_states)

        zero = hidden_states.new_zeros((), dtype=torch.float32)

        def mean_loss(name: str) -> torch.Tensor:
            return torch.stack([getattr(o, name) for o in moe_outputs]).mean() if moe_outputs else zero

        return UniMoEModelOutput(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            aux_loss=mean_loss("aux_loss"),
            z_loss=mean_loss("z_loss"),
            modality_loss=mean_loss("modality_loss"),
            router_stats=tuple(o.stats for o in moe_outputs) if output_router_stats else None,
        )


__all__ = ["DECODER_FAMILIES", "DecoderFamily", "UniMoEDecoderLayer", "UniMoEModelOutput", "UniMoETextModel"]
