import numpy as np
import pytest
import torch

from unimoe.errors import ConfigError
from unimoe.train import load_stage
from unimoe.train.augment import Augmenter, ImageAugment, SeriesAugment, VideoAugment


def series_features(length=20, context=32, channels=2):
    """A left-padded ramp in channel 0 and a sine in channel 1, like the series encoder's preprocess output."""
    values = torch.zeros(1, context, channels)
    mask = torch.zeros(1, context, channels)
    t = torch.arange(length, dtype=torch.float32)
    values[0, context - length :, 0] = t
    values[0, context - length :, 1] = torch.sin(t)
    mask[0, context - length :] = 1
    return {"values": values, "mask": mask}


def rng(seed=0):
    return np.random.default_rng(seed)


def test_series_defaults_change_nothing():
    f = series_features()
    out = SeriesAugment().apply(f, rng())
    assert torch.equal(out["values"], f["values"]) and torch.equal(out["mask"], f["mask"])


def test_series_crop_stretches_a_window_back_over_the_observed_steps():
    f = series_features(length=20, context=32)
    before = {k: v.clone() for k, v in f.items()}
    for seed in range(20):
        out = SeriesAugment(crop=0.5).apply(f, rng(seed))
        assert out["values"].shape == (1, 32, 2)
        assert torch.equal(out["mask"], f["mask"])  # padding stays padding, observed stays observed
        assert torch.count_nonzero(out["values"][0, :12]) == 0
        ramp = out["values"][0, 12:, 0]
        # a window of a ramp, stretched: still a ramp, from the window's first to its last value
        steps = ramp.diff()
        torch.testing.assert_close(steps, steps.mean().expand_as(steps), atol=1e-4, rtol=0)
        span = ramp[-1] - ramp[0]
        assert 9 - 1e-4 <= span <= 19 + 1e-4  # at least half of the 20 steps, at most all
        assert ramp[0] >= 0 and ramp[-1] <= 19 + 1e-4
    for key in f:  # the cached input is never modified
        assert torch.equal(f[key], before[key])


def test_series_crop_keeps_missing_values_missing():
    f = series_features(length=20, context=32, channels=2)
    f["mask"][0, 20:26, 1] = 0  # a gap in channel 1
    f["values"][0, 20:26, 1] = 0
    out = SeriesAugment(crop=0.9).apply(f, rng(3))
    assert out["mask"][0, 12:, 0].all() and not out["mask"][0, 12:, 1].all()  # the gap survives, resampled
    missing = out["mask"][0, :, 1] == 0
    assert torch.count_nonzero(out["values"][0, missing, 1]) == 0


def test_series_jitter_scales_with_each_channels_spread_and_spares_padding():
    f = series_features(length=400, context=512)
    f["values"][0, :, 0] *= 1000.0 * f["mask"][0, :, 0]
    out = SeriesAugment(jitter=0.1).apply(f, rng())
    noise = (out["values"] - f["values"])[0, 112:]  # observed part
    for c in range(2):
        ratio = noise[:, c].std() / f["values"][0, 112:, c].std()
        assert ratio == pytest.approx(0.1, rel=0.15)
    assert torch.count_nonzero(out["values"][0, :112]) == 0


def test_series_crop_is_skipped_where_the_answer_continues_the_series():
    f = series_features()
    assert SeriesAugment(crop=0.5).apply(f, rng(), keep_time_axis=True)["values"].equal(f["values"])
    jittered = SeriesAugment(crop=0.5, jitter=0.01).apply(f, rng(), keep_time_axis=True)["values"]
    assert not jittered.equal(f["values"])  # the noise still applies
    torch.testing.assert_close(jittered, f["values"], atol=1.0, rtol=0)


def test_augmenter_applies_a_spec_to_its_tasks_only():
    f = series_features()
    aug = Augmenter({"series": {"jitter": 0.5, "tasks": ["ts_classify"]}})
    assert aug("series", f, rng(), task="ts_forecast") is f
    assert not aug("series", f, rng(), task="ts_classify")["values"].equal(f["values"])
    assert aug("image", {"values": torch.ones(1, 3, 4, 4)}, rng(), task="ts_classify")["values"].equal(
        torch.ones(1, 3, 4, 4)
    )  # no spec for the modality


def test_forecasting_records_are_recognized():
    from unimoe.train.data import answers_with_series

    question = {"role": "user", "content": [{"type": "series", "path": "x.npy"}, {"type": "text", "text": "next?"}]}
    as_series = {"messages": [question, {"role": "assistant", "content": [{"type": "series", "values": [1.0]}]}]}
    as_text = {"messages": [question, {"role": "assistant", "content": "1.0 2.0"}], "target": [1.0, 2.0]}
    label = {"messages": [question, {"role": "assistant", "content": "walking"}]}
    assert answers_with_series(as_series) and answers_with_series(as_text) and not answers_with_series(label)


