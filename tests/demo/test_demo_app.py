"""The demo app through gradio_client against a real local launch: one turn per input modality, streaming, history,
the routing panel, readable answers to bad uploads (and the app still serving after them), 20 concurrent users, and
the generation turns (the generated files reach the client as downloads)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

NOTICE = "⚠️"


@dataclass
class Turn:
    """The ``/chat`` endpoint's outputs: the chat reply, then the side panels."""

    reply: Any
    heatmap: Any
    summary: Any
    points: Any
    series: Any
    details: dict


def ask(client, text: str, files=(), **settings) -> Turn:
    from gradio_client import handle_file

    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    out = client.predict(message, api_name="/chat", **settings)
    details = out[5] if isinstance(out[5], dict) else json.loads(out[5])
    return Turn(*out[:5], details=details)


def assert_answered(turn: Turn, modalities: set[str]) -> None:
    """A real reply (not a notice) whose routing panel covers exactly the modalities of the turn.

    The random model decides itself what to reply with: usually text, but a sampled generation token makes it an
    image, speech or a forecast, so the reply is the text alone or one message of the text and those files."""
    assert turn.details["error"] is None, turn.details["error"]
    generated = [*turn.details["images"], *turn.details["audio"], *turn.details["forecasts"]]
    if isinstance(turn.reply, str):
        assert not generated and not turn.reply.startswith(NOTICE)
        assert turn.reply == (turn.details["text"] or "*(the model returned no text)*")
    else:
        assert len(reply_files(turn)) == len(generated), turn.reply
    assert modalities <= set(turn.details["routing"]) <= modalities | {"image", "audio", "series"}
    for matrix in turn.details["routing"].values():
        matrix = np.asarray(matrix)
        assert matrix.shape == (4, 4)  # tiny preset: 4 MoE layers x 4 experts
        np.testing.assert_allclose(matrix.sum(-1), 1.0, atol=1e-3)
    assert Path(turn.heatmap).is_file() and Image.open(turn.heatmap).format == "PNG"
    assert all(f"| {m} |" in turn.summary for m in modalities)


def reply_files(turn: Turn) -> list[Path]:
    """The files of a reply with media, as the client downloaded them (local paths, in the reply's order: images,
    speech, forecast plots), after checking the message's shape."""
    assert isinstance(turn.reply, dict) and turn.reply["role"] == "assistant", turn.reply
    content = list(turn.reply["content"])
    text = [content.pop(0)] if turn.details["text"] else []
    assert text == ([turn.details["text"]] if turn.details["text"] else []), turn.reply
    files = [Path(p) for p in content]
    assert all(p.is_file() for p in files), files
    return files


def test_text_turn(client):
    turn = ask(client, "Hello, who are you?")
    assert_answered(turn, {"text"})
    assert turn.details["inputs"] == [] and turn.details["history_turns"] == 0


@pytest.mark.parametrize(("name", "modality"), [("digit.png", "image"), ("tone.wav", "audio"), ("clip.gif", "video")])
def test_media_turn(client, media, name, modality):
    turn = ask(client, "What is this?", [media / name])
    assert_answered(turn, {"text", modality})
    assert turn.details["inputs"] == [{"name": name, "modality": modality}]


@pytest.mark.parametrize("name", ["box.ply", "ball.obj", "cloud.npy"])
def test_point_cloud_turn(client, media, name):
    import trimesh

    turn = ask(client, "Which shape is this?", [media / name])
    assert_answered(turn, {"text", "points"})
    assert turn.details["inputs"] == [{"name": name, "modality": "points"}]
    preview = trimesh.load(turn.points)  # what gr.Model3D shows, in point-cloud mode
    assert isinstance(preview, trimesh.PointCloud) and len(preview.vertices) > 0


def test_time_series_turn(client, media):
    turn = ask(client, "Describe the trend.", [media / "series.csv"])
    assert_answered(turn, {"text", "series"})
    assert turn.details["inputs"] == [{"name": "series.csv", "modality": "series"}]
    with Image.open(turn.series) as plot:  # the preview plot, a PNG (a server-side path: panels are not downloaded)
        assert plot.format == "PNG"


def test_image_and_question_in_one_message_with_settings(client, media):
    turn = ask(client, "Compare", [media / "digit.png", media / "series.csv"], max_new_tokens=2, temperature=0.5)
    assert_answered(turn, {"text", "image", "series"})


