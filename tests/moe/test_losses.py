"""Router losses and statistics, hand-computed."""

import math

import torch

from unimoe.moe import MoEConfig, Routing, SparseMoEBlock, load_balancing_loss, modality_routing_loss, router_z_loss
from unimoe.moe.losses import routing_stats


def make_routing(expert_index, probs, valid=None):
    expert_index = torch.tensor(expert_index)
    probs = torch.tensor(probs, dtype=torch.float32)
    valid = torch.ones_like(expert_index, dtype=torch.bool) if valid is None else torch.tensor(valid)
    return Routing(expert_index=expert_index, weight=valid.float(), valid=valid, probs=probs)


def test_load_balancing_loss_is_one_for_uniform_routing():
    routing = make_routing([[0], [1], [2], [3]], [[0.25] * 4] * 4)
    torch.testing.assert_close(load_balancing_loss(routing), torch.tensor(1.0))


def test_load_balancing_loss_hand_computed():
    # E=2, 2 tokens top-1 both to expert 0: f = (1, 0); P = mean((0.8, 0.2), (0.6, 0.4)) = (0.7, 0.3)
    routing = make_routing([[0], [0]], [[0.8, 0.2], [0.6, 0.4]])
    torch.testing.assert_close(load_balancing_loss(routing), torch.tensor(2 * 0.7))


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp = log 2, log 4
    expect = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expect))
    masked = router_z_loss(logits, torch.tensor([True, False]))
    torch.testing.assert_close(masked, torch.tensor(math.log(2.0) ** 2))


def test_modality_routing_loss_hand_computed():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    modality = torch.tensor([0, 1, 2])
    target = torch.tensor([[True, False, False], [False, True, True], [False, False, False]])  # modality 2: none
    expect = (-math.log(0.5) - math.log(0.9)) / 2
    torch.testing.assert_close(modality_routing_loss(probs, modality, target), torch.tensor(expect))


def test_padding_does_not_change_losses():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, modality_loss_coef=1.0, modality_experts={"text": [0], "image": [1, 2]})
    block = SparseMoEBlock(cfg, hidden_size=16, intermediate_size=32, modalities=["text", "image"])
    x = torch.randn(1, 6, 16)
    mods = torch.tensor([[0, 0, 1, 1, 0, 1]])
    ref = block(x, modality_ids=mods, output_stats=True)

    padded = torch.cat([x, 10 * torch.randn(1, 3, 16)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    pmods = torch.cat([mods, torch.tensor([[1, 0, 1]])], dim=1)
    out = block(padded, token_mask=mask, modality_ids=pmods, output_stats=True)

    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    torch.testing.assert_close(out.z_loss, ref.z_loss)
    torch.testing.assert_close(out.modality_loss, ref.modality_loss)
    torch.testing.assert_close(out.stats.load, ref.stats.load)
    torch.testing.assert_close(out.stats.entropy, ref.stats.entropy)
    torch.testing.assert_close(out.hidden_states[:, :6], ref.hidden_states)


def test_stats_load_modality_split_and_entropy():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, num_null_experts=1)
    block = SparseMoEBlock(cfg, hidden_size=16, intermediate_size=32, modalities=["text", "image", "audio"])
    x = torch.randn(2, 5, 16)
    mods = torch.randint(0, 3, (2, 5))
    stats = block(x, modality_ids=mods, output_stats=True).stats
    assert stats.load.shape == (5,)
    assert int(stats.load.sum()) == 2 * 5 * 2  # every selected slot, null slots included
    torch.testing.assert_close(stats.load_per_modality.sum(0), stats.load)
    for m in range(3):
        assert int(stats.load_per_modality[m].sum()) == 2 * int((mods == m).sum())
    torch.testing.assert_close(stats.null_share, stats.load[4] / stats.load.sum())


def test_stats_hand_computed():
    routing = make_routing([[0, 1], [1, 2]], [[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]], valid=[[True, True], [True, False]])
    stats = routing_stats(
        routing, num_experts=2, num_modalities=2, dropped=torch.tensor(0), modality_ids=torch.tensor([0, 1])
    )
    assert stats.load.tolist() == [1.0, 2.0, 0.0]
    assert stats.load_per_modality.tolist() == [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    entropy = (math.log(2.0) + (2 * 0.25 * math.log(4.0) + 0.5 * math.log(2.0))) / 2
    assert abs(float(stats.entropy) - entropy) < 1e-6
    assert float(stats.null_share) == 0.0
