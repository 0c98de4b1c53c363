"""Vision builders on small variants: valid records, loadable media, source-disjoint splits, determinism."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from unimoe.data import tasks_vision as tv
from unimoe.data.build import DATA_BUILDERS, list_tasks
from unimoe.data.records import read_split
from unimoe.encoders.image import load_image
from unimoe.encoders.video import VideoEncoder, VideoEncoderConfig

SPLITS = ("train", "validation", "test")
SMALL = {
    "vqa_easy": lambda out, seed: tv._build_vqa_easy(out, seed, n_train=40, n_val=10, n_test=20),
    "digits_cls": lambda out, seed: tv._build_digits_cls(out, seed, limit=15),
    "video_motion": lambda out, seed: tv._build_video_motion(out, seed, limit=6),
    "gen_image_digits": lambda out, seed: tv._build_gen_image_digits(out, seed, test_per_digit=2, val_per_digit=1,
                                                                     limit=20),
}  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each small variant built once: ``{name: (dir, card)}``."""
    root = tmp_path_factory.mktemp("vision")
    return {name: (root / name, fn(root / name, 0)) for name, fn in SMALL.items()}


def _records(task_dir: Path) -> dict[str, list[dict]]:
    return {split: read_split(task_dir, split) for split in SPLITS}


def _media(record: dict) -> list[dict]:
    return [
        p for m in record["messages"] if isinstance(m["content"], list) for p in m["content"] if p["type"] != "text"
    ]


