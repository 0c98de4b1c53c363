"""Image encoders: ViT patch tokens from timm or open_clip (``vit``: a chosen layer, prefix/CLS tokens dropped), and a
small convolutional network with max-pooled grid tokens for encoders trained from scratch (``image_conv``; the
offline recipes use it: ``digits_cls`` 0.872 -> 0.975 in the full ``tiny`` recipe, docs/results.md).

``conv_stem: [C1, ..., Cn]`` (timm backend) replaces the ViT's patch embedding by a stack of ``n`` 3x3 stride-2
convolutions (timm's ``ConvStem``: LayerNorm2d + GELU between them) and timm's ``HybridEmbed`` projection, so
``patch_size`` must be ``2 ** n``. The token grid is the same as with the patchify stem; what changes is the
inductive bias: "early convolutions help transformers see better" (Xiao et al., 2021). It matters for encoders
trained from scratch on little data. Measured on ``digits_cls`` (1,295 training images, 32 px, the tiny ViT of
width 64 and depth 2, mean-pooled tokens + a linear classifier, lr 5e-4, batch 32): test accuracy 0.72 / 0.86
after 300 / 1,000 steps with the patch-8 stem, 0.92 / 0.94 with ``conv_stem: [16, 32, 64]``. Not in the ``tiny``
preset: in the full offline recipe (one run) the LLM read digits far worse through it (``digits_cls`` 0.15 after
align against 0.83; docs/results.md).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimoe.errors import ConfigError

from .base import ENCODERS, MediaEncoder, MediaError, check_channels, check_conv_fields, check_size


@dataclass
class ImageEncoderConfig:
    """``backend="timm"``: ``timm.create_model(model_name, **model_kwargs)``; ``backend="open_clip"``: the visual
    tower of ``open_clip.create_model(model_name)``. ``pretrained`` (in the encoder spec) is a local file or
    directory; nothing is downloaded."""

    backend: str = "timm"
    model_name: str = "vit_tiny_patch16_224"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224
    patch_size: int = 16
    select_layer: int = -1
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    conv_stem: list[int] | None = None  # channels of 3x3 stride-2 convolutions replacing the patchify stem

    def __post_init__(self) -> None:
        if self.backend not in ("timm", "open_clip"):
            raise ConfigError(f"encoders.image.backend: unknown backend {self.backend!r}; choose 'timm' or 'open_clip'")
        if self.conv_stem is not None:
            stem = self.conv_stem
            check_channels("encoders.image.conv_stem", stem)
            if self.backend != "timm":
                raise ConfigError("encoders.image.conv_stem: only the timm backend takes a convolutional stem")
            if self.patch_size != 2 ** len(stem):
                raise ConfigError(
                    f"encoders.image.conv_stem: {len(stem)} stride-2 convolutions make patches of {2 ** len(stem)} "
                    f"pixels, but patch_size is {self.patch_size}"
                )
        if self.image_size % self.patch_size != 0:
            raise ConfigError(
                f"encoders.image.image_size: {self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("encoders.image.mean/std: need 3 values (RGB)")


#: dtype kinds an image array may have: bool, unsigned / signed integers, floats
IMAGE_DTYPE_KINDS = "buif"


def to_uint8(source: Any, array: np.ndarray) -> np.ndarray:
    """Pixel values of any bit depth → ``uint8``, one rule for arrays and for high-bit-depth files (PIL modes ``I;16``,
    ``I``, ``F``), since PIL's own ``convert`` clips them (a 16-bit image turns white, a float image black):

    * ``bool`` → 0 / 255; ``uint8`` → as is;
    * ``uint16`` (16-bit PNG / TIFF) → ``/ 257``, which maps the type's full range 0..65535 onto 0..255;
    * other numbers by their values: all within [0, 1] → ``* 255`` (floats in [0, 1]; 0/1 masks); within [0, 255]
      → as is (8-bit data in a wider type); integers within [0, 65535] → ``/ 257`` (16-bit data in a 32-bit type,
      e.g. a 12- or 16-bit image read as mode ``I``);
    * anything else (negative values, floats above 255, integers above 65535) has no unambiguous brightness and is
      rejected rather than clipped or min-max stretched into a different picture."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in IMAGE_DTYPE_KINDS:
        raise MediaError(source, f"expected a numeric image array (bool, integer or float), got dtype {array.dtype}")
    if array.dtype.kind == "b":
        return array.astype(np.uint8) * 255
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:
        return np.round(array / 257.0).astype(np.uint8)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise MediaError(source, "image array contains NaN or infinite values")
    low, high = array.min(), array.max()
    if low >= 0 and high <= 1:
        return np.round(array * 255.0).astype(np.uint8)
    if low >= 0 and high <= 255:
        return np.round(array).astype(np.uint8)
    if array.dtype.kind in "ui" and low >= 0 and high <= 65535:
        return np.round(array / 257.0).astype(np.uint8)
    accepted = "0..1 or 0..255" if array.dtype.kind == "f" else "0..255, or 0..65535 for 16-bit data"
    raise MediaError(source, f"image values range from {low:g} to {high:g} ({array.dtype}); expected {accepted}")


