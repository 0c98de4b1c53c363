"""Router losses and statistics, computed from the routing actually taken (not re-derived from logits).

Padding tokens (``token_mask`` False) are excluded everywhere, so padding never changes a loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unimoe.moe.routing import Routing


def _masked_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    if token_mask is None:
        return values.mean()
    mask = token_mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def load_balancing_loss(routing: Routing, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer balance loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the share of selected slots that went to expert ``e`` (null experts included), ``P_e`` the mean router
    probability of ``e`` over real tokens. Equals 1 for perfectly uniform routing.
    """
    num_total = routing.probs.shape[-1]
    selected = routing.valid  # (T, k)
    counts = torch.zeros(num_total, device=selected.device, dtype=torch.float32)
    counts.index_add_(0, routing.expert_index.reshape(-1), selected.reshape(-1).float())
    fraction = counts / counts.sum().clamp_min(1.0)  # (E,)
    if token_mask is None:
        mean_prob = routing.probs.mean(dim=0)
    else:
        mask = token_mask.float().unsqueeze(-1)
        mean_prob = (routing.probs * mask).sum(0) / mask.sum().clamp_min(1.0)  # (E,)
    return num_total * (fraction * mean_prob).sum()


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition function of the router logits."""
    z = torch.logsumexp(logits.float(), dim=-1) ** 2  # (T,)
    return _masked_mean(z, token_mask)


def modality_routing_loss(
    probs: torch.Tensor, modality_ids: torch.Tensor, target_mask: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Pull each modality's tokens toward the experts assigned to it: ``-log sum_{e in S_m} p_e``.

    ``target_mask`` is ``(M, E_total)`` bool, the assigned experts of each modality (an all-False row means the
    modality has no assignment and its tokens do not contribute).
    """
    allowed = target_mask[modality_ids]  # (T, E)
    has_target = allowed.any(dim=-1)
    if token_mask is not None:
        has_target = has_target & token_mask
    mass = (probs * allowed).sum(dim=-1).clamp_min(1e-9)  # (T,)
    per_token = -torch.log(mass)
    count = has_target.float().sum()
    return (per_token * has_target).sum() / count.clamp_min(1.0)


@dataclass
class RouterStats:
    """Per-layer routing statistics, all on-device tensors (reading them is the only host sync).

    ``load`` counts the slots each expert processed (null experts last); ``load_per_modality`` splits that by
    the token's modality id; ``dropped`` counts slots lost to the capacity limit; ``null_share`` is the share of
    selected slots that went to null experts; ``entropy`` is the mean router entropy per token (nats).
    """

    load: torch.Tensor  # (E_total,)
    load_per_modality: torch.Tensor  # (M, E_total)
    dropped: torch.Tensor  # ()
    null_share: torch.Tensor  # ()
    entropy: torch.Tensor  # ()
    num_tokens: torch.Tensor  # ()

    def to_dict(self) -> dict[str, list | float]:
        return {k: v.detach().cpu().tolist() for k, v in self.__dict__.items()}


def routing_stats(
    routing: Routing,
    *,
    num_experts: int,
    num_modalities: int,
    dropped: torch.Tensor,
    modality_ids: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
) -> RouterStats:
    with torch.no_grad():
        num_total = routing.probs.shape[-1]
        k = routing.expert_index.shape[1]
        used = routing.valid.reshape(-1).float()  # (T*k,)
        experts = routing.expert_index.reshape(-1)
        load = torch.zeros(num_total, device=used.device).index_add_(0, experts, used)
        if modality_ids is None:
            modality_ids = torch.zeros(routing.expert_index.shape[0], dtype=torch.long, device=used.device)
        slot_modality = modality_ids.reshape(-1, 1).expand(-1, k).reshape(-1)
        per_mod = torch.zeros(num_modalities * num_total, device=used.device)
        per_mod.index_add_(0, slot_modality * num_total + experts, used)
        null_share = load[num_experts:].sum() / load.sum().clamp_min(1.0)
        p = routing.probs
        entropy = _masked_mean(-(p * torch.log(p.clamp_min(1e-12))).sum(-1), token_mask)
        num_tokens = token_mask.sum() if token_mask is not None else torch.tensor(p.shape[0], device=p.device)
        return RouterStats(
            load=load,
            load_per_modality=per_mod.view(num_modalities, num_total),
            dropped=dropped.float(),
            null_share=null_share,
            entropy=entropy,
            num_tokens=num_tokens.float(),
        )
