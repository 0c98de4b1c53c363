import json

import pytest
import yaml

from unimoe.errors import CheckpointError, ConfigError
from unimoe.train import load_recipe, run_recipe

RECIPE = {
    "description": "two stages, a few steps",
    "model": {"preset": "tiny", "overrides": {"moe": {"num_experts": 2}}},
    "data": {"tasks": ["text_qa", "digits_cls"], "weights": {"text_qa": 3, "digits_cls": 1}, "balance": "task"},
    "stages": [
        {"stage": "align", "overrides": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "forced_expert": 0}},
        {"stage": "tune", "overrides": {"steps": 2, "batch_size": 4, "data": {"balance": "record"}}},
    ],
    "eval": {"tasks": "text_qa,digits_cls", "limit": 4, "batch_size": 4},
}


def _write(tmp_path, recipe):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipe_runs_every_step_and_applies_recipe_wide_sampling(tmp_path, train_data):
    run = run_recipe(load_recipe(_write(tmp_path, RECIPE)), tmp_path / "run", data_root=train_data, progress=False)
    out = tmp_path / "run"
    assert [s["name"] for s in run["stages"]] == ["align", "tune"]
    assert set(run["results"]) == {"text_qa", "digits_cls"}
    assert (out / "final" / "config.json").is_file() and (out / "eval" / "results.json").is_file()
    card = (out / "final" / "README.md").read_text()
    assert "text_qa" in card and "| align | 2 |" in card
    # the evaluation's pictures travel with the checkpoint and its card shows them
    assert "![expert_load](images/expert_load.png)" in card
    picture = (out / "eval" / "expert_load.png").read_bytes()
    assert (out / "final" / "images" / "expert_load.png").read_bytes() == picture
    align = json.loads((out / "1-align" / "stage.json").read_text())["stage"]["data"]
    tune = json.loads((out / "2-tune" / "stage.json").read_text())["stage"]["data"]
    assert align["balance"] == "task" and align["weights"] == {"text_qa": 3, "digits_cls": 1}
    assert align["tasks"] == ["text_qa", "digits_cls"]
    assert tune["balance"] == "record"  # the stage's own override wins over the recipe's

    # killed after tune wrote result.json but before its final/ (result.json now comes first): resumable
    import shutil

    shutil.rmtree(out / "2-tune" / "final")
    shutil.rmtree(out / "final")  # the kill came before these were written
    (out / "run.json").unlink()
    (out / ".final.tmp-999999").mkdir()  # a half-written save of a killed process
    again = run_recipe(load_recipe(_write(tmp_path, RECIPE)), out, data_root=train_data, resume=True, progress=False)
    assert again["results"] == run["results"] and (out / "2-tune" / "final" / "config.json").is_file()
    assert not list(out.glob(".final.tmp-*"))  # stale temporaries are cleared by the next save
    # run.json's timings cover the whole run, not only the last process: align ran only in the first one
    assert set(run["timings_s"]) == {"data", "init", "align", "tune", "eval", "final", "total"}
    assert again["timings_s"]["align"] == run["timings_s"]["align"] > 0
    assert again["timings_s"]["tune"] > run["timings_s"]["tune"]  # tune was trained twice
    assert again["timings_s"]["total"] == pytest.approx(sum(v for k, v in again["timings_s"].items() if k != "total"))
    # continuing with another recipe (or other overrides) is refused
    other = {**RECIPE, "stages": [RECIPE["stages"][0], {**RECIPE["stages"][1], "overrides": {"steps": 3}}]}
    with pytest.raises(CheckpointError, match="another recipe or other overrides.*stages"):
        run_recipe(load_recipe(_write(tmp_path, other)), out, data_root=train_data, resume=True, progress=False)


