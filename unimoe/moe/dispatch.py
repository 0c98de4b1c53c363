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
    """Routed slots sorted by expert.

    Two forms. The *trimmed* plan (the loop backend) drops the slots that need no compute (null experts, slots
    top-p left unused, dropped slots, padding) and knows the chunk sizes on the host, at the cost of one host sync.
    The *sync-free* plan (grouped_mm on a GPU, where a host sync stalls the queue of kernels) keeps all ``T * k``
    slots: those needing no compute sort last, past ``offsets[-1]``, with weight 0, and ``row_mask`` marks the rows
    that hold a computed slot (None when every slot is computed).
    """

    token_index: torch.Tensor  # (N,) long: the token of each slot, sorted by expert
    slot_index: torch.Tensor  # (N,) long: the position of each slot in the token-major (T * k) order, sorted by expert
    weight: torch.Tensor  # (N,) routing weight of each slot
    counts: list[int] | None  # (E,) slots per real expert, as host ints (None in a sync-free plan)
    offsets: torch.Tensor  # (E,) int32 cumulative counts (grouped_mm's `offs`)
    num_tokens: int
    slots_per_token: int  # k
    # every (unpadded) token's routing weights over its computed slots sum to one: renormalized top-k / top-p with
    # no null experts and no dropping. Experts may then drop terms weighted by ``1 - sum_e w_e`` (LoRA experts do).
    weights_sum_to_one: bool = False
    row_mask: torch.Tensor | None = None  # (N, 1) bool, sync-free plans with uncomputed slots: the computed rows

    def host_counts(self) -> list[int]:
        """The chunk sizes on the host; a sync-free plan reads them back (a sync) and adds the uncomputed rows as a
        last chunk."""
        if self.counts is not None:
            return self.counts
        counts = torch.diff(self.offsets, prepend=self.offsets.new_zeros(1)).tolist()
        return [*counts, self.token_index.shape[0] - sum(counts)]

    def token_chunks(self) -> list[torch.Tensor]:
        """Per-expert token indices (views of ``token_index``), one per expert, empty ones included."""
        return list(self.token_index.split(self._trimmed_counts()))

    def weight_chunks(self) -> list[torch.Tensor]:
        """Per-expert routing weights ``(n_e, 1)`` (views of ``weight``)."""
        return list(self.weight.unsqueeze(-1).split(self._trimmed_counts()))

    def _trimmed_counts(self) -> list[int]:
        if self.counts is None:
            raise ValueError("the loop backend needs a trimmed plan (make_plan(..., sync_free=False))")
        return self.counts


def make_plan(
    expert_index: torch.Tensor,
    weight: torch.Tensor,
    computed: torch.Tensor,
    num_experts: int,
    *,
    weights_sum_to_one: bool = False,
    sync_free: bool = False,
    all_computed: bool = False,
) -> DispatchPlan:
    """Build the plan from ``(T, k)`` routing tensors: trimmed (one host sync, the chunk sizes) or ``sync_free``
    (see :class:`DispatchPlan`).

    ``weights_sum_to_one`` and ``all_computed`` (every slot needs compute: top-k, no null experts, no capacity, no
    padding) are promises from the caller about how the routing was made; they are not checked here, which would
    cost a reduction and a host sync per layer."""
    num_tokens, k = expert_index.shape
    flat = torch.where(computed, expert_index, num_experts).reshape(-1)  # (T*k,), sentinel = num_experts
    order = torch.sort(flat, stable=True).indices  # stable: token order inside an expert (capacity relies on it)
    # not bincount: on a GPU it reads its input's maximum back to the host
    counts_t = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    counts_t = counts_t.index_add_(0, flat, torch.ones_like(flat))[:num_experts]
    offsets = counts_t.cumsum(0).to(torch.int32)
    counts, row_mask = None, None
    if not sync_free:
        counts = counts_t.tolist()  # the one host sync of the layer
        order = order[: sum(counts)]
    elif not all_computed:
        weight = torch.where(computed, weight, 0)
        row_mask = (torch.arange(flat.numel(), device=flat.device) < offsets[-1]).unsqueeze(-1)
    return DispatchPlan(
        token_index=order // k,
        slot_index=order,
        weight=weight.reshape(-1).index_select(0, order),
        counts=counts,
        offsets=offsets,
        num_tokens=num_tokens,
        slots_per_token=k,
        weights_sum_to_one=weights_sum_to_one,
        row_mask=row_mask,
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
        mask = plan.row_mask
        if mask is not None:
            # grouped_mm leaves the rows past the last group unwritten (whatever the memory held, NaN included), in
            # its output and in its input's gradient; `where` (not a product) replaces both with zeros
            x = torch.where(mask, x, 0)
        # grouped_mm wants contiguous inputs; the weight is read as (E, in, out) through a transposed view.
        out = F.grouped_mm(x.contiguous(), weight.transpose(1, 2), offs=plan.offsets)
        return out if mask is None else torch.where(mask, out, 0)
    counts = plan.host_counts()
    outputs = [
        F.linear(chunk, w) if i < len(weight) else chunk.new_zeros(n, weight.shape[1])  # the uncomputed rows: 0
        for i, (chunk, w, n) in enumerate(zip(x.split(counts), [*weight.unbind(0), None], counts))  # views
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
    return scatter_slots(slot_outputs * plan.weight.to(slot_outputs.dtype).unsqueeze(-1), plan)


# Moving rows between tokens and slots. Why by hand: ``x.index_select(0, token_index)`` has an ``index_add`` for its
# backward, and so does summing the slots back with ``index_add``: atomic adds, which on a GPU in bf16 took ~30% of
# the kernel time of an E64-top8 layer's forward + backward (H100, 16k tokens), and their order of additions varies
# from run to run. Every slot has its own row in the token-major ``(T * k)`` order, so a slot's row can be *written*
# there (``index_copy_``, no two writes to one row) and a token's k rows summed by a plain reduction.
def _slots_to_tokens(rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Sum each token's slot rows: ``(N, D)`` sorted by expert -> ``(T, D)`` (slots that were not computed add 0)."""
    t, k = plan.num_tokens, plan.slots_per_token
    if k == 1 and rows.shape[0] == t:  # every token has its one slot: a permutation
        return rows.new_empty(t, rows.shape[-1]).index_copy_(0, plan.slot_index, rows)
    full = rows.new_empty if rows.shape[0] == t * k else rows.new_zeros
    by_slot = full(t * k, rows.shape[-1]).index_copy_(0, plan.slot_index, rows)  # (T * k, D)
    return by_slot.view(t, k, -1).sum(1)


class _GatherSlots(torch.autograd.Function):
    """``x (T, D)`` -> ``x[token_index] (N, D)``; the backward sums each token's slot gradients without atomics."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: DispatchPlan):
        ctx.plan = plan
        return x.index_select(0, plan.token_index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _slots_to_tokens(grad, ctx.plan), None


class _ScatterSlots(torch.autograd.Function):
    """``rows (N, D)`` -> their sum per token ``(T, D)``; the backward is a row gather."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, plan: DispatchPlan):
        ctx.plan = plan
        return _slots_to_tokens(rows, plan)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_select(0, ctx.plan.token_index), None


def gather_slots(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """The token rows of every slot, sorted by expert.  # (T, D) -> (N, D)"""
    return _GatherSlots.apply(x, plan)


def scatter_slots(rows: torch.Tensor, plan: DispatchPlan, base: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's sum over its slots' rows (plus ``base``).  # (N, D) -> (T, D)"""
    out = _ScatterSlots.apply(rows, plan)
    return out if base is None else base + out


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
