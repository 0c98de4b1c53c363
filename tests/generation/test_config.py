import pytest

from unimoe.errors import ConfigError
from unimoe.generation import ForecastHeadConfig, ImageHeadConfig, head_config
from unimoe.presets import build_config


def test_defaults_validate_and_shapes():
    assert ImageHeadConfig().sample_shape == (1, 16, 16)
    assert head_config("audio", {"n_mels": 24, "frames": 40}).sample_shape == (1, 24, 40)
    assert ForecastHeadConfig(quantiles=[0.5]).quantiles == [0.5]


@pytest.mark.parametrize(
    ("modality", "spec", "field"),
    [
        ("image", {"decoder": {"class": "NoSuchTransformer"}}, "generation.image.decoder.class"),
        ("image", {"channels": 2}, "generation.image.channels"),
        ("image", {"num_queries": 0}, "generation.image.num_queries"),
        ("image", {"guidance_scale": 0.5}, "generation.image.guidance_scale"),
        ("image", {"guidance_scale": float("nan")}, "generation.image.guidance_scale"),
        ("audio", {"hop_length": 2048}, "generation.audio.hop_length"),
        ("audio", {"vocoder": "wavenet"}, "generation.audio.vocoder"),
        ("series", {"quantiles": [0.1, 0.9]}, "generation.series.quantiles"),
        ("series", {"default_horizon": 48}, "generation.series.default_horizon"),
        ("video", {}, "generation.video"),
        ("image", {"unknown_field": 1}, "generation.image"),
    ],
)
def test_impossible_head_configs_name_the_field(modality, spec, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        head_config(modality, spec)


def _tiny_config(**changes):
    from unimoe import UniMoEConfig

    data = {k: v for k, v in build_config("tiny").to_dict().items() if k not in ("model_type", "transformers_version")}
    return UniMoEConfig(**{**data, **changes})


def test_model_config_checks_heads_against_encoders_and_tokens():
    config = build_config("tiny")
    encoders = {m: s for m, s in config.encoders.items() if m != "series"}
    connectors = {m: s for m, s in config.connectors.items() if m != "series"}
    media = {m: i for m, i in config.media_token_ids.items() if m != "series"}
    with pytest.raises(ConfigError, match=r"generation\.series: .*encoders\.series"):
        _tiny_config(encoders=encoders, connectors=connectors, media_token_ids=media)
    with pytest.raises(ConfigError, match=r"generation_token_ids\.image"):
        _tiny_config(generation_token_ids={**config.generation_token_ids, "image": {"gen": 8}})
    with pytest.raises(ConfigError, match=r"generation_token_ids\.image\.query: 9999 is outside"):
        _tiny_config(generation_token_ids={**config.generation_token_ids, "image": {"gen": 8, "query": 9999}})
    assert _tiny_config(generation={}, generation_token_ids={}).generation == {}


def test_yaml_strings_become_numbers():
    assert head_config("image", {"guidance_scale": "3.5"}).guidance_scale == 3.5
    # the elements of list[float] fields too (YAML 1.1 reads 1e-1 as a string); other strings stay for the config's
    # own check to name
    from dataclasses import dataclass, field

    from unimoe.config_utils import config_from_dict

    @dataclass
    class Spec:
        rates: list[float] = field(default_factory=list)
        names: list[str] | None = None

    spec = config_from_dict(Spec, {"rates": ["1e-1", 2, "x"], "names": ["1e-1"]}, where="spec")
    assert spec.rates == [0.1, 2, "x"] and spec.names == ["1e-1"]
