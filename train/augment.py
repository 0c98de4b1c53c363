"""Train-time data augmentation of encoder inputs, per modality (``data.augment`` of a stage or recipe).

Applied by the training collator to the preprocessed features of each user media part (after the feature cache,
so cached tensors are never changed), with a generator seeded by the stage seed and the sample's index in the
stage's schedule: a resumed run draws exactly the augmentations an uninterrupted one would. Evaluation and
inference never augment.

* ``series`` — ``crop``: window slicing (Le Guennec et al., 2016, on UCR classification): a random window holding
  a fraction ``U(crop, 1)`` of the observed steps, stretched back to their count by linear interpolation;
  ``jitter``: Gaussian noise with a standard deviation of ``jitter`` times each channel's own over its observed
  values. Scaling the amplitude is no augmentation here: the series encoder normalizes every item and channel.
  Window slicing changes the time axis, so it is skipped on samples whose answer continues the input series
  (forecasting: the stretched context would no longer lead into its target); jitter applies to them too.
* ``image`` / ``video`` — ``shift``: a random translation of up to ``shift`` pixels (of the encoder's input size)
  along each axis, with the edge pixels repeated into the gap; a clip's frames all move together.

Every spec takes ``tasks: [...]`` to augment only those tasks' samples (default: every task of the modality), e.g.
``data.augment: {series: {crop: 0.9, tasks: [ts_classify]}}``. Each modality's spec is a small dataclass with
``apply(features, rng, keep_time_axis)``; a new augmentation is a field and a few lines there, a new modality one more
entry in :data:`AUGMENTATIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from unimoe.config_utils import config_from_dict
from unimoe.encoders.series import observed_mean_std
from unimoe.errors import ConfigError


def _check_tasks(modality: str, tasks: Any) -> None:
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise ConfigError(f"data.augment.{modality}.tasks: must be a list of task names, got {tasks!r}")


@dataclass
class SeriesAugment:
    crop: float = 1.0  # smallest fraction of the observed steps a window keeps (1 = off)
    jitter: float = 0.0  # noise std in units of each channel's std (0 = off)
    tasks: list[str] = field(default_factory=list)  # only these tasks' samples (empty = every task)

    def __post_init__(self) -> None:
        _check_number("series.crop", self.crop, low=0.0, high=1.0, low_open=True)
        _check_number("series.jitter", self.jitter, low=0.0)
        _check_tasks("series", self.tasks)

    def apply(
        self, features: dict[str, torch.Tensor], rng: np.random.Generator, keep_time_axis: bool = False
    ) -> dict[str, torch.Tensor]:
        """``{"values", "mask"}`` of shape ``(1, L, C)`` → new tensors of the same shape (no window slicing with
        ``keep_time_axis``)."""
        values, mask = features["values"], features["mask"]
        observed = (mask > 0).any(dim=-1)[0].nonzero()  # (n_obs, 1) time steps with any observed channel
        if observed.numel() < 2:
            return features
        first, last = int(observed[0]), int(observed[-1]) + 1
        v, m = values[:, first:last], mask[:, first:last]  # (1, n, C)
        n = last - first
        if self.crop < 1.0 and not keep_time_axis:
            keep = max(2, int(round(rng.uniform(self.crop, 1.0) * n)))
            start = int(rng.integers(0, n - keep + 1))
            # interpolate the masked values and the mask, then divide: missing steps do not leak zeros
            window = torch.cat([v * m, m], dim=-1)[:, start : start + keep].transpose(1, 2)  # (1, 2C, keep)
            stretched = F.interpolate(window, size=n, mode="linear", align_corners=True).transpose(1, 2)
            vm, m_new = stretched.chunk(2, dim=-1)
            m = (m_new > 0.5).to(m.dtype)
            v = torch.where(m > 0, vm / m_new.clamp_min(1e-6), torch.zeros_like(vm))
        if self.jitter > 0:
            _, std, _ = observed_mean_std(v, m)  # (1, 1, C)
            noise = torch.from_numpy(rng.standard_normal(v.shape).astype(np.float32)).to(v.dtype)
            v = v + noise * std * self.jitter * m
        values, mask = values.clone(), mask.clone()
        values[:, first:last], mask[:, first:last] = v, m
        return {**features, "values": values, "mask": mask}


@dataclass
class ImageAugment:
    shift: int = 0  # largest translation in pixels along each axis (0 = off)
    tasks: list[str] = field(default_factory=list)  # only these tasks' samples (empty = every task)
    modality: ClassVar[str] = "image"

    def __post_init__(self) -> None:
        if isinstance(self.shift, bool) or not isinstance(self.shift, int) or self.shift < 0:
            raise ConfigError(f"data.augment.{self.modality}.shift: must be an integer >= 0, got {self.shift!r}")
        _check_tasks(self.modality, self.tasks)

    def apply(
        self, features: dict[str, torch.Tensor], rng: np.random.Generator, keep_time_axis: bool = False
    ) -> dict[str, torch.Tensor]:
        """``{"values": (..., 3, S, S)}`` → the same shape, every image in it moved by one random offset."""
        if self.shift == 0:
            return features
        values = features["values"]
        k = self.shift
        dx, dy = (int(d) for d in rng.integers(-k, k + 1, size=2))
        if dx == 0 and dy == 0:
            return features
        shape = values.shape
        flat = values.reshape(-1, *shape[-3:])  # (N, 3, S, S)
        padded = F.pad(flat, (k, k, k, k), mode="replicate")
        h, w = shape[-2:]
        # content moves by (dx, dy): the output pixel (y, x) shows the input pixel (y - dy, x - dx)
        moved = padded[..., k - dy : k - dy + h, k - dx : k - dx + w]
        return {**features, "values": moved.reshape(shape).contiguous()}


@dataclass
class VideoAugment(ImageAugment):
    """The image augmentations, one draw per clip (every frame moves alike, so the motion is unchanged)."""

    modality: ClassVar[str] = "video"


AUGMENTATIONS: dict[str, type] = {"series": SeriesAugment, "image": ImageAugment, "video": VideoAugment}


def _check_number(name: str, value: Any, *, low: float, high: float | None = None, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"in ({low}, {high}]" if low_open else (f"in [{low}, {high}]" if high is not None else f">= {low}")
        raise ConfigError(f"data.augment.{name}: must be a number {bound}, got {value!r}")


class Augmenter:
    """The ``data.augment`` table (``{modality: {field: value}}``) → per-sample augmentation of media features."""

    def __init__(self, spec: dict[str, dict[str, Any]] | None):
        spec = dict(spec or {})
        unknown = sorted(set(spec) - set(AUGMENTATIONS))
        if unknown:
            raise ConfigError(
                f"data.augment: no augmentations for {unknown}; modalities with augmentations: "
                f"{', '.join(AUGMENTATIONS)}"
            )
        self.specs = {}
        for modality, fields in spec.items():
            if not isinstance(fields, dict):
                raise ConfigError(f"data.augment.{modality}: expected a table of fields, got {fields!r}")
            self.specs[modality] = config_from_dict(AUGMENTATIONS[modality], fields, where=f"data.augment.{modality}")

    def __bool__(self) -> bool:
        return bool(self.specs)

    def __call__(
        self,
        modality: str,
        features: dict[str, torch.Tensor],
        rng: np.random.Generator,
        *,
        task: str | None = None,
        keep_time_axis: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The augmented features of one media part of a sample of ``task``; ``keep_time_axis`` for samples whose
        answer continues the input series."""
        spec = self.specs.get(modality)
        if spec is None or (spec.tasks and task not in spec.tasks):
            return features
        return spec.apply(features, rng, keep_time_axis)
