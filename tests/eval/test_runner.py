import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unimoe
from unimoe.data.build import MARKER, DataError, build_task
from unimoe.data.records import write_jsonl
from unimoe.errors import CheckpointError, ConfigError
from unimoe.eval import TaskSpec, evaluate, load_task_specs, resolve_tasks
from unimoe.processing_unimoe import UniMoEProcessor

WORDS = ["zero", "one", "two", "three"]


@pytest.fixture(scope="module")
def model_and_processor(tokenizer):
    model = unimoe.build_model("tiny", seed=3).eval()
    with torch.no_grad():  # keep a random model from answering only with special or whitespace tokens
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        blank = [i for i, t in enumerate(vocab) if t.startswith("<|") or not tokenizer.decode([i]).strip()]
        model.lm_head.weight[torch.tensor(blank)] = 0.0
    return model, UniMoEProcessor.from_model_config(tokenizer, model.config)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    build_task("text_qa", root)
    # a small image task written by hand in the record format, with a completion marker
    task = root / "toy_images"
    (task / "media").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(task / "media" / f"{i}.png")
        records.append({
            "id": f"toy/{i}",
            "messages": [{"role": "user", "content": [{"type": "image", "path": f"media/{i}.png"},
                                                      {"type": "text", "text": "Which word?"}]},
                         {"role": "assistant", "content": WORDS[i % 4]}],
            "answer": WORDS[i % 4],
            "choices": WORDS,
        })  # fmt: skip
    write_jsonl(task / "test.jsonl", records)
    (task / MARKER).write_text(json.dumps({"version": 1, "seed": 0, "card": {"sizes": {"test": 10}}}))
    return root


def toy_specs():
    return [
        TaskSpec(name="text_qa", data="text_qa", output="generate", metrics=["accuracy"], max_new_tokens=5),
        TaskSpec(name="toy_mc", data="toy_images", output="multiple_choice", metrics=["accuracy"]),
        TaskSpec(name="toy_gen", data="toy_images", output="generate", metrics=["accuracy", "exact_match"],
                 max_new_tokens=4),
    ]  # fmt: skip


def read_predictions(out, task):
    return [json.loads(line)["prediction"] for line in (out / f"samples_{task}.jsonl").read_text().splitlines()]


def test_predictions_do_not_depend_on_batch_size(model_and_processor, data_root, tmp_path):
    model, processor = model_and_processor
    runs = {}
    for bs in (1, 8):
        evaluate(model, processor, toy_specs(), out_dir=tmp_path / f"bs{bs}", data_root=data_root, batch_size=bs,
                 limit=12, progress=False)  # fmt: skip
        runs[bs] = {t: read_predictions(tmp_path / f"bs{bs}", t) for t in ("text_qa", "toy_mc", "toy_gen")}
    assert runs[1] == runs[8]
    assert any(p for p in runs[1]["text_qa"]), "the generation test needs non-empty predictions to mean anything"


def test_result_files_follow_lm_eval_layout(model_and_processor, data_root, tmp_path):
    model, processor = model_and_processor
    summary = evaluate(model, processor, toy_specs(), out_dir=tmp_path, data_root=data_root, batch_size=4, limit=6,
                       progress=False)  # fmt: skip
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["results"] == summary["results"]
    assert set(data["results"]) == {"text_qa", "toy_mc", "toy_gen"}
    assert 0.0 <= data["results"]["toy_mc"]["accuracy"] <= 1.0
    sample = json.loads((tmp_path / "samples_toy_mc.jsonl").read_text().splitlines()[0])
    assert set(sample) == {"id", "prediction", "target", "score"} and sample["prediction"] in WORDS
    # the score column is the per-item primary metric and averages to the reported value
    scores = [json.loads(x)["score"] for x in (tmp_path / "samples_toy_mc.jsonl").read_text().splitlines()]
    assert np.isclose(np.mean(scores), data["results"]["toy_mc"]["accuracy"])
    assert "| toy_mc | accuracy |" in (tmp_path / "results.md").read_text()
    assert set(data["expert_load"]) == {"text", "image"}
    assert (tmp_path / "expert_load.png").stat().st_size > 1000
    assert "Specialization" in (tmp_path / "expert_load.md").read_text()


