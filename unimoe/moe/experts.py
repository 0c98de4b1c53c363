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


FEW_ROWS = 64


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, contiguous: bool = False) -> torch.Tensor:
    """``F.linear(x, weight)`` (``x (n, in)``, ``weight (out, in)``), computed as ``(weight @ x.T).T`` when ``x`` has
    fewer rows than ``FEW_ROWS`` and than ``weight``.

    Why: for a chunk of a few routed tokens (decoding, many experts) the BLAS on CPU splits a GEMM's work along its
    first operand's rows; with ``x`` first there are too few rows to keep both cores busy, with the weight first
    there are ``out`` of them (measured in ``bench/moe_layer.py``: 1.3-1.7x faster below ~256 rows, equal above).
    The result is a transposed view unless ``contiguous``."""
    n = x.shape[0]
    if n >= FEW_ROWS or n >= weight.shape[0] or x.is_cuda:
        return F.linear(x, weight)
    out = torch.mm(weight, x.t()).t()  # (n, out), strides (1, n)
    return out.contiguous() if contiguous else out


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
        self.hidden_act = hidden_act
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
        if self.hidden_act == "silu":
            return _SwiGLUExpertLoop.apply(
                x, self.gate_up_proj, self.down_proj, plan.weight.to(x.dtype), plan.token_index, plan.counts
            )
        # Loop: each expert runs its whole FFN on its own chunk; weights are unbind-ed views (one grad buffer each).
        outputs = []
        for x_e, w_e, gate_up, down in zip(
            gather_chunks(x, plan), plan.weight_chunks(), self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        ):
            if x_e.shape[0] == 0:
                outputs.append(x_e)
                continue
            gate, up = few_rows_linear(x_e, gate_up).chunk(2, dim=-1)  # (n_e, I) each
            # routing weight on the (n_e, I) hidden when it is narrower than the output (same product: linear down)
            h = self.act_fn(gate) * up
            if h.shape[-1] <= x_e.shape[-1]:
                outputs.append(few_rows_linear(h * w_e.to(h.dtype), down, contiguous=True))
            else:
                outputs.append(few_rows_linear(h, down, contiguous=True) * w_e.to(h.dtype))
        return scatter_chunks(outputs, plan)


class _SwiGLUExpertLoop(torch.autograd.Function):
    """SwiGLU experts (SiLU), one expert's token chunk at a time, with the backward written out.

    Forward, for expert ``e`` with tokens ``idx_e`` and routing weights ``w_e``::

        g, u = x[idx_e] GU_e^T,   h = silu(g) * u,   out[idx_e] += (w_e h) D_e^T

    Why by hand: autograd's backward of the per-expert weight views (``unbind``) stacks ``E`` fresh gradients into a
    new ``(E, 2I, H)`` tensor (a 64-expert layer on CPU spent ~10% of its step there), splits and concatenates
    ``g``/``u`` gradients, and books every small op. Here each expert's GEMMs write its weight gradients straight
    into its slice of one buffer (``mm(out=)``), token gradients are added into one ``(T, H)`` buffer, and the
    routing weights' gradient is a batched row dot product. Checked against autograd in tests/moe/test_experts.py.
    """

    @staticmethod
    def forward(ctx, x, gate_up_proj, down_proj, weight, token_index, counts):
        out = x.new_zeros(x.shape)  # (T, H)
        keep = any(ctx.needs_input_grad[:4])
        saved = []
        for e, (idx, w) in enumerate(zip(token_index.split(counts), weight.unsqueeze(-1).split(counts))):
            if idx.numel() == 0:
                saved.append(None)
                continue
            x_e = x.index_select(0, idx)  # (n, H)
            gu = few_rows_linear(x_e, gate_up_proj[e])  # (n, 2I)
            g, u = gu.chunk(2, dim=-1)
            act = F.silu(g)
            h = act * u  # (n, I)
            out.index_add_(0, idx, few_rows_linear(h * w, down_proj[e], contiguous=True))
            saved.append((x_e, g, u, act, h) if keep else None)
        ctx.saved = saved
        ctx.counts = counts
        ctx.save_for_backward(x, gate_up_proj, down_proj, weight, token_index)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, gate_up_proj, down_proj, weight, token_index = ctx.saved_tensors
        need_x, need_gu, need_down, need_w = ctx.needs_input_grad[:4]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_gu = torch.empty_like(gate_up_proj) if need_gu else None
        grad_down = torch.empty_like(down_proj) if need_down else None
        grad_w = torch.zeros_like(weight) if need_w else None  # (N,), written per expert through split views
        inter = gate_up_proj.shape[1] // 2
        grad_w_chunks = grad_w.split(ctx.counts) if grad_w is not None else [None] * len(ctx.counts)
        chunks = zip(token_index.split(ctx.counts), weight.unsqueeze(-1).split(ctx.counts), grad_w_chunks, ctx.saved)
        for e, (idx, w, grad_w_e, saved) in enumerate(chunks):
            if saved is None:  # no tokens: zero weight gradients
                for buf in (grad_gu, grad_down):
                    if buf is not None:
                        buf[e].zero_()
                continue
            x_e, g, u, act, h = saved
            go = grad_out.index_select(0, idx)  # (n, H)
            grad_hw = go @ down_proj[e]  # (n, I): gradient of w * h
            if grad_down is not None:  # the weight on the narrower side of the product
                if h.shape[-1] <= go.shape[-1]:
                    torch.mm(go.t(), h * w, out=grad_down[e])
                else:
                    torch.mm((go * w).t(), h, out=grad_down[e])
            if grad_w_e is not None:
                torch.bmm(grad_hw.unsqueeze(1), h.unsqueeze(2), out=grad_w_e.view(-1, 1, 1))
            grad_h = grad_hw.mul_(w)
            grad_g_u = h.new_empty(h.shape[0], 2 * inter)
            torch.mul(grad_h, act, out=grad_g_u[:, inter:])
            torch.ops.aten.silu_backward.grad_input(grad_h.mul_(u), g, grad_input=grad_g_u[:, :inter])
            if grad_gu is not None:
                torch.mm(grad_g_u.t(), x_e, out=grad_gu[e])
            if grad_x is not None:
                grad_x.index_add_(0, idx, grad_g_u @ gate_up_proj[e])
        return grad_x, grad_gu, grad_down, grad_w, None, None


