"""The closed-form refit of the forecasting head's linear skip (unimoe.generation.refit)."""

import numpy as np
import pytest
import torch

from unimoe.errors import ConfigError
from unimoe.generation.refit import refit_forecast_skip


def _records(n: int, seed: int, *, horizon: int = 6, rule: str = "sine") -> list[dict]:
    """Forecasting records of period-8 sines with random phase, amplitude and level (``rule="flat"``: the target
    repeats the last value, which a sine-trained skip gets wrong)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        t = np.arange(40 + horizon)
        values = rng.uniform(1, 3) * np.sin(2 * np.pi * t / 8 + rng.uniform(0, 2 * np.pi)) + rng.uniform(-5, 5)
        context, target = values[:40], values[40:]
        if rule == "flat":
            target = np.full(horizon, context[-1])
        records.append({
            "id": f"sine/{seed}/{i}",
            "messages": [
                {"role": "user", "content": [{"type": "series", "array": context[:, None].astype(np.float32)},
                                             {"type": "text", "text": f"Forecast the next {horizon} values."}]},
                {"role": "assistant", "content": " ".join(f"{v:.3f}" for v in target)},
            ],
            "target": [float(v) for v in target],
            "meta": {"context": context.tolist(), "season": 8},
        })  # fmt: skip
    return records


def _mase(model, processor, records) -> float:
    from unimoe.eval.metrics import score

    predictions = model.forecast(processor, records, batch_size=16)
    return score(["mase"], predictions, [r["target"] for r in records], records)["mase"]


def test_refit_fits_the_skip_and_its_report_matches_the_models_own_forecasts(gen_checkpoint):
    """On sines (a linear rule of the window) the ridge refit must cut the validation MASE of a random model far
    down, and the model's real forecasts afterwards must score exactly what the refit computed for them (which
    checks the weight layout it writes back)."""
    from unimoe.inference import load_pretrained

    model, processor = load_pretrained(gen_checkpoint)
    train, val = _records(96, seed=1), _records(24, seed=2)
    before = _mase(model, processor, val)
    report = refit_forecast_skip(model, processor, train, val, batch_size=16)
    assert report.validation_mase_before == pytest.approx(before, rel=1e-4)
    assert report.alpha is not None and report.validation_mase_after < 0.3 * before
    assert _mase(model, processor, val) == pytest.approx(report.validation_mase_after, rel=1e-3)
    assert set(report.candidates) == {"0.001", "0.01", "0.1", "1", "10"}
    assert report.train_windows == 96 and report.validation_windows == 24


def test_refit_keeps_the_trained_skip_when_no_penalty_helps_on_validation(gen_checkpoint):
    from unimoe.inference import load_pretrained

    model, processor = load_pretrained(gen_checkpoint)
    skip = model.model.generation_heads["series"].skip
    weight, bias = skip.weight.detach().clone(), skip.bias.detach().clone()
    # the untrained skip forecasts the last value, exactly what these validation targets are
    report = refit_forecast_skip(model, processor, _records(64, seed=1), _records(16, seed=2, rule="flat"))
    assert report.alpha is None and report.validation_mase_after == report.validation_mase_before
    assert all(value > report.validation_mase_before for value in report.candidates.values())
    assert torch.equal(skip.weight, weight) and torch.equal(skip.bias, bias)


def test_refit_errors_name_the_problem(gen_model, tiny_model):
    model, processor = gen_model
    records = _records(4, seed=0)
    with pytest.raises(ConfigError, match="forecast_refit.alphas"):
        refit_forecast_skip(model, processor, records, records, alphas=[0.1, -1.0])
    with pytest.raises(ConfigError, match="training and validation"):
        refit_forecast_skip(model, processor, records, [])
    tiny_model.model.generation_heads["series"].skip = None
    with pytest.raises(ConfigError, match="context skip"):
        refit_forecast_skip(tiny_model, processor, records, records)
