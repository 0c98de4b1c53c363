"""The typed, validated configuration of a sparse MoE layer.

It lives inside ``UniMoEConfig.moe`` as a plain dict (so ``config.json`` stays JSON) and is turned into this
dataclass, validated, whenever a model is built or a config is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from unimoe.config_utils import check_dataclass_fields
from unimoe.errors import ConfigError

RoutingMode = Literal["topk", "topp"]
DispatchBackend = Literal["auto", "loop", "grouped_mm"]


@dataclass
class MoEConfig:
    """Every knob of the MoE layers of one model.

    Routing
        ``routing="topk"`` picks ``top_k`` experts per token; ``routing="topp"`` picks the smallest set whose
        cumulative probability reaches ``top_p`` (at least 1, at most ``top_k``; UniMoE-Audio's dynamic routing).
        ``routed_scaling_factor`` multiplies the routing weights (DeepSeek-V3's ``routed_scaling_factor``): with
        fine-grained experts (``top_k`` narrow experts standing in for one wide FFN), ``top_k`` keeps the routed
        output at the scale of that FFN, as when a stage forces every token through ``top_k`` experts at weight 1.
        ``num_null_experts`` adds experts that output zero and cost nothing (a token can "skip" part of its budget).
    Experts
        ``expert_type`` is a name in ``unimoe.moe.EXPERTS`` (``ffn``: SwiGLU experts stored fused; ``lora``: one
        frozen dense FFN plus per-expert low-rank deltas). Shared experts are always on.
    Placement
        ``moe_layers`` (explicit list of layer indices) wins over ``moe_layer_freq`` (every n-th layer, counted from 1).
    Balance
        ``aux_loss_coef`` (Switch load balancing), ``z_loss_coef`` (router z-loss), ``router_bias_update_rate``
        (DeepSeek-V3 auxiliary-loss-free bias; 0 turns it off), ``capacity_factor`` (None = dropless).
    """

    num_experts: int = 4
    top_k: int = 2
    routing: RoutingMode = "topk"
    top_p: float = 0.7
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    num_null_experts: int = 0

    expert_type: str = "ffn"
    expert_intermediate_size: int | None = None
    hidden_act: str = "silu"
    lora_rank: int = 8
    lora_alpha: float = 16.0

    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False

    moe_layers: list[int] | None = None
    moe_layer_freq: int = 1

    router_jitter: float = 0.0
    router_bias_update_rate: float = 0.0
    capacity_factor: float | None = None

    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    modality_loss_coef: float = 0.0
    modality_experts: dict[str, list[int]] = field(default_factory=dict)

    dispatch: DispatchBackend = "auto"

    def __post_init__(self) -> None:
        check_dataclass_fields(self, "moe")  # "2" -> 2; "abc" or 1.5 for top_k -> one line naming the field
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        from unimoe.moe.experts import EXPERTS  # registry is filled by the experts module

        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"moe.{name}: {msg}")

        if self.num_experts < 1:
            fail("num_experts", f"must be >= 1, got {self.num_experts}")
        if self.num_null_experts < 0:
            fail("num_null_experts", f"must be >= 0, got {self.num_null_experts}")
        if not 1 <= self.top_k <= self.num_total_experts:
            fail(
                "top_k",
                f"top_k={self.top_k} must be between 1 and num_experts + num_null_experts = {self.num_total_experts}; "
                "lower top_k or add experts",
            )
        if not self.routed_scaling_factor > 0:
            fail("routed_scaling_factor", f"must be > 0, got {self.routed_scaling_factor}")
        if self.routing not in ("topk", "topp"):
            fail("routing", f"unknown routing {self.routing!r}; choose 'topk' or 'topp'")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.expert_type not in EXPERTS:
            fail(
                "expert_type", f"unknown expert type {self.expert_type!r}; choose one of: {', '.join(EXPERTS.names())}"
            )
        if self.expert_intermediate_size is not None and self.expert_intermediate_size < 1:
            fail("expert_intermediate_size", f"must be >= 1, got {self.expert_intermediate_size}")
        if self.lora_rank < 1:
            fail("lora_rank", f"must be >= 1, got {self.lora_rank}")
        if self.num_shared_experts < 0:
            fail("num_shared_experts", f"must be >= 0, got {self.num_shared_experts}")
        if self.moe_layer_freq < 1:
            fail("moe_layer_freq", f"must be >= 1, got {self.moe_layer_freq}")
        if self.moe_layers is not None and any(i < 0 for i in self.moe_layers):
            fail("moe_layers", f"layer indices must be >= 0, got {self.moe_layers}")
        if self.router_jitter < 0 or self.router_jitter >= 1:
            fail("router_jitter", f"must be in [0, 1), got {self.router_jitter}")
        if self.router_bias_update_rate < 0:
            fail("router_bias_update_rate", f"must be >= 0, got {self.router_bias_update_rate}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            fail("capacity_factor", f"must be > 0 or null (dropless), got {self.capacity_factor}")
        for name in ("aux_loss_coef", "z_loss_coef", "modality_loss_coef"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}")
        for modality, experts in self.modality_experts.items():
            bad = [e for e in experts if not 0 <= e < self.num_experts]
            if bad or not experts:
                fail(
                    "modality_experts",
                    f"{modality!r} -> {experts}: expert ids must be non-empty and in [0, {self.num_experts})",
                )
        if self.dispatch not in ("auto", "loop", "grouped_mm"):
            fail("dispatch", f"unknown dispatch {self.dispatch!r}; choose 'auto', 'loop' or 'grouped_mm'")

    # ------------------------------------------------------------------ helpers
    @property
    def num_total_experts(self) -> int:
        """Real plus null experts: the width of the router."""
        return self.num_experts + self.num_null_experts

    @property
    def weights_sum_to_one(self) -> bool:
        """Every token's routing weights over its computed slots sum to one: renormalized top-k / top-p, no null
        experts taking a share, no slots dropped by a capacity, no scaling."""
        return (
            self.norm_topk_prob
            and self.num_null_experts == 0
            and self.capacity_factor is None
            and self.routed_scaling_factor == 1.0
        )

    def is_moe_layer(self, layer_idx: int) -> bool:
        if self.moe_layers is not None:
            return layer_idx in self.moe_layers
        return (layer_idx + 1) % self.moe_layer_freq == 0

    def check_layers(self, num_layers: int) -> None:
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if i >= num_layers]
            if bad:
                raise ConfigError(f"moe.moe_layers: {bad} out of range for a model with {num_layers} layers")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | MoEConfig | None) -> MoEConfig:
        if isinstance(data, MoEConfig):
            return data
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"moe: expected a mapping of MoE settings, got {data!r}")
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"moe: unknown field(s) {unknown}; known fields: {', '.join(sorted(known))}")
        return cls(**data)
