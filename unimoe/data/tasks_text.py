"""Text-only task: ``text_qa`` — does language ability survive multimodal training?

Short questions whose answer is one word: number order (after / before / larger / smaller) and reading a list of
words (first / last / which word is a colour ...). Test questions use number pairs and word lists that never
appear in training, so the task measures the rule, not memorisation.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from unimoe.data.build import TaskCard, register_builder
from unimoe.data.records import assistant, user_text, write_jsonl

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
NOUNS = (
    "apple river house chair table window garden bottle pencil mountain ocean forest bridge candle mirror "
    "rabbit tiger horse lemon cloud"
).split()
COLOURS = "red green blue yellow black white".split()


def _number_questions() -> list[tuple[str, str, str, str]]:
    """(template, key, question, answer); ``key`` identifies the operands for splitting."""
    out = []
    for a in range(13):
        if a < 12:
            out.append(("after", f"{a}", f"What number comes after {NUMBER_WORDS[a]}?", NUMBER_WORDS[a + 1]))
        if a > 0:
            out.append(("before", f"{a}", f"What number comes before {NUMBER_WORDS[a]}?", NUMBER_WORDS[a - 1]))
        for b in range(13):
            if a != b:
                pair = f"{a},{b}"
                out.append(("larger", pair, f"Which is larger, {NUMBER_WORDS[a]} or {NUMBER_WORDS[b]}?",
                            NUMBER_WORDS[max(a, b)]))  # fmt: skip
                out.append(("smaller", pair, f"Which is smaller, {NUMBER_WORDS[a]} or {NUMBER_WORDS[b]}?",
                            NUMBER_WORDS[min(a, b)]))  # fmt: skip
    return out


def _list_questions(rng: random.Random, n: int) -> list[tuple[str, str, str, str]]:
    out = []
    triples = list(itertools.permutations(NOUNS, 3))
    rng.shuffle(triples)
    for words in triples[:n]:
        listed = ", ".join(words)
        key = "|".join(words)
        kind = rng.choice(["first", "last", "colour"])
        if kind == "first":
            out.append(("first", key, f"What is the first word in: {listed}?", words[0]))
        elif kind == "last":
            out.append(("last", key, f"What is the last word in: {listed}?", words[-1]))
        else:
            colour = rng.choice(COLOURS)
            mixed = list(words)
            mixed.insert(rng.randrange(4), colour)
            out.append(("colour", key, f"Which word is a colour: {', '.join(mixed)}?", colour))
    return out


@register_builder("text_qa", modality="text", version=2)
def build_text_qa(out: Path, seed: int) -> TaskCard:
    rng = random.Random(seed)
    questions = _number_questions() + _list_questions(rng, 2400)
    rng.shuffle(questions)
    n = len(questions)
    n_test, n_val = n // 6, n // 12
    splits = {"test": questions[:n_test], "validation": questions[n_test : n_test + n_val],
              "train": questions[n_test + n_val :]}  # fmt: skip
    sizes = {}
    for split, items in splits.items():
        records = (
            {
                "id": f"text_qa/{split}/{i:05d}",
                "messages": [user_text(q), assistant(a)],
                "answer": a,
                "meta": {"template": t, "key": key},
            }
            for i, (t, key, q, a) in enumerate(items)
        )
        sizes[split] = write_jsonl(out / f"{split}.jsonl", records)
    return TaskCard(
        name="text_qa",
        modality="text",
        source="procedurally generated: number order and word-list questions with one-word answers",
        license="CC0 (generated)",
        split_rule="each distinct question (operands / word list) is in exactly one split; random partition by seed",
        description="Short English questions answered with one word: which number comes after / before, which is "
        "larger / smaller, and the first, last or colour word of a list of words.",
        sizes=sizes,
    )
