"""One training loop for every stage, on 🤗 accelerate.

Single process, multi-process DDP and FSDP2 (``distributed=fsdp``; gloo on CPU, NCCL on GPUs; ``unimoe train --nproc
N`` launches it with torchrun). Under FSDP a multimodal batch needs three things that a text LLM does not (see
``_UnusedUnderFSDP``, ``_prime_optimizer_state``), and the final save gathers the shards into a
whole model on the main process. DeepSpeed is not supported.

Gradient accumulation, fp32 on CPU and bf16 on GPU, cosine schedule with warm-up, gradient clipping, a deterministic
modality-balanced sample schedule, atomic checkpoints every N steps with ``resume``, a progress bar with loss,
throughput and ETA, and metrics to TensorBoard and a JSONL log — routing metrics per modality included, with a
warning when a router collapses.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from unimoe.errors import CheckpointError, ConfigError, TrainingError
from unimoe.train.config import StageConfig
from unimoe.train.data import Collator, ScheduleDataset, TrainData
from unimoe.train.freeze import apply_trainable, param_groups, params_by_key

STATE_FILE = "trainer_state.json"


@dataclass
class StageResult:
    name: str
    steps: int
    start_step: int
    final_loss: float
    seconds: float  # training-loop time over every process that trained the stage (a kill's lost steps excluded)
    tokens_per_second: float
    peak_memory_mb: float  # the stage's peak: resident memory on a CPU, allocated GPU memory on CUDA
    trainable_parameters: dict[str, int] = field(default_factory=dict)
    checkpoint: str = ""
    forecast_refit: dict | None = None  # unimoe.generation.refit.RefitReport, when the stage refits the skip
    seconds_before_resume: float = 0.0  # the part of ``seconds`` spent by earlier processes (0: not resumed)
    device: str = ""  # where it trained (cpu, cuda:0)
    precision: str = ""  # fp32 or bf16 (autocast)


def _device_name(device: torch.device) -> str:
    """``cuda:0`` rather than accelerate's bare ``cuda``: which GPU a process trained on."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def refit_forecast(model, processor, stage: StageConfig, data_root: str | Path) -> dict:
    """The stage's ``forecast_refit``: the head's linear skip refitted on the task's training windows."""
    from unimoe.data.build import task_dir
    from unimoe.data.records import read_split
    from unimoe.generation.refit import refit_forecast_skip

    spec = stage.refit_spec
    directory = task_dir(Path(data_root), spec.task)
    if not (directory / "train.jsonl").is_file() or not (directory / "validation.jsonl").is_file():
        raise ConfigError(f"stage {stage.name}: forecast_refit.task: {directory} has no train and validation splits")
    report = refit_forecast_skip(model, processor, read_split(directory, "train"), read_split(directory, "validation"),
                                 alphas=spec.alphas, centers=spec.centers, gates=spec.gates,
                                 with_validation=spec.with_validation,
                                 batch_size=spec.batch_size)  # fmt: skip
    return report.to_dict()


def _reset_peak_memory() -> None:
    """Start the peak-memory count afresh: on Linux writing 5 to ``/proc/self/clear_refs`` resets the resident-set
    high-water mark that ``ru_maxrss`` reports (elsewhere the count stays per process); on CUDA the allocator's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _log_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", math.inf))
    except (ValueError, AttributeError):
        return math.inf  # a line cut by the kill


# ----------------------------------------------------------------------------- checkpoints
def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON through a temporary file and a rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint (a directory with a readable trainer state); half-written ones are ignored."""
    if not ckpt_root.is_dir():
        return None
    best, best_step = None, -1
    for path in ckpt_root.glob("step-*"):
        try:
            step = json.loads((path / STATE_FILE).read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue
        if step > best_step:
            best, best_step = path, step
    return best


def save_training_state(accelerator, ckpt_root: Path, step: int, keep: int, *, seconds: float = 0.0,
                        tokens: int = 0) -> Path:  # fmt: skip
    """``accelerator.save_state`` into a temporary directory, then an atomic rename: a kill during a save never
    leaves a corrupt latest checkpoint (the trainer state file is written last and marks completeness). The state
    file also carries the training time and tokens so far, so a resumed stage reports the whole stage's."""
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "seconds": seconds, "tokens": tokens}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(ckpt_root.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------- stage preparation
def prepare_stage_model(model, stage: StageConfig):
    """Apply the stage's MoE overrides, expert initialization, peft LoRA and trainable parts."""
    if stage.moe:
        from unimoe.moe import MoEConfig, SparseMoEBlock

        new_cfg = MoEConfig.from_dict({**model.config.moe, **stage.moe})  # validated; loss coefficients, jitter...
        model.config.moe = new_cfg.to_dict()
        for block in model.modules():
            if isinstance(block, SparseMoEBlock):
                block.set_config(new_cfg)
    if stage.init_experts_from is not None:
        copy_expert_to_all(model, stage.expert_ids("init_experts_from"))
    lora = stage.lora_spec
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            # peft reads transformers 5's deprecated `is_gradient_checkpointing` (a FutureWarning on every run that
            # is peft's to fix, not the user's)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(
                model,
                LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=lora.target_modules),
            )  # fmt: skip
    counts = apply_trainable(model, stage.trainable)
    return model, counts


