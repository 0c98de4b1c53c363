"""Training data: a deterministic, modality-balanced schedule of records over the built tasks, and the collator.

The whole sample schedule of a stage is a function of the seed (``(steps, batch)`` pairs of task and record
indices), so a resumed run sees exactly the batches an uninterrupted run would have seen from that step on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from unimoe.data.build import read_marker, task_dir
from unimoe.data.records import read_split
from unimoe.errors import ConfigError
from unimoe.train.augment import Augmenter
from unimoe.train.config import DataMix


def built_tasks(data_root: str | Path) -> list[str]:
    """The names of the complete built tasks under ``data_root``, sorted."""
    root = Path(data_root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and read_marker(p) is not None)


class TrainData:
    """The records of a stage's tasks. ``generation`` names the modalities the model can generate: records whose
    answer is such a medium train its head (forecasting records become series targets), other media answers are
    skipped; text answers always train the LM."""

    def __init__(
        self,
        data_root: str | Path,
        mix: DataMix,
        *,
        generation: set[str] | frozenset[str] = frozenset(),
        inputs: set[str] | frozenset[str] | None = None,
    ):
        """``inputs``: the media the model reads (its encoders); None = any. Used where no tasks are named (the stage
        presets): then every task built under ``data_root`` whose records this model can train on is used."""
        every = not mix.tasks
        names = list(mix.tasks) or built_tasks(data_root)
        if not names:
            raise ConfigError(f"data.tasks: none given and no task built under {data_root} (`unimoe data build`)")
        self.tasks: list[str] = []
        self.mix = mix
        self.records: list[list[dict[str, Any]]] = []
        self.modality: list[str] = []
        for name in names:
            path = task_dir(data_root, name)
            records = [
                t
                for t in (training_record(r, generation) for r in read_split(path, mix.split, train=True))
                if t is not None
            ]
            if every and inputs is not None:  # e.g. image tasks for a model without an image encoder
                records = [r for r in records if input_media(r) <= set(inputs)]
            if not records and every:
                continue  # e.g. a generation task for a model without that head
            if not records:
                raise ConfigError(
                    f"data.tasks: {name} has no {mix.split} records this model can train on (text answers, or media "
                    f"answers of its generation heads: {sorted(generation) or 'none'})"
                )
            self.tasks.append(name)
            self.records.append(records)
            self.modality.append(read_marker(path)["card"]["modality"])
        if not self.tasks:
            raise ConfigError(f"data.tasks: no task under {data_root} has records this model can train on")

    def schedule(self, steps: int, batch_size: int, seed: int) -> np.ndarray:
        """``(steps * batch_size, 2)`` task / record indices."""
        rng = np.random.default_rng(seed)
        n = steps * batch_size
        weights = np.array([self.mix.weights.get(t, 1.0) for t in self.tasks], dtype=np.float64)
        if self.mix.balance == "record":
            weights = weights * np.array([len(r) for r in self.records])
        if self.mix.balance == "modality":
            # each modality gets the same share; tasks of a modality split it by their weights
            groups: dict[str, float] = {}
            for m, w in zip(self.modality, weights):
                groups[m] = groups.get(m, 0.0) + w
            weights = np.array([w / groups[m] for m, w in zip(self.modality, weights)])
        task_ids = rng.choice(len(self.tasks), size=n, p=weights / weights.sum())
        record_ids = np.array([rng.integers(len(self.records[t])) for t in task_ids])
        return np.stack([task_ids, record_ids], axis=1)

    def item(self, task_id: int, record_id: int) -> tuple[dict[str, Any], str]:
        return self.records[task_id][record_id], self.modality[task_id]


def training_record(record: dict[str, Any], generation: set[str] | frozenset[str]) -> dict[str, Any] | None:
    """The record as the model trains on it, or None when it cannot (its answer is a medium it cannot generate).

    With a forecasting head, a record with a numeric ``target`` (ts_forecast) answers with a series part holding
    the target, so the head learns it instead of the LM learning to write numbers."""
    last = record["messages"][-1]
    if last["role"] != "assistant":
        return None
    if "series" in generation and isinstance(record.get("target"), list):
        answer = {"role": "assistant", "content": [{"type": "series", "values": record["target"]}]}
        return {**record, "messages": [*record["messages"][:-1], answer]}
    if isinstance(last["content"], str):
        return record
    kinds = {p.get("type", "text") for p in last["content"]} - {"text"}
    return record if kinds <= set(generation) else None


def input_media(record: dict[str, Any]) -> set[str]:
    """The media types in a record's prompt turns (not its answer)."""
    return {
        part.get("type", "text")
        for message in record["messages"][:-1]
        if not isinstance(message["content"], str)
        for part in message["content"]
    } - {"text"}


