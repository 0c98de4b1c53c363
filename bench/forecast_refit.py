"""The forecasting refit on trained checkpoints: test MASE before and after, per series, beside the ridge baseline.

    python bench/forecast_refit.py runs/tiny/final runs/dense/final --data data --json OUT.json

Each checkpoint is loaded, its forecasts on the ``ts_forecast`` test split are scored, the head's skip is refitted
(``unimoe.generation.refit.refit_forecast_skip`` on the train split, chosen on validation, as the recipes do at the
end of tune) and the test split is scored again. The checkpoints on disk are not changed. A checkpoint that was
trained by a recipe has been refitted once already, by the refit of its time, so this measures what the current
refit adds to it. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def per_series_mase(model, processor, records: list[dict]) -> dict[str, float]:
    """Test MASE overall (``all``) and per series (the records' ``meta.series``), each the mean over windows."""
    from unimoe.eval.metrics import score

    predictions = model.forecast(processor, records, batch_size=32)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        groups[record["meta"]["series"]].append(i)
    out = {"all": score(["mase"], predictions, [r["target"] for r in records], records)["mase"]}
    for name, rows in sorted(groups.items()):
        picked = [records[i] for i in rows]
        out[name] = score(["mase"], [predictions[i] for i in rows], [r["target"] for r in picked], picked)["mase"]
    return {key: round(float(value), 4) for key, value in out.items()}


def measure(checkpoint: str, task_dir: Path, gates: list[str] | None = None, with_validation: bool = True) -> dict:
    from unimoe.data.records import read_split
    from unimoe.generation.refit import refit_forecast_skip
    from unimoe.inference import load_pretrained

    model, processor = load_pretrained(checkpoint)
    splits = {name: read_split(task_dir, name) for name in ("train", "validation", "test")}
    before = per_series_mase(model, processor, splits["test"])
    kwargs = {"gates": gates} if gates else {}
    kwargs["with_validation"] = with_validation
    report = refit_forecast_skip(model, processor, splits["train"], splits["validation"], **kwargs)
    after = per_series_mase(model, processor, splits["test"])
    refit = report.to_dict()
    refit.pop("candidates")
    return {"checkpoint": checkpoint, "before": before, "after": after, "refit": refit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", default="data")
    parser.add_argument("--json")
    parser.add_argument("--train-only", action="store_true", help="no final fit on train + validation windows")
    parser.add_argument("--gates", help="comma-separated gate candidates (default: the refit's own)")
    args = parser.parse_args(argv)
    from baselines import ts_forecast_baseline

    task_dir = Path(args.data) / "ts_forecast"
    ridge = ts_forecast_baseline(task_dir)
    baseline = {"all": ridge["ridge/mase"]} | {
        k.split("/")[-1]: v for k, v in ridge.items() if k.startswith("ridge/mase/")
    }
    gates = args.gates.split(",") if args.gates else None
    runs = [measure(c, task_dir, gates, not args.train_only) for c in args.checkpoints]
    series = list(runs[0]["before"])
    header = ["series", "ridge baseline"] + [f"{r['checkpoint']} before / after" for r in runs]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in series:
        cells = [name, f"{baseline.get(name, float('nan')):.3f}"]
        cells += [f"{r['before'][name]:.3f} / {r['after'][name]:.3f}" for r in runs]
        print("| " + " | ".join(cells) + " |")
    for r in runs:
        f = r["refit"]
        print(f"{r['checkpoint']}: gate {f['gate']}, MLP centre share {f['center']}, penalty {f['alpha']}, validation "
              f"MASE {f['validation_mase_before']:.3f} -> {f['validation_mase_after']:.3f}, training windows per "
              f"forecaster {f['forecaster_windows']}")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"baseline": baseline, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
