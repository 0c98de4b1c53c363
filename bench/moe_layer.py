"""Benchmark of the sparse MoE layer against a dense MLP and transformers' own MoE block (CPU, fp32).

    python bench/moe_layer.py --json bench/results/moe_layer.json     # full run (~1.5 min a process on 2 cores)
    python bench/moe_layer.py --quick --json /tmp/moe.json             # smoke mode (tiny sizes, 1 repetition)
    python bench/moe_layer.py --device cuda --dtype bfloat16 --tokens 16384 --json OUT.json   # on a GPU

Every implementation of a case runs interleaved inside each repetition (so drift in machine speed hits all of them
alike); the reported time is the median over repetitions and the ratio to dense the median of the per-repetition
ratios. Training cases time forward + backward (the input
requires grad, as inside a network); ``decode-E8`` times the forward alone under ``no_grad``.

Columns
    dense          a SwiGLU MLP with the same *active* FLOPs per token (top_k * expert FFN width), or for the LoRA
                   case the frozen dense FFN alone.
    unimoe         our ``SparseMoEBlock`` with ``dispatch="auto"`` (whatever backend ``auto`` resolves to here).
    unimoe_loop / unimoe_grouped_mm
                   the same layer with the dispatch backend forced, so ``auto`` can be chosen from data.
    hf_eager / hf_grouped_mm
                   ``Qwen2MoeSparseMoeBlock`` with ``experts_implementation`` "eager" / "grouped_mm". We time only
                   its router + routed experts (``block.gate`` then ``block.experts``): its shared expert is always
                   built, and timing it would add dense work our block does not do. Same router and expert weights
                   as ours (copied), so both route identically.

For ``lora-E8-r16-top2`` the transformers columns are the Qwen2-MoE block with 8 FFN experts whose width gives the
same active FLOPs as the frozen FFN (top-2 of width 1024 = one FFN of width 2048); it is a reference point, not
the same model. Our LoRA loop runs the C kernels of ``unimoe/moe/native.py`` where a C compiler is found (the JSON's
``env.lora_native_kernels``); ``UNIMOE_NATIVE=0`` times the torch-ops version instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unimoe.moe import MoEConfig, SparseMoEBlock, SwiGLU, native  # noqa: E402
from unimoe.moe.dispatch import use_grouped_mm  # noqa: E402

CPU = torch.device("cpu")


@dataclass
class Case:
    name: str
    hidden: int
    expert_ffn: int  # routed expert width (for lora: the frozen FFN width)
    num_experts: int
    top_k: int
    tokens: int
    train: bool = True
    expert_type: str = "ffn"
    lora_rank: int = 16
    target: float | None = None  # max ratio vs dense
    reps: int = 7
    inner: int = 1  # calls per timed sample
    extra: dict = field(default_factory=dict)


def full_cases() -> list[Case]:
    return [
        Case("E8-top2", 512, 1024, 8, 2, 2048, target=1.10, reps=11),
        Case("E64-top8", 512, 256, 64, 8, 2048, target=1.35, reps=9),  # hf_eager alone is ~3 s a call
        Case("lora-E8-r16-top2", 512, 2048, 8, 2, 2048, expert_type="lora", lora_rank=16, target=1.45, reps=11),
        Case("decode-E8", 512, 1024, 8, 2, 8, train=False, reps=11, inner=10),
    ]


def quick_cases() -> list[Case]:
    return [
        Case("E8-top2", 32, 64, 8, 2, 64, target=1.10, reps=1),
        Case("E64-top8", 32, 16, 64, 8, 64, target=1.35, reps=1),
        Case("lora-E8-r16-top2", 32, 128, 8, 2, 64, expert_type="lora", lora_rank=4, target=1.45, reps=1),
        Case("decode-E8", 32, 64, 8, 2, 8, train=False, reps=1, inner=2),
    ]


# ---------------------------------------------------------------------------------------------- implementations
def build_ours(case: Case, dispatch: str) -> SparseMoEBlock:
    cfg = MoEConfig(
        num_experts=case.num_experts,
        top_k=case.top_k,
        expert_type=case.expert_type,
        expert_intermediate_size=case.expert_ffn,
        lora_rank=case.lora_rank,
        lora_alpha=2.0 * case.lora_rank,
        dispatch=dispatch,
    )
    block = SparseMoEBlock(cfg, hidden_size=case.hidden, intermediate_size=case.expert_ffn, modalities=["text"])
    if case.expert_type == "lora":
        # trained-looking LoRA experts: nonzero B so every term is real work
        with torch.no_grad():
            for name in ("lora_B_gate", "lora_B_up", "lora_B_down"):
                getattr(block.experts, name).normal_(std=0.02)
    return block


def hf_block(case: Case, impl: str, ours: SparseMoEBlock | None):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    num_experts, width = case.num_experts, case.expert_ffn
    if case.expert_type == "lora":
        width = case.expert_ffn // case.top_k  # same active FLOPs as the frozen FFN
    cfg = Qwen2MoeConfig(
        hidden_size=case.hidden,
        moe_intermediate_size=width,
        num_experts=num_experts,
        num_experts_per_tok=case.top_k,
        norm_topk_prob=True,
        shared_expert_intermediate_size=1,  # built but not timed (see the module docstring)
        experts_implementation=impl,
    )
    block = Qwen2MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.experts.gate_up_proj.normal_(std=0.02)
        block.experts.down_proj.normal_(std=0.02)
        if ours is not None and case.expert_type == "ffn":
            block.gate.weight.copy_(ours.router.weight)
            block.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
            block.experts.down_proj.copy_(ours.experts.down_proj)
        else:
            torch.nn.init.kaiming_uniform_(block.gate.weight, a=5**0.5)  # nn.Linear's default: random, balanced

    def run(x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1, x.shape[-1])
        _, weights, index = block.gate(flat)
        return block.experts(flat, index, weights)

    return block, run


def make_impls(case: Case) -> dict:
    """name -> (callable(x) returning the output, modules whose grads to clear)."""
    torch.manual_seed(0)
    impls = {}
    if case.expert_type == "lora":
        dense = SwiGLU(case.hidden, case.expert_ffn)
        dense.requires_grad_(False)  # the frozen FFN
    else:
        dense = SwiGLU(case.hidden, case.expert_ffn * case.top_k)
    impls["dense"] = (dense, dense)

    ours = {}
    for backend in ("loop", "grouped_mm"):
        torch.manual_seed(1)
        block = build_ours(case, backend)
        if backend == "grouped_mm":
            block.load_state_dict(ours["loop"].state_dict())
        ours[backend] = block

        def run_ours(x, block=block):
            out = block(x)
            return out.hidden_states, out.aux_loss * 0.01 + out.z_loss * 0.001

        impls[f"unimoe_{backend}"] = (run_ours, block)

    for impl in ("eager", "grouped_mm"):
        block, run = hf_block(case, impl, ours["loop"])
        impls[f"hf_{impl}"] = (run, block)
    return impls


def step(fn, x: torch.Tensor, grad: torch.Tensor | None, module) -> None:
    if grad is None:
        with torch.no_grad():
            fn(x)
        return
    out = fn(x)
    extra = None
    if isinstance(out, tuple):
        out, extra = out
    loss = (out * grad).sum()  # a dense, contiguous upstream gradient (as from a following layer)
    if extra is not None:
        loss = loss + extra
    loss.backward()
    x.grad = None
    for p in module.parameters():
        p.grad = None


def check_agreement(impls: dict, x: torch.Tensor) -> float:
    """Max abs difference between our output and transformers' (same weights, same routing)."""
    with torch.no_grad():
        ours = impls["unimoe_loop"][0](x)[0].reshape(-1, x.shape[-1])
        theirs = impls["hf_eager"][0](x).reshape(-1, x.shape[-1])
    return float((ours - theirs).abs().max())


