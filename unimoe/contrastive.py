"""The media-text contrastive objective: InfoNCE between the mean of an item's media tokens and the mean word
embedding of its text answer, next to the language-modelling loss (``UniMoEForConditionalGeneration.forward``,
``media_text_loss_coef``).

Like the image-text contrastive objective of ALBEF / BLIP-2's first stage, it gives the encoders and connectors a
direct signal of what an item is about; the language-modelling gradient reaches them only through the decoder.
Measured: see the tiny recipe and docs/results.md (session 16).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def media_text_contrastive_loss(
    media: torch.Tensor, text: torch.Tensor, answer_keys: list, temperature: float
) -> torch.Tensor:
    """Symmetric InfoNCE between pooled media embeddings ``(N, H)`` and pooled answer embeddings ``(N, H)``.

    Rows whose answers are equal (``answer_keys``) are all positives of each other, each with an equal share of the
    target (UniCL's multi-positive form). Written here rather than taken from open_clip: its ``ClipLoss`` gives the
    diagonal the whole target, so in a batch of a 40-answer task every second pair of equal answers would be pushed
    apart as a negative. Returns 0 (with a graph) for fewer than two rows or when all answers are equal."""
    if media.shape[0] < 2:
        return media.sum() * 0.0
    index = {key: i for i, key in enumerate(dict.fromkeys(answer_keys))}
    if len(index) < 2:
        return media.sum() * 0.0
    ids = torch.tensor([index[k] for k in answer_keys], device=media.device)
    same = (ids[:, None] == ids[None, :]).float()  # (N, N)
    target = same / same.sum(dim=1, keepdim=True)
    logits = F.normalize(media.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T / temperature  # (N, N)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def media_text_loss(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    inputs_embeds: torch.Tensor,
    word_embeddings: torch.nn.Module,
    *,
    media_ids: list[int],
    query_ids: list[int],
    eos_ids: list[int],
    temperature: float,
    allowed: torch.BoolTensor | None = None,
) -> torch.Tensor:
    """The loss of a batch: each row with media tokens (``media_ids``) and a text answer gives the mean of its media
    tokens (the connectors' output, ``inputs_embeds (B, S, H)`` at the placeholders) and the mean embedding of its
    answer tokens, held fixed (no gradient into the word embeddings, which the LM head shares). Rows with generation
    query slots (``query_ids``: their answer is media), rows without media and rows that ``allowed (B,)``, when
    given, marks False are left out; so is the end-of-turn token (``eos_ids``) from the answers."""
    device = input_ids.device
    is_media = torch.isin(input_ids, torch.tensor(media_ids, device=device))  # (B, S)
    is_answer = (labels != -100) & ~is_media  # (B, S): the answer's words, not the end-of-turn token
    if eos_ids:
        is_answer &= ~torch.isin(input_ids, torch.tensor(eos_ids, device=device))
    keep = is_media.any(dim=1) & is_answer.any(dim=1)  # (B,)
    if query_ids:
        keep &= ~torch.isin(input_ids, torch.tensor(query_ids, device=device)).any(dim=1)
    if allowed is not None:
        keep &= allowed.to(device, torch.bool)
    rows = keep.nonzero().flatten().tolist()  # one host sync per training step
    if len(rows) < 2:
        return inputs_embeds.sum() * 0.0
    media_mask = is_media[rows].unsqueeze(-1).to(inputs_embeds.dtype)  # (N, S, 1)
    media = (inputs_embeds[rows] * media_mask).sum(1) / media_mask.sum(1)  # (N, H)
    answer_mask = is_answer[rows].unsqueeze(-1).to(inputs_embeds.dtype)  # (N, S, 1)
    with torch.no_grad():
        words = word_embeddings(input_ids[rows])  # (N, S, H)
        text = (words * answer_mask).sum(1) / answer_mask.sum(1)  # (N, H)
    keys = [tuple(input_ids[r][is_answer[r]].tolist()) for r in rows]
    return media_text_contrastive_loss(media, text, keys, temperature)
