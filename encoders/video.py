"""Video encoder: a per-frame ViT (the image encoder) + a learnable temporal position embedding + pooling, with an
optional temporal mixing of the pixels in front of it.

A clip is one unit: ``num_frames`` frames sampled uniformly over it (the centers of ``num_frames`` equal segments,
so the same file always gives the same frames), each encoded by :class:`~unimoe.encoders.image.ImageEncoder`, a
temporal position embedding added per frame, then pooled:

* ``none`` — every frame's patch tokens, frame after frame: ``num_frames * patches`` tokens;
* ``temporal_mean`` — the mean over frames of each patch position: ``patches`` tokens (Video-LLaVA-like budget);
* ``frame_mean`` — one token per frame, the mean over its patches: ``num_frames`` tokens.

``temporal_kernel: K`` (odd, 0 = off) adds ``frames + conv_t(frames)`` before the per-frame encoder: a learned
convolution over ``K`` neighbouring frames at each pixel (channels mixed, no spatial extent). It is the pixel-level
early fusion of C3D / ViViT's tubelets, cut down to what a per-frame backbone can take: each frame's patches see
signed frame differences, so the direction of a motion is in a single frame's tokens instead of being a comparison
the LLM has to learn across frames. ``temporal_init`` starts it at ``zero`` (the plain frames: what a pretrained image
backbone expects) or at ``difference`` (``frame_t + frame_t - frame_{t-1}``, for backbones trained from scratch).
Measured on ``video_motion`` with the tiny encoder trained alone (attention-pooled classifier, 1,000 steps): direction
accuracy 0.52 without it (left/right and up/down confused), 0.99 / 0.98 with ``K = 3`` from zero / difference. Inside
the tiny LLM (video_motion alone, 1,600 steps, encoder lr x0.25) the zero start hardly moved (its weights stayed
below 0.04; direction 0.29, clip accuracy 0.18) while the difference start reached direction 0.67, accuracy 0.30.

Decoding uses PyAV (mp4 / webm / gif / avi / mkv, from a path or bytes); a folder of frame images, a list of
images or arrays, or a ``(T, H, W, C)`` array are accepted too. Only the sampled frames are converted and kept:
long videos are streamed, never held in memory whole.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unimoe.config_utils import config_from_dict
from unimoe.errors import ConfigError

from .base import ENCODERS, MediaEncoder, MediaError, check_size
from .image import ImageEncoder, ImageEncoderConfig, check_conv_layout, image_to_tensor, load_image

POOLINGS = ("none", "temporal_mean", "frame_mean")
TEMPORAL_INITS = ("zero", "difference")
FRAME_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _tiny_image() -> dict[str, Any]:
    return {
        "backend": "timm",
        "model_name": "vit_tiny_patch16_224",
        "model_kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 2},
        "image_size": 32,
        "patch_size": 8,
    }


@dataclass
class VideoEncoderConfig:
    """``image`` is the per-frame image encoder's spec (the fields of ``ImageEncoderConfig``); the default is a
    tiny random-init ViT for offline runs — real models set a real backbone and ``pretrained``."""

    num_frames: int = 8
    image: dict[str, Any] | ImageEncoderConfig = field(default_factory=_tiny_image)
    pooling: str = "none"
    temporal_kernel: int = 0  # frames the pixel-level temporal mixing spans (odd; 0 = off), see the module docstring
    temporal_init: str = "zero"  # its start: zero (plain frames) | difference (adds frame_t - frame_{t-1})

    def __post_init__(self) -> None:
        if isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ConfigError(f"encoders.video.num_frames: must be an integer >= 1, got {self.num_frames!r}")
        k = self.temporal_kernel
        if isinstance(k, bool) or not isinstance(k, int) or k < 0 or (k > 0 and k % 2 == 0):
            raise ConfigError(
                f"encoders.video.temporal_kernel: must be 0 (off) or an odd integer >= 1 (frames centred on each "
                f"frame), got {k!r}"
            )
        if self.temporal_init not in TEMPORAL_INITS:
            raise ConfigError(
                f"encoders.video.temporal_init: unknown init {self.temporal_init!r}; choose one of {TEMPORAL_INITS}"
            )
        if self.temporal_init == "difference" and k < 3:
            raise ConfigError(
                f"encoders.video.temporal_init: 'difference' needs temporal_kernel >= 3 (the previous frame), got {k}"
            )
        if self.pooling not in POOLINGS:
            raise ConfigError(f"encoders.video.pooling: unknown pooling {self.pooling!r}; choose one of {POOLINGS}")
        if not isinstance(self.image, ImageEncoderConfig):
            if not isinstance(self.image, dict):
                raise ConfigError(
                    f"encoders.video.image: expected a mapping of image encoder fields, got {type(self.image).__name__}"
                )
            try:
                self.image = config_from_dict(ImageEncoderConfig, self.image, where="encoders.video.image")
            except ConfigError as err:  # the image config names its fields "encoders.image.*": say where they are
                raise ConfigError(str(err).replace("encoders.image.", "encoders.video.image.")) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def frames_to_values(frames: Sequence[Any], num_frames: int, image_config: Any) -> torch.Tensor:
    """Decoded frames → ``(1, num_frames, 3, S, S)`` normalized as ``image_config`` says (its ``image_size``, ``mean``
    and ``std``), resampled when the clip has another count."""
    if not frames:
        raise MediaError(frames, "no frames to preprocess")
    if len(frames) != num_frames:
        frames = [frames[i] for i in sample_indices(len(frames), num_frames)]
    return torch.stack([image_to_tensor(load_image(frame), image_config) for frame in frames]).unsqueeze(0)


def sample_indices(total: int, num_frames: int) -> list[int]:
    """The centers of ``num_frames`` equal segments of ``range(total)``; a short clip repeats frames."""
    if total < 1:
        raise ValueError(f"cannot sample from {total} frames")
    return [(2 * i + 1) * total // (2 * num_frames) for i in range(num_frames)]  # floor((i + 0.5) * total / F), exact


def _natural_key(name: str) -> list[Any]:
    """``frame2.png`` before ``frame10.png``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