@torch.no_grad()
def copy_expert_to_all(model, sources: int | list[int]) -> None:
    """Initialize every routed expert from expert ``sources`` (specialization starts from the aligned FFN); with a
    list of ``G`` experts, expert ``e`` is copied from ``sources[e % G]`` (every group of ``G`` fine-grained experts
    starts from the aligned group)."""
    from unimoe.moe import SparseMoEBlock

    sources = [sources] if isinstance(sources, int) else list(sources)
    for block in model.modules():
        if isinstance(block, SparseMoEBlock):
            index = torch.tensor([sources[e % len(sources)] for e in range(block.num_experts)])
            for param in block.experts.parameters():
                if param.dim() >= 1 and param.shape[0] == block.num_experts:
                    param.copy_(param[index.to(param.device)])


# ----------------------------------------------------------------------------- routing metrics
def routing_metrics(stats, modalities: list[str], num_experts: int, top_k: int = 1) -> dict[str, float]:
    """Per-modality load entropy (normalized to [0, 1]) and max expert share, plus layer averages.

    Shares are of a layer's routed slots (a token picks ``top_k`` of them), so one expert holds at most ``1 / top_k``
    of a top-k layer. ``router/top_k_share`` is the most any ``top_k`` experts hold in one layer: 1.0 when every
    token goes to the same ``top_k`` experts (a collapsed router), ``top_k / num_experts`` when the load is even.
    """
    out: dict[str, float] = {}
    if not stats:
        return out
    out["router/entropy"] = float(torch.stack([s.entropy for s in stats]).mean())
    out["router/dropped"] = float(torch.stack([s.dropped for s in stats]).sum())
    out["router/null_share"] = float(torch.stack([s.null_share for s in stats]).mean())
    per_mod = torch.stack([s.load_per_modality for s in stats])  # (L, M, E)
    for m, name in enumerate(modalities):
        load = per_mod[:, m]  # (L, E)
        if load.sum() == 0:
            continue
        share = load / load.sum(-1, keepdim=True).clamp_min(1e-9)
        ent = -(share * share.clamp_min(1e-12).log()).sum(-1) / math.log(max(share.shape[-1], 2))
        out[f"router/{name}/load_entropy"] = float(ent.mean())
        out[f"router/{name}/max_expert_share"] = float(share[:, :num_experts].max(-1).values.mean())
    total = per_mod.sum(1)
    total_share = total / total.sum(-1, keepdim=True).clamp_min(1e-9)
    routed = total_share[:, :num_experts]  # (L, E) without null experts
    out["router/max_expert_share"] = float(routed.max())
    out["router/top_k_share"] = float(routed.topk(min(top_k, num_experts), dim=-1).values.sum(-1).max())
    return out


def router_collapsed(record: dict, num_experts: int, top_k: int, threshold: float) -> bool:
    """Whether one layer sends more than ``threshold`` of its slots to only ``top_k`` experts.

    Never with ``num_experts <= top_k``: there every token uses every expert (a dense model has one).
    """
    return num_experts > top_k and record.get("router/top_k_share", 0.0) > threshold


