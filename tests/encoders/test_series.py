"""Time-series encoder: loading (csv / npy / arrays) and its errors, context fitting, instance normalization with
missing values, affine invariance, forward + backward, pretrained weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unimoe.connectors import build_connector
from unimoe.encoders import ENCODERS, MediaError, build_encoder
from unimoe.encoders.series import TimeSeriesEncoder, TimeSeriesEncoderConfig, load_series
from unimoe.errors import ConfigError

TINY = {"context_length": 32, "patch_size": 8, "num_channels": 2, "dim": 32, "depth": 2, "num_heads": 4}


def tiny_config(**overrides) -> TimeSeriesEncoderConfig:
    return TimeSeriesEncoderConfig(**{**TINY, **overrides})


def tiny_encoder(seed: int = 0, **overrides) -> TimeSeriesEncoder:
    torch.manual_seed(seed)
    return TimeSeriesEncoder(tiny_config(**overrides)).eval()


def wave(length: int, channels: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float32)[:, None]
    return (np.sin(t / 3 + np.arange(channels)) * 4 + rng.normal(size=(length, channels)) + 10).astype(np.float32)


# -- loading -----------------------------------------------------------------------------------------------------------


def test_csv_with_date_column_gives_two_channels(tmp_path):
    path = tmp_path / "sales.csv"
    path.write_text("date,north,south\n2024-01-01,1.5,10\n2024-01-02,,11\n2024-01-03,3.5,12\n2024-01-04,4,13\n")
    series = TimeSeriesEncoder.load(path, tiny_config())
    assert series.shape == (4, 2) and series.dtype == np.float32
    np.testing.assert_array_equal(series[:, 1], [10, 11, 12, 13])
    assert np.isnan(series[1, 0]) and series[3, 0] == 4


def test_other_table_formats_and_arrays(tmp_path):
    config = tiny_config()
    (tmp_path / "a.tsv").write_text("time\tvalue\n0\t1\n1\t2\n2\t3\n")  # numeric column named "time" is the axis
    np.testing.assert_array_equal(load_series(tmp_path / "a.tsv", config), [[1], [2], [3]])
    (tmp_path / "b.txt").write_text("1.0 2.0\n3.0 4.0\n5.0 NaN\n")  # headerless, whitespace
    b = load_series(tmp_path / "b.txt", config)
    assert b.shape == (3, 2) and np.isnan(b[2, 1])
    (tmp_path / "c.csv").write_text("1\n2\n3\n")  # headerless csv: the first row is data
    np.testing.assert_array_equal(load_series(tmp_path / "c.csv", config), [[1], [2], [3]])
    np.save(tmp_path / "d.npy", np.arange(5.0))
    np.testing.assert_array_equal(load_series(tmp_path / "d.npy", config), np.arange(5.0)[:, None])
    np.save(tmp_path / "e.npy", np.ones((6, 2)))
    assert load_series(tmp_path / "e.npy", config).shape == (6, 2)
    assert load_series([1, 2, float("nan")], config).shape == (3, 1)
    assert load_series(torch.ones(4, 2), config).shape == (4, 2)


def test_text_in_a_value_column_names_the_file_and_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("date,load,temperature\n2024-01-01,1,20\n2024-01-02,2,warm\n")
    with pytest.raises(MediaError, match="temperature") as info:
        TimeSeriesEncoder.load(path, tiny_config())
    assert str(path) in str(info.value) and "warm" in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("empty.csv", "", "empty"),
        ("header.csv", "date,a,b\n", "no rows"),
        ("missing.csv", "a,b\n,\nNaN,\n", "all values"),
        ("wide.csv", "a,b,c\n1,2,3\n", "3 channels"),
        ("dates.csv", "date\n2024-01-01\n", "no value columns"),
        ("cube.npy", np.zeros((2, 3, 4)), "shape"),
        ("inf.npy", np.array([1.0, np.inf]), "infinite"),
        ("zero.npy", np.zeros((0,)), "no rows"),
        ("series.xlsx", "1,2\n", "unsupported"),
    ],
)
def test_bad_files_raise_media_error_naming_the_file(tmp_path, name, content, problem):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_text(content)
    with pytest.raises(MediaError, match=problem) as info:
        TimeSeriesEncoder.load(path, tiny_config())
    assert str(path) in str(info.value)


def test_missing_and_too_big_files(tmp_path):
    with pytest.raises(MediaError, match="does not exist") as info:
        TimeSeriesEncoder.load(tmp_path / "nope.csv", tiny_config())
    assert "nope.csv" in str(info.value)
    path = tmp_path / "big.csv"
    path.write_text("a\n" + "1\n" * 600)
    with pytest.raises(MediaError, match="above the limit") as info:
        TimeSeriesEncoder.load(path, tiny_config(), max_bytes=100)
    assert "big.csv" in str(info.value)
    with pytest.raises(MediaError, match="not a numeric"):
        TimeSeriesEncoder.load(["a", "b"], tiny_config())


# -- preprocessing and normalization -----------------------------------------------------------------------------------


def test_short_series_is_left_padded_with_mask_zero():
    series = wave(10, channels=1)
    out = TimeSeriesEncoder.preprocess(series, tiny_config())
    values, mask = out["values"], out["mask"]
    assert values.shape == mask.shape == (1, 32, 2)
    assert torch.equal(values[0, -10:, 0], torch.from_numpy(series[:, 0]))  # most recent values at the end
    assert mask[0, :22].sum() == 0 and mask[0, 22:, 0].sum() == 10
    assert mask[0, :, 1].sum() == 0 and values[0, :, 1].abs().sum() == 0  # unused channel: padding


def test_long_series_is_truncated_keeping_the_most_recent_values():
    series = wave(50)
    out = TimeSeriesEncoder.preprocess(series, tiny_config())
    assert torch.equal(out["values"][0], torch.from_numpy(series[-32:]))
    assert out["mask"].min() == 1


def test_missing_values_are_masked_and_ignored_by_instance_normalization():
    series = np.array([1.0, np.nan, 3.0, 5.0], np.float32)
    out = TimeSeriesEncoder.preprocess(series, tiny_config(num_channels=1))
    assert out["mask"][0, -4:, 0].tolist() == [1, 0, 1, 1]
    assert out["values"][0, -3, 0] == 0 and torch.isfinite(out["values"]).all()
    encoder = tiny_encoder(num_channels=1)
    normalized, loc, scale = encoder.normalize(out["values"], out["mask"])
    # hand-computed over the observed values {1, 3, 5}: mean 3, population std sqrt(8 / 3)
    assert loc.shape == scale.shape == (1, 1, 1)
    assert loc.item() == pytest.approx(3.0)
    assert scale.item() == pytest.approx(math.sqrt(8 / 3), rel=1e-6)
    expected = [(1 - 3) / math.sqrt(8 / 3), 0.0, 0.0, (5 - 3) / math.sqrt(8 / 3)]
    assert normalized[0, -4:, 0].tolist() == pytest.approx(expected, abs=1e-6)
    assert normalized[0, :-4].abs().sum() == 0  # padding stays 0
    # NaN values with no mask count as missing too
    raw = torch.tensor([[1.0, float("nan"), 3.0, 5.0]]).unsqueeze(-1)
    _, loc2, scale2 = encoder.normalize(raw)
    assert loc2.item() == pytest.approx(3.0) and scale2.item() == pytest.approx(math.sqrt(8 / 3), rel=1e-6)


def test_normalize_edge_cases():
    encoder = tiny_encoder()
    values = torch.tensor([[[2.0, 0.0], [2.0, 0.0]]])  # constant channel, unobserved channel
    mask = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    normalized, loc, scale = encoder.normalize(values, mask)
    assert loc.flatten().tolist() == [2.0, 0.0]
    assert scale.flatten().tolist() == pytest.approx([2.0 + encoder.config.eps, 1.0])
    assert normalized.abs().sum() == 0


# -- network -----------------------------------------------------------------------------------------------------------


def test_forward_backward():
    encoder = tiny_encoder().train()
    batch = [TimeSeriesEncoder.preprocess(wave(n, seed=n), encoder.config) for n in (10, 32, 70)]
    values = torch.cat([b["values"] for b in batch])
    mask = torch.cat([b["mask"] for b in batch])
    tokens = encoder(values, mask)
    assert tokens.shape == (3, TimeSeriesEncoder.tokens_per_unit(encoder.config), encoder.output_dim) == (3, 4, 32)
    assert torch.isfinite(tokens).all()
    tokens.square().mean().backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_output_is_invariant_to_affine_scaling_of_each_channel():
    encoder = tiny_encoder()
    series = wave(40)
    series[[3, 17], 0] = np.nan
    scaled = series * np.array([5.0, 0.25], np.float32) + np.array([3.0, -100.0], np.float32)
    a = TimeSeriesEncoder.preprocess(series, encoder.config)
    b = TimeSeriesEncoder.preprocess(scaled, encoder.config)
    with torch.no_grad():
        assert torch.allclose(encoder(a["values"], a["mask"]), encoder(b["values"], b["mask"]), atol=1e-4)


def test_values_under_mask_zero_do_not_matter_and_nan_means_missing():
    encoder = tiny_encoder()
    out = TimeSeriesEncoder.preprocess(wave(20), encoder.config)
    values, mask = out["values"], out["mask"]
    noisy = torch.where(mask > 0, values, torch.randn_like(values) * 100)
    with_nan = torch.where(mask > 0, values, torch.full_like(values, float("nan")))
    with torch.no_grad():
        reference = encoder(values, mask)
        assert torch.allclose(reference, encoder(noisy, mask), atol=1e-5)
        assert torch.allclose(reference, encoder(with_nan), atol=1e-5)  # mask=None: NaN = missing


def test_observed_patches_do_not_attend_to_padding_patches():
    encoder = tiny_encoder()
    out = TimeSeriesEncoder.preprocess(wave(12), encoder.config)  # 32 steps, patches of 8: the first two are padding
    with torch.no_grad():
        reference = encoder(out["values"], out["mask"])
        encoder.pos_embed[:2] += torch.randn(2, encoder.config.dim)  # changes only the padding tokens' inputs
        changed = encoder(out["values"], out["mask"])
    assert torch.allclose(reference[:, 2:], changed[:, 2:], atol=1e-5)
    assert not torch.allclose(reference[:, :2], changed[:, :2])


def test_forward_fits_other_lengths_and_channel_counts():
    encoder = tiny_encoder()
    series = wave(20, channels=1)
    out = TimeSeriesEncoder.preprocess(series, encoder.config)
    with torch.no_grad():
        direct = encoder(torch.from_numpy(series)[None])  # (1, 20, 1) -> padded inside
        assert torch.allclose(direct, encoder(out["values"], out["mask"]), atol=1e-5)


def test_tokens_feed_the_mlp_connector():
    encoder = tiny_encoder()
    out = TimeSeriesEncoder.preprocess(wave(32), encoder.config)
    connector = build_connector("series", {"type": "mlp"}, input_dim=encoder.output_dim, output_dim=64)
    assert connector(encoder(out["values"], out["mask"])).shape == (1, 4, 64)


def test_load_pretrained_gives_identical_outputs(tmp_path):
    from safetensors.torch import save_file

    assert ENCODERS.get("patch_ts") is TimeSeriesEncoder
    source = tiny_encoder(seed=0)
    save_file(source.state_dict(), str(tmp_path / "series.safetensors"))
    torch.manual_seed(99)
    loaded = build_encoder("series", {"type": "patch_ts", "pretrained": str(tmp_path / "series.safetensors"), **TINY})
    out = TimeSeriesEncoder.preprocess(wave(25), source.config)
    with torch.no_grad():
        assert torch.equal(source(out["values"], out["mask"]), loaded.eval()(out["values"], out["mask"]))
    other = TimeSeriesEncoder(tiny_config(dim=64))
    with pytest.raises(ConfigError, match="series encoder pretrained"):
        other.load_pretrained(tmp_path / "series.safetensors")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"context_length": 30}, "encoders.series.context_length"),
        ({"patch_size": 0}, "encoders.series.patch_size"),
        ({"num_channels": -1}, "encoders.series.num_channels"),
        ({"num_heads": 3}, "encoders.series.num_heads"),
        ({"depth": 0}, "encoders.series.depth"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        tiny_config(**overrides)


# -- the convolutional encoder (series_conv) ---------------------------------------------------------------------------

CONV = {"type": "series_conv", "context_length": 64, "num_channels": 2, "widths": [8, 16], "kernel_size": 5,
        "dim": 24, "tokens": 4}  # fmt: skip


def conv_encoder(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_encoder("series", {**CONV, **overrides}).eval()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"kernel_size": 4}, "encoders.series.kernel_size"),
        ({"widths": []}, "encoders.series.widths"),
        ({"widths": [8, 0]}, "encoders.series.widths"),
        ({"context_length": 66}, "encoders.series.context_length"),
        ({"tokens": 17}, "encoders.series.tokens"),  # 64 steps after two poolings: 16 left
        ({"dim": True}, "encoders.series.dim"),
        ({"eps": 0.0}, "encoders.series.eps"),
    ],
)
def test_conv_config_errors_name_the_field(overrides, field):
    from unimoe.encoders.series import SeriesConvEncoderConfig

    spec = {k: v for k, v in CONV.items() if k != "type"}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        SeriesConvEncoderConfig(**{**spec, **overrides})


def test_conv_encoder_reads_files_and_trains(tmp_path):
    from unimoe.encoders import encoder_class
    from unimoe.encoders.series import SeriesConvEncoder

    cls, config = encoder_class(CONV, "series")
    assert cls is SeriesConvEncoder and cls.tokens_per_unit(config) == 4
    encoder = conv_encoder().train()
    np.savetxt(tmp_path / "a.csv", wave(50), delimiter=",")
    np.save(tmp_path / "b.npy", wave(90, channels=1)[:, 0])
    batch = [cls.preprocess(cls.load(tmp_path / name, config), config) for name in ("a.csv", "b.npy")]
    values, mask = torch.cat([b["values"] for b in batch]), torch.cat([b["mask"] for b in batch])
    assert values.shape == mask.shape == (2, 64, 2)
    tokens = encoder(values, mask)
    assert tokens.shape == (2, 4, 24) and torch.isfinite(tokens).all()
    tokens.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    connector = build_connector("series", {"type": "mlp"}, input_dim=encoder.output_dim, output_dim=32)
    assert connector(tokens).shape == (2, 4, 32)


def test_conv_encoder_shares_the_series_contract():
    """Affine invariance per channel, NaN = missing, values under mask 0 ignored, other lengths fitted inside."""
    encoder = conv_encoder()
    series = wave(40)
    series[[3, 17], 0] = np.nan
    scaled = series * np.array([5.0, 0.25], np.float32) + np.array([3.0, -100.0], np.float32)
    a, b = (type(encoder).preprocess(s, encoder.config) for s in (series, scaled))
    noisy = torch.where(a["mask"] > 0, a["values"], torch.randn_like(a["values"]) * 100)
    with torch.no_grad():
        reference = encoder(a["values"], a["mask"])
        torch.testing.assert_close(encoder(b["values"], b["mask"]), reference, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(encoder(noisy, a["mask"]), reference)
        torch.testing.assert_close(encoder(torch.from_numpy(series)[None]), reference)  # NaN = missing, padded inside


def test_conv_encoder_detects_a_motif_wherever_it_sits_within_a_token():
    """A bump moved by a multiple of the pooling stride inside one token's span gives the same tokens; moved into
    another token's span, it changes that token (tokens keep coarse position: "early" or "late" in the series)."""
    from unimoe.encoders.series import SeriesConvEncoder, SeriesConvEncoderConfig

    torch.manual_seed(0)
    # 256 steps, two tokens of 128 steps; a feature sees +-23 steps (kernel 5: 2 + 2 + 1 at stride 1, 4 + 4 + 2 at
    # stride 2, 8 at stride 4), so a bump at 40-52 (or 48-60) stays clear of the border and of the token boundary
    encoder = SeriesConvEncoder(
        SeriesConvEncoderConfig(context_length=256, num_channels=1, widths=[8, 16], kernel_size=5, dim=24, tokens=2)
    ).eval()
    series = torch.zeros(1, 256, 1)
    series[0, 40:52, 0] = 1.0
    with torch.no_grad():
        base = encoder(series)
        torch.testing.assert_close(encoder(series.roll(8, dims=1)), base)
        moved = encoder(series.roll(128, dims=1))
    assert (moved[0, 1] - base[0, 1]).abs().max() > 1e-3


