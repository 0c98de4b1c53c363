"""Metrics for ``unimoe eval``: answer normalization, a registry of corpus / per-item metrics, bootstrap intervals.

Every metric in :data:`METRICS` has the same shape (:class:`Metric`):

* ``fn(predictions, references, records) -> float`` — the corpus-level aggregate reported for a task;
* ``per_item(prediction, reference, record) -> float | None`` — the score of one sample (written to
  ``samples_<task>.jsonl``; ``None`` where one sample has no meaningful score);
* ``higher_is_better``.

Conventions:

* text metrics take strings (anything else is ``str()``-ed); ``accuracy`` also accepts a list of acceptable answers
  as the reference (a match with any of them counts);
* forecasting metrics (``mse``, ``mae``, ``mase``) take a list of floats per item, or nested lists (flattened), or
  generated *text* (numbers are pulled out with :func:`parse_numbers`). A forecast shorter than its reference is
  padded with its last value (with the last context value when nothing was predicted, else 0.0); extra values are
  dropped. ``mse`` / ``mae`` pool every forecast value of the corpus (the ETT/Informer convention); ``mase`` is the
  mean of per-item MASE (the M4 convention);
* ``vqa_accuracy`` uses the 10 human answers of ``record["meta"]["answers"]`` when present, else the reference.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unimoe.errors import ConfigError

__all__ = [
    "METRICS",
    "Metric",
    "bootstrap_ci",
    "edit_distance",
    "normalize_answer",
    "parse_numbers",
    "register_metric",
    "score",
]

# ---------------------------------------------------------------------------------------------------------------------
# normalization
# ---------------------------------------------------------------------------------------------------------------------

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
ARTICLES = {"a", "an", "the"}
#: punctuation stripped around words (ASCII plus typographic quotes and dashes)
_PUNCT = string.punctuation + "“”‘’«»–—…¿¡"
_INNER_KEEP = {"-", "'", "’"}


def _clean_token(token: str) -> list[str]:
    """Strip surrounding punctuation; inside a word keep hyphens / apostrophes between letters or digits, and ``.``
    / ``,`` between digits (``3.5``, ``1,000``); any other inner punctuation separates words (``cat/dog``)."""
    token = token.strip(_PUNCT)
    if not token:
        return []
    chars = []
    for i, ch in enumerate(token):
        if ch in _PUNCT:
            prev, nxt = token[i - 1], token[i + 1]  # never at the ends after strip()
            if ch in _INNER_KEEP and prev.isalnum() and nxt.isalnum():
                chars.append("'" if ch == "’" else ch)
            elif ch in ".," and prev.isdigit() and nxt.isdigit():
                chars.append(ch)
            else:
                chars.append(" ")
        else:
            chars.append(ch)
    return [part for part in "".join(chars).split() if part]


def normalize_answer(text: Any, *, drop_articles: bool = True) -> str:
    """A canonical form of a short answer, so that ``"7."``, ``" Seven"`` and ``"seven"`` compare equal.

    Rules, in order:

    1. ``str()`` of the input, lower-cased, split on whitespace;
    2. punctuation around each word is removed; inside a word, hyphens and apostrophes between letters/digits are
       kept (``t-shirt``, ``don't``; a typographic ``’`` becomes ``'``), ``.`` and ``,`` between digits are kept
       (``3.5``), any other punctuation splits the word (``cat/dog`` → ``cat dog``);
    3. the articles ``a``, ``an``, ``the`` are dropped — unless they are the whole answer (so the choice letter
       ``"A"`` survives as ``"a"``), and not at all with ``drop_articles=False`` (used for WER/CER);
    4. whole-word digit strings ``0`` … ``20`` become number words (``"7"`` → ``"seven"``; ``"07"``, ``"21"`` and
       ``"3.5"`` are left alone);
    5. words are joined with single spaces (surrounding whitespace gone).
    """
    words: list[str] = []
    for token in str(text).lower().split():
        words.extend(_clean_token(token))
    if drop_articles:
        kept = [w for w in words if w not in ARTICLES]
        if kept:
            words = kept
    words = [NUMBER_WORDS[int(w)] if w.isdigit() and str(int(w)) == w and int(w) <= 20 else w for w in words]
    return " ".join(words)


_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def parse_numbers(text: Any, n: int | None = None) -> list[float]:
    """The numbers in generated text, in order (``"1.5, -2, 3e2"`` → ``[1.5, -2.0, 300.0]``).

    Commas separate numbers (they are never thousands separators: ``"1,234"`` → ``[1.0, 234.0]``); a ``-`` directly
    before digits is a sign. With ``n``, at most the first ``n`` numbers are returned (never padded — the
    forecasting metrics pad short forecasts themselves)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        values = [float(text)]
    elif isinstance(text, (list, tuple, np.ndarray)):
        values = [float(v) for v in np.asarray(text, dtype=np.float64).ravel()]
    else:
        values = [float(m) for m in _NUMBER_RE.findall(str(text))]
    return values if n is None else values[: max(n, 0)]


