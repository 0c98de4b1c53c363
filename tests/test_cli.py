import json
import subprocess
import sys
from pathlib import Path

import pytest

from unimoe.cli import main

UNIMOE = str(Path(sys.executable).parent / "unimoe")  # the installed console script


def run_cli(*args):
    return subprocess.run([UNIMOE, *args], capture_output=True, text=True, timeout=300)


def test_info_lists_presets_and_counts(capsys):
    assert main(["info"]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["info", "qwen2.5-0.5b-e8"]) == 0
    out = capsys.readouterr().out
    assert "total 2,690,709,376" in out and "active per token 807,991,168" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["info", "tiny", "moe.top_k=9"], "moe.top_k"),
        (["info", "tiny", "moe.expert_type=banana"], "moe.expert_type"),
        (["info", "tiny", "text_config.hidden_size=63"], "text_config.hidden_size"),
        (["info", "tiny", "moe.top_k=abc"], "moe.top_k: expected an integer, got 'abc'"),
        (["info", "tiny", "moe.top_k=1.5"], "moe.top_k: expected an integer, got 1.5"),
        (["info", "tiny", "moe.top_p=high"], "moe.top_p: expected a number"),
        (["info", "tiny", "moe=3"], "moe: expected a mapping"),
        (["info", "tiny", "text_config.hidden_size=abc"], "'hidden_size' expected int"),
        (["info", "tiny", "moe={top_k: 2"], "override moe, line 1: not valid YAML"),
        (["info", "no-such-preset"], "unknown model preset"),
        (["upcycle", "/no/such/dir", "/tmp/x", "--num-experts", "4", "--top-k", "2"], "does not exist"),
        (["push", "/no/such/dir", "me/x"], "does not exist"),
    ],
)
def test_errors_are_one_line_and_nonzero(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], err


def test_console_script_error_path():
    proc = run_cli("info", "tiny", "moe.num_experts=0")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "unimoe info: error: moe.num_experts: must be >= 1, got 0"


def test_upcycle_cli(dense_qwen2_dir, tmp_path):
    out = tmp_path / "moe"
    proc = run_cli(
        "upcycle",
        str(dense_qwen2_dir),
        str(out),
        "--num-experts",
        "4",
        "--top-k",
        "2",
        "--expert-type",
        "lora",
        "--lora-rank",
        "4",
        "--moe-layers",
        "0,2",
        "--set",
        "moe.router_jitter=0.01",
    )
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["moe"]["expert_type"] == "lora" and cfg["moe"]["lora_rank"] == 4 and cfg["moe"]["moe_layers"] == [0, 2]
    assert cfg["moe"]["router_jitter"] == 0.01


def test_smoke_runs_end_to_end(tmp_path):
    from unimoe.smoke import run_smoke

    summary = run_smoke(tmp_path, steps=3, batch_size=4)
    assert summary["reload_max_abs_logit_diff"] < 1e-5
    assert summary["last_lm_loss"] < summary["first_lm_loss"]
    assert (tmp_path / "routing_heatmap.png").stat().st_size > 1000
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()


def test_a_malformed_yaml_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [\n")
    for args in (["info", str(bad)], ["train", str(bad), "--init", str(tmp_path), "--out", str(tmp_path / "o")]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{bad}, line 2: not valid YAML" in err, err


def test_init_never_deletes_what_is_at_out(tmp_path, capsys):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("keep me")
    assert main(["init", "tiny", str(keep)]) == 2
    assert "holds other files and no checkpoint" in capsys.readouterr().err
    assert (keep / "notes.txt").read_text() == "keep me"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["init", "tiny", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "x"
    ckpt = tmp_path / "ckpt"
    assert main(["init", "tiny", str(ckpt)]) == 0
    assert main(["init", "tiny", str(ckpt), "--seed", "1"]) == 0  # an older checkpoint is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ckpt", "mine"]  # nothing left aside


def test_an_output_path_that_is_a_file_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    ckpt = tmp_path / "ckpt"
    assert main(["init", "tiny", str(ckpt)]) == 0
    capsys.readouterr()
    assert main(["chat", str(ckpt), "hi", "--save-dir", str(afile), "--output", "image"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{afile}: exists and is not a directory" in err, err


def test_info_on_a_folder_that_is_no_unimoe_checkpoint_is_one_line(dense_qwen2_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes((dense_qwen2_dir / "model.safetensors").read_bytes())
    cases = {
        tmp_path / "empty": "has no config.json",
        broken: "broken/config.json: ",
        dense_qwen2_dir: "is a qwen2 checkpoint, not a UniMoE one (`unimoe upcycle`",
    }
    for folder, needle in cases.items():
        assert main(["info", str(folder)]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], lines