class Sample(NamedTuple):
    """One scheduled training sample; ``index`` is its place in the stage's whole schedule (what seeds its
    augmentation)."""

    record: dict[str, Any]
    modality: str
    task: str
    index: int


def answers_with_series(record: dict[str, Any]) -> bool:
    """Whether the record's answer continues its input series (forecasting): a series answer, or a numeric
    ``target`` (a forecasting record trained as text by a model without a series head)."""
    if isinstance(record.get("target"), list):
        return True
    content = record["messages"][-1].get("content")
    return isinstance(content, list) and any(part.get("type") == "series" for part in content)


class ScheduleDataset(torch.utils.data.Dataset):
    """Item ``i`` is the ``i``-th scheduled sample from ``start`` on."""

    def __init__(self, data: TrainData, schedule: np.ndarray, start: int = 0):
        self.data = data
        self.schedule = schedule[start:]
        self.start = start

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, i: int) -> Sample:
        task_id, record_id = (int(v) for v in self.schedule[i])
        record, modality = self.data.item(task_id, record_id)
        return Sample(record, modality, self.data.tasks[task_id], self.start + i)


class Collator:
    """Records → model inputs with labels; in ``specialize`` stages also ``forced_experts`` from each sample's
    modality (``moe.modality_experts``: every token of a sample goes to each of its modality's experts, at weight 1;
    every modality needs the same number of them). With an
    ``augment`` table (``data.augment``) the media features of sample ``i`` of the schedule are augmented with a
    generator seeded by ``(seed, i)``, so a sample draws the same augmentation in whichever batch it lands."""

    def __init__(
        self,
        processor,
        *,
        forced_experts: dict[str, list[int]] | None = None,
        augment: dict[str, dict[str, Any]] | None = None,
        seed: int = 0,
    ):
        self.processor = processor
        self.processor.enable_feature_cache()
        self.forced = forced_experts
        self.augmenter = Augmenter(augment)
        self.seed = seed

    def __call__(self, items: list[Sample]):
        augment = None
        if self.augmenter:
            rngs = [np.random.default_rng((self.seed, s.index)) for s in items]

            def augment(chat: int, modality: str, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                sample = items[chat]
                return self.augmenter(
                    modality, features, rngs[chat], task=sample.task, keep_time_axis=answers_with_series(sample.record)
                )

        batch = self.processor([s.record["messages"] for s in items], return_labels=True, augment=augment)
        if self.forced is not None:
            ids = []
            for modality in (s.modality for s in items):
                if modality not in self.forced:
                    raise ConfigError(f"moe.modality_experts: no expert for modality {modality!r} (specialize stage)")
                ids.append(self.forced[modality])
            if len({len(group) for group in ids}) > 1:
                raise ConfigError(
                    "moe.modality_experts: a forced stage needs the same number of experts for every modality, got "
                    + ", ".join(f"{k}: {v}" for k, v in self.forced.items())
                )
            group = torch.tensor(ids)  # (B, G)
            batch["forced_experts"] = group[:, None, :].expand(-1, batch["input_ids"].shape[1], -1).contiguous()
        batch["sample_modality"] = [s.modality for s in items]
        batch["sample_task"] = [s.task for s in items]
        return batch
