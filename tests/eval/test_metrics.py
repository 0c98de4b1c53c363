"""unimoe.eval.metrics against hand-computed values."""

import math

import numpy as np
import pytest

from unimoe.errors import ConfigError
from unimoe.eval.metrics import (
    METRICS,
    Metric,
    bootstrap_ci,
    edit_distance,
    normalize_answer,
    parse_numbers,
    score,
    seasonal_naive_scale,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7.", "seven"),
        ("Seven", "seven"),
        ("  seven  ", "seven"),
        ("0", "zero"),
        ("20", "twenty"),
        ("21", "21"),
        ("07", "07"),
        ("3.5", "3.5"),
        ("  The Eiffel   Tower! ", "eiffel tower"),
        ("an apple", "apple"),
        ("A", "a"),  # a lone article survives (choice letters)
        ("(B)", "b"),
        ("don't", "don't"),
        ("Don’t", "don't"),
        ("T-shirt", "t-shirt"),
        ("cat/dog", "cat dog"),
        ("“Yes,” ", "yes"),
        ("-", ""),
        ("", ""),
        ("I have 2 cats.", "i have two cats"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_answer_keeps_articles_when_asked():
    assert normalize_answer("The cat, the mat.", drop_articles=False) == "the cat the mat"


def test_registry_shape():
    for name in ("accuracy", "exact_match", "wer", "cer", "mse", "mae", "mase", "vqa_accuracy"):
        metric = METRICS[name]
        assert isinstance(metric, Metric) and metric.name == name
    assert METRICS["accuracy"].higher_is_better and METRICS["vqa_accuracy"].higher_is_better
    assert not any(METRICS[n].higher_is_better for n in ("wer", "cer", "mse", "mae", "mase"))


def test_accuracy_and_exact_match():
    preds, refs = ["7.", "The cat", "dog", " yes "], ["seven", "cat", "cat", "yes"]
    assert METRICS["accuracy"].fn(preds, refs, [{}] * 4) == 0.75
    assert METRICS["exact_match"].fn(preds, refs, [{}] * 4) == 0.25  # only " yes " == "yes" after strip
    assert METRICS["accuracy"].per_item("Seven", "7", {}) == 1.0
    assert METRICS["accuracy"].per_item("dog", ["cat", "Dog"], {}) == 1.0  # any acceptable answer
    assert METRICS["exact_match"].per_item("Seven", "seven", {}) == 0.0


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a", "b"]) == 2
    assert edit_distance(["a", "b"], []) == 2
    assert edit_distance(["a", "b", "c"], ["a", "x", "c"]) == 1


def test_wer_by_hand():
    wer = METRICS["wer"]
    # 3 deletions over 6 reference words (articles count: WER does not drop them)
    assert wer.per_item("the cat sat", "the cat sat on the mat", {}) == 0.5
    # 2 insertions over 2 reference words
    assert wer.per_item("one two three four", "One, two.", {}) == 1.0
    # corpus: (3 + 2) / (6 + 2) = 0.625, not the per-item mean 0.75
    preds, refs = ["the cat sat", "one two three four"], ["the cat sat on the mat", "one two"]
    assert wer.fn(preds, refs, [{}, {}]) == pytest.approx(5 / 8)
    assert wer.fn(["HELLO WORLD"], ["hello world"], [{}]) == 0.0
    assert wer.per_item("x", "", {}) is None


def test_cer_by_hand():
    cer = METRICS["cer"]
    assert cer.per_item("kitten", "sitting", {}) == pytest.approx(3 / 7)
    # corpus: (3 + 1) / (7 + 3) — "abd" vs "abc" is one substitution
    assert cer.fn(["kitten", "abd"], ["sitting", "abc"], [{}, {}]) == pytest.approx(4 / 10)


def test_mse_mae_pooled():
    preds, refs = [[1, 2], [3]], [[2, 2], [0]]  # errors -1, 0, 3
    assert METRICS["mse"].fn(preds, refs, [{}, {}]) == pytest.approx(10 / 3)
    assert METRICS["mae"].fn(preds, refs, [{}, {}]) == pytest.approx(4 / 3)
    assert METRICS["mse"].per_item([1, 2], [2, 2], {}) == 0.5
    assert METRICS["mae"].per_item([3], [0], {}) == 3.0
    # text forecasts are parsed; a short forecast is padded with its last value: [5, 5] vs [4, 6]
    assert METRICS["mae"].per_item("5", [4, 6], {}) == 1.0
    assert METRICS["mae"].per_item("Forecast: 1, 2, 3, 99", [1, 2, 3], {}) == 0.0  # extra values dropped
    # nothing predicted: padded with the last context value (2.0) → |2-4|, |2-6|
    assert METRICS["mae"].per_item("no idea", [4, 6], {"meta": {"context": [1.0, 2.0]}}) == 3.0
    # reference None → record["target"]
    assert METRICS["mse"].per_item([1, 1], None, {"target": [0, 3]}) == pytest.approx((1 + 4) / 2)


def test_seasonal_naive_scale():
    context = [1, 2, 4, 3, 7, 5]
    assert seasonal_naive_scale(context, 2) == pytest.approx((3 + 1 + 3 + 2) / 4)
    assert seasonal_naive_scale(context, 1) == pytest.approx((1 + 2 + 1 + 4 + 2) / 5)
    assert seasonal_naive_scale(context, 24) == pytest.approx(2.0)  # too short for m=24 → m=1
    assert seasonal_naive_scale([3, 3, 3], 1) is None


def test_mase_by_hand(tmp_path):
    mase = METRICS["mase"]
    # context [1, 2, 4, 3, 7, 5], m = 2: |4-1|, |3-2|, |7-4|, |5-3| → scale 9/4; forecast MAE (1 + 3) / 2 = 2
    rec1 = {"meta": {"context": [1, 2, 4, 3, 7, 5], "season": 2}}
    assert mase.per_item([6, 6], [7, 3], rec1) == pytest.approx(2 / 2.25)
    # no season → m = 1: scale (1 + 2 + 1 + 4 + 2) / 5 = 2
    assert mase.per_item([6, 6], [7, 3], {"meta": {"context": [1, 2, 4, 3, 7, 5]}}) == pytest.approx(1.0)
    # context from the record's series file: [0, 2, 0, 2], m = 1 → scale 2; MAE 1 → 0.5
    np.save(tmp_path / "ctx.npy", np.array([0.0, 2.0, 0.0, 2.0], dtype=np.float32))
    rec2 = {
        "messages": [
            {"role": "user", "content": [{"type": "series", "path": str(tmp_path / "ctx.npy")}, {"type": "text"}]}
        ]
    }
    assert mase.per_item([1.0], [0.0], rec2) == pytest.approx(0.5)
    # a csv context (date column dropped by the series loader): values 1, 4, 2 → scale (3 + 2) / 2 = 2.5
    (tmp_path / "ctx.csv").write_text("date,OT\n2020-01-01,1\n2020-01-02,4\n2020-01-03,2\n")
    rec3 = {"messages": [{"role": "user", "content": [{"type": "series", "path": str(tmp_path / "ctx.csv")}]}]}
    assert mase.per_item([5.0], [0.0], rec3) == pytest.approx(2.0)
    # corpus = mean of per-item MASE; items without a context (None) are left out
    assert mase.fn([[6, 6], [1.0], [1.0]], [[7, 3], [0.0], [0.0]], [rec1, rec2, {}]) == pytest.approx(
        (2 / 2.25 + 0.5) / 2
    )
    assert mase.per_item([1.0], [0.0], {}) is None
    # multichannel context with a target channel
    rec4 = {"meta": {"context": [[0, 10], [1, 30], [2, 50]], "target_channel": 1}}  # channel 1: scale 20
    assert mase.per_item([10.0], [0.0], rec4) == pytest.approx(0.5)


def test_vqa_accuracy_by_hand():
    vqa = METRICS["vqa_accuracy"]
    answers = ["two", "two", "2"] + ["three"] * 7
    # "2" matches 3 answers: the 3 subsets without a match have 2 matches → 2/3, the 7 others → 1; (2 + 7) / 10
    assert vqa.per_item("2", answers, {}) == pytest.approx(0.9)
    assert vqa.per_item("Three.", answers, {}) == 1.0
    assert vqa.per_item("four", answers, {}) == 0.0
    # one matching answer: its own subset 0, the other 9 subsets 1/3 → 0.3
    assert vqa.per_item("cat", ["cat"] + ["dog"] * 9, {}) == pytest.approx(0.3)
    # the 10 answers of meta win over a single-string reference
    assert vqa.per_item("2", "three", {"meta": {"answers": answers}}) == pytest.approx(0.9)
    assert vqa.per_item("Yes", "yes", {}) == 1.0  # no answer list → exact normalized match
    assert vqa.fn(["2", "four"], [answers, answers], [{}, {}]) == pytest.approx(0.45)


def test_parse_numbers():
    assert parse_numbers("1.5, -2, 3e2") == [1.5, -2.0, 300.0]
    assert parse_numbers("1.5, -2, 3e2", n=2) == [1.5, -2.0]
    assert parse_numbers("Forecast: 10 20 30.") == [10.0, 20.0, 30.0]
    assert parse_numbers("no numbers") == []
    assert parse_numbers("1,234") == [1.0, 234.0]
    assert parse_numbers([[1, 2], [3, 4]]) == [1.0, 2.0, 3.0, 4.0]
    assert parse_numbers(".5") == [0.5]


def test_score():
    result = score(["accuracy", "exact_match"], ["Seven", "cat"], ["7", "dog"], None)
    assert result == {"accuracy": 0.5, "exact_match": 0.0}
    assert score(["mae"], [[1.0]], [[3.0]], [{}]) == {"mae": 2.0}
    with pytest.raises(ConfigError, match="unknown metric 'bleu'"):
        score(["bleu"], ["a"], ["a"], None)
    with pytest.raises(ValueError, match="same length"):
        score(["accuracy"], ["a", "b"], ["a"], None)


def test_bootstrap_ci():
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    low, high = bootstrap_ci([0.0, 1.0] * 50, n=500, seed=0)
    assert 0.35 < low < 0.5 < high < 0.65
    assert bootstrap_ci([0.0, 1.0] * 50, n=500, seed=0) == (low, high)  # seeded
    assert all(math.isnan(v) for v in bootstrap_ci([None, float("nan")]))
    assert bootstrap_ci([2.0, None]) == (2.0, 2.0)
