import json

import pytest
from transformers import AutoConfig

import unimoe
from unimoe import ConfigError, UniMoEConfig


def tiny_text(**kw):
    base = dict(
        model_type="qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return {**base, **kw}


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = UniMoEConfig(text_config=tiny_text(), moe={"num_experts": 4, "top_k": 2})
    assert cfg.model_type == "unimoe"
    assert cfg.modalities[0] == "text"
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "unimoe" and data["moe"]["num_experts"] == 4
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, UniMoEConfig)
    assert loaded.moe == cfg.moe and loaded.text_config.hidden_size == 32


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"moe": {"num_experts": 4, "top_k": 5}}, "moe.top_k"),
        ({"moe": {"expert_type": "banana"}}, "moe.expert_type"),
        ({"moe": {"routing": "random"}}, "moe.routing"),
        ({"moe": {"top_p": 0.0}}, "moe.top_p"),
        ({"moe": {"capacity_factor": -1.0}}, "moe.capacity_factor"),
        ({"moe": {"moe_layers": [0, 7]}}, "moe.moe_layers"),
        ({"moe": {"num_expertz": 4}}, "unknown field"),
        ({"text_config": tiny_text(hidden_size=30)}, "text_config.hidden_size"),
        ({"text_config": tiny_text(num_key_value_heads=3)}, "text_config.num_key_value_heads"),
        ({"modalities": ["image", "text"]}, "modalities"),
        ({"encoders": {"image": {"type": "vit", "init": "he"}}, "connectors": {"image": {}}}, "encoders.image.init"),
        ({"encoders": {"image": {"type": "vit"}}, "connectors": {"image": {"norm": "bn"}}}, "connectors.image.norm"),
        ({"encoders": {"image": {"type": "vit"}}, "connectors": {"image": {"init": "he"}}}, "connectors.image.init"),
    ],
)
def test_impossible_configs_name_the_field(kwargs, field):
    kwargs.setdefault("text_config", tiny_text())
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        UniMoEConfig(**kwargs)


def test_unsupported_decoder_family():
    with pytest.raises(ConfigError, match="text_config.model_type"):
        UniMoEConfig(text_config={"model_type": "gpt2"})


def test_top_k_may_use_null_experts():
    cfg = UniMoEConfig(text_config=tiny_text(), moe={"num_experts": 2, "num_null_experts": 2, "top_k": 3})
    assert cfg.moe_config.num_total_experts == 4


def test_moe_layer_placement():
    cfg = UniMoEConfig(text_config=tiny_text(num_hidden_layers=4), moe={"moe_layer_freq": 2})
    assert cfg.moe_layer_indices() == [1, 3]
    cfg = UniMoEConfig(text_config=tiny_text(num_hidden_layers=4), moe={"moe_layers": [0, 2]})
    assert cfg.moe_layer_indices() == [0, 2]


def test_registered_with_auto_classes():
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    assert AutoConfig.for_model("unimoe").__class__ is UniMoEConfig
    assert MODEL_FOR_CAUSAL_LM_MAPPING[UniMoEConfig] is unimoe.UniMoEForConditionalGeneration
    model = AutoModelForCausalLM.from_config(UniMoEConfig(text_config=tiny_text()))
    assert isinstance(model, unimoe.UniMoEForConditionalGeneration)


def test_scalar_fields_are_converted_or_named():
    from unimoe.moe import MoEConfig

    assert MoEConfig.from_dict({"top_k": "2", "top_p": "0.5", "num_experts": 4.0}).top_k == 2
    assert MoEConfig.from_dict({"top_p": "0.5"}).top_p == 0.5
    assert MoEConfig.from_dict({"num_experts": 4.0}).num_experts == 4
    for bad, message in [({"top_k": "two"}, "moe.top_k: expected an integer"), ({"top_k": 1.5}, "moe.top_k"),
                         ({"top_k": True}, "moe.top_k"), ({"aux_loss_coef": "x"}, "moe.aux_loss_coef: expected a "),
                         ({"norm_topk_prob": "yes"}, "moe.norm_topk_prob: expected true or false"),
                         ({"capacity_factor": [1]}, "moe.capacity_factor")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            MoEConfig.from_dict(bad)
    assert MoEConfig.from_dict({"capacity_factor": None}).capacity_factor is None
    with pytest.raises(ConfigError, match="moe.top_k: expected an integer, got null"):
        MoEConfig.from_dict({"top_k": None})


@pytest.mark.parametrize(
    ("kind", "spec", "field"),
    [
        ("encoder", {"type": "point_bert", "num_groups": 0}, "encoders.points.num_groups"),
        ("encoder", {"type": "patch_ts", "patch_size": 0}, "encoders.series.patch_size"),
        ("encoder", {"type": "whisper", "encoder_layers": -1}, "encoders.audio.encoder_layers"),
        ("encoder", {"type": "image_conv", "dim": 0}, "encoders.image.dim"),  # the conv encoders' shared check
        ("connector", {"type": "resampler", "num_heads": 0}, "connectors.video.num_heads"),
        ("connector", {"type": "mlp", "pool": -3}, "connectors.video.pool"),
        ("head", {"skip_window": 0}, "generation.series.skip_window"),
    ],
)
def test_counts_must_be_positive_integers_everywhere(kind, spec, field):
    """Every part's counts go through one check (``config_utils.check_positive_ints``): zero, negatives, booleans
    and fractions are refused with the part and the field named (booleans and fractions in YAML already stop at
    the field's type check, ``config_from_dict``)."""
    from unimoe.connectors import connector_tokens
    from unimoe.encoders.base import encoder_class
    from unimoe.generation import head_config

    modality = {"point_bert": "points", "patch_ts": "series", "whisper": "audio", "image_conv": "image"}
    build = {
        "encoder": lambda: encoder_class(spec, modality[spec["type"]]),
        "connector": lambda: connector_tokens("video", spec, 4),
        "head": lambda: head_config("series", spec),
    }[kind]
    with pytest.raises(ConfigError, match=rf"^{field}: must be"):
        build()


def test_check_positive_ints():
    from unimoe.config_utils import check_positive_ints

    class Counts:
        n = 3

    check_positive_ints(Counts(), ("n",), "x")  # a valid count passes
    for bad in (0, -2, True, 1.0, "3", None):
        Counts.n = bad
        with pytest.raises(ConfigError, match=rf"^x\.n: must be a positive integer, got {bad!r}$"):
            check_positive_ints(Counts(), ("n",), "x")