def time_case(case: Case, device: torch.device = CPU, dtype: torch.dtype = torch.float32) -> dict:
    impls = make_impls(case)
    for _, module in impls.values():
        module.to(device=device, dtype=dtype)  # in place: the closures keep their module
        if not case.train:  # decoding runs in eval mode
            module.eval()
    torch.manual_seed(2)
    x = torch.randn(1, case.tokens, case.hidden).to(device=device, dtype=dtype).requires_grad_(case.train)
    grad = torch.randn(1, case.tokens, case.hidden).to(device=device, dtype=dtype) if case.train else None
    agreement = check_agreement(impls, x) if case.expert_type == "ffn" else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inner = case.inner if device.type == "cpu" else max(case.inner, 10)  # GPU calls take ~1 ms: time several

    names = list(impls)
    for name in names:  # warm-up (allocator, MKL handles, lazy imports)
        fn, module = impls[name]
        step(fn, x, grad, module)
    samples = {name: [] for name in names}
    faults = {name: [] for name in names}
    for rep in range(case.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate who goes first
        for name in order:
            fn, module = impls[name]
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                step(fn, x, grad, module)
            sync()  # a GPU call returns before its kernels finish
            samples[name].append((time.perf_counter() - start) * 1000.0 / inner)
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / inner)

    auto_grouped = use_grouped_mm("auto", x)
    samples["unimoe"] = samples["unimoe_grouped_mm" if auto_grouped else "unimoe_loop"]
    faults["unimoe"] = faults["unimoe_grouped_mm" if auto_grouped else "unimoe_loop"]
    return summarize(case, samples, faults, auto_grouped, agreement)


