"""Pictures people expect from an MoE repository: routing heatmaps (layers x experts, per modality), forecasts with
their quantile bands, and generated images / speech laid out by what was asked for."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
    _suptitle(fig, title)
    fig.tight_layout()
    return _save(fig, path)


def format_load_table(matrix: np.ndarray, *, num_experts: int) -> str:
    """Markdown table of a ``(L, E_total)`` load-share matrix (null experts marked ``n0, n1, ...``)."""
    cols = [f"e{i}" if i < num_experts else f"n{i - num_experts}" for i in range(matrix.shape[1])]
    lines = ["| layer | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for i, row in enumerate(matrix):
        lines.append(f"| {i} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines)


def draw_forecast(
    ax,
    context: Sequence[float],
    point: Sequence[float],
    quantiles: Mapping[Any, Sequence[float]] | None = None,
    target: Sequence[float] | None = None,
    *,
    history: int | None = None,
    lw: float = 1.0,
) -> None:
    """One forecast on a matplotlib axis: the context (its last ``history`` steps) at steps -L..-1, then from step 0
    the median, the outermost quantile band and the actual values when known. ``quantiles`` keys are levels, as
    numbers or strings (``"0.1"``: a forecast that went through JSON). The one drawing used by the evaluation's grid,
    :meth:`Forecast.plot <unimoe.generation.Forecast.plot>` and the demo."""
    context = np.asarray(context, dtype=float).reshape(-1)[-history if history else 0 :]
    point = np.asarray(point, dtype=float).reshape(-1)
    ahead = np.arange(len(point))
    ax.plot(np.arange(-len(context), 0), context, color="black", lw=lw, label="history")
    levels = {float(k): k for k in (quantiles or {})}
    if len(levels) >= 2:
        low, high = min(levels), max(levels)
        ax.fill_between(ahead, np.asarray(quantiles[levels[low]], dtype=float).reshape(-1),
                        np.asarray(quantiles[levels[high]], dtype=float).reshape(-1), color="tab:blue", alpha=0.25,
                        lw=0, label=f"q{low:g}–q{high:g}")  # fmt: skip
    ax.plot(ahead, point, color="tab:blue", lw=1.5 * lw, label="median")
    if target is not None:
        target = np.asarray(target, dtype=float).reshape(-1)[: len(point)]
        ax.plot(ahead[: len(target)], target, color="tab:orange", lw=lw, ls="--", label="actual")
    ax.axvline(-0.5, color="grey", lw=0.5, ls=":")


def forecast_grid(
    forecasts: Sequence,
    targets: Sequence[Sequence[float] | None],
    titles: Sequence[str],
    path: str | Path,
    *,
    history: int = 96,
    cols: int = 4,
    title: str = "Forecasts",
) -> Path:
    """One panel per :class:`~unimoe.generation.Forecast`: the last ``history`` steps of its context, the median
    with the outer quantile band, and the actual values when known (step 0 = the first forecast step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, min(cols, len(forecasts)))
    rows = max(1, -(-len(forecasts) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.5 * rows), squeeze=False)
    for ax, forecast, target, name in zip(axes.flat, forecasts, targets, titles):
        draw_forecast(ax, forecast.context, forecast.point, forecast.quantiles, target, history=history, lw=0.8)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes.flat[len(forecasts) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="upper left")
    _suptitle(fig, title)
    fig.tight_layout()
    return _save(fig, path)


def media_grid(
    items: Sequence[tuple[str, str, str]],
    path: str | Path,
    *,
    kind: str = "image",
    columns: Sequence[str] | None = None,
    per_column: int = 3,
    title: str = "Generated",
) -> Path:
    """Generated media laid out by what was asked for. ``items`` are ``(file, requested, judged)``, where
    ``judged`` is what a judge recognised in the file. One column per requested value (those in ``columns`` first,
    in that order, then the rest sorted), up to ``per_column`` rows. Images are shown as they are, audio
    (``kind="audio"``, a sound file) as a spectrogram. Titles are green when the judge recognised the requested
    value, red with what it recognised instead when it did not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_value: dict[str, list[tuple[str, str]]] = {}
    for file, requested, judged in items:
        by_value.setdefault(requested, []).append((file, judged))
    order = [c for c in (columns or []) if c in by_value]
    order += sorted(v for v in by_value if v not in order)
    rows = max(1, min(per_column, max((len(v) for v in by_value.values()), default=1)))
    width, height = (1.2, 1.4) if kind == "image" else (1.8, 1.4)
    fig, axes = plt.subplots(rows, max(1, len(order)), figsize=(width * max(1, len(order)) + 0.4, height * rows + 0.5),
                             squeeze=False)  # fmt: skip
    for col, value in enumerate(order):
        for row in range(rows):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if row >= len(by_value[value]):
                ax.axis("off")
                continue
            file, judged = by_value[value][row]
            if kind == "image":
                from PIL import Image

                with Image.open(file) as image:
                    ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
            else:
                ax.imshow(_log_mel(file), origin="lower", aspect="auto", cmap="magma", interpolation="nearest")
            correct = judged == value
            ax.set_title(value if correct else f"{value} ({judged or 'nothing'}?)", fontsize=7,
                         color="tab:green" if correct else "tab:red")  # fmt: skip
    _suptitle(fig, title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _log_mel(file: str | Path, n_mels: int = 40) -> np.ndarray:
    """``(n_mels, frames)`` log-mel spectrogram of a sound file's first channel (10 ms hop): a coarse picture that
    shows the words' shape and keeps the grid's PNG small (a full-resolution spectrogram of noise-like vocoder
    output compresses badly)."""
    import soundfile as sf
    import torch
    import torchaudio

    wave, rate = sf.read(str(file), dtype="float32", always_2d=True)
    mel = torchaudio.transforms.MelSpectrogram(rate, n_fft=512, hop_length=max(1, rate // 100), n_mels=n_mels)
    return mel(torch.from_numpy(wave[:, 0].copy())).clamp_min(1e-8).log10().numpy()


def _suptitle(fig, title: str, fontsize: float | None = None) -> None:
    """The figure's title, wrapped to its width: a narrow figure (a few samples) would otherwise cut it off."""
    import textwrap

    import matplotlib
    from matplotlib.font_manager import FontProperties

    # "large" and the other named sizes resolve to points as matplotlib itself resolves them
    size = FontProperties(size=fontsize or matplotlib.rcParams["figure.titlesize"]).get_size_in_points()
    per_line = max(12, int(fig.get_figwidth() * 72 / (0.6 * size)))  # ~0.6 em per character
    fig.suptitle(textwrap.fill(title, per_line), fontsize=fontsize)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
