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


# -- the convolutional encoder (image_conv) -----------------------------------------------------------------------

CONV = {"type": "image_conv", "image_size": 32, "widths": [8, 16], "dim": 24, "grid": 2}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"widths": []}, "encoders.image.widths"),
        ({"widths": [8, -1]}, "encoders.image.widths"),
        ({"image_size": 30}, "encoders.image.image_size"),  # two 2x2 poolings need a multiple of 4
        ({"grid": 0}, "encoders.image.grid"),
        ({"grid": 9}, "encoders.image.grid"),  # larger than the 8x8 feature map
        ({"dim": 2.5}, "encoders.image.dim"),
        ({"std": [1.0, 1.0]}, "encoders.image.mean/std"),
    ],
)
def test_conv_config_errors_name_the_field(kwargs, field):
    from unimoe.encoders.image import ImageConvEncoderConfig

    spec = {k: v for k, v in CONV.items() if k != "type"}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ImageConvEncoderConfig(**{**spec, **kwargs})


@pytest.mark.parametrize(("grid", "tokens"), [(2, 4), (1, 1)])
def test_conv_encoder_reads_files_and_trains(tmp_path, grid, tokens):
    from unimoe.encoders import encoder_class
    from unimoe.encoders.image import ImageConvEncoder

    torch.manual_seed(0)
    spec = {**CONV, "grid": grid}
    cls, config = encoder_class(spec, "image")
    assert cls is ImageConvEncoder and cls.tokens_per_unit(config) == tokens
    encoder = build_encoder("image", spec)
    (tmp_path / "a.png").write_bytes(png_bytes((20, 30)))
    values = cls.preprocess(cls.load(tmp_path / "a.png", config), config)["values"]
    assert values.shape == (1, 3, 32, 32)
    out = encoder(torch.cat([values, torch.randn_like(values)]))
    assert out.shape == (2, tokens, 24) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    with pytest.raises(ValueError, match=r"expected values of shape \(N, 3, 32, 32\)"):
        encoder(torch.randn(1, 3, 16, 16))


def test_conv_encoder_is_translation_invariant_within_its_cells():
    """A shape moved by a multiple of the pooling stride, inside the same grid cell, gives the same tokens; moved to
    another cell, it changes the cell it lands in (the grid keeps coarse position: "is the shape on the left")."""
    from unimoe.encoders.image import ImageConvEncoder, ImageConvEncoderConfig

    torch.manual_seed(0)
    # 128 px, two cells of 64: the network sees 24 px around a position, so a shape at 32-46 px never touches a
    # cell's edge or the image border (where zero padding differs from the background's features)
    encoder = ImageConvEncoder(ImageConvEncoderConfig(image_size=128, widths=[8, 16], dim=24, grid=2)).eval()
    image = torch.zeros(1, 3, 128, 128)
    image[0, :, 32:38, 32:36] = 1.0  # in the top-left cell
    with torch.no_grad():
        base = encoder(image)
        torch.testing.assert_close(encoder(image.roll(shifts=(8, 4), dims=(2, 3))), base)
        moved = encoder(image.roll(shifts=64, dims=3))  # to the top-right cell
    assert (moved[0, 0] - base[0, 0]).abs().max() > 1e-3


def test_a_model_preset_switches_to_the_conv_image_encoder():
    from unimoe.encoders.image import ImageConvEncoder
    from unimoe.presets import build_model

    model = build_model("tiny", {"encoders": {"image": {"type": "image_conv", "widths": [8], "grid": 2}}})
    encoder = model.model.encoders["image"]
    assert isinstance(encoder, ImageConvEncoder) and encoder.output_dim == 64
    tokens = model.model.connectors["image"](encoder(torch.randn(2, 3, 32, 32)))
    assert tokens.shape == (2, 4, model.config.text_config.hidden_size)


def test_an_image_above_the_pixel_limit_is_one_clear_error(tmp_path, monkeypatch):
    """PIL's DecompressionBombError (a small file that decodes to a huge image) becomes one MediaError with the size."""
    path = tmp_path / "huge.png"
    Image.new("L", (120, 100)).save(path)  # 12,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3_000)  # PIL refuses above twice this
    with pytest.raises(MediaError, match=r"image is 120x100 pixels, above the limit of 6,000 pixels") as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: ")


def test_16_bit_and_float_images_are_rescaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips: a 16-bit PNG came out white, a float TIFF in [0, 1] black."""
    ramp16 = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "g16.png")  # mode I;16
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    got = np.asarray(load_image(tmp_path / "g16.png"))[..., 0]
    np.testing.assert_array_equal(got, np.round(ramp16 / 257.0).astype(np.uint8))

    ramp = np.linspace(0, 1, 64 * 8, dtype=np.float32).reshape(8, 64)
    Image.fromarray(ramp, mode="F").save(tmp_path / "f.tif")
    got = np.asarray(load_image(tmp_path / "f.tif"))[..., 0].astype(int)
    assert np.abs(got - np.round(ramp * 255)).max() <= 1 and got.min() == 0 and got.max() == 255

    Image.fromarray((ramp16 // 16).astype(np.int32), mode="I").save(tmp_path / "i32.tif")  # 12-bit data in mode I
    got = np.asarray(load_image(tmp_path / "i32.tif"))[..., 0].astype(int)
    assert np.abs(got - (ramp16 // 16) / 257.0).max() <= 1

    Image.fromarray(ramp * 1000 - 10, mode="F").save(tmp_path / "depth.tif")  # no brightness to read: rejected
    with pytest.raises(MediaError, match=r"depth.tif: image values range from -10 to 990 \(float32\); expected 0..1"):
        load_image(tmp_path / "depth.tif")
    assert np.asarray(load_image(np.full((2, 2), 65535, np.uint16))).max() == 255  # arrays follow the same rule


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        (
            [[1, 2], [3, 4]],
            r"<list>: an image must be a file path, bytes, a PIL image or an \(H, W\[, C\]\) array; got",
        ),
        (5, "<int>: an image must be"),
        (np.zeros((16, 16, 5)), r"<array \(16, 16, 5\)>: expected an \(H, W\) or \(H, W, C\) image array with C <= 4"),
        (np.array([[None]]), r"<array \(1, 1\)>: expected a numeric image array .* got dtype object"),
        (np.ones((4, 4, 3), np.complex64), "got dtype complex64"),
    ],
)
def test_unusable_image_objects_name_what_is_accepted(source, needle):
    with pytest.raises(MediaError, match=needle):
        load_image(source)
