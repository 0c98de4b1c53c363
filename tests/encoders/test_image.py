import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from unimoe.encoders import ENCODERS, MediaError, build_encoder
from unimoe.encoders.image import ImageEncoder, ImageEncoderConfig, load_image
from unimoe.errors import ConfigError

TINY = {
    "type": "vit",
    "model_name": "vit_tiny_patch16_224",
    "model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    "image_size": 32,
    "patch_size": 8,
}


def png_bytes(size=(20, 30), seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_forward_backward_shape_and_tokens():
    enc = build_encoder("image", TINY)
    cfg = enc.config
    x = ImageEncoder.preprocess(load_image(png_bytes()), cfg)["values"]
    assert x.shape == (1, 3, 32, 32)
    x = x.repeat(2, 1, 1, 1).requires_grad_(True)
    tokens = enc(x)
    assert tokens.shape == (2, ImageEncoder.tokens_per_unit(cfg), enc.output_dim) == (2, 16, 32)
    tokens.sum().backward()
    assert x.grad is not None and enc.vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_conv_stem_keeps_the_token_grid_and_trains():
    torch.manual_seed(0)
    enc = build_encoder("image", {**TINY, "conv_stem": [8, 16, 32]})
    convs = [m for m in enc.vit.patch_embed.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 and [c.kernel_size for c in convs] == [(3, 3)] * 3
    x = torch.randn(2, 3, 32, 32)
    tokens = enc(x)
    assert tokens.shape == (2, ImageEncoder.tokens_per_unit(enc.config), 32) == (2, 16, 32)
    tokens.sum().backward()
    assert all(c.weight.grad.abs().sum() > 0 for c in convs)
    # a local stem: a pixel in the top-left corner reaches only the first patch's embedding (3 stacked 3x3 stride-2
    # convolutions see 15 pixels), unlike the transformer's output, where every token sees it
    with torch.no_grad():
        y = x.clone()
        y[:, :, 0, 0] += 5.0
        embed = enc.vit.patch_embed
        changed = (embed(y) - embed(x)).abs().amax(dim=(0, 2)) > 1e-6  # (16,) tokens
        assert changed.tolist() == [True] + [False] * 15
        assert ((enc(y) - enc(x)).abs().amax(dim=(0, 2)) > 1e-6).all()


def test_select_layer_changes_the_output():
    torch.manual_seed(0)
    last = build_encoder("image", TINY)
    first = build_encoder("image", {**TINY, "select_layer": 0})
    first.load_state_dict(last.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert not torch.allclose(last(x), first(x))


def test_open_clip_backend_runs():
    enc = build_encoder(
        "image",
        {
            "type": "vit",
            "backend": "open_clip",
            "model_name": "ViT-B-32",
            "image_size": 32,
            "patch_size": 32,
            "model_kwargs": {},
        },
    )
    out = enc(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 49, 768)


def test_inputs_from_path_bytes_array_and_tensor(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes())
    a = ImageEncoder.preprocess(load_image(path), ImageEncoderConfig(image_size=32, patch_size=8))["values"]
    b = ImageEncoder.preprocess(load_image(path.read_bytes()), ImageEncoderConfig(image_size=32, patch_size=8))
    assert torch.equal(a, b["values"])
    arr = np.array(Image.open(path))
    assert load_image(arr).size == (30, 20)
    assert load_image(torch.from_numpy(arr).permute(2, 0, 1)).size == (30, 20)  # CHW tensor
    assert load_image(arr[..., 0]).mode == "RGB"  # grayscale


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p.write_bytes(png_bytes()[:60]), "corrupt image"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"definitely not an image" * 10), "not a readable image"),
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(png_bytes((400, 400))), "above the limit"),
    ],
)
def test_bad_images_raise_one_clear_error(tmp_path, make, needle):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(MediaError, match=needle) as info:
        load_image(path, max_bytes=100_000)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_nan_array_is_rejected():
    with pytest.raises(MediaError, match="NaN"):
        load_image(np.full((4, 4, 3), np.nan))


def test_load_pretrained_from_local_safetensors(tmp_path):
    torch.manual_seed(0)
    source = build_encoder("image", TINY)
    save_file(source.vit.state_dict(), str(tmp_path / "backbone.safetensors"))  # a timm backbone file
    save_file(source.state_dict(), str(tmp_path / "encoder.safetensors"))  # our encoder's own keys
    x = torch.randn(1, 3, 32, 32)
    for name in ("backbone.safetensors", "encoder.safetensors"):
        torch.manual_seed(1)
        target = build_encoder("image", {**TINY, "pretrained": str(tmp_path / name)})
        torch.testing.assert_close(target(x), source(x))
    with pytest.raises(ConfigError, match="does not match"):
        build_encoder(
            "image",
            {
                **TINY,
                "model_kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 2},
                "pretrained": str(tmp_path / "backbone.safetensors"),
            },
        )


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="encoders.image.image_size"):
        ImageEncoderConfig(image_size=30, patch_size=8)
    with pytest.raises(ConfigError, match="encoders.image.backend"):
        ImageEncoderConfig(backend="keras")
    with pytest.raises(ConfigError, match=r"encoders\.image\.conv_stem: 2 stride-2 convolutions .* patch_size is 8"):
        ImageEncoderConfig(image_size=32, patch_size=8, conv_stem=[16, 32])
    with pytest.raises(ConfigError, match="encoders.image.conv_stem: expected a list"):
        ImageEncoderConfig(image_size=32, patch_size=8, conv_stem=[16, 0, 32])
    with pytest.raises(ConfigError, match="encoders.image.conv_stem: only the timm backend"):
        ImageEncoderConfig(backend="open_clip", image_size=32, patch_size=8, conv_stem=[16, 32, 64])
    with pytest.raises(ConfigError, match=r"encoders\.image: unknown field"):
        build_encoder("image", {**TINY, "colour": 1})
    with pytest.raises(ConfigError, match="encoders.image.type"):
        build_encoder("image", {"type": "nope"})
    assert "vit" in ENCODERS.names()


def test_no_second_copy_of_the_packages():
    import sys

    import unimoe.connectors  # noqa: F401
    import unimoe.encoders  # noqa: F401

    assert not any(name == "encoders" or name.startswith(("encoders.", "connectors")) for name in sys.modules)
