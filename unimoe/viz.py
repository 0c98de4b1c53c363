"""Pictures people expect from an MoE repository: routing heatmaps (layers x experts, per modality)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def load_matrix(stats: Sequence, modality: int | None = None) -> np.ndarray:
    """Share of each expert's load per MoE layer, ``(L, E_total)`` rows summing to 1. ``stats`` is a sequence of
    :class:`unimoe.moe.RouterStats` (one per MoE layer); ``modality`` restricts to that modality id's tokens."""
    rows = []
    for s in stats:
        load = s.load if modality is None else s.load_per_modality[modality]
        load = load.detach().float().cpu().numpy()
        rows.append(load / max(load.sum(), 1e-9))
    return np.stack(rows) if rows else np.zeros((0, 0))


def routing_heatmap(
    matrices: dict[str, np.ndarray], path: str | Path, *, num_experts: int | None = None, title: str = "Expert load"
) -> Path:
    """One panel per modality: rows are MoE layers, columns experts (null experts after the dashed line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, m in matrices.items() if m.size]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(3.2 * max(1, len(names)) + 1, 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        mat = matrices[name]
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(mat.max()), 1e-6))
        ax.set_title(name)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_xticks(range(mat.shape[1]))
        ax.set_yticks(range(mat.shape[0]))
        if num_experts is not None and num_experts < mat.shape[1]:
            ax.axvline(num_experts - 0.5, color="white", linestyle="--", linewidth=1)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_load_table(matrix: np.ndarray, *, num_experts: int) -> str:
    """Markdown table of a ``(L, E_total)`` load-share matrix (null experts marked ``n0, n1, ...``)."""
    cols = [f"e{i}" if i < num_experts else f"n{i - num_experts}" for i in range(matrix.shape[1])]
    lines = ["| layer | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for i, row in enumerate(matrix):
        lines.append(f"| {i} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines)
