import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unimoe.errors import CheckpointError, ConfigError
from unimoe.train import list_recipes, list_stage_presets, load_recipe, load_stage, train_stage
from unimoe.train.freeze import apply_trainable, param_groups, part_of
from unimoe.train.loop import STATE_FILE, latest_checkpoint, router_collapsed, routing_metrics

TASKS = ["text_qa", "digits_cls"]


def small(stage, **kw):
    base = {"steps": 3, "batch_size": 4, "log_every": 1, "warmup_steps": 1, "data": {"tasks": TASKS}}
    return load_stage(stage, {**base, **kw})


def test_every_shipped_stage_and_recipe_validates():
    assert {"align", "specialize", "tune"} <= set(list_stage_presets())
    for name in list_stage_presets():
        load_stage(name)
    assert {"tiny", "dense"} <= set(list_recipes())
    for name in list_recipes():
        recipe = load_recipe(name)
        assert len(recipe.stage_configs()) >= 2


def test_bad_stage_configs_name_the_field():
    with pytest.raises(ConfigError, match="kind"):
        load_stage("align", {"kind": "dance"})
    with pytest.raises(ConfigError, match="unknown part"):
        load_stage("align", {"trainable": {"wings": True}})
    with pytest.raises(ConfigError, match="steps"):
        load_stage("align", {"steps": 0})
    with pytest.raises(ConfigError, match="unknown stage"):
        load_stage("nope")
    with pytest.raises(ConfigError, match="lr_multipliers has unknown part"):
        load_stage("align", {"lr_multipliers": {"wings": 2.0}})
    with pytest.raises(ConfigError, match="lr_multipliers.encoders must be a number > 0"):
        load_stage("align", {"lr_multipliers": {"encoders": 0}})
    with pytest.raises(ConfigError, match="media_text_loss_coef must be >= 0"):
        load_stage("align", {"media_text_loss_coef": -1})
    with pytest.raises(ConfigError, match="media_text_temperature must be > 0"):
        load_stage("align", {"media_text_temperature": 0})
    with pytest.raises(ConfigError, match="media_text_tasks must be a list of task names"):
        load_stage("align", {"media_text_tasks": "digits_cls"})
    with pytest.raises(ConfigError, match=r"stage align.steps: expected an integer, got 2.5"):
        load_stage("align", {"steps": 2.5})
    with pytest.raises(ConfigError, match=r"lora.r: expected an integer, got 'abc'"):
        load_stage("tune", {"lora": {"r": "abc"}})  # validated on load
    assert load_stage("align", {"steps": "7", "lr": "2e-3"}).steps == 7  # key=value strings are converted
    with pytest.raises(ConfigError, match="stage align.steps: expected an integer, got null"):
        load_stage("align", {"steps": None})
    for value in (0, -1e-3, float("nan"), float("inf")):  # lr=inf trained a NaN checkpoint and exited 0
        with pytest.raises(ConfigError, match="stage align: lr must be a finite number > 0"):
            load_stage("align", {"lr": value})
    with pytest.raises(ConfigError, match="weight_decay must be a finite number >= 0"):
        load_stage("align", {"weight_decay": -1})
    for lora, message in [
        ({"r": 0}, "lora.r: the adapter rank"),
        ({"dropout": 2.0}, "lora.dropout: a probability"),
        ({"alpha": -5}, "lora.alpha: must be"),
        ({"target_modules": []}, "lora.target_modules"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_stage("tune", {"lora": lora})
    off = load_stage("tune", {"max_grad_norm": None, "warmup_steps": None, "save_every": None})
    assert (off.max_grad_norm, off.warmup_steps, off.save_every) == (0, 0, 0)  # null means off where 0 does


@pytest.mark.parametrize("stage", ["align", "specialize", "tune"])
def test_every_stage_smoke_runs(stage, init_ckpt, train_data, tmp_path):
    cfg = small(stage, **({"forced_expert": 0, "trainable": {"attention": True, "connectors": True},
                           "media_text_loss_coef": 1.0, "media_text_tasks": ["digits_cls"]}
                          if stage == "align" else {}))  # fmt: skip
    result = train_stage(cfg, init=init_ckpt, out_dir=tmp_path, data_root=train_data, progress=False)
    assert result.steps == 3 and result.checkpoint
    cuda = torch.cuda.is_available()
    assert (result.device, result.precision) == (("cuda:0", "bf16") if cuda else ("cpu", "fp32"))
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert "router/image/load_entropy" in log[-1] and "tokens_per_second" in log[-1]
    assert ("media_text_loss" in log[-1]) == (stage == "align")  # logged where the stage asks for it
    # the final checkpoint is a plain UniMoE checkpoint (peft LoRA merged away)
    weights = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert not any("lora_A." in k or "base_model" in k for k in weights)


def test_fsdp_in_one_process_says_it_trains_unsharded(init_ckpt, train_data, tmp_path, capsys):
    result = train_stage(small("align", steps=1, distributed="fsdp"), init=init_ckpt, out_dir=tmp_path,
                         data_root=train_data, progress=False)  # fmt: skip
    assert result.steps == 1
    assert "distributed=fsdp in one process has nothing to shard" in capsys.readouterr().out


def test_a_stage_can_end_with_the_forecast_skip_refit(init_ckpt, tmp_path):
    """``forecast_refit``: after its last step the stage refits the forecasting head's skip on the task's training
    windows, reports it, and saves the refitted head (its validation forecasts score what the report says)."""
    from unimoe.data.build import MARKER
    from unimoe.data.records import read_split
    from unimoe.data.tasks_points_series import build_forecast
    from unimoe.eval.metrics import score
    from unimoe.inference import load_pretrained

    root = tmp_path / "data"
    card = build_forecast(root / "ts_forecast", 0, stride_scale=6)  # a small build (every 6th window)
    (root / "ts_forecast" / MARKER).write_text(json.dumps({"seed": 0, "card": asdict(card)}))
    refit = {"alphas": ["1e-2", 1.0], "centers": [1.0, 0.0], "with_validation": False}  # scored as saved
    cfg = small("tune", data={"tasks": ["ts_forecast"]}, forecast_refit=refit)
    result = train_stage(cfg, init=init_ckpt, out_dir=tmp_path / "run", data_root=root, progress=False)
    report = result.forecast_refit
    train, val = read_split(root / "ts_forecast", "train"), read_split(root / "ts_forecast", "validation")
    assert report["train_windows"] == len(train) and report["validation_windows"] == len(val)
    assert set(report["candidates"]) == {f"{gate} center={c} alpha={a}" for gate in ("trained", "series")
                                         for c in (1, 0) for a in (0.01, 1)}  # fmt: skip
    assert report["validation_mase_after"] <= report["validation_mase_before"]
    saved = json.loads((tmp_path / "run" / "result.json").read_text())["forecast_refit"]
    assert saved == report
    model, processor = load_pretrained(result.checkpoint)
    predictions = model.forecast(processor, val, batch_size=32)
    mase = score(["mase"], predictions, [r["target"] for r in val], val)["mase"]
    assert mase == pytest.approx(report["validation_mase_after"], rel=1e-3)


def test_forecast_refit_section_is_validated_at_load():
    with pytest.raises(ConfigError, match="forecast_refit.alphas"):
        load_stage("tune", {"forecast_refit": {"alphas": [0.1, -1]}})
    with pytest.raises(ConfigError, match=r"forecast_refit: unknown field\(s\) \['lambda'\]"):
        load_stage("tune", {"forecast_refit": {"lambda": 1.0}})
    with pytest.raises(ConfigError, match="forecast_refit.centers"):
        load_stage("tune", {"forecast_refit": {"centers": [0.5, 2]}})
    with pytest.raises(ConfigError, match="forecast_refit.gates"):
        load_stage("tune", {"forecast_refit": {"gates": ["oracle"]}})
    with pytest.raises(ConfigError, match="forecast_refit.with_validation"):
        load_stage("tune", {"forecast_refit": {"with_validation": "yes"}})


def test_media_text_tasks_must_be_trained_tasks(init_ckpt, train_data, tmp_path):
    cfg = small("align", media_text_loss_coef=1.0, media_text_tasks=["digits_cls", "vqa_easy"])
    with pytest.raises(ConfigError, match=r"media_text_tasks: \['vqa_easy'\] are not in data.tasks"):
        train_stage(cfg, init=init_ckpt, out_dir=tmp_path, data_root=train_data, progress=False)


def test_specialize_trains_each_modalitys_expert_only(init_ckpt, train_data, tmp_path):
    before = load_file(str(init_ckpt / "model.safetensors"))
    cfg = small("specialize", init_experts_from=None, data={"tasks": ["digits_cls"]})
    train_stage(cfg, init=init_ckpt, out_dir=tmp_path, data_root=train_data, progress=False)
    after = load_file(str(tmp_path / "final" / "model.safetensors"))
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    changed = [not torch.equal(before[key][e], after[key][e]) for e in range(6)]
    assert changed == [False, True, False, False, False, False]  # image samples -> expert 1 only
    assert torch.equal(before["model.language_model.layers.0.mlp.router.weight"],
                       after["model.language_model.layers.0.mlp.router.weight"])  # fmt: skip


GROUPS = {"text": [0, 1], "image": [2, 3], "video": [4, 5], "audio": [4, 5], "points": [4, 5], "series": [4, 5]}


def test_fine_grained_groups_align_then_specialize(init_ckpt, train_data, tmp_path):
    """forced_expert [0, 1] trains experts 0 and 1 alone; specialize with init_experts_from [0, 1] copies them into
    every pair, and image samples then train their pair (2, 3) only."""
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    before = load_file(str(init_ckpt / "model.safetensors"))[key]
    cfg = small("align", forced_expert=[0, 1], trainable={"experts": True})
    train_stage(cfg, init=init_ckpt, out_dir=tmp_path / "align", data_root=train_data, progress=False)
    aligned = load_file(str(tmp_path / "align" / "final" / "model.safetensors"))[key]
    assert [not torch.equal(before[e], aligned[e]) for e in range(6)] == [True, True] + [False] * 4

    cfg = small("specialize", init_experts_from=[0, 1], moe={"modality_experts": GROUPS},
                data={"tasks": ["digits_cls"]})  # fmt: skip
    train_stage(cfg, init=tmp_path / "align" / "final", out_dir=tmp_path / "spec", data_root=train_data,
                progress=False)  # fmt: skip
    special = load_file(str(tmp_path / "spec" / "final" / "model.safetensors"))[key]
    for e in (0, 1, 4, 5):  # copies of the aligned pair, untouched by image samples
        assert torch.equal(special[e], aligned[e % 2]), e
    assert not torch.equal(special[2], aligned[0]) and not torch.equal(special[3], aligned[1])


def test_expert_ids_are_checked(init_ckpt, train_data, tmp_path):
    with pytest.raises(ConfigError, match=r"stage align: forced_expert: experts \[6\] do not exist"):
        train_stage(small("align", forced_expert=[0, 6]), init=init_ckpt, out_dir=tmp_path / "a",
                    data_root=train_data, progress=False)  # fmt: skip
    uneven = {**GROUPS, "image": [2]}
    cfg = small("specialize", init_experts_from=None, moe={"modality_experts": uneven}, data={"tasks": TASKS})
    with pytest.raises(ConfigError, match="the same number of experts for every modality"):
        train_stage(cfg, init=init_ckpt, out_dir=tmp_path / "b", data_root=train_data, progress=False)


def test_resume_continues_exactly(init_ckpt, train_data, tmp_path):
    cfg = small("align", steps=6, save_every=2, forced_expert=0, trainable={"attention": True, "experts": True})
    full = train_stage(cfg, init=init_ckpt, out_dir=tmp_path / "full", data_root=train_data, progress=False)
    part = train_stage(cfg, init=init_ckpt, out_dir=tmp_path / "part", data_root=train_data, progress=False,
                       max_steps_this_run=3)  # fmt: skip
    assert part.steps == 3 and not (tmp_path / "part" / "final").exists()
    assert latest_checkpoint(tmp_path / "part" / "checkpoints").name == "step-0000003"
    resumed = train_stage(cfg, init=init_ckpt, out_dir=tmp_path / "part", data_root=train_data, resume=True,
                          progress=False)  # fmt: skip
    assert resumed.start_step == 3 and resumed.steps == 6
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert resumed.final_loss == pytest.approx(full.final_loss, rel=1e-5)
    with pytest.raises(CheckpointError, match="already finished"):
        train_stage(cfg, init=init_ckpt, out_dir=tmp_path / "part", data_root=train_data, resume=True, progress=False)


def test_resume_replays_the_random_stream(init_ckpt, train_data, tmp_path):
    """Router jitter and LoRA dropout draw from the global RNG every step: a resumed run must continue that stream
    where the checkpoint left it (creating the data iterator draws a seed from it too)."""
    cfg = small("tune", steps=4, save_every=2, router_warmup_steps=None, lora={"r": 4, "dropout": 0.3},
                moe={"router_jitter": 0.3})  # fmt: skip
    train_stage(cfg, init=init_ckpt, out_dir=tmp_path / "full", data_root=train_data, progress=False)
    train_stage(cfg, init=init_ckpt, out_dir=tmp_path / "part", data_root=train_data, progress=False,
                max_steps_this_run=2)  # fmt: skip
    with (tmp_path / "part" / "train_log.jsonl").open("a") as f:  # a killed run logs past its last checkpoint
        f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n" + '{"step": 4, "lo')
    train_stage(cfg, init=init_ckpt, out_dir=tmp_path / "part", data_root=train_data, resume=True, progress=False)
    log = [json.loads(x) for x in (tmp_path / "part" / "train_log.jsonl").read_text().splitlines()]
    full_log = [json.loads(x) for x in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [r["step"] for r in full_log]  # no step twice
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"{len(changed)} tensors differ after resume, e.g. {changed[:3]}"


def test_a_resumed_stage_reports_the_whole_stage(init_ckpt, train_data, tmp_path):
    """Its time and tokens count the earlier process's steps, and TensorBoard keeps each step once (the killed run's
    steps past the checkpoint are purged, as in the JSONL log)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = small("align", steps=4, save_every=2, log_every=1, forced_expert=0)
    part = train_stage(cfg, init=init_ckpt, out_dir=tmp_path, data_root=train_data, progress=False,
                       max_steps_this_run=3)  # fmt: skip
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000003")  # killed after step 3 was logged, before its save
    resumed = train_stage(cfg, init=init_ckpt, out_dir=tmp_path, data_root=train_data, resume=True, progress=False)
    assert resumed.start_step == 2 and 0 < resumed.seconds_before_resume < part.seconds
    assert resumed.seconds > resumed.seconds_before_resume
    events = EventAccumulator(str(tmp_path / "align"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


def test_a_stages_moe_override_reaches_the_blocks(init_ckpt):
    from unimoe.inference import load_pretrained
    from unimoe.moe import SparseMoEBlock
    from unimoe.train.loop import prepare_stage_model

    model, _ = load_pretrained(init_ckpt)
    stage = small("tune", moe={"modality_loss_coef": 0.1, "modality_experts": {"image": [2]}})
    model, _ = prepare_stage_model(model, stage)
    image = list(model.config.modalities).index("image")
    blocks = [m for m in model.modules() if isinstance(m, SparseMoEBlock)]
    assert blocks
    for block in blocks:
        assert block.config.modality_loss_coef == 0.1
        assert block.modality_target.nonzero().tolist() == [[image, 2]]  # the checkpoint's assignment is replaced


def test_half_written_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-0000004").mkdir(parents=True)
    (root / "step-0000004" / STATE_FILE).write_text(json.dumps({"step": 4}))
    (root / "step-0000006").mkdir()  # killed before its state file was written
    (root / ".tmp-step-0000008").mkdir()  # killed mid-save
    (root / "step-0000005").mkdir()
    (root / "step-0000005" / STATE_FILE).write_text("{trunc")
    assert latest_checkpoint(root).name == "step-0000004"


def test_trainable_parts(init_ckpt):
    from unimoe.hub import load_model

    model = load_model(init_ckpt)
    counts = apply_trainable(model, {"routers": True, "encoders": ["image"]})
    assert set(counts) == {"routers", "encoders"}
    for name, p in model.named_parameters():
        assert p.requires_grad == (part_of(name) == "routers" or name.startswith("model.encoders.image."))
    with pytest.raises(ConfigError, match="nothing to train"):
        apply_trainable(model, {})
    with pytest.raises(ConfigError, match=r"trainable.encoders: \['smell'\] name no module of this model; it has"):
        apply_trainable(model, {"routers": True, "encoders": ["image", "smell"]})


def test_a_component_frozen_in_the_model_config_stays_frozen(init_ckpt):
    from unimoe.hub import load_model

    model = load_model(init_ckpt)
    model.config.encoders["image"]["trainable"] = False  # e.g. a pretrained encoder kept frozen
    model.config.connectors["audio"]["trainable"] = False
    counts = apply_trainable(model, {"encoders": True, "connectors": True})
    image = [p for n, p in model.named_parameters() if n.startswith("model.encoders.image.")]
    audio = [p for n, p in model.named_parameters() if n.startswith("model.connectors.audio.")]
    assert image and audio and not any(p.requires_grad for p in image + audio)
    others = [p for n, p in model.named_parameters() if part_of(n) in ("encoders", "connectors")]
    assert sum(counts.values()) == sum(p.numel() for p in others if p.requires_grad)
    assert sum(p.numel() for p in others) - sum(counts.values()) == sum(p.numel() for p in image + audio)


def test_lr_multipliers_make_one_group_per_rate(init_ckpt):
    from unimoe.hub import load_model

    model = load_model(init_ckpt)
    apply_trainable(model, {"attention": True, "encoders": True, "connectors": True})
    groups = param_groups(model, 1e-3, {"encoders": 5.0, "connectors": 2.0, "routers": 9.0})  # routers: frozen
    assert [(g["part"], g["lr"]) for g in groups] == [("base", 1e-3), ("connectors", 2e-3), ("encoders", 5e-3)]
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            part = part_of(names[id(p)])
            assert p.requires_grad and part == (group["part"] if group["part"] != "base" else "attention")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable
    # without multipliers: one group at the base rate, as before
    assert [(g["part"], g["lr"]) for g in param_groups(model, 1e-3, {})] == [("base", 1e-3)]


def test_lr_multiplier_of_one_modality_wins_over_its_part(init_ckpt):
    from unimoe.hub import load_model

    model = load_model(init_ckpt)
    apply_trainable(model, {"attention": True, "encoders": True, "connectors": True})
    groups = param_groups(model, 1e-3, {"encoders": 4.0, "encoders.video": 0.25, "connectors.image": 1.0})
    assert [(g["part"], g["lr"]) for g in groups] == [("base", 1e-3), ("encoders", 4e-3), ("encoders.video", 2.5e-4)]
    names = {id(p): n for n, p in model.named_parameters()}
    video = {names[id(p)] for p in groups[2]["params"]}
    assert video and all(n.startswith("model.encoders.video.") for n in video)
    assert video == {n for n, p in model.named_parameters() if n.startswith("model.encoders.video.")}
    assert not any(names[id(p)].startswith("model.encoders.video.") for p in groups[1]["params"])
    with pytest.raises(ConfigError, match=r"lr_multipliers: \['encoders.vidoe'\] name no module"):
        param_groups(model, 1e-3, {"encoders.vidoe": 0.5})


def test_lr_multiplier_keys_are_checked_at_load():
    assert load_stage("align", {"lr_multipliers": {"encoders.video": 0.25}}).lr_multipliers == {"encoders.video": 0.25}
    with pytest.raises(ConfigError, match="lr_multipliers has unknown part"):
        load_stage("align", {"lr_multipliers": {"attention.video": 2.0}})


def test_stage_trains_with_lr_multipliers_and_logs_the_base_rate(init_ckpt, train_data, tmp_path):
    cfg = small("align", forced_expert=0, trainable={"attention": True, "encoders": True},
                lr_multipliers={"encoders": 4.0}, warmup_steps=0, min_lr_ratio=1.0)  # fmt: skip
    train_stage(cfg, init=init_ckpt, out_dir=tmp_path, data_root=train_data, progress=False)
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["lr"] == pytest.approx(cfg.lr)


def _stats(load_per_modality: list[list[float]]):
    from unimoe.moe.losses import RouterStats

    per_mod = torch.tensor(load_per_modality)  # (modalities, experts)
    zero = torch.tensor(0.0)
    return RouterStats(load=per_mod.sum(0), load_per_modality=per_mod, dropped=zero, null_share=zero,
                       entropy=torch.tensor(0.1), num_tokens=torch.tensor(50.0))  # fmt: skip


def test_router_collapse_is_flagged():
    # top-1: text all on expert 0
    metrics = routing_metrics([_stats([[98.0, 2.0], [0.0, 0.0]])], ["text", "image"], num_experts=2)
    assert metrics["router/max_expert_share"] == pytest.approx(0.98)
    assert metrics["router/text/max_expert_share"] == pytest.approx(0.98)
    assert metrics["router/top_k_share"] == pytest.approx(0.98)
    assert router_collapsed(metrics, num_experts=2, top_k=1, threshold=0.9)
    # top-2 of 4: one expert holds at most half of the slots, so the warning looks at the two busiest experts
    collapsed = routing_metrics([_stats([[50.0, 48.0, 1.0, 1.0]])], ["text"], num_experts=4, top_k=2)
    assert collapsed["router/max_expert_share"] == pytest.approx(0.5)
    assert collapsed["router/top_k_share"] == pytest.approx(0.98)
    assert router_collapsed(collapsed, num_experts=4, top_k=2, threshold=0.9)
    even = routing_metrics([_stats([[26.0, 25.0, 25.0, 24.0]])], ["text"], num_experts=4, top_k=2)
    assert even["router/top_k_share"] == pytest.approx(0.51)
    assert not router_collapsed(even, num_experts=4, top_k=2, threshold=0.9)
    # the worst layer counts; a null expert (columns past num_experts) is no routed expert to collapse onto
    layers = [_stats([[26.0, 25.0, 25.0, 24.0, 0.0]]), _stats([[1.0, 97.0, 1.0, 1.0, 0.0]])]
    assert routing_metrics(layers, ["text"], num_experts=4, top_k=2)["router/top_k_share"] == pytest.approx(0.98)
    skipping = routing_metrics([_stats([[1.0, 1.0, 0.0, 0.0, 98.0]])], ["text"], num_experts=4, top_k=2)
    assert skipping["router/top_k_share"] == pytest.approx(0.02)
    # one expert (a dense model) or top_k == num_experts: every token uses every expert, nothing can collapse
    dense = routing_metrics([_stats([[100.0]])], ["text"], num_experts=1, top_k=1)
    assert dense["router/top_k_share"] == 1.0 and not router_collapsed(dense, num_experts=1, top_k=1, threshold=0.9)


def test_lora_experts_base_stays_its_own_part_inside_peft():
    """The frozen FFN of LoRA experts is `experts_base`, also when the model is wrapped by peft for the stage."""
    from peft import LoraConfig, get_peft_model

    from unimoe import build_model

    model = build_model("tiny", moe={"expert_type": "lora", "lora_rank": 4})
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    counts = apply_trainable(wrapped, {"experts": True})
    assert set(counts) == {"experts", "lora"}
    for name, p in wrapped.named_parameters():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            assert not p.requires_grad, name


def test_frozen_steps_are_checked_at_load():
    cfg = load_stage("align", {"trainable": {"encoders": True}, "frozen_steps": {"encoders.image": 5}})
    assert cfg.frozen_steps == {"encoders.image": 5}
    with pytest.raises(ConfigError, match="frozen_steps has unknown part"):
        load_stage("align", {"trainable": {"encoders": True}, "frozen_steps": {"wings": 5}})
    with pytest.raises(ConfigError, match=r"frozen_steps.encoders must be a whole number of steps >= 0"):
        load_stage("align", {"trainable": {"encoders": True}, "frozen_steps": {"encoders": -1}})
    # more than the stage's steps: held all stage long (quick runs `stages.*.steps=3` of the shipped recipes)
    assert load_stage("align", {"trainable": {"encoders": True}, "frozen_steps": {"encoders": 501}}).steps == 500
    # `frozen_steps.encoders.points=0` on the command line arrives nested; `frozen_steps=null` clears the table
    nested = load_stage("align", {"trainable": {"encoders": True}, "frozen_steps": {"encoders": {"points": 0}}})
    assert nested.frozen_steps == {"encoders.points": 0}
    assert load_stage("align", {"frozen_steps": None}).frozen_steps == {}
    with pytest.raises(ConfigError, match="frozen_steps.encoders: the part 'encoders' is not trainable"):
        load_stage("align", {"frozen_steps": {"encoders": 5}})  # the align preset keeps encoders frozen


def _weights_changed(before: dict, after_dir) -> set[str]:
    after = load_file(str(after_dir / "final" / "model.safetensors"))
    return {k for k, v in after.items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("frozen_for", [3, 2])
def test_frozen_steps_hold_a_part_then_train_it(frozen_for, init_ckpt, train_data, tmp_path):
    before = load_file(str(init_ckpt / "model.safetensors"))
    cfg = small("align", forced_expert=0, trainable={"attention": True, "encoders": True, "connectors": True},
                frozen_steps={"encoders.image": frozen_for})  # fmt: skip
    train_stage(cfg, init=init_ckpt, out_dir=tmp_path, data_root=train_data, progress=False)
    changed = _weights_changed(before, tmp_path)
    image_encoder = {k for k in before if k.startswith("model.encoders.image.")}
    assert any(k.startswith("model.connectors.image.") for k in changed)  # the rest trains from step 1
    assert any(".self_attn." in k for k in changed)
    if frozen_for == 3:  # held for the whole stage: untouched (AdamW's decay skips parameters without gradient)
        assert not changed & image_encoder
    else:  # released after step 2: step 3 trains it
        assert changed & image_encoder


def test_router_warmup_trains_only_the_routers(init_ckpt, train_data, tmp_path):
    before = load_file(str(init_ckpt / "model.safetensors"))
    cfg = small("tune", router_warmup_steps=3, lora=None)
    train_stage(cfg, init=init_ckpt, out_dir=tmp_path, data_root=train_data, progress=False)
    changed = _weights_changed(before, tmp_path)
    assert changed and all(".mlp.router." in k for k in changed), sorted(changed)[:5]


def test_a_stage_without_tasks_trains_on_every_built_task(train_data, tmp_path):
    from unimoe.train.config import DataMix
    from unimoe.train.data import TrainData

    data = TrainData(train_data, DataMix())  # the stage presets ship `tasks: []`
    assert data.tasks == ["digits_cls", "text_qa"] and all(data.records)
    assert TrainData(train_data, DataMix(), inputs=set()).tasks == ["text_qa"]  # a text-only model skips the images
    assert TrainData(train_data, DataMix(tasks=["digits_cls"]), inputs=set()).tasks == ["digits_cls"]  # named: kept
    with pytest.raises(ConfigError, match="no task built under"):
        TrainData(tmp_path, DataMix())


def test_peak_memory_is_the_stages_own(init_ckpt, train_data, tmp_path):
    import numpy as np

    def resident_mb() -> float:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(x for x in status if x.startswith("VmRSS")).split()[1]) / 1024

    before = np.ones(2_500 * 2**20, dtype=np.uint8)  # 2.5 GB touched before the stage, freed before it starts
    del before
    at_start = resident_mb()
    result = train_stage(small("align", forced_expert=0, trainable={"connectors": True}), init=init_ckpt,
                         out_dir=tmp_path, data_root=train_data, progress=False)  # fmt: skip
    if torch.cuda.is_available():  # the GPU's peak allocation, which the host memory above never reached
        assert 0 < result.peak_memory_mb < 1_000
        return
    # the process peaked 2.5 GB above where the stage started; the tiny stage itself adds far less than 1 GB
    assert at_start <= result.peak_memory_mb < at_start + 1_000


def test_a_non_finite_loss_stops_the_stage_without_saving(init_ckpt, train_data, tmp_path, monkeypatch):
    from unimoe.errors import TrainingError
    from unimoe.modeling_unimoe import UniMoEForConditionalGeneration

    forward = UniMoEForConditionalGeneration.forward
    calls = []

    def poisoned(self, *args, **kwargs):  # the loss of the third step is NaN (as after lr=1e30)
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(UniMoEForConditionalGeneration, "forward", poisoned)
    cfg = small("align", steps=4, save_every=2, forced_expert=0)
    with pytest.raises(TrainingError, match=r"stage align step 3: the loss is nan; stopped without saving .*-0000002"):
        train_stage(cfg, init=init_ckpt, out_dir=tmp_path, data_root=train_data, progress=False)
    assert not (tmp_path / "final").exists()
