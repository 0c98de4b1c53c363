"""unimoe.eval.readers on tiny fixtures written here in each benchmark's own format."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unimoe.data.build import DataError
from unimoe.eval.metrics import METRICS
from unimoe.eval.readers import READERS, Reader, ett_borders, read_benchmark


def _media(record):
    parts = [p for p in record["messages"][0]["content"] if p.get("type") != "text"]
    return parts[0] if parts else None


def _text(record):
    return record["messages"][0]["content"][-1]["text"]


def _check_common(records, modality):
    for r in records:
        assert r["messages"][-1]["role"] == "assistant"
        media = _media(r)
        if media is not None:
            assert media["type"] == modality
            assert Path(media["path"]).is_absolute() and Path(media["path"]).is_file()


def _png_bytes(color, fmt="PNG"):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format=fmt)
    return buffer.getvalue()


def _load_image(path):
    from unimoe.encoders.image import ImageEncoder, ImageEncoderConfig

    return ImageEncoder.load(path, ImageEncoderConfig())


def test_registry():
    assert set(READERS) >= {"vqav2", "mmbench", "scienceqa", "clotho_aqa", "modelnet40", "librispeech", "ett"}
    for reader in READERS.values():
        assert isinstance(reader, Reader)
        assert reader.output in ("generate", "multiple_choice", "forecast")
        assert all(m in METRICS for m in reader.default_metrics)
    with pytest.raises(DataError, match="unknown benchmark reader"):
        read_benchmark("nope", ".")


# -- VQAv2 ----------------------------------------------------------------------------------------------------------


def _write_vqav2(root: Path, split="val2014"):
    (root / split).mkdir(parents=True)
    questions, annotations = [], []
    for qid, image_id, answers in [(11, 42, ["two"] * 6 + ["2"] * 2 + ["three"] * 2), (12, 7, ["yes"] * 10)]:
        Image.new("RGB", (8, 8), "red").save(root / split / f"COCO_{split}_{image_id:012d}.jpg")
        questions.append({"question_id": qid, "image_id": image_id, "question": f"Question {qid}?"})
        annotations.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "multiple_choice_answer": answers[0],
                "answer_type": "other",
                "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)],
            }
        )
    (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": questions}))
    (root / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": annotations}))


def test_vqav2(tmp_path):
    _write_vqav2(tmp_path)
    records = read_benchmark("vqav2", tmp_path, "val2014")
    _check_common(records, "image")
    assert [r["id"] for r in records] == ["vqav2/val2014/11", "vqav2/val2014/12"]
    first = records[0]
    assert first["answer"] == "two" and len(first["meta"]["answers"]) == 10
    assert _text(first) == "Question 11?\nAnswer the question using a single word or phrase."
    assert _media(first)["path"].endswith("COCO_val2014_000000000042.jpg")
    assert _load_image(_media(first)["path"]).size == (8, 8)
    # "2" matches all 8 of "two"/"2" → 1.0 on every subset
    assert METRICS["vqa_accuracy"].per_item("2", first["answer"], first) == 1.0
    assert len(read_benchmark("vqav2", tmp_path, "val2014", limit=1)) == 1


def test_vqav2_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_benchmark("vqav2", tmp_path / "missing")
    _write_vqav2(tmp_path)
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text("{not json")
    with pytest.raises(DataError, match="v2_mscoco_val2014_annotations.json: not valid JSON") as info:
        read_benchmark("vqav2", tmp_path, "val2014")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="v2_OpenEnded_mscoco_test2015_questions.json does not exist"):
        read_benchmark("vqav2", tmp_path, "test2015")


# -- MMBench --------------------------------------------------------------------------------------------------------


def _write_mmbench(path: Path):
    import pandas as pd

    png, jpg = base64.b64encode(_png_bytes("blue")).decode(), base64.b64encode(_png_bytes("green", "JPEG")).decode()
    rows = [
        {"index": 0, "question": "What colour?", "hint": "A plain square.", "A": "blue", "B": "green", "C": "red",
         "D": "", "answer": "A", "image": png, "category": "attribute"},
        {"index": 1, "question": "Which is it?", "hint": "nan", "A": "cat", "B": "dog", "C": "", "D": "",
         "answer": "B", "image": jpg, "category": "object"},
        {"index": 2, "question": "Same image?", "hint": "", "A": "yes", "B": "no", "C": "maybe", "D": "None",
         "answer": "D", "image": "0", "category": "object"},
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)


def test_mmbench(tmp_path):
    tsv = tmp_path / "MMBench_DEV_EN.tsv"
    _write_mmbench(tsv)
    records = read_benchmark("mmbench", tsv)
    _check_common(records, "image")
    assert len(records) == 3
    first, second, third = records
    assert first["choices"] == ["A", "B", "C"] and first["answer"] == "A"
    assert _text(first) == "A plain square.\nWhat colour?\nOptions:\nA. blue\nB. green\nC. red\nAnswer with the letter."
    assert second["choices"] == ["A", "B"] and _text(second).startswith("Which is it?")  # "nan" hint dropped
    assert third["choices"] == ["A", "B", "C", "D"] and third["meta"]["options"]["D"] == "None"  # "None" kept
    assert Path(_media(first)["path"]).parent == tmp_path / "MMBench_DEV_EN_images"
    assert _media(first)["path"].endswith(".png") and _media(second)["path"].endswith(".jpg")
    assert _load_image(_media(third)["path"]).getpixel((0, 0)) == (0, 0, 255)  # image "0" → row 0's image
    assert METRICS["accuracy"].fn(["A.", "(b)", "C"], [r["answer"] for r in records], records) == pytest.approx(2 / 3)
    # a folder with the TSV; a custom cache dir
    records = read_benchmark("mmbench", tmp_path, "dev_en", limit=1, cache_dir=tmp_path / "cache")
    assert len(records) == 1 and Path(_media(records[0])["path"]).parent == tmp_path / "cache"


def test_mmbench_bad_inputs(tmp_path):
    (tmp_path / "bad.tsv").write_text("index\tquestion\n0\tq\n")
    with pytest.raises(DataError, match=r"bad.tsv: missing column\(s\) image, A, B"):
        read_benchmark("mmbench", tmp_path / "bad.tsv")
    with pytest.raises(DataError, match="expected one MMBench .tsv matching 'test', found none"):
        read_benchmark("mmbench", tmp_path, "test")


# -- ScienceQA ------------------------------------------------------------------------------------------------------


def test_scienceqa(tmp_path):
    problems = {
        "5": {"question": "Which animal is shown?", "choices": ["cat", "dog", "bird"], "answer": 1,
              "hint": "Look at the picture.", "image": "image.png", "lecture": "Animals.", "subject": "natural science",
              "split": "test"},
        "6": {"question": "Is water wet?", "choices": ["yes", "no"], "answer": 0, "hint": "", "image": None,
              "split": "test"},
        "7": {"question": "Train only", "choices": ["a", "b"], "answer": 0, "image": None, "split": "train"},
    }  # fmt: skip
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": ["7"], "test": ["5", "6"]}))
    (tmp_path / "test" / "5").mkdir(parents=True)
    Image.new("RGB", (8, 8), "white").save(tmp_path / "test" / "5" / "image.png")
    records = read_benchmark("scienceqa", tmp_path, "test")
    _check_common(records, "image")
    assert [r["id"] for r in records] == ["scienceqa/test/5", "scienceqa/test/6"]
    first = records[0]
    assert first["answer"] == "B" and first["choices"] == ["A", "B", "C"] and first["meta"]["answer_text"] == "dog"
    assert _text(first) == (
        "Context: Look at the picture.\nWhich animal is shown?\nOptions:\nA. cat\nB. dog\nC. bird\n"
        "Answer with the letter."
    )
    assert first["meta"]["lecture"] == "Animals."
    assert _load_image(_media(first)["path"]).size == (8, 8)
    assert _media(records[1]) is None  # text-only question
    assert [r["id"] for r in read_benchmark("scienceqa", tmp_path, "test", image_only=True)] == ["scienceqa/test/5"]
    (tmp_path / "pid_splits.json").unlink()  # falls back to each problem's "split"
    assert len(read_benchmark("scienceqa", tmp_path, "train")) == 1


def test_scienceqa_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="problems.json does not exist"):
        read_benchmark("scienceqa", tmp_path)
    (tmp_path / "problems.json").write_text('{"5": {"question": ')
    with pytest.raises(DataError, match="problems.json: not valid JSON"):
        read_benchmark("scienceqa", tmp_path)
    (tmp_path / "problems.json").write_text(json.dumps({"5": {"question": "q", "choices": ["a"], "answer": 0,
                                                               "image": "image.png", "split": "test"}}))  # fmt: skip
    with pytest.raises(DataError, match="image of ScienceQA problem 5"):
        read_benchmark("scienceqa", tmp_path)


# -- Clotho-AQA -----------------------------------------------------------------------------------------------------


def _write_clotho(root: Path):
    import soundfile as sf

    (root / "audio_files").mkdir(parents=True)
    for name in ("rain.wav", "dog.wav"):
        sf.write(root / "audio_files" / name, np.zeros(1600, dtype=np.float32), 16000)
    rows = [
        ("rain.wav", "Is it raining?", "yes", "yes"),
        ("rain.wav", "Is it raining?", "Yes", "maybe"),
        ("rain.wav", "Is it raining?", "no", "yes"),
        ("dog.wav", "What animal is heard?", "dog", "yes"),
        ("dog.wav", "What animal is heard?", "cat", "no"),
        ("dog.wav", "What animal is heard?", "dog", "yes"),
    ]
    lines = ["file_name,QuestionText,answer,confidence"] + [",".join(r) for r in rows]
    (root / "clotho_aqa_test.csv").write_text("\n".join(lines) + "\n")


def test_clotho_aqa(tmp_path):
    from unimoe.encoders.audio import AudioEncoder, AudioEncoderConfig

    _write_clotho(tmp_path)
    records = read_benchmark("clotho_aqa", tmp_path, "test")
    _check_common(records, "audio")
    assert len(records) == 2
    rain, dog = records
    assert rain["answer"] == "yes" and rain["meta"]["answers"] == ["yes", "yes", "no"]
    assert rain["meta"]["answer_type"] == "yes_no" and _text(rain) == "Is it raining? Answer yes or no."
    assert dog["answer"] == "dog" and _text(dog) == "What animal is heard? Answer with a single word."
    assert AudioEncoder.load(_media(dog)["path"], AudioEncoderConfig()).shape[0] == 1600
    assert [r["answer"] for r in read_benchmark("clotho_aqa", tmp_path, "test", answer_type="yes_no")] == ["yes"]
    assert len(read_benchmark("clotho_aqa", tmp_path / "clotho_aqa_test.csv", limit=1)) == 1


def test_clotho_aqa_missing_audio(tmp_path):
    _write_clotho(tmp_path)
    (tmp_path / "audio_files" / "dog.wav").unlink()
    with pytest.raises(DataError, match="dog.wav does not exist"):
        read_benchmark("clotho_aqa", tmp_path, "test")
    with pytest.raises(DataError, match="clotho_aqa_val.csv does not exist"):
        read_benchmark("clotho_aqa", tmp_path, "val")


# -- ModelNet40 -----------------------------------------------------------------------------------------------------


def test_modelnet40(tmp_path):
    import trimesh

    from unimoe.encoders.points import PointCloudEncoder, PointCloudEncoderConfig

    for name, mesh in [("chair", trimesh.creation.box()), ("night_stand", trimesh.creation.icosphere(subdivisions=1))]:
        for split in ("train", "test"):
            (tmp_path / name / split).mkdir(parents=True)
        mesh.export(tmp_path / name / "test" / f"{name}_0001.off")
    np.save(tmp_path / "chair" / "test" / "chair_0002.npy", np.random.default_rng(0).random((64, 3), dtype=np.float32))
    records = read_benchmark("modelnet40", tmp_path, "test")
    _check_common(records, "points")
    # round-robin over classes: chair_0001, night_stand_0001, chair_0002
    assert [r["meta"]["class"] for r in records] == ["chair", "night_stand", "chair"]
    assert records[1]["answer"] == "night stand" and records[1]["choices"] == ["chair", "night stand"]
    assert _text(records[0]) == "What object is this?"
    config = PointCloudEncoderConfig(num_points=128, num_groups=8, group_size=8)
    assert PointCloudEncoder.load(_media(records[1])["path"], config).shape == (128, 3)
    assert PointCloudEncoder.load(_media(records[2])["path"], config).shape == (64, 3)
    with pytest.raises(DataError, match=r"no <class>/train/\*.off"):
        read_benchmark("modelnet40", tmp_path, "train")


# -- LibriSpeech ----------------------------------------------------------------------------------------------------


def test_librispeech(tmp_path):
    import soundfile as sf

    from unimoe.encoders.audio import AudioEncoder, AudioEncoderConfig

    chapter = tmp_path / "test-clean" / "1089" / "134686"
    chapter.mkdir(parents=True)
    for utt in ("0000", "0001"):
        sf.write(chapter / f"1089-134686-{utt}.flac", np.zeros(800, dtype=np.float32), 16000, format="FLAC")
    (chapter / "1089-134686.trans.txt").write_text(
        "1089-134686-0000 HE HOPED THERE\n1089-134686-0001 STUFF IT INTO YOU\n"
    )
    records = read_benchmark("librispeech", tmp_path, "test-clean")
    _check_common(records, "audio")
    assert [r["id"] for r in records] == [
        "librispeech/test-clean/1089-134686-0000",
        "librispeech/test-clean/1089-134686-0001",
    ]
    assert records[0]["answer"] == "HE HOPED THERE" and _text(records[0]) == "Transcribe the audio."
    assert records[1]["meta"] == {"utterance": "1089-134686-0001", "speaker": "1089", "chapter": "134686"}
    assert AudioEncoder.load(_media(records[0])["path"], AudioEncoderConfig()).shape[0] == 800
    assert METRICS["wer"].fn(["he hoped", "stuff it into you"], [r["answer"] for r in records], records) == 1 / 7
    assert len(read_benchmark("librispeech", tmp_path / "test-clean", limit=1)) == 1
    (chapter / "1089-134686-0001.flac").unlink()
    with pytest.raises(DataError, match=r"1089-134686-0001.flac does not exist \(listed in 1089-134686.trans.txt\)"):
        read_benchmark("librispeech", tmp_path, "test-clean")


# -- ETT ------------------------------------------------------------------------------------------------------------


def _write_etth(path: Path, rows=14400):
    import pandas as pd

    t = np.arange(rows)
    frame = pd.DataFrame({"date": pd.date_range("2016-07-01", periods=rows, freq="h").strftime("%Y-%m-%d %H:%M:%S")})
    for i, name in enumerate(["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL"]):
        frame[name] = np.sin(t / (5 + i))
    frame["OT"] = t % 24  # a daily saw-tooth: the seasonal-naive error is 0 within a day pattern
    frame["OT"] = frame["OT"] + t * 0.001
    frame.to_csv(path, index=False)
    return frame


def test_ett_borders():
    assert ett_borders("h", 96) == {"train": (0, 8640), "val": (8544, 11520), "test": (11424, 14400)}
    assert ett_borders("15min", 96)["test"] == (4 * 11520 - 96, 4 * 14400)


def test_ett(tmp_path):
    from unimoe.encoders.series import TimeSeriesEncoder, TimeSeriesEncoderConfig

    frame = _write_etth(tmp_path / "ETTh1.csv")
    records = read_benchmark("ett", tmp_path / "ETTh1.csv", "test", limit=3, stride=10, normalize=False)
    _check_common(records, "series")
    assert [r["meta"]["start"] for r in records] == [11424, 11434, 11444]
    first = records[0]
    context = TimeSeriesEncoder.load(_media(first)["path"], TimeSeriesEncoderConfig())
    assert context.shape == (96, 1)
    np.testing.assert_allclose(context[:, 0], frame["OT"].to_numpy()[11424:11520], rtol=1e-6)
    np.testing.assert_allclose(first["target"], frame["OT"].to_numpy()[11520:11544])
    assert first["meta"]["season"] == 24 and first["meta"]["target_channel"] == 0
    assert _text(first) == "Forecast the next 24 values of OT (hourly data)."
    assert first["answer"].split(", ")[0] == f"{frame['OT'][11520]:.4f}"
    # the seasonal-naive forecast (repeat the last day) has MASE 1 here: every error and every in-sample
    # seasonal difference is 24 * 0.001
    naive = list(context[-24:, 0])
    assert METRICS["mase"].per_item(naive, first["target"], first) == pytest.approx(1.0, rel=1e-3)
    # the number of test windows of the standard protocol
    assert len(read_benchmark("ett", tmp_path, "test", horizon=24, cache_dir=tmp_path / "c")) == 2880 - 24 + 1


def test_ett_features_and_normalization(tmp_path):
    frame = _write_etth(tmp_path / "ETTh1.csv")
    records = read_benchmark("ett", tmp_path / "ETTh1.csv", "val", limit=1, features="M", horizon=4)
    record = records[0]
    assert np.load(_media(record)["path"]).shape == (96, 7)
    assert np.asarray(record["target"]).shape == (4, 7) and record["meta"]["target_channel"] == 6
    train = frame["OT"].to_numpy()[:8640]
    expected = (frame["OT"].to_numpy()[8640:8644] - train.mean()) / train.std()
    np.testing.assert_allclose(np.asarray(record["target"])[:, 6], expected)
    assert record["meta"]["scaler"]["mean"][6] == pytest.approx(train.mean())


def test_ett_bad_inputs(tmp_path):
    _write_etth(tmp_path / "ETTh1.csv", rows=100)
    short = (
        r"ETTh1.csv: 100 rows, but the standard train/val/test split of hourly \(ETTh\) ETT data needs at least 14400 "
    )
    with pytest.raises(DataError, match=short):
        read_benchmark("ett", tmp_path / "ETTh1.csv")
    (tmp_path / "ETTh2.csv").write_text("date,OT\n2016-07-01 00:00:00,1\n")
    with pytest.raises(DataError, match=r"ETTh2.csv: missing column\(s\) HUFL"):
        read_benchmark("ett", tmp_path / "ETTh2.csv")
