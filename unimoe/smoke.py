"""``unimoe smoke``: build the tiny model and its tokenizer, train it briefly on built-in text, generate,
save a checkpoint, reload it with ``AutoModelForCausalLM`` and check the logits are identical, and draw the
routing heatmap. A few seconds on a CPU; the full offline recipe (``unimoe run tiny``) builds on the same parts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from unimoe.hub import save_checkpoint
from unimoe.presets import build_model
from unimoe.tokenizer import build_tokenizer, builtin_corpus
from unimoe.viz import format_load_table, load_matrix, routing_heatmap


def run_smoke(out: str | Path, *, steps: int = 30, seed: int = 0, batch_size: int = 16) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = build_model("tiny", seed=seed)
    texts = builtin_corpus()
    gen = torch.Generator().manual_seed(seed)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    start = time.perf_counter()
    for _ in (bar := tqdm(range(steps), desc="smoke train", unit="step")):
        idx = torch.randint(len(texts), (batch_size,), generator=gen).tolist()
        batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        outputs = model(**batch, labels=labels)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(outputs.lm_loss.item())
        bar.set_postfix(lm_loss=f"{losses[-1]:.3f}", aux=f"{outputs.aux_loss.item():.3f}")
    train_s = time.perf_counter() - start

    model.eval()
    prompt = tokenizer(["What digit is"], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        stats = model(**tokenizer(texts[:64], return_tensors="pt", padding=True), output_router_stats=True).router_stats
    sample = tokenizer.decode(generated[0], skip_special_tokens=True)

    ckpt = save_checkpoint(model, out / "checkpoint", tokenizer=tokenizer, model_name="unimoe-tiny-smoke")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)
    with torch.no_grad():
        probe = tokenizer(texts[:4], return_tensors="pt", padding=True)
        diff = (reloaded(**probe).logits - model(**probe).logits).abs().max().item()

    num_experts = model.config.moe_config.num_experts
    matrix = load_matrix(stats)
    heatmap = routing_heatmap({"text": matrix}, out / "routing_heatmap.png", num_experts=num_experts)
    summary = {
        "steps": steps,
        "first_lm_loss": losses[0],
        "last_lm_loss": losses[-1],
        "train_seconds": round(train_s, 2),
        "sample": sample,
        "reload_max_abs_logit_diff": diff,
        "checkpoint": str(ckpt),
        "routing_heatmap": str(heatmap),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nlm loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps ({train_s:.1f}s)")
    print(f"sample: {sample!r}")
    print(f"checkpoint: {ckpt} (reloaded, max |logit diff| = {diff:.2e})")
    print(f"expert load per layer (share of routed slots):\n{format_load_table(matrix, num_experts=num_experts)}")
    print(f"routing heatmap: {heatmap}")
    return summary
