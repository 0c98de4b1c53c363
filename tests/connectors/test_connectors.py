import pytest
import torch

from unimoe.connectors import CONNECTORS, build_connector, connector_tokens
from unimoe.errors import ConfigError


@pytest.mark.parametrize("name", CONNECTORS.names())
def test_every_connector_forward_backward(name):
    conn = build_connector("image", {"type": name}, input_dim=24, output_dim=32)
    x = torch.randn(3, 10, 24, requires_grad=True)
    y = conn(x)
    assert y.shape == (3, connector_tokens("image", {"type": name}, 10), 32)
    y.sum().backward()
    assert x.grad.abs().sum() > 0


def test_mlp_pooling_counts_and_values():
    conn = build_connector("audio", {"type": "mlp", "pool": 4}, input_dim=2, output_dim=2)
    assert connector_tokens("audio", {"type": "mlp", "pool": 4}, 10) == 3
    with torch.no_grad():
        conn.linear_1.weight.copy_(torch.eye(2))
        conn.linear_1.bias.zero_()
        conn.linear_2.weight.copy_(torch.eye(2))
        conn.linear_2.bias.zero_()
    conn.act = torch.nn.Identity()
    x = torch.arange(20.0).view(1, 10, 2)
    y = conn(x)
    # windows of 4 tokens: [0..3], [4..7], [8, 9] (the last one shorter)
    torch.testing.assert_close(y[0, :, 0], torch.tensor([3.0, 11.0, 17.0]))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_mlp_output_norm_fixes_the_token_scale(norm):
    """Whatever the scale of the encoder tokens, a normalized connector's tokens have per-element RMS
    ``norm_scale`` at initialization (the text embeddings' scale), and the gain stays learnable."""
    torch.manual_seed(0)
    spec = {"type": "mlp", "norm": norm, "norm_scale": 0.05}
    conn = build_connector("image", spec, input_dim=8, output_dim=32)
    for scale in (1e-3, 1.0, 1e3):
        y = conn(torch.randn(2, 5, 8) * scale)
        rms = y.pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, 0.05), rtol=1e-3, atol=1e-5)
    conn(torch.randn(2, 5, 8)).sum().backward()
    assert conn.norm.gain.grad is not None
    # without it the parameter set is unchanged (old checkpoints load as before)
    plain = build_connector("image", {"type": "mlp"}, input_dim=8, output_dim=32)
    assert {n for n, _ in plain.named_parameters()} == {n for n, _ in conn.named_parameters()} - {"norm.gain"}


def test_connector_norm_gain_survives_model_initialization():
    """transformers' post_init resets every *LayerNorm weight to 1; the connector's gain must keep ``norm_scale``."""
    from unimoe import build_model

    model = build_model("tiny", connectors={"image": {"type": "mlp", "norm": "layernorm", "norm_scale": 0.02}})
    torch.testing.assert_close(model.model.connectors["image"].norm.gain, torch.full((64,), 0.02))


def test_resampler_is_a_fixed_budget_and_respects_the_mask():
    torch.manual_seed(0)
    conn = build_connector("video", {"type": "resampler", "num_queries": 5, "num_heads": 4}, input_dim=8, output_dim=16)
    short, long = torch.randn(1, 3, 8), torch.randn(1, 40, 8)
    assert conn(short).shape == conn(long).shape == (1, 5, 16)
    padded = torch.cat([short, torch.randn(1, 4, 8) * 100], dim=1)
    mask = torch.tensor([[True] * 3 + [False] * 4])
    torch.testing.assert_close(conn(padded, mask), conn(short), atol=1e-5, rtol=1e-5)


def test_connector_config_errors():
    with pytest.raises(ConfigError, match="connectors.image.type"):
        build_connector("image", {"type": "nope"}, input_dim=2, output_dim=2)
    with pytest.raises(ConfigError, match="num_heads"):
        build_connector("image", {"type": "resampler", "num_heads": 3}, input_dim=2, output_dim=16)
    with pytest.raises(ConfigError, match="pool"):
        build_connector("image", {"type": "mlp", "pool": 0}, input_dim=2, output_dim=2)
    with pytest.raises(ConfigError, match="connectors.image.norm"):
        build_connector("image", {"type": "mlp", "norm": "batchnorm"}, input_dim=2, output_dim=2)
    with pytest.raises(ConfigError, match="norm_scale"):
        build_connector("image", {"type": "mlp", "norm": "rmsnorm", "norm_scale": 0}, input_dim=2, output_dim=2)
