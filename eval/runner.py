"""The batched evaluation runner.

For every task it loads the records, asks the model for predictions in batches (greedy generation with left
padding, log-likelihood over the choices, or a forecast), scores them with the task's metrics, and collects how
each modality's tokens were routed. Results are written like lm-eval's: ``results.json``
(``{"results": {task: {metric: value}}, ...}``), ``samples_<task>.jsonl`` (``id``, ``prediction``, ``target``,
``score``), plus ``results.md``, the expert-load report (``expert_load.md``, ``expert_load.png``) and pictures of
forecasts and generated media (``forecasts_<task>.png``, ``samples_<task>.png``).
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from unimoe.data.build import task_dir
from unimoe.data.records import assistant, prompt_messages, read_split
from unimoe.eval.tasks import TaskSpec
from unimoe.processing_unimoe import IGNORE_INDEX


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    num_samples: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0
    forecasts: list | None = None  # full forecasts (quantiles, context) of a forecasting head, for the plot


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_records(spec: TaskSpec, data_root: str | Path | None, limit: int | None) -> list[dict[str, Any]]:
    if spec.reader is not None:
        from unimoe.eval.readers import read_benchmark

        return read_benchmark(spec.reader, Path(spec.path), split=spec.split, limit=limit)
    return read_split(task_dir(data_root, spec.data), spec.split, limit=limit, output=spec.output)


# ----------------------------------------------------------------------------- predictions
@torch.no_grad()
def predict_generate(model, processor, records, *, max_new_tokens: int, batch_size: int, bar=None) -> list[str]:
    tokenizer = processor.tokenizer
    out = []
    for batch in _batches(records, batch_size):
        inputs = processor([prompt_messages(r) for r in batch], add_generation_prompt=True, return_labels=False)
        inputs = inputs.to(model.device)
        generated = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = generated[:, inputs["input_ids"].shape[1] :]
        out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        if bar is not None:
            bar.update(len(batch))
    return out


@torch.no_grad()
def choice_logliks(model, processor, records, *, batch_size: int, bar=None) -> list[list[float]]:
    """Sum of log-probabilities of each choice as the assistant's answer (lm-eval's ``acc``)."""
    convs, owners = [], []
    for i, record in enumerate(records):
        for choice in record["choices"]:
            convs.append([*prompt_messages(record), assistant(choice)])
            owners.append(i)
    scores: list[list[float]] = [[] for _ in records]
    for start in range(0, len(convs), batch_size):
        batch = convs[start : start + batch_size]
        inputs = processor(batch, return_labels=True).to(model.device)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits.float()  # (B, S, V)
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        target = labels[:, 1:]
        mask = target != IGNORE_INDEX
        picked = logprobs.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, S-1)
        for j, value in enumerate((picked * mask).sum(-1).tolist()):
            scores[owners[start + j]].append(value)
        if bar is not None:
            bar.update(len({owners[start + j] for j in range(len(batch))}))
    return scores


def predict_multiple_choice(model, processor, records, *, batch_size: int, bar=None) -> list[str]:
    scores = choice_logliks(model, processor, records, batch_size=batch_size, bar=bar)
    return [r["choices"][int(np.argmax(s))] for r, s in zip(records, scores)]


def predict_forecast(
    model, processor, records, *, max_new_tokens: int, batch_size: int, bar=None
) -> tuple[list[list[float]], list | None]:
    """Point forecasts, plus the full forecasts (quantiles, context) when the model has a forecasting head; without
    one, numbers parsed from generated text (missing values repeat the last parsed number, or 0 when none was
    produced) and no full forecasts."""
    from unimoe.eval.metrics import parse_numbers

    if hasattr(model, "forecast_outputs") and "series" in _generation_heads(model):
        forecasts = model.forecast_outputs(processor, records, batch_size=batch_size)
        if bar is not None:
            bar.update(len(records))
        return [f.point.tolist() for f in forecasts], forecasts
    texts = predict_generate(model, processor, records, max_new_tokens=max_new_tokens, batch_size=batch_size, bar=bar)
    preds = []
    for text, record in zip(texts, records):
        horizon = len(record["target"])
        values = parse_numbers(text, horizon)
        fill = values[-1] if values else 0.0
        preds.append((values + [fill] * horizon)[:horizon])
    return preds, None


@torch.no_grad()
def predict_generated_media(
    model, processor, spec: TaskSpec, records, *, batch_size: int, media_dir: Path | None = None, bar=None
) -> tuple[list[str], list[str | None]]:
    """Generate an image / a clip for every prompt (the model decides to emit the generation token, as in use) and
    let the task's reference judge say what it shows. Returns ``(judged answers, saved media paths)``; a reply
    without the requested medium is judged ``""`` (wrong)."""
    from unimoe.data.tasks_vision import DIGIT_WORDS

    modality = "image" if spec.output == "generate_image" else "audio"
    if modality == "image":
        from unimoe.eval.judge_image import DigitImageJudge

        judge = DigitImageJudge.fit(seed=0)
    else:
        from unimoe.eval.judge_audio import SpokenWordJudge

        judge = SpokenWordJudge().fit()
    if media_dir is not None:
        media_dir.mkdir(parents=True, exist_ok=True)
    answers: list[str] = []
    paths: list[str | None] = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        # one noise seed per prompt (its position): what a prompt gets does not depend on the batch size
        seeds = list(range(start, start + len(batch)))
        outputs = model.generate_multimodal(
            processor, [prompt_messages(r) for r in batch], max_new_tokens=spec.max_new_tokens, seed=seeds
        )
        for record, out in zip(batch, outputs):
            item = (out.images if modality == "image" else out.audio)[:1]
            if not item:
                answers.append("")
                paths.append(None)
                continue
            if modality == "image":
                answers.append(DIGIT_WORDS[judge.predict(item)[0]])
            else:
                answers.append(judge.predict_words([item[0].waveform], item[0].sample_rate)[0])
            path = None
            if media_dir is not None:
                stem = record["id"].replace("/", "_")
                path = media_dir / (f"{stem}.png" if modality == "image" else f"{stem}.wav")
                item[0].save(path)
                path = str(path)
            paths.append(path)
        if bar is not None:
            bar.update(len(batch))
    return answers, paths


# ----------------------------------------------------------------------------- expert load
class ExpertLoadCollector:
    """Sums each MoE layer's per-modality expert load over everything the model runs inside the context."""

    def __init__(self, model):
        from unimoe.moe import SparseMoEBlock

        self.blocks = [m for m in model.modules() if isinstance(m, SparseMoEBlock)]
        self.totals: list[torch.Tensor | None] = [None] * len(self.blocks)

    def __enter__(self) -> ExpertLoadCollector:
        for block in self.blocks:
            block.stats_sink = []
        return self

    def __exit__(self, *exc: object) -> None:
        for i, block in enumerate(self.blocks):
            for stats in block.stats_sink or []:
                load = stats.load_per_modality.detach().cpu()
                self.totals[i] = load if self.totals[i] is None else self.totals[i] + load
            block.stats_sink = None

    def per_modality(self, modalities: Sequence[str]) -> dict[str, np.ndarray]:
        """``{modality: (layers, experts) share of that modality's routed slots}`` for modalities that were seen."""
        if not self.blocks or any(t is None for t in self.totals):
            return {}
        stacked = torch.stack(self.totals)  # (L, M, E)
        out = {}
        for m, name in enumerate(modalities):
            load = stacked[:, m]
            if load.sum() > 0:
                out[name] = (load / load.sum(-1, keepdim=True).clamp_min(1e-9)).numpy()
        return out


