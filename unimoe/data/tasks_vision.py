"""Vision tasks: ``vqa_easy``, ``digits_cls``, ``video_motion`` and ``gen_image_digits``.

All four come from real data that installs from the package registries (see DESIGN.md, "Real data that works
offline"):

* ``vqa_easy`` — easy-VQA (PyPI ``easy-vqa``, MIT): 64×64 pictures of one coloured shape with short questions whose
  answer is one of 13 words. Its own train / test pictures; validation is a held-out part of its train pictures.
* ``digits_cls`` — "What digit is this?" on scikit-learn's ``load_digits`` (1,797 real 8×8 handwritten digits).
* ``video_motion`` — 8-frame GIF clips of one of those digits sliding across a black canvas; the answer names the
  digit and the direction (``"seven left"``), so it needs both content and motion.
* ``gen_image_digits`` — "Draw the digit seven." with a real digit image as the assistant's (image) answer; judged
  later by :class:`unimoe.eval.judge_image.DigitImageJudge`.

The three digit tasks share one split of the 1,797 source images (:func:`digit_splits`, stratified by label, from
the build seed): a digit image used by any test split is in no train split of any digit task, since one model
trains on the train splits of all tasks together. Digits are drawn white on black (sklearn's 0..16 ink scale mapped
to 0..255).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np

from unimoe.data.build import TaskCard, register_builder
from unimoe.data.records import assistant, user_text, write_jsonl

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS = ("left", "right", "up", "down")
MOTION_CHOICES = tuple(f"{word} {direction}" for word in DIGIT_WORDS for direction in DIRECTIONS)

DIGITS_SOURCE = "scikit-learn `load_digits` (UCI Optical Recognition of Handwritten Digits: 1,797 real 8×8 digits)"
DIGITS_LICENSE = "CC BY 4.0 (UCI ML Repository); shipped in scikit-learn (BSD-3-Clause)"
DIGIT_SPLIT_RULE = (
    "split by source image: the 1,797 sklearn digits are split once, stratified by label ({test:.0%} test, "
    "{val:.0%} validation, rest train, seeded), shared by digits_cls / video_motion / gen_image_digits, so no test "
    "image appears in any digit task's train split"
)

DIGIT_TEST_FRACTION = 0.20
DIGIT_VAL_FRACTION = 0.08
IMAGE_SIZE = 32  # digit PNGs: the 8×8 digit upscaled ×4 (nearest)
CLIP_SIZE = 32  # video canvas
CLIP_DIGIT = 12  # the digit's size inside a clip
CLIP_FRAMES = 8
CLIP_STEP = 2  # pixels per frame

# Salts so the tasks draw independent random streams from one build seed.
_SALT = {"digit_split": 11, "vqa_easy": 21, "digits_cls": 31, "video_motion": 41, "gen_image_digits": 51}


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, _SALT[name]])


# --------------------------------------------------------------------------------------------------------- digits
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as ``(N, 8, 8)`` uint8 ink values 0..16 and ``(N,)`` int labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.uint8), digits.target.astype(np.int64)


def digit_splits(
    labels: np.ndarray,
    seed: int,
    *,
    test_fraction: float = DIGIT_TEST_FRACTION,
    val_fraction: float = DIGIT_VAL_FRACTION,
) -> dict[str, np.ndarray]:
    """Source-image indices per split, stratified by label (sorted arrays); same labels and seed → same split."""
    rng = _rng(seed, "digit_split")
    out: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for label in range(10):
        idx = np.flatnonzero(labels == label)
        idx = idx[rng.permutation(len(idx))]
        n_test = round(len(idx) * test_fraction)
        n_val = round(len(idx) * val_fraction)
        out["test"] += idx[:n_test].tolist()
        out["validation"] += idx[n_test : n_test + n_val].tolist()
        out["train"] += idx[n_test + n_val :].tolist()
    return {split: np.array(sorted(v), dtype=np.int64) for split, v in out.items()}


def digit_to_uint8(image8: np.ndarray) -> np.ndarray:
    """sklearn's 0..16 ink → 0..255 grey (white digit on black)."""
    return np.rint(image8.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)


def digit_png_image(image8: np.ndarray, size: int = IMAGE_SIZE):
    """A ``size``×``size`` RGB PIL image of an 8×8 digit, upscaled with nearest neighbour (every pixel a 4×4 block)."""
    from PIL import Image

    grey = Image.fromarray(digit_to_uint8(image8), mode="L")
    return grey.resize((size, size), Image.Resampling.NEAREST).convert("RGB")


