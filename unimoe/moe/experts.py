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

from unimoe.moe import native
from unimoe.moe.dispatch import (
    DispatchPlan,
    combine,
    gather_chunks,
    gather_slots,
    grouped_linear,
    scatter_chunks,
    scatter_slots,
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


class GradBuffers:
    """Weight-gradient buffers that the hand-written expert backwards reuse from one step to the next.

    Why: an expert weight's gradient is ``E`` times a dense layer's (64 MB for ``gate_up_proj`` at ``E64-top8``).
    glibc serves blocks over 32 MB by a fresh ``mmap`` every time, so each backward paid ~16k page faults (~13 ms
    per 64 MB on a 2-core CPU) to map and zero memory that the optimizer's ``zero_grad()`` had just handed back.
    Here the backward keeps the buffer's storage and returns a new tensor on it: autograd makes that tensor the
    parameter's ``.grad`` without a copy, ``zero_grad()`` drops the ``.grad`` and the storage is handed out again.

    A storage is reused only while nothing else references it (the previous ``.grad`` was dropped and no view of it
    is alive), so a gradient somebody kept is never overwritten; otherwise a fresh buffer is allocated. The cost is
    that the buffers stay allocated between steps, as with ``zero_grad(set_to_none=False)``. Not copied by
    ``deepcopy`` or pickling."""

    KEEP = 2  # storages kept per weight: with gradient accumulation one is the .grad and one takes the next step's

    def __init__(self) -> None:
        self._storages: dict[str, list[torch.UntypedStorage]] = {}

    def empty_like(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """An uninitialized tensor shaped like ``param`` (contiguous), on a kept storage when one is free."""
        nbytes = param.numel() * param.element_size()
        kept = [s for s in self._storages.get(name, []) if s.nbytes() == nbytes and s.device == param.device]
        storage = next((s for s in kept if _referenced_once(s)), None)
        if storage is None:
            storage = torch.empty(nbytes, dtype=torch.uint8, device=param.device).untyped_storage()
            kept = [storage, *kept][: self.KEEP]  # a dropped one lives on with whoever holds it
        self._storages[name] = kept
        return param.new_empty(0).set_(storage, 0, param.shape)

    def __deepcopy__(self, memo: dict) -> GradBuffers:
        return GradBuffers()

    def __getstate__(self) -> dict:
        return {"_storages": {}}


def _referenced_once(storage: torch.UntypedStorage) -> bool:
    """Whether nothing but our one handle references ``storage`` (torch's inductor checks its cached storages'
    liveness the same way). A torch without this private counter gets False: every buffer is then fresh."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count is not None and use_count(storage._cdata) == 1


FEW_ROWS = 64


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, contiguous: bool = False) -> torch.Tensor:
    """``F.linear(x, weight)`` (``x (n, in)``, ``weight (out, in)``), computed as ``(weight @ x.T).T`` when ``x`` has
    fewer rows than ``FEW_ROWS`` and than ``weight``.

    Why: for a chunk of a few routed tokens (decoding, many experts) the BLAS on CPU splits a GEMM's work along its
    first operand's rows; with ``x`` first there are too few rows to keep both cores busy, with the weight first
    there are ``out`` of them (measured in ``bench/moe_layer.py``: 1.3-1.7x faster for chunks of fewer than
    ``FEW_ROWS`` rows, the decoding case).
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
        self.grad_buffers = GradBuffers()
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)

    def parameters_per_expert(self) -> int:
        """Weights one routed expert adds (what a token that does not pick it leaves idle)."""
        return self.gate_up_proj[0].numel() + self.down_proj[0].numel()

    def forward(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if use_grouped_mm(self.dispatch, x):
            xs = gather_slots(x, plan)  # (N, H)
            gate, up = grouped_linear(xs, self.gate_up_proj, plan, True).chunk(2, dim=-1)  # (N, I) each
            out = grouped_linear(self.act_fn(gate) * up, self.down_proj, plan, True)  # (N, H)
            return combine(out, plan)
        if self.hidden_act == "silu":
            return _SwiGLUExpertLoop.apply(
                x,
                self.gate_up_proj,
                self.down_proj,
                plan.weight.to(x.dtype),
                plan.token_index,
                plan.counts,
                self.grad_buffers,
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
    def forward(ctx, x, gate_up_proj, down_proj, weight, token_index, counts, grad_buffers: GradBuffers):
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
        ctx.grad_buffers = grad_buffers
        ctx.save_for_backward(x, gate_up_proj, down_proj, weight, token_index)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, gate_up_proj, down_proj, weight, token_index = ctx.saved_tensors
        need_x, need_gu, need_down, need_w = ctx.needs_input_grad[:4]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_gu = ctx.grad_buffers.empty_like("gate_up_proj", gate_up_proj) if need_gu else None
        grad_down = ctx.grad_buffers.empty_like("down_proj", down_proj) if need_down else None
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
                torch.sum(grad_hw * h, dim=-1, out=grad_w_e)  # row dot products (bmm measured ~6x slower)
            grad_h = grad_hw.mul_(w)
            grad_g_u = h.new_empty(h.shape[0], 2 * inter)
            torch.mul(grad_h, act, out=grad_g_u[:, inter:])
            torch.ops.aten.silu_backward.grad_input(grad_h.mul_(u), g, grad_input=grad_g_u[:, :inter])
            if grad_gu is not None:
                torch.mm(grad_g_u.t(), x_e, out=grad_gu[e])
            if grad_x is not None:
                grad_x.index_add_(0, idx, grad_g_u @ gate_up_proj[e])
        return grad_x, grad_gu, grad_down, grad_w, None, None, None


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

    def parameters_per_expert(self) -> int:
        """Weights one LoRA expert adds: its low-rank factors (the frozen FFN is active for every token)."""
        names = ("lora_A_gate_up", "lora_B_gate", "lora_B_up", "lora_A_down", "lora_B_down")
        return sum(getattr(self, n)[0].numel() for n in names)

    def forward(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        # the frozen FFN's own intermediate is weighted by what the routed slots leave over (1 - sum_e w_e); zero and
        # skipped when every token's weights sum to one (renormalized routing without null experts or drops)
        keep = None
        if not plan.weights_sum_to_one:
            w_slots = plan.weight.to(x.dtype)
            keep = 1.0 - w_slots.new_zeros(plan.num_tokens).index_add(0, plan.token_index, w_slots)  # (T,)
        grouped = use_grouped_mm(self.dispatch, x)
        if self.hidden_act == "silu" and not grouped:
            return _LoRAExpertLoop.apply(
                x,
                self.gate_up_proj,
                self.down_proj,
                self.lora_A_gate_up,
                self.lora_B_gate,
                self.lora_B_up,
                self.lora_A_down,
                self.lora_B_down,
                plan.weight.to(x.dtype),
                keep,
                plan.token_index,
                plan.counts,
                self.scaling,
            )
        # frozen gate / up for all tokens, once: two products on the weight's halves rather than one fused product
        # split in two (the split's backward would concatenate a (T, 2I) gradient)
        w_gate, w_up = self.gate_up_proj.chunk(2, dim=0)
        gate, up = F.linear(x, w_gate), F.linear(x, w_up)  # (T, I) each
        base = None if keep is None else self.act_fn(gate) * up * keep.unsqueeze(-1)  # (T, I)
        if grouped:
            mixed, down_delta = self._forward_grouped(x, gate, up, base, plan)
        else:
            mixed, down_delta = self._forward_loop(x, gate, up, base, plan)
        return F.linear(mixed, self.down_proj) + down_delta  # (T, H)

    def _forward_grouped(self, x, gate, up, base, plan: DispatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """All slots at once through grouped products: the mixed intermediate ``(T, I)`` and the down delta
        ``(T, H)``."""
        r, s = self.rank, self.scaling
        a = grouped_linear(gather_slots(x, plan), self.lora_A_gate_up, plan, True) * s  # (N, 2r)
        gate_e = gather_slots(gate, plan) + grouped_linear(a[:, :r].contiguous(), self.lora_B_gate, plan, True)
        up_e = gather_slots(up, plan) + grouped_linear(a[:, r:].contiguous(), self.lora_B_up, plan, True)
        hidden_e = self.act_fn(gate_e) * up_e  # (N, I)
        down_delta = s * grouped_linear(grouped_linear(hidden_e, self.lora_A_down, plan, True), self.lora_B_down,
                                        plan, True)  # fmt: skip
        w = plan.weight.to(x.dtype).unsqueeze(-1)  # (N, 1)
        return scatter_slots(hidden_e * w, plan, base), combine(down_delta, plan)

    def _forward_loop(self, x, gate, up, base, plan: DispatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """The same sums one expert chunk at a time through autograd (activations other than SiLU; SiLU takes
        :class:`_LoRAExpertLoop`)."""
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
        for x_e, gate_e, up_e, w_e, a_gu, b_g, b_u, a_d, b_d in experts:
            if x_e.shape[0] == 0:
                mixes.append(gate_e)
                outs.append(x_e)
                continue
            w_e = w_e.to(x.dtype)
            a = F.linear(x_e, a_gu) * s  # (n_e, 2r); scaling on the narrow tensor
            h_e = self.act_fn(torch.addmm(gate_e, a[:, :r], b_g.t())) * torch.addmm(up_e, a[:, r:], b_u.t())
            mixes.append(h_e * w_e)  # (n_e, I)
            outs.append(F.linear(F.linear(h_e, a_d) * (w_e * s), b_d))  # (n_e, H)
        return scatter_chunks(mixes, plan, base=base), scatter_chunks(outs, plan)


def _native_kernels(x: torch.Tensor, inter: int) -> native.LoRAKernels | None:
    """The compiled row kernels where they apply (fp32 on a CPU, a multiple of 16 wide, not disabled), else ``None``."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    kernels = native.lora_kernels()
    return kernels if kernels is not None and kernels.supports(inter) else None


def _written_flags(num_tokens: int, all_written: bool) -> torch.Tensor:
    """The kernels' per-token flags: a row not yet written is set by its first slot instead of added to."""
    return (torch.ones if all_written else torch.zeros)(num_tokens, dtype=torch.uint8)


def _zero_unwritten(buf: torch.Tensor, written: torch.Tensor) -> None:
    """Zero the rows of ``buf`` that no slot wrote (tokens routed only to null experts, or dropped)."""
    if not bool(written.all()):
        buf[written == 0] = 0


def _tall_skinny_grad(narrow: torch.Tensor, wide: torch.Tensor, out: torch.Tensor) -> None:
    """``out = wide.T @ narrow`` (``wide (n, W)``, ``narrow (n, r)``, ``out (W, r)``: a LoRA factor's gradient),
    computed as ``(narrow.T @ wide).T``: with the rank as the product's first dimension the CPU BLAS runs it ~1.4x
    faster (0.44 vs 0.63 ms at n=512, W=2048, r=16 on 2 cores)."""
    out.copy_(torch.mm(narrow.t(), wide).t())


class _LoRAExpertLoop(torch.autograd.Function):
    """The whole LoRA-expert layer (SiLU), one expert's slots at a time, with the backward written out::

        g0, u0 = x W_g^T, x W_u^T                                  (T, I)  once, all tokens
        a      = s x[idx_e] A_gu,e^T                               (n, 2r)
        g, u   = g0[idx_e] + a_g B_g,e^T,  u0[idx_e] + a_u B_u,e^T (n, I)
        h      = silu(g) * u                                       (n, I)
        mixed  = keep * silu(g0) * u0 + sum_e scatter(w_e h)       (T, I)
        y      = mixed W_d^T + sum_e scatter(s w_e (h A_d,e^T) B_d,e^T)   (T, H)

    (``keep = 1 - sum_e w_e`` per token, or absent when the weights sum to one.)

    Why by hand: on a CPU this layer is bound by passes over ``(n, I)`` tensors and by fresh memory, not by its
    products. Through autograd each expert's gathered pre-activations, the addmm copies and four saved ``(n, I)``
    activations were fresh tensors, the gradients of ``g0``/``u0`` were zero-filled ``(T, I)`` buffers per gather,
    and the saved activations (128 MB at ``lora-E8-r16-top2``) grew the heap into fresh pages every step (about 15k
    page faults a call). Here the gathered pre-activations are updated in place and are the only ``(n, I)`` tensors
    kept for the backward (``h`` is recomputed there); the routing weights' gradient is a row dot product.

    ``g0`` and ``u0`` stay two ``(T, I)`` tensors rather than one ``(T, 2I)``: glibc serves blocks up to 32 MB from
    its heap once it has seen them freed, larger ones always from fresh ``mmap``-ed pages, and a ``(T, 2I)`` float
    buffer at T = 2048, I = 2048 is just over that (its gradient's zero fill then cost 10 ms of page faults).
    Checked against autograd in tests/moe/test_experts.py.
    """

    @staticmethod
    def forward(ctx, x, w_gu, w_d, a_gu, b_g, b_u, a_d, b_d, weight, keep, token_index, counts, s: float):
        num_tokens, inter, r = x.shape[0], w_d.shape[1], b_g.shape[2]
        w_g, w_u = w_gu[:inter], w_gu[inter:]
        g0, u0 = F.linear(x, w_g), F.linear(x, w_u)  # (T, I) each: the frozen gate and up
        kernels = _native_kernels(x, inter)
        if keep is not None:
            mixed = F.silu(g0).mul_(u0).mul_(keep.unsqueeze(-1))  # (T, I)
        else:  # the kernels set each row at its first slot: no zero fill
            mixed = x.new_zeros(num_tokens, inter) if kernels is None else x.new_empty(num_tokens, inter)
        delta = x.new_zeros(x.shape)  # (T, H): the LoRA down-projection terms
        if kernels is not None:  # the factors in column slices (see the C file)
            b_g_p, b_u_p, a_d_p = kernels.pack_factors(b_g, b_u, a_d)
            written = _written_flags(num_tokens, keep is not None)
        saved = []
        for e, (idx, w) in enumerate(zip(token_index.split(counts), weight.unsqueeze(-1).split(counts))):
            if idx.numel() == 0:
                saved.append(None)
                continue
            a = F.linear(x.index_select(0, idx), a_gu[e]).mul_(s)  # (n, 2r)
            if kernels is not None:  # the whole per-slot chain in one pass over each row
                g, u, t0 = x.new_empty(idx.numel(), inter), x.new_empty(idx.numel(), inter), a.new_empty(a.shape[0], r)
                kernels.forward(g0, u0, idx, a, b_g_p[e], b_u_p[e], a_d_p[e], w, g, u, t0, mixed, written)
            else:
                # gathered rows are their own buffers: the LoRA terms go in place
                g = g0.index_select(0, idx).addmm_(a[:, :r], b_g[e].t())  # (n, I)
                u = u0.index_select(0, idx).addmm_(a[:, r:], b_u[e].t())  # (n, I)
                h = F.silu(g).mul_(u)  # (n, I)
                t0 = F.linear(h, a_d[e])  # (n, r)
                mixed.index_add_(0, idx, h.mul_(w))
            delta.index_add_(0, idx, F.linear(t0 * (w * s), b_d[e]))
            saved.append((g, u, a, t0))
        if kernels is not None:
            _zero_unwritten(mixed, written)
        out = torch.addmm(delta, mixed, w_d.t())  # (T, H)
        ctx.saved = saved
        ctx.counts = counts
        ctx.s = s
        base = (g0, u0) if keep is not None else (None, None)
        ctx.save_for_backward(
            x, w_gu, w_d, a_gu, b_g, b_u, a_d, b_d, weight, keep, token_index, *base,
            mixed if ctx.needs_input_grad[2] else None,
        )  # fmt: skip
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, w_gu, w_d, a_gu, b_g, b_u, a_d, b_d, weight, keep, token_index, g0, u0, mixed = ctx.saved_tensors
        need = ctx.needs_input_grad
        s, inter, r = ctx.s, w_d.shape[1], b_g.shape[2]
        grad_out = grad_out.contiguous()
        grad_mixed = grad_out @ w_d  # (T, I)
        grads = {
            i: torch.empty_like(t) if need[i] else None for i, t in ((3, a_gu), (4, b_g), (5, b_u), (6, a_d), (7, b_d))
        }
        grad_w = torch.zeros_like(weight) if need[8] else None  # (N,), filled per expert through split views
        grad_keep = None
        kernels = _native_kernels(x, inter)
        if keep is not None:  # the frozen FFN's own share: keep * silu(g0) * u0
            act0 = F.silu(g0)
            if need[9]:
                grad_keep = (grad_mixed * act0 * u0).sum(-1)  # (T,)
            grad_base = grad_mixed * keep.unsqueeze(-1)
            grad_u0 = grad_base * act0  # (T, I) each, fully written here; the slots add to them
            grad_g0 = torch.ops.aten.silu_backward(grad_base.mul_(u0), g0)
        else:  # zeros, or (kernels) rows set by their first slot
            new = x.new_zeros if kernels is None else x.new_empty
            grad_g0, grad_u0 = new(x.shape[0], inter), new(x.shape[0], inter)
        grad_x = torch.zeros_like(x) if need[0] else None  # the LoRA A terms; the frozen products are added at the end
        if kernels is not None:  # the factors in column slices (see the C file)
            b_g_p, b_u_p, a_d_p = kernels.pack_factors(b_g, b_u, a_d)
            written = _written_flags(x.shape[0], keep is not None)
        grad_w_chunks = grad_w.split(ctx.counts) if grad_w is not None else [None] * len(ctx.counts)
        chunks = zip(token_index.split(ctx.counts), weight.unsqueeze(-1).split(ctx.counts), grad_w_chunks, ctx.saved)
        for e, (idx, w, grad_w_e, saved) in enumerate(chunks):
            if saved is None:  # no tokens: zero LoRA gradients
                for buf in grads.values():
                    if buf is not None:
                        buf[e].zero_()
                continue
            g, u, a, t0 = saved
            ws = w * s
            go = grad_out.index_select(0, idx)  # (n, H)
            grad_t = go @ b_d[e]  # (n, r): gradient of t = ws * t0
            if grads[7] is not None:  # (H, r)
                _tall_skinny_grad(t0 * ws, go, out=grads[7][e])
            if kernels is not None:  # the per-slot chain and the factor gradients in one pass over the rows
                grad_t0 = grad_t * ws  # (n, r)
                dot, grad_a, grad_bg, grad_bu, grad_ad = kernels.backward(
                    s, g, u, grad_mixed, idx, grad_t0, a, b_g_p[e], b_u_p[e], a_d_p[e], w, grad_g0, grad_u0, written
                )
                if grad_w_e is not None:
                    torch.add(dot, (grad_t * t0).sum(-1), alpha=s, out=grad_w_e)
                for i, grad in ((4, grad_bg), (5, grad_bu), (6, grad_ad)):
                    if grads[i] is not None:
                        grads[i][e] = grad
            else:
                act = F.silu(g)
                h = act * u  # (n, I), recomputed
                gm = grad_mixed.index_select(0, idx)  # (n, I), its own buffer
                if grad_w_e is not None:  # d/dw of w h and of s w t0: row dot products
                    torch.sum(gm * h, dim=-1, out=grad_w_e)
                    grad_w_e += (grad_t * t0).sum(-1) * s
                grad_t0 = grad_t.mul_(ws)  # (n, r)
                if grads[6] is not None:
                    torch.mm(grad_t0.t(), h, out=grads[6][e])  # (r, I)
                grad_h = gm.mul_(w).addmm_(grad_t0, a_d[e])  # (n, I): both paths into one buffer
                grad_u = torch.mul(grad_h, act, out=h)  # h is not needed any more: its buffer takes grad_u
                grad_g = torch.ops.aten.silu_backward(grad_h.mul_(u), g)
                grad_g0.index_add_(0, idx, grad_g)
                grad_u0.index_add_(0, idx, grad_u)
                grad_a = torch.cat([grad_g @ b_g[e], grad_u @ b_u[e]], dim=-1).mul_(s)  # (n, 2r), before scaling
                if grads[4] is not None:
                    _tall_skinny_grad(a[:, :r], grad_g, out=grads[4][e])  # (I, r)
                if grads[5] is not None:
                    _tall_skinny_grad(a[:, r:], grad_u, out=grads[5][e])
            if grads[3] is not None:
                torch.mm(grad_a.t(), x.index_select(0, idx), out=grads[3][e])  # (2r, H)
            if grad_x is not None:
                grad_x.index_add_(0, idx, grad_a @ a_gu[e])
        if kernels is not None:
            _zero_unwritten(grad_g0, written)
            _zero_unwritten(grad_u0, written)
        if grad_x is not None:  # + the frozen gate and up products' input gradients
            grad_x.addmm_(grad_g0, w_gu[:inter]).addmm_(grad_u0, w_gu[inter:])
        grad_w_gu = torch.cat([grad_g0.t() @ x, grad_u0.t() @ x]) if need[1] else None
        grad_w_d = grad_out.t() @ mixed if need[2] else None
        return (grad_x, grad_w_gu, grad_w_d, grads[3], grads[4], grads[5], grads[6], grads[7], grad_w, grad_keep,
                None, None, None)  # fmt: skip