# ----------------------------------------------------------------------------- the runner
def run_task(
    model, processor, spec: TaskSpec, records: list[dict], *, batch_size: int, progress: bool,
    media_dir: Path | None = None,
) -> TaskResult:  # fmt: skip
    from unimoe.eval.metrics import METRICS, score

    start = time.perf_counter()
    media_paths = forecasts = None
    wanted = {"generate_image": "image", "generate_audio": "audio"}.get(spec.output)
    if wanted is not None and wanted not in _generation_heads(model):
        return TaskResult(name=spec.name, skipped=f"the model has no {wanted} decoder ({spec.output} needs one)")
    bar = tqdm(total=len(records), desc=f"eval {spec.name}", unit="ex", disable=not progress, leave=False)
    if spec.output in ("generate_image", "generate_audio"):
        preds, media_paths = predict_generated_media(
            model, processor, spec, records, batch_size=batch_size, media_dir=media_dir, bar=bar
        )
    elif spec.output == "generate":
        preds = predict_generate(
            model, processor, records, max_new_tokens=spec.max_new_tokens, batch_size=batch_size, bar=bar
        )
    elif spec.output == "multiple_choice":
        preds = predict_multiple_choice(model, processor, records, batch_size=batch_size, bar=bar)
    elif spec.output == "forecast":
        preds, forecasts = predict_forecast(
            model, processor, records, max_new_tokens=spec.max_new_tokens, batch_size=batch_size, bar=bar
        )
    bar.close()

    references = [r.get("target") if spec.output == "forecast" else r.get("answer") for r in records]
    if records and all(ref is None for ref in references):  # e.g. a benchmark's unlabelled test split
        return TaskResult(
            name=spec.name, num_samples=len(records), seconds=round(time.perf_counter() - start, 2),
            samples=[{"id": r["id"], "prediction": p} for r, p in zip(records, preds)],
            skipped=f"no answers in the data to score against (predictions in samples_{spec.name}.jsonl)",
        )  # fmt: skip
    metrics = score(spec.metrics, preds, references, records)
    primary = METRICS[spec.metrics[0]]
    samples = [
        {
            "id": r["id"],
            "prediction": p,
            "target": ref,
            "score": primary.per_item(p, ref, r),
        }
        for r, p, ref in zip(records, preds, references)
    ]
    for sample, path in zip(samples, media_paths or []):
        sample["media"] = path
    return TaskResult(
        name=spec.name, metrics=metrics, num_samples=len(records), samples=samples,
        seconds=round(time.perf_counter() - start, 2), forecasts=forecasts,
    )  # fmt: skip


