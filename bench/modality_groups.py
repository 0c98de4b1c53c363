"""Does mixed multimodal training cost a dense model anything? The premise of "MoE beats dense" in the Uni-MoE line.

    python bench/modality_groups.py --mixed runs/s26/seed0/dense --data data_seed0 --seed 0 \\
        --runs runs/groups/seed0 --json bench/results/modality_groups_seed0.json

Uni-MoE's argument for experts is interference: tasks of different modalities trained into one set of dense weights
pull them apart, and per-modality experts remove that "performance bias". This bench measures whether there is any
interference to remove. For each modality group (``--groups``; default image and audio) it trains the base recipe
(``--recipe``, default ``dense``) on that group's tasks alone, with every stage's steps scaled by the group's share
of the recipe's sampling weights. The group's tasks then see as many training samples as in the mixed run; what is
missing is only the other modalities' samples and the optimizer steps they bring to the shared weights. Each group
task is scored against the mixed run of the same recipe, seed and data (``--mixed DIR``, a finished ``unimoe run``;
without it the mixed recipe is run too, under ``--runs``).

With ``--budget full`` each group instead takes every optimizer step of the mixed run (about 1/share times the
samples of its tasks): an upper bound on what a model given to one modality could gain.

A group-only score above the mixed one means the mix costs that task something (interference, what experts could
win back); below it, the other modalities help (transfer). Generation tasks are shown but read them with care: their
diffusion decoders learn from optimizer steps more than from samples, and the group-only runs take far fewer steps.

Prints a table and writes JSON. Runs are reused from ``--runs`` when complete (delete them to re-measure).
``--combine A.json B.json ...`` instead reads the JSON of several seeds and prints each task's alone-minus-mixed
difference per seed, its mean, and in how many seeds the task did better alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import ROOT, primary, run_recipe, write_report  # noqa: E402

GROUPS = {
    "image": ["vqa_easy", "digits_cls", "gen_image_digits"],
    "audio": ["speech_words", "speech_asr", "gen_speech_words"],
    "video": ["video_motion"],
    "points": ["shapes3d"],
    "series": ["ts_classify", "ts_forecast"],
    "text": ["text_qa"],
}
GENERATION = {"gen_image_digits", "gen_speech_words"}


def group_recipe(base: dict, tasks: list[str], budget: str = "share") -> tuple[dict, float]:
    """The base recipe restricted to ``tasks``, each stage's step counts scaled by their share of the weights
    (``budget="share"``) or kept as they are (``"full"``: the group gets every optimizer step of the mixed run)."""
    data = base["data"]
    missing = [t for t in tasks if t not in data["tasks"]]
    if missing:
        raise SystemExit(f"the recipe does not train {missing} (its tasks: {data['tasks']})")
    weights = data.get("weights") or {t: 1 for t in data["tasks"]}
    share = sum(weights.get(t, 0) for t in tasks) / sum(weights.get(t, 0) for t in data["tasks"])
    if budget not in ("share", "full"):
        raise SystemExit(f"--budget: share or full, got {budget!r}")
    scale = share if budget == "share" else 1.0
    recipe = yaml.safe_load(yaml.safe_dump(base))  # a deep copy
    recipe["description"] = f"{base.get('description', '')} -- only {', '.join(tasks)}, {scale:.0%} of its steps"
    recipe["data"]["tasks"] = list(tasks)
    recipe["data"]["weights"] = {t: weights[t] for t in tasks if t in weights}
    augment = {m: a for m, a in (data.get("augment") or {}).items() if set(a.get("tasks", tasks)) & set(tasks)}
    recipe["data"]["augment"] = augment
    for stage in recipe["stages"]:
        over = stage.setdefault("overrides", {})
        if "steps" not in over:
            raise SystemExit(f"stage {stage['stage']}: the recipe must set its steps to be scaled")
        steps = max(1, round(over["steps"] * scale))
        over["steps"] = steps
        if over.get("router_warmup_steps"):
            over["router_warmup_steps"] = max(1, round(over["router_warmup_steps"] * scale))
        if over.get("frozen_steps"):
            over["frozen_steps"] = {k: round(v * scale) for k, v in over["frozen_steps"].items()}
        over["save_every"] = max(1, steps // 3)
        refit = over.get("forecast_refit")
        if refit and refit.get("task") not in tasks:
            over.pop("forecast_refit")
    recipe["eval"] = {**(recipe.get("eval") or {}), "tasks": list(tasks)}
    return recipe, share


def combine(paths: list[str], out: str) -> int:
    """The per-seed reports side by side: each task's alone-minus-mixed difference per seed and their mean."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    table: dict[str, dict] = {}
    for report in reports:
        for name, group in report["groups"].items():
            for task, gain in group.get("gain_alone", {}).items():
                row = table.setdefault(task, {"group": name, "seeds": [], "gains": []})
                row["seeds"].append(report["seed"])
                row["gains"].append(gain)
    print(f"{'group':7} {'task':17} {'alone-mixed per seed':>30} {'mean':>7}  alone better")
    for task, row in table.items():
        row["mean"] = statistics.fmean(row["gains"])
        row["alone_better"] = sum(g > 0 for g in row["gains"])
        cells = " ".join(f"{g:+.3f}" for g in row["gains"])
        note = " (decoder steps differ)" if task in GENERATION else ""
        print(f"{row['group']:7} {task:17} {cells:>30} {row['mean']:+7.3f}  {row['alone_better']}/{len(row['gains'])}"
              f"{note}")  # fmt: skip
    write_report(out, {"runs": paths, "tasks": table})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="dense", help="shipped recipe name or YAML file (default: dense)")
    parser.add_argument("--groups", default="image,audio", help=f"comma-separated, of {', '.join(GROUPS)}")
    parser.add_argument("--mixed", default=None, help="a finished `unimoe run` of the recipe on the same data and seed")
    parser.add_argument("--data", default="data")
    parser.add_argument("--seed", type=int, default=0, help="recipe seed (the data must have been built with it)")
    parser.add_argument("--runs", default="runs/groups")
    parser.add_argument("--json", default="bench/results/modality_groups.json")
    parser.add_argument("--budget", choices=["share", "full"], default="share",
                        help="steps of a group run: its share of the mixed run's (default) or all of them")  # fmt: skip
    parser.add_argument("--combine", nargs="+", metavar="RUN.json", help="combine per-seed reports (runs nothing)")
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.json)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"--groups: unknown {unknown}; known: {', '.join(GROUPS)}")
    path = Path(args.recipe)
    if not path.is_file():
        path = ROOT / "configs" / "recipes" / f"{args.recipe}.yaml"
    if not path.is_file():
        parser.error(f"--recipe: no recipe {args.recipe!r} (a name in configs/recipes/ or a YAML file)")
    base = yaml.safe_load(path.read_text())
    runs, data, seed = Path(args.runs), Path(args.data), [f"seed={args.seed}"]
    runs.mkdir(parents=True, exist_ok=True)

    if args.mixed:
        mixed_dir = Path(args.mixed)
        if not (mixed_dir / "run.json").is_file():
            parser.error(f"--mixed: {mixed_dir} holds no run.json (a finished `unimoe run`)")
        mixed = json.loads((mixed_dir / "run.json").read_text())
    else:
        mixed = run_recipe(str(path), runs / "mixed", data, seed)
    report: dict = {"recipe": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path), "seed": args.seed,
                    "mixed": mixed["results"], "groups": {}}  # fmt: skip
    for name in groups:
        recipe, share = group_recipe(base, GROUPS[name], args.budget)
        recipe_path = runs / f"{name}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        run = run_recipe(str(recipe_path), runs / name, data, seed)
        report["groups"][name] = {
            "tasks": GROUPS[name],
            "share": share,
            "budget": args.budget,
            "steps": {s["stage"]: s["overrides"]["steps"] for s in recipe["stages"]},
            "wall_s": run.get("wall_s"),
            "results": run["results"],
        }

    print(f"{'group':7} {'task':17} {'metric':9} {'mixed':>7} {'alone':>7} {'alone-mixed':>12}  reading")
    for name, group in report["groups"].items():
        for task in group["tasks"]:
            metric, higher = primary(task)
            a = group["results"].get(task, {}).get(metric)
            m = report["mixed"].get(task, {}).get(metric)
            if a is None or m is None:
                continue
            gain = (a - m) if higher else (m - a)  # > 0: the task does better alone
            group.setdefault("gain_alone", {})[task] = gain
            reading = "alone better (interference)" if gain > 0 else "mixed better (transfer)" if gain < 0 else "same"
            if task in GENERATION:
                reading += "; decoder steps differ"
            print(f"{name:7} {task:17} {metric:9} {m:7.3f} {a:7.3f} {gain:+12.3f}  {reading}")
        steps = ", ".join(f"{k} {v}" for k, v in group["steps"].items())
        print(f"{'':7} ({group['share']:.0%} of the mixed run's samples; {steps} steps)")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