def test_recipe_data_section_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="unknown field.*'balanse'"):
        load_recipe(_write(tmp_path, {**RECIPE, "data": {**RECIPE["data"], "balanse": "task"}}))
    with pytest.raises(ConfigError, match="data.balance"):
        load_recipe(_write(tmp_path, {**RECIPE, "data": {**RECIPE["data"], "balance": "modalities"}}))
    with pytest.raises(ConfigError, match="data.weights"):
        load_recipe(_write(tmp_path, {**RECIPE, "data": {**RECIPE["data"], "weights": {"video_motion": 2}}}))
    with pytest.raises(ConfigError, match=r"data.weights.text_qa: must be a positive number, got -1"):
        load_recipe(_write(tmp_path, {**RECIPE, "data": {**RECIPE["data"], "weights": {"text_qa": -1}}}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"warmup_steps": -3}, "warmup_steps must be >= 0"),
        ({"max_grad_norm": -1}, "max_grad_norm must be >= 0"),
        ({"log_every": 0}, "log_every must be >= 1"),
        ({"min_lr_ratio": 2}, r"min_lr_ratio must be in \[0, 1\]"),
        ({"forced_expert": -1}, "forced_expert must be an expert id >= 0"),
        ({"forced_expert": [0, 0]}, r"forced_expert must be an expert id >= 0 or a list of distinct ones, got \[0"),
        ({"init_experts_from": []}, "init_experts_from must be an expert id >= 0 or a list"),
        ({"distributed": "deepspeed"}, "distributed 'deepspeed'; choose ddp or fsdp"),
    ],
)
def test_impossible_stage_numbers_fail_at_load(overrides, message):
    from unimoe.train.config import load_stage

    with pytest.raises(ConfigError, match=f"stage align: {message}"):
        load_stage("align", overrides)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"tasks": "bogus"}, r"recipe small: eval.tasks: unknown task or suite 'bogus'"),
        ({"tasks": "text_qa", "limt": 3}, r"recipe small: eval: unknown key\(s\) \['limt'\]"),
        ({"tasks": "text_qa", "batch_size": 0}, r"recipe small: eval.batch_size: must be a positive integer, got 0"),
        ({"tasks": "text_qa", "device": "gpu0"}, r"recipe small: eval.device: 'gpu0' is not a device"),
    ],
)
def test_recipe_eval_section_is_validated_at_load(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(_write(tmp_path, {**RECIPE, "eval": section}))


def test_recipe_model_section_is_validated_before_anything_runs(tmp_path):
    bad = {**RECIPE, "model": {"preset": "tiny", "overrides": {"moe": {"num_experts": 2, "top_k": 3}}}}
    with pytest.raises(ConfigError, match=r"recipe small: model: moe.top_k: top_k=3 must be between 1 and"):
        load_recipe(_write(tmp_path, bad))
    with pytest.raises(ConfigError, match="recipe small: model: expected"):
        load_recipe(_write(tmp_path, {**RECIPE, "model": {"preset": "tiny", "checkpoint": "x"}}))
    with pytest.raises(ConfigError, match="recipe small: model: unknown model preset 'nope'"):
        load_recipe(_write(tmp_path, {**RECIPE, "model": {"preset": "nope"}}))


def test_recipe_refuses_data_built_with_another_seed(tmp_path, train_data):
    """A recipe with another seed must not replace the test splits that other runs in the same data directory used."""
    from unimoe.data.build import DataError

    marker = (train_data / "text_qa" / ".complete.json").read_text()
    with pytest.raises(DataError, match=r"text_qa: built with seed 0, but the recipe's seed is 1.*--data"):
        run_recipe(load_recipe(_write(tmp_path, {**RECIPE, "seed": 1})), tmp_path / "run", data_root=train_data,
                   progress=False)  # fmt: skip
    assert (train_data / "text_qa" / ".complete.json").read_text() == marker  # untouched
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_recipe_seed_seeds_every_stage_unless_a_stage_sets_its_own():
    stages = [RECIPE["stages"][0], {"stage": "tune", "overrides": {"steps": 2, "seed": 7}}]
    recipe = load_recipe("tiny", {"seed": 3, "stages": stages})
    assert [s.seed for s in recipe.stage_configs()] == [3, 7]
    assert {s.seed for s in load_recipe("tiny").stage_configs()} == {0}


def test_stage_settings_can_be_overridden_from_the_command_line():
    recipe = load_recipe("tiny", {"stages.*.save_every": 50, "stages.tune.lr": 1e-4, "stages.2.batch_size": 8})
    got = [(c.name, c.lr, c.batch_size, c.save_every) for c in recipe.stage_configs()]
    assert got == [("align", 2e-3, 32, 50), ("specialize", 1e-3, 8, 50), ("tune", 1e-4, 32, 50)]  # 2 = 2-specialize
    for name in ("nope", "0", "4"):
        with pytest.raises(ConfigError, match=rf"stages.{name}.steps: no stage '{name}'; stages: 1 align, 2 spec"):
            load_recipe("tiny", {f"stages.{name}.steps": 5})
    with pytest.raises(ConfigError, match="either a whole `stages` list or"):
        load_recipe("tiny", {"stages": [{"stage": "align"}], "stages.*.steps": 9})


def test_unimoe_run_from_the_command_line_and_again_when_finished(tmp_path, train_data, capsys):
    """The CLI path prints the results table and the timings (the Python tests call run_recipe quietly)."""
    from unimoe.cli import main

    recipe = {**RECIPE, "stages": RECIPE["stages"][:1]}
    args = ["run", str(_write(tmp_path, recipe)), "--out", str(tmp_path / "run"), "--data", str(train_data)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| text_qa | accuracy |" in out and "final checkpoint:" in out
    results = (tmp_path / "run" / "eval" / "results.json").stat().st_mtime_ns
    assert main(args) == 0  # finished: nothing is evaluated or saved again
    assert "is a finished run" in capsys.readouterr().out
    assert (tmp_path / "run" / "eval" / "results.json").stat().st_mtime_ns == results