# -- decoding --------------------------------------------------------------------------------------------------


def _av_errors() -> tuple[type[BaseException], ...]:
    import av

    return (av.error.FFmpegError, OSError, ValueError, EOFError)


def _open(source: str | Path | bytes):
    import av

    try:
        return av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source), mode="r")
    except _av_errors() as err:
        raise MediaError(source, f"not a readable video (corrupt or unknown format: {_short(err)})") from None


def _short(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text if len(text) < 200 else text[:200] + "..."


def _iter_frames(source: str | Path | bytes) -> Iterator[Any]:
    """Decoded frames of the first video stream, one at a time (a truncated stream ends at its last good frame)."""
    container = _open(source)
    try:
        if not container.streams.video:
            raise MediaError(source, "has no video stream")
        stream = container.streams.video[0]
        produced = 0
        try:
            for frame in container.decode(stream):
                produced += 1
                yield frame
        except _av_errors() as err:
            if produced == 0:
                raise MediaError(source, f"corrupt video, no frame could be decoded ({_short(err)})") from None
            # a damaged tail: keep the frames decoded so far (what players do)
    finally:
        container.close()


def _frame_count(source: str | Path | bytes) -> int:
    """The stream's frame count from the container header, or 0 when the container does not say."""
    container = _open(source)
    try:
        if not container.streams.video:
            raise MediaError(source, "has no video stream")
        return max(0, int(container.streams.video[0].frames or 0))
    finally:
        container.close()


def _decode_at(source: str | Path | bytes, indices: Sequence[int]) -> tuple[dict[int, Any], int]:
    """Convert only the frames at ``indices`` to RGB images; stop after the last one. Returns them and the number of
    frames decoded (the true count when the stream ended early)."""
    wanted = set(indices)
    last = max(wanted)
    kept: dict[int, Any] = {}
    count = 0
    with closing(_iter_frames(source)) as frames:  # closing the generator closes the container
        for index, frame in enumerate(frames):
            count = index + 1
            if index in wanted:
                kept[index] = frame.to_image()  # RGB PIL image
            if index >= last:
                break
    return kept, count


def _decode_video(source: str | Path | bytes, num_frames: int) -> list[Any]:
    total = _frame_count(source)
    if total == 0:  # gif / webm / some streams carry no count: count in a first pass (decoding, nothing kept)
        total = sum(1 for _ in _iter_frames(source))
        if total == 0:
            raise MediaError(source, "video has no decodable frames")
    indices = sample_indices(total, num_frames)
    kept, count = _decode_at(source, indices)
    if len(kept) < len(set(indices)):  # the header over-counted (or the stream is truncated): resample over real frames
        if count == 0:
            raise MediaError(source, "video has no decodable frames")
        indices = sample_indices(count, num_frames)
        kept, _ = _decode_at(source, indices)
    return [kept[i] for i in indices]


def _frames_from_folder(folder: Path, num_frames: int, max_bytes: int | None) -> list[Any]:
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_IMAGE_SUFFIXES),
        key=lambda p: _natural_key(p.name),
    )
    if not files:
        raise MediaError(folder, f"folder has no frame images ({', '.join(FRAME_IMAGE_SUFFIXES)})")
    return [load_image(files[i], max_bytes=max_bytes) for i in sample_indices(len(files), num_frames)]


