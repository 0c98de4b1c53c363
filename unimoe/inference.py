"""Creating and using checkpoints: ``init_checkpoint`` (a random model of a preset, ready for every command),
``load_pretrained`` (model + processor) and ``chat`` (single-turn multimodal inference)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unimoe.errors import CheckpointError, ConfigError
from unimoe.hub import check_checkpoint_dir, check_replaceable, save_checkpoint


def init_checkpoint(
    preset: str | Path,
    out: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    tokenizer_path: str | Path | None = None,
    seed: int = 0,
    extra_text: Sequence[str] = (),
) -> Path:
    """Write a randomly initialized checkpoint of a preset: model, processor, tokenizer, chat template, card."""
    from unimoe.presets import apply_overrides, build_model, load_preset
    from unimoe.processing_unimoe import UniMoEProcessor
    from unimoe.tokenizer import build_tokenizer

    check_replaceable(Path(out))
    preset_data = apply_overrides(load_preset(preset), overrides or {})
    tok_spec = preset_data.get("tokenizer") or {}
    if tokenizer_path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    elif tok_spec.get("kind") == "bpe":
        tokenizer = build_tokenizer(extra_text, vocab_size=int(tok_spec.get("vocab_size", 512)))
    else:
        raise ConfigError(
            f"preset {preset}: has no built-in tokenizer (tokenizer.kind: bpe); pass a tokenizer directory "
            "(--tokenizer) or upcycle a real checkpoint"
        )
    model = build_model(preset, overrides, seed=seed)
    if len(tokenizer) > model.config.text_config.vocab_size:
        vocab = model.config.text_config.vocab_size
        raise ConfigError(f"text_config.vocab_size: {vocab} is smaller than the tokenizer ({len(tokenizer)})")
    processor = UniMoEProcessor.from_model_config(tokenizer, model.config)
    for modality, token_id in processor.media_token_ids.items():
        if model.config.media_token_ids.get(modality) != token_id:
            raise ConfigError(
                f"media_token_ids.{modality}: the config says "
                f"{model.config.media_token_ids.get(modality)}, the tokenizer says {token_id}"
            )
    name = Path(out).name
    return save_checkpoint(
        model,
        out,
        processor=processor,
        model_name=name,
        notes=f"Randomly initialized from the `{Path(str(preset)).stem}` preset (seed {seed}).",
    )


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device to run a model on: ``auto`` (or None) is the GPU where CUDA is available, else the CPU; anything
    else is checked here so that a wrong name gives one line instead of an error deep inside the first forward."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} asked for, but CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise ConfigError(f"device: {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return resolved


def load_pretrained(path: str | Path, *, device: str | torch.device | None = None, **kwargs: Any):
    """``(model, processor)`` from a local checkpoint directory or a Hub id (safetensors only). ``device``: where the
    model goes (``auto`` = the GPU if there is one); None leaves it where it was loaded, on the CPU."""
    from transformers import AutoProcessor

    from unimoe.hub import hub_access, load_model

    model = load_model(path, **kwargs).eval()
    if device is not None:
        model = model.to(resolve_device(device))
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in tokenizer_files):
        raise CheckpointError(
            f"{path}: no tokenizer files ({', '.join(tokenizer_files)}); a checkpoint upcycled from a model without "
            "them needs the source model's tokenizer copied in"
        )
    try:
        processor = AutoProcessor.from_pretrained(str(path), **hub_access(path))
    except (OSError, ValueError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "backend tokenizer" in detail:  # transformers lists the files it tried, here none
            detail = "tokenizer_config.json is there, but no tokenizer.json (or vocab / merges files) to build it from"
        raise CheckpointError(f"{path}: no usable processor/tokenizer files ({detail})") from err
    return model, processor


def user_message(
    prompt: str,
    files: Sequence[str | Path] = (),
    modalities: Sequence[str | None] | None = None,
    readable: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One user turn: the media files, then the prompt. A file's modality is ``modalities``' entry, or guessed from
    the file (:func:`~unimoe.processing_unimoe.guess_modality`, among ``readable``, the modalities the model reads)."""
    from unimoe.processing_unimoe import guess_modality

    modalities = list(modalities or [None] * len(files))
    if len(modalities) not in (1, len(files)):
        raise ConfigError("--modality: give one for all files or one per file")
    if len(modalities) == 1 and len(files) > 1:
        modalities = modalities * len(files)
    content = [{"type": m or guess_modality(path, readable), "path": str(path)} for path, m in zip(files, modalities)]
    content.append({"type": "text", "text": prompt})
    return {"role": "user", "content": content}


@torch.no_grad()
def respond(
    model,
    processor,
    prompt: str,
    files: Sequence[str | Path] = (),
    *,
    modalities: Sequence[str | None] | None = None,
    output: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
):
    """Answer one user turn with text and any generated media (:class:`unimoe.generation.MultimodalOutput`).
    ``output`` (``image`` / ``audio`` / ``series``) asks for that medium instead of letting the model decide."""
    from unimoe.generation.api import generate_multimodal

    return generate_multimodal(
        model,
        processor,
        [user_message(prompt, files, modalities, getattr(processor, "modalities", None))],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        output_modality=output,
    )


@torch.no_grad()
def chat(
    model,
    processor,
    prompt: str,
    files: Sequence[str | Path] = (),
    *,
    modalities: Sequence[str | None] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int | None = None,
) -> str:
    """Answer one user turn with text and media files (modality from the suffix unless given)."""
    from unimoe.generation.api import sampling_kwargs

    sampling = sampling_kwargs(temperature)
    message = user_message(prompt, files, modalities, getattr(processor, "modalities", None))
    inputs = processor([message], add_generation_prompt=True, return_labels=False)
    inputs = inputs.to(model.device)
    if seed is not None:
        torch.manual_seed(seed)
    generated = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        pad_token_id=processor.tokenizer.pad_token_id,
        eos_token_id=processor.tokenizer.eos_token_id,
        **sampling,
    )
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


__all__ = ["chat", "check_checkpoint_dir", "init_checkpoint", "load_pretrained", "respond", "user_message"]