def test_multiple_choice_picks_the_most_likely_choice(model_and_processor, data_root):
    from unimoe.data.records import read_split
    from unimoe.eval.runner import choice_logliks, predict_multiple_choice

    model, processor = model_and_processor
    records = read_split(data_root / "toy_images", "test", limit=3)
    scores = choice_logliks(model, processor, records, batch_size=5)
    assert all(len(s) == 4 and all(v < 0 for v in s) for s in scores)
    assert scores[0] != scores[1]  # the image changes the likelihoods
    preds = predict_multiple_choice(model, processor, records, batch_size=5)
    assert preds == [r["choices"][int(np.argmax(s))] for r, s in zip(records, scores)]


def test_every_shipped_task_spec_is_valid():
    specs = load_task_specs()
    assert {"text_qa", "digits_cls", "vqa_easy", "speech_words", "speech_asr", "video_motion", "shapes3d",
            "ts_classify", "ts_forecast"} <= set(specs)  # fmt: skip
    assert [s.name for s in resolve_tasks("text_qa,vision")][0] == "text_qa"
    assert {s.name for s in resolve_tasks("all")} == set(specs)


def test_bad_requests_fail_clearly(model_and_processor, data_root, tmp_path):
    model, processor = model_and_processor
    with pytest.raises(ConfigError, match="unknown task or suite 'nope'"):
        resolve_tasks("nope")
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1, got 0"):
        evaluate(model, processor, toy_specs()[:1], out_dir=tmp_path, data_root=data_root, batch_size=0)
    with pytest.raises(ConfigError, match="limit must be None"):
        evaluate(model, processor, toy_specs()[:1], out_dir=tmp_path, data_root=data_root, limit=0)
    with pytest.raises(DataError, match="does not exist"):
        evaluate(model, processor, toy_specs()[:1], out_dir=tmp_path, data_root=tmp_path / "missing")
    with pytest.raises(DataError, match="unknown task 'never_built' \\(not built in"):
        evaluate(model, processor, [TaskSpec(name="x", data="never_built")], out_dir=tmp_path, data_root=data_root)
    corrupt = data_root / "toy_corrupt"
    corrupt.mkdir()
    (corrupt / "test.jsonl").write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    (corrupt / MARKER).write_text(json.dumps({"version": 1, "seed": 0, "card": {"sizes": {"test": 2}}}))
    with pytest.raises(DataError, match=r"test.jsonl:2: not valid JSON"):
        evaluate(model, processor, [TaskSpec(name="c", data="toy_corrupt")], out_dir=tmp_path, data_root=data_root)


