"""Sparse upcycling: turn a dense transformers decoder (Qwen2 / Qwen3 / Llama family) into a UniMoE model.

At initialization the upcycled model computes exactly what the dense model computes:

* ``ffn`` experts are copies of the dense FFN and the routing weights are renormalized to sum to one, so any
  mixture of identical experts is the dense FFN;
* ``lora`` experts wrap the dense FFN (frozen) and start with zero ``B`` factors, so every delta is zero;
* shared experts start from the dense gate/up weights with a zero down projection (they contribute nothing until
  trained).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unimoe.configuration_unimoe import UniMoEConfig, supported_decoders
from unimoe.errors import CheckpointError, ConfigError
from unimoe.hub import check_checkpoint_dir, check_replaceable, save_checkpoint
from unimoe.moe import LoRAExperts, SparseMoEBlock, SwiGLUExperts


def upcycle_model(
    dense: torch.nn.Module,
    *,
    num_experts: int,
    top_k: int,
    expert_type: str = "ffn",
    num_shared_experts: int = 0,
    moe_layers: list[int] | None = None,
    moe_layer_freq: int = 1,
    seed: int = 0,
    **moe_kwargs: Any,
):
    """Build a :class:`UniMoEForConditionalGeneration` from an in-memory dense causal LM."""
    from unimoe.modeling_unimoe import UniMoEForConditionalGeneration

    dense_cfg = dense.config
    if dense_cfg.model_type not in supported_decoders():
        raise ConfigError(
            f"upcycle: dense model type {dense_cfg.model_type!r} is not supported; choose one of "
            f"{', '.join(supported_decoders())}"
        )
    moe = {
        "num_experts": num_experts,
        "top_k": top_k,
        "expert_type": expert_type,
        "num_shared_experts": num_shared_experts,
        "moe_layers": moe_layers,
        "moe_layer_freq": moe_layer_freq,
        "norm_topk_prob": True,  # copies of one FFN mixed with weights summing to 1 = the FFN
        "hidden_act": dense_cfg.hidden_act,
        **moe_kwargs,
    }
    if expert_type == "ffn" and moe.get("expert_intermediate_size") not in (None, dense_cfg.intermediate_size):
        raise ConfigError(
            "upcycle: moe.expert_intermediate_size must equal the dense intermediate_size for ffn experts"
        )
    moe.pop("expert_intermediate_size", None)
    config = UniMoEConfig(text_config=dense_cfg.to_dict(), moe=moe)

    torch.manual_seed(seed)
    model = UniMoEForConditionalGeneration(config).to(next(dense.parameters()).dtype)
    dense_state = dense.state_dict()
    state = {}
    for key, value in dense_state.items():
        if key.startswith("model."):
            state["model.language_model." + key[len("model.") :]] = value
        else:
            state[key] = value

    layers = model.model.language_model.layers
    for i, layer in enumerate(layers):
        if not isinstance(layer.mlp, SparseMoEBlock):
            continue
        prefix = f"model.language_model.layers.{i}.mlp."
        gate = state.pop(prefix + "gate_proj.weight")  # (I, H)
        up = state.pop(prefix + "up_proj.weight")  # (I, H)
        down = state.pop(prefix + "down_proj.weight")  # (H, I)
        gate_up = torch.cat([gate, up], dim=0)  # (2I, H)
        block: SparseMoEBlock = layer.mlp
        with torch.no_grad():
            if isinstance(block.experts, SwiGLUExperts):
                block.experts.gate_up_proj.copy_(gate_up.unsqueeze(0).expand_as(block.experts.gate_up_proj))
                block.experts.down_proj.copy_(down.unsqueeze(0).expand_as(block.experts.down_proj))
            elif isinstance(block.experts, LoRAExperts):
                block.experts.gate_up_proj.copy_(gate_up)
                block.experts.down_proj.copy_(down)
                block.experts.reset_lora()
            if block.shared_experts is not None:
                shared = block.shared_experts
                if shared.gate_proj.weight.shape[0] % gate.shape[0] == 0:
                    reps = shared.gate_proj.weight.shape[0] // gate.shape[0]
                    shared.gate_proj.weight.copy_(gate.repeat(reps, 1))
                    shared.up_proj.weight.copy_(up.repeat(reps, 1))
                shared.down_proj.weight.zero_()

    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if "rotary_emb" not in k]
    if unexpected:
        raise CheckpointError(f"upcycle: dense weights with no place in the MoE model: {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = dense.generation_config
    return model


def upcycle_checkpoint(src: str | Path, out: str | Path, *, dtype: str = "float32", **kwargs: Any) -> Path:
    """Read a local dense checkpoint (safetensors only), upcycle it, and write a UniMoE checkpoint to ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = check_checkpoint_dir(src)
    check_replaceable(Path(out))  # before the (possibly large) dense model is read
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ConfigError(f"upcycle: unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    dense = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch_dtype, use_safetensors=True)
    model = upcycle_model(dense, **kwargs)
    tokenizer = None
    if (src / "tokenizer_config.json").is_file() or (src / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    return save_checkpoint(
        model,
        out,
        tokenizer=tokenizer,
        model_name=Path(out).name,
        notes=f"Upcycled from the dense checkpoint `{src.name}` ({dense.config.model_type}).",
    )