def _load_frame(video: Any, index: int, max_bytes: int | None) -> Any:
    """Frame ``index`` of a video array or frame list as an RGB image; a bad frame's error names the video and the
    frame (and the frame's file, when it is one)."""
    frame = video[index]
    try:
        return load_image(frame, max_bytes=max_bytes)
    except MediaError as err:
        where = f"frame {index} ({err.source})" if isinstance(frame, (str, Path)) else f"frame {index}"
        raise MediaError(video, f"{where}: {err.problem}") from None


def load_video(source: Any, num_frames: int, *, max_bytes: int | None = None) -> list[Any]:
    """A video file / bytes, a folder of frame images, a list of images or arrays, or a ``(T, H, W, C)`` array →
    ``num_frames`` RGB PIL images sampled uniformly (see :func:`sample_indices`)."""
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        if source.ndim != 4 or source.shape[0] == 0:
            raise MediaError(source, f"expected a (T, H, W, C) video array with T >= 1, got shape {source.shape}")
        return [_load_frame(source, i, None) for i in sample_indices(source.shape[0], num_frames)]
    if isinstance(source, (list, tuple)):
        if not source:
            raise MediaError(source, "empty list of frames")
        return [_load_frame(source, i, max_bytes) for i in sample_indices(len(source), num_frames)]
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return _frames_from_folder(Path(source), num_frames, max_bytes)
    if not isinstance(source, (str, Path, bytes, bytearray)):
        raise MediaError(
            source, "expected a video path, bytes, a frame folder, a list of frames or a (T, H, W, C) array"
        )
    check_size(source, max_bytes)  # missing / empty / too big, before any decoding
    return _decode_video(bytes(source) if isinstance(source, bytearray) else source, num_frames)


# -- the encoder -----------------------------------------------------------------------------------------------


