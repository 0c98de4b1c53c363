"""The demo's model side without a server: history in every shape gradio hands it over, upload checks, readable
errors, how generated images / speech / forecasts become chat messages, and the previews."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from unimoe.demo.app import _chat_message, _panel_outputs
from unimoe.demo.engine import NOTICE, ChatEngine, GenerationSettings, history_messages, readable
from unimoe.demo.media import (
    enlarged_for_display,
    forecast_figure,
    routing_summary,
    save_figure,
    series_figure,
    write_point_cloud_preview,
)
from unimoe.encoders import MediaError


def test_history_keeps_text_turns_in_every_shape_gradio_uses():
    history = [
        # from the browser: normalized parts
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/a.png"}}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        # from the /chat API: raw strings, file dicts and components
        {"role": "user", "content": [{"path": "/tmp/b.wav"}, "and this?"]},
        {"role": "assistant", "content": "a tone"},
        {"role": "assistant", "content": gr.Image(value=None, render=False)},
        {"role": "assistant", "content": "more"},
        # the app's own reply with media, as the /chat API keeps it in the history
        {"role": "user", "content": "draw"},
        {"role": "assistant", "content": ["a cat", {"path": "/tmp/c.png", "meta": {"_type": "gradio.FileData"}}]},
    ]
    assert history_messages(history, limit=8) == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "and this?"}]},
        {"role": "assistant", "content": "a tone\nmore"},  # one assistant turn, split by gradio into messages
        {"role": "user", "content": [{"type": "text", "text": "draw"}]},
        {"role": "assistant", "content": "a cat"},
    ]


def test_history_drops_notices_with_their_question_and_starts_with_the_user():
    history = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "look at this"},
        {"role": "assistant", "content": f"{NOTICE}bad.png: corrupt image"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "two"},
    ]
    texts = [
        m["content"] if isinstance(m["content"], str) else m["content"][0]["text"] for m in history_messages(history, 8)
    ]
    assert texts == ["first", "one", "second", "two"]
    assert [m["role"] for m in history_messages(history, limit=3)] == ["user", "assistant"]  # never starts mid-turn
    assert history_messages(history, limit=0) == []


def test_readable_names_the_users_file_not_the_server_path(tmp_path):
    path = tmp_path / "gradio" / "0123abcd" / "photo.png"
    err = MediaError(path, "corrupt image (Truncated File Read)\nsecond line")
    assert readable(err, [path]) == "photo.png: corrupt image (Truncated File Read)"


@pytest.fixture
def engine(model_and_processor, tmp_path):
    model, processor = model_and_processor
    return ChatEngine(model, processor, output_dir=tmp_path / "out", max_file_bytes=1000)


def test_uploads_are_checked_before_decoding(engine, tmp_path):
    (tmp_path / "a.png").write_bytes(b"x" * 10)
    assert engine.attachments([str(tmp_path / "a.png")])[0].modality == "image"
    cases = {
        "notes.docx": (b"x", "unsupported file type .docx"),
        "empty.wav": (b"", "file is empty"),
        "big.csv": (b"1\n" * 600, "above the demo's limit of 1,000 bytes"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MediaError, match=message):
            engine.attachments([{"path": str(tmp_path / name)}])
    with pytest.raises(MediaError, match="missing"):
        engine.attachments([str(tmp_path / "gone.png")])


def test_a_modality_without_an_encoder_is_refused(model_and_processor, tmp_path):
    model, processor = model_and_processor
    image_only = SimpleNamespace(modalities=["image"], max_file_bytes=None, tokenizer=processor.tokenizer)
    engine = ChatEngine(model, image_only, output_dir=tmp_path)
    sf.write(tmp_path / "a.wav", np.zeros(1600), 16000)
    with pytest.raises(MediaError, match="this checkpoint has no audio encoder \\(it reads: image\\)"):
        engine.attachments([tmp_path / "a.wav"])


def test_empty_message_and_bad_text_get_a_notice_not_an_exception(engine):
    assert list(engine.stream("", []))[-1].error == "Type a message or attach a file."
    reply = list(engine.stream("look <|image|> here", [], settings=GenerationSettings(max_new_tokens=2)))[-1]
    assert reply.error and "placeholder" in reply.error  # the processor's InputError, as one line


class _Output(SimpleNamespace):
    """What ``generate_multimodal`` returns (text, images, audio, forecasts)."""


def _multimodal_double(model, processor, fail: Exception | None = None):
    """Give a model the ``generate_multimodal`` contract: text streamed from the real model, plus one image, one
    speech clip and one forecast — to test how the demo shows generated media independently of the heads."""

    def generate_multimodal(proc, messages, *, max_new_tokens, temperature, seed, num_inference_steps,
                            guidance_scale, streamer):  # fmt: skip
        if fail is not None:
            raise fail
        inputs = proc(messages, add_generation_prompt=True, return_labels=False)
        model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                       pad_token_id=proc.tokenizer.pad_token_id, eos_token_id=proc.tokenizer.eos_token_id)  # fmt: skip
        calls.append({"steps": num_inference_steps, "guidance": guidance_scale, "seed": seed})
        h = 6
        return _Output(
            text="Here you go.",
            images=[Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8))],
            audio=[SimpleNamespace(waveform=np.sin(np.arange(8000) / 5).astype(np.float32), sample_rate=16000)],
            forecasts=[
                SimpleNamespace(
                    point=np.arange(h, dtype=np.float32),
                    quantiles={0.1: np.arange(h) - 1.0, 0.5: np.arange(h) * 1.0, 0.9: np.arange(h) + 1.0},
                    context=np.sin(np.arange(30) / 3),
                )
            ],
        )

    calls: list[dict] = []
    model.generate_multimodal = generate_multimodal
    return calls


def test_generated_media_become_chat_files(tokenizer, tmp_path):
    from unimoe import build_model
    from unimoe.processing_unimoe import UniMoEProcessor

    model = build_model("tiny", seed=0).eval()
    processor = UniMoEProcessor.from_model_config(tokenizer, model.config)
    calls = _multimodal_double(model, processor)
    engine = ChatEngine(model, processor, output_dir=tmp_path)
    settings = GenerationSettings(max_new_tokens=3, num_inference_steps=7, guidance_scale=2.5, seed=3)
    reply = list(engine.stream("Draw a three and say it.", [], settings=settings))[-1]
    assert reply.error is None and reply.text == "Here you go."
    assert calls == [{"steps": 7, "guidance": 2.5, "seed": 3}]  # the settings panel reaches the heads
    assert Image.open(reply.images[0]).size == (16, 16)
    wave, rate = sf.read(reply.audio[0])
    assert rate == 16000 and len(wave) == 8000
    assert reply.forecasts[0].point.shape == (6,) and set(reply.forecasts[0].quantiles) == {0.1, 0.5, 0.9}
    assert set(reply.routing) == {"text"}  # the routing panel still covers the text generation

    message = _chat_message(reply)
    assert message["role"] == "assistant" and message["content"][0] == "Here you go."
    files = message["content"][1:]
    assert [f["mime_type"] for f in files] == ["image/png", "audio/wav", "image/png"]
    assert all(f["meta"] == {"_type": "gradio.FileData"} and Path(f["path"]).is_file() for f in files)
    assert Path(files[0]["path"]).parent == reply.images[0].parent  # the enlarged copy, beside the original
    assert Path(files[2]["path"]) == reply.forecasts[0].plot and Image.open(files[2]["path"]).format == "PNG"
    # the browser path postprocesses the message: the text, then the files, shown by their type
    rendered = gr.Chatbot(render=False).postprocess([message]).model_dump()
    parts = [(c["type"], (c.get("file") or {}).get("mime_type")) for m in rendered for c in m["content"]]
    assert parts == [("text", None), ("file", "image/png"), ("file", "audio/wav"), ("file", "image/png")]
    details = reply.to_json()
    assert details["images"] == [str(reply.images[0])] and details["forecasts"][0]["quantiles"]["0.9"][0] == 1.0
    assert details["forecasts"][0]["plot"] == str(reply.forecasts[0].plot)


def test_asking_a_checkpoint_without_an_image_decoder_is_one_readable_line(tokenizer, tmp_path):
    from unimoe import build_model
    from unimoe.processing_unimoe import UniMoEProcessor

    model = build_model("tiny", {"generation": None}, seed=0).eval()  # no generation heads
    if not hasattr(model, "generate_multimodal"):
        pytest.skip("needs Step 5 generation heads")
    processor = UniMoEProcessor.from_model_config(tokenizer, model.config)
    engine = ChatEngine(model, processor, output_dir=tmp_path)
    reply = list(engine.stream("Draw a cat", [], settings=GenerationSettings(output="image")))[-1]
    assert reply.error and "image decoder" in reply.error and "\n" not in reply.error
    assert _chat_message(reply) == f"{NOTICE}{reply.error}"
    heatmap, summary, *_ = _panel_outputs(reply, num_experts=4)
    assert heatmap is None and "not answered" in summary


def test_a_text_only_model_refuses_a_forced_output(model_and_processor, tmp_path):
    model, processor = model_and_processor
    engine = ChatEngine(model, processor, output_dir=tmp_path)
    engine.multimodal_output = False  # as for a model class without generate_multimodal
    reply = list(engine.stream("Draw a cat", [], settings=GenerationSettings(output="image", max_new_tokens=2)))[-1]
    assert reply.error == "this model generates text only, so it cannot reply with image"


def test_an_unexpected_failure_is_reported_and_logged(tokenizer, tmp_path, caplog):
    from unimoe import build_model
    from unimoe.processing_unimoe import UniMoEProcessor

    model = build_model("tiny", seed=0).eval()
    processor = UniMoEProcessor.from_model_config(tokenizer, model.config)
    _multimodal_double(model, processor, fail=RuntimeError("CUDA out of memory"))
    reply = list(ChatEngine(model, processor, output_dir=tmp_path).stream("hi", []))[-1]
    assert reply.error == "the model failed: RuntimeError: CUDA out of memory"
    assert "generation failed" in caplog.text


def test_previews_and_plots(tmp_path):
    rng = np.random.default_rng(0)
    cloud = np.concatenate([rng.normal(size=(30_000, 3)), rng.uniform(size=(30_000, 3))], axis=1)
    path = write_point_cloud_preview(cloud, tmp_path / "cloud.ply")
    import trimesh

    loaded = trimesh.load(path)
    assert isinstance(loaded, trimesh.PointCloud) and len(loaded.vertices) == 20_000  # subsampled for the browser
    assert loaded.colors.shape[0] == 20_000
    assert len(series_figure(np.zeros((40, 2))).axes[0].lines) == 2
    fig = forecast_figure(np.zeros(20), np.ones(5), {"0.1": np.zeros(5), "0.9": np.full(5, 2.0)})
    assert len(fig.axes[0].collections) == 1  # the quantile band
    with Image.open(save_figure(fig, tmp_path / "plots" / "forecast.png")) as png:
        assert png.format == "PNG" and png.size == (600, 280)
    Image.fromarray(np.zeros((32, 24), dtype=np.uint8)).save(tmp_path / "digit.png")
    big = enlarged_for_display(tmp_path / "digit.png")
    assert big.name == "digit_x11.png" and Image.open(big).size == (264, 352)  # the chat shows natural sizes
    assert enlarged_for_display(big) == big
    table = routing_summary({"text": np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])}, num_experts=2)
    assert "| text | e1 (60%) | e0 (50%) |" in table
    assert "n0" in routing_summary({"image": np.array([[0.1, 0.2, 0.7]])}, num_experts=2)
    assert "no MoE layers" in routing_summary({}, num_experts=0)


def test_panel_outputs_keep_previews_when_a_turn_has_none():
    from unimoe.demo.engine import Reply

    heatmap, summary, points, series, details = _panel_outputs(Reply(prompt="hi", text="yo"), num_experts=4)
    assert points == gr.skip() and series == gr.skip()
    assert details["text"] == "yo"
    reply = Reply(prompt="x", series_preview=Path("/tmp/s_series.png"), points_preview=Path("/tmp/p.ply"))
    _, _, points, series, _ = _panel_outputs(reply, num_experts=4)
    assert points == "/tmp/p.ply" and series == "/tmp/s_series.png"