# ----------------------------------------------------------------------------- the loop
def _make_accelerator(stage: StageConfig, out_dir: Path):
    """The stage's ``Accelerator``: the process group torchrun set up (gloo on CPU), DDP or FSDP2
    (``distributed``), gradient accumulation, bf16 autocast on CUDA when ``precision`` is ``auto`` or ``bf16``,
    TensorBoard under ``out_dir``."""
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs

    precision = stage.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    fsdp = _fsdp_plugin() if stage.distributed == "fsdp" else None
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # without it accelerate ignores torchrun's env on CPU (no gloo group)
        gradient_accumulation_steps=stage.grad_accum,
        mixed_precision="bf16" if precision == "bf16" else "no",
        log_with="tensorboard",
        project_dir=str(out_dir),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        # no buffer broadcast: the only changing buffers are the routers' balancing state, which every process
        # updates alike from the load summed over the processes; DDP's broadcast at each forward would overwrite the
        # load the other processes counted in earlier micro-batches of an accumulated step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)],
        fsdp_plugin=fsdp,
    )
    # torch 2.14 renames broadcast_buffers (forward_sync_buffers), which accelerate 1.15's DDP kwargs cannot pass;
    # the old name still does what is wanted here
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    if fsdp is not None and accelerator.distributed_type.name == "MULTI_CPU":
        _fsdp_on_cpu(accelerator, fsdp)
    if fsdp is not None and accelerator.num_processes == 1:
        accelerator.print(f"{stage.name}: distributed=fsdp in one process has nothing to shard; training unsharded "
                          "(launch several with `unimoe train --nproc N`)")  # fmt: skip
    if accelerator.distributed_type.name == "DEEPSPEED":  # see the module docstring
        raise ConfigError(f"stage {stage.name}: DeepSpeed is not supported; launch with `unimoe train --nproc N` "
                          "(DDP, or FSDP with distributed=fsdp)")  # fmt: skip
    if accelerator.distributed_type.name == "FSDP" and stage.distributed != "fsdp":
        raise ConfigError(f"stage {stage.name}: launched under FSDP (an accelerate config?) but the stage says "
                          f"distributed={stage.distributed}; set distributed=fsdp to train it sharded")  # fmt: skip
    _check_batch_split(stage, accelerator.num_processes)
    return accelerator


def _check_batch_split(stage: StageConfig, nproc: int) -> None:
    if stage.batch_size % nproc:
        raise ConfigError(f"stage {stage.name}: batch_size {stage.batch_size} is not divisible by {nproc} processes")


def check_before_launch(stage: StageConfig, *, init: str | Path, data_root: str | Path, nproc: int) -> None:
    """What every one of ``nproc`` training processes would refuse, checked once before they start (``unimoe
    train --nproc N``): the batch split, the starting checkpoint (a local one: its ``config.json`` against the
    stage, no weights read; a Hub id is left to the processes), the data directory and the stage's tasks."""
    from unimoe.data.build import check_data_root, task_dir
    from unimoe.hub import check_local_checkpoint, looks_local

    _check_batch_split(stage, nproc)
    check_local_checkpoint(init)
    if looks_local(init):
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(init)
        except (OSError, ValueError) as err:  # a malformed config.json: one line, as when a process loads it
            raise CheckpointError(f"{init}: unreadable config.json ({str(err).splitlines()[0]})") from err
        check_stage_fits_model(stage, config)
    check_data_root(data_root)
    for name in stage.data_mix.tasks:
        task_dir(data_root, name)


def _fsdp_plugin():
    """FSDP2 through accelerate: ``fully_shard`` on each decoder layer and (accelerate's policy) the input
    embeddings, then on the root, which keeps the encoders, connectors, heads, final norm and LM head; parameters
    freed after each layer's forward; sharded checkpoints (torch.distributed.checkpoint) for ``--resume``."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["UniMoEDecoderLayer"],
        reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )


def _fsdp_on_cpu(accelerator, plugin) -> None:
    """Switch accelerate's FSDP path on for CPU processes. accelerate (1.15) turns FSDP on only for accelerator
    devices and leaves gloo processes as MULTI_CPU (DDP), while torch's FSDP2 shards over gloo as well; forcing the
    distributed type runs the very code path (prepare, sharded save/load, state-dict gathering) that GPU users get,
    which is what lets the tests check it here. Both of accelerate's shared states hold the type."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    if accelerator.mixed_precision != "no":  # what accelerate does when it turns FSDP on itself
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # a fresh AcceleratorState copies PartialState's: both must say FSDP, or prepare() and save_state() disagree
    types = {accelerator.distributed_type, AcceleratorState().distributed_type}
    if types != {DistributedType.FSDP}:
        raise ConfigError("distributed=fsdp on CPU relies on accelerate 1.15's internal state (constraints.txt); with "
                          "this accelerate it cannot be switched on: use distributed=ddp")  # fmt: skip


