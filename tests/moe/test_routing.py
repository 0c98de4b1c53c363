"""Routing as pure functions: top-k / top-p selection, capacity, the auxiliary-loss-free bias."""

import math

import pytest
import torch

from unimoe.moe import MoEConfig, SparseMoEBlock, apply_capacity, balancing_bias_update, route


def logits_from_probs(*rows):
    return torch.tensor(rows, dtype=torch.float32).log()


def test_topk_picks_largest_and_renormalizes():
    r = route(logits_from_probs([0.1, 0.5, 0.15, 0.25]), top_k=2)
    assert r.expert_index.tolist() == [[1, 3]]
    torch.testing.assert_close(r.weight, torch.tensor([[0.5 / 0.75, 0.25 / 0.75]]))
    assert r.valid.all()


def test_top_p_one_picks_k_max():
    logits = torch.randn(16, 6)
    r = route(logits, top_k=4, mode="topp", top_p=1.0)
    assert r.valid.sum(-1).tolist() == [4] * 16


def test_top_p_small_picks_exactly_one_when_top_prob_reaches_p():
    r = route(logits_from_probs([0.6, 0.2, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]), top_k=3, mode="topp", top_p=0.5)
    assert r.valid.sum(-1).tolist() == [1, 2]  # 0.6 >= 0.5 -> one; 0.3 < 0.5 -> two (0.3 + 0.3 >= 0.5)
    torch.testing.assert_close(r.weight[0], torch.tensor([1.0, 0.0, 0.0]))


def test_top_p_hand_computed():
    # sorted probs 0.5, 0.3, 0.15 (0.05 never reachable with k=3); p = 0.7:
    # mass before slot: 0, 0.5, 0.8 -> slots 0 and 1 kept; weights 0.5, 0.3 renormalized to 0.625, 0.375
    r = route(logits_from_probs([0.15, 0.5, 0.05, 0.3]), top_k=3, mode="topp", top_p=0.7)
    assert r.expert_index.tolist() == [[1, 3, 0]]
    assert r.valid.tolist() == [[True, True, False]]
    torch.testing.assert_close(r.weight, torch.tensor([[0.625, 0.375, 0.0]]))
    unnormalized = route(logits_from_probs([0.15, 0.5, 0.05, 0.3]), top_k=3, mode="topp", top_p=0.7, normalize=False)
    torch.testing.assert_close(unnormalized.weight, torch.tensor([[0.5, 0.3, 0.0]]))


def test_top_p_weights_sum_to_one():
    r = route(torch.randn(32, 8), top_k=4, mode="topp", top_p=0.6)
    torch.testing.assert_close(r.weight.sum(-1), torch.ones(32))
    assert (r.weight[~r.valid] == 0).all()
    assert (r.valid.sum(-1) >= 1).all()


def test_token_mask_selects_nothing_for_padding():
    r = route(torch.randn(4, 4), top_k=2, token_mask=torch.tensor([True, False, True, False]))
    assert r.valid.sum(-1).tolist() == [2, 0, 2, 0]
    assert (r.weight[1] == 0).all() and (r.weight[3] == 0).all()


def test_null_experts_are_not_computed():
    # expert 2 is a null expert (num_experts=2): it can be selected but needs no compute
    r = route(logits_from_probs([0.1, 0.2, 0.7]), top_k=2)
    assert r.expert_index.tolist() == [[2, 1]]
    assert r.computed_mask(num_experts=2).tolist() == [[False, True]]


# ------------------------------------------------------------------------------------------------ capacity
def test_capacity_drops_later_tokens():
    # 4 tokens, all prefer expert 0; capacity = ceil(0.5 * 4 * 1 / 2) = 1 -> tokens 1, 2, 3 dropped
    logits = logits_from_probs(*[[0.9, 0.1]] * 4)
    routing = route(logits, top_k=1)
    kept, dropped = apply_capacity(routing, num_experts=2, capacity_factor=0.5)
    assert int(dropped) == 3
    assert kept.valid[:, 0].tolist() == [True, False, False, False]
    assert kept.weight[1:].abs().sum() == 0