def test_reply_streams(client):
    for seed in range(5):  # the random model may answer with an image at once; take a seed where it writes text
        job = client.submit({"text": "Tell me a story", "files": []}, api_name="/chat", max_new_tokens=8, seed=seed)
        final = job.result()[5]["text"]
        partial = [out[0] for out in job.outputs() if isinstance(out[0], str) and out[0] != final]
        if len(final) > 3:
            break
    assert len(set(partial)) >= 1 and final, (partial, final)  # updates came before the finished reply
    assert all(final.startswith(p) for p in partial), (partial, final)


def test_history_is_sent_back(client):
    first = ask(client, "My name is Ada.")
    assert first.details["history_turns"] == 0
    # the first question and, when the model wrote any, its text answer (generated media are not sent back)
    assert ask(client, "What is my name?").details["history_turns"] == 1 + bool(first.details["text"])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("corrupt.png", "corrupt.png: corrupt image"),
        ("notes.txt", "notes.txt: unsupported file type .txt"),
        ("huge.npy", "huge.npy: file is"),
    ],
)
def test_bad_upload_gets_a_message_and_the_app_keeps_serving(client, media, name, expected):
    turn = ask(client, "What is this?", [media / name])
    assert turn.reply.startswith(f"{NOTICE} {expected}"), turn.reply
    assert "\n" not in turn.reply and "Traceback" not in turn.reply
    assert str(media) not in turn.reply and "/gradio/" not in turn.reply  # the user's file name, not server paths
    assert turn.heatmap is None and turn.details["error"]
    assert_answered(ask(client, "Still there?"), {"text"})  # same session: the failed turn is not fed back
    if name == "huge.npy":
        assert "above the demo's limit" in turn.reply


def test_twenty_concurrent_requests_all_answered(make_client):
    clients = [make_client() for _ in range(20)]  # 20 users, each in their own session

    def one(i: int) -> tuple[int, dict]:
        return i, ask(clients[i], f"request {i}", max_new_tokens=2).details

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))
    assert len(results) == 20
    for i, details in results:
        assert details["prompt"] == f"request {i}"  # every request got its own answer, none lost or swapped
        assert details["error"] is None and details["routing"]


def _generation_heads_present() -> bool:
    from unimoe.modeling_unimoe import UniMoEForConditionalGeneration

    return hasattr(UniMoEForConditionalGeneration, "generate_multimodal")


needs_heads = pytest.mark.skipif(not _generation_heads_present(), reason="needs Step 5 generation heads")


@needs_heads
def test_image_generation_turn(client, downloads):
    turn = ask(client, "Draw the digit 3.", reply_with="image", diffusion_steps=4)
    assert turn.details["error"] is None, turn.details["error"]
    assert len(turn.details["images"]) == 1
    with Image.open(turn.details["images"][0]) as image:
        assert image.format == "PNG" and min(image.size) > 0
        size = image.size
    [shown] = reply_files(turn)
    assert downloads in shown.parents  # downloaded by the client, not the server's file
    with Image.open(shown) as image:  # the copy the chat shows, enlarged by a whole factor
        factor = image.width // size[0]
        assert image.format == "PNG" and image.size == (factor * size[0], factor * size[1])
    assert "text" in turn.details["routing"]  # the query slots' pass is routed too


@needs_heads
def test_speech_generation_turn(client, downloads):
    import soundfile as sf

    turn = ask(client, "Say the word seven.", reply_with="audio", diffusion_steps=4)
    assert turn.details["error"] is None, turn.details["error"]
    wave, rate = sf.read(turn.details["audio"][0])
    assert rate > 0 and len(wave) > 0
    [speech] = reply_files(turn)
    assert downloads in speech.parents and speech.suffix == ".wav"
    downloaded, downloaded_rate = sf.read(speech)
    assert downloaded_rate == rate and np.array_equal(downloaded, wave)


@needs_heads
def test_forecast_turn_and_a_forecast_without_a_series(client, media, downloads):
    turn = ask(client, "Forecast the next 5 values.", [media / "series.csv"], reply_with="series")
    assert turn.details["error"] is None, turn.details["error"]
    forecast = turn.details["forecasts"][0]
    assert len(forecast["point"]) == 5 and forecast["context_length"] > 0
    [plot] = reply_files(turn)
    assert downloads in plot.parents and plot.name == Path(forecast["plot"]).name
    with Image.open(plot) as image:
        assert image.format == "PNG"
    refused = ask(client, "Forecast the next 5 values.", reply_with="series")
    assert refused.reply.startswith(NOTICE) and "series" in refused.reply and "\n" not in refused.reply