def test_series_with_one_observed_step_is_left_alone():
    f = series_features(length=1)
    out = SeriesAugment(crop=0.5, jitter=1.0).apply(f, rng())
    assert out is f


def test_image_shift_moves_the_content_and_keeps_the_shape():
    values = torch.zeros(1, 3, 16, 16)
    values[0, :, 8, 8] = 1.0
    seen = set()
    for seed in range(30):
        out = ImageAugment(shift=2).apply({"values": values}, rng(seed))["values"]
        assert out.shape == values.shape
        ys, xs = torch.nonzero(out[0, 0], as_tuple=True)
        assert len(ys) == 1 and out.sum() == 3.0  # one pixel, moved (the edges are black: nothing repeats)
        dy, dx = int(ys[0]) - 8, int(xs[0]) - 8
        assert abs(dy) <= 2 and abs(dx) <= 2
        seen.add((dy, dx))
    assert len(seen) > 10


def test_image_shift_repeats_the_edge_into_the_gap():
    values = torch.arange(1.0, 17.0).view(1, 1, 4, 4).expand(1, 3, 4, 4).contiguous()  # rows 1..4, 5..8, ...
    moved = 0
    for seed in range(20):
        out = ImageAugment(shift=1).apply({"values": values}, rng(seed))["values"]
        assert set(out.unique().tolist()) <= set(range(1, 17))  # no zeros padded in: only pixels of the image
        moved += not out.equal(values)
    assert moved > 10


def test_video_shift_moves_every_frame_alike():
    clip = torch.zeros(1, 4, 3, 16, 16)
    for t in range(4):
        clip[0, t, :, 4 + 2 * t, 6] = 1.0  # a dot moving down
    for seed in range(10):
        out = VideoAugment(shift=3).apply({"values": clip}, rng(seed))["values"]
        pos = [torch.nonzero(out[0, t, 0]).tolist() for t in range(4)]
        assert all(len(p) == 1 for p in pos)
        rows = [p[0][0] for p in pos]
        assert [b - a for a, b in zip(rows, rows[1:])] == [2, 2, 2]  # the motion is unchanged
        assert len({p[0][1] for p in pos}) == 1


def test_augmenter_names_the_bad_field():
    with pytest.raises(ConfigError, match=r"data.augment: no augmentations for \['points'\]"):
        Augmenter({"points": {"jitter": 0.1}})
    with pytest.raises(ConfigError, match=r"data.augment.series.crop: must be a number in \(0.0, 1.0\]"):
        Augmenter({"series": {"crop": 0}})
    with pytest.raises(ConfigError, match="data.augment.series.jitter"):
        Augmenter({"series": {"jitter": -1}})
    with pytest.raises(ConfigError, match="data.augment.video.shift: expected an integer, got 1.5"):
        Augmenter({"video": {"shift": 1.5}})
    with pytest.raises(ConfigError, match="data.augment.video.shift: must be an integer >= 0"):
        Augmenter({"video": {"shift": -1}})
    with pytest.raises(ConfigError, match=r"data.augment.image: unknown field\(s\) \['rotate'\]"):
        Augmenter({"image": {"rotate": 10}})
    with pytest.raises(ConfigError, match="data.augment.series.tasks: must be a list of task names"):
        Augmenter({"series": {"jitter": 0.1, "tasks": "ts_classify"}})
    # and through a stage config, at load
    with pytest.raises(ConfigError, match="data.augment.image.shift"):
        load_stage("align", {"data": {"tasks": ["digits_cls"], "augment": {"image": {"shift": -2}}}})


def test_collator_augments_by_schedule_index_not_batch_position(init_ckpt, train_data):
    """Sample ``i`` of the schedule gets the same augmentation whichever batch it lands in (what makes a resumed
    run draw the same augmentations), a different one from another index, and none without ``data.augment``."""
    from unimoe.inference import load_pretrained
    from unimoe.train.config import DataMix
    from unimoe.train.data import Collator, ScheduleDataset, TrainData

    _, processor = load_pretrained(init_ckpt)
    data = TrainData(train_data, DataMix(tasks=["digits_cls"]))
    schedule = data.schedule(2, 4, seed=0)
    dataset = ScheduleDataset(data, schedule)
    collate = Collator(processor, augment={"image": {"shift": 3}}, seed=5)
    plain = Collator(processor)
    items = [dataset[i] for i in range(8)]
    whole = collate(items)["image_values"]
    assert torch.equal(collate(items[4:])["image_values"], whole[4:])
    resumed = ScheduleDataset(data, schedule, start=4)  # a run resumed at sample 4
    assert torch.equal(collate([resumed[i] for i in range(4)])["image_values"], whole[4:])
    raw = plain(items)["image_values"]
    moved = [not torch.equal(a, b) for a, b in zip(whole, raw)]
    assert sum(moved) >= 6  # (0, 0) is drawn 1 time in 49
    other = Collator(processor, augment={"image": {"shift": 3}}, seed=6)(items)["image_values"]
    assert not torch.equal(other, whole)
