"""Human-readable reports of an evaluation: a markdown results table, the per-modality expert-load report, and
pictures of what the model produced (forecast plots, generated images and speech)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from unimoe.viz import forecast_grid, format_load_table, media_grid, routing_heatmap

FORECAST_PANELS = 8  # forecasts plotted per task, spread over its series
MEDIA_PER_VALUE = 3  # generated items shown per requested value (digit, word)


def results_table(summary: dict[str, Any]) -> str:
    lines = ["| task | metric | value | n |", "|---|---|---|---|"]
    for task, metrics in summary["results"].items():
        n = summary.get("n_samples", {}).get(task, "")
        for metric, value in metrics.items():
            lines.append(f"| {task} | {metric} | {value:.4f} | {n} |")
    for task, reason in summary.get("skipped", {}).items():
        lines.append(f"| {task} | skipped | {reason} | |")
    return "\n".join(lines)


def picture_files(summary: dict[str, Any]) -> list[str]:
    """Every picture an evaluation wrote (names inside its directory): expert load first, then each task's."""
    names = ["expert_load.png"] if summary.get("expert_load") else []
    return names + [name for files in summary.get("pictures", {}).values() for name in files]


def pictures_markdown(summary: dict[str, Any], prefix: str = "") -> str:
    """Markdown that shows :func:`picture_files` (``prefix`` = where they are relative to the document)."""
    return "\n\n".join(f"![{Path(name).stem}]({prefix}{name})" for name in picture_files(summary))


def task_pictures(spec, records: list[dict[str, Any]], result, out_dir: Path) -> list[str]:
    """Draw one task's results: forecasts (``forecasts_<task>.png``: history, median, quantile band, actual values,
    a few series of each dataset) or generated media (``samples_<task>.png``: a few items per requested value,
    titled by whether the judge recognised it). Returns the file names written (none for other tasks)."""
    if result.forecasts:
        metric = spec.metrics[0]
        picked = _spread([(r.get("meta") or {}).get("series", "") for r in records], FORECAST_PANELS)
        titles = [f"{(records[i].get('meta') or {}).get('series', records[i]['id'])} · {metric} "
                  f"{result.samples[i]['score']:.2f}" for i in picked]  # fmt: skip
        name = f"forecasts_{spec.name}.png"
        forecast_grid([result.forecasts[i] for i in picked], [records[i].get("target") for i in picked], titles,
                      out_dir / name, title=f"{spec.name}: forecasts on the test split")  # fmt: skip
        return [name]
    media = [(s["media"], str(s["target"]), str(s["prediction"])) for s in result.samples if s.get("media")]
    if not media:
        return []
    from unimoe.data.tasks_vision import DIGIT_WORDS

    kind = "image" if spec.output == "generate_image" else "audio"
    judged = sum(want == got for _, want, got in media)
    name = f"samples_{spec.name}.png"
    media_grid(media, out_dir / name, kind=kind, per_column=MEDIA_PER_VALUE,
               columns=DIGIT_WORDS if all(m[1] in DIGIT_WORDS for m in media) else None,
               title=f"{spec.name}: generated for the test prompts (green = the judge agrees; "
                     f"{judged}/{len(media)} in all)")  # fmt: skip
    return [name]


def _spread(groups: list[str], n: int) -> list[int]:
    """Up to ``n`` indices taking each group's items in turn (first of every group, then second, ...)."""
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    picked: list[int] = []
    for rank in range(max((len(m) for m in members.values()), default=0)):
        picked += [m[rank] for m in members.values() if rank < len(m)]
    return picked[:n]


def specialization(matrices: dict[str, np.ndarray]) -> dict[str, float]:
    """How much each modality's routing differs from text's, per modality: mean over layers of the total
    variation distance between the two expert-load distributions (0 = identical, 1 = disjoint experts)."""
    if "text" not in matrices:
        return {}
    text = matrices["text"]
    return {m: float(0.5 * np.abs(mat - text).sum(-1).mean()) for m, mat in matrices.items() if m != "text"}


def write_reports(summary: dict[str, Any], out_dir: Path, *, num_experts: int) -> None:
    pictures = pictures_markdown(summary)
    (out_dir / "results.md").write_text(results_table(summary) + ("\n\n## Pictures\n\n" + pictures if pictures else "")
                                        + "\n")  # fmt: skip
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
