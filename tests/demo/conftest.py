"""Shared fixtures for the demo tests: a tiny randomly initialized model, one media file per modality (plus broken
ones), and one real local launch of the app on 127.0.0.1 that every test talks to through a fresh gradio_client."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from unimoe.demo import GenerationSettings, build_app

#: The served app refuses uploads above this size, so the oversized-file test needs no big file.
MAX_FILE_BYTES = 300_000

#: Sampling with a fixed seed: the random tiny model's greedy reply is only newlines, which shows nothing.
SETTINGS = GenerationSettings(temperature=1.0, max_new_tokens=6, seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    """A free port on 127.0.0.1."""
    return free_port()


@pytest.fixture(scope="session")
def model_and_processor(tokenizer):
    from unimoe import build_model
    from unimoe.processing_unimoe import UniMoEProcessor

    model = build_model("tiny", seed=0).eval()
    return model, UniMoEProcessor.from_model_config(tokenizer, model.config)


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> Path:
    """One small file per modality and input format, and files the demo must refuse with a message."""
    import trimesh

    d = tmp_path_factory.mktemp("demo-media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(d / "digit.png")
    t = np.arange(16000) / 16000
    sf.write(d / "tone.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    frames = [Image.fromarray(np.full((24, 24, 3), 20 * i, dtype=np.uint8)) for i in range(6)]
    frames[0].save(d / "clip.gif", save_all=True, append_images=frames[1:], duration=100)
    trimesh.creation.box(extents=(1, 2, 3)).export(d / "box.ply")
    trimesh.creation.icosphere(subdivisions=2).export(d / "ball.obj")
    np.save(d / "cloud.npy", rng.normal(size=(600, 3)).astype(np.float32))
    (d / "series.csv").write_text(
        "date,value\n" + "".join(f"2020-01-{i + 1:02d},{np.sin(i / 3):.4f}\n" for i in range(30))
    )
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image" * 10)
    (d / "notes.txt").write_text("a text file")
    np.save(d / "huge.npy", np.zeros((MAX_FILE_BYTES // 12 + 1000, 3), dtype=np.float32))
    return d


@pytest.fixture(scope="session")
def served_app(model_and_processor, tmp_path_factory):
    """The demo app launched for real on 127.0.0.1 (one launch for the whole session; closed at the end)."""
    model, processor = model_and_processor
    app = build_app(
        model,
        processor,
        settings=SETTINGS,
        max_file_bytes=MAX_FILE_BYTES,
        output_dir=tmp_path_factory.mktemp("demo-out"),
    )
    port = free_port()
    app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield app, f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture
def downloads(tmp_path) -> Path:
    """Where the test's clients download the files the app sends (generated images, speech, forecast plots)."""
    return tmp_path / "downloads"


@pytest.fixture
def make_client(served_app, downloads):
    """Clients of the served app, each with its own session (so its own chat history); closed after the test."""
    from gradio_client import Client

    made = []

    def make():
        made.append(Client(served_app[1], verbose=False, download_files=str(downloads)))
        return made[-1]

    yield make
    for c in made:
        # Client.close() joins the heartbeat thread with a 1 s timeout; stopping it in the background saves that
        # second per client.
        threading.Thread(target=c.close, daemon=True).start()


@pytest.fixture
def client(make_client):
    """A fresh client per test."""
    return make_client()
