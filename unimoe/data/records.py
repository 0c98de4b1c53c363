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

Media ``path`` values are relative to the split file's directory; :func:`read_split` makes them absolute, refuses
one outside that folder, and checks every record with :func:`check_record` (a malformed one is a ``DataError``
naming the file, line and record id). The last assistant turn is the training target; evaluation prompts are the
messages before it.
"""

from __future__ import annotations

import json
import math
import os
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


def _iter_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, JSON value)`` for each non-blank line (a :class:`DataError` naming the line when one is not
    UTF-8 text or not valid JSON)."""
    from unimoe.data.build import DataError

    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None


# ----------------------------------------------------------------------------- validation
ROLES = ("user", "assistant", "system")
MEDIA_TYPES = ("image", "audio", "video", "points", "series")
PART_TYPES = ("text", *MEDIA_TYPES)
_ROLES = frozenset(ROLES)
_MEDIA_TYPES = frozenset(MEDIA_TYPES)
_NUMBER_TYPES = frozenset({int, float})
_STR_TYPE = {str}


class RecordError(ValueError):
    """What is wrong with one record (:func:`read_split` adds the file, line and record id)."""


class MediaRoot:
    """A task folder that media paths must stay inside. A path may not lead out of it by ``..`` or by being
    absolute (``..`` is followed through symlinks, as the OS does); symlinks the folder itself holds (a ``media``
    link to a big disk) are the folder owner's choice and are followed."""

    def __init__(self, task_dir: str | Path):
        self.root = os.path.abspath(task_dir)

    def resolve(self, rel: str) -> str:
        """The absolute path of a media ``path`` (relative to the folder, or absolute), refused outside the folder."""
        if rel[0] != os.sep and ".." not in rel and not (os.altsep and os.altsep in rel):
            return f"{self.root}{os.sep}{rel}"  # the common case: plainly inside
        path = os.path.normpath(os.path.join(self.root, rel))
        if not _inside(path, self.root):
            raise RecordError(f"media path {rel!r} points outside the task folder {self.root}")
        if ".." in rel and os.path.realpath(os.path.join(self.root, rel)) != os.path.realpath(path):
            # `link/..` is the parent of the link's target, not the folder: the OS would read something else
            raise RecordError(f"media path {rel!r} leads outside the task folder {self.root} (through a link)")
        return path


def _inside(path: str, root: str) -> bool:
    return path.startswith(root) and (len(path) == len(root) or path[len(root)] == os.sep or root == os.sep)


def _finite_numbers(values: list) -> bool:
    return set(map(type, values)) <= _NUMBER_TYPES and all(map(math.isfinite, values))  # bool is no number here


