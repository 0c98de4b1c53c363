"""generate_multimodal, the CLI's chat --save-dir, training records of generation tasks, and the eval runner."""

import json

import numpy as np
import pytest
import torch

from unimoe.generation import MultimodalOutput
from unimoe.generation.api import GenerationError


@pytest.fixture
def emits(gen_model):
    """Make the random model answer with a given generation token (a hook on the LM head's logits)."""
    model, processor = gen_model
    handles = []

    def use(modality):
        token = processor.gen_token_ids[modality]

        def hook(_module, _inputs, logits):
            logits = logits.clone()
            logits[..., token] += 1e4
            return logits

        handles.append(model.lm_head.register_forward_hook(hook))

    yield use
    for handle in handles:
        handle.remove()


def test_the_model_decides_what_to_generate(gen_model, emits, tmp_path):
    model, processor = gen_model
    emits("image")
    out = model.generate_multimodal(processor, [{"role": "user", "content": "Draw the digit two."}], seed=0,
                                    num_inference_steps=2)  # fmt: skip
    assert isinstance(out, MultimodalOutput) and len(out.images) == 1 and not out.audio
    assert out.images[0].size == (32, 32)
    paths = out.save(tmp_path)
    assert [p.name for p in paths] == ["image_0.png"]


def test_one_seed_per_conversation_makes_media_independent_of_the_batch(gen_model):
    """The evaluation seeds each prompt by its position: a prompt's image must not depend on its batch mates."""
    model, processor = gen_model
    prompts = [[{"role": "user", "content": f"Draw the digit {w}."}] for w in ("two", "five", "eight")]
    kwargs = {"output_modality": "image", "num_inference_steps": 2}
    batched = model.generate_multimodal(processor, prompts, seed=[7, 8, 9], **kwargs)
    alone = [model.generate_multimodal(processor, [p], seed=[s], **kwargs)[0] for p, s in zip(prompts, (7, 8, 9))]
    for b, a in zip(batched, alone):
        np.testing.assert_allclose(np.asarray(b.images[0], float), np.asarray(a.images[0], float), atol=1)
    other = model.generate_multimodal(processor, prompts[:1], seed=[8], **kwargs)[0]
    assert not np.array_equal(np.asarray(other.images[0]), np.asarray(alone[0].images[0]))  # the seed matters
    # an int seed still draws one stream for the batch, as before: a single prompt gets the same as with [seed]
    single = model.generate_multimodal(processor, prompts[0], seed=7, **kwargs)
    assert np.array_equal(np.asarray(single.images[0]), np.asarray(alone[0].images[0]))
    with pytest.raises(GenerationError, match="2 seeds for 3 conversations"):
        model.generate_multimodal(processor, prompts, seed=[1, 2], **kwargs)


def test_text_written_before_the_generation_token_is_kept_and_conditions_the_head(gen_model):
    """Text-guided generation (the gen_speech_words records): the model writes the word, then the generation token;
    the text comes back and the head's queries see it (the same noise gives a different clip than without it)."""
    model, processor = gen_model
    word = processor.tokenizer.encode("seven", add_special_tokens=False)[0]
    gen = processor.gen_token_ids["audio"]
    calls = []

    def hook(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., word if not calls else gen] += 1e4  # first new token: the word; then the generation token
        calls.append(1)
        return logits

    prompt = [{"role": "user", "content": "Say the word seven."}]
    handle = model.lm_head.register_forward_hook(hook)
    try:
        out = model.generate_multimodal(processor, prompt, seed=0, num_inference_steps=2)
    finally:
        handle.remove()
    assert out.text == processor.tokenizer.decode([word]).strip() and len(out.audio) == 1
    direct = model.generate_multimodal(processor, prompt, output_modality="audio", seed=0, num_inference_steps=2)
    assert not np.allclose(out.audio[0].waveform, direct.audio[0].waveform)


