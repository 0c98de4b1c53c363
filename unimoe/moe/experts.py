"""Expert families. Each takes the layer input ``x (T, H)`` and a :class:`DispatchPlan` and returns ``(T, H)``.

* ``ffn``  — :class:`SwiGLUExperts`: independent SwiGLU FFNs stored fused like transformers' MoE experts
  (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``), so weights move between the two without conversion.
* ``lora`` — :class:`LoRAExperts`: one frozen dense SwiGLU FFN shared by all experts plus per-expert LoRA deltas on
  its gate, up and down projections (Uni-MoE's LoRA experts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from unimoe.moe.dispatch import (
    DispatchPlan,
    combine,
    gather_chunks,
    grouped_linear,
    scatter_chunks,
    use_grouped_mm,
)
from unimoe.registry import Registry

EXPERTS: Registry[type[nn.Module]] = Registry("expert type")


class SwiGLU(nn.Module):
    """A dense gated FFN with transformers' names (``gate_proj``, ``up_proj``, ``down_proj``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@EXPERTS.register("ffn")
class SwiGLUExperts(nn.Module):
    def __init__(
        self,
        *,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        dispatch: str = "auto",
        **_: object,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.dispatch = dispatch
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = ACT2FN[hidden_act]
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)

    def active_parameters_per_token(self) -> int:
        return self.gate_up_proj[0].numel() + self.down_proj[0].numel()

    def forward(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if use_grouped_mm(self.dispatch, x):
            xs = x.index_select(0, plan.token_index)  # (N, H): backward is an index_add
            gate, up = grouped_linear(xs, self.gate_up_proj, plan, True).chunk(2, dim=-1)  # (N, I) each
            out = grouped_linear(self.act_fn(gate) * up, self.down_proj, plan, True)  # (N, H)
            return combine(out, plan)
        # Loop: each expert runs its whole FFN on its own chunk; weights are unbind-ed views (one grad buffer each).
        outputs = []
        for x_e, w_e, gate_up, down in zip(
            gather_chunks(x, plan), plan.weight_chunks(), self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        ):
            if x_e.shape[0] == 0:
                outputs.append(x_e)
                continue
            gate, up = F.linear(x_e, gate_up).chunk(2, dim=-1)  # (n_e, I) each
            # routing weight on the (n_e, I) hidden when it is narrower than the output (same product: linear down)
            h = self.act_fn(gate) * up
            if h.shape[-1] <= x_e.shape[-1]:
                outputs.append(F.linear(h * w_e.to(h.dtype), down))
            else:
                outputs.append(F.linear(h, down) * w_e.to(h.dtype))
        return scatter_chunks(outputs, plan)


@EXPERTS.register("lora")
class LoRAExperts(nn.Module):
    """A frozen dense SwiGLU FFN plus ``E`` LoRA experts on its three projections.

    Expert ``e`` is the FFN with ``W + s * B_e A_e`` in place of each weight ``W`` (``s = alpha / r``). The token output
    is the frozen FFN plus the weighted expert deltas::

        y = FFN(x) + sum_e w_e * (FFN_e(x) - FFN(x))

    so a zero ``B`` gives exactly the frozen FFN whatever the weights (which is what upcycling needs). Computed
    without running ``E`` full FFNs: the frozen gate/up projections run once for all tokens; each routed slot only
    adds its low-rank terms to the pre-activations; because the down projection is linear, the weighted per-slot
    intermediate deltas are summed per token *before* one frozen down projection over all tokens::

        h   = act(g) * u,                 g, u = x W_g^T, x W_u^T             (once, all tokens)
        h_e = act(g + s B_g A_g x) * (u + s B_u A_u x)                        (per slot, low rank)
        y   = W_d (h + sum_e w_e (h_e - h)) + sum_e w_e s B_d A_d h_e
    """

    def __init__(
        self,
        *,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        dispatch: str = "auto",
        **_: object,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.rank = lora_rank
        self.scaling = lora_alpha / lora_rank
        self.dispatch = dispatch
        self.act_fn = ACT2FN[hidden_act]
        e, h, i, r = num_experts, hidden_size, intermediate_size, lora_rank
        # the frozen dense FFN, fused gate|up like the ffn experts
        self.gate_up_proj = nn.Parameter(torch.empty(2 * i, h), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(h, i), requires_grad=False)
        # per-expert LoRA factors (A of gate and up stacked: one GEMM per expert for both)
        self.lora_A_gate_up = nn.Parameter(torch.empty(e, 2 * r, h))
        self.lora_B_gate = nn.Parameter(torch.zeros(e, i, r))
        self.lora_B_up = nn.Parameter(torch.zeros(e, i, r))
        self.lora_A_down = nn.Parameter(torch.empty(e, r, i))
        self.lora_B_down = nn.Parameter(torch.zeros(e, h, r))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)
        self.reset_lora()

    def reset_lora(self) -> None:
        """peft's default LoRA init: A Kaiming-uniform, B zero (the delta starts at zero)."""
        for a in (self.lora_A_gate_up, self.lora_A_down):
            for a_e in a.data:
                nn.init.kaiming_uniform_(a_e, a=math.sqrt(5))
        for b in (self.lora_B_gate, self.lora_B_up, self.lora_B_down):
            nn.init.zeros_(b)

    def active_parameters_per_token(self) -> int:
        return self.gate_up_proj.numel() + self.down_proj.numel()

    def forward(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        grouped = use_grouped_mm(self.dispatch, x)
        r, s = self.rank, self.scaling
        gate, up = F.linear(x, self.gate_up_proj).chunk(2, dim=-1)  # (T, I) each, frozen, once
        hidden = self.act_fn(gate) * up  # (T, I)
        if not grouped:
            return self._forward_loop(x, gate, up, hidden, plan)

        idx = plan.token_index
        xs = x.index_select(0, idx)  # (N, H)
        a = grouped_linear(xs, self.lora_A_gate_up, plan, grouped)  # (N, 2r)
        gate_e = gate.index_select(0, idx) + s * grouped_linear(a[:, :r].contiguous(), self.lora_B_gate, plan, grouped)
        up_e = up.index_select(0, idx) + s * grouped_linear(a[:, r:].contiguous(), self.lora_B_up, plan, grouped)
        hidden_e = self.act_fn(gate_e) * up_e  # (N, I)
        down_delta = s * grouped_linear(
            grouped_linear(hidden_e, self.lora_A_down, plan, grouped), self.lora_B_down, plan, grouped
        )

        w = plan.weight.to(x.dtype).unsqueeze(-1)
        mixed = hidden.index_add(0, idx, (hidden_e - hidden.index_select(0, idx)) * w)  # (T, I)
        return F.linear(mixed, self.down_proj) + combine(down_delta, plan)

    def _forward_loop(
        self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, hidden: torch.Tensor, plan: DispatchPlan
    ) -> torch.Tensor:
        """The same sums as the grouped path, one expert chunk at a time (small temporaries, see dispatch.py)."""
        r, s = self.rank, self.scaling
        deltas, outs = [], []
        experts = zip(
            gather_chunks(x, plan),
            gather_chunks(gate, plan),
            gather_chunks(up, plan),
            gather_chunks(hidden, plan),
            plan.weight_chunks(),
            self.lora_A_gate_up.unbind(0),
            self.lora_B_gate.unbind(0),
            self.lora_B_up.unbind(0),
            self.lora_A_down.unbind(0),
            self.lora_B_down.unbind(0),
        )
        for x_e, gate_e, up_e, hidden_e, w_e, a_gu, b_g, b_u, a_d, b_d in experts:
            if x_e.shape[0] == 0:
                deltas.append(hidden_e)
                outs.append(x_e)
                continue
            w_e = w_e.to(x.dtype)
            a = F.linear(x_e, a_gu) * s  # (n_e, 2r); scaling on the narrow tensor
            h_e = self.act_fn(gate_e + F.linear(a[:, :r], b_g)) * (up_e + F.linear(a[:, r:], b_u))  # (n_e, I)
            deltas.append((h_e - hidden_e) * w_e)
            outs.append(F.linear(F.linear(h_e, a_d) * (w_e * s), b_d))  # (n_e, H)
        mixed = scatter_chunks(deltas, plan, base=hidden)  # (T, I)
        return F.linear(mixed, self.down_proj) + scatter_chunks(outs, plan)