# ---------------------------------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Metric:
    name: str
    fn: Callable[[list, list, list[dict]], float]
    higher_is_better: bool
    per_item: Callable[[Any, Any, dict], float | None]
    description: str = ""


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    METRICS[metric.name] = metric
    return metric


def _records(records: Sequence[dict] | None, n: int) -> list[dict]:
    return [{} for _ in range(n)] if records is None else [r or {} for r in records]


def _mean_of_items(per_item: Callable[[Any, Any, dict], float | None]) -> Callable[[list, list, list[dict]], float]:
    """Corpus score = mean of the per-item scores that are not ``None`` (NaN when there are none)."""

    def fn(predictions: list, references: list, records: list[dict] | None = None) -> float:
        scores = [
            s
            for p, r, rec in zip(predictions, references, _records(records, len(predictions)))
            if (s := per_item(p, r, rec)) is not None and math.isfinite(s)
        ]
        return float(np.mean(scores)) if scores else float("nan")

    return fn


# -- text --------------------------------------------------------------------------------------------------------------


def _accuracy_item(prediction: Any, reference: Any, record: dict | None = None) -> float:
    references = reference if isinstance(reference, (list, tuple)) else [reference]
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def _exact_item(prediction: Any, reference: Any, record: dict | None = None) -> float:
    return float(str(prediction).strip() == str(reference).strip())


def edit_distance(hypothesis: Sequence, reference: Sequence) -> int:
    """Levenshtein distance (substitutions + deletions + insertions, each cost 1) between two sequences."""
    previous = list(range(len(reference) + 1))
    for i, h in enumerate(hypothesis, 1):
        current = [i]
        for j, r in enumerate(reference, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (h != r)))
        previous = current
    return previous[-1]


def _words(text: Any) -> list[str]:
    return normalize_answer(text, drop_articles=False).split()


def _chars(text: Any) -> list[str]:
    return list(normalize_answer(text, drop_articles=False))


def _error_rate(tokens: Callable[[Any], list[str]]):
    def counts(prediction: Any, reference: Any) -> tuple[int, int]:
        ref = tokens(reference)
        return edit_distance(tokens(prediction), ref), len(ref)

    def per_item(prediction: Any, reference: Any, record: dict | None = None) -> float | None:
        edits, length = counts(prediction, reference)
        return edits / length if length else None

    def fn(predictions: list, references: list, records: list[dict] | None = None) -> float:
        edits = length = 0
        for p, r in zip(predictions, references):
            e, n = counts(p, r)
            edits, length = edits + e, length + n
        return edits / max(length, 1)

    return fn, per_item


# -- forecasting -------------------------------------------------------------------------------------------------------