def test_speech_and_forecasts_come_back_as_arrays(gen_model, tmp_path):
    model, processor = gen_model
    speech = model.generate_multimodal(processor, [{"role": "user", "content": "Say the word one."}],
                                       output_modality="audio", seed=0, num_inference_steps=2)  # fmt: skip
    clip = speech.audio[0]
    assert clip.sample_rate == 16000 and clip.waveform.dtype == np.float32
    assert clip.waveform.ndim == 1 and np.isfinite(clip.waveform).all() and np.abs(clip.waveform).max() <= 0.91
    series = (np.sin(np.arange(60) / 3) + 5).astype(np.float32)
    messages = [{"role": "user", "content": [{"type": "series", "array": series[:, None]},
                                             {"type": "text", "text": "Forecast the next 7 values."}]}]  # fmt: skip
    forecast = model.generate_multimodal(processor, messages, output_modality="series").forecasts[0]
    assert forecast.point.shape == (7,) and sorted(forecast.quantiles) == [0.1, 0.5, 0.9]
    np.testing.assert_allclose(forecast.context, series)
    names = [p.name for p in MultimodalOutput(audio=[clip], forecasts=[forecast]).save(tmp_path)]
    assert names == ["audio_0.wav", "forecast_0.csv", "forecast_0.png"]
    assert (tmp_path / "forecast_0.csv").read_text().splitlines()[0] == "step,point,q0.1,q0.5,q0.9"


def test_a_forecast_needs_a_series_in_the_prompt(gen_model):
    model, processor = gen_model
    with pytest.raises(Exception, match="forecasting needs a time series in the prompt"):
        model.generate_multimodal(processor, [{"role": "user", "content": "Forecast."}], output_modality="series")


def test_temperature_zero_is_greedy_and_a_bad_one_is_named(gen_model):
    from unimoe.generation.api import sampling_kwargs
    from unimoe.inference import chat

    assert sampling_kwargs(0) == {"do_sample": False}
    assert sampling_kwargs(0.7) == {"do_sample": True, "temperature": 0.7}
    model, processor = gen_model
    messages = [{"role": "user", "content": "Hello"}]
    for bad in (-0.5, float("nan"), float("inf"), "hot"):  # below 0 and NaN used to decode greedily without a word
        with pytest.raises(GenerationError, match=r"^temperature: must be a finite number >= 0"):
            model.generate_multimodal(processor, messages, temperature=bad, max_new_tokens=2)
        with pytest.raises(GenerationError, match=r"^temperature: must be a finite number >= 0"):
            chat(model, processor, "Hello", temperature=bad, max_new_tokens=2)


def test_a_forecast_the_model_chooses_without_a_series_is_dropped_not_raised(gen_model, emits):
    """A badly trained model may write the forecasting token for a prompt without a series (seen in a 60-step
    recipe's evaluation of spoken words): that reply gets no forecast; the batch's other replies are unaffected."""
    model, processor = gen_model
    emits("series")
    series = np.sin(np.arange(40, dtype=np.float32))[:, None]
    chats = [[{"role": "user", "content": "Say the word two."}],
             [{"role": "user", "content": [{"type": "series", "array": series},
                                           {"type": "text", "text": "Forecast the next 4 values."}]}]]  # fmt: skip
    without, with_series = model.generate_multimodal(processor, chats, forecast_horizon=4)
    assert not without.forecasts and not without.images and not without.audio
    assert len(with_series.forecasts) == 1 and with_series.forecasts[0].point.shape == (4,)


