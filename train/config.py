"""Typed configs of a training stage and of a recipe, loaded from YAML presets with ``key=value`` overrides."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from unimoe.config_utils import config_from_dict, read_yaml
from unimoe.errors import ConfigError
from unimoe.generation.refit import DEFAULT_ALPHAS, DEFAULT_CENTERS, DEFAULT_GATES, GATES
from unimoe.presets import apply_overrides
from unimoe.train.augment import Augmenter

#: The parts of a model whose ``requires_grad`` a stage sets (see :func:`unimoe.train.freeze.apply_trainable`).
PARTS = (
    "embeddings", "lm_head", "attention", "norms", "dense_mlp", "routers", "experts", "experts_base",
    "shared_experts", "encoders", "connectors", "generation", "generation_vae",
)  # fmt: skip
#: Parts made of one module per modality: ``trainable`` takes a list of modalities for them, ``lr_multipliers`` a
#: ``part.modality`` key.
MODALITY_PARTS = ("encoders", "connectors", "generation")


@dataclass
class DataMix:
    """Which tasks a stage trains on, with sampling weights (``balance: modality`` samples each modality equally
    often, then a task within it, then a record)."""

    tasks: list[str] = field(default_factory=list)
    split: str = "train"
    weights: dict[str, float] = field(default_factory=dict)
    balance: str = "modality"  # modality | task | record
    augment: dict[str, dict[str, Any]] = field(default_factory=dict)  # modality -> its train/augment.py spec

    def __post_init__(self) -> None:
        if self.balance not in ("modality", "task", "record"):
            raise ConfigError(f"data.balance: {self.balance!r} unknown; choose modality, task or record")
        unknown = sorted(set(self.weights) - set(self.tasks))
        if unknown:
            raise ConfigError(f"data.weights: {unknown} are not in data.tasks")
        for task, weight in self.weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise ConfigError(
                    f"data.weights.{task}: must be a positive number, got {weight!r} (leave the task out of "
                    f"data.tasks to skip it)"
                )
        Augmenter(self.augment)  # validates every field now


@dataclass
class LoraSpec:
    """peft LoRA adapters added for the stage and merged into the weights when it ends."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:  # checked here, not by peft half-way into the stage
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora.r: the adapter rank must be a whole number >= 1, got {self.r!r}")
        if not 0 < self.alpha < math.inf:
            raise ConfigError(f"lora.alpha: must be a finite number > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: a probability in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ConfigError(f"lora.target_modules: a non-empty list of module names, got {self.target_modules!r}")


@dataclass
class ForecastRefitSpec:
    """After the stage's last step: refit the forecasting head's linear skip in closed form on ``task``'s training
    windows, the penalty chosen on its validation windows (unimoe.generation.refit)."""

    task: str = "ts_forecast"
    alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))  # relative ridge penalties
    centers: list[float] = field(default_factory=lambda: list(DEFAULT_CENTERS))  # shares of the MLP's median kept
    gates: list[str] = field(default_factory=lambda: list(DEFAULT_GATES))  # trained, series, clustered
    with_validation: bool = True  # the chosen candidate fitted once more on train + validation windows
    batch_size: int = 32

    def __post_init__(self) -> None:
        alphas = self.alphas if isinstance(self.alphas, list) else [self.alphas]
        if not alphas or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0 for a in alphas):
            raise ConfigError(f"forecast_refit.alphas: a list of positive numbers, got {self.alphas!r}")
        self.alphas = [float(a) for a in alphas]
        centers = self.centers if isinstance(self.centers, list) else [self.centers]
        if not centers or any(isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c <= 1
                              for c in centers):  # fmt: skip
            raise ConfigError(f"forecast_refit.centers: a list of shares in [0, 1], got {self.centers!r}")
        self.centers = [float(c) for c in centers]
        gates = self.gates if isinstance(self.gates, list) else [self.gates]
        if not gates or any(g not in GATES for g in gates):
            raise ConfigError(f"forecast_refit.gates: a list of {', '.join(GATES)}, got {self.gates!r}")
        self.gates = list(gates)
        if not isinstance(self.with_validation, bool):
            raise ConfigError(f"forecast_refit.with_validation: true or false, got {self.with_validation!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"forecast_refit.batch_size: must be a whole number >= 1, got {self.batch_size!r}")


@dataclass
class StageConfig:
    name: str = "stage"
    kind: str = "align"  # align | specialize | tune (what the stage does besides training its parts)
    trainable: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int | None = 10  # 0 or null: none
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0  # 0 or null: no clipping
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    # with several processes (`unimoe train --nproc N`): ddp (every process holds the whole model) or fsdp (FSDP2:
    # parameters, gradients and optimizer states sharded across the processes, one shard group per decoder layer)
    distributed: str = "ddp"
    seed: int = 0
    log_every: int = 10
    save_every: int | None = 0  # 0 or null: only at the end
    keep_checkpoints: int = 2
    router_warmup_steps: int | None = 0  # tune: train only the routers for this many steps first (0 / null: none)
    # specialize: copy this expert into all experts first; a list [a, b] copies a, b, a, b, ... into experts 0, 1, 2,
    # 3, ... (a group of fine-grained experts into every group)
    init_experts_from: int | list[int] | None = None
    # route every token to this expert (a dense warm-up of it), or to each expert of a list at weight 1
    forced_expert: int | list[int] | None = None
    lora: dict[str, Any] | None = None
    moe: dict[str, Any] = field(default_factory=dict)  # overrides of the MoE loss coefficients etc.
    # the media-text contrastive loss (UniMoEForConditionalGeneration.media_text_loss): its weight (0 = off) and the
    # temperature of its cosine similarities
    media_text_loss_coef: float = 0.0
    media_text_temperature: float = 0.1
    # the tasks whose samples it uses (None: every sample with media and a text answer). The loss assumes the answer
    # describes the item (a label, a transcript); a VQA answer depends on the question as much as on the image.
    media_text_tasks: list[str] | None = None
    collapse_threshold: float = 0.9  # warn when top_k experts take more than this share of a layer's slots
    # per-part learning-rate factors ({encoders: 5.0}): from-scratch encoders and connectors need a larger step than
    # the decoder they feed, or the decoder learns to ignore their still-uninformative tokens (see the tiny recipe).
    # The per-modality parts also take one modality ({encoders.video: 0.25}), which wins over the part's factor.
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    # parts (or one modality of a part: encoders.video) held frozen for the first N steps of the stage, then trained
    # ({encoders: 600}): the decoder first learns to read the from-scratch encoders' random but item-dependent tokens
    # before the encoders may adapt (see the tiny recipe's align stage and docs/results.md).
    frozen_steps: dict[str, int] = field(default_factory=dict)
    # {task: ts_forecast, alphas: [...]}: refit the forecasting head's linear skip by ridge regression when the stage
    # ends (ForecastRefitSpec); None: off
    forecast_refit: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("align", "specialize", "tune"):
            raise ConfigError(f"stage {self.name}: kind {self.kind!r} unknown; choose align, specialize or tune")
        unknown = sorted(set(self.trainable) - set(PARTS))
        if unknown:
            raise ConfigError(f"stage {self.name}: trainable has unknown part(s) {unknown}; parts: {', '.join(PARTS)}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ConfigError(f"stage {self.name}: distributed {self.distributed!r}; choose ddp or fsdp")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"stage {self.name}: precision {self.precision!r}; choose auto, fp32 or bf16")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"stage {self.name}: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:  # also refuses nan and inf, which trained a NaN checkpoint without a word
            raise ConfigError(f"stage {self.name}: lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"stage {self.name}: weight_decay must be a finite number >= 0, got {self.weight_decay}")
        for name in ("trainable", "data", "moe", "lr_multipliers", "frozen_steps"):  # `key=null`: the empty table
            if getattr(self, name) is None:
                setattr(self, name, {})
        for name in ("lr_multipliers", "frozen_steps"):  # `frozen_steps.encoders.points=0` arrives nested
            table = getattr(self, name)
            if any(isinstance(v, dict) for v in table.values()):
                flat = {k: v for k, v in table.items() if not isinstance(v, dict)}
                flat |= {f"{k}.{m}": n for k, v in table.items() if isinstance(v, dict) for m, n in v.items()}
                setattr(self, name, flat)
        for name in ("warmup_steps", "save_every", "router_warmup_steps", "max_grad_norm"):  # 0 = off
            if getattr(self, name) is None:  # null: off too
                setattr(self, name, 0.0 if name == "max_grad_norm" else 0)
            if getattr(self, name) < 0:
                raise ConfigError(f"stage {self.name}: {name} must be >= 0 (0 = off), got {getattr(self, name)}")
        for name in ("log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"stage {self.name}: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"stage {self.name}: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.media_text_loss_coef < 0:
            raise ConfigError(
                f"stage {self.name}: media_text_loss_coef must be >= 0 (0 = off), got {self.media_text_loss_coef}"
            )
        if not self.media_text_temperature > 0:
            raise ConfigError(
                f"stage {self.name}: media_text_temperature must be > 0, got {self.media_text_temperature}"
            )
        if self.media_text_tasks is not None and (
            not isinstance(self.media_text_tasks, list) or not all(isinstance(t, str) for t in self.media_text_tasks)
        ):
            raise ConfigError(
                f"stage {self.name}: media_text_tasks must be a list of task names, got {self.media_text_tasks!r}"
            )
        if not 0.0 < self.collapse_threshold <= 1.0:
            raise ConfigError(f"stage {self.name}: collapse_threshold must be in (0, 1], got {self.collapse_threshold}")
        for name in ("forced_expert", "init_experts_from"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            if value is not None and (
                not ids
                or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids)
                or len(set(ids)) < len(ids)
            ):
                raise ConfigError(
                    f"stage {self.name}: {name} must be an expert id >= 0 or a list of distinct ones, got {value!r}"
                )
        self._check_part_keys("lr_multipliers", self.lr_multipliers, extra=("lora",))
        for part, factor in self.lr_multipliers.items():
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                raise ConfigError(f"stage {self.name}: lr_multipliers.{part} must be a number > 0, got {factor!r}")
        self._check_part_keys("frozen_steps", self.frozen_steps)
        for part, n in self.frozen_steps.items():
            # more than the stage's steps holds the part for the whole stage: `stages.*.steps=3` quick runs of the
            # shipped recipes keep working
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ConfigError(f"stage {self.name}: frozen_steps.{part} must be a whole number of steps >= 0, "
                                  f"got {n!r}")  # fmt: skip
            if not self.trainable.get(part.split(".", 1)[0]):
                raise ConfigError(
                    f"stage {self.name}: frozen_steps.{part}: the part {part.split('.', 1)[0]!r} is "
                    "not trainable in this stage, so there is nothing to unfreeze"
                )
        _ = self.data_mix, self.lora_spec, self.refit_spec  # validate the nested sections now

    def expert_ids(self, name: str) -> list[int] | None:
        """``forced_expert`` / ``init_experts_from`` as a list of expert ids (None when unset)."""
        value = getattr(self, name)
        return None if value is None else list(value) if isinstance(value, list) else [value]

    def _check_part_keys(self, field_name: str, keys, extra: tuple[str, ...] = ()) -> None:
        """Keys of a per-part table: a part, one of ``extra``, or one modality of a per-modality part."""
        unknown = sorted(k for k in keys if k not in (*PARTS, *extra) and k.split(".", 1)[0] not in MODALITY_PARTS)
        if unknown:
            names = ", ".join((*PARTS, *extra))
            raise ConfigError(
                f"stage {self.name}: {field_name} has unknown part(s) {unknown}; parts: {names}, "
                f"or one modality of {', '.join(MODALITY_PARTS)} (encoders.video)"
            )

    @property
    def data_mix(self) -> DataMix:
        return config_from_dict(DataMix, self.data, where=f"stage {self.name}: data")

    @property
    def lora_spec(self) -> LoraSpec | None:
        if self.lora is None:
            return None
        try:
            return config_from_dict(LoraSpec, self.lora, where=f"stage {self.name}: lora")
        except ConfigError as err:  # LoraSpec's own checks do not know the stage
            message = str(err)
            raise ConfigError(message if message.startswith("stage") else f"stage {self.name}: {message}") from None

    @property
    def refit_spec(self) -> ForecastRefitSpec | None:
        if self.forecast_refit is None:
            return None
        return config_from_dict(ForecastRefitSpec, self.forecast_refit, where=f"stage {self.name}: forecast_refit")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecipeConfig:
    """A whole run: the model to start from, the data, the stages in order, and the final evaluation."""

    name: str = "recipe"
    description: str = ""
    model: dict[str, Any] = field(default_factory=dict)  # {preset: tiny, overrides: {...}} or {checkpoint: DIR}
    # a DataMix: the tasks to build, and the sampling (weights, balance, split) every stage uses unless its own
    # overrides set data.<field>
    data: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)  # {stage: PRESET, overrides: {...}}
    eval: dict[str, Any] = field(default_factory=dict)  # {tasks: SUITE, batch_size: N, limit: N, device: auto}
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError(f"recipe {self.name}: no stages")
        if not self.model:
            raise ConfigError(f"recipe {self.name}: model is required ({{preset: ...}} or {{checkpoint: ...}})")
        config_from_dict(DataMix, self.data, where=f"recipe {self.name}: data")  # unknown keys, weights, balance
        self.stage_configs()
        self._check_model()
        self._check_eval()

    def _check_eval(self) -> None:
        """The evaluation section too: an unknown key or task fails at load, not after the training."""
        unknown = sorted(set(self.eval) - {"tasks", "batch_size", "limit", "device"})
        if unknown:
            raise ConfigError(
                f"recipe {self.name}: eval: unknown key(s) {unknown}; allowed: batch_size, device, limit, tasks"
            )
        for key in ("batch_size", "limit"):
            value = self.eval.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"recipe {self.name}: eval.{key}: must be a positive integer, got {value!r}")
        from unimoe.eval import resolve_tasks
        from unimoe.inference import resolve_device

        try:
            resolve_device(self.eval.get("device", "auto"))
        except ConfigError as err:
            raise ConfigError(f"recipe {self.name}: eval.{err}") from None
        try:
            resolve_tasks(self.eval.get("tasks", "tiny"))
        except ConfigError as err:
            raise ConfigError(f"recipe {self.name}: eval.tasks: {str(err).removeprefix('--tasks: ')}") from None

    def _check_model(self) -> None:
        """The model section is validated with the rest, before a run builds data or writes anything: an impossible
        preset override fails here, not after the data build."""
        unknown = sorted(set(self.model) - {"preset", "overrides", "checkpoint"})
        if unknown or ("preset" in self.model) == ("checkpoint" in self.model):
            raise ConfigError(
                f"recipe {self.name}: model: expected {{preset: NAME, overrides: {{...}}}} or {{checkpoint: DIR}}, "
                f"got keys {sorted(self.model)}"
            )
        if "preset" in self.model:
            from unimoe.presets import build_config

            try:
                build_config(self.model["preset"], self.model.get("overrides") or {})
            except ConfigError as err:
                raise ConfigError(f"recipe {self.name}: model: {err}") from None

    def stage_configs(self) -> list[StageConfig]:
        """Each stage's config: its preset with its overrides; the recipe's seed unless a stage sets its own."""
        stages = [(s.get("stage", s.get("name")), {"seed": self.seed, **s.get("overrides", {})}) for s in self.stages]
        return [load_stage(name, overrides) for name, overrides in stages]


def _configs_dir(kind: str) -> Path:
    return Path(str(resources.files("unimoe.configs") / kind))


def _load_yaml(kind: str, name_or_path: str | Path) -> tuple[dict[str, Any], Path]:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = _configs_dir(kind) / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in _configs_dir(kind).glob("*.yaml")))
        raise ConfigError(f"unknown {kind[:-1]} {str(name_or_path)!r}; choose one of: {known} (or a YAML path)")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    return data, path


