import json

import numpy as np
import pytest

from unimoe.data.build import MARKER
from unimoe.data.records import read_split, write_jsonl
from unimoe.eval import TaskSpec, evaluate
from unimoe.eval.report import _spread, pictures_markdown, task_pictures
from unimoe.eval.runner import TaskResult, run_task


def test_spread_takes_every_group_in_turn():
    assert _spread(["a", "a", "a", "b", "c", "c"], 4) == [0, 3, 4, 1]
    assert _spread(["a", "a"], 5) == [0, 1]
    assert _spread([], 3) == []


def test_generated_media_are_drawn_only_when_there_are_files(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    spec = TaskSpec(name="gen", data="gen", output="generate_image", metrics=["accuracy"])
    samples = [{"id": "a", "prediction": "one", "target": "one", "score": 1.0, "media": str(tmp_path / "x.png")},
               {"id": "b", "prediction": "", "target": "two", "score": 0.0, "media": None}]  # fmt: skip
    result = TaskResult(name="gen", samples=samples)
    assert task_pictures(spec, [{}, {}], result, tmp_path) == ["samples_gen.png"]
    assert (tmp_path / "samples_gen.png").stat().st_size > 1000
    assert task_pictures(spec, [{}], TaskResult(name="gen", samples=samples[1:]), tmp_path) == []


@pytest.fixture(scope="module")
def gen_model(tmp_path_factory):
    """A randomly initialized tiny checkpoint (it has a forecasting head), loaded as users load one."""
    from unimoe.inference import init_checkpoint, load_pretrained

    return load_pretrained(init_checkpoint("tiny", tmp_path_factory.mktemp("gen") / "ckpt", seed=0))


@pytest.fixture(scope="module")
def forecast_root(tmp_path_factory):
    """A forecasting task written by hand: three series of two kinds, 6 steps ahead."""
    root = tmp_path_factory.mktemp("fc")
    task = root / "toy_forecast"
    (task / "media").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i, kind in enumerate(["waves", "waves", "trend"]):
        t = np.arange(70, dtype=np.float32)
        series = np.sin(t / 3) * 5 + 20 if kind == "waves" else t * 0.5 + rng.normal(0, 0.2, 70).astype(np.float32)
        np.save(task / "media" / f"{i}.npy", series[:64])
        target = [round(float(v), 3) for v in series[64:]]
        records.append({
            "id": f"fc/{i}",
            "messages": [{"role": "user", "content": [{"type": "series", "path": f"media/{i}.npy"},
                                                      {"type": "text", "text": "Forecast the next 6 values."}]},
                         {"role": "assistant", "content": " ".join(map(str, target))}],
            "answer": " ".join(map(str, target)),
            "target": target,
            "meta": {"series": kind, "season": 1},
        })  # fmt: skip
    write_jsonl(task / "test.jsonl", records)
    (task / MARKER).write_text(json.dumps({"version": 1, "seed": 0, "card": {"sizes": {"test": 3}}}))
    return root


def test_forecasts_are_plotted_and_listed(gen_model, forecast_root, tmp_path):
    model, processor = gen_model
    spec = TaskSpec(name="toy_fc", data="toy_forecast", output="forecast", metrics=["mase", "mae"])
    summary = evaluate(model, processor, [spec], out_dir=tmp_path, data_root=forecast_root, batch_size=2,
                       progress=False)  # fmt: skip
    assert summary["pictures"] == {"toy_fc": ["forecasts_toy_fc.png"]}
    assert (tmp_path / "forecasts_toy_fc.png").stat().st_size > 5000
    report = (tmp_path / "results.md").read_text()
    assert "![forecasts_toy_fc](forecasts_toy_fc.png)" in report and "![expert_load](expert_load.png)" in report
    assert pictures_markdown(summary, prefix="images/").startswith("![expert_load](images/expert_load.png)")
    # what is plotted is what is scored: the medians are the predictions, cut to each record's horizon
    records = read_split(forecast_root / "toy_forecast", "test")
    result = run_task(model, processor, spec, records, batch_size=3, progress=False)
    assert [f.point.tolist() for f in result.forecasts] == [s["prediction"] for s in result.samples]
    assert all(len(f.point) == 6 and set(f.quantiles) == {0.1, 0.5, 0.9} for f in result.forecasts)


def test_a_failing_picture_costs_no_scores(gen_model, forecast_root, tmp_path, monkeypatch):
    import unimoe.eval.report as report

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(report, "forecast_grid", broken)
    model, processor = gen_model
    spec = TaskSpec(name="toy_fc", data="toy_forecast", output="forecast", metrics=["mase"])
    with pytest.warns(UserWarning, match="eval toy_fc: pictures not drawn .RuntimeError: no display"):
        summary = evaluate(model, processor, [spec], out_dir=tmp_path, data_root=forecast_root, progress=False)
    assert "mase" in json.loads((tmp_path / "results.json").read_text())["results"]["toy_fc"]
    assert summary["pictures"] == {} and not (tmp_path / "forecasts_toy_fc.png").exists()
