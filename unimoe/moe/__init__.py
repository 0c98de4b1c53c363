"""The sparse Mixture-of-Experts layer: routing, experts, dispatch, losses and statistics."""

from unimoe.moe.config import MoEConfig
from unimoe.moe.dispatch import DispatchPlan, make_plan
from unimoe.moe.experts import EXPERTS, LoRAExperts, SwiGLU, SwiGLUExperts
from unimoe.moe.layer import MoEOutput, SparseMoEBlock, count_parameters
from unimoe.moe.losses import RouterStats, load_balancing_loss, modality_routing_loss, router_z_loss
from unimoe.moe.routing import Routing, apply_capacity, balancing_bias_update, route

__all__ = [
    "EXPERTS",
    "DispatchPlan",
    "LoRAExperts",
    "MoEConfig",
    "MoEOutput",
    "RouterStats",
    "Routing",
    "SparseMoEBlock",
    "SwiGLU",
    "SwiGLUExperts",
    "apply_capacity",
    "balancing_bias_update",
    "count_parameters",
    "load_balancing_loss",
    "make_plan",
    "modality_routing_loss",
    "route",
    "router_z_loss",
]