class _UnusedUnderFSDP:
    """What FSDP2 needs for parameters some process does not use, and what it gets wrong for those no process uses.

    FSDP2 reduce-scatters only the parameters that got a gradient: a process whose share of the batch has no image
    would leave the image encoder without one, the processes' collectives would stop pairing and gloo aborts.
    :meth:`touch` is zero times every trainable parameter gathered right now (the root group: encoders,
    connectors, heads, final norm; each decoder layer's parameters are sharded again after its forward and are used
    by every process anyway), added to the loss, so every process gives each of them a gradient, a zero one where
    it was not used — what DDP's ``find_unused_parameters`` does.

    A parameter that no process used then has a zero gradient instead of none, and AdamW would move it by its
    momentum and weight decay. :meth:`drop_unused` removes those gradients before the optimizer step, as one process
    and DDP leave them. "Used" means its module ran during the step (forward hooks), summed over the processes (one
    all-reduce); not "its gradient is non-zero", which would also drop a LoRA A factor while its B is still zero,
    or layers before a zero-initialized output layer."""

    def __init__(self, model):
        self.model = model
        self.ran: set[str] = set()  # modules that ran since the last optimizer step, on this process
        self.touched: set[str] = set()  # parameters touched since then (the same on every process)
        for name, module in model.named_modules():
            if next(module.parameters(recurse=False), None) is not None:
                module.register_forward_hook(lambda _m, _i, _o, name=name: self.ran.add(name))

    def touch(self) -> torch.Tensor | float:
        from torch.distributed.tensor import DTensor

        gathered = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
        self.touched.update(n for n, _ in gathered)
        return sum((p.sum() for _, p in gathered), 0.0) * 0.0

    def drop_unused(self, accelerator) -> None:
        names = sorted(self.touched)
        if names:
            ran = [name.rpartition(".")[0] in self.ran for name in names]
            used = accelerator.reduce(torch.tensor(ran, dtype=torch.float32), reduction="sum")
            params = dict(self.model.named_parameters())
            for name, count in zip(names, used.tolist()):
                if count == 0:
                    params[name].grad = None
        self.ran.clear()
        self.touched.clear()


