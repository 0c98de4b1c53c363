"""Expert families against naive references, and the dispatch backends against each other."""

import pytest
import torch
import torch.nn.functional as F

from unimoe.moe import LoRAExperts, MoEConfig, SparseMoEBlock, SwiGLU, SwiGLUExperts, make_plan
from unimoe.moe import layer as layer_module

BACKENDS = ["loop", "grouped_mm"]


def swiglu(x, w_gate_up, w_down):
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down)


def random_routing(num_tokens, num_experts, top_k, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    index = scores.topk(top_k, dim=-1).indices
    weight = torch.rand(num_tokens, top_k, generator=g) + 0.1
    weight = weight / weight.sum(-1, keepdim=True)
    return index, weight


@pytest.mark.parametrize("dispatch", BACKENDS)
def test_one_expert_top1_equals_dense_mlp(dispatch):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=1, top_k=1, dispatch=dispatch, expert_intermediate_size=24)
    block = SparseMoEBlock(cfg, hidden_size=16, intermediate_size=24, modalities=["text"])
    dense = SwiGLU(16, 24)
    with torch.no_grad():
        dense.gate_proj.weight.copy_(block.experts.gate_up_proj[0, :24])
        dense.up_proj.weight.copy_(block.experts.gate_up_proj[0, 24:])
        dense.down_proj.weight.copy_(block.experts.down_proj[0])
    x = torch.randn(2, 7, 16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(2, 7, 16)
    out = block(x1).hidden_states
    ref = dense(x2)
    torch.testing.assert_close(out, ref)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    gate_up_grad = block.experts.gate_up_proj.grad[0]
    torch.testing.assert_close(gate_up_grad, torch.cat([dense.gate_proj.weight.grad, dense.up_proj.weight.grad]))
    torch.testing.assert_close(block.experts.down_proj.grad[0], dense.down_proj.weight.grad)
    assert block.router.weight.grad is not None  # the (constant 1) weight still carries a gradient path


@pytest.mark.parametrize("width", [8, 20])  # narrower and wider than hidden (the routing weight moves)
@pytest.mark.parametrize("dispatch", BACKENDS)
def test_ffn_experts_equal_naive_per_token_loop(dispatch, width):
    torch.manual_seed(0)
    experts = SwiGLUExperts(num_experts=5, hidden_size=12, intermediate_size=width, dispatch=dispatch)
    x = torch.randn(9, 12)
    index, weight = random_routing(9, 5, 2)
    computed = torch.ones_like(index, dtype=torch.bool)
    computed[3, 1] = False  # e.g. a dropped slot: contributes nothing
    out = experts(x, make_plan(index, weight, computed, 5))
    ref = torch.zeros_like(x)
    with torch.no_grad():
        for t in range(9):
            for j in range(2):
                if computed[t, j]:
                    e = index[t, j]
                    ref[t] += weight[t, j] * swiglu(x[t], experts.gate_up_proj[e], experts.down_proj[e])
    torch.testing.assert_close(out, ref)


def lora_expert_weights(experts, e):
    s, r = experts.scaling, experts.rank
    a_gu = experts.lora_A_gate_up[e]
    delta_gate_up = torch.cat([experts.lora_B_gate[e] @ a_gu[:r], experts.lora_B_up[e] @ a_gu[r:]])
    w_gate_up = experts.gate_up_proj + s * delta_gate_up
    w_down = experts.down_proj + s * experts.lora_B_down[e] @ experts.lora_A_down[e]
    return w_gate_up, w_down


@pytest.mark.parametrize("sum_to_one", [False, True], ids=["any-weights", "weights-sum-to-one"])
@pytest.mark.parametrize("dispatch", BACKENDS)
def test_lora_zero_b_equals_frozen_ffn(dispatch, sum_to_one):
    torch.manual_seed(0)
    experts = LoRAExperts(num_experts=4, hidden_size=12, intermediate_size=20, lora_rank=3, dispatch=dispatch)
    x = torch.randn(10, 12)
    index, weight = random_routing(10, 4, 2)
    if not sum_to_one:
        weight = weight * torch.linspace(0.1, 1.0, 10).unsqueeze(-1)  # whatever the weights
    computed = torch.ones_like(index, dtype=torch.bool)
    out = experts(x, make_plan(index, weight, computed, 4, weights_sum_to_one=sum_to_one))
    ref = swiglu(x, experts.gate_up_proj, experts.down_proj)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def test_lora_weights_sum_to_one_skips_only_a_zero_term(monkeypatch):
    """With renormalized routing the block promises weights that sum to one, and LoRA experts drop the frozen FFN's
    ``(1 - sum w)`` term. Output and every gradient (the router's included: a per-token constant added to the
    weights' gradient vanishes through the normalization) match the general formula."""
    import unimoe.moe.layer as layer

    results = []
    for promise in (True, False):
        if not promise:  # the same block, but its plans never make the promise
            original = layer.make_plan

            def never_promise(*args, original=original, **kwargs):
                return original(*args, **{**kwargs, "weights_sum_to_one": False})

            monkeypatch.setattr(layer, "make_plan", never_promise)
        results.append(run_block("lora", "loop"))
    (out_a, x_grad_a, grads_a), (out_b, x_grad_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_grad_a, x_grad_b, rtol=1e-5, atol=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("with_keep", [False, True], ids=["weights-sum-to-one", "keep-term"])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen-ffn", "trained-ffn"])
def test_fused_lora_expert_loop_backward_matches_autograd(with_keep, train_base, lora_loop_reference):
    """The hand-written backward of the LoRA-expert loop (float64 gradcheck): with and without the frozen FFN's
    ``keep`` term, with the dense FFN frozen or trained, an expert without tokens included; and its output against
    the formula written with plain tensor ops."""
    from unimoe.moe.experts import _LoRAExpertLoop

    g = torch.Generator().manual_seed(0)
    t, h, i, r, e, s = 7, 6, 5, 2, 3, 0.7

    def make(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=grad)

    token_index = torch.tensor([0, 2, 3, 5, 1, 2, 4, 6, 0])  # sorted by expert: 4 slots, 0 slots, 5 slots
    counts = [4, 0, 5]
    x = make(t, h)
    w_gu, w_d = make(2 * i, h, grad=train_base), make(h, i, grad=train_base)
    lora = (make(e, 2 * r, h), make(e, i, r), make(e, i, r), make(e, r, i), make(e, h, r))
    weight = torch.rand(9, generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(t, generator=g, dtype=torch.float64, requires_grad=True) if with_keep else None

    def fused(x, w_gu, w_d, a_gu, b_g, b_u, a_d, b_d, weight, keep):
        return _LoRAExpertLoop.apply(x, w_gu, w_d, a_gu, b_g, b_u, a_d, b_d, weight, keep, token_index, counts, s)

    inputs = (x, w_gu, w_d, *lora, weight, keep)
    assert torch.autograd.gradcheck(fused, inputs)

    torch.testing.assert_close(fused(*inputs), lora_loop_reference(*inputs, token_index, counts, s))


@pytest.mark.parametrize("width", [4, 10])  # the expert FFN narrower / wider than hidden
def test_fused_ffn_expert_loop_backward_matches_autograd(width):
    """The hand-written backward of the SwiGLU expert loop (float64 gradcheck), an expert without tokens included."""
    from unimoe.moe.experts import GradBuffers, _SwiGLUExpertLoop

    g = torch.Generator().manual_seed(0)
    t, h, e = 7, 6, 3
    x = torch.randn(t, h, generator=g, dtype=torch.float64, requires_grad=True)
    gate_up = torch.randn(e, 2 * width, h, generator=g, dtype=torch.float64, requires_grad=True)
    down = torch.randn(e, h, width, generator=g, dtype=torch.float64, requires_grad=True)
    token_index = torch.tensor([0, 2, 3, 5, 1, 2, 4, 6, 0])  # sorted by expert: 4 slots, 0 slots, 5 slots
    counts = [4, 0, 5]
    weight = torch.rand(9, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: _SwiGLUExpertLoop.apply(*a, token_index, counts, GradBuffers()), (x, gate_up, down, weight)
    )


def test_expert_weight_gradients_reuse_their_buffer_and_never_overwrite_a_kept_one():
    """The SwiGLU loop's weight gradients land on kept storages: the same memory step after step once ``.grad`` is
    dropped, a fresh buffer while somebody still holds the last gradient (kept intact), and accumulation without
    ``zero_grad`` still sums."""
    import copy

    from unimoe.moe.experts import SwiGLUExperts

    torch.manual_seed(0)
    experts = SwiGLUExperts(num_experts=4, hidden_size=8, intermediate_size=6, dispatch="loop")
    x = torch.randn(10, 8)
    index, weight = random_routing(10, 4, 2)
    plan = make_plan(index, weight, torch.ones_like(index, dtype=torch.bool), 4)

    def backward():
        experts(x, plan).square().sum().backward()
        return experts.gate_up_proj.grad, experts.down_proj.grad

    first = [g.clone() for g in backward()]
    pointers = [g.data_ptr() for g in (experts.gate_up_proj.grad, experts.down_proj.grad)]
    experts.zero_grad()  # set_to_none: the storages are free again
    again = backward()
    assert [g.data_ptr() for g in again] == pointers
    for a, b in zip(again, first):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    kept = experts.gate_up_proj.grad  # somebody holds the gradient past zero_grad
    experts.zero_grad()
    backward()
    assert experts.gate_up_proj.grad.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept, first[0], rtol=0, atol=0)

    experts.zero_grad()
    del kept
    backward()
    summed = backward()  # accumulation: the second gradient is added to the first
    torch.testing.assert_close(summed[0], 2 * first[0])
    torch.testing.assert_close(summed[1], 2 * first[1])
    assert not copy.deepcopy(experts).grad_buffers._storages  # copies start without buffers


@pytest.mark.parametrize("rows", [3, 200])  # the transposed product for few rows, F.linear otherwise
def test_few_rows_linear_equals_linear(rows):
    from unimoe.moe.experts import few_rows_linear

    x, w = torch.randn(rows, 32), torch.randn(96, 32)
    out = few_rows_linear(x, w)
    torch.testing.assert_close(out, F.linear(x, w))
    assert few_rows_linear(x, w, contiguous=True).is_contiguous()


@pytest.mark.parametrize("dispatch", BACKENDS)
def test_lora_experts_equal_sum_of_merged_ffns(dispatch):
    torch.manual_seed(0)
    experts = LoRAExperts(num_experts=4, hidden_size=12, intermediate_size=20, lora_rank=3, dispatch=dispatch)
    with torch.no_grad():
        for name in ("lora_B_gate", "lora_B_up", "lora_B_down"):
            getattr(experts, name).normal_(std=0.5)
    x = torch.randn(10, 12)
    index, weight = random_routing(10, 4, 2)  # weights sum to 1, no null experts
    out = experts(x, make_plan(index, weight, torch.ones_like(index, dtype=torch.bool), 4))
    ref = torch.zeros_like(x)
    with torch.no_grad():
        for t in range(10):
            for j in range(2):
                w_gate_up, w_down = lora_expert_weights(experts, index[t, j])
                ref[t] += weight[t, j] * swiglu(x[t], w_gate_up, w_down)
    assert not torch.allclose(ref, swiglu(x, experts.gate_up_proj, experts.down_proj), atol=1e-3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def run_block(expert_type, dispatch, seed=0, padded=False, **kw):
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=5, top_k=3, expert_type=expert_type, dispatch=dispatch, **{"lora_rank": 4, **kw})
    block = SparseMoEBlock(cfg, hidden_size=16, intermediate_size=24, modalities=["text"])
    if expert_type == "lora":
        with torch.no_grad():
            for name in ("lora_B_gate", "lora_B_up", "lora_B_down"):
                getattr(block.experts, name).normal_(std=0.3)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, 8, 16, generator=g, requires_grad=True)
    token_mask = None
    if padded:  # the last tokens of two rows are padding
        token_mask = torch.ones(3, 8, dtype=torch.bool)
        token_mask[0, 5:] = token_mask[2, 7:] = False
    out = block(x, token_mask=token_mask)
    loss = (out.hidden_states * torch.randn(3, 8, 16, generator=g)).sum() + out.aux_loss + out.z_loss
    loss.backward()
    grads = {n: p.grad for n, p in block.named_parameters() if p.requires_grad}
    return out.hidden_states.detach(), x.grad, grads


@pytest.mark.parametrize("expert_type", ["ffn", "lora"])
@pytest.mark.parametrize(
    "extra",
    [{}, {"num_null_experts": 2}, {"routing": "topp", "top_p": 0.5}, {"capacity_factor": 0.5}, {"hidden_act": "gelu"}],
    ids=["topk", "null", "topp", "capacity", "gelu"],  # gelu: the loop's autograd path (SiLU has its own backward)
)
def test_dispatch_backends_agree(expert_type, extra):
    out_a, gx_a, grads_a = run_block(expert_type, "loop", **extra)
    out_b, gx_b, grads_b = run_block(expert_type, "grouped_mm", **extra)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_a, gx_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name] is not None, name
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dispatch", BACKENDS)
def test_experts_with_no_routed_tokens(dispatch):
    experts = SwiGLUExperts(num_experts=3, hidden_size=8, intermediate_size=8, dispatch=dispatch)
    x = torch.randn(4, 8, requires_grad=True)
    index = torch.zeros(4, 1, dtype=torch.long)
    plan = make_plan(index, torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.bool), 3)  # nothing computed
    out = experts(x, plan)
    assert out.shape == (4, 8) and (out == 0).all()


