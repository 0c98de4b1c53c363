"""The GPU paths: grouped_mm dispatch, bf16, generation, a bf16 training stage and evaluation on CUDA.

Skipped without a CUDA device (CI has none). Run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

import json

import pytest
import torch

from unimoe import build_model
from unimoe.moe import MoEConfig, SparseMoEBlock
from unimoe.moe.dispatch import use_grouped_mm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run_block(expert_type, dispatch, device, dtype, **kw):
    """Output, input gradient and parameter gradients of one MoE block (same weights and input for every call)."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, expert_type=expert_type, dispatch=dispatch, lora_rank=8, **kw)
    block = SparseMoEBlock(cfg, hidden_size=64, intermediate_size=128, modalities=["text"])
    if expert_type == "lora":
        with torch.no_grad():
            for name in ("lora_B_gate", "lora_B_up", "lora_B_down"):
                getattr(block.experts, name).normal_(std=0.1)
    block = block.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, 64, generator=g).to(device=device, dtype=dtype).requires_grad_()
    upstream = torch.randn(4, 32, 64, generator=g).to(device=device, dtype=dtype)
    out = block(x)
    ((out.hidden_states * upstream).sum() + out.aux_loss + out.z_loss).backward()
    grads = {n: p.grad.float().cpu() for n, p in block.named_parameters() if p.grad is not None}
    return out.hidden_states.detach().float().cpu(), x.grad.float().cpu(), grads


def test_auto_dispatch_is_grouped_mm_on_cuda():
    assert use_grouped_mm("auto", torch.zeros(1, device="cuda"))
    assert not use_grouped_mm("auto", torch.zeros(1))


@pytest.mark.parametrize("expert_type", ["ffn", "lora"])
@pytest.mark.parametrize("extra", [{}, {"num_null_experts": 2}, {"routing": "topp", "top_p": 0.6}], ids=str)
def test_cuda_backends_match_the_cpu_reference_in_fp32(expert_type, extra):
    # TF32 off so that the GPU does fp32 arithmetic like the CPU
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = run_block(expert_type, "loop", "cpu", torch.float32, **extra)
    for dispatch in ("loop", "grouped_mm"):
        out, gx, grads = run_block(expert_type, dispatch, "cuda", torch.float32, **extra)
        torch.testing.assert_close(out, ref[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gx, ref[1], rtol=1e-4, atol=1e-5)
        assert grads.keys() == ref[2].keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref[2][name], rtol=1e-3, atol=1e-4, msg=f"{dispatch}: {name}")


@pytest.mark.parametrize("expert_type", ["ffn", "lora"])
def test_bf16_grouped_mm_agrees_with_the_loop_and_with_fp32(expert_type):
    loop = run_block(expert_type, "loop", "cuda", torch.bfloat16)
    grouped = run_block(expert_type, "grouped_mm", "cuda", torch.bfloat16)
    ref = run_block(expert_type, "loop", "cpu", torch.float32)
    scale = ref[0].abs().max()
    # the two bf16 backends differ only in accumulation order; both stay within bf16 error of fp32
    assert (grouped[0] - loop[0]).abs().max() <= 0.02 * scale
    assert (grouped[0] - ref[0]).abs().max() <= 0.03 * scale
    assert (grouped[1] - ref[1]).abs().max() <= 0.03 * ref[1].abs().max()
    for name, grad in grouped[2].items():
        assert torch.isfinite(grad).all(), name


def test_generate_on_cuda_matches_the_cpu(tokenizer):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_model("tiny", seed=1).eval()
    batch = tokenizer(["What digit is", "Draw the digit seven please"], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    on_cpu = model.generate(**batch, **kwargs)
    model = model.cuda()
    batch = batch.to("cuda")
    cached = model.generate(**batch, use_cache=True, **kwargs)
    uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached.cpu(), on_cpu)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_a_stage_trains_in_bf16_on_cuda_and_evaluates_there(tmp_path):
    from unimoe.data.build import build_task
    from unimoe.eval import evaluate, resolve_tasks
    from unimoe.inference import init_checkpoint, load_pretrained
    from unimoe.train import load_stage, train_stage

    data = tmp_path / "data"
    for task in ("text_qa", "digits_cls"):
        build_task(task, data)
    init = init_checkpoint("tiny", tmp_path / "init")
    stage = load_stage("tune", {"steps": 6, "batch_size": 8, "log_every": 1, "warmup_steps": 1,
                                "data": {"tasks": ["text_qa", "digits_cls"]}})  # fmt: skip
    result = train_stage(stage, init=init, out_dir=tmp_path / "tune", data_root=data, progress=False)
    assert (result.device, result.precision) == ("cuda:0", "bf16")
    assert result.peak_memory_mb > 0
    log = [json.loads(line) for line in (tmp_path / "tune" / "train_log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    # the checkpoint is fp32 on disk and loads on either device with the same predictions
    model, processor = load_pretrained(tmp_path / "tune" / "final", device="cuda")
    assert model.device.type == "cuda" and next(model.parameters()).dtype == torch.float32
    tasks = resolve_tasks("text_qa,digits_cls")
    on_gpu = evaluate(model, processor, tasks, out_dir=tmp_path / "eval_gpu", data_root=data, limit=24, progress=False)
    model, processor = load_pretrained(tmp_path / "tune" / "final", device="cpu")
    on_cpu = evaluate(model, processor, tasks, out_dir=tmp_path / "eval_cpu", data_root=data, limit=24, progress=False)
    for task in ("text_qa", "digits_cls"):
        gpu_preds = [json.loads(x)["prediction"] for x in (tmp_path / "eval_gpu" / f"samples_{task}.jsonl").open()]
        cpu_preds = [json.loads(x)["prediction"] for x in (tmp_path / "eval_cpu" / f"samples_{task}.jsonl").open()]
        agree = sum(a == b for a, b in zip(gpu_preds, cpu_preds)) / len(cpu_preds)
        assert agree >= 0.9, (task, agree)  # cuDNN's TF32 convolutions may flip a near tie, not more
    assert on_gpu["results"].keys() == on_cpu["results"].keys()