def _context(record: dict | None) -> np.ndarray | None:
    """The item's context as ``(L, C)`` float64: ``meta["context"]``, else the first ``series`` media file (.npy or
    .csv/.tsv/.txt via the series encoder's loader), else None."""
    record = record or {}
    meta = record.get("meta") or {}
    if meta.get("context") is not None:
        array = np.asarray(meta["context"], dtype=np.float64)
        return array[:, None] if array.ndim == 1 else array.reshape(len(array), -1)
    for message in record.get("messages") or []:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "series" and part.get("path"):
                path = Path(part["path"])
                if path.suffix.lower() == ".npy":
                    array = np.load(path, allow_pickle=False).astype(np.float64)
                else:
                    from unimoe.encoders.series import TimeSeriesEncoder, TimeSeriesEncoderConfig

                    array = TimeSeriesEncoder.load(path, TimeSeriesEncoderConfig(num_channels=1 << 20))
                    array = array.astype(np.float64)
                return array[:, None] if array.ndim == 1 else array.reshape(len(array), -1)
    return None


def _reference_values(reference: Any, record: dict | None) -> np.ndarray:
    if reference is None and record:
        reference = record.get("target")
    return np.asarray(parse_numbers(reference), dtype=np.float64)


def _forecast(prediction: Any, reference: Any, record: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """(forecast, reference) as equal-length 1-D arrays (see the module docstring for padding)."""
    ref = _reference_values(reference, record)
    pred = parse_numbers(prediction, len(ref))
    if len(pred) < len(ref):
        if pred:
            fill = pred[-1]
        else:
            context = _context(record)
            fill = (
                float(context[-1, -1]) if context is not None and len(context) and np.isfinite(context[-1, -1]) else 0.0
            )
        pred = pred + [fill] * (len(ref) - len(pred))
    return np.asarray(pred, dtype=np.float64), ref


def _pooled(error: Callable[[np.ndarray], np.ndarray]):
    def per_item(prediction: Any, reference: Any, record: dict | None = None) -> float | None:
        pred, ref = _forecast(prediction, reference, record)
        return float(np.mean(error(pred - ref))) if len(ref) else None

    def fn(predictions: list, references: list, records: list[dict] | None = None) -> float:
        errors = [
            error(p - r)
            for pred, ref, rec in zip(predictions, references, _records(records, len(predictions)))
            for p, r in [_forecast(pred, ref, rec)]
        ]
        values = np.concatenate(errors) if errors else np.zeros(0)
        return float(np.mean(values)) if len(values) else float("nan")

    return fn, per_item


def seasonal_naive_scale(context: np.ndarray, season: int = 1) -> float | None:
    """M4's MASE denominator: mean ``|y_t - y_{t-m}|`` over the context (all channels, NaNs ignored). When the
    context is not longer than ``m`` the season falls back to 1; None when the scale is 0 or undefined."""
    context = np.asarray(context, dtype=np.float64)
    if context.ndim == 1:
        context = context[:, None]
    m = int(season) if season and int(season) >= 1 else 1
    if len(context) <= m:
        m = 1
    if len(context) <= m:
        return None
    diffs = np.abs(context[m:] - context[:-m])
    diffs = diffs[np.isfinite(diffs)]
    if not len(diffs):
        return None
    scale = float(np.mean(diffs))
    return scale if scale > 0 else None


def _mase_item(prediction: Any, reference: Any, record: dict | None = None) -> float | None:
    """MAE of the forecast / the seasonal-naive in-sample MAE of the context (``meta["season"]``, default 1); None
    without a context or with a zero scale (a constant context)."""
    pred, ref = _forecast(prediction, reference, record)
    context = _context(record)
    if context is None or not len(ref):
        return None
    meta = (record or {}).get("meta") or {}
    channel = meta.get("target_channel")
    if channel is not None and context.shape[1] > 1:
        context = context[:, int(channel)]
    scale = seasonal_naive_scale(context, meta.get("season") or 1)
    if scale is None:
        return None
    return float(np.mean(np.abs(pred - ref)) / scale)


# -- VQA ---------------------------------------------------------------------------------------------------------------


def _vqa_item(prediction: Any, reference: Any, record: dict | None = None) -> float:
    """VQAv2 accuracy, the official leave-one-out form: for each of the N human answers, ``min(1, #matches among the
    other N-1 / 3)``, averaged over the N subsets (N = 10: the 10-choose-9 average). Answers are compared after
    :func:`normalize_answer`. A single reference string (no human answer list) scores as normalized exact match."""
    meta = (record or {}).get("meta") or {}
    answers = meta.get("answers") if isinstance(meta.get("answers"), list) else reference
    if not isinstance(answers, (list, tuple)):
        return _accuracy_item(prediction, answers)
    if len(answers) == 1:
        return _accuracy_item(prediction, answers[0])
    if not answers:
        return 0.0
    pred = normalize_answer(prediction)
    matches = [normalize_answer(a) == pred for a in answers]
    total = sum(matches)
    return float(np.mean([min(1.0, (total - m) / 3.0) for m in matches]))


# -- registration ------------------------------------------------------------------------------------------------------

register_metric(Metric("accuracy", _mean_of_items(_accuracy_item), True, _accuracy_item, "normalized exact match"))
register_metric(Metric("exact_match", _mean_of_items(_exact_item), True, _exact_item, "string equality after strip"))
_wer_fn, _wer_item = _error_rate(_words)
register_metric(Metric("wer", _wer_fn, False, _wer_item, "corpus word error rate"))
_cer_fn, _cer_item = _error_rate(_chars)
register_metric(Metric("cer", _cer_fn, False, _cer_item, "corpus character error rate"))
_mse_fn, _mse_item = _pooled(np.square)
register_metric(Metric("mse", _mse_fn, False, _mse_item, "mean squared error over all forecast values"))
_mae_fn, _mae_item = _pooled(np.abs)
register_metric(Metric("mae", _mae_fn, False, _mae_item, "mean absolute error over all forecast values"))
register_metric(Metric("mase", _mean_of_items(_mase_item), False, _mase_item, "mean of per-item MASE (M4)"))
register_metric(Metric("vqa_accuracy", _mean_of_items(_vqa_item), True, _vqa_item, "VQAv2 10-choose-9 accuracy"))


# ---------------------------------------------------------------------------------------------------------------------
# scoring helpers
# ---------------------------------------------------------------------------------------------------------------------


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; choose one of {', '.join(sorted(METRICS))}")
    return METRICS[name]


def score(
    metric_names: Sequence[str], predictions: Sequence, references: Sequence, records: Sequence[dict] | None = None
) -> dict[str, float]:
    """``{metric name: corpus score}`` for each named metric (unknown names raise ConfigError)."""
    metrics = [get_metric(name) for name in metric_names]
    if len(predictions) != len(references) or (records is not None and len(records) != len(predictions)):
        raise ValueError(
            f"score: {len(predictions)} predictions, {len(references)} references"
            + ("" if records is None else f", {len(records)} records")
            + " — they must be the same length"
        )
    recs = _records(records, len(predictions))
    return {m.name: float(m.fn(list(predictions), list(references), recs)) for m in metrics}


def bootstrap_ci(
    per_item_scores: Sequence[float | None], n: int = 1000, seed: int = 0, *, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap interval (default 95 %) of the mean of the per-item scores (None / NaN are left out):
    ``n`` resamples with replacement, seeded. (NaN, NaN) without scores; a single score gives (score, score)."""
    values = np.asarray([s for s in per_item_scores if s is not None and math.isfinite(s)], dtype=np.float64)
    if not len(values):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // len(values))  # bounded memory for large tasks
    means = np.concatenate(
        [
            values[rng.integers(0, len(values), size=(min(chunk, n - i), len(values)))].mean(axis=1)
            for i in range(0, n, chunk)
        ]
    )
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
