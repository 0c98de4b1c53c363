import io
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

import unimoe
from unimoe.encoders import MediaError
from unimoe.errors import InputError
from unimoe.processing_unimoe import IGNORE_INDEX, UniMoEProcessor, guess_modality


@pytest.fixture
def model():
    return unimoe.build_model("tiny", seed=0).eval()


@pytest.fixture
def processor(tokenizer, model):
    return UniMoEProcessor.from_model_config(tokenizer, model.config)


def png(seed=0, size=(24, 24)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def image_chat(answer="seven", n_images=1, seed=0):
    content = [{"type": "image", "bytes": png(seed + i)} for i in range(n_images)]
    content.append({"type": "text", "text": "What digit is this?"})
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


def test_placeholders_expand_to_connector_tokens(processor, model):
    batch = processor([image_chat()])
    image_id = processor.media_token_ids["image"]
    per_image = model.model.connectors["image"].num_tokens(
        model.model.connectors["image"].config,
        type(model.model.encoders["image"]).tokens_per_unit(model.model.encoders["image"].config),
    )
    assert int((batch["input_ids"] == image_id).sum()) == per_image == 16
    assert batch["image_values"].shape == (1, 3, 32, 32)
    assert torch.equal(batch["modality_ids"] == 1, batch["input_ids"] == image_id)
    out = model(**batch)
    assert out.loss is not None and torch.isfinite(out.loss)


def test_labels_cover_assistant_turns_only(processor):
    batch = processor([image_chat("seven")])
    labelled = batch["input_ids"][batch["labels"] != IGNORE_INDEX]
    assert processor.tokenizer.decode(labelled) == "seven<|im_end|>"
    assert (batch["labels"][batch["input_ids"] == processor.media_token_ids["image"]] == IGNORE_INDEX).all()


def test_several_media_interleaved_and_mixed_batch(processor, model):
    chat_two = [
        {"role": "user", "content": [
            {"type": "text", "text": "first"}, {"type": "image", "bytes": png(1)},
            {"type": "text", "text": "then"}, {"type": "image", "array": np.zeros((8, 8, 3), np.uint8)},
        ]},
        {"role": "assistant", "content": "two images"},
    ]  # fmt: skip
    text_only = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    batch = processor([chat_two, text_only, image_chat(seed=5)])
    assert batch["image_values"].shape[0] == 3
    assert (batch["input_ids"] == processor.media_token_ids["image"]).sum(1).tolist() == [32, 0, 16]
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()
    assert batch["attention_mask"][1, 0] == 0  # left padding
    out = model(**batch, output_router_stats=True)
    out.loss.backward()
    assert out.router_stats[0].load_per_modality[1].sum() == 48 * 2  # image tokens x top-2


def test_batch_does_not_change_a_conversations_logits(processor, model):
    alone = processor([image_chat(seed=3)])
    both = processor([image_chat("a much longer answer than the other one", seed=9), image_chat(seed=3)])
    with torch.no_grad():
        a = model(**alone).logits[0, -1]
        b = model(**both).logits[1, -1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_generation_prompt_and_generate(processor, model):
    batch = processor([image_chat()[:1]], add_generation_prompt=True, return_labels=False)
    assert "labels" not in batch
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4


def test_save_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, UniMoEProcessor)
    assert loaded.media_config == processor.media_config
    chat = [image_chat()]
    a, b = processor(chat), loaded(chat)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs(processor, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(png()[:50])
    chat = [{"role": "user", "content": [{"type": "image", "path": str(bad)}]}]
    with pytest.raises(MediaError, match="broken.png"):
        processor(chat)
    chat = [{"role": "user", "content": [{"type": "audio", "path": "x.wav"}]}]
    with pytest.raises(MediaError, match="no 'audio' encoder|x.wav"):
        UniMoEProcessor(
            processor.tokenizer,
            media_config={**processor.media_config, "encoders": {}, "connectors": {}, "media_tokens": {}},
        )(chat)
    literal = [{"role": "user", "content": "look: <|image|>"}]
    with pytest.raises(InputError, match="placeholder"):
        processor(literal)
    big = tmp_path / "big.png"
    big.write_bytes(png(size=(300, 300)))
    small_limit = UniMoEProcessor(processor.tokenizer, media_config={**processor.media_config, "max_file_bytes": 1000})
    with pytest.raises(MediaError, match="above the limit"):
        small_limit([{"role": "user", "content": [{"type": "image", "path": str(big)}]}])


def test_guess_modality(tmp_path):
    assert guess_modality("a.PNG") == "image" and guess_modality("a.wav") == "audio"
    assert guess_modality("a.gif") == "video" and guess_modality("a.ply") == "points"
    assert guess_modality("a.csv") == "series" and guess_modality(tmp_path) == "video"
    np.save(tmp_path / "cloud.npy", np.zeros((10, 3)))
    np.save(tmp_path / "ts.npy", np.zeros(10))
    assert guess_modality(tmp_path / "cloud.npy") == "points"
    assert guess_modality(tmp_path / "ts.npy") == "series"
    with pytest.raises(MediaError, match="--modality"):
        guess_modality("a.xyzw")


def test_guess_modality_tells_a_multichannel_series_from_a_point_cloud(tmp_path):
    """(N, 3|6|9) arrays are both: a series' rows are ordered in time, a cloud's are not (the suite's BasicMotions
    series are (100, 6) accelerometer + gyroscope readings, and were read as point clouds before)."""
    rng = np.random.default_rng(0)
    t = np.linspace(0, 4 * np.pi, 100)[:, None]
    series = np.concatenate([np.sin(t * k) for k in (1, 2, 3)] + [np.cos(t * k) for k in (1, 2, 3)], axis=1)
    series += 0.3 * rng.normal(size=series.shape)  # noisy, as sensors are
    cloud = rng.normal(size=(1024, 3))
    cloud /= np.linalg.norm(cloud, axis=1, keepdims=True)  # points on a sphere, in sampling order
    for name, array in {"series": series, "cloud": cloud, "shuffled": rng.permutation(series)}.items():
        np.save(tmp_path / f"{name}.npy", array.astype(np.float32))
    assert guess_modality(tmp_path / "series.npy") == "series"
    assert guess_modality(tmp_path / "cloud.npy") == "points"
    assert guess_modality(tmp_path / "shuffled.npy") == "points"  # the same values without their order
    # a model that reads only one of the two takes that one
    assert guess_modality(tmp_path / "series.npy", ["text", "points"]) == "points"
    assert guess_modality(tmp_path / "cloud.npy", ["series"]) == "series"
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(MediaError, match="empty.npy: file is empty"):
        guess_modality(tmp_path / "empty.npy")
    (tmp_path / "cut.npy").write_bytes((tmp_path / "series.npy").read_bytes()[:40])
    with pytest.raises(MediaError, match="cut.npy: not a readable .npy array"):
        guess_modality(tmp_path / "cut.npy")


def test_feature_cache_is_shared_and_keyed_by_file_and_config(tokenizer, model, tmp_path, monkeypatch):
    """Processors of one process share preprocessed files (a recipe's stages each build one); a changed file, or a
    processor whose encoder settings differ, gets fresh features."""
    from unimoe.processing_unimoe import FeatureCache

    cache = FeatureCache()
    monkeypatch.setattr("unimoe.processing_unimoe.FEATURE_CACHE", cache)
    path = tmp_path / "digit.png"
    path.write_bytes(png(0))
    part = {"type": "image", "path": str(path)}

    first = UniMoEProcessor.from_model_config(tokenizer, model.config)
    first.enable_feature_cache()
    features = first.load_part(part)
    second = UniMoEProcessor.from_model_config(tokenizer, model.config)
    second.enable_feature_cache()
    assert second.load_part(part) is features and len(cache) == 1
    target = first.load_target(part)  # the image head's target of the same file: its own entry, shared too
    assert second.load_target(part) is target and len(cache) == 2

    other = UniMoEProcessor.from_model_config(tokenizer, model.config)
    other._encoders["image"] = (other._encoders["image"][0], replace(other._encoders["image"][1], image_size=16))
    other.enable_feature_cache()
    assert other.load_part(part)["values"].shape[-1] == 16 and len(cache) == 3

    path.write_bytes(png(1))  # new content (and size / mtime): a miss, with the new pixels
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    fresh = second.load_part(part)
    assert fresh is not features and not torch.equal(fresh["values"], features["values"])
    uncached = UniMoEProcessor.from_model_config(tokenizer, model.config)  # no cache: never stored
    assert torch.equal(uncached.load_part(part)["values"], fresh["values"]) and len(cache) == 4


def test_feature_cache_evicts_least_recently_used_by_bytes():
    from unimoe.processing_unimoe import FeatureCache

    cache = FeatureCache(max_bytes=3 * 400)
    for name in "abc":
        cache.put((name,), {"values": torch.zeros(100)})  # 400 bytes each
    assert cache.get(("a",)) is not None  # a is now the most recent
    cache.put(("d",), torch.zeros(100))
    assert cache.get(("b",)) is None and cache.get(("a",)) is not None and len(cache) == 3 and cache.nbytes == 1200
    cache.put(("huge",), torch.zeros(1000))  # larger than the whole budget: not kept, nothing evicted
    assert cache.get(("huge",)) is None and len(cache) == 3
    cache.resize(400)
    assert len(cache) == 1 and cache.get(("a",)) is not None


def test_placeholders_without_their_media_are_an_error(processor, model):
    inputs = processor([image_chat()], add_generation_prompt=True)
    no_media = {k: v for k, v in inputs.items() if not k.startswith("image_")}
    with pytest.raises(InputError, match="image: the prompt has .* placeholder tokens but no image_values"):
        model(**no_media)
    with pytest.raises(InputError, match="no image_values"):
        model.generate(**no_media, max_new_tokens=2)
    kw = dict(max_new_tokens=4, do_sample=False)  # the media reach every step without a cache
    assert torch.equal(model.generate(**inputs, **kw), model.generate(**inputs, use_cache=False, **kw))
