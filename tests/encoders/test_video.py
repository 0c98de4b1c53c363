"""Video encoder: deterministic uniform frame sampling from real files (mp4 / webm / avi / gif / frame folders),
clear errors on bad inputs, forward + backward per pooling, pretrained loading and the connector hand-off."""

from __future__ import annotations

import os

import av
import numpy as np
import pytest
import torch

from unimoe.connectors.connectors import build_connector
from unimoe.encoders import ENCODERS, MediaError, build_encoder, encoder_class
from unimoe.encoders import video as video_mod
from unimoe.encoders.video import (
    VideoConvEncoder,
    VideoConvEncoderConfig,
    VideoEncoder,
    VideoEncoderConfig,
    load_video,
    sample_indices,
)
from unimoe.errors import ConfigError

STEP = 12  # gray level of frame i is i * STEP: decoded frames tell which index they are
SIZE = 32
TINY_IMAGE = {
    "model_name": "vit_tiny_patch16_224",
    "model_kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 2},
    "image_size": 32,
    "patch_size": 8,
}
PATCHES = (32 // 8) ** 2


def frame_array(i: int) -> np.ndarray:
    return np.full((SIZE, SIZE, 3), i * STEP, np.uint8)


def write_video(path, n: int, codec: str, fmt: str | None = None) -> str:
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_array(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush delayed (B-) frames
            container.mux(packet)
    return str(path)


def write_gif(path, n: int) -> str:
    from PIL import Image

    frames = [Image.fromarray(frame_array(i)) for i in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return str(path)


def indices_of(frames) -> list[int]:
    """Which source frame each decoded frame is (lossy codecs keep a flat gray within a level or two)."""
    levels = [float(np.asarray(frame, dtype=np.float32).mean()) for frame in frames]
    assert all(abs(level / STEP - round(level / STEP)) < 0.3 for level in levels), levels
    return [round(level / STEP) for level in levels]


def cfg(**kwargs) -> VideoEncoderConfig:
    return VideoEncoderConfig(**{"num_frames": 4, "image": dict(TINY_IMAGE), **kwargs})


# -- sampling -----------------------------------------------------------------------------------------------------


def test_sample_indices_are_segment_centers():
    assert sample_indices(20, 8) == [1, 3, 6, 8, 11, 13, 16, 18]
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]  # short clip: frames repeat, in order
    assert sample_indices(1, 4) == [0, 0, 0, 0]
    assert sample_indices(1000, 1) == [500]


@pytest.mark.parametrize(
    ("name", "codec", "fmt"),
    [("clip.mp4", "libx264", None), ("clip_mpeg4.mp4", "mpeg4", None), ("clip.webm", "libvpx", None),
     ("clip.avi", "mpeg4", None)],
)  # fmt: skip
def test_video_files_give_the_uniformly_sampled_frames(tmp_path, name, codec, fmt):
    if codec not in av.codecs_available:
        pytest.skip(f"this av wheel has no {codec} encoder")
    path = write_video(tmp_path / name, 20, codec, fmt)
    frames = VideoEncoder.load(path, cfg(num_frames=8))
    assert len(frames) == 8 and frames[0].mode == "RGB" and frames[0].size == (SIZE, SIZE)
    assert indices_of(frames) == [1, 3, 6, 8, 11, 13, 16, 18]
    assert indices_of(VideoEncoder.load(path, cfg(num_frames=8))) == indices_of(frames)  # deterministic
    # the same bytes in memory give the same frames
    with open(path, "rb") as f:
        assert indices_of(VideoEncoder.load(f.read(), cfg(num_frames=8))) == [1, 3, 6, 8, 11, 13, 16, 18]


def test_short_clip_repeats_frames(tmp_path):
    path = write_video(tmp_path / "short.mp4", 3, "libx264")
    assert indices_of(VideoEncoder.load(path, cfg(num_frames=8))) == [0, 0, 0, 1, 1, 2, 2, 2]


def test_gif(tmp_path):
    path = write_gif(tmp_path / "clip.gif", 10)
    assert indices_of(VideoEncoder.load(path, cfg(num_frames=4))) == sample_indices(10, 4) == [1, 3, 6, 8]


def test_unknown_frame_count_is_counted_and_overcount_is_resampled(tmp_path, monkeypatch):
    path = write_video(tmp_path / "clip.mp4", 20, "mpeg4")
    monkeypatch.setattr(video_mod, "_frame_count", lambda source: 0)  # a container without a count (webm, gif)
    assert indices_of(VideoEncoder.load(path, cfg(num_frames=8))) == [1, 3, 6, 8, 11, 13, 16, 18]
    monkeypatch.setattr(video_mod, "_frame_count", lambda source: 40)  # a header that over-counts
    assert indices_of(VideoEncoder.load(path, cfg(num_frames=8))) == [1, 3, 6, 8, 11, 13, 16, 18]


def test_only_sampled_frames_are_converted(tmp_path, monkeypatch):
    path = write_video(tmp_path / "long.mp4", 21, "mpeg4")
    converted = []
    original = av.VideoFrame.to_image

    def spy(frame, *args, **kwargs):
        converted.append(frame)
        return original(frame, *args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "to_image", spy)
    frames = VideoEncoder.load(path, cfg(num_frames=4))
    assert indices_of(frames) == sample_indices(21, 4) == [2, 7, 13, 18]
    assert len(converted) == 4


def test_frame_folder_sorted_naturally(tmp_path):
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):  # unpadded names: frame_2 must come before frame_10
        Image.fromarray(frame_array(i)).save(folder / f"frame_{i}.png")
    (folder / "notes.txt").write_text("not a frame")
    assert indices_of(VideoEncoder.load(folder, cfg(num_frames=4))) == sample_indices(12, 4) == [1, 4, 7, 10]


def test_arrays_and_lists(tmp_path):
    from PIL import Image

    clip = np.stack([frame_array(i) for i in range(6)])  # (T, H, W, C)
    assert indices_of(VideoEncoder.load(clip, cfg(num_frames=3))) == [1, 3, 5]
    assert indices_of(VideoEncoder.load(torch.from_numpy(clip), cfg(num_frames=3))) == [1, 3, 5]
    images = [Image.fromarray(a) for a in clip]
    assert indices_of(VideoEncoder.load(images, cfg(num_frames=3))) == [1, 3, 5]
    assert indices_of(VideoEncoder.load(list(clip), cfg(num_frames=6))) == list(range(6))


# -- bad inputs ---------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_media_error_naming_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.mp4"
    folder = tmp_path / "no_frames"
    folder.mkdir()
    for source, problem in [
        (corrupt, "not a readable video"),
        (empty, "empty"),
        (missing, "does not exist"),
        (folder, "no frame images"),
    ]:
        with pytest.raises(MediaError) as info:
            VideoEncoder.load(source, cfg())
        assert str(source) in str(info.value) and problem in str(info.value), str(info.value)
        assert info.value.__cause__ is None or isinstance(info.value.__cause__, MediaError)


def test_no_video_stream_and_no_frames(tmp_path):
    wav = tmp_path / "speech.wav"
    with av.open(str(wav), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
    with pytest.raises(MediaError, match="speech.wav: has no video stream"):
        VideoEncoder.load(wav, cfg())

    no_frames = tmp_path / "no_frames.avi"
    with av.open(str(no_frames), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    with pytest.raises(MediaError, match="no_frames.avi: video has no decodable frames"):
        VideoEncoder.load(no_frames, cfg())


def test_size_limit_and_bad_arrays(tmp_path):
    path = write_video(tmp_path / "clip.mp4", 10, "mpeg4")
    with pytest.raises(MediaError, match="clip.mp4: .*above the limit of 100"):
        VideoEncoder.load(path, cfg(), max_bytes=100)
    with open(path, "rb") as f:
        data = f.read()
    with pytest.raises(MediaError, match="above the limit"):
        VideoEncoder.load(data, cfg(), max_bytes=100)
    with pytest.raises(MediaError, match=r"\(T, H, W, C\)"):
        VideoEncoder.load(np.zeros((0, 4, 4, 3)), cfg())
    with pytest.raises(MediaError, match="empty list"):
        VideoEncoder.load([], cfg())
    with pytest.raises(MediaError, match="empty bytes"):
        VideoEncoder.load(b"", cfg())


# -- config -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_frames": 0}, "encoders.video.num_frames"),
        ({"num_frames": 2.5}, "encoders.video.num_frames"),
        ({"pooling": "max"}, "encoders.video.pooling"),
        ({"image": {"image_size": 30, "patch_size": 8}}, "encoders.video.image.image_size"),
        ({"image": {"imgsize": 32}}, "encoders.video.image"),
        ({"image": "vit"}, "encoders.video.image"),
        ({"temporal_kernel": 2}, "encoders.video.temporal_kernel"),
        ({"temporal_kernel": -1}, "encoders.video.temporal_kernel"),
        ({"temporal_kernel": True}, "encoders.video.temporal_kernel"),
        ({"temporal_kernel": 3, "temporal_init": "ones"}, "encoders.video.temporal_init"),
        ({"temporal_kernel": 1, "temporal_init": "difference"}, "encoders.video.temporal_init"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        VideoEncoderConfig(**kwargs)


def test_registered_and_built_from_a_spec():
    assert "video_vit" in ENCODERS.names()
    spec = {"type": "video_vit", "num_frames": 2, "pooling": "temporal_mean", "image": dict(TINY_IMAGE)}
    cls, config = encoder_class(spec, "video")
    assert cls is VideoEncoder and config.image.image_size == 32
    assert VideoEncoder.tokens_per_unit(config) == PATCHES
    encoder = build_encoder("video", spec)
    assert isinstance(encoder, VideoEncoder) and encoder.output_dim == 64
    with pytest.raises(ConfigError, match=r"encoders\.video: unknown field"):
        build_encoder("video", {"type": "video_vit", "frames": 4})


# -- network ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pooling", "tokens"), [("none", 4 * PATCHES), ("temporal_mean", PATCHES), ("frame_mean", 4)]
)  # fmt: skip
def test_forward_backward_each_pooling(tmp_path, pooling, tokens):
    torch.manual_seed(0)
    config = cfg(pooling=pooling)
    assert VideoEncoder.tokens_per_unit(config) == tokens
    encoder = VideoEncoder(config)
    path = write_video(tmp_path / "clip.mp4", 12, "mpeg4")
    values = VideoEncoder.preprocess(VideoEncoder.load(path, config), config)["values"]
    assert values.shape == (1, 4, 3, 32, 32)
    values = torch.cat([values, torch.randn_like(values)])  # two clips
    out = encoder(values)
    assert out.shape == (2, tokens, 64) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert encoder.temporal_embed.grad is not None and encoder.temporal_embed.grad.abs().sum() > 0
    assert encoder.image_encoder.vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_temporal_embedding_is_added_per_frame():
    torch.manual_seed(0)
    encoder = VideoEncoder(cfg(pooling="none")).eval()
    values = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        base = encoder(values).view(1, 4, PATCHES, 64)
        encoder.temporal_embed.copy_(torch.arange(4.0).view(4, 1).expand(4, 64))
        shifted = encoder(values).view(1, 4, PATCHES, 64)
        per_frame = encoder.image_encoder(values[0])  # (F, P, D)
    torch.testing.assert_close(base[0], per_frame)  # zero init: exactly the image features
    torch.testing.assert_close(shifted - base, torch.arange(4.0).view(1, 4, 1, 1).expand_as(base))


def test_temporal_mixing_starts_as_identity_or_frame_difference():
    torch.manual_seed(0)
    values = torch.randn(2, 4, 3, 32, 32)
    plain = VideoEncoder(cfg()).eval()
    zero = VideoEncoder(cfg(temporal_kernel=3)).eval()
    diff = VideoEncoder(cfg(temporal_kernel=3, temporal_init="difference")).eval()
    assert plain.temporal_mix is None and zero.temporal_mix.shape == (3, 3, 3) and zero.temporal_mix.abs().sum() == 0
    for encoder in (zero, diff):
        encoder.load_state_dict(plain.state_dict(), strict=False)  # same ViT; the mixing keeps its start
    previous = torch.cat([torch.zeros_like(values[:, :1]), values[:, :-1]], dim=1)  # frame t-1 (zero before the first)
    with torch.no_grad():
        torch.testing.assert_close(zero(values), plain(values), rtol=0, atol=0)
        # difference start: each frame becomes frame_t + (frame_t - frame_{t-1})
        torch.testing.assert_close(diff(values), plain(2 * values - previous), rtol=1e-5, atol=1e-5)


def test_temporal_mixing_sees_the_direction_of_motion_and_trains():
    """A bright column moving right and the same frames played backwards (moving left) give identical per-frame
    tokens up to frame order without the mixing; with the difference start the frame tokens differ."""
    torch.manual_seed(0)
    frames = torch.zeros(1, 4, 3, 32, 32)
    for t in range(4):
        frames[0, t, :, :, 8 + 4 * t : 12 + 4 * t] = 1.0
    backwards = frames.flip(1)
    plain = VideoEncoder(cfg()).eval()
    diff = VideoEncoder(cfg(temporal_kernel=3, temporal_init="difference")).eval()
    diff.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        # the last frame of the rightward clip is the first of the leftward one (same image)
        torch.testing.assert_close(plain(frames).view(4, PATCHES, 64)[3], plain(backwards).view(4, PATCHES, 64)[0])
        gap = (diff(frames).view(4, PATCHES, 64)[2] - diff(backwards).view(4, PATCHES, 64)[1]).abs().max()
    assert gap > 0.1  # frame 2 forward and frame 1 backward show the same column, but their differences flip sign
    diff.train()
    diff(frames).square().mean().backward()
    assert diff.temporal_mix.grad is not None and diff.temporal_mix.grad.abs().sum() > 0


def test_model_init_keeps_the_temporal_mixing_start():
    """Neither transformers' post_init nor `init: fan_in` may re-initialise the mixing (it is a bare parameter)."""
    from unimoe.presets import build_model

    model = build_model("tiny", {"encoders": {"video": {"temporal_kernel": 3, "temporal_init": "difference"}}})
    mix = model.model.encoders["video"].temporal_mix.detach()
    assert model.config.encoders["video"]["init"] == "fan_in"
    expected = torch.zeros(3, 3, 3)
    expected[range(3), range(3), 1], expected[range(3), range(3), 0] = 1.0, -1.0
    torch.testing.assert_close(mix, expected, rtol=0, atol=0)


def test_temporal_mean_mask_ignores_padded_frames():
    torch.manual_seed(0)
    encoder = VideoEncoder(cfg(pooling="temporal_mean")).eval()
    values = torch.randn(1, 4, 3, 32, 32)
    other = values.clone()
    other[:, 2:] = torch.randn(1, 2, 3, 32, 32)
    mask = torch.tensor([[True, True, False, False]])
    with torch.no_grad():
        torch.testing.assert_close(encoder(values, mask), encoder(other, mask))
        assert not torch.allclose(encoder(values), encoder(other))


def test_wrong_frame_count_is_a_clear_error():
    encoder = VideoEncoder(cfg())
    with pytest.raises(ValueError, match=r"num_frames=4"):
        encoder(torch.randn(1, 3, 3, 32, 32))


def test_load_pretrained_whole_encoder_and_backbone(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = VideoEncoder(cfg()).eval()
    with torch.no_grad():
        source.temporal_embed.normal_()
    values = torch.randn(2, 4, 3, 32, 32)
    whole = tmp_path / "video.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(whole))
    backbone = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.image_encoder.vit.state_dict().items()}, str(backbone))

    torch.manual_seed(1)
    target = VideoEncoder(cfg()).eval()
    with torch.no_grad():
        assert not torch.allclose(target(values), source(values))
        target.load_pretrained(whole)
        torch.testing.assert_close(target(values), source(values), rtol=0, atol=0)

    torch.manual_seed(2)
    target = VideoEncoder(cfg()).eval()
    target.load_pretrained(backbone)  # backbone only: the temporal embedding keeps its (zero) init
    with torch.no_grad():
        torch.testing.assert_close(target.image_encoder(values[0]), source.image_encoder(values[0]), rtol=0, atol=0)
    assert target.temporal_embed.abs().sum() == 0

    # a whole encoder saved without temporal mixing loads into one with it (the mixing keeps its start)
    target = VideoEncoder(cfg(temporal_kernel=3, temporal_init="difference")).eval()
    target.load_pretrained(whole)
    torch.testing.assert_close(target.image_encoder.vit.pos_embed, source.image_encoder.vit.pos_embed, rtol=0, atol=0)
    assert target.temporal_mix[0, 0].tolist() == [-1.0, 1.0, 0.0]

    # a video encoder with another frame count or backbone width does not match: a ConfigError, not a traceback
    with pytest.raises(ConfigError, match=r"video encoder pretrained: .*video\.safetensors.*temporal_embed"):
        VideoEncoder(cfg(num_frames=8)).load_pretrained(whole)
    wider = {**TINY_IMAGE, "model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}
    with pytest.raises(ConfigError, match=r"video encoder pretrained \(image backbone\).*vit\.safetensors"):
        VideoEncoder(cfg(image=wider)).load_pretrained(backbone)
    with pytest.raises(ConfigError, match="not a .safetensors file"):
        target.load_pretrained(tmp_path / "missing.bin")


def test_tokens_feed_the_connector(tmp_path):
    torch.manual_seed(0)
    config = cfg(pooling="temporal_mean")
    encoder = VideoEncoder(config)
    connector = build_connector("video", {"type": "mlp"}, input_dim=encoder.output_dim, output_dim=64)
    frames = VideoEncoder.load(write_gif(tmp_path / "clip.gif", 6), config)
    tokens = encoder(VideoEncoder.preprocess(frames, config)["values"])
    out = connector(tokens)
    assert out.shape == (1, VideoEncoder.tokens_per_unit(config), 64)
    out.sum().backward()
    assert encoder.temporal_embed.grad is not None


# -- the convolutional encoder (video_conv) -----------------------------------------------------------------------


def conv_cfg(**kwargs) -> VideoConvEncoderConfig:
    return VideoConvEncoderConfig(**{"num_frames": 4, "image_size": 32, "widths": [8, 16], "dim": 24, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"widths": []}, "encoders.video.widths"),
        ({"widths": [8, 0]}, "encoders.video.widths"),
        ({"widths": "16"}, "encoders.video.widths"),
        ({"image_size": 30}, "encoders.video.image_size"),  # two 2x2 poolings need a multiple of 4
        ({"num_frames": 0}, "encoders.video.num_frames"),
        ({"dim": True}, "encoders.video.dim"),
        ({"pooling": "none"}, "encoders.video.pooling"),
        ({"mean": [0.5]}, "encoders.video.mean"),
    ],
)
def test_conv_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        conv_cfg(**kwargs)


@pytest.mark.parametrize(("pooling", "tokens"), [("frame_max", 4), ("clip_max", 1)])
def test_conv_encoder_reads_files_and_trains(tmp_path, pooling, tokens):
    torch.manual_seed(0)
    spec = {"type": "video_conv", "num_frames": 4, "image_size": 32, "widths": [8, 16], "dim": 24, "pooling": pooling}
    cls, config = encoder_class(spec, "video")
    assert cls is VideoConvEncoder and cls.tokens_per_unit(config) == tokens
    encoder = build_encoder("video", spec)
    values = cls.preprocess(cls.load(write_gif(tmp_path / "clip.gif", 6), config), config)["values"]
    assert values.shape == (1, 4, 3, 32, 32)
    out = encoder(torch.cat([values, torch.randn_like(values)]))
    assert out.shape == (2, tokens, 24) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    with pytest.raises(ValueError, match=r"expected values of shape \(N, 4, 3, 32, 32\)"):
        encoder(torch.randn(1, 3, 3, 32, 32))


def test_conv_encoder_is_translation_invariant_and_sees_direction():
    """The maximum over positions: a pattern shifted by the pooling stride gives the same tokens (a per-patch ViT
    does not); the 3x3x3 convolutions see time: a frame's token depends on the order of its neighbours."""
    torch.manual_seed(0)
    encoder = VideoConvEncoder(conv_cfg(pooling="clip_max", image_size=64)).eval()
    clip = torch.zeros(1, 4, 3, 64, 64)
    for t in range(4):
        clip[0, t, :, 26:32, 24 + 2 * t : 28 + 2 * t] = 1.0  # a bar moving right, away from the zero padding
    shifted = clip.roll(shifts=(4, 4), dims=(3, 4))  # a multiple of both 2x2 poolings' stride
    with torch.no_grad():
        torch.testing.assert_close(encoder(shifted), encoder(clip))
        per_frame = VideoConvEncoder(conv_cfg(image_size=64)).eval()  # frame_max: one token per frame
        per_frame.load_state_dict(encoder.state_dict())
        # played backwards, each frame holds the same picture; a per-frame encoder would give the same tokens
        gap = (per_frame(clip.flip(1)).flip(1) - per_frame(clip)).abs().max()
    assert gap > 1e-3


def test_a_model_preset_switches_to_the_conv_encoder():
    """An override that names another encoder type replaces the preset's spec instead of merging into it."""
    from unimoe.presets import build_model

    model = build_model("tiny", {"encoders": {"video": {"type": "video_conv", "num_frames": 4, "widths": [8]}}})
    encoder = model.model.encoders["video"]
    assert isinstance(encoder, VideoConvEncoder) and encoder.output_dim == 64
    values = torch.randn(2, 4, 3, 32, 32)
    assert model.model.connectors["video"](encoder(values)).shape[-1] == model.config.text_config.hidden_size


def test_a_bad_frame_is_reported_against_the_video_and_its_index(tmp_path):
    video = np.zeros((4, 16, 16, 3), np.float32)
    video[2] = np.nan
    with pytest.raises(MediaError, match=r"^<array \(4, 16, 16, 3\)>: frame 2: image array contains NaN"):
        load_video(video, 4)
    with pytest.raises(MediaError, match=r"^<list>: frame 1 \(.*missing.png\): file does not exist"):
        load_video([np.zeros((8, 8, 3), np.uint8), str(tmp_path / "missing.png")], 2)
