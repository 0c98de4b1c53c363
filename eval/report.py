"""Human-readable reports of an evaluation: a markdown results table and the per-modality expert-load report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from unimoe.viz import format_load_table, routing_heatmap


def results_table(summary: dict[str, Any]) -> str:
    lines = ["| task | metric | value | n |", "|---|---|---|---|"]
    for task, metrics in summary["results"].items():
        n = summary.get("n_samples", {}).get(task, "")
        for metric, value in metrics.items():
            lines.append(f"| {task} | {metric} | {value:.4f} | {n} |")
    for task, reason in summary.get("skipped", {}).items():
        lines.append(f"| {task} | skipped | {reason} | |")
    return "\n".join(lines)


def specialization(matrices: dict[str, np.ndarray]) -> dict[str, float]:
    """How much each modality's routing differs from text's, per modality: mean over layers of the total
    variation distance between the two expert-load distributions (0 = identical, 1 = disjoint experts)."""
    if "text" not in matrices:
        return {}
    text = matrices["text"]
    return {m: float(0.5 * np.abs(mat - text).sum(-1).mean()) for m, mat in matrices.items() if m != "text"}


def write_reports(summary: dict[str, Any], out_dir: Path, *, num_experts: int) -> None:
    (out_dir / "results.md").write_text(results_table(summary) + "\n")
    matrices = {m: np.asarray(v) for m, v in summary.get("expert_load", {}).items()}
    if not matrices:
        return
    intro = "Share of each modality's routed slots per MoE layer (rows) and expert (columns; n* = null experts)."
    parts = ["# Expert load per modality", "", intro, ""]
    for modality, mat in matrices.items():
        parts += [f"## {modality}", "", format_load_table(mat, num_experts=num_experts), ""]
    spec = specialization(matrices)
    if spec:
        parts += ["## Specialization", "", "Total-variation distance from the text tokens' routing (0 = same experts):",
                  ""]  # fmt: skip
        parts += [f"- {m}: {v:.3f}" for m, v in spec.items()]
    (out_dir / "expert_load.md").write_text("\n".join(parts) + "\n")
    routing_heatmap(matrices, out_dir / "expert_load.png", num_experts=num_experts, title="Expert load per modality")
