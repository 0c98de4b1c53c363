"""The build framework: atomic builds, completion markers, no-op re-runs, DATASETS.md."""

import json

import pytest

from unimoe.data.build import MARKER, DataError, build_suite, build_task, list_tasks, read_marker, task_dir
from unimoe.errors import ConfigError


def test_every_task_is_registered():
    assert {"text_qa", "vqa_easy", "digits_cls", "video_motion", "speech_words", "speech_asr", "shapes3d",
            "ts_classify", "ts_forecast", "gen_image_digits", "gen_speech_words"} <= set(list_tasks())  # fmt: skip


def test_rerun_is_a_noop_and_force_rebuilds(tmp_path):
    card, built = build_task("text_qa", tmp_path)
    assert built and card.sizes["test"] > 0
    mtime = (tmp_path / "text_qa" / "test.jsonl").stat().st_mtime_ns
    _, built = build_task("text_qa", tmp_path)
    assert not built and (tmp_path / "text_qa" / "test.jsonl").stat().st_mtime_ns == mtime
    _, built = build_task("text_qa", tmp_path, force=True)
    assert built


def test_half_built_or_stale_task_is_redone(tmp_path):
    build_task("text_qa", tmp_path)
    (tmp_path / "text_qa" / MARKER).unlink()  # as if killed before the marker was written
    with pytest.raises(DataError, match="missing or incomplete"):
        task_dir(tmp_path, "text_qa")
    _, built = build_task("text_qa", tmp_path)
    assert built and read_marker(tmp_path / "text_qa") is not None
    marker = json.loads((tmp_path / "text_qa" / MARKER).read_text())
    marker["version"] = -1  # built by an older builder
    (tmp_path / "text_qa" / MARKER).write_text(json.dumps(marker))
    _, built = build_task("text_qa", tmp_path)
    assert built
    (tmp_path / "text_qa" / "train.jsonl").unlink()  # a split file lost after the build
    assert read_marker(tmp_path / "text_qa") is None


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    from unimoe.data import build as build_module

    builder = build_module.DATA_BUILDERS.get("text_qa")

    def boom(out, seed):
        (out / "train.jsonl").write_text("partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(builder, "fn", boom)
    with pytest.raises(RuntimeError, match="killed"):
        build_task("text_qa", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_suite_card_and_errors(tmp_path):
    build_suite(tmp_path, ["text_qa"], progress=False)
    card = (tmp_path / "DATASETS.md").read_text()
    assert "| text_qa | text |" in card and "Split rule" in card
    with pytest.raises(ConfigError, match="unknown dataset"):
        build_suite(tmp_path, ["nope"], progress=False)
    with pytest.raises(DataError, match="does not exist"):
        task_dir(tmp_path / "missing", "text_qa")


def test_a_misspelled_task_is_named_as_unknown(tmp_path):
    with pytest.raises(DataError, match="unknown task 'text_q'.*tasks: .*text_qa"):
        task_dir(tmp_path, "text_q")


def test_a_killed_builds_temporary_folder_is_cleared(tmp_path):
    (tmp_path / ".text_qa.tmp-999999" / "media").mkdir(parents=True)  # left by a build killed mid-way
    build_task("text_qa", tmp_path)
    assert not list(tmp_path.glob(".text_qa.tmp-*")) and read_marker(tmp_path / "text_qa") is not None


def test_rebuilding_with_another_seed_says_so(tmp_path, capsys):
    build_suite(tmp_path, ["text_qa"], progress=False)
    build_suite(tmp_path, ["text_qa"], progress=False)
    assert capsys.readouterr().out == ""
    build_suite(tmp_path, ["text_qa"], seed=1, progress=False)
    out = capsys.readouterr().out
    assert "text_qa: rebuilt with seed 1, replacing the one built with seed 0" in out
    assert read_marker(tmp_path / "text_qa")["seed"] == 1
