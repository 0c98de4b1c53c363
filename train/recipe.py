"""``unimoe run RECIPE --out DIR``: data → init → stages → evaluation → final checkpoint with its model card.

Every step leaves a complete artefact before the next starts (``DIR/init``, ``DIR/<n>-<stage>/final``,
``DIR/eval/results.json``, ``DIR/final``), so ``--resume`` skips finished steps and continues the interrupted stage
from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from unimoe.errors import CheckpointError
from unimoe.train.config import RecipeConfig


def _train_text(data_root: Path, tasks: list[str]) -> list[str]:
    """The text of every training conversation (the built-in tokenizer is trained on it)."""
    from unimoe.data.build import task_dir
    from unimoe.data.records import read_split

    texts = []
    for name in tasks:
        for record in read_split(task_dir(data_root, name), "train"):
            for message in record["messages"]:
                content = message["content"]
                if isinstance(content, str):
                    texts.append(content)
                else:
                    texts += [p["text"] for p in content if p.get("type") == "text"]
    return texts


def _check_data_seed(data_root: Path, tasks: list[str], seed: int) -> None:
    """A recipe builds its data with its own seed. ``unimoe data build`` replaces a task built with another seed,
    which would silently change the test splits that earlier runs in the same ``--data`` directory were scored on
    (found when ``unimoe run tiny seed=1`` rebuilt the shared ``data/``): refuse instead, naming the way out."""
    from unimoe.data.build import DataError, list_tasks, read_marker

    for name in tasks or list_tasks():
        marker = read_marker(data_root / name)
        if marker is not None and marker.get("seed") != seed:
            raise DataError(
                f"{data_root / name}: built with seed {marker.get('seed')}, but the recipe's seed is {seed}; "
                f"give this run its own --data directory (the suite is built there) or rebuild this one with "
                f"`unimoe data build --out {data_root} --seed {seed}`"
            )


def _check_same_recipe(out: Path, recipe: RecipeConfig) -> None:
    """A run continues only with the recipe (and overrides) it started with: ``out/recipe.json`` records it. Mixing
    two would train some stages by one and the rest by the other, with a restored scheduler that fits neither."""
    current = json.loads(json.dumps(dataclasses.asdict(recipe), default=str))
    recorded = out / "recipe.json"
    if not recorded.is_file():
        recorded.write_text(json.dumps(current, indent=2))
        return
    before = json.loads(recorded.read_text())
    if before != current:
        keys = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
        raise CheckpointError(
            f"{out} was started with another recipe or other overrides (different: {', '.join(keys)}); continue it "
            "with the same ones, or choose another --out"
        )


class _Timings:
    """Seconds per step of a run, summed over every process that worked on it (``--resume`` continues the count
    in ``out/timings.json``), so ``run.json`` reports the whole run and not only its last process."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def add(self, name: str, seconds: float) -> None:
        from unimoe.train.loop import write_json_atomic

        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 1)
        write_json_atomic(self.path, self.seconds)

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(sum(self.seconds.values()), 1)}