def _to_rgb(source: Any, image):
    """A decoded PIL image → RGB, rescaling high-bit-depth modes with :func:`to_uint8` (``convert`` would clip)."""
    from PIL import Image

    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = Image.fromarray(to_uint8(source, np.asarray(image)))
    return image.convert("RGB")


def _bomb_size(data: bytes) -> str:
    """``"WxH pixels"`` of an image PIL refused to open as a decompression bomb, read from its header without the size
    check (PIL's error gives only the pixel count); ``"too many pixels"`` when no format reads the header."""
    from PIL import Image

    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is None or accept(data[:16]):
                width, height = factory(io.BytesIO(data), None).size
                return f"{width}x{height} pixels"
        except Exception:  # not this format: try the next one
            continue
    return "too many pixels"


def load_image(source: Any, *, max_bytes: int | None = None):
    """A path, bytes, PIL image or ``(H, W[, C])`` array → an RGB PIL image; corrupt input raises MediaError."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return _to_rgb(source, source)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = np.moveaxis(array, 0, -1)  # CHW -> HWC
        if array.ndim not in (2, 3) or array.size == 0 or (array.ndim == 3 and array.shape[-1] > 4):
            raise MediaError(
                source, f"expected an (H, W) or (H, W, C) image array with C <= 4 channels, got shape {array.shape}"
            )
        array = to_uint8(source, array)
        return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array).convert("RGB")
    if not isinstance(source, (str, Path, bytes, bytearray)):
        raise MediaError(
            source,
            f"an image must be a file path, bytes, a PIL image or an (H, W[, C]) array; got {type(source).__name__}",
        )
    check_size(source, max_bytes)
    data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated file fails here, not later
    except Image.DecompressionBombError:
        # PIL refuses images above 2 * MAX_IMAGE_PIXELS (its warning threshold is MAX_IMAGE_PIXELS: those decode)
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise MediaError(source, f"image is {_bomb_size(bytes(data))}, above the limit of {limit:,} pixels") from None
    except UnidentifiedImageError:
        raise MediaError(source, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise MediaError(source, f"corrupt image ({err})") from None
    if image.width == 0 or image.height == 0:
        raise MediaError(source, "image has zero width or height")
    return _to_rgb(source, image)


def image_to_tensor(image, config: ImageEncoderConfig) -> torch.Tensor:
    """Resize to ``image_size`` (bicubic), scale to [0, 1], normalize.  # (3, S, S)"""
    from PIL import Image

    image = image.resize((config.image_size, config.image_size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    mean = torch.tensor(config.mean).view(3, 1, 1)
    std = torch.tensor(config.std).view(3, 1, 1)
    return (x - mean) / std


@ENCODERS.register("vit")
class ImageEncoder(MediaEncoder):
    modality = "image"
    Config = ImageEncoderConfig

    def __init__(self, config: ImageEncoderConfig):
        super().__init__(config)
        if config.backend == "timm":
            import timm

            kwargs = {"img_size": config.image_size, "patch_size": config.patch_size, **config.model_kwargs}
            if config.conv_stem:
                kwargs.update(patch_size=1, embed_layer=self._conv_stem_embed(config.conv_stem))
            self.vit = timm.create_model(config.model_name, pretrained=False, num_classes=0, **kwargs)
            self._dim = self.vit.embed_dim
        else:
            import open_clip

            self.vit = open_clip.create_model(config.model_name, pretrained=None, **config.model_kwargs).visual
            self._dim = self.vit.transformer.width

    @staticmethod
    def _conv_stem_embed(channels: list[int]):
        """timm's hybrid-ViT embedding around its ``ConvStem``: 3x3 stride-2 convolutions, then a 1x1 projection to
        the ViT width (LayerNorm, not BatchNorm: an LLM batch holds only a few images of a modality)."""
        from functools import partial

        from timm.layers import HybridEmbed
        from timm.models.vision_transformer_hybrid import ConvStem

        stem = ConvStem(
            depth=len(channels),
            channels=tuple(channels),
            stride=(2,) * len(channels),
            kernel_size=3,
            norm_layer="layernorm2d",
            act_layer=torch.nn.GELU,
        )
        return partial(HybridEmbed, backbone=stem, proj=True)

    @property
    def output_dim(self) -> int:
        return self._dim

    @classmethod
    def load(cls, source: Any, config: ImageEncoderConfig, *, max_bytes: int | None = None):
        return load_image(source, max_bytes=max_bytes)

    @classmethod
    def preprocess(cls, media, config: ImageEncoderConfig) -> dict[str, torch.Tensor]:
        return {"values": image_to_tensor(media, config).unsqueeze(0)}  # (1, 3, S, S)

    @classmethod
    def tokens_per_unit(cls, config: ImageEncoderConfig) -> int:
        return (config.image_size // config.patch_size) ** 2

    def forward(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``values (N, 3, S, S)`` → patch tokens of the selected layer ``(N, P, D)`` without prefix tokens."""
        if self.config.backend == "timm":
            (tokens,) = self.vit.forward_intermediates(
                values, indices=[self.config.select_layer], output_fmt="NLC", intermediates_only=True
            )
            return tokens
        out = self.vit.forward_intermediates(values, indices=[self.config.select_layer], intermediates_only=True)
        feats = out["image_intermediates"][0]  # (N, D, h, w)
        return feats.flatten(2).transpose(1, 2)  # (N, P, D)

    def load_pretrained(self, path: str | Path) -> None:
        """timm / open_clip weights of the backbone (safetensors) or of this whole encoder."""
        from safetensors.torch import load_file

        path = Path(path)
        file = path / "model.safetensors" if path.is_dir() else path
        if not file.is_file() or file.suffix != ".safetensors":
            raise ConfigError(f"image encoder pretrained: {path} is not a .safetensors file or directory")
        state = load_file(str(file))
        if any(k.startswith("vit.") for k in state):
            state = {k.removeprefix("vit."): v for k, v in state.items()}
        if self.config.backend == "open_clip":
            state = {k.removeprefix("visual."): v for k, v in state.items() if not k.startswith("transformer.")}
        try:
            missing, unexpected = self.vit.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            detail = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise ConfigError(
                f"{self.modality} encoder pretrained: {file} does not match the encoder ({detail})"
            ) from None
        missing = [k for k in missing if not k.startswith("head")]
        if missing or unexpected:
            raise ConfigError(
                f"image encoder pretrained: {file} does not match {self.config.model_name} "
                f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
            )


# -- a convolutional encoder -----------------------------------------------------------------------------------


@dataclass
class ImageConvEncoderConfig:
    """A small convolutional network for images trained from scratch, with max-pooled tokens.

    ``widths`` are the channels of its blocks; each block is two ``3x3`` convolutions and a ``2x2`` max pool; a last
    ``3x3`` convolution projects to ``dim``. The feature map is then max-pooled to a ``grid x grid`` of tokens
    (``grid: 1``: one token, the maximum over all positions)."""

    image_size: int = 32
    widths: list[int] = field(default_factory=lambda: [16, 32])
    dim: int = 64
    grid: int = 2
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self) -> None:
        check_conv_layout("encoders.image", self, "image_size", "dim", "grid")
        side = self.image_size // 2 ** len(self.widths)
        if self.grid > side:
            raise ConfigError(
                f"encoders.image.grid: {self.grid} is larger than the {side}x{side} feature map "
                f"(image_size {self.image_size} after {len(self.widths)} 2x2 poolings)"
            )


def check_conv_layout(where: str, config: Any, *int_fields: str) -> None:
    """The checks the frame encoders (``image_conv``, ``video_conv``) share: :func:`check_conv_fields`, then
    ``widths``' 2x2 poolings divide ``image_size`` and ``mean`` / ``std`` are three values. Errors name
    ``where.<field>``."""
    check_conv_fields(where, config, *int_fields)
    widths = config.widths
    if config.image_size % 2 ** len(widths) != 0:
        raise ConfigError(
            f"{where}.image_size: {config.image_size} is not divisible by 2 ** {len(widths)} (one 2x2 pooling per "
            f"width in widths)"
        )
    if len(config.mean) != 3 or len(config.std) != 3:
        raise ConfigError(f"{where}.mean/std: need 3 values (RGB)")


@ENCODERS.register("image_conv")
class ImageConvEncoder(MediaEncoder):
    """Why a hand-written network: timm's CNNs (ResNet, ConvNeXt, EfficientNet) start at millions of parameters and
    expect 224 px inputs, and nothing pretrained can be loaded offline. The small images of the offline suite need
    the convolution's inductive bias — one filter at every position and a maximum over positions, so a digit or a
    shape is recognised wherever it sits — which the from-scratch ViT learns only slowly (docs/results.md). The
    2D counterpart of the ``video_conv`` encoder."""

    modality = "image"
    Config = ImageConvEncoderConfig

    def __init__(self, config: ImageConvEncoderConfig):
        super().__init__(config)
        layers: list[torch.nn.Module] = []
        channels = 3
        for width in config.widths:
            layers += [
                torch.nn.Conv2d(channels, width, 3, padding=1),
                torch.nn.GELU(),
                torch.nn.Conv2d(width, width, 3, padding=1),
                torch.nn.GELU(),
                torch.nn.MaxPool2d(2),
            ]
            channels = width
        layers.append(torch.nn.Conv2d(channels, config.dim, 3, padding=1))
        self.net = torch.nn.Sequential(*layers)

    @property
    def output_dim(self) -> int:
        return self.config.dim

    @classmethod
    def load(cls, source: Any, config: ImageConvEncoderConfig, *, max_bytes: int | None = None):
        return load_image(source, max_bytes=max_bytes)

    @classmethod
    def preprocess(cls, media, config: ImageConvEncoderConfig) -> dict[str, torch.Tensor]:
        return {"values": image_to_tensor(media, config).unsqueeze(0)}  # (1, 3, S, S)

    @classmethod
    def tokens_per_unit(cls, config: ImageConvEncoderConfig) -> int:
        return config.grid**2

    def forward(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``values (N, 3, S, S)`` → ``(N, grid * grid, dim)``, row-major."""
        size = self.config.image_size
        if values.dim() != 4 or values.shape[1] != 3 or values.shape[-2:] != (size, size):
            raise ValueError(
                f"image encoder: expected values of shape (N, 3, {size}, {size}), got {tuple(values.shape)}"
            )
        features = self.net(values)  # (N, dim, S', S')
        grid = torch.nn.functional.adaptive_max_pool2d(features, self.config.grid)  # (N, dim, grid, grid)
        return grid.flatten(2).transpose(1, 2)  # (N, grid * grid, dim)
