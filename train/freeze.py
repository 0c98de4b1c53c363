"""Which parameters a stage trains: every parameter belongs to exactly one *part*, and a stage's ``trainable``
says which parts are on (torchtune's ``*_trainable``, as configuration, never as code edits)."""

from __future__ import annotations

from typing import Any

import torch

from unimoe.errors import ConfigError

PEFT_PREFIX = "base_model.model."


def part_of(name: str, lora_expert_modules: frozenset[str] = frozenset()) -> str:
    """The part a parameter name belongs to (names as in ``UniMoEForConditionalGeneration.named_parameters``,
    optionally inside a peft model). ``lora_expert_modules`` names the LoRA-expert modules (peft prefix removed),
    whose frozen dense FFN is the part ``experts_base``."""
    name = name.removeprefix(PEFT_PREFIX)
    if ".lora_A." in name or ".lora_B." in name:  # peft adapters added by the stage
        return "lora"
    if name.startswith("model.encoders."):
        return "encoders"
    if name.startswith("model.connectors."):
        return "connectors"
    if name.startswith("model.generation_heads."):
        # query embeddings, condition connectors, decoders, forecasting head; a latent-space head's VAE stays frozen
        return "generation_vae" if ".vae." in name else "generation"
    if name.startswith("lm_head."):
        return "lm_head"
    if ".embed_tokens." in name:
        return "embeddings"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.router." in name:
        return "routers"
    if ".mlp.shared_expert" in name:
        return "shared_experts"
    if ".mlp.experts." in name:
        # LoRA experts: the frozen dense FFN is its own part, the low-rank factors are the experts
        module, leaf = name.rsplit(".", 1)
        is_base = leaf in ("gate_up_proj", "down_proj") and module in lora_expert_modules
        return "experts_base" if is_base else "experts"
    if ".mlp." in name:
        return "dense_mlp"
    if "norm" in name:
        return "norms"
    raise ConfigError(f"parameter {name} belongs to no known part")


def _lora_expert_modules(model: torch.nn.Module) -> frozenset[str]:
    from unimoe.moe import LoRAExperts

    return frozenset(n.removeprefix(PEFT_PREFIX) for n, m in model.named_modules() if isinstance(m, LoRAExperts))


def apply_trainable(model: torch.nn.Module, trainable: dict[str, Any]) -> dict[str, int]:
    """Set ``requires_grad`` per part. A part's value is a bool, or for ``encoders`` / ``connectors`` /
    ``generation`` a bool or a list of modalities. Parts not named are frozen, and so are the encoders and connectors
    that the model config marks ``trainable: false``. Returns trainable parameter counts per part."""
    lora_experts = _lora_expert_modules(model)
    config = getattr(model, "config", None)  # a peft model forwards it
    frozen = config.frozen_components() if hasattr(config, "frozen_components") else set()
    counts: dict[str, int] = {}
    seen_modality_keys: set[str] = set()
    for name, param in model.named_parameters():
        part, modality_key = part_key(name, lora_experts)
        if modality_key is not None:
            seen_modality_keys.add(modality_key)
        flag = True if part == "lora" else trainable.get(part, False)
        if isinstance(flag, (list, tuple)):  # per modality: model.{encoders,connectors,generation_heads}.<modality>.
            flag = modality_key is not None and modality_key.split(".", 1)[1] in flag
        if modality_key in frozen:
            flag = False
        param.requires_grad_(bool(flag))
        if flag:
            counts[part] = counts.get(part, 0) + param.numel()
    for part, value in trainable.items():  # a listed modality the model lacks would silently train nothing
        if isinstance(value, (list, tuple)):
            unknown = [m for m in value if f"{part}.{m}" not in seen_modality_keys]
            if unknown:
                has = sorted(k.split(".", 1)[1] for k in seen_modality_keys if k.startswith(f"{part}."))
                raise ConfigError(f"trainable.{part}: {unknown} name no module of this model; it has {has}")
    if not counts:
        raise ConfigError(f"trainable {trainable} leaves nothing to train")
    return counts


def part_key(name: str, lora_expert_modules: frozenset[str] = frozenset()) -> tuple[str, str | None]:
    """``(part, modality key)`` of a parameter: the modality key (``encoders.video``) for the per-modality parts,
    else None."""
    from unimoe.train.config import MODALITY_PARTS

    part = part_of(name, lora_expert_modules)
    if part in MODALITY_PARTS:  # model.{encoders,connectors,generation_heads}.<modality>.
        return part, f"{part}.{name.removeprefix(PEFT_PREFIX).split('.')[2]}"
    return part, None


def params_by_key(model: torch.nn.Module, keys: set[str] | frozenset[str], *, where: str) -> dict[str, list]:
    """The parameters each key names (a part, or one modality of a per-modality part: ``encoders.video``); a
    modality key wins over its part's key. A key naming no parameter is an error (a typo would do nothing)."""
    lora_experts = _lora_expert_modules(model)
    out: dict[str, list[torch.nn.Parameter]] = {k: [] for k in keys}
    for name, param in model.named_parameters():
        part, modality_key = part_key(name, lora_experts)
        key = modality_key if modality_key in keys else part
        if key in keys:
            out[key].append(param)
    empty = sorted(k for k, ps in out.items() if not ps)
    if empty:
        raise ConfigError(f"{where}: {empty} name no parameter of this model")
    return out


def param_groups(model: torch.nn.Module, lr: float, multipliers: dict[str, float]) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups, one per distinct learning rate: ``lr`` times the factor of the
    parameter's modality (``encoders.video``) or else of its part (``encoders``), 1 where neither is named. The group
    order is fixed (base rate first, then by key), so a resumed run's optimizer state lines up with the groups it
    was saved from. A modality key naming no module of the model is an error (a typo would silently do nothing)."""
    lora_experts = _lora_expert_modules(model)
    by_key: dict[str, list[torch.nn.Parameter]] = {}
    seen_modality_keys = set()
    for name, param in model.named_parameters():
        key, modality_key = part_key(name, lora_experts)
        if modality_key is not None:
            seen_modality_keys.add(modality_key)
            if modality_key in multipliers:
                key = modality_key
        if param.requires_grad:
            by_key.setdefault(key, []).append(param)
    unknown = sorted(k for k in multipliers if "." in k and k not in seen_modality_keys)
    if unknown:
        raise ConfigError(
            f"lr_multipliers: {unknown} name no module of this model; it has {', '.join(sorted(seen_modality_keys))}"
        )
    base = [p for key, ps in by_key.items() if multipliers.get(key, 1.0) == 1.0 for p in ps]
    groups = [{"params": base, "lr": lr, "part": "base"}] if base else []
    for key in sorted(by_key):
        factor = multipliers.get(key, 1.0)
        if factor != 1.0:
            groups.append({"params": by_key[key], "lr": lr * factor, "part": key})
    return groups