def test_cli_errors_are_one_line(tmp_path, data_root, capsys):
    from unimoe.cli import main

    assert main(["eval", str(tmp_path / "no-ckpt"), "--tasks", "text_qa", "--out", str(tmp_path / "o"),
                 "--data", str(data_root)]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--tasks", "bogus", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task or suite 'bogus'" in err[0]
    for flag, value, message in [("--batch-size", "0", "must be >= 1, got 0"), ("--limit", "x", "expected an integer")]:
        with pytest.raises(SystemExit) as exit_info:  # argparse: usage + one error line, exit status 2
            main(["eval", str(tmp_path), "--tasks", "text_qa", "--out", str(tmp_path / "o"), flag, value])
        assert exit_info.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err
    assert main(["data", "build", "--out", str(tmp_path / "d"), "--tasks", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        from unimoe.inference import load_pretrained

        load_pretrained(tmp_path / "absent")


def test_real_benchmark_reader_through_the_runner(model_and_processor, tmp_path):
    """`--tasks modelnet40:PATH` scores a real benchmark read from its standard local layout."""
    import trimesh

    root = tmp_path / "ModelNet40"
    for cls, mesh in (("chair", trimesh.creation.box((1, 1, 2))), ("cone", trimesh.creation.cone(1, 2))):
        (root / cls / "test").mkdir(parents=True)
        mesh.export(root / cls / "test" / f"{cls}_0001.off")
    (spec,) = resolve_tasks(f"modelnet40:{root}")
    model, processor = model_and_processor
    summary = evaluate(model, processor, [spec], out_dir=tmp_path / "out", progress=False)
    assert summary["n_samples"]["modelnet40"] == 2
    assert "accuracy" in summary["results"]["modelnet40"]


def test_multiple_choice_preprocesses_each_item_media_once(model_and_processor, data_root, tmp_path, monkeypatch,
                                                           tokenizer):  # fmt: skip
    # scoring reads an item's media once per choice; evaluation's feature cache must turn that into one load
    from unimoe.processing_unimoe import FEATURE_CACHE

    model, _ = model_and_processor
    processor = UniMoEProcessor.from_model_config(tokenizer, model.config)  # a fresh one: its cache is off
    assert not processor.feature_cache_enabled
    cls = processor._encoders["image"][0]
    original, calls = cls.preprocess.__func__, []

    def counting(klass, media, config):
        calls.append(1)
        return original(klass, media, config)

    monkeypatch.setattr(cls, "preprocess", classmethod(counting))
    FEATURE_CACHE.resize(0)  # forget what earlier tests cached
    spec = TaskSpec(name="toy_mc", data="toy_images", output="multiple_choice", metrics=["accuracy"])
    evaluate(model, processor, [spec], out_dir=tmp_path, data_root=data_root, batch_size=8, progress=False)
    assert processor.feature_cache_enabled
    assert len(calls) == 10  # 10 items x 4 choices, each image preprocessed once


def test_a_model_without_a_forecasting_head_forecasts_in_text(tokenizer, tmp_path):
    from unimoe.data.records import read_split
    from unimoe.eval.runner import predict_forecast

    build_task("ts_forecast", tmp_path)
    records = read_split(tmp_path / "ts_forecast", "test")[:2]
    model = unimoe.build_model("tiny", generation=None, seed=0).eval()  # series encoder, no series head
    processor = UniMoEProcessor.from_model_config(tokenizer, model.config)
    preds, forecasts = predict_forecast(model, processor, records, max_new_tokens=8, batch_size=2)
    assert forecasts is None  # numbers parsed from the text (was: "this checkpoint has no forecasting head")
    assert [len(p) for p in preds] == [len(r["target"]) for r in records]


def test_two_sources_of_one_reader_keep_separate_names():
    from unimoe.eval import resolve_tasks

    names = [t.name for t in resolve_tasks("ett:d/ETTh1.csv,ett:d/ETTh2.csv,text_qa,modelnet40:m")]
    assert names == ["ett-ETTh1", "ett-ETTh2", "text_qa", "modelnet40"]
    assert [t.name for t in resolve_tasks("ett:a/ETTh1.csv,ett:b/ETTh1.csv")] == ["ett-ETTh1-1", "ett-ETTh1-2"]
    assert [t.name for t in resolve_tasks("ett:a/ETTh1.csv")] == ["ett"]


def test_records_without_answers_give_predictions_not_a_zero_score(model_and_processor, data_root, tmp_path):
    model, processor = model_and_processor
    task = data_root / "toy_unlabelled"
    (task / "media").mkdir(parents=True)
    records = [json.loads(line) for line in (data_root / "toy_images" / "test.jsonl").read_text().splitlines()][:3]
    for r in records:
        (task / "media" / Path(r["messages"][0]["content"][0]["path"]).name).write_bytes(
            (data_root / "toy_images" / r["messages"][0]["content"][0]["path"]).read_bytes()
        )
        r.pop("answer")
        r["messages"] = r["messages"][:1]  # a test split without the answers
    write_jsonl(task / "test.jsonl", records)
    (task / MARKER).write_text(json.dumps({"version": 1, "seed": 0, "card": {"sizes": {"test": 3}}}))
    spec = TaskSpec(name="unlabelled", data="toy_unlabelled", output="multiple_choice", metrics=["accuracy"])
    summary = evaluate(model, processor, [spec], out_dir=tmp_path, data_root=data_root, progress=False)
    assert "unlabelled" not in summary["results"] and "no answers" in summary["skipped"]["unlabelled"]
    samples = [json.loads(x) for x in (tmp_path / "samples_unlabelled.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(s["prediction"] in WORDS for s in samples)


def test_a_multiple_choice_record_without_choices_is_one_clear_error(tmp_path):
    from unimoe.data.build import DataError, build_task
    from unimoe.eval.runner import load_records
    from unimoe.eval.tasks import resolve_tasks

    build_task("shapes3d", tmp_path)
    path = tmp_path / "shapes3d" / "test.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()[:2]]
    del records[1]["choices"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=r"test.jsonl:2: record .*choices"):
        load_records(resolve_tasks("shapes3d")[0], tmp_path, limit=None)
