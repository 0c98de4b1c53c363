"""Pictures and files the demo shows beside the chat: point-cloud and time-series previews of the uploads, forecast
plots, and the routing summary. Nothing here touches gradio, so each piece is testable on its own.

Plots are built with ``matplotlib.figure.Figure`` rather than ``pyplot``: the app renders from gradio's worker
threads, and pyplot keeps global state that is neither thread-safe nor freed unless every figure is closed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

#: Points drawn in the browser preview; more only slows the page down without showing anything new.
MAX_PREVIEW_POINTS = 20_000


def load_media(processor, modality: str, path: str | Path) -> np.ndarray:
    """Decode a file exactly as the processor will (same loader, same size limit), so a preview shows what the model
    reads and a bad file fails here with the same :class:`~unimoe.encoders.MediaError`."""
    from unimoe.encoders import encoder_class

    spec = processor.media_config["encoders"][modality]
    cls, config = encoder_class(spec, modality)
    return cls.load(str(path), config, max_bytes=getattr(processor, "max_file_bytes", None))


def enlarged_for_display(path: str | Path, *, min_side: int = 256) -> Path:
    """A copy of a small image scaled up by a whole factor with nearest-neighbour pixels (``name_x8.png``).

    The chat shows images at their natural size, so a 32x32 digit from a tiny decoder would be a speck; the original
    file is kept for downloads and the API."""
    from PIL import Image

    path = Path(path)
    with Image.open(path) as image:
        factor = -(-min_side // max(1, min(image.size)))  # ceil
        if factor <= 1:
            return path
        out = path.with_name(f"{path.stem}_x{factor}.png")
        image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST).save(out)
    return out


def write_point_cloud_preview(points: np.ndarray, out: str | Path, *, seed: int = 0) -> Path:
    """``(N, C)`` points → a ``.ply`` point cloud (xyz, plus rgb when the file has it) for ``gr.Model3D``.

    Every input format (``.npy``, ``.xyz``, ``.off``, meshes) is written out as one format the browser viewer reads;
    large clouds are subsampled (fixed seed, so the same upload always previews the same way)."""
    import trimesh

    points = np.asarray(points, dtype=np.float32)
    if len(points) > MAX_PREVIEW_POINTS:
        keep = np.random.default_rng(seed).choice(len(points), MAX_PREVIEW_POINTS, replace=False)
        points = points[np.sort(keep)]
    colors = None
    if points.shape[1] >= 6:
        rgb = points[:, 3:6]
        scale = 255.0 if rgb.max(initial=0.0) <= 1.0 else 1.0
        colors = np.clip(rgb * scale, 0, 255).astype(np.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    trimesh.PointCloud(points[:, :3], colors=colors).export(out)
    return out


def series_figure(series: np.ndarray, *, title: str = ""):
    """A line plot of a ``(L, C)`` series, one line per channel (missing values leave gaps)."""
    from matplotlib.figure import Figure

    series = np.asarray(series, dtype=np.float32)
    if series.ndim == 1:
        series = series[:, None]
    fig = Figure(figsize=(6, 2.8), tight_layout=True)
    ax = fig.add_subplot()
    for c in range(series.shape[1]):
        ax.plot(series[:, c], linewidth=1.2, label=f"channel {c}")
    if series.shape[1] > 1:
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def forecast_figure(context: np.ndarray, point: np.ndarray, quantiles: Mapping[float, np.ndarray] | None = None):
    """The context, the point forecast after it, and the widest quantile band (e.g. 10 %-90 %) shaded."""
    from matplotlib.figure import Figure

    from unimoe.viz import draw_forecast

    fig = Figure(figsize=(6, 2.8), tight_layout=True)
    ax = fig.add_subplot()
    draw_forecast(ax, context, point, quantiles, lw=1.2)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return fig


def save_figure(fig, out: str | Path, *, dpi: int = 100) -> Path:
    """Write a figure as a PNG (what the chat and the preview panel show, and what API clients download)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi)
    return out


def routing_summary(matrices: Mapping[str, np.ndarray], *, num_experts: int) -> str:
    """Markdown: for each modality and MoE layer, the expert that took the largest share of that modality's routed
    slots in the last reply (null experts are named ``n0, n1, ...``) — the heatmap's numbers in words."""
    if not matrices:
        return "No expert routing was recorded for the last reply (the model has no MoE layers)."
    lines = ["| modality | " + " | ".join(f"layer {i}" for i in range(_num_layers(matrices))) + " |"]
    lines.append("|---|" + "---|" * _num_layers(matrices))
    for name, matrix in matrices.items():
        cells = []
        for row in matrix:
            e = int(np.argmax(row))
            label = f"e{e}" if e < num_experts else f"n{e - num_experts}"
            cells.append(f"{label} ({100 * float(row[e]):.0f}%)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "Most used expert per MoE layer (share of the modality's routed slots):\n\n" + "\n".join(lines)


def _num_layers(matrices: Mapping[str, np.ndarray]) -> int:
    return max(m.shape[0] for m in matrices.values())