def run_recipe(
    recipe: RecipeConfig,
    out: str | Path,
    *,
    data_root: str | Path = "data",
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    from unimoe.data.build import build_suite
    from unimoe.eval import evaluate, resolve_tasks
    from unimoe.eval.report import picture_files, pictures_markdown, results_table
    from unimoe.hub import EvalScore, save_checkpoint
    from unimoe.inference import init_checkpoint, load_pretrained
    from unimoe.train.loop import latest_checkpoint, train_stage, write_json_atomic

    out, data_root = Path(out), Path(data_root)
    tasks = list(recipe.data.get("tasks", []))
    _check_data_seed(data_root, tasks, recipe.seed)  # before anything is written
    if out.exists() and any(out.iterdir()) and not resume and not (out / "final").is_dir():
        raise CheckpointError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    _check_same_recipe(out, recipe)
    if (out / "final" / "config.json").is_file() and (out / "run.json").is_file():  # finished: nothing to redo
        run = json.loads((out / "run.json").read_text())
        if progress:
            print(f"{out} is a finished run of {recipe.name}; results in {out / 'eval'}, checkpoint in {out / 'final'}")
        return run
    timings = _Timings(out / "timings.json")

    t0 = time.perf_counter()
    build_suite(data_root, tasks or None, seed=recipe.seed, progress=progress)
    timings.add("data", time.perf_counter() - t0)

    init = out / "init"
    t0 = time.perf_counter()
    if not (init / "config.json").is_file():
        model_spec = recipe.model
        if "checkpoint" in model_spec:
            init = Path(model_spec["checkpoint"])
        else:
            extra = _train_text(data_root, tasks) if tasks else []
            init_checkpoint(model_spec["preset"], init, model_spec.get("overrides", {}), seed=recipe.seed,
                            extra_text=extra)  # fmt: skip
    timings.add("init", time.perf_counter() - t0)

    previous = init
    stage_results = []
    for i, stage in enumerate(recipe.stage_configs(), 1):
        if not stage.data_mix.tasks:
            stage.data = {**stage.data, "tasks": tasks}
        if recipe.data.get("weights") and not stage.data_mix.weights:  # recipe-wide sampling weights
            stage.data = {**stage.data, "weights": dict(recipe.data["weights"])}
        overridden = recipe.stages[i - 1].get("overrides", {}).get("data", {})
        shared = {k: v for k, v in recipe.data.items() if k not in ("tasks", "weights") and k not in overridden}
        stage.data = {**stage.data, **shared}  # recipe-wide balance / split
        stage_dir = out / f"{i}-{stage.name}"
        if (stage_dir / "final" / "config.json").is_file():
            result = json.loads((stage_dir / "result.json").read_text())
        else:
            if latest_checkpoint(stage_dir / "checkpoints") is not None and not resume:
                raise CheckpointError(f"{stage_dir} has checkpoints of an interrupted run; pass --resume")
            t0 = time.perf_counter()
            result = train_stage(stage, init=previous, out_dir=stage_dir, data_root=data_root, resume=resume,
                                 progress=progress).__dict__  # fmt: skip
            # a resumed stage: its time before the kill is the earlier processes' training time up to the checkpoint
            timings.add(stage.name, time.perf_counter() - t0 + result["seconds_before_resume"])
        stage_results.append(result)
        previous = stage_dir / "final"

    t0 = time.perf_counter()
    eval_cfg = recipe.eval
    model, processor = load_pretrained(previous, device=eval_cfg.get("device", "auto"))
    summary = evaluate(
        model,
        processor,
        resolve_tasks(eval_cfg.get("tasks", "tiny")),
        out_dir=out / "eval",
        data_root=data_root,
        batch_size=int(eval_cfg.get("batch_size", 16)),
        limit=eval_cfg.get("limit"),
        progress=progress,
        model_name=recipe.name,
    )
    timings.add("eval", time.perf_counter() - t0)
    scores = [EvalScore(task=t, metric=m, value=v) for t, ms in summary["results"].items() for m, v in ms.items()]
    stage_lines = "\n".join(
        f"| {r['name']} | {r['steps']} | {r['final_loss']:.3f} | {r['tokens_per_second']:.0f} "
        f"| {r['peak_memory_mb']:.0f} |"
        for r in stage_results
    )
    notes = (
        f"Trained by the `{recipe.name}` recipe: {recipe.description}\n\n"
        "| stage | steps | final loss | tokens/s | peak memory (MB) |\n|---|---|---|---|---|\n" + stage_lines
    )
    pictures = {f"images/{name}": out / "eval" / name for name in picture_files(summary)}
    if pictures:  # the evaluation's pictures travel with the checkpoint and show in its card
        notes += "\n\n### Pictures from the evaluation\n\n" + pictures_markdown(summary, prefix="images/")
    t0 = time.perf_counter()
    save_checkpoint(model, out / "final", processor=processor, results=scores, model_name=f"unimoe-{recipe.name}",
                    notes=notes, extra_files=pictures)  # fmt: skip
    timings.add("final", time.perf_counter() - t0)
    run = {"recipe": recipe.name, "stages": stage_results, "results": summary["results"], "timings_s": timings.total()}
    write_json_atomic(out / "run.json", run)  # last: a run with run.json is finished
    if progress:
        print(results_table(summary))
        if pictures:
            print(f"pictures: {out / 'eval'} ({', '.join(picture_files(summary))})")
        print(f"final checkpoint: {out / 'final'} ({run['timings_s']['total']:.0f} s)")
    return run
