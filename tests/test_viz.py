import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from unimoe.generation import Forecast
from unimoe.viz import forecast_grid, media_grid

RED = np.array([214, 39, 40])  # matplotlib's tab:red, the title colour of items the judge did not recognise


def _has_colour(path, rgb, tol=12):
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return bool((np.abs(pixels - rgb).max(-1) <= tol).any())


@pytest.fixture
def media_files(tmp_path):
    rng = np.random.default_rng(0)
    images, clips = [], []
    for i in range(4):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).convert("RGB").save(images[-1])  # grey
        clips.append(tmp_path / f"{i}.wav")
        sf.write(clips[-1], rng.normal(0, 0.1, 4000).astype(np.float32), 16000)
    return images, clips


def test_media_grid_marks_what_the_judge_did_not_recognise(media_files, tmp_path):
    images, clips = media_files
    right = [(str(images[0]), "one", "one"), (str(images[1]), "two", "two"), (str(images[2]), "one", "one")]
    assert not _has_colour(media_grid(right, tmp_path / "ok.png"), RED)
    wrong = right + [(str(images[3]), "two", "seven")]
    assert _has_colour(media_grid(wrong, tmp_path / "wrong.png"), RED)
    # one column per requested value, in the given order: a third value makes the figure wider
    wider = media_grid(wrong + [(str(images[0]), "three", "three")], tmp_path / "wide.png", columns=["three", "two"])
    assert Image.open(wider).width > Image.open(tmp_path / "wrong.png").width
    spectrograms = media_grid([(str(c), "word", "word") for c in clips], tmp_path / "audio.png", kind="audio")
    assert Image.open(spectrograms).height > 100


def test_forecast_grid_draws_one_panel_per_forecast(tmp_path):
    def forecast(n):
        point = np.linspace(1.0, 2.0, 6)
        quantiles = {0.1: point - 1, 0.5: point, 0.9: point + 1}
        return Forecast(point=point, quantiles=quantiles, context=np.sin(np.arange(n)))

    one = forecast_grid([forecast(40)], [[1.0] * 6], ["a"], tmp_path / "one.png")
    five = forecast_grid([forecast(40 + i) for i in range(5)], [None] * 5, list("abcde"), tmp_path / "five.png", cols=4)
    w1, h1 = Image.open(one).size
    w5, h5 = Image.open(five).size
    assert w5 > 3 * w1 and h5 > 1.5 * h1  # 4 columns, 2 rows


def test_titles_wrap_to_narrow_figures_instead_of_being_cut_off():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unimoe.viz import _suptitle

    title = "gen_image_digits: generated for the test prompts (green = the judge agrees; 3/4 in all)"
    for width, lines in ((2.8, 3), (14.0, 1)):
        fig = plt.figure(figsize=(width, 2))
        _suptitle(fig, title, fontsize=9)
        fig.canvas.draw()
        text = fig._suptitle
        assert text.get_text().count("\n") + 1 >= lines if lines > 1 else "\n" not in text.get_text()
        box = text.get_window_extent(fig.canvas.get_renderer())
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width  # the whole title is inside the figure
        plt.close(fig)
