"""The whole block: null experts, configuration errors, every expert type, and the benchmark's smoke mode."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from unimoe.errors import ConfigError
from unimoe.moe import EXPERTS, MoEConfig, SparseMoEBlock

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("expert_type", ["ffn", "lora"])
@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm"])
def test_null_experts_give_zero_output_and_cost_no_flops(expert_type, dispatch):
    hidden, tokens = 16, 10
    cfg = MoEConfig(
        num_experts=4,
        num_null_experts=1,
        top_k=1,
        expert_type=expert_type,
        dispatch=dispatch,
        router_bias_update_rate=0.01,  # turns on the selection bias
    )
    block = SparseMoEBlock(cfg, hidden_size=hidden, intermediate_size=32, modalities=["text"])
    with torch.no_grad():
        block.router_bias[4] = 10.0  # every token selects the null expert
    x = torch.randn(1, tokens, hidden)
    with FlopCounterMode(display=False) as counter:
        out = block(x, output_stats=True)
    router_flops = 2 * tokens * hidden * cfg.num_total_experts
    if expert_type == "ffn":
        assert counter.get_total_flops() == router_flops  # only the router matmul
        assert (out.hidden_states == 0).all()
    else:
        # LoRA experts: a null expert adds no delta, so the output is the frozen FFN and no LoRA product runs
        frozen = 2 * tokens * hidden * 32 * 3
        assert counter.get_total_flops() == router_flops + frozen
    assert out.stats.load.tolist() == [0, 0, 0, 0, tokens]
    assert float(out.stats.null_share) == 1.0
    assert out.aux_loss > 0  # the null expert is counted in the balance loss


def test_null_experts_are_counted_in_balance_loss():
    cfg = MoEConfig(num_experts=2, num_null_experts=2, top_k=1, router_bias_update_rate=0.01)
    block = SparseMoEBlock(cfg, hidden_size=8, intermediate_size=8, modalities=["text"])
    with torch.no_grad():
        block.router.weight.zero_()  # uniform probabilities: P_e = 1/4
        block.router_bias[3] = 1.0  # all slots to null expert 3: f = (0, 0, 0, 1)
    out = block(torch.randn(1, 6, 8))
    torch.testing.assert_close(out.aux_loss, torch.tensor(4 * 0.25))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"expert_type": "nope"}, "expert_type"),
        ({"routing": "sinkhorn"}, "routing"),
        ({"num_experts": 4, "modality_experts": {"image": [4]}}, "modality_experts"),
        ({"num_experts": 4, "modality_experts": {"image": []}}, "modality_experts"),
        ({"dispatch": "triton"}, "dispatch"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_impossible_configs_raise_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"moe.{field}"):
        MoEConfig(**kwargs)


def test_unknown_config_key_raises():
    with pytest.raises(ConfigError, match="bogus"):
        MoEConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize("expert_type", EXPERTS.names())
def test_forward_backward_every_expert_type(expert_type):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_type=expert_type, num_shared_experts=1, shared_expert_gate=True)
    block = SparseMoEBlock(cfg, hidden_size=16, intermediate_size=32, modalities=["text"])
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = block(x)
    assert out.hidden_states.shape == x.shape
    (out.hidden_states.pow(2).sum() + out.aux_loss + out.z_loss).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    trainable = [(n, p) for n, p in block.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert block.router.weight.grad.abs().sum() > 0


def test_bench_quick_writes_json(tmp_path):
    """The quick bench in two fresh processes: the table, and the JSON pooling both processes' repetitions."""
    out = tmp_path / "moe.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "moe_layer.py"), "--quick", "--processes", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"torch", "threads", "cpu"} <= set(report["env"])
    names = [c["case"] for c in report["cases"]]
    assert names == ["E8-top2", "E64-top8", "lora-E8-r16-top2", "decode-E8"]
    for case in report["cases"]:
        assert {"case", "ms", "ratio_vs_dense", "target", "meets_target"} <= set(case)
        assert {"dense", "unimoe", "unimoe_loop", "unimoe_grouped_mm", "hf_eager", "hf_grouped_mm"} <= set(case["ms"])
        assert all(v > 0 for v in case["ms"].values())
        assert case["ratio_vs_dense"]["dense"] == pytest.approx(1.0)
        assert isinstance(case["meets_target"], bool)
        assert case["processes"] == 2 and case["repetitions"] == 2  # one repetition per process, pooled
        assert len(case["samples_ms"]["unimoe"]) == 2 and len(case["ratio_per_process"]["unimoe"]) == 2
        pooled = sorted(a / b for a, b in zip(case["samples_ms"]["unimoe"], case["samples_ms"]["dense"]))
        assert case["ratio_vs_dense"]["unimoe"] == pytest.approx(sum(pooled) / 2)  # median of two
        assert sorted(case["ratio_per_process"]["unimoe"]) == pytest.approx(pooled)
    assert "E8-top2" in proc.stdout and "processes" in proc.stdout  # the table, with each process's ratio