def _generation_heads(model) -> Any:
    """The model's generation heads by modality (empty for models without any, e.g. a plain transformers LM)."""
    return getattr(getattr(model, "model", None), "generation_heads", {})


def evaluate(
    model,
    processor,
    tasks: Sequence[TaskSpec],
    *,
    out_dir: str | Path,
    data_root: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
    model_name: str = "",
) -> dict[str, Any]:
    """Evaluate ``tasks`` and write the result files to ``out_dir``. Returns the ``results.json`` content."""
    from unimoe.errors import ConfigError
    from unimoe.eval.report import task_pictures, write_reports

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"evaluate: batch_size must be an integer >= 1, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"evaluate: limit must be None (every example) or an integer >= 1, got {limit!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    if not processor.feature_cache_enabled:
        # multiple-choice scoring reads each item's media once per choice: shapes3d's 360 clouds x 6 choices spent
        # 60 of the tiny recipe's 97 evaluation seconds resampling the same clouds (the cache keys on file + config)
        processor.enable_feature_cache()
    loaded = [(spec, load_records(spec, data_root, limit)) for spec in tasks]  # fail early on missing data
    results: list[TaskResult] = []
    pictures: dict[str, list[str]] = {}
    collector = ExpertLoadCollector(model)
    with collector:
        for spec, records in loaded:
            result = run_task(model, processor, spec, records, batch_size=batch_size, progress=progress,
                              media_dir=out_dir / f"media_{spec.name}")  # fmt: skip
            results.append(result)
            if result.samples:
                with (out_dir / f"samples_{spec.name}.jsonl").open("w") as f:
                    for sample in result.samples:
                        f.write(json.dumps(sample, ensure_ascii=False) + "\n")
                try:
                    if result.skipped is None:
                        pictures[spec.name] = task_pictures(spec, records, result, out_dir)
                except Exception as err:  # a picture must never cost the scores: they are written below
                    warnings.warn(f"eval {spec.name}: pictures not drawn ({type(err).__name__}: {err})", stacklevel=2)
    expert_load = collector.per_modality(model.config.modalities)
    summary = {
        "results": {r.name: r.metrics for r in results if r.skipped is None},
        "n_samples": {r.name: r.num_samples for r in results if r.skipped is None},
        "skipped": {r.name: r.skipped for r in results if r.skipped is not None},
        "seconds": {r.name: r.seconds for r in results},
        "tasks": {spec.name: spec.to_dict() for spec, _ in loaded},
        "config": {"model": model_name, "batch_size": batch_size, "limit": limit, "data_root": str(data_root)},
        "versions": _versions(),
        "expert_load": {m: mat.round(4).tolist() for m, mat in expert_load.items()},
        "pictures": {task: files for task, files in pictures.items() if files},
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    write_reports(summary, out_dir, num_experts=model.config.moe_config.num_experts)
    return summary


def _versions() -> dict[str, str]:
    import transformers

    import unimoe

    return {"unimoe": unimoe.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}  # fmt: skip
