"""What one reply of :meth:`UniMoEForConditionalGeneration.generate_multimodal` holds, and how it is saved."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class GeneratedAudio:
    waveform: np.ndarray  # (samples,) float32, mono
    sample_rate: int

    def save(self, path: str | Path) -> Path:
        import soundfile as sf

        sf.write(str(path), self.waveform, self.sample_rate, subtype="PCM_16")
        return Path(path)


@dataclass
class Forecast:
    point: np.ndarray  # (h,) the median
    quantiles: dict[float, np.ndarray]  # level -> (h,)
    context: np.ndarray  # (L,) the observed history of the forecast channel

    def fit_horizon(self, horizon: int) -> Forecast:
        """This forecast cut to ``horizon`` steps, or extended by repeating its last step (a head whose
        ``max_horizon`` is shorter than what a benchmark asks for)."""

        def fit(values: np.ndarray) -> np.ndarray:
            values = values[:horizon]
            return np.concatenate([values, np.repeat(values[-1:], horizon - len(values))])

        return Forecast(point=fit(self.point), quantiles={q: fit(v) for q, v in self.quantiles.items()},
                        context=self.context)  # fmt: skip

    def save_csv(self, path: str | Path) -> Path:
        levels = sorted(self.quantiles)
        lines = ["step,point," + ",".join(f"q{level:g}" for level in levels)]
        for i, value in enumerate(self.point):
            lines.append(f"{i + 1},{value:.6g}," + ",".join(f"{self.quantiles[q][i]:.6g}" for q in levels))
        Path(path).write_text("\n".join(lines) + "\n")
        return Path(path)

    def plot(self, path: str | Path | None = None, *, title: str = "forecast"):
        """A history + forecast figure with the outer quantile band (saved when ``path`` is given)."""
        from matplotlib.figure import Figure

        from unimoe.viz import draw_forecast

        fig = Figure(figsize=(6, 3), dpi=100, tight_layout=True)
        ax = fig.add_subplot()
        draw_forecast(ax, self.context, self.point, self.quantiles)
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=7)
        if path is not None:
            fig.savefig(path)
        return fig


@dataclass
class MultimodalOutput:
    """One reply: its text and whatever media it generated (images are PIL images)."""

    text: str = ""
    images: list[Any] = field(default_factory=list)
    audio: list[GeneratedAudio] = field(default_factory=list)
    forecasts: list[Forecast] = field(default_factory=list)

    def save(self, directory: str | Path, *, prefix: str = "") -> list[Path]:
        """Write every generated item (``image_0.png``, ``audio_0.wav``, ``forecast_0.csv`` + ``.png``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(self.images):
            path = directory / f"{prefix}image_{i}.png"
            image.save(path)
            paths.append(path)
        for i, clip in enumerate(self.audio):
            paths.append(clip.save(directory / f"{prefix}audio_{i}.wav"))
        for i, forecast in enumerate(self.forecasts):
            paths.append(forecast.save_csv(directory / f"{prefix}forecast_{i}.csv"))
            forecast.plot(directory / f"{prefix}forecast_{i}.png")
            paths.append(directory / f"{prefix}forecast_{i}.png")
        return paths


__all__ = ["Forecast", "GeneratedAudio", "MultimodalOutput"]