def _save_png(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False)


def _limit(indices: np.ndarray, limit: int | None) -> np.ndarray:
    return indices if limit is None else indices[:limit]


def _digit_split_rule() -> str:
    return DIGIT_SPLIT_RULE.format(test=DIGIT_TEST_FRACTION, val=DIGIT_VAL_FRACTION)


# ------------------------------------------------------------------------------------------------------- vqa_easy
def _vqa_kind(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in ("circle", "rectangle", "triangle") else "color"


def _pick_question(rng: np.random.Generator, candidates: list[tuple[str, str]]) -> tuple[str, str]:
    """One question for a picture: an open (shape / colour) question or a yes/no one with equal odds when the picture
    has both, which keeps yes/no near half of the answers (easy-VQA itself is 74% yes/no)."""
    open_qs = [c for c in candidates if c[1] not in ("yes", "no")]
    yes_no = [c for c in candidates if c[1] in ("yes", "no")]
    pool = open_qs if open_qs and (not yes_no or rng.random() < 0.5) else yes_no
    return pool[int(rng.integers(len(pool)))]


def _build_vqa_easy(
    out: Path, seed: int, *, n_train: int | None = None, n_val: int = 400, n_test: int = 500
) -> TaskCard:
    """One question per picture. ``n_train=None``: every easy-VQA train picture not held out for validation."""
    import easy_vqa

    rng = _rng(seed, "vqa_easy")
    answers = sorted(a.strip().lower() for a in easy_vqa.get_answers())
    sources = {}
    for source, questions, paths in (
        ("train", easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        ("test", easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
    ):
        by_image: dict[int, list[tuple[str, str]]] = {}
        for text, answer, image_id in zip(*questions, strict=True):
            by_image.setdefault(int(image_id), []).append((text.strip(), answer.strip().lower()))
        sources[source] = (by_image, paths)

    train_ids = sorted(sources["train"][0])
    train_ids = [train_ids[i] for i in rng.permutation(len(train_ids))]
    test_ids = sorted(sources["test"][0])
    test_ids = [test_ids[i] for i in rng.permutation(len(test_ids))]
    picks = {
        "train": ("train", train_ids[n_val:] if n_train is None else train_ids[n_val : n_val + n_train]),
        "validation": ("train", train_ids[:n_val]),
        "test": ("test", test_ids[:n_test]),
    }
    sizes = {}
    for split, (source, ids) in picks.items():
        by_image, paths = sources[source]
        records = []
        for i, image_id in enumerate(ids):
            question, answer = _pick_question(rng, by_image[image_id])
            rel = f"media/{source}_{image_id:05d}.png"
            (out / "media").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(paths[image_id], out / rel)
            records.append({
                "id": f"vqa_easy/{split}/{i:05d}",
                "messages": [user_text(question[:1].upper() + question[1:], {"type": "image", "path": rel}),
                             assistant(answer)],
                "answer": answer,
                "choices": answers,
                "meta": {"source_split": source, "image_id": image_id, "kind": _vqa_kind(answer)},
            })  # fmt: skip
        sizes[split] = write_jsonl(out / f"{split}.jsonl", records)
    return TaskCard(
        name="vqa_easy",
        modality="image",
        source="easy-VQA (PyPI `easy-vqa` 1.0, github.com/vzhou842/easy-VQA): 4,000 train / 1,000 test 64×64 images",
        license="MIT",
        split_rule=f"easy-VQA's own train / test pictures; validation = {n_val} train pictures held out by image id; "
        "one question per picture, so no picture is in two splits",
        description="Visual question answering on synthetic pictures of one coloured shape: what shape / colour is it, "
        "is there a <shape> / <colour> shape. One-word answers from 13 (3 shapes, 8 colours, yes, no).",
        sizes=sizes,
        extra={"answers": ", ".join(answers), "question mix": "per picture, open (shape/colour) or yes/no with equal "
               "odds when it has both (≈50% yes/no)", "image": "64×64 RGB PNG (copied unchanged)"},
    )  # fmt: skip


@register_builder("vqa_easy", modality="image", version=1)
def build_vqa_easy(out: Path, seed: int) -> TaskCard:
    return _build_vqa_easy(out, seed)


# ----------------------------------------------------------------------------------------------------- digits_cls
def _build_digits_cls(out: Path, seed: int, *, limit: int | None = None) -> TaskCard:
    """``limit``: at most that many source images per split (tests)."""
    images, labels = load_digit_images()
    splits = digit_splits(labels, seed)
    rng = _rng(seed, "digits_cls")
    sizes = {}
    for split in ("train", "validation", "test"):
        indices = _limit(splits[split][rng.permutation(len(splits[split]))], limit)
        records = []
        for i, src in enumerate(indices.tolist()):
            rel = f"media/{src:04d}.png"
            _save_png(digit_png_image(images[src]), out / rel)
            word = DIGIT_WORDS[labels[src]]
            records.append({
                "id": f"digits_cls/{split}/{i:05d}",
                "messages": [user_text("What digit is this?", {"type": "image", "path": rel}), assistant(word)],
                "answer": word,
                "choices": list(DIGIT_WORDS),
                "meta": {"source_index": src, "label": int(labels[src])},
            })  # fmt: skip
        sizes[split] = write_jsonl(out / f"{split}.jsonl", records)
    return TaskCard(
        name="digits_cls",
        modality="image",
        source=DIGITS_SOURCE,
        license=DIGITS_LICENSE,
        split_rule=_digit_split_rule(),
        description='Handwritten digit recognition: "What digit is this?" on a real 8×8 digit shown as a 32×32 image; '
        "the answer is the digit's English word.",
        sizes=sizes,
        extra={"answers": ", ".join(DIGIT_WORDS), "image": "32×32 RGB PNG, white digit on black (nearest ×4)"},
    )


@register_builder("digits_cls", modality="image", version=1)
def build_digits_cls(out: Path, seed: int) -> TaskCard:
    return _build_digits_cls(out, seed)


# --------------------------------------------------------------------------------------------------- video_motion
def motion_frames(image8: np.ndarray, direction: str, start: tuple[int, int]) -> list[np.ndarray]:
    """``CLIP_FRAMES`` uint8 ``(CLIP_SIZE, CLIP_SIZE)`` frames: the digit (``CLIP_DIGIT`` px, bilinear) at top-left
    ``start = (x, y)`` in frame 0, moving ``CLIP_STEP`` px a frame towards ``direction``."""
    from PIL import Image

    digit = np.asarray(
        Image.fromarray(digit_to_uint8(image8), mode="L").resize((CLIP_DIGIT, CLIP_DIGIT), Image.Resampling.BILINEAR)
    )
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    frames = []
    for t in range(CLIP_FRAMES):
        x, y = start[0] + dx * CLIP_STEP * t, start[1] + dy * CLIP_STEP * t
        frame = np.zeros((CLIP_SIZE, CLIP_SIZE), dtype=np.uint8)
        frame[y : y + CLIP_DIGIT, x : x + CLIP_DIGIT] = digit
        frames.append(frame)
    return frames


def random_start(rng: np.random.Generator, direction: str) -> tuple[int, int]:
    """A start so the whole path stays on the canvas: random along the motion within the slack, random across it."""
    room = CLIP_SIZE - CLIP_DIGIT  # max top-left coordinate
    travel = CLIP_STEP * (CLIP_FRAMES - 1)
    along = int(rng.integers(0, room - travel + 1))
    across = int(rng.integers(0, room + 1))
    if direction in ("left", "up"):
        along += travel
    return (along, across) if direction in ("left", "right") else (across, along)


def save_gif(frames: list[np.ndarray], path: Path) -> None:
    """Greyscale frames → a lossless looping GIF (every frame decodes back exactly)."""
    from PIL import Image

    images = [Image.fromarray(f, mode="L") for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0, optimize=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def _build_video_motion(out: Path, seed: int, *, train_clips_per_image: int = 2, limit: int | None = None) -> TaskCard:
    images, labels = load_digit_images()
    splits = digit_splits(labels, seed)
    rng = _rng(seed, "video_motion")
    question = "Which digit moves, and in which direction?"
    sizes = {}
    for split in ("train", "validation", "test"):
        indices = _limit(splits[split][rng.permutation(len(splits[split]))], limit)
        per_image = train_clips_per_image if split == "train" else 1
        records = []
        for src in indices.tolist():
            for d in rng.permutation(len(DIRECTIONS))[:per_image].tolist():
                direction = DIRECTIONS[d]
                start = random_start(rng, direction)
                i = len(records)
                rel = f"media/{split}_{i:05d}.gif"
                save_gif(motion_frames(images[src], direction, start), out / rel)
                answer = f"{DIGIT_WORDS[labels[src]]} {direction}"
                records.append({
                    "id": f"video_motion/{split}/{i:05d}",
                    "messages": [user_text(question, {"type": "video", "path": rel}), assistant(answer)],
                    "answer": answer,
                    "choices": list(MOTION_CHOICES),
                    "meta": {"source_index": src, "label": int(labels[src]), "direction": direction,
                             "start": list(start), "step": CLIP_STEP},
                })  # fmt: skip
        sizes[split] = write_jsonl(out / f"{split}.jsonl", records)
    return TaskCard(
        name="video_motion",
        modality="video",
        source=f"clips built from {DIGITS_SOURCE}",
        license=DIGITS_LICENSE,
        split_rule=_digit_split_rule() + f"; {train_clips_per_image} clips (distinct directions) per train image, "
        "one per validation / test image",
        description="Moving-digit video: a real handwritten digit slides across a black 32×32 canvas for 8 frames. "
        f'"{question}" The answer is "<digit word> <direction>", e.g. "seven left" (40 choices).',
        sizes=sizes,
        extra={
            "answer format": "`<digit word> <left|right|up|down>`",
            "clip": f"{CLIP_FRAMES}-frame greyscale GIF {CLIP_SIZE}×{CLIP_SIZE}, digit {CLIP_DIGIT}×{CLIP_DIGIT}, "
            f"{CLIP_STEP} px/frame, random start, lossless",
        },
    )


@register_builder("video_motion", modality="video", version=1)
def build_video_motion(out: Path, seed: int) -> TaskCard:
    return _build_video_motion(out, seed)


# ----------------------------------------------------------------------------------------------- gen_image_digits
def _build_gen_image_digits(
    out: Path, seed: int, *, test_per_digit: int = 10, val_per_digit: int | None = None, limit: int | None = None
) -> TaskCard:
    """Train: one record per train image (``limit`` caps it); validation / test: ``*_per_digit`` images per digit
    (``None``: all of that split)."""
    images, labels = load_digit_images()
    splits = digit_splits(labels, seed)
    rng = _rng(seed, "gen_image_digits")
    sizes = {}
    for split, per_digit in (("train", None), ("validation", val_per_digit), ("test", test_per_digit)):
        indices = splits[split][rng.permutation(len(splits[split]))]
        if per_digit is not None:
            kept = [idx for d in range(10) for idx in indices[labels[indices] == d][:per_digit].tolist()]
            indices = np.array(kept, dtype=np.int64)[rng.permutation(len(kept))]
        indices = _limit(indices, limit if split == "train" else None)
        records = []
        for i, src in enumerate(indices.tolist()):
            rel = f"media/{src:04d}.png"
            _save_png(digit_png_image(images[src]), out / rel)
            label = int(labels[src])
            records.append({
                "id": f"gen_image_digits/{split}/{i:05d}",
                "messages": [user_text(f"Draw the digit {DIGIT_WORDS[label]}."),
                             assistant([{"type": "image", "path": rel}])],
                "answer": DIGIT_WORDS[label],
                "meta": {"label": label, "source_index": src},
            })  # fmt: skip
        sizes[split] = write_jsonl(out / f"{split}.jsonl", records)
    return TaskCard(
        name="gen_image_digits",
        modality="image",
        source=DIGITS_SOURCE,
        license=DIGITS_LICENSE,
        split_rule=_digit_split_rule() + f"; test keeps {test_per_digit} prompts per digit",
        description='Image generation: "Draw the digit seven." → a 32×32 image of that digit. The assistant turn is '
        "an image part (a real digit, the training target; at test a held-out reference). Generated images are "
        "scored by `unimoe.eval.judge_image.DigitImageJudge` (a classifier trained on the real train digits).",
        sizes=sizes,
        extra={"target": "32×32 RGB PNG, white digit on black (nearest ×4)", "meta.label": "the digit, 0-9"},
    )


@register_builder("gen_image_digits", modality="image", version=1)
def build_gen_image_digits(out: Path, seed: int) -> TaskCard:
    return _build_gen_image_digits(out, seed)
