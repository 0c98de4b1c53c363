"""Readers for public benchmarks in their standard local formats → our chat-JSONL records.

Each reader turns a downloaded benchmark into records like the ones our own tasks use (see
:mod:`unimoe.data.records`): absolute media paths, ``answer`` (the reference), ``choices`` for multiple choice,
``target`` for forecasts, and ``meta``. The runner then scores them like any task. Nothing is downloaded.

=============  ==========================================================  ==========  ===============================
reader         expects at ``path``                                         output      default metrics
=============  ==========================================================  ==========  ===============================
vqav2          ``v2_OpenEnded_mscoco_<split>_questions.json``,             generate    vqa_accuracy
               ``v2_mscoco_<split>_annotations.json``, ``<split>/COCO_<split>_<12-digit id>.jpg``
mmbench        a VLMEvalKit TSV (or a folder with one; ``split`` picks       multiple    accuracy
               the file whose name contains it)                              choice
scienceqa      ``problems.json`` (+ ``pid_splits.json``), images at          multiple    accuracy
               ``[images/]<split>/<pid>/image.png``                          choice
clotho_aqa     ``clotho_aqa_<split>.csv`` (or a CSV path) + audio in         generate    accuracy
               ``audio_files/``, ``audio/``, ``<split>/`` or next to the CSV
modelnet40     ``<class>/{train,test}/<class>_NNNN.{off,npy,txt}``            multiple    accuracy
                                                                             choice
librispeech    ``<speaker>/<chapter>/*.flac`` + ``*.trans.txt`` (``path``    generate    wer
               or ``path/<split>``, e.g. ``LibriSpeech/test-clean``)
ett            an ETT CSV (``ETTh1.csv`` ... ``ETTm2.csv``)                  forecast    mse, mae, mase
=============  ==========================================================  ==========  ===============================

Prompt formats (the user turn's text; the assistant turn is the answer):

* vqav2: ``"<question>\\nAnswer the question using a single word or phrase."``; ``answer`` = the most frequent of
  the 10 human answers, ``meta["answers"]`` = all 10 (what ``vqa_accuracy`` scores against);
* mmbench / scienceqa: ``"[<hint>\\n]<question>\\nOptions:\\nA. <text>\\nB. <text>\\n...\\nAnswer with the
  letter."``; ``choices`` = the option letters present, ``answer`` = the letter, ``meta["options"]`` = ``{letter:
  text}`` (ScienceQA's hint is prefixed ``"Context: "``);
* clotho_aqa: ``"<question> Answer yes or no."`` for yes/no questions, else ``"<question> Answer with a single
  word."``; the 3 annotator rows of a question are merged: ``answer`` = the majority answer (first on a tie),
  ``meta["answers"]`` / ``meta["confidences"]`` all of them;
* modelnet40: ``"What object is this?"``; ``answer`` = the class name with ``_`` → space (``night stand``), ``choices``
  = all class names found (40 for the real data);
* librispeech: ``"Transcribe the audio."``; ``answer`` = the transcript as in ``trans.txt`` (upper case; WER
  normalizes case);
* ett: ``"Forecast the next <H> values of <channel> (<hourly|15-minute> data)."`` with the context as a ``series``
  part (an ``.npy`` written to a cache dir); ``target`` = the next ``horizon`` values, ``answer`` = them as text.

Readers take ``(path, split, limit, **options)``; :func:`read_benchmark` checks the name and turns missing or
unreadable inputs into a one-line :class:`~unimoe.data.build.DataError` naming the file.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unimoe.data.build import DataError
from unimoe.data.records import assistant, user_text

__all__ = ["READERS", "Reader", "read_benchmark", "register_reader"]

LETTERS = "ABCDEFGHIJ"


@dataclass
class Reader:
    name: str
    fn: Callable[..., list[dict[str, Any]]]
    modality: str
    default_metrics: list[str] = field(default_factory=list)
    output: str = "generate"  # "generate" | "multiple_choice" | "forecast" (the runner's output types)
    description: str = ""


READERS: dict[str, Reader] = {}


def register_reader(reader: Reader) -> Reader:
    if reader.output not in ("generate", "multiple_choice", "forecast"):
        raise ValueError(f"reader {reader.name}: output must be 'generate', 'multiple_choice' or 'forecast'")
    READERS[reader.name] = reader
    return reader


def read_benchmark(
    name: str, path: str | Path, split: str | None = None, limit: int | None = None, **options: Any
) -> list[dict[str, Any]]:
    """Records of benchmark ``name`` read from ``path`` (at most ``limit``; ``options`` go to the reader)."""
    if name not in READERS:
        raise DataError(f"unknown benchmark reader {name!r}; choose one of {', '.join(sorted(READERS))}")
    if limit is not None and limit < 0:
        raise DataError(f"{name}: limit must be >= 0, got {limit}")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist (the {name} benchmark data)")
    try:
        return READERS[name].fn(path.resolve(), split, limit, **options)
    except DataError:
        raise
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{name}: cannot read {getattr(err, 'filename', None) or path} ({err})") from None


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path} does not exist ({what})")
    return path


def _load_json(path: Path, what: str) -> Any:
    _need_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid JSON (not UTF-8 text)") from None


def _record(
    rid: str,
    text: str,
    media: dict[str, Any] | None,
    answer: Any,
    *,
    choices: list[str] | None = None,
    target: list | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    parts = [media] if media else []
    record: dict[str, Any] = {
        "id": rid,
        "messages": [user_text(text, *parts), assistant(str(answer) if answer is not None else "")],
        "answer": answer,
    }
    if choices is not None:
        record["choices"] = choices
    if target is not None:
        record["target"] = target
    record["meta"] = meta or {}
    return record


def _options_prompt(question: str, options: dict[str, str], hint: str = "") -> str:
    lines = [hint.strip()] if hint and hint.strip() else []
    lines.append(question.strip())
    lines.append("Options:")
    lines.extend(f"{letter}. {text}" for letter, text in options.items())
    lines.append("Answer with the letter.")
    return "\n".join(lines)


def _take(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


# ---------------------------------------------------------------------------------------------------------------------
# VQAv2
# ---------------------------------------------------------------------------------------------------------------------


def read_vqav2(path: Path, split: str | None, limit: int | None) -> list[dict[str, Any]]:
    split = split or "val2014"
    root = path if path.is_dir() else path.parent
    questions_file = root / f"v2_OpenEnded_mscoco_{split}_questions.json"
    annotations_file = root / f"v2_mscoco_{split}_annotations.json"
    questions = _load_json(questions_file, f"VQAv2 {split} questions")
    annotations = _load_json(annotations_file, f"VQAv2 {split} annotations")
    try:
        by_qid = {a["question_id"]: a for a in annotations["annotations"]}
        items = questions["questions"]
    except (KeyError, TypeError) as err:
        raise DataError(f"{annotations_file} / {questions_file}: not the VQAv2 format (missing {err})") from None
    records = []
    for q in _take(items, limit):
        try:
            qid, image_id, question = q["question_id"], int(q["image_id"]), q["question"]
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{questions_file}: a question without {err}") from None
        if qid not in by_qid:
            raise DataError(f"{annotations_file}: no annotation for question_id {qid}")
        ann = by_qid[qid]
        answers = [a["answer"] for a in ann.get("answers", [])]
        image = root / split / f"COCO_{split}_{image_id:012d}.jpg"
        _need_file(image, f"the image of VQAv2 question {qid}")
        top = ann.get("multiple_choice_answer") or (Counter(answers).most_common(1)[0][0] if answers else "")
        records.append(
            _record(
                f"vqav2/{split}/{qid}",
                f"{question}\nAnswer the question using a single word or phrase.",
                {"type": "image", "path": str(image)},
                top,
                meta={
                    "answers": answers,
                    "question_id": qid,
                    "image_id": image_id,
                    "answer_type": ann.get("answer_type"),
                    "question_type": ann.get("question_type"),
                },
            )
        )
    return records


# ---------------------------------------------------------------------------------------------------------------------
# MMBench (VLMEvalKit TSV)
# ---------------------------------------------------------------------------------------------------------------------


def _find_tsv(path: Path, split: str | None) -> Path:
    if path.is_file():
        return path
    tsvs = sorted(path.glob("*.tsv"))
    if split:
        tsvs = [p for p in tsvs if split.lower() in p.name.lower()]
    if len(tsvs) != 1:
        found = ", ".join(p.name for p in tsvs) or "none"
        raise DataError(f"{path}: expected one MMBench .tsv{f' matching {split!r}' if split else ''}, found {found}")
    return tsvs[0]


def _image_suffix(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data[:3] == b"GIF":
        return ".gif"
    return ".img"


def read_mmbench(
    path: Path, split: str | None, limit: int | None, cache_dir: str | Path | None = None
) -> list[dict[str, Any]]:
    """Images are decoded once into ``cache_dir`` (default ``<tsv stem>_images/`` next to the TSV). A row whose
    ``image`` is a short number refers to the image of that ``index`` (VLMEvalKit's de-duplication)."""
    import pandas as pd

    tsv = _find_tsv(path, split)
    try:
        frame = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{tsv}: not a readable TSV ({str(err).strip().splitlines()[0]})") from None
    missing = [c for c in ("index", "question", "image", "A", "B") if c not in frame.columns]
    if missing:
        raise DataError(f"{tsv}: missing column(s) {', '.join(missing)} (a VLMEvalKit MMBench TSV)")
    cache = Path(cache_dir) if cache_dir else tsv.parent / f"{tsv.stem}_images"
    cache.mkdir(parents=True, exist_ok=True)
    images = dict(zip(frame["index"], frame["image"]))
    letters = [c for c in LETTERS if c in frame.columns]
    records = []
    for row in _take(frame.to_dict("records"), limit):
        index = row["index"]
        encoded = row["image"]
        if len(encoded) <= 64 and encoded in images:
            encoded = images[encoded]
        try:
            data = base64.b64decode(encoded, validate=False)
        except (binascii.Error, ValueError) as err:
            raise DataError(f"{tsv}: row index {index}: image is not base64 ({err})") from None
        if not data:
            raise DataError(f"{tsv}: row index {index}: empty image")
        image = cache / f"{index}{_image_suffix(data)}"
        if not image.is_file() or image.stat().st_size != len(data):
            tmp = image.with_name(image.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(image)
        options = {c: row[c].strip() for c in letters if row.get(c, "").strip() and row[c].strip().lower() != "nan"}
        hint = row.get("hint", "")
        hint = "" if hint.strip().lower() == "nan" else hint
        answer = row.get("answer", "").strip() or None
        records.append(
            _record(
                f"mmbench/{tsv.stem}/{index}",
                _options_prompt(row["question"], options, hint),
                {"type": "image", "path": str(image)},
                answer,
                choices=list(options),
                meta={
                    "index": index,
                    "options": options,
                    "category": row.get("category"),
                    "l2_category": row.get("l2-category"),
                    "answer_text": options.get(answer or ""),
                },
            )
        )
    return records


# ---------------------------------------------------------------------------------------------------------------------
# ScienceQA
# ---------------------------------------------------------------------------------------------------------------------


def read_scienceqa(path: Path, split: str | None, limit: int | None, image_only: bool = False) -> list[dict[str, Any]]:
    """``image_only=True`` keeps only the questions with an image (the ScienceQA-IMG subset)."""
    split = split or "test"
    root = path if path.is_dir() else path.parent
    problems_file = path if path.is_file() else root / "problems.json"
    problems = _load_json(problems_file, "ScienceQA problems")
    if not isinstance(problems, dict):
        raise DataError(f"{problems_file}: expected an object of pid -> problem")
    splits_file = root / "pid_splits.json"
    if splits_file.is_file():
        splits = _load_json(splits_file, "ScienceQA splits")
        if split not in splits:
            raise DataError(f"{splits_file}: no split {split!r} (has {', '.join(splits)})")
        pids = [str(p) for p in splits[split]]
    else:
        pids = [pid for pid, p in problems.items() if isinstance(p, dict) and p.get("split") == split]
    records = []
    for pid in pids:
        if limit is not None and len(records) >= limit:
            break
        problem = problems.get(pid)
        if not isinstance(problem, dict):
            raise DataError(f"{problems_file}: no problem {pid!r} (listed in split {split!r})")
        try:
            question, choices, answer = problem["question"], list(problem["choices"]), int(problem["answer"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{problems_file}: problem {pid} without a valid {err}") from None
        if not 0 <= answer < len(choices) <= len(LETTERS):
            raise DataError(f"{problems_file}: problem {pid}: answer {answer} is not one of {len(choices)} choices")
        media = None
        if problem.get("image"):
            candidates = [root / split / pid / problem["image"], root / "images" / split / pid / problem["image"]]
            image = next((c for c in candidates if c.is_file()), None)
            if image is None:
                raise DataError(f"{candidates[0]} does not exist (the image of ScienceQA problem {pid})")
            media = {"type": "image", "path": str(image)}
        elif image_only:
            continue
        options = {LETTERS[i]: str(c) for i, c in enumerate(choices)}
        hint = (problem.get("hint") or "").strip()
        records.append(
            _record(
                f"scienceqa/{split}/{pid}",
                _options_prompt(question, options, f"Context: {hint}" if hint else ""),
                media,
                LETTERS[answer],
                choices=list(options),
                meta={
                    "pid": pid,
                    "options": options,
                    "answer_text": choices[answer],
                    "answer_index": answer,
                    "lecture": problem.get("lecture"),
                    "solution": problem.get("solution"),
                    **{k: problem.get(k) for k in ("subject", "topic", "category", "skill", "grade")},
                },
            )
        )
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Clotho-AQA
# ---------------------------------------------------------------------------------------------------------------------

_YES_NO = {"yes", "no"}


def read_clotho_aqa(path: Path, split: str | None, limit: int | None, answer_type: str = "all") -> list[dict[str, Any]]:
    """``answer_type``: ``"all"``, ``"yes_no"`` or ``"single_word"`` (the two question kinds of Clotho-AQA)."""
    if answer_type not in ("all", "yes_no", "single_word"):
        raise DataError(f"clotho_aqa: answer_type must be all, yes_no or single_word, got {answer_type!r}")
    split = split or "test"
    if path.is_file():
        table, root = path, path.parent
    else:
        root = path
        names = [f"clotho_aqa_{split}.csv", f"{split}.csv"]
        table = next((root / n for n in names if (root / n).is_file()), root / names[0])
        _need_file(table, f"the Clotho-AQA {split} CSV")
    with table.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"{table}: no rows")
    missing = [c for c in ("file_name", "QuestionText", "answer") if c not in rows[0]]
    if missing:
        raise DataError(
            f"{table}: missing column(s) {', '.join(missing)} (file_name, QuestionText, answer, confidence)"
        )
    grouped: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in rows:
        grouped.setdefault((row["file_name"].strip(), row["QuestionText"].strip()), []).append(row)
    folders = [root / "audio_files", root / "audio", root / split, root]
    records = []
    for number, ((file_name, question), group) in enumerate(grouped.items()):
        if limit is not None and len(records) >= limit:
            break
        answers = [(r.get("answer") or "").strip().lower() for r in group]
        answer = Counter(answers).most_common(1)[0][0]  # most_common keeps first-seen order on ties
        yes_no = answer in _YES_NO
        if (answer_type == "yes_no" and not yes_no) or (answer_type == "single_word" and yes_no):
            continue
        audio = next((d / file_name for d in folders if (d / file_name).is_file()), None)
        if audio is None:
            raise DataError(f"{folders[0] / file_name} does not exist (audio of {table.name}, also looked in "
                            f"audio/, {split}/ and next to the CSV)")  # fmt: skip
        suffix = "Answer yes or no." if yes_no else "Answer with a single word."
        records.append(
            _record(
                f"clotho_aqa/{split}/{number:05d}",
                f"{question} {suffix}",
                {"type": "audio", "path": str(audio)},
                answer,
                meta={
                    "file_name": file_name,
                    "answers": answers,
                    "confidences": [(r.get("confidence") or "").strip() for r in group],
                    "answer_type": "yes_no" if yes_no else "single_word",
                },
            )
        )
    return records


# ---------------------------------------------------------------------------------------------------------------------
# ModelNet40
# ---------------------------------------------------------------------------------------------------------------------

_POINT_SUFFIXES = (".off", ".npy", ".txt", ".ply", ".obj")


def read_modelnet40(path: Path, split: str | None, limit: int | None) -> list[dict[str, Any]]:
    """Items are ordered round-robin over the classes (sorted within a class), so ``limit`` gives a class-balanced
    subset. Any of ``.off`` meshes or pre-sampled ``.npy`` / ``.txt`` point files is accepted."""
    split = split or "test"
    if not path.is_dir():
        raise DataError(f"{path}: expected the ModelNet40 root folder (<class>/{split}/<class>_NNNN.off)")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class: dict[str, list[Path]] = {}
    for name in classes:
        folder = path / name / split
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in _POINT_SUFFIXES) if folder.is_dir() else []
        if files:
            per_class[name] = files
    if not per_class:
        raise DataError(f"{path}: no <class>/{split}/*.off (or .npy/.txt) files found")
    choices = [name.replace("_", " ") for name in sorted(per_class)]
    ordered = []
    longest = max(len(v) for v in per_class.values())
    for i in range(longest):
        ordered.extend((name, files[i]) for name, files in sorted(per_class.items()) if i < len(files))
    records = []
    for name, file in _take(ordered, limit):
        label = name.replace("_", " ")
        records.append(
            _record(
                f"modelnet40/{split}/{file.stem}",
                "What object is this?",
                {"type": "points", "path": str(file)},
                label,
                choices=choices,
                meta={"class": name, "label": choices.index(label)},
            )
        )
    return records


# ---------------------------------------------------------------------------------------------------------------------
# LibriSpeech
# ---------------------------------------------------------------------------------------------------------------------


def read_librispeech(path: Path, split: str | None, limit: int | None) -> list[dict[str, Any]]:
    root = path / split if split and (path / split).is_dir() else path
    if not root.is_dir():
        raise DataError(f"{root}: expected a LibriSpeech folder (<speaker>/<chapter>/*.trans.txt)")
    transcripts = sorted(root.glob("*/*/*.trans.txt"))
    if not transcripts:
        raise DataError(f"{root}: no <speaker>/<chapter>/<speaker>-<chapter>.trans.txt found")
    name = split or root.name
    records = []
    for trans in transcripts:
        for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if limit is not None and len(records) >= limit:
                return records
            if not line.strip():
                continue
            utt, _, text = line.strip().partition(" ")
            if not text:
                raise DataError(f"{trans}:{lineno}: expected '<utterance-id> <TRANSCRIPT>'")
            candidates = [trans.parent / f"{utt}{suffix}" for suffix in (".flac", ".wav")]
            audio = next((c for c in candidates if c.is_file()), None)
            if audio is None:
                raise DataError(f"{trans.parent / (utt + '.flac')} does not exist (listed in {trans.name})")
            speaker, chapter = utt.split("-")[:2] if utt.count("-") >= 2 else (trans.parent.parent.name, "")
            records.append(
                _record(
                    f"librispeech/{name}/{utt}",
                    "Transcribe the audio.",
                    {"type": "audio", "path": str(audio)},
                    text.strip(),
                    meta={"utterance": utt, "speaker": speaker, "chapter": chapter},
                )
            )
    return records


# ---------------------------------------------------------------------------------------------------------------------
# ETT
# ---------------------------------------------------------------------------------------------------------------------

ETT_COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
_MONTH_HOURS = 30 * 24


def ett_borders(freq: str, context_length: int) -> dict[str, tuple[int, int]]:
    """The standard Informer borders (12/4/4 months): row ranges whose windows start at ``lo`` and end by ``hi``.
    Validation and test ranges start ``context_length`` rows early, so their first forecast follows the border."""
    per = 4 if freq == "15min" else 1
    train, val, test = 12 * _MONTH_HOURS * per, 4 * _MONTH_HOURS * per, 4 * _MONTH_HOURS * per
    return {
        "train": (0, train),
        "val": (train - context_length, train + val),
        "test": (train + val - context_length, train + val + test),
    }


def read_ett(
    path: Path,
    split: str | None,
    limit: int | None,
    context_length: int = 96,
    horizon: int = 24,
    features: str = "S",
    target: str = "OT",
    stride: int = 1,
    normalize: bool = True,
    cache_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Sliding windows over the ETT split (``stride`` rows apart; 1 = every window, the standard protocol).

    * ``features="S"`` (default): context and target are the ``target`` column only (context ``(L, 1)``, target
      ``H`` floats);
    * ``"MS"``: context = all 7 channels, target = the ``target`` column;
    * ``"M"``: context and target all 7 channels (``target`` = ``H`` lists of 7; metrics flatten them).

    ``normalize=True`` (the standard protocol) z-scores each channel with the mean / std of the *train* rows;
    ``meta["scaler"]`` holds them. ``meta["season"]`` is 24 (hourly ETTh) or 96 (15-minute ETTm), ``meta
    ["target_channel"]`` the target's column in the context. Contexts are written as ``.npy`` to ``cache_dir``
    (default ``<csv stem>_windows/`` next to the CSV)."""
    import pandas as pd

    split = split or "test"
    if features not in ("S", "MS", "M"):
        raise DataError(f"ett: features must be S, MS or M, got {features!r}")
    if context_length < 1 or horizon < 1 or stride < 1:
        raise DataError("ett: context_length, horizon and stride must be >= 1")
    csv_path = path
    if path.is_dir():
        found = sorted(path.glob("ETT*.csv"))
        if split and not found:
            found = sorted(path.glob("*.csv"))
        if len(found) != 1:
            raise DataError(f"{path}: expected one ETT*.csv, found {', '.join(p.name for p in found) or 'none'}")
        csv_path = found[0]
    try:
        frame = pd.read_csv(csv_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{csv_path}: not a readable CSV ({str(err).strip().splitlines()[0]})") from None
    missing = [c for c in ["date", *ETT_COLUMNS] if c not in frame.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)} (date, {', '.join(ETT_COLUMNS)})")
    if target not in ETT_COLUMNS:
        raise DataError(f"ett: target must be one of {', '.join(ETT_COLUMNS)}, got {target!r}")
    freq = "15min" if csv_path.name.lower().startswith("ettm") else "h"
    if not csv_path.name.lower().startswith(("etth", "ettm")) and len(frame) > 1:
        step = pd.to_datetime(frame["date"].iloc[1]) - pd.to_datetime(frame["date"].iloc[0])
        freq = "15min" if step <= pd.Timedelta(minutes=15) else "h"
    borders = ett_borders(freq, context_length)
    if split not in borders:
        raise DataError(f"ett: split must be train, val or test, got {split!r}")
    needed = borders["test"][1]
    if len(frame) < needed:
        kind = "hourly (ETTh)" if freq == "h" else "15-minute (ETTm)"
        raise DataError(
            f"{csv_path}: {len(frame)} rows, but the standard train/val/test split of {kind} ETT data needs at least "
            f"{needed} (12/4/4 months)"
        )
    try:
        data = frame[ETT_COLUMNS].to_numpy(dtype=np.float64)
    except ValueError as err:
        raise DataError(f"{csv_path}: value columns must be numbers ({err})") from None
    mean, std = np.zeros(len(ETT_COLUMNS)), np.ones(len(ETT_COLUMNS))
    if normalize:
        train = data[: borders["train"][1]]
        mean, std = train.mean(axis=0), train.std(axis=0)
        std[std == 0] = 1.0
        data = (data - mean) / std
    t = ETT_COLUMNS.index(target)
    in_cols = [t] if features == "S" else list(range(len(ETT_COLUMNS)))
    out_cols = list(range(len(ETT_COLUMNS))) if features == "M" else [t]
    season = 96 if freq == "15min" else 24
    lo, hi = borders[split]
    starts = list(range(lo, hi - context_length - horizon + 1, stride))
    tag = f"{split}_{context_length}_{horizon}_{features}_{target}{'_norm' if normalize else ''}"
    cache = (Path(cache_dir) if cache_dir else csv_path.parent / f"{csv_path.stem}_windows") / tag
    cache.mkdir(parents=True, exist_ok=True)
    unit = "hourly" if freq == "h" else "15-minute"
    what = target if features != "M" else "all 7 channels"
    records = []
    for start in _take(starts, limit):
        context = data[start : start + context_length, in_cols].astype(np.float32)
        future = data[start + context_length : start + context_length + horizon, out_cols]
        file = cache / f"{start:06d}.npy"
        if not file.is_file():
            tmp = file.with_name(file.stem + ".tmp.npy")
            np.save(tmp, context)
            tmp.replace(file)
        values = [float(v) for v in future[:, 0]] if features != "M" else [[float(v) for v in row] for row in future]
        flat = np.asarray(values, dtype=np.float64).ravel()
        records.append(
            _record(
                f"ett/{csv_path.stem}/{split}/{start:06d}",
                f"Forecast the next {horizon} values of {what} ({unit} data).",
                {"type": "series", "path": str(file)},
                ", ".join(f"{v:.4f}" for v in flat),
                target=values,
                meta={
                    "season": season,
                    "start": start,
                    "target_channel": in_cols.index(t),
                    "features": features,
                    "columns": [ETT_COLUMNS[c] for c in in_cols],
                    "scaler": {"mean": mean[in_cols].tolist(), "std": std[in_cols].tolist()} if normalize else None,
                },
            )
        )
    return records


# ---------------------------------------------------------------------------------------------------------------------

register_reader(Reader("vqav2", read_vqav2, "image", ["vqa_accuracy", "accuracy"], "generate", "VQAv2 open-ended"))
register_reader(Reader("mmbench", read_mmbench, "image", ["accuracy"], "multiple_choice", "MMBench (VLMEvalKit TSV)"))
register_reader(Reader("scienceqa", read_scienceqa, "image", ["accuracy"], "multiple_choice", "ScienceQA"))
register_reader(Reader("clotho_aqa", read_clotho_aqa, "audio", ["accuracy"], "generate", "Clotho-AQA"))
register_reader(Reader("modelnet40", read_modelnet40, "points", ["accuracy"], "multiple_choice", "ModelNet40"))
register_reader(Reader("librispeech", read_librispeech, "audio", ["wer", "cer"], "generate", "LibriSpeech ASR"))
register_reader(Reader("ett", read_ett, "series", ["mse", "mae", "mase"], "forecast", "ETT long-horizon forecasting"))