COLUMNS = ["dense", "unimoe", "unimoe_loop", "unimoe_grouped_mm", "hf_eager", "hf_grouped_mm"]


def paired_ratio(samples: dict[str, list[float]], name: str) -> float:
    """Median of the per-repetition ratios to dense.

    Ratios pair each implementation with the dense run of the same repetition (seconds apart), then take the median:
    the speed of this shared 2-core machine drifts by 10-30% between minutes, which a ratio of medians taken over the
    whole case would carry into the result."""
    return statistics.median(a / b for a, b in zip(samples[name], samples["dense"], strict=True))


def summarize(case: Case, samples: dict, faults: dict, auto_grouped: bool, agreement: float | None) -> dict:
    ms = {name: statistics.median(samples[name]) for name in COLUMNS}
    ratio = {name: paired_ratio(samples, name) for name in COLUMNS}
    faster_than_hf = ratio["unimoe"] < min(ratio["hf_eager"], ratio["hf_grouped_mm"])
    meets = faster_than_hf and (case.target is None or ratio["unimoe"] <= case.target)
    return {
        "case": case.name,
        "sizes": {
            "hidden": case.hidden,
            "expert_ffn": case.expert_ffn,
            "num_experts": case.num_experts,
            "top_k": case.top_k,
            "tokens": case.tokens,
            "expert_type": case.expert_type,
            **({"lora_rank": case.lora_rank} if case.expert_type == "lora" else {}),
            "pass": "forward+backward" if case.train else "forward (no_grad)",
        },
        "ms": ms,
        "ratio_vs_dense": ratio,
        # minor page faults per call (median): fresh memory the kernel had to map and zero. On this 2-core machine
        # they are a large share of the time (glibc hands freed heap back and serves blocks over 32 MB by mmap), and
        # they depend on what ran before in the process: the main source of run-to-run spread in these ratios.
        "page_faults": {name: statistics.median(faults[name]) for name in COLUMNS},
        "target": case.target,
        "faster_than_transformers": faster_than_hf,
        "meets_target": meets,
        "auto_backend": "grouped_mm" if auto_grouped else "loop",
        "max_abs_diff_vs_hf": agreement,
        "repetitions": len(samples["dense"]),
        "samples_ms": {name: samples[name] for name in COLUMNS},
        "page_fault_samples": {name: faults[name] for name in COLUMNS},
    }


