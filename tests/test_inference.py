"""`unimoe init` + `unimoe chat` on a checkpoint of the tiny preset, one file per modality."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from unimoe.cli import main
from unimoe.inference import chat, init_checkpoint, load_pretrained

UNIMOE = str(Path(sys.executable).parent / "unimoe")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return init_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(d / "digit.png")
    t = np.arange(16000 * 3) / 16000
    sf.write(d / "tone.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    frames = [Image.fromarray(np.full((24, 24, 3), 20 * i, dtype=np.uint8)) for i in range(6)]
    frames[0].save(d / "clip.gif", save_all=True, append_images=frames[1:], duration=100)
    _write_mp4(d / "clip.mp4", frames)
    import trimesh

    trimesh.creation.box(extents=(1, 2, 3)).export(d / "box.ply")
    (d / "series.csv").write_text(
        "date,value\n" + "".join(f"2020-01-{i + 1:02d},{np.sin(i / 3):.4f}\n" for i in range(30))
    )
    return d


def _write_mp4(path, frames):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 24, 24, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_init_writes_a_complete_checkpoint(tiny_ckpt):
    names = {p.name for p in tiny_ckpt.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
        "README.md",
    } <= names
    model, processor = load_pretrained(tiny_ckpt)
    assert set(processor.modalities) == set(model.config.encoders)
    assert set(processor.modalities) == {"image", "audio", "video", "points", "series"}


@pytest.mark.parametrize("name", ["digit.png", "tone.wav", "clip.gif", "clip.mp4", "box.ply", "series.csv"])
def test_chat_answers_for_each_modality(tiny_ckpt, media, name):
    model, processor = load_pretrained(tiny_ckpt)
    answer = chat(model, processor, "What is this?", [media / name], max_new_tokens=5)
    assert isinstance(answer, str)


def test_chat_cli(tiny_ckpt, media, capsys):
    assert (
        main(
            [
                "chat",
                str(tiny_ckpt),
                "Describe both.",
                "--file",
                str(media / "digit.png"),
                "--file",
                str(media / "tone.wav"),
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )


def test_chat_cli_bad_file_is_one_line(tiny_ckpt, tmp_path):
    bad = tmp_path / "noise.wav"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    proc = subprocess.run([UNIMOE, "chat", str(tiny_ckpt), "hi", "--file", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("unimoe chat: error:") and "noise.wav" in lines[0], proc.stderr


def test_a_checkpoint_that_lost_its_tokenizer_json_says_so(tiny_ckpt, tmp_path):
    import shutil

    from unimoe import CheckpointError
    from unimoe.inference import load_pretrained

    broken = shutil.copytree(tiny_ckpt, tmp_path / "no-tokenizer-json")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json is there, but no tokenizer.json"):
        load_pretrained(broken)


def test_init_errors(tmp_path, capsys):
    assert main(["init", "qwen2.5-0.5b-e8", str(tmp_path / "x")]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert main(["chat", str(tmp_path / "missing"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_device_names_are_checked_in_one_line(tiny_ckpt, capsys):
    import torch

    from unimoe.errors import ConfigError
    from unimoe.inference import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="'gpu0' is not a device"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="'meta' is not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available on this machine"):
            resolve_device("cuda")
    assert main(["chat", str(tiny_ckpt), "hi", "--device", "tpu"]) == 2
    assert "device: 'tpu' is not a device" in capsys.readouterr().err
    model, _ = load_pretrained(tiny_ckpt, device="cpu")
    assert model.device.type == "cpu"
