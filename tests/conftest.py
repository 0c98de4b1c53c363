import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tokenizer():
    from unimoe.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def tiny_model():
    from unimoe import build_model

    return build_model("tiny", seed=0).eval()


@pytest.fixture
def dense_qwen2_dir(tmp_path):
    """A tiny dense Qwen2 checkpoint written by the test (safetensors)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config).eval()
    path = tmp_path / "dense-qwen2"
    model.save_pretrained(path)
    return path
