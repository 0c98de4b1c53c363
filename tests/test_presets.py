from pathlib import Path

import pytest
import yaml

from unimoe import ConfigError, build_config, build_model, count_parameters, list_presets
from unimoe.presets import apply_overrides, parse_cli_overrides

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"


def test_every_shipped_preset_is_listed_and_valid():
    names = list_presets()
    assert {"tiny", "qwen2.5-0.5b-e8", "qwen2.5-0.5b-lora8"} <= set(names)
    assert sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) == names
    for name in names:
        model = build_model(name, device="meta")
        counts = count_parameters(model)
        assert 0 < counts["active"] <= counts["total"]


def test_realistic_preset_parameter_counts():
    counts = count_parameters(build_model("qwen2.5-0.5b-e8", device="meta"))
    # Qwen2.5-0.5B has 494M parameters of which 24 * 3 * 896 * 4864 = 313.8M are FFN weights.
    ffn = 24 * 3 * 896 * 4864
    dense = 494_032_768
    router = 24 * 896 * 8
    assert counts["total"] == dense + 7 * ffn + router
    assert counts["active"] == dense + ffn + router


def test_tiny_preset_counts_by_hand():
    model = build_model("tiny")
    cfg = yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text())
    h, layers, e, k, ei = 64, 4, 4, 2, 64
    per_expert = 3 * h * ei
    counts = count_parameters(model)
    assert counts["total"] - counts["active"] == layers * (e - k) * per_expert
    assert cfg["moe"]["num_experts"] == e


def test_overrides_dotted_and_nested():
    cfg = build_config("tiny", {"moe.top_k": 1}, text_config={"num_hidden_layers": 2})
    assert cfg.moe["top_k"] == 1 and cfg.text_config.num_hidden_layers == 2
    assert apply_overrides({"a": {"b": 1, "c": 2}}, {"a.b": 3}) == {"a": {"b": 3, "c": 2}}
    # another type replaces the component spec whole; the same type merges into it
    spec = {"enc": {"type": "a", "x": 1, "y": 2}}
    assert apply_overrides(spec, {"enc": {"type": "b", "z": 3}}) == {"enc": {"type": "b", "z": 3}}
    assert apply_overrides(spec, {"enc": {"type": "a", "x": 5}}) == {"enc": {"type": "a", "x": 5, "y": 2}}
    assert apply_overrides(spec, {"enc": {"x": 5}}) == {"enc": {"type": "a", "x": 5, "y": 2}}
    assert parse_cli_overrides(["moe.top_p=0.5", "moe.routing=topp", "moe.moe_layers=[0, 1]"]) == {
        "moe.top_p": 0.5,
        "moe.routing": "topp",
        "moe.moe_layers": [0, 1],
    }


def test_bad_presets_and_overrides():
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        build_model("nope")
    with pytest.raises(ConfigError, match="unknown override key"):
        build_config("tiny", {"colour": 1})
    with pytest.raises(ConfigError, match="key=value"):
        parse_cli_overrides(["moe.top_k"])
    with pytest.raises(ConfigError, match="moe.top_k"):
        build_model("tiny", moe={"top_k": 99})