@pytest.mark.parametrize("expert_type", ["ffn", "lora"])
@pytest.mark.parametrize(
    "extra",
    [{}, {"padded": True}, {"num_null_experts": 2}, {"routing": "topp", "top_p": 0.5}, {"capacity_factor": 0.5},
     {"lora_rank": 3, "padded": True}],
    ids=["topk", "padded", "null", "topp", "capacity", "unaligned-rank"],  # rank 3 in fp32: grouped_mm's fallback
)  # fmt: skip
def test_sync_free_plans_match_trimmed_plans(expert_type, extra, monkeypatch):
    """The GPU's sync-free plan (every slot kept, uncomputed ones masked) gives what the trimmed plan gives."""
    ref = run_block(expert_type, "grouped_mm", **extra)
    monkeypatch.setattr(SparseMoEBlock, "_sync_free", lambda self, x: True)
    plans = []
    original = layer_module.make_plan
    monkeypatch.setattr(layer_module, "make_plan", lambda *a, **k: plans.append(original(*a, **k)) or plans[-1])
    got = run_block(expert_type, "grouped_mm", **extra)
    assert plans and all(p.counts is None for p in plans)
    assert (plans[0].row_mask is None) == (extra == {})  # top-k with nothing padded: every slot computed
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-4, atol=1e-5, msg=name)


def test_sync_free_plan_masks_padding_and_keeps_every_slot():
    index = torch.tensor([[0, 1], [1, 2], [2, 0]])
    computed = torch.tensor([[True, True], [False, False], [True, False]])  # token 1 padded, one dropped slot
    weight = torch.full((3, 2), 0.5)
    plan = make_plan(index, weight, computed, 3, sync_free=True)
    assert plan.token_index.numel() == 6 and plan.offsets.tolist() == [1, 2, 3]
    assert plan.row_mask.squeeze(-1).tolist() == [True, True, True, False, False, False]
    assert plan.weight[3:].tolist() == [0, 0, 0]  # the uncomputed slots weigh nothing
    assert plan.host_counts() == [1, 1, 1, 3]
    with pytest.raises(ValueError, match="trimmed plan"):
        plan.token_chunks()
    x = torch.randn(3, 8, requires_grad=True)
    experts = SwiGLUExperts(num_experts=3, hidden_size=8, intermediate_size=16, dispatch="grouped_mm")
    trimmed = make_plan(index, weight, computed, 3)
    out = experts(x, plan)
    torch.testing.assert_close(out, experts(x, trimmed))
    assert (out[1] == 0).all()
