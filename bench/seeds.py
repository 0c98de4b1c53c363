"""Several seeds of the MoE and dense recipes side by side: is the MoE ahead, and does it beat the baselines and meet
the targets in every run or only in some?

    python bench/seeds.py --json bench/results/recipe_seeds.json RUN.json [RUN.json ...]

Each ``RUN.json`` is what ``bench/recipe.py --parts tiny,dense,baselines [--seed N] --json RUN.json`` wrote for one
seed (its own data, built with that seed, and its own baselines). Prints, per task, each seed's MoE and dense score
with the baseline it had to beat, the means, and how many seeds the MoE won; then the suite averages, their paired
differences, and per seed which targets were missed and which baselines were not beaten. Writes it all as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import TARGETS, baseline_floor, primary, suite_average, write_report  # noqa: E402


def compare(runs: list[dict], moe: str = "tiny", dense: str = "dense") -> dict:
    """Per task and per seed: the two recipes' primary metric, the best baseline, the verdicts."""
    tasks = sorted(set().union(*(r[moe]["results"] for r in runs)))
    table = {}
    for task in tasks:
        metric, higher = primary(task)
        rows = []
        for run in runs:
            a = run[moe]["results"].get(task, {}).get(metric)
            b = run[dense]["results"].get(task, {}).get(metric)
            floor = baseline_floor(run.get("baselines", {}).get("results", {}).get(task, {}), metric, higher)
            rows.append({"moe": a, "dense": b, "baseline": floor})
        pairs = [(r["moe"], r["dense"]) for r in rows if r["moe"] is not None and r["dense"] is not None]
        table[task] = {
            "metric": metric,
            "higher_is_better": higher,
            "target": TARGETS.get(task),
            "seeds": rows,
            "moe_mean": statistics.fmean(a for a, _ in pairs) if pairs else None,
            "dense_mean": statistics.fmean(b for _, b in pairs) if pairs else None,
            "moe_wins": sum((a > b) if higher else (a < b) for a, b in pairs),
            "ties": sum(a == b for a, b in pairs),
        }
    suites = [(suite_average(r[moe]["results"]), suite_average(r[dense]["results"])) for r in runs]
    verdicts = []
    for run in runs:
        missed, below = [], []
        for task, row in table.items():
            value = run[moe]["results"].get(task, {}).get(row["metric"])
            floor = baseline_floor(run.get("baselines", {}).get("results", {}).get(task, {}), row["metric"],
                                   row["higher_is_better"])  # fmt: skip
            if value is None:
                continue
            higher, target = row["higher_is_better"], row["target"]
            if target is not None and not (value >= target if higher else value < target):
                missed.append(task)
            if floor is not None and not (value > floor if higher else value < floor):
                below.append(task)
        verdicts.append({"targets_missed": missed, "baselines_not_beaten": below})
    return {
        "tasks": table,
        "suite": [{"moe": a, "dense": b, "difference": a - b} for a, b in suites],
        "suite_moe_mean": statistics.fmean(a for a, _ in suites),
        "suite_dense_mean": statistics.fmean(b for _, b in suites),
        "suite_moe_wins": sum(a > b for a, b in suites),
        "per_seed": verdicts,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="bench/recipe.py JSON files, one per seed")
    parser.add_argument("--labels", default=None, help="comma-separated names of the seeds (default: 1, 2, ...)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    runs = [json.loads(p.read_text()) for p in args.runs]
    for path, run in zip(args.runs, runs):
        if "tiny" not in run or "dense" not in run:
            parser.error(f"{path}: needs both the tiny and the dense recipe (bench/recipe.py --parts tiny,dense,...)")
    labels = args.labels.split(",") if args.labels else [str(i + 1) for i in range(len(runs))]
    if len(labels) != len(runs):
        parser.error(f"--labels: {len(labels)} names for {len(runs)} runs")
    report = compare(runs)

    def fmt(x):
        return f"{x:.3f}" if isinstance(x, (int, float)) else "-"

    head = " ".join(f"{'s' + name + ' moe':>9} {'dense':>6} {'base':>6}" for name in labels)
    print(f"{'task':16} {'metric':8} {head}   {'moe':>6} {'dense':>6}  moe wins")
    for task, row in report["tasks"].items():
        cells = " ".join(f"{fmt(r['moe']):>9} {fmt(r['dense']):>6} {fmt(r['baseline']):>6}" for r in row["seeds"])
        print(f"{task:16} {row['metric']:8} {cells}   {fmt(row['moe_mean']):>6} {fmt(row['dense_mean']):>6}  "
              f"{row['moe_wins']}/{len(runs)}" + (f" ({row['ties']} tied)" if row["ties"] else ""))  # fmt: skip
    suite = " ".join(f"{fmt(s['moe']):>9} {fmt(s['dense']):>6} {'':>6}" for s in report["suite"])
    print(f"{'suite average':16} {'':8} {suite}   {fmt(report['suite_moe_mean']):>6} "
          f"{fmt(report['suite_dense_mean']):>6}  {report['suite_moe_wins']}/{len(runs)}")  # fmt: skip
    for name, verdict in zip(labels, report["per_seed"]):
        print(f"seed {name}: targets missed {verdict['targets_missed'] or 'none'}; baselines not beaten "
              f"{verdict['baselines_not_beaten'] or 'none'}")  # fmt: skip
    if args.json:
        report["labels"] = labels
        report["inputs"] = [str(p) for p in args.runs]
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
