import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import unimoe  # noqa: F401
from unimoe import ConfigError
from unimoe.moe import LoRAExperts, SwiGLUExperts
from unimoe.upcycle import upcycle_checkpoint, upcycle_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("expert_type", ["ffn", "lora"])
@pytest.mark.parametrize("shared", [0, 1])
def test_upcycled_checkpoint_reproduces_dense_logits(dense_qwen2_dir, tmp_path, expert_type, shared):
    dense = AutoModelForCausalLM.from_pretrained(dense_qwen2_dir).eval()
    ids = torch.randint(0, 320, (2, 11))
    out = upcycle_checkpoint(
        dense_qwen2_dir, tmp_path / "moe", num_experts=4, top_k=2, expert_type=expert_type, num_shared_experts=shared
    )
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(moe).__name__ == "UniMoEForConditionalGeneration"
    experts = moe.model.language_model.layers[0].mlp.experts
    assert isinstance(experts, SwiGLUExperts if expert_type == "ffn" else LoRAExperts)
    torch.testing.assert_close(_logits(moe, ids), _logits(dense, ids), atol=1e-5, rtol=1e-5)
    # and greedy generation agrees
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(moe.generate(input_ids=ids, **kw), dense.generate(input_ids=ids, **kw))


def test_upcycle_topp_subset_of_layers_llama():
    torch.manual_seed(0)
    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    ).eval()
    moe = upcycle_model(dense, num_experts=3, top_k=2, expert_type="ffn", moe_layers=[1], routing="topp", top_p=0.5)
    assert [layer.is_moe for layer in moe.model.language_model.layers] == [False, True, False]
    ids = torch.randint(0, 100, (1, 7))
    torch.testing.assert_close(_logits(moe.eval(), ids), _logits(dense, ids), atol=1e-5, rtol=1e-5)


def test_upcycled_model_diverges_once_trained(dense_qwen2_dir):
    """Parity is a property of the initialization, not an accident of a dead MoE path."""
    dense = AutoModelForCausalLM.from_pretrained(dense_qwen2_dir)
    moe = upcycle_model(dense, num_experts=4, top_k=2, expert_type="lora")
    ids = torch.randint(0, 320, (2, 9))
    opt = torch.optim.SGD([p for p in moe.parameters() if p.requires_grad], lr=0.1)
    moe.train()
    moe(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.allclose(_logits(moe.eval(), ids), _logits(dense.eval(), ids), atol=1e-4)
    # the frozen base FFN did not move
    base = moe.model.language_model.layers[0].mlp.experts.gate_up_proj
    assert not base.requires_grad


def test_upcycle_rejects_unsupported_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    dense = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ConfigError, match="not supported"):
        upcycle_model(dense, num_experts=2, top_k=1)


def test_an_upcycled_checkpoint_without_a_tokenizer_says_so(dense_qwen2_dir, tmp_path):
    from unimoe import CheckpointError
    from unimoe.inference import load_pretrained

    out = upcycle_checkpoint(dense_qwen2_dir, tmp_path / "moe", num_experts=2, top_k=1)  # the source has no tokenizer
    with pytest.raises(CheckpointError, match="no tokenizer files .*source model's tokenizer copied in"):
        load_pretrained(out)
