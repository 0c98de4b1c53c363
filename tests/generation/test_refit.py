"""The closed-form refit of the forecasting head's linear skip (unimoe.generation.refit)."""

import copy

import numpy as np
import pytest
import torch

from unimoe.errors import ConfigError
from unimoe.generation.refit import refit_forecast_skip


def _records(n: int, seed: int, *, horizon: int = 6, rule: str = "sine", season: int = 8) -> list[dict]:
    """Forecasting records of period-8 sines with random phase, amplitude and level (``rule="flat"``: the target
    repeats the last value, which a sine-trained skip gets wrong; ``rule="mirror"``: the sine's continuation
    reflected about the last value, asked for with its own prompt — the same window, the opposite forecast)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        t = np.arange(40 + horizon)
        values = rng.uniform(1, 3) * np.sin(2 * np.pi * t / 8 + rng.uniform(0, 2 * np.pi)) + rng.uniform(-5, 5)
        context, target = values[:40], values[40:]
        if rule == "flat":
            target = np.full(horizon, context[-1])
        if rule == "mirror":
            target = 2 * context[-1] - target
        request = "Forecast the mirror image of the next" if rule == "mirror" else "Forecast the next"
        records.append({
            "id": f"sine/{seed}/{i}",
            "messages": [
                {"role": "user", "content": [{"type": "series", "array": context[:, None].astype(np.float32)},
                                             {"type": "text", "text": f"{request} {horizon} values."}]},
                {"role": "assistant", "content": " ".join(f"{v:.3f}" for v in target)},
            ],
            "target": [float(v) for v in target],
            "meta": {"context": context.tolist(), "season": season},
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
    report = refit_forecast_skip(model, processor, train, val, with_validation=False, batch_size=16)
    assert report.validation_mase_before == pytest.approx(before, rel=1e-4)
    assert report.alpha is not None and report.validation_mase_after < 0.3 * before
    assert _mase(model, processor, val) == pytest.approx(report.validation_mase_after, rel=1e-3)
    assert set(report.candidates) == {f"{gate} center={c} alpha={a}" for gate in ("trained", "clustered")
                                      for c in (1, 0) for a in ("0.001", "0.01", "0.1", "1", "10")}  # fmt: skip
    assert min(report.candidates.values()) == report.validation_mase_after
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


MIRROR = "Reflect every value about the last one and forecast the mirror image of the next"


def _prompt_only(model) -> None:
    """Every window to linear forecaster 0, as the trained tiny models' gates nearly did (2 of 8 used), and the
    series connector's output zeroed, so the LLM's query states tell the windows apart by their prompt alone (the
    trained tiny models' states separate their seven series almost perfectly; a random model's mix prompt and
    series)."""
    _collapse_gate(model)
    connector = model.model.connectors["series"].linear_2
    with torch.no_grad():
        connector.weight.zero_()
        connector.bias.zero_()


def _collapse_gate(model) -> None:
    """Every window to linear forecaster 0."""
    gate = model.model.generation_heads["series"].skip.gate[1]
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.zero_()
        gate.bias[0] = 20.0


def test_a_clustered_gate_gives_each_kind_of_prompt_its_own_linear_forecaster(gen_checkpoint):
    """Sines to continue and sines to mirror (the same windows, opposite forecasts, told apart only by the prompt):
    one linear forecaster cannot fit both, so with the gate collapsed onto one the trained-gate refit stays poor,
    while the k-means gate on the query states sends each prompt to a forecaster of its own and fits both. The
    model's own forecasts afterwards score what the refit computed."""
    from unimoe.inference import load_pretrained

    def records(n, seed, rule="sine"):  # season 1: MASE in one-step changes (a sine repeats its season exactly)
        out = _records(n, seed, rule=rule, season=1)
        for record in out if rule == "mirror" else []:
            record["messages"][0]["content"][1]["text"] = f"{MIRROR} 6 values."
        return out

    train, val = records(64, 1) + records(64, 3, "mirror"), records(16, 2) + records(16, 4, "mirror")
    model, processor = load_pretrained(gen_checkpoint)
    _prompt_only(model)
    trained_only = refit_forecast_skip(model, processor, train, val, gates=["trained"], centers=[1.0])
    model, processor = load_pretrained(gen_checkpoint)
    _prompt_only(model)
    report = refit_forecast_skip(model, processor, train, val, centers=[1.0], with_validation=False)
    assert trained_only.forecaster_windows == [len(train)] + [0] * 7
    assert report.gate == "clustered"
    assert sorted(report.forecaster_windows, reverse=True) == [64, 64] + [0] * 6
    assert report.validation_mase_after < 0.2 * trained_only.validation_mase_after
    assert _mase(model, processor, val) == pytest.approx(report.validation_mase_after, rel=1e-3)


