"""The task registry: YAML task specs shipped in ``unimoe/configs/tasks`` plus real-benchmark readers.

A spec says where the records come from (a built task directory, or a benchmark reader and a path), how the model
answers (``output``), and which metrics score it::

    name: digits_cls
    data: digits_cls            # a task built by `unimoe data build`
    split: test
    output: multiple_choice     # generate | multiple_choice | forecast | generate_image | generate_audio
    metrics: [accuracy]
    max_new_tokens: 8
    suites: [tiny, vision]

On the command line, ``--tasks a,b`` names tasks or suites (``all`` is every shipped task) and
``--tasks reader:PATH`` scores a real benchmark read from local files (``vqav2:/data/vqav2``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from unimoe.config_utils import config_from_dict
from unimoe.errors import ConfigError

OUTPUT_TYPES = ("generate", "multiple_choice", "forecast", "generate_image", "generate_audio")


@dataclass
class TaskSpec:
    name: str
    data: str | None = None
    reader: str | None = None
    path: str | None = None
    split: str | None = "test"  # for readers: None = the reader's default split
    output: str = "generate"
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    max_new_tokens: int = 16
    suites: list[str] = field(default_factory=list)
    description: str = ""

    def __post_init__(self) -> None:
        where = f"task {self.name}"
        if self.output not in OUTPUT_TYPES:
            raise ConfigError(f"{where}: output {self.output!r} unknown; choose one of {', '.join(OUTPUT_TYPES)}")
        if (self.data is None) == (self.reader is None):
            raise ConfigError(f"{where}: give exactly one of 'data' (a built task) or 'reader' (a benchmark reader)")
        if self.max_new_tokens < 1:
            raise ConfigError(f"{where}: max_new_tokens must be >= 1")
        if not self.metrics:
            raise ConfigError(f"{where}: metrics must not be empty")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _tasks_dir() -> Path:
    return Path(str(resources.files("unimoe.configs") / "tasks"))


def load_task_specs() -> dict[str, TaskSpec]:
    """Every shipped task spec, validated (metric names included)."""
    from unimoe.eval.metrics import METRICS

    specs = {}
    for path in sorted(_tasks_dir().glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        spec = config_from_dict(TaskSpec, data, where=f"{path.name}")
        if spec.name != path.stem:
            raise ConfigError(f"{path.name}: name {spec.name!r} must match the file name")
        unknown = [m for m in spec.metrics if m not in METRICS]
        if unknown:
            raise ConfigError(f"{path.name}: unknown metric(s) {unknown}; choose from {', '.join(sorted(METRICS))}")
        specs[spec.name] = spec
    return specs


def list_task_names() -> list[str]:
    return sorted(load_task_specs())


def resolve_tasks(selection: str | list[str], *, reader_split: str | None = None) -> list[TaskSpec]:
    """``"a,b"`` / ``["a", "suite"]`` / ``"reader:PATH"`` → task specs, in the given order, without duplicates."""
    items = [s.strip() for s in (selection.split(",") if isinstance(selection, str) else selection) if s.strip()]
    if not items:
        raise ConfigError("--tasks: no task given")
    specs = load_task_specs()
    suites: dict[str, list[str]] = {"all": list(specs)}
    for spec in specs.values():
        for suite in spec.suites:
            suites.setdefault(suite, []).append(spec.name)
    out: dict[str, TaskSpec] = {}
    for item in items:
        if item in specs:
            out[item] = specs[item]
        elif item in suites:
            out.update({n: specs[n] for n in suites[item]})
        elif ":" in item:
            reader, path = item.split(":", 1)
            out[item] = reader_task(reader, path, split=reader_split)
        else:
            raise ConfigError(
                f"--tasks: unknown task or suite {item!r}; tasks: {', '.join(sorted(specs))}; "
                f"suites: {', '.join(sorted(suites))}; or READER:PATH"
            )
    return _distinct_names(list(out.values()))


def _distinct_names(specs: list[TaskSpec]) -> list[TaskSpec]:
    """Reader tasks are named after their reader; two of one reader (``ett:ETTh1.csv,ett:ETTh2.csv``) get the file
    or folder name added (``ett-ETTh1``: names become file names), then a number if that still repeats, so
    neither result overwrites the other."""
    from collections import Counter

    def renamed(named: list[TaskSpec], key) -> list[TaskSpec]:
        counts = Counter(s.name for s in named)
        return [dataclasses.replace(s, name=key(s, i)) if s.reader and counts[s.name] > 1 else s
                for i, s in enumerate(named)]  # fmt: skip

    specs = renamed(specs, lambda s, i: f"{s.reader}-{Path(s.path.rstrip('/')).stem or 'data'}")
    return renamed(specs, lambda s, i: f"{s.name}-{i + 1}")


def reader_task(reader: str, path: str, *, split: str | None = None) -> TaskSpec:
    from unimoe.eval.readers import READERS

    if reader not in READERS:
        raise ConfigError(f"--tasks: unknown benchmark reader {reader!r}; choose one of: {', '.join(sorted(READERS))}")
    r = READERS[reader]
    return TaskSpec(
        name=f"{reader}",
        reader=reader,
        path=path,
        split=split,
        output=r.output,
        metrics=list(r.default_metrics),
        max_new_tokens=32,
    )
