"""Two gloo processes on CPU train a stage, with DDP and with FSDP2; their loss matches one process on the same global
batch, FSDP's weights match DDP's, and an FSDP run resumed from its sharded checkpoint ends bitwise where the
uninterrupted one does."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

UNIMOE = str(Path(sys.executable).parent / "unimoe")

# Nine text samples to one image sample: in most steps one process's half of the batch has no image, so the image
# connector gets no gradient there (what FSDP2 cannot pair across processes without help; see train/loop.py).
MIX = ["data.tasks=[text_qa, digits_cls]", "data.balance=task", "data.weights={text_qa: 9, digits_cls: 1}"]
ALIGN = ["steps=3", "batch_size=8", "grad_accum=2", "log_every=1", "warmup_steps=1", "forced_expert=0", *MIX,
         "trainable={attention: true, experts: true, connectors: true}"]  # fmt: skip
# tune: peft LoRA on attention (its A factors get a zero gradient on their first step, while B is still zero: used
# parameters that must not be mistaken for unused ones), routers warmed up alone for the first step, the connectors
# held for three (a checkpoint inside the hold), weight decay on, the auxiliary-loss-free bias update on (its load
# summed over the processes, over two accumulated micro-batches)
TUNE = ["steps=4", "batch_size=8", "grad_accum=2", "log_every=1", "warmup_steps=1", "router_warmup_steps=1",
        "frozen_steps={connectors: 3}", "weight_decay=0.01", "save_every=2", "moe.router_bias_update_rate=0.01",
        *MIX]  # fmt: skip


def train(stage, init, data, out, nproc, *extra, resume=False):
    cmd = [UNIMOE, "train", stage, "--init", str(init), "--out", str(out), "--data", str(data), "--nproc", str(nproc),
           *extra, *(["--resume"] if resume else [])]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"stage {stage}:") == 1, proc.stdout  # one summary line, not one per process
    return [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def assert_close_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def ddp_align(init_ckpt, train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "align"
    return out, train("align", init_ckpt, train_data, out, 2, *ALIGN)


@pytest.mark.timeout(600)
def test_two_processes_match_one(init_ckpt, train_data, ddp_align, tmp_path):
    single = train("align", init_ckpt, train_data, tmp_path / "one", 1, *ALIGN)
    out, double = ddp_align
    assert len(single) == len(double) == 3
    # same global batches; the per-process token-mean losses are averaged, so allow a small difference
    for a, b in zip(single, double):
        assert b == pytest.approx(a, rel=0.03)
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.timeout(600)
def test_fsdp_trains_what_ddp_trains(init_ckpt, train_data, ddp_align, tmp_path):
    out, ddp = ddp_align
    fsdp = train("align", init_ckpt, train_data, tmp_path / "fsdp", 2, *ALIGN, "distributed=fsdp")
    assert fsdp == pytest.approx(ddp, rel=1e-5)
    # the final checkpoint gathers the shards into the whole model
    assert_close_weights(weights(tmp_path / "fsdp"), weights(out))


@pytest.mark.timeout(900)
def test_fsdp_tune_with_lora_and_holds_resumes_bitwise(init_ckpt, train_data, tmp_path):
    ddp = train("tune", init_ckpt, train_data, tmp_path / "ddp", 2, *TUNE)
    fsdp = train("tune", init_ckpt, train_data, tmp_path / "fsdp", 2, *TUNE, "distributed=fsdp")
    assert fsdp == pytest.approx(ddp, rel=1e-5)
    full = weights(tmp_path / "fsdp")
    assert_close_weights(full, weights(tmp_path / "ddp"))
    biases = [full[k] for k in full if k.endswith("router_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)  # the balancing update ran
    # a run stopped after its step-2 checkpoint (inside the routers' warm-up) and resumed from the sharded state
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp", resumed)
    shutil.rmtree(resumed / "final")
    (resumed / "result.json").unlink()
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-0000002"]
    train("tune", init_ckpt, train_data, resumed, 2, *TUNE, "distributed=fsdp", resume=True)
    again = weights(resumed)
    assert all(torch.equal(full[k], again[k]) for k in full)


def test_bad_input_under_torchrun_is_one_line_per_problem(init_ckpt, train_data, tmp_path):
    """What every process would refuse is refused once before any starts; an error the processes find later is
    printed once however many of them hit it, and torchrun's traceback gives way to one line with the exit status."""

    def run(*args):
        cmd = [UNIMOE, "train", "align", "--out", str(tmp_path / "out"), "--nproc", "2", "steps=2", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    for args, message in [
        ((f"--init={init_ckpt}", f"--data={train_data}", "batch_size=7"), "batch_size 7 is not divisible by 2"),
        ((f"--init={tmp_path / 'none'}", f"--data={train_data}"), "does not exist"),
        ((f"--init={init_ckpt}", f"--data={tmp_path / 'nodata'}"), "data directory"),
        ((f"--init={init_ckpt}", f"--data={train_data}", "data.tasks=[vqa_easy]"), "'vqa_easy' in"),
        ((f"--init={init_ckpt}", f"--data={train_data}", "forced_expert=9"), "experts [9] do not exist"),
    ]:
        proc = run(*args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("unimoe train: error: ") and message in proc.stderr
    broken = tmp_path / "no_tokenizer"
    shutil.copytree(init_ckpt, broken)
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer_config.json").unlink()
    proc = run(f"--init={broken}", f"--data={train_data}")  # found only when the processes load it
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    # which processes fail before torchrun stops the others is a race: one or both
    assert re.fullmatch(r"unimoe train: process\(es\) (0|1|0, 1) of 2 failed \(exit status 2; see above\)", lines[-1])
    # both processes fail alike (or one, before torchrun stops the other): their line is printed once
    assert len(lines) == 2 and lines[0].startswith("unimoe train: error: ") and "no tokenizer" in lines[0], lines


@pytest.mark.timeout(600)
def test_batches_that_reach_no_trainable_part(init_ckpt, train_data, tmp_path):
    """Text-only batches while only the connectors train: the loss has no graph. One process adds a zero that
    touches the trainable parameters; under DDP that zero crashed ("marked as ready twice"), so several processes
    backpropagate from the input embeddings instead, and both give the same losses."""
    args = ["steps=2", "batch_size=8", "log_every=1", "data.tasks=[text_qa]", "trainable={connectors: true}"]
    one = train("align", init_ckpt, train_data, tmp_path / "one", 1, *args)
    two = train("align", init_ckpt, train_data, tmp_path / "two", 2, *args)
    assert two == pytest.approx(one, rel=0.03)
    # nothing reached a trainable part, so nothing moved
    assert_close_weights(weights(tmp_path / "two"), load_file(Path(init_ckpt) / "model.safetensors"), atol=0)
