"""The sparse MoE block that replaces a decoder layer's FFN."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from unimoe.moe.config import MoEConfig
from unimoe.moe.dispatch import make_plan, use_grouped_mm
from unimoe.moe.experts import EXPERTS, SwiGLU
from unimoe.moe.losses import (
    RouterStats,
    load_balancing_loss,
    modality_routing_loss,
    router_z_loss,
    routing_stats,
)
from unimoe.moe.routing import Routing, apply_capacity, balancing_bias_update, route


@dataclass
class MoEOutput:
    hidden_states: torch.Tensor  # (B, S, H)
    aux_loss: torch.Tensor  # ()
    z_loss: torch.Tensor  # ()
    modality_loss: torch.Tensor  # ()
    stats: RouterStats | None = None


class SparseMoEBlock(nn.Module):
    """Router + routed experts (+ optional shared experts).

    Args:
        config: the model's :class:`MoEConfig`.
        hidden_size, intermediate_size: the decoder's sizes (``moe.expert_intermediate_size`` overrides the latter
            for ``ffn`` experts; ``lora`` experts always wrap an FFN of the decoder's size).
        modalities: the modality names in id order (``modalities[0]`` is text); used for the per-modality
            statistics and the modality-routing loss.
    """

    def __init__(self, config: MoEConfig, *, hidden_size: int, intermediate_size: int, modalities: list[str]):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.num_modalities = len(modalities)
        self.router = nn.Linear(hidden_size, config.num_total_experts, bias=False)
        # Auxiliary-loss-free balancing bias (DeepSeek-V3); used for selection only, updated outside autograd.
        self.register_buffer("router_bias", torch.zeros(config.num_total_experts))
        self.register_buffer("_load_since_update", torch.zeros(config.num_total_experts), persistent=False)

        expert_size = intermediate_size
        if config.expert_type == "ffn" and config.expert_intermediate_size is not None:
            expert_size = config.expert_intermediate_size
        self.experts = EXPERTS.get(config.expert_type, field="moe.expert_type")(
            num_experts=config.num_experts,
            hidden_size=hidden_size,
            intermediate_size=expert_size,
            hidden_act=config.hidden_act,
            lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha,
            dispatch=config.dispatch,
        )

        self.shared_experts = None
        self.shared_expert_gate = None
        if config.num_shared_experts > 0:
            # S shared experts are one SwiGLU of S times the width (DeepSeekMoE's fused shared experts).
            shared_size = config.shared_expert_intermediate_size or expert_size
            self.shared_experts = SwiGLU(hidden_size, shared_size * config.num_shared_experts, config.hidden_act)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

        self.modalities = list(modalities)
        # Not saved: a reload rebuilds it from the config (UniMoEPreTrainedModel._init_weights)
        target = torch.zeros(self.num_modalities, config.num_total_experts, dtype=torch.bool)
        self.register_buffer("modality_target", target, persistent=False)
        self.stats_sink: list[RouterStats] | None = None
        self.set_config(config)  # fills modality_target and _has_modality_targets

    def set_config(self, config: MoEConfig) -> None:
        """Swap in another validated config of the same shape (a stage's loss coefficients, jitter, modality
        experts); the modality-routing targets follow it."""
        self.config = config
        self.modality_target.copy_(self.modality_target_from_config())
        self._has_modality_targets = any(name in self.modalities for name in config.modality_experts)

    def modality_target_from_config(self) -> torch.Tensor:
        """``(M, E_total)`` bool: the experts ``moe.modality_experts`` assigns to each modality."""
        target = torch.zeros(self.num_modalities, self.config.num_total_experts, dtype=torch.bool)
        for name, experts in self.config.modality_experts.items():
            if name in self.modalities:
                target[self.modalities.index(name), experts] = True
        return target

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        token_mask: torch.Tensor | None = None,
        modality_ids: torch.Tensor | None = None,
        output_stats: bool = False,
        compute_losses: bool = True,
        forced_experts: torch.Tensor | None = None,
    ) -> MoEOutput:
        """``hidden_states (B, S, H)``; ``token_mask (B, S)`` bool (False = padding); ``modality_ids (B, S)``.

        ``forced_experts (B, S)`` or ``(B, S, G)``: route every token to that expert (those ``G`` experts), each with
        weight 1 (the recipe's align stage warms up expert 0 this way, and its specialize stage trains one expert, or
        one group of fine-grained experts, per modality); the router and its losses are bypassed.

        ``compute_losses=False`` returns zero losses (inference). When ``stats_sink`` is a list, every call appends
        its :class:`RouterStats` to it (used by the evaluation harness and the demo to collect expert load)."""
        cfg = self.config
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)  # (T, H)
        mask = token_mask.reshape(-1).bool() if token_mask is not None else None  # (T,)
        mods = modality_ids.reshape(-1) if modality_ids is not None else None  # (T,)

        if forced_experts is not None:  # the router is not run: its output would be unused
            forced = forced_experts.reshape(batch * seq, -1)  # (T, G)
            return self._forward_forced(x, forced, mask, mods, output_stats, (batch, seq, hidden))
        router_in = x
        if self.training and cfg.router_jitter > 0:
            router_in = x * torch.empty_like(x).uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
        logits = self.router(router_in)  # (T, E_total)

        use_bias = cfg.router_bias_update_rate > 0
        routing = route(
            logits,
            top_k=cfg.top_k,
            mode=cfg.routing,
            top_p=cfg.top_p,
            normalize=cfg.norm_topk_prob,
            selection_bias=self.router_bias if use_bias else None,
            token_mask=mask,
        )
        if cfg.routed_scaling_factor != 1.0:
            routing = dataclasses.replace(routing, weight=routing.weight * cfg.routed_scaling_factor)
        zero = logits.new_zeros((), dtype=torch.float32)
        aux_loss = z_loss = modality_loss = zero
        if compute_losses:  # skipped in inference (decoding is bound by weight reads; every kernel counts)
            aux_loss = load_balancing_loss(routing, mask)
            z_loss = router_z_loss(logits, mask)
            if cfg.modality_loss_coef > 0 and mods is not None and self._has_modality_targets:
                modality_loss = modality_routing_loss(routing.probs, mods, self.modality_target, mask)

        routing, dropped = apply_capacity(routing, num_experts=self.num_experts, capacity_factor=cfg.capacity_factor)
        every_slot = (mask is None and cfg.num_null_experts == 0 and cfg.capacity_factor is None
                      and (cfg.routing == "topk" or cfg.top_p >= 1.0))  # fmt: skip
        plan = make_plan(
            routing.expert_index,
            routing.weight,
            routing.computed_mask(self.num_experts),
            self.num_experts,
            weights_sum_to_one=cfg.weights_sum_to_one,
            sync_free=self._sync_free(x),
            all_computed=every_slot,
        )
        out = self.experts(x, plan)  # (T, H)

        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared

        stats = None
        if output_stats or (self.training and use_bias) or self.stats_sink is not None:
            stats = routing_stats(
                routing,
                num_experts=self.num_experts,
                num_modalities=self.num_modalities,
                dropped=dropped,
                modality_ids=mods,
                token_mask=mask,
            )
            if self.training and use_bias:
                self._load_since_update += stats.load
            if self.stats_sink is not None:
                self.stats_sink.append(stats)
        return MoEOutput(
            hidden_states=out.view(batch, seq, hidden),
            aux_loss=aux_loss,
            z_loss=z_loss,
            modality_loss=modality_loss,
            stats=stats if output_stats else None,
        )

    def _forward_forced(self, x, experts, mask, mods, output_stats, shape) -> MoEOutput:
        index = experts.long()  # (T, G)
        group = index.shape[1]
        valid = torch.ones_like(index, dtype=torch.bool) if mask is None else mask.view(-1, 1).expand_as(index)
        probs = torch.nn.functional.one_hot(index, self.config.num_total_experts).float().sum(1) / group  # (T, E)
        routing = Routing(expert_index=index, weight=valid.to(x.dtype), valid=valid, probs=probs)
        plan = make_plan(
            routing.expert_index,
            routing.weight,
            routing.computed_mask(self.num_experts),
            self.num_experts,
            # one expert at weight 1 (padding: 0, and its output is never read); a group's weights sum to G
            weights_sum_to_one=group == 1,
            sync_free=self._sync_free(x),  # (no all_computed promise: forced ids are not checked here)
        )
        out = self.experts(x, plan)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        stats = None
        if output_stats or self.stats_sink is not None:
            dropped = x.new_zeros((), dtype=torch.long)
            stats = routing_stats(routing, num_experts=self.num_experts, num_modalities=self.num_modalities,
                                  dropped=dropped, modality_ids=mods, token_mask=mask)  # fmt: skip
            if self.stats_sink is not None:
                self.stats_sink.append(stats)
        zero = x.new_zeros((), dtype=torch.float32)
        return MoEOutput(out.view(*shape), aux_loss=zero, z_loss=zero, modality_loss=zero,
                         stats=stats if output_stats else None)  # fmt: skip

    def _sync_free(self, x: torch.Tensor) -> bool:
        """grouped_mm on a GPU takes the plan without a host sync; the loop (and the CPU, where a sync costs
        nothing) takes the trimmed plan, which skips the uncomputed slots' rows altogether."""
        return x.is_cuda and use_grouped_mm(self.config.dispatch, x)

    @torch.no_grad()
    def update_router_bias(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Apply the auxiliary-loss-free bias update with the load seen since the last call (call after each
        optimizer step; a no-op when ``router_bias_update_rate`` is 0). ``reduce`` sums the load over the training
        processes, so that every process applies the same update for the global batch (DeepSeek-V3 balances the
        global batch's load, not one process's share of it)."""
        rate = self.config.router_bias_update_rate
        if rate > 0:
            load = self._load_since_update if reduce is None else reduce(self._load_since_update)
            if load.sum() > 0:
                self.router_bias.copy_(balancing_bias_update(self.router_bias, load, rate))
        self._load_since_update.zero_()


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters and parameters active per token: a token uses at most ``top_k`` routed experts (an upper
    bound with top-p routing or null experts); shared weights counted once. Works on the meta device."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for block in (m for m in model.modules() if isinstance(m, SparseMoEBlock)):
        cfg = block.config
        inactive += (cfg.num_experts - min(cfg.top_k, cfg.num_experts)) * block.experts.parameters_per_expert()
    return {"total": total, "active": total - inactive}
