"""Token dispatch: sort the routed slots by expert once per layer, then let experts work on contiguous chunks.

Why by hand: transformers' eager experts index the fused weight per expert (``w[e]``) under autograd, whose
backward materialises a full-size zero gradient for every expert (1.3-1.6x a dense MLP at 8 experts, 10.8x at 64
on a 2-core CPU). Sorting once and walking ``unbind``-ed weight views over per-expert chunks keeps the backward at
one gradient buffer per weight. ``F.grouped_mm`` does the same in one kernel where it wins (CUDA, bf16).

The loop backend runs each expert's whole computation on its own chunk (``gather_chunks`` ... ``scatter_chunks``)
instead of ``(N, ·)`` tensors over all slots: measured in ``bench/moe_layer.py``, the per-slot tensors (N = T * k rows
of width 2I) are large enough that the CPU allocator hands them out as fresh ``mmap``-ed pages every call, and the page
faults cost more than the arithmetic on them; per-expert chunks stay small and are reused from the heap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DispatchPlan:
    """Routed slots sorted by expert (null, unselected and dropped slots removed)."""

    token_index: torch.Tensor  # (N,) long: the token of each slot, sorted by expert
    weight: torch.Tensor  # (N,) routing weight of each slot
    counts: list[int]  # (E,) slots per real expert, as host ints
    offsets: torch.Tensor  # (E,) int32 cumulative counts (grouped_mm's `offs`)
    num_tokens: int
    # every (unpadded) token's routing weights over its computed slots sum to one: renormalized top-k / top-p with
    # no null experts and no dropping. Experts may then drop terms weighted by ``1 - sum_e w_e`` (LoRA experts do).
    weights_sum_to_one: bool = False

    def token_chunks(self) -> list[torch.Tensor]:
        """Per-expert token indices (views of ``token_index``), one per expert, empty ones included."""
        return list(self.token_index.split(self.counts))

    def weight_chunks(self) -> list[torch.Tensor]:
        """Per-expert routing weights ``(n_e, 1)`` (views of ``weight``)."""
        return list(self.weight.unsqueeze(-1).split(self.counts))


def make_plan(
    expert_index: torch.Tensor,
    weight: torch.Tensor,
    computed: torch.Tensor,
    num_experts: int,
    *,
    weights_sum_to_one: bool = False,
) -> DispatchPlan:
    """Build the plan from ``(T, k)`` routing tensors. One host sync (the chunk sizes).

    ``weights_sum_to_one`` is a promise from the caller about how ``weight`` was made (see :class:`DispatchPlan`);
    it is not checked here, which would cost a reduction and a host sync per layer."""
    num_tokens, k = expert_index.shape
    flat = torch.where(computed, expert_index, num_experts).reshape(-1)  # (T*k,), sentinel = num_experts
    order = torch.sort(flat, stable=True).indices  # stable: token order inside an expert (capacity relies on it)
    counts_t = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    counts = counts_t.tolist()  # the one host sync of the layer
    order = order[: sum(counts)]
    return DispatchPlan(
        token_index=order // k,
        weight=weight.reshape(-1).index_select(0, order),
        counts=counts,
        offsets=counts_t.cumsum(0).to(torch.int32),
        num_tokens=num_tokens,
        weights_sum_to_one=weights_sum_to_one,
    )


def use_grouped_mm(backend: str, tensor: torch.Tensor) -> bool:
    """``auto`` picks grouped_mm on CUDA (where one kernel beats a Python loop), the loop on CPU (where the
    per-expert loop measured faster in ``bench/moe_layer.py``)."""
    if backend == "grouped_mm":
        return True
    if backend == "loop":
        return False
    return tensor.is_cuda and hasattr(F, "grouped_mm")


# ------------------------------------------------------------------------------------------------ grouped backend
def grouped_linear(x: torch.Tensor, weight: torch.Tensor, plan: DispatchPlan, grouped: bool) -> torch.Tensor:
    """Per-expert ``x_e @ weight[e].T`` on the sorted slots.

    Args:
        x: ``(N, in)`` rows sorted by expert.
        weight: ``(E, out, in)`` fused expert weights (transformers' layout).
    Returns:
        ``(N, out)``.
    """
    if grouped and _grouped_mm_aligned(weight):
        # grouped_mm wants contiguous inputs; the weight is read as (E, in, out) through a transposed view.
        return F.grouped_mm(x.contiguous(), weight.transpose(1, 2), offs=plan.offsets)
    outputs = [
        F.linear(chunk, w)
        for chunk, w, n in zip(x.split(plan.counts), weight.unbind(0), plan.counts)  # views, no per-expert copy
        if n > 0
    ]
    if not outputs:
        return x.new_zeros(0, weight.shape[1])
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def _grouped_mm_aligned(weight: torch.Tensor) -> bool:
    """grouped_mm needs every stride a multiple of 16 bytes ("strides should be multiple of 16 bytes"): widths such
    as a LoRA rank of 3 in fp32 fail, so those products take the per-expert loop instead."""
    return all((n * weight.element_size()) % 16 == 0 for n in weight.shape[1:])


def combine(slot_outputs: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Weight each slot's output and sum it back onto its token.  # (N, H) -> (T, H)"""
    weighted = slot_outputs * plan.weight.to(slot_outputs.dtype).unsqueeze(-1)
    out = slot_outputs.new_zeros(plan.num_tokens, slot_outputs.shape[-1])
    return out.index_add(0, plan.token_index, weighted)


# ------------------------------------------------------------------------------------------------ loop backend
class _GatherChunks(torch.autograd.Function):
    """``x (T, D)`` -> one ``(n_e, D)`` row gather per expert. The backward adds every chunk's gradient into one
    ``(T, D)`` buffer (autograd's own would allocate a zero ``(T, D)`` per chunk, or a ``(N, D)`` cat)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *indices: torch.Tensor):
        ctx.save_for_backward(*indices)
        ctx.shape = x.shape
        return tuple(x.index_select(0, idx) for idx in indices)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        indices = ctx.saved_tensors
        grad_x = None
        for idx, g in zip(indices, grads):
            if g is None or idx.numel() == 0:
                continue
            if grad_x is None:
                grad_x = g.new_zeros(ctx.shape)
            grad_x.index_add_(0, idx, g)
        return (grad_x, *([None] * len(indices)))


class _ScatterChunks(torch.autograd.Function):
    """``base (T, D)`` plus per-expert rows ``(n_e, D)`` added onto their tokens -> ``(T, D)``; the backward is one
    row gather per chunk (no ``(N, D)`` concatenation, no zero-filled per-chunk buffers)."""

    @staticmethod
    def forward(ctx, base: torch.Tensor | None, num_tokens: int, indices: tuple, *chunks: torch.Tensor):
        ctx.indices = indices  # integer tensors, never differentiated
        ctx.has_base = base is not None
        width = chunks[0].shape[-1]
        out = base.clone() if base is not None else chunks[0].new_zeros(num_tokens, width)
        for idx, chunk in zip(indices, chunks):
            out.index_add_(0, idx, chunk)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        indices = ctx.indices
        grad_base = grad if ctx.has_base and ctx.needs_input_grad[0] else None
        grads = [grad.index_select(0, idx) if ctx.needs_input_grad[3 + i] else None for i, idx in enumerate(indices)]
        return (grad_base, None, None, *grads)


def gather_chunks(x: torch.Tensor, plan: DispatchPlan) -> list[torch.Tensor]:
    """The rows of ``x (T, D)`` each expert works on, one ``(n_e, D)`` tensor per expert (empty ones included)."""
    return list(_GatherChunks.apply(x, *plan.token_chunks()))


def scatter_chunks(chunks: list[torch.Tensor], plan: DispatchPlan, base: torch.Tensor | None = None) -> torch.Tensor:
    """Sum per-expert rows ``(n_e, D)`` back onto their tokens: ``(T, D)`` (``base`` + the rows, if given)."""
    indices = plan.token_chunks()
    pairs = [(i, c) for i, c in zip(indices, chunks) if i.numel() > 0]
    if not pairs:
        if base is not None:
            return base
        return chunks[0].new_zeros(plan.num_tokens, chunks[0].shape[-1])
    idx, ch = zip(*pairs)
    return _ScatterChunks.apply(base, plan.num_tokens, tuple(idx), *ch)
