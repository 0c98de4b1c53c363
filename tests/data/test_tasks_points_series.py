"""shapes3d / ts_classify / ts_forecast builders (small variants) and bench/baselines.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unimoe.data import tasks_points_series as tps
from unimoe.data.build import list_tasks
from unimoe.data.records import read_split
from unimoe.encoders.points import PointCloudEncoder, PointCloudEncoderConfig
from unimoe.encoders.series import TimeSeriesEncoder, TimeSeriesEncoderConfig

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "validation", "test")
POINTS = PointCloudEncoderConfig(num_points=512, num_groups=32, group_size=16, dim=32, depth=1, num_heads=2)
SERIES = TimeSeriesEncoderConfig(context_length=128, patch_size=16, num_channels=6, dim=32, depth=1, num_heads=2)


def small_shapes(out: Path, seed: int = 0):
    return tps.build_shapes(out, seed, n_train=24, n_validation=6, n_test=12)


def small_classify(out: Path, seed: int = 0):
    return tps.build_classify(out, seed, limit=4)


def small_forecast(out: Path, seed: int = 0):
    return tps.build_forecast(out, seed, stride_scale=6)


SMALL = {"shapes3d": small_shapes, "ts_classify": small_classify, "ts_forecast": small_forecast}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("suite")
    for name, build in SMALL.items():
        (root / name).mkdir()
        card = build(root / name)
        assert card.name == name and set(card.sizes) == set(SPLITS)
    return root


def _media(record: dict) -> str:
    parts = [p for p in record["messages"][0]["content"] if p["type"] != "text"]
    assert len(parts) == 1
    return parts[0]["path"]


def _check_records(task_dir: Path, kind: str) -> dict[str, list[dict]]:
    splits = {}
    for split in SPLITS:
        raw = [json.loads(line) for line in (task_dir / f"{split}.jsonl").read_text().splitlines()]
        assert raw, split
        for record in raw:
            part = record["messages"][0]["content"][0]
            assert part["type"] == kind and part["path"].startswith("media/") and (task_dir / part["path"]).is_file()
            assert record["messages"][-1] == {"role": "assistant", "content": record["answer"]}
            assert record["id"].startswith(f"{task_dir.name}/{split}/")
        splits[split] = read_split(task_dir, split)
    return splits


def test_registered():
    assert {"shapes3d", "ts_classify", "ts_forecast"} <= set(list_tasks())


def test_shapes3d_records_load_and_split_by_mesh_seed(suite):
    splits = _check_records(suite / "shapes3d", "points")
    for records in splits.values():
        answers = [r["answer"] for r in records]
        assert set(answers) <= set(tps.SHAPES) and all(r["choices"] == list(tps.SHAPES) for r in records)
        assert max(answers.count(s) for s in tps.SHAPES) - min(answers.count(s) for s in tps.SHAPES) <= 1
        for r in records[:3]:
            points = PointCloudEncoder.load(_media(r), POINTS)
            assert points.shape == (tps.NUM_POINTS, 3) and points.dtype == np.float32
            assert PointCloudEncoder.preprocess(points, POINTS)["values"].shape == (1, 512, 3)
    seeds = {split: {r["meta"]["mesh_seed"] for r in records} for split, records in splits.items()}
    assert sum(map(len, seeds.values())) == sum(map(len, splits.values()))  # every item its own mesh
    assert not seeds["test"] & (seeds["train"] | seeds["validation"]) and not seeds["train"] & seeds["validation"]
    # the media is a pure function of (shape, mesh seed)
    r = splits["test"][0]
    expected, _ = tps.sample_shape(r["answer"], r["meta"]["mesh_seed"])
    np.testing.assert_array_equal(np.load(_media(r)), expected)


def test_shapes_are_distinct_geometry():
    torus, _ = tps.sample_shape("torus", 1)
    sphere, _ = tps.sample_shape("sphere", 1)
    center = lambda p: np.linalg.norm(p - p.mean(0), axis=1)  # noqa: E731
    assert center(torus).min() > 0.1 * center(torus).max()  # a hole in the middle
    assert center(sphere).std() < 0.1 * center(sphere).mean()


def test_ts_classify_records_load_and_use_archive_splits(suite):
    splits = _check_records(suite / "ts_classify", "series")
    datasets = {s.name: s for s in tps.CLASSIFY_SETS}
    hashes = {}
    for split, records in splits.items():
        assert {r["meta"]["dataset"] for r in records} == set(datasets)
        for r in records:
            spec = datasets[r["meta"]["dataset"]]
            assert r["answer"] in r["choices"] == list(dict.fromkeys(spec.labels.values()))
            assert r["meta"]["source_split"] == ("test" if split == "test" else "train")
            assert r["messages"][0]["content"][1]["text"].startswith(spec.name)
            series = TimeSeriesEncoder.load(_media(r), SERIES)
            channels = 6 if spec.name == "BasicMotions" else 1
            assert series.shape == (min(r["meta"]["length"], tps.MAX_SERIES_LENGTH), channels)
            assert TimeSeriesEncoder.preprocess(series, SERIES)["values"].shape == (1, 128, 6)
        hashes[split] = {hashlib.sha1(np.load(_media(r)).tobytes()).hexdigest() for r in records}
        sources = {(r["meta"]["dataset"], r["meta"]["source_split"], r["meta"]["index"]) for r in records}
        assert len(sources) == len(records)
    assert not hashes["test"] & (hashes["train"] | hashes["validation"])  # no test series in training
    assert not hashes["train"] & hashes["validation"]


def test_ts_classify_full_sizes_and_labels():
    data = tps.load_classify_set(tps.CLASSIFY_SETS[2])
    assert data["train"][0].shape == (40, 100, 6)  # BasicMotions (n, L, C)
    for spec in tps.CLASSIFY_SETS:
        data = tps.load_classify_set(spec)
        assert set(data["train"][1].tolist()) == set(data["test"][1].tolist()) == set(spec.labels)


def test_ts_forecast_records_and_time_split(suite):
    task_dir = suite / "ts_forecast"
    splits = _check_records(task_dir, "series")
    specs = {s.name: s for s in tps.FORECAST_SERIES}
    values = {name: tps.load_forecast_series(name) for name in specs}
    for split, records in splits.items():
        assert {r["meta"]["series"] for r in records} == set(specs)
        for r in records:
            meta, spec = r["meta"], specs[r["meta"]["series"]]
            series = values[meta["series"]]
            a, b = tps.cutoffs(len(series))
            start, origin, h = meta["start"], meta["origin"], meta["horizon"]
            assert h == spec.horizon == len(r["target"]) and meta["season"] == spec.season
            context = TimeSeriesEncoder.load(_media(r), SERIES)
            assert context.shape == (origin - start, 1) and origin - start <= tps.CONTEXT_LENGTH
            np.testing.assert_allclose(context[:, 0], series[start:origin], rtol=1e-6)
            np.testing.assert_allclose(r["target"], series[origin : origin + h], atol=1e-4)
            np.testing.assert_allclose([float(v) for v in r["answer"].split()], r["target"], atol=0.006)
            assert f"next {h} values" in r["messages"][0]["content"][1]["text"]
            if split == "train":
                assert origin + h <= a  # context and target before the 70% cutoff
            elif split == "validation":
                assert a <= origin and origin + h <= b
            else:
                assert origin >= b  # test targets after the 80% cutoff
        assert not np.isnan(np.concatenate([np.load(_media(r)) for r in records])).any()


@pytest.mark.parametrize("spec", tps.FORECAST_SERIES, ids=lambda s: s.name)
def test_forecast_window_rule_full_build(spec):
    """At full size, no test target index is in any train context or target, per series."""
    length = len(tps.load_forecast_series(spec.name))
    windows = tps.forecast_windows(spec, length)
    train_idx = {i for start, origin in windows["train"] for i in range(start, origin + spec.horizon)}
    test_targets = {i for _, origin in windows["test"] for i in range(origin, origin + spec.horizon)}
    assert windows["test"] and windows["train"] and not train_idx & test_targets
    assert max(test_targets) == length - 1 and all(0 <= s < o for s, o in windows["train"] + windows["test"])


@pytest.mark.parametrize("name", list(SMALL))
def test_deterministic(tmp_path, name):
    def digest(out: Path) -> str:
        h = hashlib.sha256()
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(out)).encode() + path.read_bytes())
        return h.hexdigest()

    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((first, 0), (second, 0), (other, 1)):
        out.mkdir()
        SMALL[name](out, seed)
    assert digest(first) == digest(second)
    assert digest(first) != digest(other)  # the seed matters (order / carve / meshes)


def _load_baselines():
    spec = importlib.util.spec_from_file_location("bench_baselines", ROOT / "bench" / "baselines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_baselines_script_on_tiny_suite(suite, tmp_path):
    out = tmp_path / "baselines.json"
    cmd = [sys.executable, str(ROOT / "bench" / "baselines.py"), "--data", str(suite), "--json", str(out),
           "--tasks", "shapes3d", "ts_classify", "ts_forecast", "digits_cls"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads(out.read_text())
    assert set(report) == {"results", "skipped", "errors", "seconds"}
    assert set(report["results"]) == {"shapes3d", "ts_classify", "ts_forecast"} and not report["errors"]
    assert "digits_cls" in report["skipped"]
    results = report["results"]
    assert 0 <= results["shapes3d"]["accuracy"] <= 1
    assert {"accuracy", "accuracy_1nn", "accuracy/GunPoint", "accuracy/BasicMotions"} <= set(results["ts_classify"])
    for method in ("seasonal_naive", "ridge"):
        for metric in ("mse", "mae", "mase", "mase/co2"):
            assert np.isfinite(results["ts_forecast"][f"{method}/{metric}"])
    assert "ts_forecast" in proc.stdout


def test_mase_of_in_sample_seasonal_naive_is_one():
    bl = _load_baselines()
    context = tps.load_forecast_series("co2")[:300]
    m = 52
    assert bl.mase(context[:-m], context[m:], context, m) == pytest.approx(1.0)
    assert bl.seasonal_naive(np.arange(10.0), 5, 4).tolist() == [6, 7, 8, 9, 6]
    assert bl.wer(["a b c d"], ["a x c"]) == pytest.approx(0.5)
    metrics = pytest.importorskip("unimoe.eval.metrics")
    if hasattr(metrics, "seasonal_naive_scale"):
        assert bl.mase_scale(context, m) == pytest.approx(metrics.seasonal_naive_scale(context[:, None], m))


def test_other_baselines_on_fixtures(tmp_path):
    """digits_cls / vqa_easy / text_qa / speech_words / speech_asr / video_motion on tiny hand-made task dirs in
    the records format (the real builders live in other modules)."""
    import soundfile
    from PIL import Image

    bl = _load_baselines()
    rng = np.random.default_rng(0)

    def write(task: str, make_item, n: int = 12):
        task_dir = tmp_path / task
        (task_dir / "media").mkdir(parents=True)
        for split in ("train", "test"):
            lines = []
            for i in range(n):
                label = i % 2
                part, text, answer, meta = make_item(task_dir, f"media/{split}_{i}", label)
                content = ([part] if part else []) + [{"type": "text", "text": text}]
                lines.append(json.dumps({"id": f"{task}/{split}/{i}", "answer": answer, "meta": meta,
                                         "messages": [{"role": "user", "content": content},
                                                      {"role": "assistant", "content": answer}]}))  # fmt: skip
            (task_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")

    def image(task_dir, stem, label):
        pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8) + np.uint8(180 * label)
        Image.fromarray(pixels).save(task_dir / f"{stem}.png")
        return {"type": "image", "path": f"{stem}.png"}

    def audio(task_dir, stem, label):
        t = np.arange(8000) / 16000
        soundfile.write(task_dir / f"{stem}.wav", 0.3 * np.sin(2 * np.pi * (300 + 900 * label) * t), 16000)
        return {"type": "audio", "path": f"{stem}.wav"}

    def video(task_dir, stem, label):
        frames = []
        for k in range(6):
            frame = np.zeros((32, 32), np.uint8)
            x = 4 + 3 * k if label else 24 - 3 * k
            frame[12:20, x : x + 6] = 255
            frames.append(Image.fromarray(frame))
        frames[0].save(task_dir / f"{stem}.gif", save_all=True, append_images=frames[1:], duration=100)
        return {"type": "video", "path": f"{stem}.gif"}

    words = ["dark", "bright"]
    write("digits_cls", lambda d, s, y: (image(d, s, y), "What digit is this?", words[y], {}))
    write("vqa_easy", lambda d, s, y: (image(d, s, y), "is it bright?", ["no", "yes"][y], {}))
    write("text_qa", lambda d, s, y: (None, "q", ["one", "two"][y], {"template": ["a", "b"][y]}))
    write("speech_words", lambda d, s, y: (audio(d, s, y), "Which word?", ["low", "high"][y], {}))
    write("speech_asr", lambda d, s, y: (audio(d, s, y), "Transcribe.", ["go left", "stop"][y], {}))
    write("video_motion", lambda d, s, y: (video(d, s, y), "Where?", ["left", "right"][y], {}))
    report = bl.run(tmp_path, ["digits_cls", "vqa_easy", "text_qa", "speech_words", "speech_asr", "video_motion"])
    assert not report["errors"] and not report["skipped"], report
    results = report["results"]
    for task in ("digits_cls", "vqa_easy", "text_qa", "speech_words", "video_motion"):
        assert results[task]["accuracy"] == 1.0, (task, results[task])
    # always "go left" (the first of the tied most common): 0 edits on 6 × "go left", 2 on each of 6 × "stop"
    assert results["speech_asr"]["wer"] == pytest.approx(12 / 18)