def test_a_series_gate_classifies_the_windows_by_their_series_name(gen_checkpoint):
    """With series names in the records' ``meta`` the gate becomes a classifier of them (one forecaster per
    series), which needs no help from the prompt-only trick above: on a random model whose query states mix
    prompt and values, continue / mirror windows still go to a forecaster each and both are fitted."""
    from unimoe.inference import load_pretrained

    def records(n, seed, rule="sine"):
        out = _records(n, seed, rule=rule, season=1)
        for record in out:
            record["meta"]["series"] = rule
            if rule == "mirror":
                record["messages"][0]["content"][1]["text"] = f"{MIRROR} 6 values."
        return out

    train, val = records(64, 1) + records(64, 3, "mirror"), records(16, 2) + records(16, 4, "mirror")
    model, processor = load_pretrained(gen_checkpoint)
    _prompt_only(model)  # collapses the gate
    trained_only = refit_forecast_skip(model, processor, train, val, gates=["trained"], centers=[1.0])
    model, processor = load_pretrained(gen_checkpoint)
    _collapse_gate(model)
    report = refit_forecast_skip(model, processor, train, val, centers=[1.0], with_validation=False)
    assert report.gate == "series" and report.forecaster_windows == [64, 64] + [0] * 6  # names sorted: mirror, sine
    assert report.validation_mase_after < 0.2 * trained_only.validation_mase_after
    assert _mase(model, processor, val) == pytest.approx(report.validation_mase_after, rel=1e-3)


def test_the_chosen_candidate_is_fitted_again_with_the_validation_windows(gen_checkpoint):
    """``with_validation`` (the default) keeps the candidate chosen on validation and refits its forecasters on
    train + validation: same choice, other weights, and a closer fit of the validation windows it now saw."""
    from unimoe.inference import load_pretrained

    train, val = _records(96, seed=1, season=1), _records(24, seed=2, season=1)
    fitted = {}
    for with_validation in (False, True):
        model, processor = load_pretrained(gen_checkpoint)
        report = refit_forecast_skip(model, processor, train, val, with_validation=with_validation)
        fitted[with_validation] = (report, model.model.generation_heads["series"].skip.weight.detach().clone(),
                                   _mase(model, processor, val))  # fmt: skip
    (plain, plain_weight, plain_mase), (both, both_weight, both_mase) = fitted[False], fitted[True]
    assert (both.gate, both.center, both.alpha) == (plain.gate, plain.center, plain.alpha) != (None, None, None)
    assert both.validation_mase_after == plain.validation_mase_after == pytest.approx(plain_mase, rel=1e-3)
    assert not torch.equal(both_weight, plain_weight) and both_mase <= plain_mase


def test_the_mlp_centre_share_moves_every_quantile_by_the_same_amount(gen_model):
    """``center`` c: the MLP's last layer is rewritten so its median becomes c times what it was and every other
    quantile moves with it (the band keeps its width)."""
    from unimoe.generation.refit import _set_center

    model, _ = gen_model
    head = copy.deepcopy(model.model.generation_heads["series"])
    queries = torch.randn(5, head.mlp[0].normalized_shape[0])
    before = head.mlp(queries).view(5, head.config.max_horizon, -1)
    _set_center(head, 0.25)
    after = head.mlp(queries).view(5, head.config.max_horizon, -1)
    median = head.config.quantiles.index(0.5)
    assert torch.allclose(after[..., median], 0.25 * before[..., median], atol=1e-5)
    shift = (after - before)[..., median : median + 1]
    assert torch.allclose(after - before, shift.expand_as(after), atol=1e-5)


def test_refit_errors_name_the_problem(gen_model, tiny_model):
    model, processor = gen_model
    records = _records(4, seed=0)
    with pytest.raises(ConfigError, match="forecast_refit.alphas"):
        refit_forecast_skip(model, processor, records, records, alphas=[0.1, -1.0])
    with pytest.raises(ConfigError, match="forecast_refit.centers"):
        refit_forecast_skip(model, processor, records, records, centers=[1.5])
    with pytest.raises(ConfigError, match="forecast_refit.gates"):
        refit_forecast_skip(model, processor, records, records, gates=["learned"])
    with pytest.raises(ConfigError, match="training and validation"):
        refit_forecast_skip(model, processor, records, [])
    tiny_model.model.generation_heads["series"].skip = None
    with pytest.raises(ConfigError, match="context skip"):
        refit_forecast_skip(tiny_model, processor, records, records)
