"""The chat-JSONL record format every task split uses, and helpers to read and write it.

One line per example::

    {
      "id": "digits_cls/test/00012",
      "messages": [
        {"role": "user", "content": [{"type": "image", "path": "media/00012.png"},
                                     {"type": "text", "text": "What digit is this?"}]},
        {"role": "assistant", "content": "seven"}
      ],
      "answer": "seven",                  # the reference the metrics compare against (text tasks)
      "choices": ["zero", ..., "nine"],   # optional: candidate answers for multiple-choice scoring
      "target": [..],                     # optional: numeric targets (forecasting)
      "meta": {...}                       # optional: source ids, seasonality, label ids, ...
    }

Media ``path`` values are relative to the split file's directory; :func:`read_split` makes them absolute. The
last assistant turn is the training target; evaluation prompts are the messages before it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    from unimoe.data.build import DataError

    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None


def absolutize(record: dict[str, Any], base: Path) -> dict[str, Any]:
    """Resolve relative media paths of a record against ``base`` (returns a new record)."""
    messages = []
    for message in record.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            content = [
                {**part, "path": str(base / part["path"])}
                if part.get("type", "text") != "text" and "path" in part and not Path(part["path"]).is_absolute()
                else part
                for part in content
            ]
        messages.append({**message, "content": content})
    return {**record, "messages": messages}


def read_split(task_dir: str | Path, split: str, *, limit: int | None = None) -> list[dict[str, Any]]:
    """All records of a split with absolute media paths (a clear error when the file is missing or corrupt)."""
    from unimoe.data.build import DataError

    task_dir = Path(task_dir)
    path = task_dir / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    records = []
    for record in iter_jsonl(path):
        if "messages" not in record or "id" not in record:
            raise DataError(f"{path}: record without 'id' or 'messages'")
        records.append(absolutize(record, task_dir))
        if limit is not None and len(records) >= limit:
            break
    return records


def user_text(text: str, *media: dict[str, Any]) -> dict[str, Any]:
    """A user message with media parts first, then the text."""
    return {"role": "user", "content": [*media, {"type": "text", "text": text}]}


def assistant(content: str | list[dict[str, Any]]) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def prompt_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages an evaluation sends: everything before the final assistant turn."""
    messages = list(record["messages"])
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return messages