def _tree_hash(task_dir: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in task_dir.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(task_dir)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_registered():
    names = list_tasks()
    for name, modality in [("vqa_easy", "image"), ("digits_cls", "image"), ("video_motion", "video"),
                           ("gen_image_digits", "image")]:  # fmt: skip
        assert name in names
        assert DATA_BUILDERS.get(name).modality == modality


@pytest.mark.parametrize("name", list(SMALL))
def test_records_valid(built, name):
    task_dir, card = built[name]
    assert card.name == name and set(card.sizes) == set(SPLITS)
    records = _records(task_dir)
    for split in SPLITS:
        assert len(records[split]) == card.sizes[split] > 0
        for record in records[split]:
            assert record["id"].startswith(f"{name}/{split}/")
            assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
            for part in _media(record):
                assert Path(part["path"]).is_file()
            # paths in the file itself are relative to the task dir
        raw = [json.loads(line) for line in (task_dir / f"{split}.jsonl").read_text().splitlines()]
        for record in raw:
            for part in _media(record):
                assert not Path(part["path"]).is_absolute() and part["path"].startswith("media/")


def test_vqa_easy(built):
    import easy_vqa

    task_dir, _ = built["vqa_easy"]
    records = _records(task_dir)
    answers = sorted(easy_vqa.get_answers())
    assert len(answers) == 13
    for split in SPLITS:
        for r in records[split]:
            assert r["choices"] == answers and r["answer"] in answers and r["messages"][1]["content"] == r["answer"]
            assert r["answer"] == r["answer"].lower()
            (image,) = _media(r)
            assert load_image(image["path"]).size == (64, 64)
        assert {r["meta"]["source_split"] for r in records[split]} == {"test" if split == "test" else "train"}
    ids = {s: {r["meta"]["image_id"] for r in records[s]} for s in SPLITS}
    assert len(ids["train"]) == len(records["train"])  # one question per picture
    assert not ids["train"] & ids["validation"]  # validation: held-out train pictures
    # No test picture in train, checked on the pixels too (easy-VQA's train and test ids overlap as numbers).
    pixels = {s: {hashlib.sha1(load_image(_media(r)[0]["path"]).tobytes()).hexdigest() for r in records[s]}
              for s in SPLITS}  # fmt: skip
    assert not pixels["test"] & (pixels["train"] | pixels["validation"])
    kinds = {r["meta"]["kind"] for s in SPLITS for r in records[s]}
    assert kinds <= {"yes/no", "shape", "color"}


def test_digit_splits_shared_and_stratified():
    _, labels = tv.load_digit_images()
    splits = tv.digit_splits(labels, 0)
    parts = [set(splits[s].tolist()) for s in SPLITS]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sum(map(len, parts)) == len(labels) == 1797
    assert 340 <= len(parts[2]) <= 380
    for d in range(10):  # every digit in every split, in proportion
        assert 30 <= (labels[splits["test"]] == d).sum() <= 40
    again = tv.digit_splits(labels, 0)
    assert all(np.array_equal(splits[s], again[s]) for s in SPLITS)
    assert not np.array_equal(splits["test"], tv.digit_splits(labels, 1)["test"])


def test_digit_png_roundtrip():
    images, _ = tv.load_digit_images()
    pic = tv.digit_png_image(images[7])
    assert pic.size == (32, 32) and pic.mode == "RGB"
    grey = np.asarray(pic)[..., 0]
    assert np.array_equal(grey[::4, ::4], tv.digit_to_uint8(images[7]))  # nearest ×4
    assert grey.max() == 255 and (grey == 0).mean() > 0.3  # white ink on a black background


def _source_sets(records):
    return {s: {r["meta"]["source_index"] for r in records[s]} for s in SPLITS}


def test_digits_cls(built):
    task_dir, _ = built["digits_cls"]
    records = _records(task_dir)
    images, labels = tv.load_digit_images()
    splits = tv.digit_splits(labels, 0)
    for split in SPLITS:
        for r in records[split]:
            assert r["choices"] == list(tv.DIGIT_WORDS)
            src = r["meta"]["source_index"]
            assert src in set(splits[split].tolist())
            assert r["answer"] == tv.DIGIT_WORDS[labels[src]] == r["messages"][1]["content"]
            pic = np.asarray(load_image(_media(r)[0]["path"]))
            assert pic.shape == (32, 32, 3)
            assert np.array_equal(pic[::4, ::4, 0], tv.digit_to_uint8(images[src]))
    sources = _source_sets(records)
    assert not sources["test"] & (sources["train"] | sources["validation"])


def _centroid(frame: np.ndarray) -> np.ndarray:
    grey = np.asarray(frame, dtype=np.float64)[..., 0]
    ys, xs = np.mgrid[: grey.shape[0], : grey.shape[1]]
    return np.array([(grey * xs).sum(), (grey * ys).sum()]) / grey.sum()


def test_video_motion(built):
    task_dir, _ = built["video_motion"]
    records = _records(task_dir)
    images, labels = tv.load_digit_images()
    config = VideoEncoderConfig(num_frames=tv.CLIP_FRAMES)
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    assert len(records["train"]) == 2 * 6  # two directions per train image
    for split in SPLITS:
        for r in records[split]:
            assert r["choices"] == list(tv.MOTION_CHOICES) and len(r["choices"]) == 40
            meta = r["meta"]
            word, direction = r["answer"].split()
            assert word == tv.DIGIT_WORDS[labels[meta["source_index"]]] and direction == meta["direction"]
            (video,) = _media(r)
            assert video["type"] == "video" and video["path"].endswith(".gif")
            frames = VideoEncoder.load(video["path"], config)
            assert len(frames) == tv.CLIP_FRAMES and frames[0].size == (32, 32)
            # lossless: the decoded frames are exactly the rendered ones
            expected = tv.motion_frames(images[meta["source_index"]], direction, tuple(meta["start"]))
            for got, want in zip(frames, expected, strict=True):
                assert np.array_equal(np.asarray(got)[..., 0], want)
            # the decoded frames show the motion: the centroid moves CLIP_STEP px a frame in the stated direction
            moves = np.diff(np.stack([_centroid(f) for f in frames]), axis=0)
            assert np.allclose(moves, np.array(step[direction]) * tv.CLIP_STEP, atol=1e-6)
    sources = _source_sets(records)
    assert not sources["test"] & (sources["train"] | sources["validation"])


def test_video_motion_starts_stay_on_canvas():
    rng = np.random.default_rng(0)
    images, _ = tv.load_digit_images()
    for direction in tv.DIRECTIONS:
        for _ in range(50):
            frames = tv.motion_frames(images[0], direction, tv.random_start(rng, direction))
            assert all(f.sum() == frames[0].sum() for f in frames)  # never clipped by the border


def test_gen_image_digits(built):
    task_dir, _ = built["gen_image_digits"]
    records = _records(task_dir)
    _, labels = tv.load_digit_images()
    test_labels = sorted(r["meta"]["label"] for r in records["test"])
    assert test_labels == sorted(list(range(10)) * 2)  # test_per_digit=2
    for split in SPLITS:
        for r in records[split]:
            label = r["meta"]["label"]
            assert label == labels[r["meta"]["source_index"]]
            assert r["answer"] == tv.DIGIT_WORDS[label]
            assert r["messages"][0]["content"] == [{"type": "text", "text": f"Draw the digit {tv.DIGIT_WORDS[label]}."}]
            (target,) = r["messages"][1]["content"]
            assert target["type"] == "image"
            assert load_image(target["path"]).size == (32, 32)
    sources = _source_sets(records)
    assert not sources["test"] & (sources["train"] | sources["validation"])


def test_digit_tasks_share_the_split(built):
    """A test image of one digit task is in no train split of another (one model trains on all train splits)."""
    train, test = set(), set()
    for name in ("digits_cls", "video_motion", "gen_image_digits"):
        sources = _source_sets(_records(built[name][0]))
        train |= sources["train"]
        test |= sources["test"]
    assert not train & test


@pytest.mark.parametrize("name", ["vqa_easy", "video_motion", "gen_image_digits"])
def test_deterministic(built, tmp_path, name):
    task_dir, _ = built[name]
    again = tmp_path / "again"
    SMALL[name](again, 0)
    assert _tree_hash(again) == _tree_hash(task_dir)
    other = tmp_path / "other"
    SMALL[name](other, 1)
    assert _tree_hash(other) != _tree_hash(task_dir)
