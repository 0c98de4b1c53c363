"""One generation API: text plus whatever images, speech and forecasts the model decides to produce.

The model writes text until it emits a generation token (``<|gen_image|>``, ``<|gen_audio|>``, ``<|gen_series|>``)
or ends its turn. A generation token ends the reply's text: the head's query slots are appended, one forward pass
gives their last-layer states, and the head turns them into the item (a diffusion sampling loop, or a forecast).
``output_modality`` skips the decision and asks for that modality directly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from unimoe.errors import InputError

from .outputs import Forecast, GeneratedAudio, MultimodalOutput

_HORIZON = re.compile(r"next\s+(\d+)", re.IGNORECASE)


class GenerationError(InputError):
    """A generation request this checkpoint cannot serve (e.g. an image from a model without an image decoder)."""


def _last_user_text(conversation: Sequence[dict]) -> str:
    for message in reversed(conversation):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return " ".join(p.get("text", "") for p in content if p.get("type", "text") == "text")
    return ""


def _require_head(model, modality: str) -> None:
    if modality not in model.model.generation_heads:
        makes = ", ".join(model.model.generation_heads) or "text only"
        kind = {"image": "image decoder (decoder_image/)", "audio": "audio decoder (decoder_audio/)",
                "series": "forecasting head"}.get(modality, f"{modality} generation head")  # fmt: skip
        raise GenerationError(f"this checkpoint has no {kind}, so it cannot generate {modality}; it generates: {makes}")


def sampling_kwargs(temperature: float) -> dict[str, Any]:
    """``generate()``'s sampling arguments for a temperature: 0 is greedy decoding, above 0 samples. A negative or
    non-finite temperature is refused (below 0 it fell back to greedy without a word; NaN too)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise GenerationError(f"temperature: must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    return {"do_sample": True, "temperature": float(temperature)} if temperature > 0 else {"do_sample": False}


@torch.no_grad()
def generate_multimodal(
    model,
    processor,
    messages: Sequence[dict] | Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int | Sequence[int] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    forecast_horizon: int | None = None,
    output_modality: str | None = None,
    streamer: Any = None,
) -> MultimodalOutput | list[MultimodalOutput]:
    """Answer one conversation (or a batch): ``MultimodalOutput(text, images, audio, forecasts)``.

    ``seed`` fixes text sampling and the diffusion noise (a saved and reloaded model then generates the identical
    image); a list gives each conversation its own diffusion noise, so its media do not depend on which other
    conversations share the batch (text sampling uses the first seed). ``num_inference_steps`` /
    ``guidance_scale`` override the heads' defaults; ``forecast_horizon`` defaults to "next N" in the last user
    turn, else the head's ``default_horizon``; ``streamer`` (batch of one) receives the text as it is generated."""
    sampling = sampling_kwargs(temperature)
    single = bool(messages) and isinstance(messages[0], dict)
    conversations = [list(messages)] if single else [list(c) for c in messages]
    if output_modality is not None:
        _require_head(model, output_modality)
    tok = processor.tokenizer
    inputs = processor(conversations, add_generation_prompt=True, return_labels=False).to(model.device)
    prompt_ids = inputs["input_ids"]
    batch = prompt_ids.shape[0]
    per_conversation = isinstance(seed, Sequence)
    if per_conversation and len(seed) != batch:
        raise GenerationError(f"seed: got {len(seed)} seeds for {batch} conversations (one per conversation)")
    if seed is not None:
        torch.manual_seed(int(seed[0] if per_conversation else seed))
    gen_ids = {int(i): m for m, i in processor.gen_token_ids.items()}

    if output_modality is not None:
        new_tokens = [[processor.gen_token_ids[output_modality]] for _ in range(batch)]
        texts = [""] * batch
    else:
        generated = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=[tok.eos_token_id, *gen_ids],
            streamer=streamer,
            **sampling,
        )
        new_tokens, texts = [], []
        for row in generated[:, prompt_ids.shape[1] :].tolist():
            stop = next((i for i, t in enumerate(row) if t == tok.eos_token_id or t in gen_ids), len(row))
            kept = row[: stop + 1] if stop < len(row) and row[stop] in gen_ids else row[:stop]
            new_tokens.append(kept)
            texts.append(tok.decode(row[:stop], skip_special_tokens=True).strip())
    outputs = [MultimodalOutput(text=t) for t in texts]

    requests = [(b, gen_ids[tokens[-1]]) for b, tokens in enumerate(new_tokens) if tokens and tokens[-1] in gen_ids]
    if output_modality is None:
        # A forecast continues the prompt's series. When the model itself chose to forecast (a poorly trained one
        # may) with no series in the prompt, there is nothing to continue: that reply keeps its text and gets no
        # forecast, instead of failing the whole batch. Asked for explicitly (output_modality), it stays an error.
        series = model.config.media_token_ids.get("series")
        requests = [(b, m) for b, m in requests
                    if m != "series" or (series is not None and bool((prompt_ids[b] == series).any()))]  # fmt: skip
    for _, modality in requests:
        _require_head(model, modality)
    if requests:
        if seed is None:
            generator = None
        elif per_conversation:
            generator = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seed]
        else:  # one stream for the whole batch
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
        _generate_items(model, processor, inputs, new_tokens, requests, outputs, conversations, generator=generator,
                        steps=num_inference_steps, guidance=guidance_scale, horizon=forecast_horizon)  # fmt: skip
    return outputs[0] if single else outputs