def test_dropless_by_default_and_stats_count_drops():
    assert MoEConfig().capacity_factor is None
    torch.manual_seed(0)
    x = torch.randn(1, 32, 16)
    for factor, expect_drops in ((None, False), (0.25, True)):
        cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=factor)
        block = SparseMoEBlock(cfg, hidden_size=16, intermediate_size=32, modalities=["text"])
        with torch.no_grad():
            block.router.weight.zero_()
            block.router.weight[0] = 1.0  # every token prefers expert 0 (and ties after it)
        out = block(x.abs(), output_stats=True)
        dropped = int(out.stats.dropped)
        assert (dropped > 0) == expect_drops
        if factor is not None:
            capacity = math.ceil(factor * 32 * 2 / 4)
            assert dropped == 32 * 2 - int(out.stats.load[:4].clamp(max=capacity).sum())


# ------------------------------------------------------------------------------------------------ aux-loss-free bias
def test_bias_update_rule_hand_computed():
    bias = torch.zeros(4)
    new = balancing_bias_update(bias, torch.tensor([4.0, 2.0, 1.0, 1.0]), rate=0.1)  # mean load 2
    torch.testing.assert_close(new, torch.tensor([-0.1, 0.0, 0.1, 0.1]))


def test_bias_changes_selection_but_not_weights():
    logits = logits_from_probs([0.5, 0.3, 0.2])
    plain = route(logits, top_k=1, normalize=False)
    biased = route(logits, top_k=1, normalize=False, selection_bias=torch.tensor([0.0, 0.0, 0.5]))
    assert plain.expert_index.tolist() == [[0]]
    assert biased.expert_index.tolist() == [[2]]
    torch.testing.assert_close(biased.weight, torch.tensor([[0.2]]))  # the unbiased probability
    torch.testing.assert_close(biased.probs, plain.probs)


def test_layer_bias_update_moves_toward_underloaded_experts():
    cfg = MoEConfig(num_experts=4, top_k=1, router_bias_update_rate=0.05)
    block = SparseMoEBlock(cfg, hidden_size=8, intermediate_size=16, modalities=["text"])
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[0, 0] = 10.0  # expert 0 takes every token with a positive first feature
    x = torch.randn(1, 64, 8)
    x[..., 0] = x[..., 0].abs() + 0.1
    block.train()
    block(x)
    block.update_router_bias()
    bias = block.router_bias
    assert bias[0] == pytest.approx(-0.05)
    assert all(b == pytest.approx(0.05) for b in bias[1:].tolist())
    assert block._load_since_update.sum() == 0


def test_bias_update_uses_the_load_summed_over_processes():
    """In multi-process training every process passes ``reduce`` (an all-reduce sum): the update follows the global
    batch's load, so all processes apply the same one. Here the "other process" routed its tokens elsewhere."""
    cfg = MoEConfig(num_experts=4, top_k=1, router_bias_update_rate=0.05)
    block = SparseMoEBlock(cfg, hidden_size=8, intermediate_size=16, modalities=["text"])
    with torch.no_grad():
        block._load_since_update.copy_(torch.tensor([3.0, 1.0, 0.0, 0.0]))  # this process: expert 0 overloaded
    other = torch.tensor([0.0, 1.0, 6.0, 0.0])  # the other process: expert 2 overloaded
    seen = []

    def reduce(load):
        seen.append(load.clone())
        return load + other

    block.update_router_bias(reduce)
    assert seen[0].tolist() == [3.0, 1.0, 0.0, 0.0]
    # global load [3, 2, 6, 0], mean 2.75: experts 0 and 2 above it, 1 and 3 below
    assert block.router_bias.tolist() == pytest.approx([-0.05, 0.05, -0.05, 0.05])
    assert block._load_since_update.sum() == 0
    local = SparseMoEBlock(cfg, hidden_size=8, intermediate_size=16, modalities=["text"])
    with torch.no_grad():
        local._load_since_update.copy_(torch.tensor([3.0, 1.0, 0.0, 0.0]))
    local.update_router_bias()  # one process's own load gives another update
    assert local.router_bias.tolist() == pytest.approx([-0.05, 0.0, 0.05, 0.05])  # mean 1: expert 1 at it
