"""Closed-form refit of the forecasting head's linear skip after training.

The head's point forecast is ``mlp(queries) + sum_k gate_k(queries) * (window @ W_k + b_k)`` (see
:class:`~unimoe.generation.heads.LinearForecasters`). With the LLM, the MLP and the gate held as trained, the forecast
is linear in the skip's weights, so the weights that fit the training windows best are one ridge regression away —
where SGD, sharing a few thousand steps with every other task, leaves them short of it (the trained tiny model's
forecasts scored MASE 0.68-1.05 over runs; a per-series ridge on the raw lags scores 0.639, docs/results.md).

Two more kinds of candidate are tried beside the trained gate and the full MLP path, because trained models showed
both to be what held the skip back:

- **A gate that names the series.** Trained in mixed multimodal batches, the gate collapsed onto 2 of its 8 linear
  forecasters (one for the quarterly series, one for weekly CO2, monthly El Niño and yearly sunspots alike), while
  the query states it reads do tell the seven series apart. When the training records name their series
  (``meta.series``) and there are no more series than forecasters, the ``series`` candidate rewrites the gate's
  linear layer as a multinomial logistic regression of those names on its normalized inputs: series i → forecaster
  i. The model still needs no name at inference; it recognises the series from the prompt and the values. Without
  names the ``clustered`` candidate stands in: nearest centroid of a k-means of the same inputs
  (``argmin_k |z - c_k|^2 = argmax_k 2 c_k.z - |c_k|^2``, also a linear layer) — hard EM's first step for a mixture
  of linear experts; on trained checkpoints it sent a third of the test sunspots windows to El Niño's cluster,
  where the classifier keeps each series on its own forecaster.
- **The MLP's share of the centre.** Fitted per window on a few hundred series, the MLP's median adds more noise
  than signal on some series (one trained dense model: CPI MASE 2.05 with it, 0.39 without). With ``center`` c the
  MLP's last layer is rewritten so every quantile moves by ``-(1 - c) * median``: the band keeps its width, the
  centre keeps a share c of the MLP's point forecast and the linear forecasters supply the rest.

Every (gate, centre, penalty) candidate is scored on the validation windows by MASE, and the model is changed only
when the best one beats the trained head there; the winner is then fitted once more on train + validation windows
(``with_validation``). The ridge shrinks toward the trained weights (toward the naive forecast for a rewritten gate,
whose forecasters have no trained counterpart), so a large penalty keeps them.
Written here rather than with scikit-learn: each horizon step has its own set of windows (a series' horizon may be
shorter than the head's ``max_horizon``), the prior is non-zero, and scikit-learn is only in the ``data`` extra — a
masked solve of a ``K (W + 1)``-square system per step, a k-means and an L-BFGS logistic regression are a few
lines of torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from unimoe.errors import ConfigError

DEFAULT_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_CENTERS = (1.0, 0.0)
GATES = ("trained", "series", "clustered")
DEFAULT_GATES = ("trained", "series")


@dataclass
class RefitReport:
    """What the refit did: the chosen gate, MLP centre share and relative penalty (all None: the trained head was
    kept), validation MASE, and how many training windows each linear forecaster gets under the chosen gate."""

    alpha: float | None
    validation_mase_before: float
    validation_mase_after: float
    train_windows: int
    validation_windows: int
    gate: str | None = None
    center: float | None = None
    candidates: dict[str, float] = field(default_factory=dict)  # "gate center=c alpha=a" -> validation MASE
    forecaster_windows: list[int] = field(default_factory=list)  # training windows per forecaster (argmax gate)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _HeadInputs:
    """What the forecasting head saw for a list of records (row i = record i), in its normalized units."""

    queries: torch.Tensor  # (n, N*H) the flattened query states the MLP and the gate read
    mlp: torch.Tensor  # (n, H_max) the MLP path's median
    window: torch.Tensor  # (n, W) the skip's window of the normalized context
    loc: torch.Tensor  # (n,)
    scale: torch.Tensor  # (n,)


@contextmanager
def _recording(model, sink: list):
    """Record ``(query states, normalized context, loc, scale)`` of every forecast the model makes. The forecast
    path has no hook that sees ``loc`` / ``scale``, so the bound method is shadowed on the instance for the block
    (and the class's method restored after it)."""
    original = model.forecast_prediction

    def recording(input_ids, hidden, series_values, series_mask, *, context=None):
        if context is None:
            context = model.model.forecast_context(input_ids, series_values, series_mask)
        states = model.model.query_states(input_ids, hidden, "series")
        sink.append((states.flatten(1).float(), context[0].float(), context[1].float(), context[2].float()))
        return original(input_ids, hidden, series_values, series_mask, context=context)

    model.forecast_prediction = recording
    try:
        yield
    finally:
        del model.forecast_prediction


def _on_head(head, x: torch.Tensor) -> torch.Tensor:
    weight = next(head.parameters())
    return x.to(device=weight.device, dtype=weight.dtype)


@torch.no_grad()
def _head_inputs(model, processor, records: Sequence[dict], batch_size: int) -> _HeadInputs:
    head = model.model.generation_heads["series"]
    sink: list = []
    with _recording(model, sink):
        model.forecast_outputs(processor, list(records), batch_size=batch_size)
    queries, context, loc, scale = (torch.cat(parts).cpu() for parts in zip(*sink))
    median = head.config.quantiles.index(0.5)
    mlp = head.mlp(_on_head(head, queries)).view(len(queries), head.config.max_horizon, -1)[..., median]
    return _HeadInputs(queries=queries, mlp=mlp.double().cpu(), window=context[:, -head.skip.window :].double(),
                       loc=loc.double(), scale=scale.double())  # fmt: skip


@torch.no_grad()
def _gate_probs(skip, inputs: _HeadInputs, linear: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``(n, K)`` mixing weights of the linear forecasters; ``linear`` = (weight, bias) replacing the gate's linear
    layer (the clustered candidate)."""
    if skip.gate is None:
        return torch.ones(len(inputs.queries), 1, dtype=torch.float64)
    normed = skip.gate[0](_on_head(skip, inputs.queries))
    if linear is None:
        logits = skip.gate[1](normed)
    else:
        logits = torch.nn.functional.linear(normed.double(), *(t.to(normed.device) for t in linear))
    return logits.double().softmax(-1).cpu()


def _features(gate: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Gate-weighted ``[window, 1]`` per linear forecaster: ``(n, K * (W + 1))``."""
    ones = torch.ones(len(window), 1, dtype=window.dtype)
    return (gate[:, :, None] * torch.cat([window, ones], dim=1)[:, None, :]).flatten(1)


def _kmeans(points: torch.Tensor, k: int, *, restarts: int = 10, iterations: int = 100, seed: int = 0) -> torch.Tensor:
    """``(k, D)`` centroids of ``points (n, D)``: Lloyd's algorithm from ``restarts`` seeded k-means++ starts, the
    run with the smallest within-cluster sum of squares kept (one start often merges two series)."""
    generator = torch.Generator().manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centroids = points[torch.randint(len(points), (1,), generator=generator)]
        while len(centroids) < k:  # k-means++: each next centroid drawn with probability ~ squared distance
            distance = torch.cdist(points, centroids).min(dim=1).values.square()
            if not bool(distance.sum() > 0):
                break  # fewer distinct points than clusters
            centroids = torch.cat([centroids, points[torch.multinomial(distance, 1, generator=generator)]])
        for _ in range(iterations):
            assign = torch.cdist(points, centroids).argmin(dim=1)
            moved = torch.stack([points[assign == j].mean(0) if bool((assign == j).any()) else centroids[j]
                                 for j in range(len(centroids))])  # fmt: skip
            if torch.equal(moved, centroids):
                break
            centroids = moved
        inertia = float(torch.cdist(points, centroids).min(dim=1).values.square().sum())
        if inertia < best_inertia:
            best, best_inertia = centroids, inertia
    return best


@torch.no_grad()
def _gate_points(skip, inputs: _HeadInputs) -> torch.Tensor:
    """``(n, D)`` what the gate's linear layer reads: its layer norm of the query states (float64, CPU)."""
    return skip.gate[0](_on_head(skip, inputs.queries)).double().cpu()


def _margin_scale(margins: torch.Tensor) -> float:
    """The factor on a gate's logits that makes the winner's margin (``margins``, one per training window, in logit
    units before scaling) at least 10 for 90% of the training windows: a practically hard gate."""
    return 10.0 / float(torch.quantile(margins, 0.1).clamp_min(1e-6))


@torch.no_grad()
def _clustered_gate(skip, train: _HeadInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's linear layer ``(weight (K, D), bias (K,))`` that routes by nearest k-means centroid of the training
    windows' gate inputs. Logits ``tau (2 c_k.z - |c_k|^2)`` differ from ``-tau |z - c_k|^2`` by a term common to all
    k; ``tau`` makes the nearest centroid's margin at least 10 logits for 90% of the training windows."""
    k = skip.weight.shape[0]
    points = _gate_points(skip, train)
    centroids = _kmeans(points, k)
    if len(centroids) < k:  # fewer distinct windows than forecasters: the rest sit far away, and no window picks them
        centroids = torch.cat([centroids, torch.full((k - len(centroids), points.shape[1]), 1e3, dtype=points.dtype)])
    squared = torch.cdist(points, centroids).square()
    two = squared.topk(2, dim=1, largest=False).values  # nearest and second nearest
    tau = _margin_scale(two[:, 1] - two[:, 0])
    # the same logits up to a term common to all k, measured from the centroids' mean m (smaller numbers in float32):
    # -|z - c_k|^2 = 2 (c_k - m).z - (|c_k|^2 - |m|^2) - |z|^2
    mean = centroids.mean(0)
    return tau * 2 * (centroids - mean), -tau * (centroids.square().sum(1) - mean.square().sum())


def _series_gate(skip, train: _HeadInputs, labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The gate's linear layer ``(weight (K, D), bias (K,))`` as a classifier of the training windows' series names
    (the records' ``meta.series``): multinomial logistic regression on the gate's normalized inputs, series ``i`` →
    forecaster ``i``, unused forecasters never picked, logits scaled so the winner's margin is at least 10 for 90%
    of the training windows. None when there are more series than forecasters."""
    names = sorted(set(labels))
    k = skip.weight.shape[0]
    if len(names) > k or len(names) < 2:
        return None
    points = _gate_points(skip, train)
    target = torch.tensor([names.index(name) for name in labels])
    weight = torch.zeros(len(names), points.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(names), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(points @ weight.T + bias, target) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    logits = points @ weight.T + bias
    top = logits.topk(2, dim=1).values
    tau = max(1.0, _margin_scale(top[:, 0] - top[:, 1]))
    unused = k - len(names)
    full_weight = torch.cat([tau * weight, torch.zeros(unused, points.shape[1], dtype=torch.float64)])
    floor = float((tau * logits).min()) - 1e3  # below every used forecaster's logit on the training windows
    full_bias = torch.cat([tau * bias, torch.full((unused,), floor, dtype=torch.float64)])
    return full_weight, full_bias


def _skip_matrix(skip) -> torch.Tensor:
    """The skip's weights as one ``(K * (W + 1), H_max)`` matrix (rows: forecaster k's window weights, then its
    bias), the layout of :func:`_features`."""
    return torch.cat([skip.weight.detach(), skip.bias.detach()[:, None, :]], dim=1).flatten(0, 1).double().cpu()


def _naive_matrix(skip) -> torch.Tensor:
    """The skip's initialization (every forecaster repeats the last value) in :func:`_skip_matrix`'s layout."""
    k, w, h = skip.weight.shape
    blocks = torch.zeros(k, w + 1, h, dtype=torch.float64)
    blocks[:, w - 1] = 1.0
    return blocks.flatten(0, 1)


def _set_skip(skip, theta: torch.Tensor) -> None:
    k, w, h = skip.weight.shape
    blocks = theta.view(k, w + 1, h)
    with torch.no_grad():
        skip.weight.copy_(blocks[:, :w].to(skip.weight))
        skip.bias.copy_(blocks[:, w].to(skip.bias))


def _set_center(head, center: float) -> None:
    """Rewrite the MLP's last layer so every quantile of every step moves by ``-(1 - center) * median``."""
    last = head.mlp[-1]
    horizon, levels = head.config.max_horizon, len(head.config.quantiles)
    median = head.config.quantiles.index(0.5)
    with torch.no_grad():
        weight = last.weight.view(horizon, levels, -1)
        bias = last.bias.view(horizon, levels)
        weight -= (1.0 - center) * weight[:, median : median + 1].clone()
        bias -= (1.0 - center) * bias[:, median : median + 1].clone()


def _targets(records: Sequence[dict], inputs: _HeadInputs, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized targets ``(n, H_max)`` and their mask (1 where the record has a value at that step)."""
    target = torch.zeros(len(records), horizon, dtype=torch.float64)
    mask = torch.zeros_like(target)
    for i, record in enumerate(records):
        values = torch.as_tensor(record["target"][:horizon], dtype=torch.float64)
        target[i, : len(values)] = values
        mask[i, : len(values)] = 1.0
    return (target - inputs.loc[:, None]) / inputs.scale[:, None] * mask, mask


def _mase(inputs: _HeadInputs, point: torch.Tensor, records: Sequence[dict]) -> float:
    """MASE of normalized point forecasts ``(n, H_max)``."""
    from unimoe.eval.metrics import score

    point = point * inputs.scale[:, None] + inputs.loc[:, None]
    predictions = [point[i, : len(r["target"])].tolist() for i, r in enumerate(records)]
    return float(score(["mase"], predictions, [r["target"] for r in records], list(records))["mase"])


def _ridge(x, residual, mask, prior, alpha, eye) -> torch.Tensor:
    """Per horizon step ``j``: ``prior_j + (X^T X + a I)^-1 X^T residual_j`` over the windows with a target at
    ``j`` (``a = alpha * mean(diag(X^T X))``); steps no window reaches keep the prior."""
    theta = prior.clone()
    for j in range(prior.shape[1]):
        rows = mask[:, j] > 0
        if not bool(rows.any()):
            continue
        xj = x[rows]
        gram = xj.T @ xj
        penalty = float(alpha) * float(gram.diagonal().mean().clamp_min(1e-12))
        theta[:, j] += torch.linalg.solve(gram + penalty * eye, xj.T @ residual[rows, j])
    return theta


def refit_forecast_skip(
    model,
    processor,
    train_records: Sequence[dict],
    validation_records: Sequence[dict],
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    centers: Sequence[float] = DEFAULT_CENTERS,
    gates: Sequence[str] = DEFAULT_GATES,
    with_validation: bool = True,
    batch_size: int = 32,
) -> RefitReport:
    """Refit the forecasting head's linear skip by ridge regression on ``train_records`` (forecasting records with
    a ``target``) for every ``gates`` × ``centers`` × ``alphas`` candidate (module docstring), choosing on
    ``validation_records`` by MASE; the model is changed in place only when a candidate beats the trained head
    there. ``with_validation``: the chosen candidate's linear forecasters are then fitted once more on the training
    and validation windows together (the validation windows are the latest before the test period); the report's
    ``validation_mase_after`` is the candidate's score before that final fit."""
    heads = getattr(getattr(model, "model", None), "generation_heads", {})
    head = dict(heads).get("series")  # an nn.ModuleDict has no get()
    if head is None or head.skip is None:
        raise ConfigError("forecast_refit: the model has no forecasting head with a context skip (context_skip)")
    if not train_records or not validation_records:
        raise ConfigError("forecast_refit: needs training and validation forecasting records")
    if not alphas or any(float(a) <= 0 for a in alphas):
        raise ConfigError(f"forecast_refit.alphas: positive penalties, got {list(alphas)}")
    if not centers or any(not 0.0 <= float(c) <= 1.0 for c in centers):
        raise ConfigError(f"forecast_refit.centers: shares in [0, 1], got {list(centers)}")
    if not gates or any(g not in GATES for g in gates):
        raise ConfigError(f"forecast_refit.gates: a list of {', '.join(GATES)}, got {list(gates)}")
    was_training = model.training
    model.eval()
    try:
        train = _head_inputs(model, processor, train_records, batch_size)
        val = _head_inputs(model, processor, validation_records, batch_size)
    finally:
        model.train(was_training)
    skip = head.skip
    target, mask = _targets(train_records, train, head.config.max_horizon)
    trained = _skip_matrix(skip)
    gate_options = {"trained": (None, trained)} if "trained" in gates else {}
    if skip.gate is not None:
        labels = [(record.get("meta") or {}).get("series") for record in train_records]
        if "series" in gates and all(isinstance(name, str) for name in labels):
            linear = _series_gate(skip, train, labels)
            if linear is not None:
                gate_options["series"] = (linear, _naive_matrix(skip))
        # without series names (or with more series than forecasters) "series" falls back to the clustering
        wants_clusters = "clustered" in gates or ("series" in gates and "series" not in gate_options)
        if wants_clusters and len(train_records) >= skip.weight.shape[0]:
            gate_options["clustered"] = (_clustered_gate(skip, train), _naive_matrix(skip))
    before = _mase(val, val.mlp + _features(_gate_probs(skip, val), val.window) @ trained, validation_records)
    candidates: dict[str, float] = {}
    best, best_mase = None, before
    for gate_name, (linear, prior) in gate_options.items():
        x = _features(_gate_probs(skip, train, linear), train.window)
        x_val = _features(_gate_probs(skip, val, linear), val.window)
        eye = torch.eye(x.shape[1], dtype=x.dtype)
        for center in centers:
            residual = (target - float(center) * train.mlp - x @ prior) * mask  # (n, H)
            for alpha in alphas:
                theta = _ridge(x, residual, mask, prior, alpha, eye)
                value = _mase(val, float(center) * val.mlp + x_val @ theta, validation_records)
                candidates[f"{gate_name} center={float(center):g} alpha={float(alpha):g}"] = value
                if np.isfinite(value) and value < best_mase:
                    best, best_mase = (gate_name, linear, float(center), float(alpha), theta, prior), value
    gate_name, linear, center, alpha, theta, prior = best or ("trained", None, None, None, trained, trained)
    if best is not None and with_validation:  # the chosen candidate fitted again on train + validation windows
        x = torch.cat([_features(_gate_probs(skip, part, linear), part.window) for part in (train, val)])
        val_target, val_mask = _targets(validation_records, val, head.config.max_horizon)
        target, mask = torch.cat([target, val_target]), torch.cat([mask, val_mask])
        residual = (target - center * torch.cat([train.mlp, val.mlp]) - x @ prior) * mask
        theta = _ridge(x, residual, mask, prior, alpha, torch.eye(x.shape[1], dtype=x.dtype))
    if best is not None:
        if linear is not None:
            with torch.no_grad():
                skip.gate[1].weight.copy_(linear[0].to(skip.gate[1].weight))
                skip.gate[1].bias.copy_(linear[1].to(skip.gate[1].bias))
        if center != 1.0:
            _set_center(head, center)
        _set_skip(skip, theta)
    usage = torch.bincount(_gate_probs(skip, train).argmax(1), minlength=skip.weight.shape[0])
    return RefitReport(
        alpha=alpha,
        validation_mase_before=before,
        validation_mase_after=best_mase,
        train_windows=len(train_records),
        validation_windows=len(validation_records),
        gate=gate_name if best is not None else None,
        center=center,
        candidates=candidates,
        forecaster_windows=usage.tolist(),
    )


__all__ = ["DEFAULT_ALPHAS", "DEFAULT_CENTERS", "DEFAULT_GATES", "GATES", "RefitReport", "refit_forecast_skip"]