def load_stage(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> StageConfig:
    data, path = _load_yaml("stages", name_or_path)
    data = apply_overrides(data, overrides or {})
    data.setdefault("name", path.stem)
    return config_from_dict(StageConfig, data, where=f"stage {path.stem}")


def _stage_overrides(data: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """Move ``stages.<stage>.<key>=value`` overrides (``<stage>``: a stage's name, its number from 1, or ``*`` for
    every stage) into those stages' ``overrides``; return the rest. ``stages.*.steps=5`` makes a quick run."""
    rest = {}
    if "stages" in overrides and any(key.startswith("stages.") for key in overrides):
        raise ConfigError(f"{where}: give either a whole `stages` list or `stages.<stage>.<key>` overrides, not both")
    stages = data.get("stages")
    for key, value in overrides.items():
        parts = key.split(".", 2)
        if parts[0] != "stages" or len(parts) < 3 or not isinstance(stages, list):
            rest[key] = value
            continue
        names = [str(s.get("stage", s.get("name"))) if isinstance(s, dict) else "" for s in stages]
        # numbered from 1, as the run's folders are (1-align, 2-specialize, ...)
        picked = [i for i, name in enumerate(names) if parts[1] in ("*", name, str(i + 1))]
        if not picked:
            listed = ", ".join(f"{i} {name}" for i, name in enumerate(names, 1))
            raise ConfigError(f"{where}: override {key}: no stage {parts[1]!r}; stages: {listed} (or *)")
        for i in picked:
            stages[i] = {**stages[i], "overrides": apply_overrides(stages[i].get("overrides") or {}, {parts[2]: value})}
    return rest


def load_recipe(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> RecipeConfig:
    data, path = _load_yaml("recipes", name_or_path)
    data = apply_overrides(data, _stage_overrides(data, overrides or {}, f"recipe {path.stem}"))
    data.setdefault("name", path.stem)
    return config_from_dict(RecipeConfig, data, where=f"recipe {path.stem}")


def list_stage_presets() -> list[str]:
    return sorted(p.stem for p in _configs_dir("stages").glob("*.yaml"))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in _configs_dir("recipes").glob("*.yaml"))
