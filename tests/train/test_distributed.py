"""Two gloo processes on CPU train a stage; their loss matches one process on the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

UNIMOE = str(Path(sys.executable).parent / "unimoe")


def run_stage(init, data, out, nproc):
    cmd = [UNIMOE, "train", "align", "--init", str(init), "--out", str(out), "--data", str(data),
           "--nproc", str(nproc), "steps=3", "batch_size=8", "log_every=1", "warmup_steps=1", "forced_expert=0",
           "data.tasks=[text_qa, digits_cls]",
           "trainable={attention: true, experts: true, connectors: true}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("stage align:") == 1, proc.stdout  # one summary line, not one per process
    return [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_two_processes_match_one(init_ckpt, train_data, tmp_path):
    single = run_stage(init_ckpt, train_data, tmp_path / "one", 1)
    double = run_stage(init_ckpt, train_data, tmp_path / "two", 2)
    assert len(single) == len(double) == 3
    # same global batches; the per-process token-mean losses are averaged, so allow a small difference
    for a, b in zip(single, double):
        assert b == pytest.approx(a, rel=0.03)
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()