@ENCODERS.register("video_vit")
class VideoEncoder(MediaEncoder):
    modality = "video"
    Config = VideoEncoderConfig

    def __init__(self, config: VideoEncoderConfig):
        super().__init__(config)
        self.image_encoder = ImageEncoder(config.image)
        # Zero init as in TimeSformer's time embedding: with a pretrained image backbone the clip starts out as the
        # plain per-frame image features.
        self.temporal_embed = nn.Parameter(torch.zeros(config.num_frames, self.image_encoder.output_dim))
        # (C_out, C_in, K) temporal mixing of the pixels. A bare parameter rather than an nn.Conv3d so that neither
        # transformers' post_init nor `init: fan_in` re-initialises it: its start is part of the design.
        k = config.temporal_kernel
        self.temporal_mix = nn.Parameter(torch.zeros(3, 3, k)) if k else None
        if k and config.temporal_init == "difference":
            with torch.no_grad():
                channels = torch.arange(3)
                self.temporal_mix[channels, channels, k // 2] = 1.0  # + frame_t
                self.temporal_mix[channels, channels, k // 2 - 1] = -1.0  # - frame_{t-1}

    @property
    def output_dim(self) -> int:
        return self.image_encoder.output_dim

    # -- media side --
    @classmethod
    def load(cls, source: Any, config: VideoEncoderConfig, *, max_bytes: int | None = None) -> list[Any]:
        return load_video(source, config.num_frames, max_bytes=max_bytes)

    @classmethod
    def preprocess(cls, media: Sequence[Any], config: VideoEncoderConfig) -> dict[str, torch.Tensor]:
        """The frames from :meth:`load` → ``{"values": (1, num_frames, 3, S, S)}`` (resampled if another count)."""
        return {"values": frames_to_values(media, config.num_frames, config.image)}

    @classmethod
    def tokens_per_unit(cls, config: VideoEncoderConfig) -> int:
        patches = ImageEncoder.tokens_per_unit(config.image)
        return {"none": config.num_frames * patches, "temporal_mean": patches, "frame_mean": config.num_frames}[
            config.pooling
        ]

    # -- network side --
    def forward(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``values (N, F, 3, S, S)`` → ``(N, tokens_per_unit, D)``. ``mask (N, F)`` (True = real frame), if given,
        leaves padded frames out of ``temporal_mean``; the other poolings keep every frame's tokens."""
        if values.dim() != 5 or values.shape[1] != self.config.num_frames:
            raise ValueError(
                f"video encoder: expected values of shape (N, {self.config.num_frames}, 3, S, S) "
                f"(num_frames={self.config.num_frames}), got {tuple(values.shape)}"
            )
        n, f = values.shape[:2]
        if self.temporal_mix is not None:
            frames = values.transpose(1, 2)  # (N, 3, F, S, S)
            weight = self.temporal_mix.to(values.dtype)[..., None, None]  # (3, 3, K, 1, 1)
            mixed = F.conv3d(frames, weight, padding=(weight.shape[2] // 2, 0, 0))  # (N, 3, F, S, S)
            values = values + mixed.transpose(1, 2)  # (N, F, 3, S, S)
        tokens = self.image_encoder(values.flatten(0, 1))  # (N*F, P, D)
        tokens = tokens.view(n, f, *tokens.shape[1:])  # (N, F, P, D)
        tokens = tokens + self.temporal_embed.to(tokens.dtype)[None, :, None, :]  # (N, F, P, D)
        pooling = self.config.pooling
        if pooling == "none":
            return tokens.flatten(1, 2)  # (N, F*P, D)
        if pooling == "frame_mean":
            return tokens.mean(dim=2)  # (N, F, D)
        if mask is None:
            return tokens.mean(dim=1)  # (N, P, D)
        weight = mask.to(tokens.dtype).view(n, f, 1, 1)  # (N, F, 1, 1)
        return (tokens * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)  # (N, P, D)

    def load_pretrained(self, path: str | Path) -> None:
        """A whole video encoder's state dict (``image_encoder.*`` + ``temporal_embed``), or image-backbone weights
        (timm / open_clip / an image encoder's ``vit.*``), which go to the per-frame image encoder."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        file = path / "model.safetensors" if path.is_dir() else path
        if not file.is_file() or file.suffix != ".safetensors":
            raise ConfigError(f"video encoder pretrained: {path} is not a .safetensors file or directory")
        try:
            state = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise ConfigError(f"video encoder pretrained: {file} is not a readable safetensors file ({err})") from None
        if not any(k == "temporal_embed" or k.startswith("image_encoder.") for k in state):
            try:
                self.image_encoder.load_pretrained(file)
            except ConfigError as err:
                raise ConfigError(f"video encoder pretrained (image backbone): {err}") from None
            except RuntimeError as err:  # a shape mismatch inside load_state_dict
                problem = f"{file} does not match the image encoder ({_short(err)})"
                raise ConfigError(f"video encoder pretrained (image backbone): {problem}") from None
            return
        own = self.state_dict()
        wrong = [
            f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        # a head the encoder does not use, and a temporal mixing the saved encoder did not have (zero = off)
        optional = ("image_encoder.vit.head", "temporal_mix")
        missing = [k for k in own if k not in state and not k.startswith(optional)]
        unexpected = [k for k in state if k not in own]
        if wrong or missing or unexpected:
            hint = (
                " (temporal_embed is (num_frames, dim))" if any(k.startswith("temporal_embed") for k in wrong) else ""
            )
            raise ConfigError(
                f"video encoder pretrained: {file} does not match the encoder: shape mismatches {wrong[:3]}{hint}, "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        self.load_state_dict(state, strict=False)


# -- a convolutional (C3D-style) encoder ------------------------------------------------------------------------


@dataclass
class VideoConvEncoderConfig:
    """A small 3D convolutional network (C3D / I3D family) for clips, with max-pooled tokens.

    ``widths`` are the channels of its blocks; each block is a ``3x3x3`` convolution (space and time), a ``1x3x3``
    one, and a ``1x2x2`` spatial max pool; a last ``1x3x3`` convolution projects to ``dim``. ``pooling``:

    * ``frame_max`` — one token per frame, the maximum over its positions: ``num_frames`` tokens;
    * ``clip_max`` — one token, the maximum over frames and positions.
    """

    num_frames: int = 8
    image_size: int = 32
    widths: list[int] = field(default_factory=lambda: [16, 32])
    dim: int = 64
    pooling: str = "frame_max"
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    POOLINGS = ("frame_max", "clip_max")

    def __post_init__(self) -> None:
        check_conv_layout("encoders.video", self, "num_frames", "image_size", "dim")
        if self.pooling not in self.POOLINGS:
            raise ConfigError(
                f"encoders.video.pooling: unknown pooling {self.pooling!r} for video_conv; choose one of "
                f"{self.POOLINGS}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@ENCODERS.register("video_conv")
class VideoConvEncoder(MediaEncoder):
    """Why a hand-written network: timm and torchvision's video models (R(2+1)D, MViT, Swin3D) start at tens of
    millions of parameters and 112+ px input, and nothing pretrained can be loaded offline. What the offline clips
    need is the convolution's inductive bias: the same filter at every position and a maximum over positions, so a
    digit is recognised wherever it is in the frame. The per-frame ViT learns that from data only slowly.
    Measured (``video_motion``, 2,590 training clips, 4 frames of 32 px, this network with ``widths [16, 32]`` and a
    linear classifier on its ``clip_max`` token, trained alone): test accuracy 0.86 / 0.91 / 0.92 after 500 / 1,000 /
    1,500 steps (direction 1.00); a linear probe of the random-init per-frame ViT's tokens reads 0.40-0.52."""

    modality = "video"
    Config = VideoConvEncoderConfig

    def __init__(self, config: VideoConvEncoderConfig):
        super().__init__(config)
        layers: list[nn.Module] = []
        channels = 3
        for width in config.widths:
            layers += [
                nn.Conv3d(channels, width, (3, 3, 3), padding=1),  # space and time
                nn.GELU(),
                nn.Conv3d(width, width, (1, 3, 3), padding=(0, 1, 1)),
                nn.GELU(),
                nn.MaxPool3d((1, 2, 2)),
            ]
            channels = width
        layers.append(nn.Conv3d(channels, config.dim, (1, 3, 3), padding=(0, 1, 1)))
        self.net = nn.Sequential(*layers)

    @property
    def output_dim(self) -> int:
        return self.config.dim

    @classmethod
    def load(cls, source: Any, config: VideoConvEncoderConfig, *, max_bytes: int | None = None) -> list[Any]:
        return load_video(source, config.num_frames, max_bytes=max_bytes)

    @classmethod
    def preprocess(cls, media: Sequence[Any], config: VideoConvEncoderConfig) -> dict[str, torch.Tensor]:
        """The frames from :meth:`load` → ``{"values": (1, num_frames, 3, S, S)}`` (resampled if another count)."""
        return {"values": frames_to_values(media, config.num_frames, config)}  # uses its image_size / mean / std

    @classmethod
    def tokens_per_unit(cls, config: VideoConvEncoderConfig) -> int:
        return config.num_frames if config.pooling == "frame_max" else 1

    def forward(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``values (N, F, 3, S, S)`` → ``(N, F, dim)`` (``frame_max``) or ``(N, 1, dim)`` (``clip_max``)."""
        cfg = self.config
        if values.dim() != 5 or values.shape[1] != cfg.num_frames or values.shape[-1] != cfg.image_size:
            raise ValueError(
                f"video encoder: expected values of shape (N, {cfg.num_frames}, 3, {cfg.image_size}, "
                f"{cfg.image_size}), got {tuple(values.shape)}"
            )
        features = self.net(values.transpose(1, 2))  # (N, dim, F, S', S')
        if cfg.pooling == "clip_max":
            return features.amax(dim=(2, 3, 4)).unsqueeze(1)  # (N, 1, dim)
        return features.amax(dim=(3, 4)).transpose(1, 2)  # (N, F, dim)
