"""Routing as pure functions of the router logits.

``route`` turns logits ``(T, E_total)`` into a :class:`Routing` of fixed width ``k_max``: the chosen expert of each
slot, its weight and whether the slot is used. Null experts are the indices ``>= num_experts``: they take part in
selection and in the balance loss but produce zero output and cost no compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unimoe.errors import ConfigError


@dataclass
class Routing:
    """The routing decision for ``T`` tokens with at most ``k`` experts each."""

    expert_index: torch.Tensor  # (T, k) long; values >= num_experts are null experts
    weight: torch.Tensor  # (T, k) float; 0 where the slot is not used
    valid: torch.Tensor  # (T, k) bool; the slot was selected (top-p may select fewer than k)
    probs: torch.Tensor  # (T, E_total) float32 softmax of the logits (for losses and statistics)

    def computed_mask(self, num_experts: int) -> torch.Tensor:
        """Slots that need expert compute: selected and not a null expert.  # (T, k)"""
        return self.valid & (self.expert_index < num_experts)


def route(
    logits: torch.Tensor,
    *,
    top_k: int,
    mode: str = "topk",
    top_p: float = 1.0,
    normalize: bool = True,
    selection_bias: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
) -> Routing:
    """Select experts for each token.

    Args:
        logits: ``(T, E_total)`` router logits (real experts first, then null experts).
        top_k: ``k_max``, the width of the result.
        mode: ``"topk"`` or ``"topp"`` (smallest prefix of the sorted experts whose cumulative probability
            reaches ``top_p``; at least 1 and at most ``top_k`` experts).
        normalize: renormalize the selected weights to sum to one per token.
        selection_bias: ``(E_total,)`` added to the probabilities for *selection only* (DeepSeek-V3's
            auxiliary-loss-free balancing); the weights stay the unbiased probabilities.
        token_mask: ``(T,)`` bool, False for padding: those tokens select nothing.
    """
    if mode not in ("topk", "topp"):
        raise ConfigError(f"routing: unknown mode {mode!r}; choose 'topk' or 'topp'")
    probs = logits.float().softmax(dim=-1)  # (T, E)
    scores = probs if selection_bias is None else probs + selection_bias.float()
    _, index = scores.topk(top_k, dim=-1, sorted=True)  # (T, k), best first
    weight = probs.gather(-1, index)  # (T, k)

    if mode == "topp" and top_p < 1.0:
        # Keep slot j if the probability mass *before* it is still below p: the first slot is always kept.
        mass_before = weight.cumsum(dim=-1) - weight
        valid = mass_before < top_p
    else:
        valid = torch.ones_like(index, dtype=torch.bool)
    if token_mask is not None:
        valid = valid & token_mask.view(-1, 1)

    weight = weight * valid
    if normalize:
        weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    return Routing(expert_index=index, weight=weight.to(logits.dtype), valid=valid, probs=probs)


def slot_position_in_expert(expert_index: torch.Tensor, mask: torch.Tensor, num_bins: int) -> torch.Tensor:
    """For each slot, how many earlier slots (token order) went to the same expert.  # (T, k) long

    Masked-out slots get a position too but it is meaningless. No host synchronisation.
    """
    flat = torch.where(mask, expert_index, num_bins).reshape(-1)  # (T*k,)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_bins + 1)
    starts = counts.cumsum(0) - counts  # first sorted position of each expert
    position = torch.empty_like(flat)
    position[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return position.view_as(expert_index)


def apply_capacity(
    routing: Routing, *, num_experts: int, capacity_factor: float | None
) -> tuple[Routing, torch.Tensor]:
    """Drop the slots that overflow an expert's capacity (earlier tokens win). Returns the new routing and the
    number of dropped slots (a 0-d tensor, no host sync). ``capacity_factor=None`` is dropless."""
    computed = routing.computed_mask(num_experts)
    if capacity_factor is None:
        return routing, computed.new_zeros((), dtype=torch.long)
    num_tokens = routing.expert_index.shape[0]
    capacity = max(1, math.ceil(capacity_factor * num_tokens * routing.expert_index.shape[1] / num_experts))
    position = slot_position_in_expert(routing.expert_index, computed, num_experts)
    keep = ~computed | (position < capacity)
    dropped = (computed & ~keep).sum()
    valid = routing.valid & keep
    return (
        Routing(
            expert_index=routing.expert_index,
            weight=routing.weight * keep,
            valid=valid,
            probs=routing.probs,
        ),
        dropped,
    )


def balancing_bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free update: raise the bias of under-loaded experts and lower the bias of
    over-loaded ones by a fixed step ``rate`` (sign of the deviation from the mean load)."""
    return bias + rate * torch.sign(load.float().mean() - load.float())