def check_record(record: Any, media: MediaRoot, *, output: str | None = None, train: bool = False) -> dict[str, Any]:
    """Validate one chat record as read from JSON and make its media paths absolute (in place), or raise
    :class:`RecordError` saying what is wrong.

    Checked: an object with a string ``id`` and a non-empty ``messages`` list; every message an object with a
    ``role`` in :data:`ROLES` and a ``content`` that is a string or a list of parts; every part an object whose
    ``type`` is in :data:`PART_TYPES` (default ``text``), text parts with a string ``text``, media parts with a
    string ``path`` inside the task folder (or inline ``values``); the first non-system message is the user's and
    says something; ``answer`` a string (or null), ``choices`` a non-empty list of strings, ``target`` a non-empty
    list of finite numbers, ``meta`` an object. ``output`` (a task's output type) adds what that kind of task needs
    (``multiple_choice``: ``choices``, with the ``answer`` among them as the scorer compares answers; ``forecast``:
    ``target``); ``train``: the last message is the assistant's."""
    if type(record) is not dict:
        raise RecordError(f"a record must be a JSON object, got {_kind(record)}")
    rid = record.get("id")
    if type(rid) is not str or not rid:
        raise RecordError("'id' is missing" if rid is None else f"'id' must be a non-empty string, got {rid!r}")
    messages = record.get("messages")
    if type(messages) is not list or not messages:
        what = "missing" if messages is None else f"{_kind(messages)} {_short(messages)}"
        raise RecordError(f"'messages' must be a non-empty list of messages, got {what}")
    first = None  # the role of the first non-system message
    for i, message in enumerate(messages, 1):
        if type(message) is not dict:
            raise RecordError(f"message {i} must be an object with 'role' and 'content', got {_kind(message)}")
        role = message.get("role")
        if role not in _ROLES:
            got = "no 'role'" if role is None else f"role {_short(role)}"
            raise RecordError(f"message {i} has {got}; a role is one of {', '.join(ROLES)}")
        content = message.get("content")
        if type(content) is str:
            empty = not content.strip()
        elif type(content) is list:
            for j, part in enumerate(content):
                if type(part) is not dict or part.get("type", "text") != "text" or type(part.get("text")) is not str:
                    content[j] = _check_part(part, media, f"message {i} part {j + 1}")
            empty = not content
        elif content is None:
            raise RecordError(f"message {i} ({role}) has no 'content'")
        else:
            raise RecordError(
                f"message {i} ({role}): 'content' must be a string or a list of parts, got {_kind(content)}"
            )
        if first is None and role != "system":
            first = role
            if role != "user":
                raise RecordError(f"message {i} is the assistant's, before any user turn (the user speaks first)")
            if empty:
                raise RecordError(f"message {i} (user) is empty: the prompt says nothing")
    if first is None:
        raise RecordError("no user message (only system messages)")
    if train and messages[-1]["role"] != "assistant":
        raise RecordError(
            f"the last message is a {messages[-1]['role']} turn; a training record ends with the assistant's answer "
            "(its training target)"
        )
    answer = record.get("answer")
    if answer is not None and type(answer) is not str:
        raise RecordError(f"'answer' must be a string, got {_kind(answer)} {_short(answer)}")
    choices = record.get("choices")
    if choices is not None:
        if type(choices) is not list or not choices or set(map(type, choices)) != _STR_TYPE:
            raise RecordError(f"'choices' must be a non-empty list of strings, got {_short(choices)}")
    elif output == "multiple_choice":
        raise RecordError("no 'choices': a multiple-choice task scores the model's likelihood of each choice")
    if output == "multiple_choice" and answer is not None:
        from unimoe.eval.metrics import normalize_answer  # the scorer's own comparison: no false alarms

        if normalize_answer(answer) not in {normalize_answer(c) for c in choices}:
            raise RecordError(
                f"the answer {_short(answer)} is not one of the choices {_short(choices)}: the model picks a choice, "
                "so this item could never be scored right"
            )
    target = record.get("target")
    if target is not None:
        if type(target) is not list or not target or not _finite_numbers(target):
            raise RecordError(f"'target' must be a non-empty list of finite numbers, got {_short(target)}")
    elif output == "forecast":
        raise RecordError("no 'target': a forecast task needs the values to forecast (a list of numbers)")
    meta = record.get("meta")
    if meta is not None and type(meta) is not dict:
        raise RecordError(f"'meta' must be an object, got {_kind(meta)}")
    return record


def _check_part(part: Any, media: MediaRoot, where: str) -> dict[str, Any]:
    """A media part with its path made absolute, or a :class:`RecordError` for a malformed part."""
    if type(part) is not dict:
        raise RecordError(
            f"{where} must be an object like {{'type': 'text', 'text': ...}} or {{'type': 'image', 'path': ...}}, "
            f"got {_kind(part)} {_short(part)}"
        )
    kind = part.get("type", "text")
    if kind == "text":
        raise RecordError(f"{where}: a text part needs a string 'text', got {_short(part.get('text'))}")
    if kind not in _MEDIA_TYPES:
        raise RecordError(f"{where}: unknown part type {_short(kind)}; choose one of {', '.join(PART_TYPES)}")
    if "path" in part:
        path = part["path"]
        if type(path) is not str or not path:
            raise RecordError(f"{where} ({kind}): 'path' must be a file path (a string), got {_short(path)}")
        return {**part, "path": media.resolve(path)}
    if type(part.get("values")) is list:  # inline values (a series)
        return part
    raise RecordError(f"{where} ({kind}): a media part needs a 'path' (relative to the task folder)")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_split(
    task_dir: str | Path,
    split: str,
    *,
    limit: int | None = None,
    output: str | None = None,
    train: bool = False,
) -> list[dict[str, Any]]:
    """All records of a split with absolute media paths, each checked by :func:`check_record` (``output``: the
    task's output type, for its own checks; ``train``: records must end with the assistant's answer). A missing
    file, a line that is not UTF-8 JSON or a malformed record is a :class:`DataError` naming the file, the line,
    the record id and what is wrong; so is an id used twice in the split."""
    from unimoe.data.build import DataError

    task_dir = Path(task_dir)
    path = task_dir / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    media = MediaRoot(task_dir)
    records = []
    seen: dict[str, int] = {}  # id -> line: predictions and per-item results are keyed by id
    for lineno, record in _iter_lines(path):
        try:
            records.append(check_record(record, media, output=output, train=train))
            if record["id"] in seen:
                raise RecordError(f"the id is already used on line {seen[record['id']]}; ids must be unique in a split")
            seen[record["id"]] = lineno
        except RecordError as err:
            rid = record.get("id") if isinstance(record, dict) else None
            label = f"record {rid!r}: " if isinstance(rid, str) and rid else ""
            raise DataError(f"{path}:{lineno}: {label}{err}") from None
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
