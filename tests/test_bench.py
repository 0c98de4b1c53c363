"""bench/seeds.py: the multi-seed comparison of the MoE and dense recipes, checked on hand-made run files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def run(moe: dict, dense: dict, baselines: dict) -> dict:
    wrap = lambda scores: {"results": {t: {m: v} for t, (m, v) in scores.items()}}  # noqa: E731
    return {"tiny": wrap(moe), "dense": wrap(dense), "baselines": wrap(baselines)}


RUNS = [
    run({"digits_cls": ("accuracy", 0.96), "ts_forecast": ("mase", 0.70)},
        {"digits_cls": ("accuracy", 0.97), "ts_forecast": ("mase", 0.90)},
        {"digits_cls": ("accuracy", 0.95), "ts_forecast": ("ridge/mase", 0.65)}),
    run({"digits_cls": ("accuracy", 0.94), "ts_forecast": ("mase", 0.60)},
        {"digits_cls": ("accuracy", 0.94), "ts_forecast": ("mase", 1.20)},
        {"digits_cls": ("accuracy", 0.96), "ts_forecast": ("ridge/mase", 0.65)}),
]  # fmt: skip


def test_compare_counts_wins_means_and_verdicts_per_seed():
    from seeds import compare

    report = compare(RUNS)
    digits, forecast = report["tasks"]["digits_cls"], report["tasks"]["ts_forecast"]
    assert digits["moe_mean"] == pytest.approx(0.95) and digits["dense_mean"] == pytest.approx(0.955)
    assert (digits["moe_wins"], digits["ties"]) == (0, 1)
    assert forecast["moe_wins"] == 2 and not forecast["higher_is_better"]  # lower MASE wins
    assert [s["baseline"] for s in digits["seeds"]] == [0.95, 0.96]
    # suite average: accuracy as is, MASE as 1 - min(MASE, 1): seed 1 MoE (0.96 + 0.30) / 2, dense (0.97 + 0.10) / 2
    assert report["suite"][0]["moe"] == pytest.approx(0.63) and report["suite"][0]["dense"] == pytest.approx(0.535)
    assert report["suite"][1]["dense"] == pytest.approx(0.47)  # MASE 1.2 counts as 0
    assert report["suite_moe_wins"] == 2
    assert report["per_seed"][0] == {"targets_missed": [], "baselines_not_beaten": ["ts_forecast"]}
    assert report["per_seed"][1] == {"targets_missed": ["digits_cls"], "baselines_not_beaten": ["digits_cls"]}


def test_cli_prints_the_table_and_writes_json(tmp_path):
    paths = []
    for i, data in enumerate(RUNS):
        paths.append(tmp_path / f"seed{i}.json")
        paths[-1].write_text(json.dumps(data))
    out = tmp_path / "seeds.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "seeds.py"), *map(str, paths), "--labels", "0,1",
                           "--json", str(out)], capture_output=True, text=True, check=True)  # fmt: skip
    assert "ts_forecast" in proc.stdout and "2/2" in proc.stdout
    assert "seed 1: targets missed ['digits_cls']" in proc.stdout
    assert json.loads(out.read_text())["labels"] == ["0", "1"]
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "seeds.py"), str(paths[0]), "--labels", "0,1"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "--labels: 2 names for 1 runs" in bad.stderr


def test_forecast_refit_bench_scores_a_checkpoint_before_and_after_without_changing_it(tmp_path):
    """bench/forecast_refit.py on a random tiny checkpoint and a small build of the real forecasting splits: per-series
    test MASE before and after the refit beside the ridge baseline, the refit's choice, and the files on disk left
    as they were."""
    import hashlib

    import forecast_refit

    from unimoe.data.tasks_points_series import build_forecast
    from unimoe.inference import init_checkpoint

    build_forecast(tmp_path / "data" / "ts_forecast", 0, stride_scale=12)
    ckpt = init_checkpoint("tiny", tmp_path / "ckpt", seed=0)
    digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(ckpt).iterdir() if p.is_file()}  # noqa: E731
    before = digest()
    out = tmp_path / "refit.json"
    assert forecast_refit.main([str(ckpt), "--data", str(tmp_path / "data"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    series = {"co2", "cpi", "elnino", "realgdp", "sunspots", "tbilrate", "unemp"}
    assert set(report["baseline"]) == series | {"all"} and 0 < report["baseline"]["all"] < 2
    (run,) = report["runs"]
    assert set(run["before"]) == set(run["after"]) == series | {"all"}
    refit = run["refit"]
    assert refit["gate"] in ("trained", "series") and refit["validation_mase_after"] < refit["validation_mase_before"]
    assert run["after"]["all"] != run["before"]["all"]
    assert digest() == before


@pytest.mark.parametrize("recipe", ["dense", "tiny"])
def test_modality_group_recipes_scale_steps_by_the_groups_share_and_validate(tmp_path, recipe):
    import yaml
    from modality_groups import GROUPS, group_recipe

    from unimoe.train.config import load_recipe

    base = yaml.safe_load((ROOT / "configs" / "recipes" / f"{recipe}.yaml").read_text())
    weights = base["data"]["weights"]
    image, share = group_recipe(base, GROUPS["image"])
    assert share == pytest.approx(sum(weights[t] for t in GROUPS["image"]) / sum(weights.values()))
    assert image["data"]["tasks"] == GROUPS["image"] and set(image["data"]["weights"]) == set(GROUPS["image"])
    assert image["eval"]["tasks"] == GROUPS["image"]
    for stage, full in zip(image["stages"], base["stages"]):
        assert stage["overrides"]["steps"] == round(full["overrides"]["steps"] * share)
    assert image["data"]["augment"] == {}  # the series augmentation names only ts_classify
    assert all("forecast_refit" not in s["overrides"] for s in image["stages"])
    series, _ = group_recipe(base, GROUPS["series"])
    assert series["data"]["augment"] == base["data"]["augment"]
    assert any("forecast_refit" in s["overrides"] for s in series["stages"])
    assert base["data"]["tasks"] != image["data"]["tasks"]  # the base recipe is left as it was
    for name, data in (("image", image), ("series", series)):  # the code accepts them
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        assert load_recipe(path).data["tasks"] == data["data"]["tasks"]
    full, _ = group_recipe(base, GROUPS["image"], budget="full")  # every optimizer step of the mixed run
    assert [s["overrides"]["steps"] for s in full["stages"]] == [s["overrides"]["steps"] for s in base["stages"]]
    with pytest.raises(SystemExit, match="does not train"):
        group_recipe(base, ["no_such_task"])


def test_modality_groups_combine_reports_per_seed_gains(tmp_path, capsys):
    from modality_groups import main as groups_main

    paths = []
    for seed, (vqa, asr) in enumerate([(0.02, -0.01), (-0.04, 0.03)]):
        report = {"seed": seed, "groups": {"image": {"gain_alone": {"vqa_easy": vqa}},
                                           "audio": {"gain_alone": {"speech_asr": asr}}}}  # fmt: skip
        paths.append(tmp_path / f"seed{seed}.json")
        paths[-1].write_text(json.dumps(report))
    out = tmp_path / "all.json"
    assert groups_main(["--combine", *map(str, paths), "--json", str(out)]) == 0
    tasks = json.loads(out.read_text())["tasks"]
    assert tasks["vqa_easy"]["mean"] == pytest.approx(-0.01) and tasks["vqa_easy"]["alone_better"] == 1
    assert tasks["speech_asr"]["gains"] == [-0.01, 0.03] and tasks["speech_asr"]["group"] == "audio"
    assert "+0.020 -0.040" in capsys.readouterr().out