def _generate_items(model, processor, inputs, new_tokens, requests, outputs, conversations, *, generator, steps,
                    guidance, horizon) -> None:  # fmt: skip
    """Append each requesting row's generated tokens + query slots, run the model once, decode every item."""
    from .codecs import MelCodec, tensor_to_image

    pad = processor.tokenizer.pad_token_id
    prompt_ids, prompt_mask = inputs["input_ids"], inputs["attention_mask"]
    rows, masks = [], []
    requested = dict(requests)
    for b in range(prompt_ids.shape[0]):
        extra = list(new_tokens[b]) if b in requested else []
        if b in requested:
            modality = requested[b]
            extra += [processor.query_token_ids[modality]] * model.model.generation_heads[modality].config.num_queries
        rows.append(torch.cat([prompt_ids[b], torch.tensor(extra, dtype=torch.long, device=prompt_ids.device)]))
        masks.append(
            torch.cat([prompt_mask[b], torch.ones(len(extra), dtype=prompt_mask.dtype, device=prompt_mask.device)])
        )
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long, device=prompt_ids.device)
    attention_mask = torch.zeros_like(input_ids)
    for b, (row, mask) in enumerate(zip(rows, masks)):  # left padding, like the processor
        input_ids[b, length - len(row) :] = row
        attention_mask[b, length - len(row) :] = mask
    media = {k: v for k, v in inputs.items() if k.endswith(("_values", "_mask")) and k != "attention_mask"}
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **media)
    hidden = out.last_hidden_state
    heads = model.model.generation_heads
    order = {m: [b for b, mm in requests if mm == m] for m in heads}
    for modality, batch_rows in order.items():
        if not batch_rows:
            continue
        head = heads[modality]
        if modality == "series":
            series = (media.get("series_values"), media.get("series_mask"))
            context = model.model.forecast_context(input_ids, *series)
            prediction, loc, scale = model.forecast_prediction(input_ids, hidden, *series, context=context)
            raw, observed = context[3], context[4]
            values = prediction.float() * scale[:, None, None].float() + loc[:, None, None].float()  # (n, H_max, Q)
            for i, b in enumerate(batch_rows):
                h = horizon or _horizon_from_text(_last_user_text(conversations[b]), head.config)
                levels = head.config.quantiles
                quantiles = {q: values[i, :h, k].cpu().numpy() for k, q in enumerate(levels)}
                context = raw[i][observed[i] > 0].float().cpu().numpy()
                outputs[b].forecasts.append(Forecast(point=quantiles[0.5], quantiles=quantiles, context=context))
            continue
        states, mask = model.model.condition_states(input_ids, hidden, modality, attention_mask)
        rows_generator = [generator[b] for b in batch_rows] if isinstance(generator, list) else generator
        samples = head.sample(states, mask, num_inference_steps=steps, guidance_scale=guidance,
                              generator=rows_generator)  # fmt: skip
        codec = MelCodec(head.config) if modality == "audio" else None
        for i, b in enumerate(batch_rows):
            if codec is None:
                outputs[b].images.append(tensor_to_image(samples[i], head.config))
            else:
                outputs[b].audio.append(GeneratedAudio(codec.decode(samples[i].cpu()), head.config.sample_rate))


def _horizon_from_text(text: str, config) -> int:
    match = _HORIZON.search(text or "")
    h = int(match.group(1)) if match else config.default_horizon
    if not 1 <= h <= config.max_horizon:
        raise GenerationError(f"forecast horizon {h} is outside 1..{config.max_horizon} (the head's max_horizon)")
    return h


def forecast_outputs(model, processor, records: Sequence[dict], *, batch_size: int = 16) -> list[Forecast]:
    """Forecasts (median, quantiles, the context they continue) of evaluation records: prompt = messages before the
    answer, horizon = target length (the head's ``max_horizon`` when a record has no target)."""
    from unimoe.data.records import prompt_messages

    _require_head(model, "series")
    max_h = model.model.generation_heads["series"].config.max_horizon
    forecasts: list[Forecast] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        results = generate_multimodal(model, processor, [prompt_messages(r) for r in chunk], output_modality="series",
                                      forecast_horizon=max_h)  # fmt: skip
        for record, result in zip(chunk, results):
            forecasts.append(result.forecasts[0].fit_horizon(len(record.get("target") or []) or max_h))
    return forecasts


def forecast_records(model, processor, records: Sequence[dict], *, batch_size: int = 16) -> list[list[float]]:
    """Point forecasts (the medians) of evaluation records; see :func:`forecast_outputs`."""
    return [f.point.tolist() for f in forecast_outputs(model, processor, records, batch_size=batch_size)]


__all__ = ["GenerationError", "forecast_outputs", "forecast_records", "generate_multimodal", "sampling_kwargs"]
