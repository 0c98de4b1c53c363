"""Named model presets (YAML files in ``unimoe/configs/models``) and ``build_model(preset, **overrides)``."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from unimoe.config_utils import read_yaml
from unimoe.configuration_unimoe import UniMoEConfig
from unimoe.errors import ConfigError

PRESET_KEYS = {"description", "text_config", "moe", "modalities", "tokenizer", "encoders", "connectors", "generation"}
CONFIG_KEYS = (
    "text_config", "moe", "modalities", "encoders", "connectors", "media_token_ids", "generation",
    "generation_token_ids",
)  # fmt: skip


def _models_dir() -> Path:
    return Path(str(resources.files("unimoe.configs") / "models"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in _models_dir().glob("*.yaml"))


def load_preset(name_or_path: str | Path) -> dict[str, Any]:
    """A preset by name (``tiny``) or a path to a YAML file with the same keys."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = _models_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown model preset {str(name_or_path)!r}; choose one of: {', '.join(list_presets())}")
    elif not path.is_file():
        raise ConfigError(f"model preset file {path} does not exist")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a model preset must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - PRESET_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: {', '.join(sorted(PRESET_KEYS))}")
    return data


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``data``. Keys may be dotted (``"moe.top_k"``) or nested dicts.

    A mapping that names another ``type`` than the one it overrides (``encoders.video: {type: video_conv, ...}``)
    replaces it whole: the old type's settings mean nothing to the new one."""
    out = copy.deepcopy(data)
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part!r} is not a mapping")
            node = child
        last = parts[-1]
        current = node.get(last)
        if (
            isinstance(value, dict)
            and isinstance(current, dict)
            and value.get("type", current.get("type")) == current.get("type")
        ):
            node[last] = apply_overrides(node[last], value)
        else:
            node[last] = value
    return out


def parse_cli_overrides(items: list[str]) -> dict[str, Any]:
    """``["moe.top_k=1", "moe.routing=topp"]`` -> ``{"moe.top_k": 1, "moe.routing": "topp"}`` (values as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = read_yaml(Path(f"override {key.strip()}"), value)
    return out


def build_config(preset: str | Path = "tiny", overrides: dict[str, Any] | None = None, **kwargs: Any) -> UniMoEConfig:
    """The :class:`UniMoEConfig` of a preset with overrides (dotted keys in ``overrides``, nested dicts as kwargs)."""
    data = apply_overrides(load_preset(preset), {**(overrides or {}), **kwargs})
    unknown = sorted(set(data) - PRESET_KEYS)
    if unknown:
        raise ConfigError(f"unknown override key(s) {unknown}; allowed: {', '.join(sorted(PRESET_KEYS))}")
    fields = {k: v for k, v in data.items() if k in CONFIG_KEYS}
    if data.get("encoders") and (data.get("tokenizer") or {}).get("kind") == "bpe":
        # the built-in tokenizer's special tokens have fixed ids (they are added first, in a fixed order)
        from unimoe.tokenizer import builtin_media_token_ids

        fields.setdefault(
            "media_token_ids", {m: i for m, i in builtin_media_token_ids().items() if m in data["encoders"]}
        )
    if data.get("generation") and (data.get("tokenizer") or {}).get("kind") == "bpe":
        from unimoe.tokenizer import builtin_generation_token_ids

        builtin = builtin_generation_token_ids()
        fields.setdefault("generation_token_ids", {m: builtin[m] for m in data["generation"] if m in builtin})
    from huggingface_hub.errors import StrictDataclassError

    try:
        return UniMoEConfig(**fields)
    except StrictDataclassError as err:  # transformers' typed configs: "Field 'hidden_size' expected int, got str"
        detail = str(err).strip().splitlines()[-1].strip().removeprefix("TypeError: ").removeprefix("ValueError: ")
        raise ConfigError(f"{detail} (in text_config or another transformers config field)") from None


def build_model(
    preset: str | Path = "tiny",
    overrides: dict[str, Any] | None = None,
    *,
    device: str | torch.device | None = None,
    seed: int | None = None,
    **kwargs: Any,
):
    """A randomly initialized :class:`UniMoEForConditionalGeneration` of a named preset.

    ``build_model("tiny", moe={"top_k": 1})`` or ``build_model("tiny", {"moe.top_k": 1})``;
    ``device="meta"`` builds without allocating memory (to read parameter counts of large presets).
    """
    from unimoe.modeling_unimoe import UniMoEForConditionalGeneration

    config = build_config(preset, overrides, **kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            return UniMoEForConditionalGeneration(config)
    model = UniMoEForConditionalGeneration(config)
    return model.to(device) if device is not None else model