def _prime_optimizer_state(optimizer) -> None:
    """Give every trainable parameter its optimizer state before training. FSDP's sharded checkpoints
    (torch.distributed.checkpoint) refuse to load when a trainable parameter has no saved state, which is the case
    for one that had no gradient yet (an encoder held frozen, a modality not seen before the checkpoint). One step
    with zero gradients at learning rate 0 creates Adam's state as its first real step would (moments 0, weights
    unchanged), and the step counts go back to 0, so training continues exactly as with lazily created state."""
    opt = getattr(optimizer, "optimizer", optimizer)  # past accelerate's wrapper
    params = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
    rates = [group["lr"] for group in opt.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    for group, lr in zip(opt.param_groups, rates):
        group["lr"] = lr
    for p in params:
        p.grad = None
        opt.state[p]["step"].zero_()


def check_stage_fits_model(stage: StageConfig, config) -> None:
    """What a stage asks of the model config it starts from: expert ids that exist, and in specialize an expert for
    each modality (``moe.modality_experts``, after the stage's own ``moe`` overrides). Each training process checks
    it; ``unimoe train --nproc N`` checks it once before launching them."""
    from unimoe.moe import MoEConfig

    num_experts = config.moe_config.num_experts
    for name in ("forced_expert", "init_experts_from"):
        bad = [e for e in stage.expert_ids(name) or () if e >= num_experts]
        if bad:
            raise ConfigError(f"stage {stage.name}: {name}: experts {bad} do not exist (moe.num_experts={num_experts})")
    routed_per_modality = MoEConfig.from_dict({**config.moe, **stage.moe}).modality_experts
    if stage.kind == "specialize" and stage.forced_expert is None and not routed_per_modality:
        raise ConfigError(f"stage {stage.name}: specialize needs moe.modality_experts (modality -> experts)")


def _forced_experts(model, stage: StageConfig) -> dict[str, list[int]] | None:
    """Modality -> the experts every token of it goes to: all of them to ``forced_expert`` (a dense warm-up), or in
    specialize each modality to its own (``moe.modality_experts``, checked by :func:`check_stage_fits_model`);
    ``None`` lets the routers choose."""
    if stage.forced_expert is not None:
        return {m: stage.expert_ids("forced_expert") for m in model.config.modalities}
    if stage.kind == "specialize":
        return model.config.moe_config.modality_experts  # after the stage's own moe overrides
    return None


class _Holds:
    """Trainable parameters held frozen during a stage's first steps: everything but the routers while they warm
    up (``router_warmup_steps``), and the parts named in ``frozen_steps``. ``update(step)`` sets ``requires_grad``
    for ``step``; it only needs calling where a hold ends (``boundaries``) and once at the start."""

    def __init__(self, model, stage: StageConfig, params: list[torch.nn.Parameter]):
        self.trainable = set(params)
        self.held: list[tuple[int, set]] = []
        if stage.router_warmup_steps:
            others = {p for name, p in model.named_parameters() if p in self.trainable and ".mlp.router." not in name}
            self.held.append((stage.router_warmup_steps, others))
        keyed = params_by_key(model, set(stage.frozen_steps), where=f"stage {stage.name}: frozen_steps")
        self.held += [
            (stage.frozen_steps[k], set(ps) & self.trainable) for k, ps in keyed.items() if stage.frozen_steps[k]
        ]
        self.boundaries = {n for n, _ in self.held}

    def update(self, step: int) -> None:
        frozen = set().union(*(ps for n, ps in self.held if step < n))
        for p in self.trainable:
            p.requires_grad_(p not in frozen)


def _step_record(step: int, loss: float, outputs, lr: float, tokens_per_second: float, model_config) -> dict:
    """One line of the training log: the loss and its named parts, the learning rate, throughput and routing."""
    moe = model_config.moe_config
    return {
        "step": step,
        "loss": loss,
        "lm_loss": outputs.lm_loss.item(),
        "aux_loss": outputs.aux_loss.item(),
        "z_loss": outputs.z_loss.item(),
        "modality_loss": outputs.modality_loss.item(),
        **{
            name: getattr(outputs, name).item()
            for name in ("diffusion_loss", "forecast_loss", "media_text_loss")
            if getattr(outputs, name, None) is not None
        },
        "lr": lr,
        "tokens_per_second": tokens_per_second,
        **routing_metrics(outputs.router_stats, list(model_config.modalities), moe.num_experts, moe.top_k),
    }


def train_stage(
    stage: StageConfig,
    *,
    init: str | Path,
    out_dir: str | Path,
    data_root: str | Path,
    resume: bool = False,
    progress: bool = True,
    max_steps_this_run: int | None = None,
) -> StageResult:
    """Train one stage starting from the checkpoint ``init``; the result checkpoint is ``out_dir/final``.

    ``max_steps_this_run`` stops early (after saving) — used by tests to simulate an interrupted run."""
    from accelerate.utils import set_seed
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from unimoe.hub import save_checkpoint
    from unimoe.inference import load_pretrained

    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    _reset_peak_memory()  # result.json's peak_memory_mb is this stage's, not the process's so far
    accelerator = _make_accelerator(stage, out_dir)
    set_seed(stage.seed)
    model, processor = load_pretrained(init)
    check_stage_fits_model(stage, model.config)
    model, counts = prepare_stage_model(model, stage)
    forced = _forced_experts(model, stage)
    model.train()
    fsdp = accelerator.distributed_type.name == "FSDP"
    if accelerator.num_processes > 1:
        # Every process runs a backward through every decoder layer, also when its share of the batch reaches no
        # trainable part (text-only samples while only the connectors train): under FSDP the layers' sharded
        # parameters are gathered again for it, a collective every process must join; under DDP a loss without a
        # graph cannot go backward, and a zero added outside the forward (as in one process, below) fails DDP's
        # unused-parameter bookkeeping ("marked as ready twice"). transformers' enable_input_require_grads does
        # the same, with a deprecation warning in 5.23.
        model.get_input_embeddings().register_forward_hook(lambda _module, _inputs, out: out.requires_grad_(True))

    data = TrainData(data_root, stage.data_mix, generation=set(model.config.generation or {}),
                     inputs=set(model.config.encoders or {}))  # fmt: skip
    unknown = sorted(set(stage.media_text_tasks or ()) - set(data.tasks))
    if unknown:
        raise ConfigError(f"stage {stage.name}: media_text_tasks: {unknown} are not in data.tasks")
    schedule = data.schedule(stage.steps * stage.grad_accum, stage.batch_size, stage.seed)

    start_step = 0
    if resume and (out_dir / "final" / "config.json").is_file():
        raise CheckpointError(f"stage {stage.name} in {out_dir} already finished; nothing to resume")
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    groups = param_groups(model, stage.lr, stage.lr_multipliers)
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay)
    first_factor = groups[0]["lr"] / stage.lr  # the log reports the base rate, whichever group comes first
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, stage.warmup_steps, stage.steps, min_lr_rate=stage.min_lr_ratio
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # FSDP: the sharded parameters
    if fsdp:
        _prime_optimizer_state(optimizer)
    unwrapped = accelerator.unwrap_model(model)
    core = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    seconds_before, tokens_before = 0.0, 0
    if ckpt is not None:
        state = json.loads((ckpt / STATE_FILE).read_text())
        start_step = state["step"]
        seconds_before, tokens_before = float(state.get("seconds", 0.0)), int(state.get("tokens", 0))
    unused = _UnusedUnderFSDP(model) if fsdp else None
    holds = _Holds(unwrapped, stage, params)
    if holds.held:  # before loading: FSDP loads optimizer states only for the parameters that train at this step
        holds.update(start_step)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        accelerator.print(f"resuming {stage.name} from {ckpt} (step {start_step})")

    dataset = ScheduleDataset(data, schedule, start=start_step * stage.grad_accum * stage.batch_size)
    # The loader gets its own generator: starting an iterator draws a seed from it, and from the global RNG without
    # one — which would shift the random stream (router jitter, dropout, diffusion noise) of a resumed run by a draw.
    collator = Collator(processor, forced_experts=forced, augment=stage.data_mix.augment, seed=stage.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=stage.batch_size, shuffle=False, collate_fn=collator,
        generator=torch.Generator().manual_seed(stage.seed),
    )  # fmt: skip
    loader = accelerator.prepare(loader)

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "stage.json").write_text(json.dumps({"stage": stage.to_dict(), "init": str(init)}, indent=2))
    # A resumed stage trains the steps after its checkpoint again: purge_step makes TensorBoard drop the killed
    # run's events from there on, as the JSONL log below drops its lines.
    accelerator.init_trackers(stage.name, init_kwargs={"tensorboard": {"purge_step": start_step + 1}} if ckpt else {})
    log_path = out_dir / "train_log.jsonl"
    if ckpt is not None and accelerator.is_main_process and log_path.is_file():
        # the killed run logged past its last checkpoint; those steps are trained again, so their lines go
        kept = [line for line in log_path.read_text().splitlines() if _log_step(line) <= start_step]
        log_path.write_text("".join(line + "\n" for line in kept))

    step = start_step
    last_loss = float("nan")
    tokens = 0
    start = time.perf_counter()
    end_step = stage.steps if max_steps_this_run is None else min(stage.steps, start_step + max_steps_this_run)
    bar = tqdm(total=stage.steps, initial=start_step, desc=stage.name, unit="step",
               disable=not (progress and accelerator.is_main_process))  # fmt: skip
    data_iter = iter(loader)

    def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(tensor.clone(), reduction="sum")

    objectives = {}
    if stage.media_text_loss_coef > 0:
        objectives = {
            "media_text_loss_coef": stage.media_text_loss_coef,
            "media_text_temperature": stage.media_text_temperature,
        }
    moe = core.config.moe_config  # fixed for the stage: the collapse check reads top_k / num_experts on log steps
    while step < end_step:
        log_now = (step + 1) % stage.log_every == 0 or step + 1 == stage.steps
        for _ in range(stage.grad_accum):
            batch = next(data_iter)
            batch.pop("sample_modality", None)
            tasks = batch.pop("sample_task", None)
            if objectives and stage.media_text_tasks is not None:  # the rows the media-text loss may use
                objectives["media_text_rows"] = torch.tensor([t in stage.media_text_tasks for t in tasks])
            with accelerator.accumulate(model):
                outputs = model(**batch, output_router_stats=log_now, **objectives)
                loss = outputs.loss
                if fsdp:
                    loss = loss + unused.touch()
                elif not loss.requires_grad:
                    # one process, and no sample of this batch reaches a trainable part (e.g. text-only samples
                    # while only the connectors train): a zero that touches every trainable parameter keeps the
                    # step well defined (several processes: the input embeddings' hook above)
                    loss = loss + sum(p.sum() for p in params) * 0.0
                accelerator.backward(loss)
                if fsdp and accelerator.sync_gradients:
                    unused.drop_unused(accelerator)
                if accelerator.sync_gradients and stage.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, stage.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
        core.update_router_biases(reduce_sum if accelerator.num_processes > 1 else None)
        step += 1
        if step in holds.boundaries:
            holds.update(step)
        loss = accelerator.reduce(outputs.loss.detach(), reduction="mean").item()
        if not math.isfinite(loss):  # stop before a checkpoint of NaN weights is written
            kept = latest_checkpoint(ckpt_root)
            raise TrainingError(
                f"stage {stage.name} step {step}: the loss is {loss}; stopped without saving "
                f"({'the last good checkpoint is ' + str(kept) if kept else 'no checkpoint was written'}). "
                f"Lower lr ({stage.lr:g}) or raise warmup_steps / max_grad_norm clipping"
            )
        last_loss = loss
        elapsed = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
        if log_now:
            record = _step_record(step, loss, outputs, scheduler.get_last_lr()[0] / first_factor,
                                  tokens / max(elapsed, 1e-9), core.config)  # fmt: skip
            if forced is None and router_collapsed(record, moe.num_experts, moe.top_k, stage.collapse_threshold):
                few = "one expert takes" if moe.top_k == 1 else f"{moe.top_k} of {moe.num_experts} experts take"
                warnings.warn(
                    f"stage {stage.name} step {step}: router collapse — {few} "
                    f"{record['router/top_k_share']:.0%} of a layer's routed slots",
                    stacklevel=1,
                )
                record["warning"] = "router_collapse"
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
            if accelerator.is_main_process:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
        if stage.save_every and step % stage.save_every == 0 and step < stage.steps:
            save_training_state(
                accelerator,
                ckpt_root,
                step,
                stage.keep_checkpoints,
                seconds=seconds_before + time.perf_counter() - start,
                tokens=tokens_before + tokens,
            )
    bar.close()
    seconds = time.perf_counter() - start

    final = out_dir / "final"
    refit = None
    to_save = None
    if step < stage.steps:  # stopped early on purpose: leave a resumable checkpoint
        save_training_state(
            accelerator,
            ckpt_root,
            step,
            stage.keep_checkpoints,
            seconds=seconds_before + seconds,
            tokens=tokens_before + tokens,
        )
    else:
        accelerator.wait_for_everyone()
        trained = unwrapped
        if fsdp:  # every process sends its shards (a collective); the main process puts them in a whole model
            full_state = accelerator.get_state_dict(model)
            if accelerator.is_main_process:
                trained, _ = prepare_stage_model(load_pretrained(init)[0], stage)
                trained.load_state_dict(full_state)
        if accelerator.is_main_process:
            to_save = trained.merge_and_unload() if hasattr(trained, "merge_and_unload") else trained
            if stage.refit_spec is not None:  # only the saved weights change, so only the main process refits
                refit = refit_forecast(to_save, processor, stage, data_root)
                accelerator.print(
                    f"{stage.name}: forecast skip refit: validation MASE {refit['validation_mase_before']:.3f} -> "
                    f"{refit['validation_mase_after']:.3f} (gate {refit['gate']}, MLP centre share {refit['center']}, "
                    f"penalty {refit['alpha']}; training windows per forecaster {refit['forecaster_windows']})"
                )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    result = StageResult(
        name=stage.name,
        steps=step,
        start_step=start_step,
        final_loss=last_loss,
        seconds=round(seconds_before + seconds, 2),
        tokens_per_second=round((tokens_before + tokens) / max(seconds_before + seconds, 1e-9), 1),
        peak_memory_mb=round(peak, 1),
        trainable_parameters=counts,
        checkpoint=str(final) if step >= stage.steps else "",
        forecast_refit=refit,
        seconds_before_resume=round(seconds_before, 2),
        device=_device_name(accelerator.device),
        precision="fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision,
    )
    if accelerator.is_main_process:
        # result.json before final/: a stage counts as finished once final/ exists, so a kill between the two
        # must not leave a final/ without its result (the run could never be resumed)
        write_json_atomic(out_dir / "result.json", result.__dict__)
        if to_save is not None:
            save_checkpoint(to_save, final, processor=processor, model_name=f"{out_dir.name}",
                            notes=f"After training stage `{stage.name}` ({stage.kind}).")  # fmt: skip
    if step >= stage.steps:
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