def test_a_model_preset_switches_to_the_conv_series_encoder_and_still_forecasts():
    from unimoe.encoders.series import SeriesConvEncoder
    from unimoe.presets import build_model

    spec = {"type": "series_conv", "context_length": 128, "num_channels": 6, "widths": [8], "dim": 32, "tokens": 8}
    model = build_model("tiny", {"encoders": {"series": spec}})
    encoder = model.model.encoders["series"]
    assert isinstance(encoder, SeriesConvEncoder) and encoder.output_dim == 32
    tokens = model.model.connectors["series"](encoder(torch.randn(2, 100, 3)))
    assert tokens.shape == (2, 8, model.config.text_config.hidden_size)
    assert "series" in model.model.generation_heads  # the forecasting head reads this encoder's context length


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        # European style: ';' between fields, ',' as decimal point (read as [5, 5, 25, 75] before)
        ("date;sales\n2020-01-01;1,5\n2020-01-02;2,5\n2020-01-03;7,25\n", "seems to use ';' as its separator"),
        ("1;2\n3;4\n", "seems to use ';' as its separator"),
        # more fields than the header: pandas made the extra leading field an index (read as [20, 40, 60] before)
        ("value\n10,20\n30,40\n50,60\n", r"line 2 has 2 fields but the first line \(line 1\) has 1"),
        ("a,b\n1,2\n3,4,5\n", r"line 3 has 3 fields but the first line \(line 1\) has 2"),
    ],
)
def test_misread_tables_are_rejected(tmp_path, text, needle):
    path = tmp_path / "s.csv"
    path.write_text(text)
    with pytest.raises(MediaError, match=needle) as info:
        load_series(path, tiny_config())
    assert str(info.value).startswith(f"{path}: ")


def test_short_rows_stay_missing_values(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("a,b\n1,2\n3\n")
    np.testing.assert_array_equal(load_series(path, tiny_config()), np.array([[1, 2], [3, np.nan]], np.float32))


def test_values_beyond_float32_are_called_too_large_not_infinite(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("v\n1\n1e300\n")
    with pytest.raises(MediaError, match=r"values too large for float32 \(1e\+300 in row 2"):
        load_series(path, tiny_config())
    with pytest.raises(MediaError, match="contains infinite values"):
        load_series(np.array([1.0, np.inf]), tiny_config())


@pytest.mark.parametrize("source", [{"a": 1}, 3.5, object()])
def test_unusable_series_objects_name_what_is_accepted(source):
    with pytest.raises(MediaError, match=r"a series must be a file path, bytes, a list of numbers or an \(L,\)"):
        load_series(source, tiny_config())
