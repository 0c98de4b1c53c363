"""``UniMoEConfig``: a transformers config that wraps a decoder family's config and the MoE settings."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from unimoe.errors import ConfigError
from unimoe.moe.config import MoEConfig

#: Token modalities, in id order. ``modality_ids`` in the model's inputs index this list.
DEFAULT_MODALITIES = ["text", "image", "audio", "video", "points", "series"]


#: Decoder families whose attention, norm, RoPE and dense MLP we reuse from transformers.
def supported_decoders() -> list[str]:
    """The decoder families of ``unimoe.modeling_decoder.DECODER_FAMILIES`` (one list: a family registered there is
    accepted here and by ``unimoe upcycle``)."""
    from unimoe.modeling_decoder import DECODER_FAMILIES  # lazy: it imports the transformers model modules

    return DECODER_FAMILIES.names()


class UniMoEConfig(PreTrainedConfig):
    r"""Configuration of a UniMoE model.

    Args:
        text_config: the decoder's config, any of the supported transformers families (``qwen2``, ``qwen3``,
            ``llama``); its FFNs are replaced by MoE blocks where ``moe`` says so.
        moe: the MoE settings as a dict (see :class:`unimoe.moe.MoEConfig`), validated on construction.
        modalities: the names behind ``modality_ids`` (index 0 is text).
        encoders: per modality, an encoder spec ``{"type": <ENCODERS name>, "pretrained": <local path>,
            "trainable": bool, **encoder config}``.
        connectors: per modality, a connector spec ``{"type": "mlp" | "resampler", "trainable": bool, **config}``.
        media_token_ids: per modality, the id of its placeholder token (set from the tokenizer).
        generation: per output modality (``image``, ``audio``, ``series``), a generation-head spec (see
            :mod:`unimoe.generation.config`); a model without it generates text only.
        generation_token_ids: per generation head, ``{"gen": id, "query": id}``: the token that starts a generated
            item and the token of its query slots (set from the tokenizer).
        tie_word_embeddings: follows ``text_config.tie_word_embeddings`` unless set.
    """

    model_type = "unimoe"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}

    text_config: dict | PreTrainedConfig | None = None
    moe: dict | None = None
    modalities: list[str] | None = None
    encoders: dict | None = None
    connectors: dict | None = None
    media_token_ids: dict | None = None
    generation: dict | None = None
    generation_token_ids: dict | None = None
    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        family = self.text_config.model_type
        supported = supported_decoders()
        if family not in supported:
            raise ConfigError(
                f"text_config.model_type: decoder family {family!r} is not supported; "
                f"choose one of: {', '.join(supported)}"
            )
        tc = self.text_config
        head_dim = getattr(tc, "head_dim", None)
        if head_dim is None and tc.hidden_size % tc.num_attention_heads != 0:
            raise ConfigError(
                f"text_config.hidden_size: {tc.hidden_size} is not divisible by "
                f"num_attention_heads={tc.num_attention_heads}; change one of them (or set head_dim)"
            )
        if tc.num_attention_heads % tc.num_key_value_heads != 0:
            raise ConfigError(
                f"text_config.num_key_value_heads: num_attention_heads={tc.num_attention_heads} is not a multiple "
                f"of num_key_value_heads={tc.num_key_value_heads}"
            )
        moe = MoEConfig.from_dict(self.moe)
        moe.check_layers(tc.num_hidden_layers)
        self.moe = moe.to_dict()
        if self.modalities is None:
            self.modalities = list(DEFAULT_MODALITIES)
        if not self.modalities or self.modalities[0] != "text":
            raise ConfigError(f"modalities: the first modality must be 'text', got {self.modalities}")
        self.encoders = dict(self.encoders or {})
        self.connectors = dict(self.connectors or {})
        self.media_token_ids = dict(self.media_token_ids or {})
        self.generation = dict(self.generation or {})
        self.generation_token_ids = {m: dict(v) for m, v in (self.generation_token_ids or {}).items()}
        self._validate_media()
        self._validate_generation()
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(tc, "tie_word_embeddings", False))

    def _validate_media(self) -> None:
        from unimoe.connectors import connector_tokens
        from unimoe.encoders import encoder_class

        for modality, spec in self.encoders.items():
            if modality not in self.modalities[1:]:
                raise ConfigError(f"encoders.{modality}: unknown modality; choose one of {self.modalities[1:]}")
            if not isinstance(spec, dict):
                raise ConfigError(f"encoders.{modality}: expected a mapping, got {type(spec).__name__}")
            encoder_class(strip_component_keys(spec), modality)
            if modality not in self.connectors:
                raise ConfigError(f"connectors.{modality}: missing; every encoder needs a connector")
            for table in ("encoders", "connectors"):
                init = getattr(self, table)[modality].get("init", "default")
                if init not in ENCODER_INITS:
                    raise ConfigError(
                        f"{table}.{modality}.init: unknown initialization {init!r}; choose one of "
                        f"{', '.join(ENCODER_INITS)}"
                    )
            connector_tokens(modality, strip_component_keys(self.connectors[modality]), 1)
        extra = sorted(set(self.connectors) - set(self.encoders))
        if extra:
            raise ConfigError(f"connectors: {extra} have no encoder (encoders.<modality>)")
        for modality, token_id in self.media_token_ids.items():
            if modality not in self.modalities[1:]:
                raise ConfigError(f"media_token_ids.{modality}: unknown modality")
            if not 0 <= int(token_id) < self.text_config.vocab_size:
                raise ConfigError(f"media_token_ids.{modality}: {token_id} is outside the vocabulary")

    def _validate_generation(self) -> None:
        from unimoe.generation.config import head_config

        for modality, spec in self.generation.items():
            if not isinstance(spec, dict):
                raise ConfigError(f"generation.{modality}: expected a mapping, got {type(spec).__name__}")
            head_config(modality, spec)  # validates every field
            if modality == "series" and "series" not in self.encoders:
                raise ConfigError("generation.series: the forecasting head reads its context through encoders.series")
            ids = self.generation_token_ids.get(modality)
            if not ids or set(ids) != {"gen", "query"}:
                raise ConfigError(
                    f"generation_token_ids.{modality}: expected {{'gen': id, 'query': id}} for the {modality} head, "
                    f"got {ids!r}"
                )
            for kind, token_id in ids.items():
                if not 0 <= int(token_id) < self.text_config.vocab_size:
                    raise ConfigError(f"generation_token_ids.{modality}.{kind}: {token_id} is outside the vocabulary")
        extra = sorted(set(self.generation_token_ids) - set(self.generation))
        if extra:
            raise ConfigError(f"generation_token_ids: {extra} have no generation head (generation.<modality>)")

    @property
    def moe_config(self) -> MoEConfig:
        return MoEConfig.from_dict(self.moe)

    def moe_layer_indices(self) -> list[int]:
        moe = self.moe_config  # rebuilt (and validated) on every access: once here
        return [i for i in range(self.text_config.num_hidden_layers) if moe.is_moe_layer(i)]

    def frozen_components(self) -> set[str]:
        """Keys (``encoders.image``, ``connectors.audio``) of the encoders and connectors whose spec says
        ``trainable: false``: the model builds them frozen and no training stage unfreezes them."""
        return {
            f"{part}.{modality}"
            for part in ("encoders", "connectors")
            for modality, spec in getattr(self, part).items()
            if not spec.get("trainable", True)
        }


COMPONENT_KEYS = ("trainable", "init")

#: ``init`` of an encoder or connector spec: ``default`` — transformers' ``normal(0, initializer_range)`` for every
#: linear and convolution weight; ``fan_in`` — ``normal(0, 1 / sqrt(fan_in))`` (LeCun) for those weights. An encoder
#: trained from scratch needs ``fan_in``: with a fixed std of 0.02 a layer of fan-in 240 (Whisper's first convolution)
#: shrinks its input ~5×, so the content of the input vanishes under the position embeddings and every clip encodes
#: alike. So does a connector at small widths: two 64-wide layers at std 0.02 scale its input by ~0.03, so its first
#: layer's gradient is ~40× smaller than under ``fan_in``; a video connector so initialized sat at chance for 500
#: steps where ``fan_in`` learned (video encoder + connector + an attention readout, trained alone: 0.03 -> 0.22).
ENCODER_INITS = ("default", "fan_in")


def strip_component_keys(spec: dict) -> dict:
    """An encoder / connector spec without the keys the model (not the component) reads."""
    return {k: v for k, v in spec.items() if k not in COMPONENT_KEYS}


__all__ = ["DEFAULT_MODALITIES", "UniMoEConfig", "supported_decoders"]
