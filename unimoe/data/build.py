"""``unimoe data build``: deterministic, offline construction of the benchmark suite from real data.

Each task is a builder registered in :data:`DATA_BUILDERS`. A builder writes ``{train,validation,test}.jsonl`` (chat
records, see :mod:`unimoe.data.records`) and its media files into the directory it is given and returns a
:class:`TaskCard`. :func:`build_suite` runs builders into a temporary sibling directory and moves it into place only
once it is complete, then writes a ``.complete.json`` marker: a directory without a valid marker (a build killed
half-way, a different builder version) is rebuilt, never used.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unimoe.errors import ConfigError, UniMoEError
from unimoe.registry import Registry

SPLITS = ("train", "validation", "test")
MARKER = ".complete.json"


class DataError(UniMoEError, ValueError):
    """A data directory that is missing, incomplete or corrupt."""


@dataclass
class TaskCard:
    """What ``DATASETS.md`` says about a task."""

    name: str
    modality: str
    source: str
    license: str
    split_rule: str
    description: str
    sizes: dict[str, int] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)


@dataclass
class Builder:
    name: str
    fn: Callable[[Path, int], TaskCard]
    version: int
    modality: str


DATA_BUILDERS: Registry[Builder] = Registry("dataset")


def register_builder(name: str, *, modality: str, version: int = 1):
    """Register ``fn(out_dir: Path, seed: int) -> TaskCard``. Bump ``version`` when the output changes: existing
    builds of an older version are rebuilt."""

    def decorator(fn: Callable[[Path, int], TaskCard]) -> Callable[[Path, int], TaskCard]:
        DATA_BUILDERS.register(name)(Builder(name=name, fn=fn, version=version, modality=modality))
        return fn

    return decorator


BUILDER_MODULES = ("tasks_text", "tasks_vision", "tasks_audio", "tasks_points_series")


def _load_builders() -> None:
    """Import the modules that register builders (kept out of ``import unimoe`` for speed)."""
    import importlib

    for module in BUILDER_MODULES:
        try:
            importlib.import_module(f"unimoe.data.{module}")
        except ModuleNotFoundError as err:  # a task family not written yet
            if err.name != f"unimoe.data.{module}":
                raise


def list_tasks() -> list[str]:
    _load_builders()
    return DATA_BUILDERS.names()


def read_marker(task_dir: Path) -> dict | None:
    marker = task_dir / MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not all((task_dir / f"{split}.jsonl").is_file() for split in data.get("card", {}).get("sizes", {})):
        return None
    return data


def is_complete(task_dir: Path, builder: Builder, seed: int) -> bool:
    marker = read_marker(task_dir)
    return bool(marker) and marker.get("version") == builder.version and marker.get("seed") == seed


def build_task(name: str, out: Path, *, seed: int = 0, force: bool = False) -> tuple[TaskCard, bool]:
    """Build one task into ``out/name``. Returns its card and whether it was (re)built."""
    _load_builders()
    builder = DATA_BUILDERS.get(name, field="--tasks")
    target = out / name
    if not force and is_complete(target, builder, seed):
        return TaskCard(**read_marker(target)["card"]), False
    tmp = out / f".{name}.tmp-{os.getpid()}"
    for stale in out.glob(f".{name}.tmp-*") if out.is_dir() else ():  # ours, or left by a killed build
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    try:
        card = builder.fn(tmp, seed)
        for split in card.sizes:
            if not (tmp / f"{split}.jsonl").is_file():
                raise DataError(f"builder {name} reported split {split!r} but wrote no {split}.jsonl")
        marker = {"version": builder.version, "seed": seed, "card": asdict(card),
                  "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        old = out / f".{name}.old-{os.getpid()}"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return card, True


def build_suite(
    out: str | Path, tasks: Sequence[str] | None = None, *, seed: int = 0, force: bool = False, progress: bool = True
) -> list[TaskCard]:
    """Build ``tasks`` (default: all) under ``out`` and write ``out/DATASETS.md``."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(tasks) if tasks else list_tasks()
    _load_builders()
    for name in names:
        DATA_BUILDERS.get(name, field="--tasks")
    cards = []
    bar = tqdm(names, desc="data build", unit="task", disable=not progress)
    for name in bar:
        bar.set_postfix(task=name)
        before = read_marker(out / name)
        card, built = build_task(name, out, seed=seed, force=force)
        cards.append(card)
        if before is not None and before.get("seed") != seed:
            # said even without progress output: the test splits that earlier scores came from are gone
            print(f"{out / name}: rebuilt with seed {seed}, replacing the one built with seed {before.get('seed')} "
                  "(scores of earlier runs on it came from other splits)")  # fmt: skip
        elif progress:
            bar.write(f"{'built' if built else 'up to date'}: {name} {card.sizes}")
    write_datasets_card(out)
    return cards


def write_datasets_card(out: Path) -> Path:
    """``DATASETS.md``: one section per complete task under ``out``."""
    cards = []
    for task_dir in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        marker = read_marker(task_dir)
        if marker:
            cards.append(TaskCard(**marker["card"]))
    lines = [
        "# UniMoE offline benchmark suite",
        "",
        "Built by `unimoe data build` from real data that installs from the package registries. Every file here is",
        "derived deterministically from the sources below (fixed seeds); rebuilding gives the same records.",
        "",
        "| task | modality | train | validation | test | source | license |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cards:
        sizes = [str(c.sizes.get(s, 0)) for s in SPLITS]
        lines.append(f"| {c.name} | {c.modality} | {' | '.join(sizes)} | {c.source} | {c.license} |")
    for c in cards:
        lines += ["", f"## {c.name}", "", c.description, "", f"- **Source:** {c.source}", f"- **License:** {c.license}",
                  f"- **Split rule:** {c.split_rule}"]  # fmt: skip
        lines += [f"- **{k}:** {v}" for k, v in c.extra.items()]
    path = out / "DATASETS.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def check_data_root(data_root: str | Path) -> None:
    """A :class:`DataError` that says how to build the suite when ``data_root`` is not a directory."""
    if not Path(data_root).is_dir():
        raise DataError(
            f"data directory {data_root} does not exist; build it with `unimoe data build --out {data_root}`"
        )


def task_dir(data_root: str | Path, name: str) -> Path:
    """The directory of a built task, or a :class:`DataError` that says how to build it."""
    path = Path(data_root) / name
    check_data_root(data_root)
    if read_marker(path) is None:
        if name not in list_tasks():  # not a task `unimoe data build` knows: building it would fail too
            raise DataError(f"unknown task {name!r} (not built in {data_root}); tasks: {', '.join(list_tasks())}")
        raise DataError(
            f"task {name!r} in {data_root} is missing or incomplete; run `unimoe data build --out {data_root} "
            f"--tasks {name}`"
        )
    return path


def check_task_names(names: Sequence[str]) -> None:
    known = set(list_tasks())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; choose from: {', '.join(sorted(known))}")
