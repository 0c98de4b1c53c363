"""UniMoE: a transformers decoder (Qwen2 / Qwen3 / Llama attention, RoPE, KV cache) whose FFNs are sparse MoE blocks,
with modality encoders and connectors feeding it and generation heads reading from it.

Read top to bottom: the causal-LM output dataclass, the pretrained base, the model that holds the text decoder
(:mod:`unimoe.modeling_decoder`: family registry, decoder layer, text model) with the encoders, connectors and
generation heads, and the causal-LM head.

The model takes ``input_ids`` or ``inputs_embeds`` plus per-token ``modality_ids``; routers see only hidden
states, ``modality_ids`` feed the routing statistics and the optional modality-routing loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import ModelOutput

from unimoe.configuration_unimoe import UniMoEConfig, strip_component_keys
from unimoe.connectors import build_connector
from unimoe.contrastive import media_text_loss as contrastive_media_text_loss
from unimoe.encoders import build_encoder
from unimoe.errors import ConfigError, InputError
from unimoe.generation.heads import DiffusionHead, ForecastHead, build_head
from unimoe.modeling_decoder import DECODER_FAMILIES, UniMoEModelOutput, UniMoETextModel
from unimoe.moe import LoRAExperts, MoEConfig, RouterStats, SparseMoEBlock, SwiGLUExperts


def media_keys(config: UniMoEConfig) -> set[str]:
    """The model inputs that carry media: ``{modality}_values`` and ``{modality}_mask``."""
    return {f"{m}_{suffix}" for m in config.modalities[1:] for suffix in ("values", "mask")}


#: Training targets of the generation heads (built by the processor from media parts of assistant turns).
GENERATION_TARGET_KEYS = ("gen_image_values", "gen_audio_values", "gen_series_values", "gen_series_mask")


# ----------------------------------------------------------------------------- outputs
@dataclass
class UniMoECausalLMOutput(ModelOutput):
    """Every loss is named. ``loss`` is what the trainer backpropagates:
    ``lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss + modality_loss_coef * modality_loss`` plus each
    generation head's ``loss_coef`` times its loss (``diffusion_loss``: the flow-matching loss of the image and audio
    heads, summed; ``forecast_loss``: the pinball loss of the forecasting head), plus ``media_text_loss_coef`` times
    ``media_text_loss`` when a training stage asks for it (:mod:`unimoe.contrastive`). ``router_stats``
    holds one :class:`RouterStats` per MoE layer when ``output_router_stats=True``; ``last_hidden_state`` (after the
    final norm) is returned when ``output_hidden_states=True``, for the generation heads."""

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    modality_loss: torch.Tensor | None = None
    diffusion_loss: torch.Tensor | None = None
    forecast_loss: torch.Tensor | None = None
    media_text_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    last_hidden_state: torch.Tensor | None = None
    router_stats: tuple[RouterStats, ...] | None = None


# ----------------------------------------------------------------------------- pretrained base
class UniMoEPreTrainedModel(PreTrainedModel):
    config_class = UniMoEConfig
    config: UniMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["UniMoEDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the dispatch reads chunk sizes on the host

    def __init__(self, config: UniMoEConfig, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        # transformers sets the attention implementation on the top config only and expects each sub-config to
        # belong to its own PreTrainedModel; our decoder is a plain module reading `text_config`, so hand it down.
        text_config = self.config.text_config
        if text_config._attn_implementation is None:
            text_config._attn_implementation_internal = self.config._attn_implementation

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, SwiGLUExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, LoRAExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            for name in ("lora_A_gate_up", "lora_A_down"):  # as LoRAExperts.reset_lora: each expert's (r, in) A
                a = getattr(module, name)  # (E, r, in): kaiming on the 3-D tensor would take r * in as the fan-in
                bound = 1.0 / a.shape[-1] ** 0.5  # kaiming_uniform(a=sqrt(5)) of an (r, in) matrix: U(+-1/sqrt(in))
                init.uniform_(a, -bound, bound)
            for name in ("lora_B_gate", "lora_B_up", "lora_B_down"):
                init.zeros_(getattr(module, name))
        elif isinstance(module, SparseMoEBlock):
            init.zeros_(module.router_bias)
            # non-persistent buffers: a model built on the meta device (from_pretrained) holds raw memory there
            init.copy_(module.modality_target, module.modality_target_from_config())
            init.zeros_(module._load_since_update)


class UniMoEModel(UniMoEPreTrainedModel):
    """The language model plus one encoder and one connector per configured modality.

    Media enter as ``{modality}_values`` (and optional ``{modality}_mask``) tensors whose first axis is the
    processor's units (images, windows, clips, clouds, series) in order of appearance. Their connector outputs
    replace the placeholder tokens (``config.media_token_ids``) in order, and ``modality_ids`` is derived from the
    placeholders when not given.
    """

    def __init__(self, config: UniMoEConfig):
        super().__init__(config)
        self.language_model = UniMoETextModel(self.config)  # self.config carries the attention implementation
        self.encoders = nn.ModuleDict()
        self.connectors = nn.ModuleDict()
        hidden = self.config.text_config.hidden_size
        for modality, spec in self.config.encoders.items():
            encoder = build_encoder(modality, strip_component_keys(spec))
            self.encoders[modality] = encoder
            self.connectors[modality] = build_connector(
                modality,
                strip_component_keys(self.config.connectors[modality]),
                input_dim=encoder.output_dim,
                output_dim=hidden,
            )
        # Generation heads: their diffusers decoders keep their own initialization (see unimoe.generation.heads).
        self.generation_heads = nn.ModuleDict()
        for modality, spec in self.config.generation.items():
            context = self.encoders["series"].config.context_length if modality == "series" else None
            self.generation_heads[modality] = build_head(modality, spec, hidden_size=hidden, context_length=context)
        self.post_init()
        self.init_media_modules()
        self.apply_trainable_flags()

    @torch.no_grad()
    def init_media_modules(self) -> None:
        """``init: fan_in`` in an encoder or connector spec: LeCun-normal linear and convolution weights, zero biases
        (see ``configuration_unimoe.ENCODER_INITS`` for why). Runs after ``post_init``; weights loaded from a
        checkpoint or a ``pretrained`` file replace these values afterwards."""
        for modality in self.encoders:
            for spec, module in (
                (self.config.encoders[modality], self.encoders[modality]),
                (self.config.connectors[modality], self.connectors[modality]),
            ):
                if spec.get("init", "default") == "fan_in" and not spec.get("pretrained"):
                    self._fan_in_init(module)

    @staticmethod
    def _fan_in_init(root: nn.Module) -> None:
        for module in root.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not module.weight.is_meta:
                # torch.nn.init, not transformers' init: post_init has marked these weights initialized
                nn.init.normal_(module.weight, mean=0.0, std=module.weight[0].numel() ** -0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def apply_trainable_flags(self) -> None:
        """``trainable: false`` in an encoder or connector spec freezes that module."""
        for key in self.config.frozen_components():
            part, modality = key.split(".", 1)
            modules = getattr(self, part)
            if modality in modules:
                modules[modality].requires_grad_(False)

    def modality_ids_from_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Media placeholders and generation query slots get their modality's id; everything else is text (0)."""
        modality_ids = torch.zeros_like(input_ids)
        for modality, token_id in self.config.media_token_ids.items():
            modality_ids[input_ids == token_id] = self.config.modalities.index(modality)
        for modality in self.generation_heads:
            query_id = self.config.generation_token_ids[modality]["query"]
            modality_ids[input_ids == query_id] = self.config.modalities.index(modality)
        return modality_ids

    def embed_queries(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Write each head's learnable query embeddings over its query slots: the k-th slot of a run gets query k."""
        for modality, head in self.generation_heads.items():
            is_query = input_ids == self.config.generation_token_ids[modality]["query"]  # (B, S)
            if not bool(is_query.any()):
                continue
            count = is_query.long().cumsum(dim=1)
            before_run = torch.where(is_query, torch.zeros_like(count), count).cummax(dim=1).values
            slot = (count - before_run - 1).clamp(0, head.queries.shape[0] - 1)  # index within the run
            # an embedding lookup, not ``queries[slot]``: the backward of advanced indexing accumulates with
            # parallel float atomics on CPU (a different gradient in the last bit from run to run)
            queries = F.embedding(slot, head.queries.to(inputs_embeds.dtype))  # (B, S, H)
            inputs_embeds = torch.where(is_query.unsqueeze(-1), queries, inputs_embeds)
        return inputs_embeds

    def query_states(self, input_ids: torch.Tensor, hidden: torch.Tensor, modality: str) -> torch.Tensor:
        """The last-layer states of every query run of ``modality`` in row-major order → ``(n, N, H)``."""
        head = self.generation_heads[modality]
        is_query = input_ids == self.config.generation_token_ids[modality]["query"]
        n_queries = head.queries.shape[0]
        states = hidden[is_query]  # (n * N, H)
        if states.shape[0] % n_queries:
            raise InputError(
                f"{modality} generation: {states.shape[0]} query slots is not a multiple of the head's {n_queries} "
                "queries; build inputs with UniMoEProcessor"
            )
        return states.view(-1, n_queries, hidden.shape[-1])

    def query_run_starts(self, input_ids: torch.Tensor, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows (n,), cols (n,))`` of the first slot of every query run of ``modality``, row-major (the order of
        :meth:`query_states`)."""
        is_query = input_ids == self.config.generation_token_ids[modality]["query"]
        run_start = is_query & ~torch.nn.functional.pad(is_query, (1, 0))[:, :-1]  # (B, S)
        return run_start.nonzero(as_tuple=True)

    def condition_states(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, modality: str, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a diffusion head conditions on, per query run in row-major order: ``(states (n, N + P, H), mask)``
        — the run's ``N`` query states, then the last-layer states of the ``P = prompt_tokens`` positions before the
        run (``mask (n, N + P)``, 0 where such a position is before the row's start or padding). ``P = 0``: the query
        states alone and no mask."""
        queries = self.query_states(input_ids, hidden, modality)  # (n, N, H)
        window = self.generation_heads[modality].config.prompt_tokens
        if window == 0:
            return queries, None
        rows, cols = self.query_run_starts(input_ids, modality)
        positions = cols[:, None] - window + torch.arange(window, device=cols.device)  # (n, P)
        valid = positions >= 0
        positions = positions.clamp_min(0)
        if attention_mask is not None:
            valid = valid & (attention_mask[:, -input_ids.shape[1] :][rows[:, None], positions] > 0)
        prompt = hidden[rows[:, None], positions]  # (n, P, H)
        mask = torch.cat([torch.ones_like(valid[:, :1]).expand(-1, queries.shape[1]), valid], dim=1)
        return torch.cat([queries, prompt.to(queries.dtype)], dim=1), mask.long()

    def forecast_context(
        self, input_ids: torch.Tensor, series_values: torch.Tensor | None, series_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For every series query run: the prompt's last series before it (its first channel).

        Returns ``(normalized (n, L), loc (n,), scale (n,), raw (n, L), observed (n, L))``, normalized in the
        forecasting head's units (its ``scaling``). Series units are matched to runs through the placeholder tokens
        (units fill placeholders in row-major order, ``tokens_per_unit`` placeholders each)."""
        from unimoe.encoders.series import fit_context

        placeholder = self.config.media_token_ids.get("series")
        if series_values is None or placeholder is None:
            raise InputError("forecasting needs a time series in the prompt (a series part before the request)")
        is_series = input_ids == placeholder
        seen = is_series.flatten().long().cumsum(0).view_as(input_ids)  # placeholders up to here, row-major
        in_row = is_series.long().cumsum(dim=1)
        tokens_per_unit = int(is_series.sum()) // series_values.shape[0]
        rows, cols = self.query_run_starts(input_ids, "series")
        if bool((in_row[rows, cols] == 0).any()):
            raise InputError("forecasting needs a time series in the prompt (a series part before the request)")
        units = (seen[rows, cols] - 1) // tokens_per_unit  # (n,)
        encoder = self.encoders["series"]
        cfg = encoder.config
        values = series_values[units]
        mask = series_mask[units] if series_mask is not None else torch.ones_like(values)
        if values.ndim == 2:
            values, mask = values.unsqueeze(-1), mask.unsqueeze(-1)
        values, mask = fit_context(values.float(), mask.float(), cfg.context_length, cfg.num_channels)
        normalized, loc, scale = encoder.normalize(values, mask)
        raw, observed = values[..., 0], mask[..., 0]
        head = self.generation_heads["series"]
        normalized, loc, scale = head.normalize(raw, observed, (normalized[..., 0], loc[:, 0, 0], scale[:, 0, 0]))
        return normalized, loc, scale, raw, observed

    def check_media_given(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]) -> None:
        """A prompt with a modality's placeholder tokens but no ``{modality}_values`` would embed the placeholders as
        plain tokens and answer about media it never saw: an InputError instead."""
        for modality in self.encoders:
            token_id = self.config.media_token_ids.get(modality)
            if token_id is None or f"{modality}_values" in media:
                continue
            n_slots = int((input_ids == token_id).sum())
            if n_slots:
                raise InputError(
                    f"{modality}: the prompt has {n_slots} placeholder tokens but no {modality}_values were given; "
                    "build inputs with UniMoEProcessor from messages that carry the media"
                )

    def embed_media(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, media: dict[str, torch.Tensor]):
        """Encode each modality's units and write them over its placeholder embeddings (in order)."""
        for modality, encoder in self.encoders.items():
            values = media.get(f"{modality}_values")
            if values is None:
                continue
            mask = media.get(f"{modality}_mask")
            tokens = encoder(values.to(inputs_embeds.dtype if values.is_floating_point() else values.dtype), mask)
            connector = self.connectors[modality]
            if getattr(connector, "accepts_token_mask", False) and mask is not None and mask.shape == tokens.shape[:2]:
                tokens = connector(tokens, mask.bool())  # e.g. the resampler ignores an audio window's padding
            else:
                tokens = connector(tokens)  # (U, T', H)
            tokens = tokens.reshape(-1, tokens.shape[-1]).to(inputs_embeds.dtype)  # (U*T', H)
            token_id = self.config.media_token_ids.get(modality)
            if token_id is None:
                raise ConfigError(f"{modality}_values given but config.media_token_ids has no {modality!r} token")
            positions = input_ids == token_id  # (B, S)
            n_slots = int(positions.sum())
            if n_slots != tokens.shape[0]:
                raise InputError(
                    f"{modality}: the prompt has {n_slots} placeholder tokens but the media give {tokens.shape[0]} "
                    "tokens; build inputs with UniMoEProcessor so placeholders are expanded to match"
                )
            inputs_embeds = inputs_embeds.masked_scatter(positions.unsqueeze(-1), tokens)
        return inputs_embeds

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_stats: bool = False,
        output_inputs_embeds: bool = False,
        **kwargs: Any,
    ) -> UniMoEModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids or inputs_embeds")
        media = {k: kwargs.pop(k) for k in media_keys(self.config) & set(kwargs)}
        prompt = past_key_values is None or past_key_values.get_seq_length() == 0  # not a decoding step
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        limit = self.config.text_config.max_position_embeddings
        if prompt and length > limit:  # a 200k-token record ran for minutes with only transformers' warning
            raise InputError(f"the input has {length} tokens, more than the model's {limit} "
                             "(text_config.max_position_embeddings); shorten it")  # fmt: skip
        if inputs_embeds is None:
            if prompt:
                self.check_media_given(input_ids, media)
            inputs_embeds = self.language_model.embed_tokens(input_ids)  # (B, S, H)
            if media:
                inputs_embeds = self.embed_media(input_ids, inputs_embeds, media)
            if len(self.generation_heads):
                inputs_embeds = self.embed_queries(input_ids, inputs_embeds)
            if modality_ids is None and (self.config.media_token_ids or len(self.generation_heads)):
                modality_ids = self.modality_ids_from_input_ids(input_ids)
        elif media:
            raise InputError("media inputs need input_ids (to find the placeholders), not inputs_embeds")
        outputs = self.language_model(
            inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=bool(use_cache),
            modality_ids=modality_ids,
            output_hidden_states=bool(output_hidden_states),
            output_router_stats=output_router_stats,
            **kwargs,
        )
        if output_inputs_embeds:
            outputs.inputs_embeds = inputs_embeds
        return outputs


class UniMoEForConditionalGeneration(UniMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: UniMoEConfig):
        super().__init__(config)
        self.model = UniMoEModel(self.config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def moe_blocks(self) -> list[SparseMoEBlock]:
        return [m for m in self.modules() if isinstance(m, SparseMoEBlock)]

    def update_router_biases(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Apply the auxiliary-loss-free balancing update in every MoE layer (call after each optimizer step; in
        multi-process training ``reduce`` sums the load over the processes, and every process calls it: the layers'
        loads go through it together, one collective per step instead of one per layer)."""
        blocks = [b for b in self.moe_blocks() if b.config.router_bias_update_rate > 0]
        if reduce is not None and blocks:
            loads = reduce(torch.cat([b._load_since_update for b in blocks]))
            for block, load in zip(blocks, loads.split([b._load_since_update.numel() for b in blocks])):
                block.update_router_bias(lambda _, load=load: load)
        for block in self.moe_blocks():
            if reduce is None or block not in blocks:
                block.update_router_bias()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_router_stats: bool = False,
        return_dict: bool | None = None,
        media_text_loss_coef: float = 0.0,
        media_text_temperature: float = 0.1,
        media_text_rows: torch.BoolTensor | None = None,
        **kwargs: Any,
    ) -> UniMoECausalLMOutput:
        """Shapes: ``input_ids (B, S)`` or ``inputs_embeds (B, S, H)``; ``attention_mask (B, S_past + S)``;
        ``modality_ids (B, S)`` (0 = text); ``labels (B, S)`` with -100 on positions without a target.

        Generation targets (from the processor, one per query run in row-major order): ``gen_image_values
        (n, C, S', S')`` and ``gen_audio_values (n, 1, M, T)`` in [-1, 1]; ``gen_series_values (n, H_max)`` with
        ``gen_series_mask (n, H_max)``.

        ``media_text_loss_coef > 0`` (with ``labels``) adds the media-text contrastive loss of
        :meth:`media_text_loss` (a training objective; stages set it); ``media_text_rows (B,)``, when given, names the
        rows it may use."""
        targets = {k: v for k in GENERATION_TARGET_KEYS if (v := kwargs.pop(k, None)) is not None}
        contrastive = labels is not None and media_text_loss_coef > 0 and input_ids is not None
        series = (kwargs.get("series_values"), kwargs.get("series_mask"))
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            modality_ids=modality_ids,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_router_stats=output_router_stats,
            compute_router_losses=self.training or labels is not None or output_router_stats,
            output_inputs_embeds=contrastive,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)  # (B, S_keep, V)

        loss = lm_loss = diffusion_loss = forecast_loss = media_text_loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
            moe: MoEConfig = self.config.moe_config
            loss = (
                lm_loss
                + moe.aux_loss_coef * outputs.aux_loss
                + moe.z_loss_coef * outputs.z_loss
                + moe.modality_loss_coef * outputs.modality_loss
            )
            if len(self.model.generation_heads):
                if input_ids is None:
                    raise InputError("generation targets need input_ids (to find the query slots)")
                diffusion_loss, forecast_loss, weighted = self.generation_losses(
                    input_ids, outputs.last_hidden_state, targets, series, attention_mask
                )
                loss = loss + weighted
            if contrastive:
                media_text_loss = self.media_text_loss(
                    input_ids, labels, outputs.inputs_embeds, media_text_temperature, allowed=media_text_rows
                )
                loss = loss + media_text_loss_coef * media_text_loss
        return UniMoECausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=outputs.aux_loss,
            z_loss=outputs.z_loss,
            modality_loss=outputs.modality_loss,
            diffusion_loss=diffusion_loss,
            forecast_loss=forecast_loss,
            media_text_loss=media_text_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            last_hidden_state=outputs.last_hidden_state if output_hidden_states else None,
            router_stats=outputs.router_stats,
        )

    def media_text_loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        inputs_embeds: torch.Tensor,
        temperature: float,
        allowed: torch.BoolTensor | None = None,
    ) -> torch.Tensor:
        """The media-text contrastive loss of a batch (:func:`unimoe.contrastive.media_text_loss`) with this model's
        placeholder, generation-query and end-of-turn token ids and its word embeddings."""
        eos = getattr(self.generation_config, "eos_token_id", None) if self.generation_config is not None else None
        return contrastive_media_text_loss(
            input_ids,
            labels,
            inputs_embeds,
            self.get_input_embeddings(),
            media_ids=list(self.config.media_token_ids.values()),
            query_ids=[ids["query"] for ids in self.config.generation_token_ids.values()],
            eos_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
            temperature=temperature,
            allowed=allowed,
        )

    # ------------------------------------------------------------------ generation heads
    def generation_losses(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        targets: dict[str, torch.Tensor],
        series: tuple[torch.Tensor | None, torch.Tensor | None],
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(diffusion_loss, forecast_loss, weighted sum)``; zero (with a graph) for heads without targets."""
        zero = hidden.sum() * 0.0
        diffusion, forecast, weighted = zero, zero, zero
        for modality, head in self.model.generation_heads.items():
            if isinstance(head, DiffusionHead):
                target = targets.get(f"gen_{modality}_values")
                if target is None:
                    continue
                states, mask = self.model.condition_states(input_ids, hidden, modality, attention_mask)
                if states.shape[0] != target.shape[0]:
                    raise InputError(f"{modality} generation: {states.shape[0]} query runs, {target.shape[0]} targets")
                head_loss = head.loss(states, target, mask)
                diffusion = diffusion + head_loss
            elif isinstance(head, ForecastHead):
                target = targets.get("gen_series_values")
                if target is None:
                    continue
                prediction, loc, scale = self.forecast_prediction(input_ids, hidden, *series)
                if prediction.shape[0] != target.shape[0]:
                    raise InputError(f"series generation: {prediction.shape[0]} query runs, {target.shape[0]} targets")
                horizon = min(target.shape[1], prediction.shape[1])
                mask = targets.get("gen_series_mask", torch.ones_like(target))[:, :horizon].to(prediction.dtype)
                normalized = (target[:, :horizon].to(prediction.dtype) - loc[:, None]) / scale[:, None]
                head_loss = head.loss(prediction[:, :horizon], normalized * mask, mask)
                forecast = forecast + head_loss
            else:  # pragma: no cover - build_head returns one of the two
                continue
            weighted = weighted + head.config.loss_coef * head_loss
        return diffusion, forecast, weighted

    def forecast_prediction(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, series_values, series_mask, *, context=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalized quantile forecasts ``(n, H_max, Q)`` with the context's ``loc (n,)`` and ``scale (n,)``.
        ``context`` is :meth:`UniMoEModel.forecast_context`'s result when the caller already has it."""
        head = self.model.generation_heads["series"]
        states = self.model.query_states(input_ids, hidden, "series")
        if context is None:
            context = self.model.forecast_context(input_ids, series_values, series_mask)
        normalized, loc, scale = context[:3]
        return head(states, normalized.to(states.dtype)), loc, scale

    def generate_multimodal(self, processor, messages, **kwargs: Any):
        """Answer conversations with text and any images, speech and forecasts the model decides to produce.

        ``messages`` is one conversation (a list of messages) or a batch of them; returns one
        :class:`~unimoe.generation.MultimodalOutput` per conversation (a single one for a single conversation).
        See :func:`unimoe.generation.api.generate_multimodal` for the options."""
        from unimoe.generation.api import generate_multimodal

        return generate_multimodal(self, processor, messages, **kwargs)

    def forecast(self, processor, records, *, batch_size: int = 16) -> list[list[float]]:
        """Point forecasts for evaluation records (their prompt messages; the horizon is ``len(record["target"])``)."""
        from unimoe.generation.api import forecast_records

        return forecast_records(self, processor, records, batch_size=batch_size)

    def forecast_outputs(self, processor, records, *, batch_size: int = 16) -> list:
        """Like :meth:`forecast`, with the quantiles and the context: one :class:`~unimoe.generation.Forecast` per
        record (the evaluation plots them)."""
        from unimoe.generation.api import forecast_outputs

        return forecast_outputs(self, processor, records, batch_size=batch_size)

    # ------------------------------------------------------------------ checkpoints with diffusers subfolders
    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        """transformers' ``save_pretrained`` for everything but the diffusion decoders, which go to their own
        diffusers subfolders (``decoder_image/``, ``decoder_audio/``) via diffusers' ``save_pretrained``."""
        heads = {m: h for m, h in self.model.generation_heads.items() if isinstance(h, DiffusionHead)}
        if heads:
            state = kwargs.pop("state_dict", None)
            if state is None:
                state = self.state_dict()
            kwargs["state_dict"] = {k: v for k, v in state.items() if not _is_decoder_key(k)}
        out = super().save_pretrained(save_directory, *args, **kwargs)
        for modality, head in heads.items():
            head.decoder.save_pretrained(str(Path(save_directory) / f"decoder_{modality}"), safe_serialization=True)
            if head.vae is not None:
                head.vae.save_pretrained(str(Path(save_directory) / f"vae_{modality}"), safe_serialization=True)
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        """transformers' loading, then each diffusion decoder from its diffusers subfolder: the decoder transformers
        built on the meta device never holds valid non-persistent buffers (PixArt's ``pos_embed``). Weights are
        read from safetensors only, also through ``AutoModelForCausalLM``: a pickled ``pytorch_model.bin`` could run
        code when it is loaded."""
        kwargs.setdefault("use_safetensors", True)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        for modality, head in model.model.generation_heads.items():
            if not isinstance(head, DiffusionHead):
                continue
            parts = [("decoder", head.load_decoder)] + ([("vae", head.load_vae)] if head.vae is not None else [])
            for part, load in parts:
                folder = f"{part}_{modality}"
                local = Path(str(pretrained_model_name_or_path)) / folder
                if local.is_dir():
                    load(local)
                else:
                    load(str(pretrained_model_name_or_path), subfolder=folder, **hub)
        return model

    _keys_to_ignore_on_load_missing = [r"generation_heads\.\w+\.(decoder|vae)\."]  # from decoder_*/, vae_*/

    def _validate_model_kwargs(self, model_kwargs: dict[str, Any]) -> None:
        # media inputs reach forward through **kwargs, which generate's strict check does not see
        media = media_keys(self.config)
        super()._validate_model_kwargs({k: v for k, v in model_kwargs.items() if k not in media})

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, modality_ids=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, past_key_values=past_key_values, **kwargs)
        # Media only exist in the prompt: with a cache, pass them (and their modality ids, sliced to the tokens being
        # fed) on the first step only; every generated token is text (modality id 0, the default). Without a cache
        # every step feeds the whole sequence, placeholders included, so the media go with it every time (the
        # modality ids are then recomputed from the ids).
        first = kwargs.get("is_first_iteration", False)
        if not first and inputs.get("past_key_values") is None:
            return inputs
        if not first:
            for key in media_keys(self.config) & set(inputs):
                inputs.pop(key)
        if modality_ids is not None and first:
            fed = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
            inputs["modality_ids"] = modality_ids[:, -fed.shape[1] :]
        return inputs


def _is_decoder_key(key: str) -> bool:
    """Decoders and VAEs of the generation heads are saved as diffusers subfolders, not in model.safetensors."""
    return ".generation_heads." in key and (".decoder." in key or ".vae." in key)


__all__ = [
    "DECODER_FAMILIES",
    "UniMoECausalLMOutput",
    "UniMoEForConditionalGeneration",
    "UniMoEModel",
    "UniMoEPreTrainedModel",
]