def run_processes(argv: list[str], processes: int, cases: list[Case]) -> list[dict]:
    """The bench in ``processes`` fresh interpreters, one after the other, their repetitions pooled per case.

    Why: on these 2-core machines one process's timings of our layer can sit in one of two modes for its whole life
    (at ``E64-top8`` ~1.2x or ~1.45x dense, with the same code and the dense MLP unchanged; its small elementwise
    passes and gathers take about twice as long in the slow mode), so one process is one draw. The pooled result
    takes the median over every repetition of every process; ``ratio_per_process`` keeps each process's own."""
    import subprocess
    import tempfile

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(processes):
            out = Path(tmp) / f"run{i}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--processes", "1", "--json", str(out)]
            print(f"[process {i + 1}/{processes}]", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            runs.append({c["case"]: c for c in json.loads(out.read_text())["cases"]})
    pooled = []
    for case in cases:
        parts = [run[case.name] for run in runs]
        samples = {name: [t for part in parts for t in part["samples_ms"][name]] for name in COLUMNS}
        faults = {name: [f for part in parts for f in part["page_fault_samples"][name]] for name in COLUMNS}
        auto_grouped = parts[0]["auto_backend"] == "grouped_mm"
        result = summarize(case, samples, faults, auto_grouped, parts[0]["max_abs_diff_vs_hf"])
        result["processes"] = processes
        result["ratio_per_process"] = {name: [part["ratio_vs_dense"][name] for part in parts] for name in COLUMNS}
        pooled.append(result)
    return pooled


def env_info(device: torch.device = CPU, dtype: torch.dtype = torch.float32) -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "lora_native_kernels": native.lora_kernels() is not None,  # C kernels for the LoRA experts (fp32 CPU)
    }


def print_table(results: list[dict]) -> None:
    cols = ["dense", "unimoe", "unimoe_loop", "unimoe_grouped_mm", "hf_eager", "hf_grouped_mm"]
    head = f"{'case':<18}" + "".join(f"{c:>19}" for c in cols) + f"{'target':>8}{'met':>6}"
    print(head)
    print("-" * len(head))
    for r in results:
        cells = "".join(f"{r['ms'][c]:>10.2f} ({r['ratio_vs_dense'][c]:>5.2f}x)" for c in cols)
        target = f"{r['target']:.2f}" if r["target"] is not None else "-"
        print(f"{r['case']:<18}{cells}{target:>8}{'yes' if r['meets_target'] else 'NO':>6}")
        if "ratio_per_process" in r:
            per = ", ".join(f"{v:.2f}x" for v in r["ratio_per_process"]["unimoe"])
            print(f"{'':<18}unimoe in each of {r['processes']} processes: {per}")
    print(
        "ms per call (median over repetitions), ratio vs dense in brackets (median of per-repetition ratios); "
        "'met' = within target and faster than both hf columns"
    )


def strip_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the given options and their values (``--name VALUE`` or ``--name=VALUE``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not arg.startswith(tuple(f"{n}=" for n in names)):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition (smoke test)")
    parser.add_argument("--cases", nargs="*", help="only these case names")
    parser.add_argument("--device", default="cpu", help="cpu (the targets are for it) or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=None, help="tokens of the training cases (a GPU wants more)")
    parser.add_argument(
        "--processes", type=int, default=1, help="run the bench in this many fresh processes and pool their repetitions"
    )
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(os.cpu_count() or 1)
    cases = quick_cases() if args.quick else full_cases()
    if args.tokens is not None:
        for case in cases:
            case.tokens = args.tokens if case.train else case.tokens
    if args.cases:
        unknown = sorted(set(args.cases) - {c.name for c in cases})
        if unknown:
            parser.error(f"--cases: unknown {unknown}; cases: {', '.join(c.name for c in cases)}")
        cases = [c for c in cases if c.name in args.cases]
    if args.processes > 1:
        child_argv = strip_options(list(argv if argv is not None else sys.argv[1:]), ("--json", "--processes"))
        results = run_processes(child_argv, args.processes, cases)
    else:
        results = []
        for case in cases:
            start = time.perf_counter()
            results.append(time_case(case, device, dtype))
            print(f"[{case.name}: {time.perf_counter() - start:.1f} s]", file=sys.stderr, flush=True)
    print_table(results)
    report = {"cases": results, "env": env_info(device, dtype)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