@EXPERTS.register("lora")
class LoRAExperts(nn.Module):
    """A frozen dense SwiGLU FFN plus ``E`` LoRA experts on its three projections.

    Expert ``e`` is the FFN with ``W + s * B_e A_e`` in place of each weight ``W`` (``s = alpha / r``). The token output
    is the frozen FFN plus the weighted expert deltas::

        y = FFN(x) + sum_e w_e * (FFN_e(x) - FFN(x))

    so a zero ``B`` gives the frozen FFN whatever the weights (which is what upcycling needs). Computed without
    running ``E`` full FFNs: the frozen gate/up projections run once for all tokens; each routed slot only adds its
    low-rank terms to the pre-activations; because the down projection is linear, the weighted per-slot
    intermediates are summed per token *before* one frozen down projection over all tokens::

        g, u = x W_g^T, x W_u^T                                                (once, all tokens)
        h_e  = act(g + s B_g A_g x) * (u + s B_u A_u x)                        (per slot, low rank)
        y    = W_d ((1 - sum_e w_e) act(g) * u + sum_e w_e h_e) + sum_e w_e s B_d A_d h_e

    The first term vanishes when the weights sum to one (renormalized routing), and is then not computed.
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
        self.hidden_act = hidden_act
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
        # frozen gate / up for all tokens, once: two products on the weight's halves rather than one fused product
        # split in two (the split's backward would concatenate a (T, 2I) gradient)
        w_gate, w_up = self.gate_up_proj.chunk(2, dim=0)
        gate, up = F.linear(x, w_gate), F.linear(x, w_up)  # (T, I) each
        # the frozen FFN's own intermediate, weighted by what the routed slots leave over (1 - sum_e w_e); zero
        # and skipped when every token's weights sum to one (renormalized routing without null experts or drops)
        base = None
        if not plan.weights_sum_to_one:
            w_slots = plan.weight.to(x.dtype)
            keep = 1.0 - w_slots.new_zeros(plan.num_tokens).index_add(0, plan.token_index, w_slots)  # (T,)
            base = self.act_fn(gate) * up * keep.unsqueeze(-1)  # (T, I)
        if use_grouped_mm(self.dispatch, x):
            mixed, down_delta = self._forward_grouped(x, gate, up, base, plan)
        else:
            mixed, down_delta = self._forward_loop(x, gate, up, base, plan)
        return F.linear(mixed, self.down_proj) + down_delta  # (T, H)

    def _forward_grouped(self, x, gate, up, base, plan: DispatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """All slots at once through grouped products: the mixed intermediate ``(T, I)`` and the down delta
        ``(T, H)``."""
        r, s = self.rank, self.scaling
        idx = plan.token_index
        a = grouped_linear(x.index_select(0, idx), self.lora_A_gate_up, plan, True) * s  # (N, 2r)
        gate_e = gate.index_select(0, idx) + grouped_linear(a[:, :r].contiguous(), self.lora_B_gate, plan, True)
        up_e = up.index_select(0, idx) + grouped_linear(a[:, r:].contiguous(), self.lora_B_up, plan, True)
        hidden_e = self.act_fn(gate_e) * up_e  # (N, I)
        down_delta = s * grouped_linear(grouped_linear(hidden_e, self.lora_A_down, plan, True), self.lora_B_down,
                                        plan, True)  # fmt: skip
        w = plan.weight.to(x.dtype).unsqueeze(-1)  # (N, 1)
        if base is None:
            base = gate.new_zeros(gate.shape)
        return base.index_add(0, idx, hidden_e * w), combine(down_delta, plan)

    def _forward_loop(self, x, gate, up, base, plan: DispatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """The same sums one expert chunk at a time (small temporaries, see dispatch.py)."""
        r, s = self.rank, self.scaling
        mixes, outs = [], []
        experts = zip(
            gather_chunks(x, plan),
            gather_chunks(gate, plan),
            gather_chunks(up, plan),
            plan.weight_chunks(),
            self.lora_A_gate_up.unbind(0),
            self.lora_B_gate.unbind(0),
            self.lora_B_up.unbind(0),
            self.lora_A_down.unbind(0),
            self.lora_B_down.unbind(0),
        )
        fused = self.hidden_act == "silu"
        for x_e, gate_e, up_e, w_e, a_gu, b_g, b_u, a_d, b_d in experts:
            if x_e.shape[0] == 0:
                mixes.append(gate_e)
                outs.append(x_e)
                continue
            w_e = w_e.to(x.dtype)
            a = F.linear(x_e, a_gu) * s  # (n_e, 2r); scaling on the narrow tensor
            if fused:
                mix, t = _LoRASwiGLUSlots.apply(gate_e, up_e, a, b_g, b_u, a_d, w_e, s)
            else:
                h_e = self.act_fn(torch.addmm(gate_e, a[:, :r], b_g.t())) * torch.addmm(up_e, a[:, r:], b_u.t())
                mix, t = h_e * w_e, F.linear(h_e, a_d) * (w_e * s)
            mixes.append(mix)  # (n_e, I)
            outs.append(F.linear(t, b_d))  # (n_e, H)
        return scatter_chunks(mixes, plan, base=base), scatter_chunks(outs, plan)


class _LoRASwiGLUSlots(torch.autograd.Function):
    """One LoRA expert's SwiGLU on its slots, with the backward written out (SiLU only)::

        g = gate + a_g B_g^T,   u = up + a_u B_u^T,   h = silu(g) * u           (n, I)
        mix = w h   (n, I),     t = s w (h A_d^T)   (n, r)

    ``gate``/``up`` are the slots' frozen pre-activations, ``a = s (x A_gu^T)`` the LoRA inputs of gate and up.

    Why by hand: on CPU these ``(n, I)`` passes are bound by memory traffic, and autograd gives every partial
    gradient its own fresh tensor before adding them up (``h`` gets one from ``mix`` and one from ``t``), and computes
    the routing weight's gradient through a ``(n, I)`` temporary. Here the two gradients of ``h`` meet in one
    buffer (``addmm_``, also the fast layout for the ``K = r`` product) and the weight's gradient is a batched row dot
    product. Checked against autograd in tests/moe/test_experts.py.
    """

    @staticmethod
    def forward(ctx, gate, up, a, b_g, b_u, a_d, w, s: float):
        r = b_g.shape[1]
        g = torch.addmm(gate, a[:, :r], b_g.t())  # (n, I)
        u = torch.addmm(up, a[:, r:], b_u.t())  # (n, I)
        act = F.silu(g)
        h = act * u
        t0 = F.linear(h, a_d)  # (n, r)
        ctx.save_for_backward(g, u, act, h, t0, a, b_g, b_u, a_d, w)
        ctx.s = s
        return h * w, t0 * (w * s)

    @staticmethod
    def backward(ctx, grad_mix, grad_t):
        g, u, act, h, t0, a, b_g, b_u, a_d, w = ctx.saved_tensors
        s, r = ctx.s, b_g.shape[1]
        need = ctx.needs_input_grad
        grad_t0 = grad_t * (w * s)  # (n, r)
        grad_w = None
        if need[6]:  # d/dw of w h and of s w t0: row dot products
            grad_w = torch.bmm(grad_mix.unsqueeze(1), h.unsqueeze(2)).view(-1, 1)
            grad_w += (grad_t * t0).sum(-1, keepdim=True) * s
        grad_a_d = grad_t0.t() @ h if need[5] else None  # (r, I)
        grad_h = (grad_mix * w).addmm_(grad_t0, a_d)  # (n, I): both paths into one buffer
        grad_u = grad_h * act
        grad_g = torch.ops.aten.silu_backward(grad_h.mul_(u), g)
        grad_a = torch.cat([grad_g @ b_g, grad_u @ b_u], dim=-1) if need[2] else None  # (n, 2r)
        grad_b_g = grad_g.t() @ a[:, :r] if need[3] else None  # (I, r)
        grad_b_u = grad_u.t() @ a[:, r:] if need[4] else None
        return grad_g, grad_u, grad_a, grad_b_g, grad_b_u, grad_a_d, grad_w, None