def test_bench_strip_options():
    sys.path.insert(0, str(ROOT / "bench"))
    from moe_layer import strip_options

    argv = ["--quick", "--json", "a.json", "--processes=3", "--cases", "E8-top2"]
    assert strip_options(argv, ("--json", "--processes")) == ["--quick", "--cases", "E8-top2"]


# -- fine-grained expert groups: forced groups and the routed scaling factor -------------------------------------------


def wide_ffn_from_group(block: SparseMoEBlock, group: list[int]):
    """The one SwiGLU whose hidden units are those of ``group``'s experts side by side."""
    from unimoe.moe import SwiGLU

    experts, width = block.experts, block.experts.down_proj.shape[-1]
    dense = SwiGLU(experts.down_proj.shape[1], width * len(group))
    with torch.no_grad():
        dense.gate_proj.weight.copy_(torch.cat([experts.gate_up_proj[e, :width] for e in group]))
        dense.up_proj.weight.copy_(torch.cat([experts.gate_up_proj[e, width:] for e in group]))
        dense.down_proj.weight.copy_(torch.cat([experts.down_proj[e] for e in group], dim=1))
    return dense


@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm"])
def test_a_forced_group_of_fine_grained_experts_equals_one_wide_ffn(dispatch):
    """Two experts of width 12, each at weight 1, compute the SwiGLU of width 24 made of their hidden units: the
    align stage of a fine-grained MoE trains exactly a dense FFN of the active width."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=6, top_k=2, expert_intermediate_size=12, dispatch=dispatch)
    block = SparseMoEBlock(cfg, hidden_size=16, intermediate_size=12, modalities=["text"])
    x = torch.randn(2, 5, 16)
    forced = torch.tensor([2, 5]).expand(2, 5, 2)
    out = block(x, forced_experts=forced, output_stats=True)
    torch.testing.assert_close(out.hidden_states, wide_ffn_from_group(block, [2, 5])(x))
    assert out.stats.load.tolist() == [0, 0, 10, 0, 0, 10]  # slots per expert: all 10 tokens in each
    # one expert per token (B, S) is the group of one
    one = block(x, forced_experts=torch.full((2, 5), 3)).hidden_states
    torch.testing.assert_close(one, wide_ffn_from_group(block, [3])(x))


def test_forced_experts_skip_the_router_and_its_jitter():
    """Forced routing never reads the router: it is not run, and (in training, with jitter) draws no noise."""
    cfg = MoEConfig(num_experts=4, top_k=2, router_jitter=0.1)
    block = SparseMoEBlock(cfg, hidden_size=16, intermediate_size=12, modalities=["text"]).train()
    calls = []
    block.router.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 5, 16)
    torch.manual_seed(0)
    block(x, forced_experts=torch.zeros(2, 5, dtype=torch.long))
    after_forced = torch.rand(1)
    torch.manual_seed(0)
    expected = torch.rand(1)
    assert calls == [] and torch.equal(after_forced, expected)
    block(x)
    assert calls == [1]


def test_routed_scaling_factor_multiplies_the_routed_output():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    outs = []
    for factor in (1.0, 2.0):
        torch.manual_seed(1)
        cfg = MoEConfig(num_experts=6, top_k=2, expert_intermediate_size=12, routed_scaling_factor=factor)
        assert cfg.weights_sum_to_one is (factor == 1.0)
        block = SparseMoEBlock(cfg, hidden_size=16, intermediate_size=12, modalities=["text"])
        outs.append(block(x).hidden_states)
    torch.testing.assert_close(outs[1], 2 * outs[0])
    with pytest.raises(ConfigError, match="moe.routed_scaling_factor"):
        MoEConfig(routed_scaling_factor=0.0)