def test_a_checkpoint_without_an_image_decoder_says_so(tmp_path, capsys):
    from unimoe import cli
    from unimoe.inference import init_checkpoint, load_pretrained

    path = init_checkpoint("tiny", tmp_path / "no-image", seed=0)
    config = json.loads((path / "config.json").read_text())
    del config["generation"]["image"], config["generation_token_ids"]["image"]
    (path / "config.json").write_text(json.dumps(config))
    model, processor = load_pretrained(path)
    capsys.readouterr()
    with pytest.raises(GenerationError, match=r"no image decoder \(decoder_image/\), so it cannot generate image"):
        model.generate_multimodal(processor, [{"role": "user", "content": "Draw a 3."}], output_modality="image")
    assert cli.main(["chat", str(path), "Draw a 3.", "--output", "image", "--save-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no image decoder" in err
    # asking for a medium with nowhere to write it: refused before the model is loaded
    assert cli.main(["chat", str(path), "Draw a 3.", "--output", "image"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--output image: pass --save-dir DIR" in err


def test_chat_save_dir_writes_media_and_prints_paths(gen_checkpoint, tmp_path, capsys):
    from unimoe import cli

    out = tmp_path / "out"
    code = cli.main(["chat", str(gen_checkpoint), "Draw the digit 3.", "--output", "image", "--save-dir", str(out),
                     "--steps", "2", "--guidance", "1.5"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(out / "image_0.png") and (out / "image_0.png").is_file()


def test_training_records_of_generation_tasks():
    from unimoe.train.data import training_record

    image = {"messages": [{"role": "user", "content": "Draw"},
                          {"role": "assistant", "content": [{"type": "image", "path": "x.png"}]}]}  # fmt: skip
    forecast = {"messages": [{"role": "user", "content": "Forecast"}, {"role": "assistant", "content": "1 2"}],
                "target": [1.0, 2.0]}  # fmt: skip
    assert training_record(image, set()) is None  # no head: skipped
    assert training_record(image, {"image"}) is image
    assert training_record(forecast, set()) is forecast  # text answer for a model without a forecasting head
    converted = training_record(forecast, {"series"})
    assert converted["messages"][-1]["content"] == [{"type": "series", "values": [1.0, 2.0]}]


def test_eval_runner_judges_generated_images(gen_model, emits, tmp_path):
    from PIL import Image

    from unimoe.data.build import MARKER
    from unimoe.data.records import write_jsonl
    from unimoe.data.tasks_vision import DIGIT_WORDS
    from unimoe.eval import TaskSpec, evaluate

    model, processor = gen_model
    task = tmp_path / "data" / "toy_draw"
    (task / "media").mkdir(parents=True)
    words = ["zero", "one", "two", "three"]
    records = []
    for i in range(4):
        Image.new("L", (32, 32)).save(task / "media" / f"{i}.png")
        answer = {"role": "assistant", "content": [{"type": "image", "path": f"media/{i}.png"}]}
        prompt = {"role": "user", "content": f"Draw the digit {words[i]}."}
        records.append({"id": f"toy_draw/test/{i}", "answer": words[i], "messages": [prompt, answer]})
    write_jsonl(task / "test.jsonl", records)
    (task / MARKER).write_text(json.dumps({"version": 1, "seed": 0, "card": {"sizes": {"test": 4}}}))
    spec = TaskSpec(name="toy_draw", data="toy_draw", output="generate_image", metrics=["accuracy"], max_new_tokens=3)
    emits("image")
    summary = evaluate(model, processor, [spec], out_dir=tmp_path / "eval", data_root=tmp_path / "data",
                       batch_size=3, progress=False)  # fmt: skip
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples_toy_draw.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["prediction"] in DIGIT_WORDS for s in samples)
    assert all((tmp_path / "eval" / "media_toy_draw").joinpath(s["id"].replace("/", "_") + ".png").is_file()
               for s in samples)  # fmt: skip
    accuracy = summary["results"]["toy_draw"]["accuracy"]
    assert accuracy == pytest.approx(np.mean([s["prediction"] == s["target"] for s in samples]))


def test_runner_skips_generation_tasks_without_a_decoder(tmp_path):
    from unimoe import build_model
    from unimoe.eval import TaskSpec
    from unimoe.eval.runner import run_task

    model = build_model("tiny", {"generation": {}}, seed=0)
    model.model.generation_heads = torch.nn.ModuleDict()
    spec = TaskSpec(name="g", data="g", output="generate_audio", metrics=["accuracy"])
    result = run_task(model, None, spec, [], batch_size=1, progress=False)
    assert result.skipped == "the model has no audio decoder (generate_audio needs one)"
