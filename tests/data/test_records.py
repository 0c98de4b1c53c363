"""Record validation in ``read_split``: every malformed record is one DataError naming file, line, id and problem."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from unimoe.data.build import MARKER, DataError
from unimoe.data.records import read_split, write_jsonl

IMAGE = {"type": "image", "path": "media/0.png"}


def good(**changes) -> dict:
    record = {
        "id": "toy/test/00001",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [IMAGE, {"type": "text", "text": "What digit is this?"}]},
            {"role": "assistant", "content": "seven"},
        ],
        "answer": "seven",
        "choices": ["six", "seven"],
        "target": [1.0, 2, -3.5],
        "meta": {"label": 7},
    }
    record.update(changes)
    return {k: v for k, v in record.items() if v is not DROP}


DROP = object()


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}, {"role": "assistant", "content": "x"}]


def split_with(tmp_path: Path, bad: dict) -> Path:
    """A task folder whose test split holds a good record on line 1 and ``bad`` on line 2."""
    task = tmp_path / "toy"
    write_jsonl(task / "test.jsonl", [good(id="toy/test/00000"), bad])
    (task / "media").mkdir()
    (task / "media" / "0.png").write_bytes(b"png")
    return task


def test_valid_records_pass_with_absolute_media_paths(tmp_path):
    task = split_with(tmp_path, good())
    records = read_split(task, "test", output="multiple_choice")
    assert [r["id"] for r in records] == ["toy/test/00000", "toy/test/00001"]
    assert records[1]["messages"][1]["content"][0]["path"] == str(task / "media" / "0.png")
    assert records[1]["messages"][2] == {"role": "assistant", "content": "seven"}
    assert read_split(task, "test", output="forecast", train=True, limit=1)[0]["target"] == [1.0, 2, -3.5]
    # a user turn of media only, inline series values and an absolute path inside the folder are fine
    inside = str(tmp_path / "b" / "toy" / "media" / "0.png")
    ok = good(messages=user([IMAGE, {"type": "series", "values": [1, 2]}, {"type": "image", "path": inside}]))
    content = read_split(split_with(tmp_path / "b", ok), "test")[1]["messages"][0]["content"]
    assert content[1]["values"] == [1, 2] and content[2]["path"] == inside


def test_not_utf8_names_the_line(tmp_path):
    task = split_with(tmp_path, good())
    with (task / "test.jsonl").open("ab") as f:
        f.write('{"id": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"test\.jsonl:3: not UTF-8 text \(byte 0xe9 at column 12\)"):
        read_split(task, "test")


STRUCTURE = [
    ([1, 2], "a record must be a JSON object, got a list"),
    (good(id=DROP), "'id' is missing"),
    (good(id=7), "'id' must be a non-empty string, got 7"),
    (good(messages="hello"), "'messages' must be a non-empty list of messages, got a string \"hello\""),
    (good(messages=[]), "'messages' must be a non-empty list of messages, got a list \\[\\]"),
    (good(messages=DROP), "'messages' must be a non-empty list of messages, got missing"),
    (good(messages=["hi"]), "message 1 must be an object with 'role' and 'content', got a string"),
    (good(messages=[{"content": "hi"}]), "message 1 has no 'role'; a role is one of user, assistant, system"),
    (good(messages=[{"role": "robot", "content": "hi"}]), 'message 1 has role "robot"; a role is one of'),
    (good(messages=[{"role": "user", "content": 5}]), "message 1 \\(user\\): 'content' must be a string or a list"),
    (good(messages=[{"role": "user"}, {"role": "assistant", "content": "x"}]), "message 1 \\(user\\) has no 'content'"),
    (good(messages=user("  ")), "message 1 \\(user\\) is empty: the prompt says nothing"),
    (good(messages=user([])), "message 1 \\(user\\) is empty"),
    (good(messages=[{"role": "system", "content": "s"}]), "no user message"),
    (
        good(messages=[{"role": "assistant", "content": "7"}, {"role": "user", "content": "hi"}]),
        "message 1 is the assistant's, before any user turn",
    ),  # fmt: skip
    (good(messages=user(["hello"])), 'message 1 part 1 must be an object like .*, got a string "hello"'),
    (
        good(messages=user([{"type": "text", "text": None}])),
        "message 1 part 1: a text part needs a string 'text', got null",
    ),
    (good(messages=user([{"text": 3}])), "message 1 part 1: a text part needs a string 'text', got 3"),
    (
        good(messages=user([{"type": "imagee", "path": "a"}])),
        'message 1 part 1: unknown part type "imagee"; choose one of text, image',
    ),
    (
        good(messages=user([{"type": "image", "path": 5}])),
        "message 1 part 1 \\(image\\): 'path' must be a file path \\(a string\\), got 5",
    ),
    (good(messages=user([{"type": "audio", "path": ""}])), "message 1 part 1 \\(audio\\): 'path' must be a file path"),
    (good(messages=user([{"type": "audio"}])), "message 1 part 1 \\(audio\\): a media part needs a 'path'"),
    (good(answer=7), "'answer' must be a string, got a number 7"),
    (good(meta=[1]), "'meta' must be an object, got a list"),
]


@pytest.mark.parametrize("record, problem", STRUCTURE)
def test_malformed_records_fail_with_file_line_id(tmp_path, record, problem):
    task = split_with(tmp_path, record)
    rid = record.get("id") if isinstance(record, dict) and isinstance(record.get("id"), str) else None
    where = re.escape(f"{task / 'test.jsonl'}:2: ") + (re.escape(f"record {rid!r}: ") if rid else "")
    with pytest.raises(DataError, match="^" + where + problem):
        read_split(task, "test")


@pytest.mark.parametrize("path", ["../../../../etc/passwd", "/etc/passwd", "media/../../other/x.png", "../toy2/x.png"])
def test_media_paths_outside_the_task_folder_are_refused(tmp_path, path):
    task = split_with(tmp_path, good(messages=user([{"type": "image", "path": path}])))
    problem = f"media path {re.escape(repr(path))} points outside the task folder {re.escape(str(task))}"
    with pytest.raises(DataError, match=f"test.jsonl:2: record 'toy/test/00001': {problem}"):
        read_split(task, "test")


def test_media_links_the_folder_holds_are_followed_but_not_dotdot_through_them(tmp_path):
    store = tmp_path / "disk" / "media"
    store.mkdir(parents=True)
    (store / "0.png").write_bytes(b"png")
    (tmp_path / "disk" / "secret.txt").write_text("x")
    task = tmp_path / "toy"
    task.mkdir()
    os.symlink(store, task / "media")  # media on another disk: the folder owner's choice
    write_jsonl(task / "test.jsonl", [good()])
    assert read_split(task, "test")[0]["messages"][1]["content"][0]["path"] == str(task / "media/0.png")
    write_jsonl(task / "test.jsonl", [good(messages=user([{"type": "image", "path": "media/../secret.txt"}]))])
    with pytest.raises(
        DataError, match="media path 'media/../secret.txt' leads outside the task folder .*through a link"
    ):
        read_split(task, "test")


TASK_KINDS = [
    ("multiple_choice", good(choices=DROP), "no 'choices': a multiple-choice task scores"),
    (None, good(choices=[]), "'choices' must be a non-empty list of strings, got \\[\\]"),
    (None, good(choices=[1, 2]), "'choices' must be a non-empty list of strings, got \\[1, 2\\]"),
    (None, good(choices="box"), "'choices' must be a non-empty list of strings, got \"box\""),
    (
        "multiple_choice",
        good(answer="eight"),
        'the answer "eight" is not one of the choices \\["six", "seven"\\]: the '
        "model picks a choice, so this item could never be scored right",
    ),
    ("forecast", good(target=DROP), "no 'target': a forecast task needs the values to forecast"),
    (None, good(target="359.2 359.1"), "'target' must be a non-empty list of finite numbers, got \"359.2 359.1\""),
    (None, good(target=[]), "'target' must be a non-empty list of finite numbers, got \\[\\]"),
    (None, good(target=[1, None, 3]), "'target' must be a non-empty list of finite numbers, got \\[1, null, 3\\]"),
    (None, good(target=[1, True]), "'target' must be a non-empty list of finite numbers"),
]


@pytest.mark.parametrize("output, record, problem", TASK_KINDS)
def test_choices_and_forecast_targets_are_checked(tmp_path, output, record, problem):
    task = split_with(tmp_path, record)
    with pytest.raises(DataError, match=f"test.jsonl:2: record 'toy/test/00001': {problem}"):
        read_split(task, "test", output=output)
    if output is not None:
        assert len(read_split(task, "test")) == 2  # a generate task needs neither


def test_answers_match_choices_as_the_scorer_compares_them(tmp_path):
    records = read_split(split_with(tmp_path, good(answer=" Seven.")), "test", output="multiple_choice")
    assert records[1]["answer"] == " Seven."  # normalized like the accuracy metric: "seven"


def test_an_id_used_twice_in_a_split_is_named(tmp_path):
    """Predictions and per-item results are keyed by id: a repeated id would overwrite one item with another."""
    task = split_with(tmp_path, good(id="toy/test/00000"))
    with pytest.raises(
        DataError, match="test.jsonl:2: record 'toy/test/00000': the id is already used on line 1; ids must be unique"
    ):
        read_split(task, "test")


def test_non_finite_target_is_refused(tmp_path):
    task = tmp_path / "toy"
    task.mkdir()
    (task / "test.jsonl").write_text(json.dumps(good(id="a"))[:-1] + ', "target": [1, NaN]}\n')
    with pytest.raises(
        DataError, match="test.jsonl:1: record 'a': 'target' must be a non-empty list of finite numbers"
    ):
        read_split(task, "test")


def test_training_records_end_with_the_answer(tmp_path):
    from unimoe.train.config import DataMix
    from unimoe.train.data import TrainData

    task = tmp_path / "digits_cls"
    only_user = good(messages=[{"role": "user", "content": "What digit?"}])
    write_jsonl(task / "train.jsonl", [good(id="t/0"), only_user])
    (task / MARKER).write_text(json.dumps({"version": 1, "seed": 0, "card": {"modality": "text"}}))
    assert len(read_split(task, "train")) == 2  # an evaluation prompt may end with the user
    with pytest.raises(DataError, match="train.jsonl:2: record 'toy/test/00001': the last message is a user turn; a "
                       "training record ends with the assistant's answer"):  # fmt: skip
        TrainData(tmp_path, DataMix(tasks=["digits_cls"], split="train"))
