import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import unimoe  # noqa: F401
from unimoe import CheckpointError, HubError
from unimoe.hub import EvalScore, check_checkpoint_dir, load_model, push_to_hub, save_checkpoint


def assert_same_logits(a, b):
    # Same weights, same inputs: equal up to fp32 kernel noise (safetensors-mapped tensors can take other
    # MKL code paths than freshly allocated ones).
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def _probe(tokenizer):
    return tokenizer(["What digit is this?", "seven"], return_tensors="pt", padding=True)


def test_save_load_round_trip_identical_logits(tiny_model, tokenizer, tmp_path):
    path = save_checkpoint(
        tiny_model, tmp_path / "ckpt", tokenizer=tokenizer, results=[EvalScore("digits_cls", "accuracy", 0.5)]
    )
    files = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "README.md",
        "tokenizer.json",
        "chat_template.jinja",
    } <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert json.loads((path / "config.json").read_text())["model_type"] == "unimoe"
    card = (path / "README.md").read_text()
    assert "model-index" in card and "digits_cls" in card and "| digits_cls | accuracy | 0.5000 |" in card

    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template == tokenizer.chat_template
    batch = _probe(tok)
    with torch.no_grad():
        assert_same_logits(loaded(**batch).logits, tiny_model(**batch).logits)
    assert loaded.generation_config.pad_token_id == tokenizer.pad_token_id
    # tied embeddings stay tied after loading
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()


def test_sharded_checkpoint(tiny_model, tokenizer, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "sharded", tokenizer=tokenizer, max_shard_size="200KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    loaded = load_model(path).eval()
    batch = _probe(tokenizer)
    with torch.no_grad():
        assert_same_logits(loaded(**batch).logits, tiny_model(**batch).logits)


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        check_checkpoint_dir(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing")


def test_the_python_api_refuses_pickled_weights_too(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    torch.save(weights, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_failed_save_keeps_previous_checkpoint(tiny_model, tokenizer, tmp_path, monkeypatch):
    path = save_checkpoint(tiny_model, tmp_path / "ckpt", tokenizer=tokenizer)
    before = (path / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    with torch.no_grad():
        tiny_model.lm_head.weight.add_(1.0)
    monkeypatch.setattr(tokenizer, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_model, path, tokenizer=tokenizer)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind


def test_extra_files_go_inside_the_checkpoint_or_nowhere(tiny_model, tokenizer, tmp_path):
    picture = tmp_path / "plot.png"
    picture.write_bytes(b"not really a png")
    path = save_checkpoint(tiny_model, tmp_path / "ckpt", tokenizer=tokenizer, extra_files={"images/p.png": picture})
    assert (path / "images" / "p.png").read_bytes() == b"not really a png"
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        save_checkpoint(tiny_model, path, tokenizer=tokenizer, extra_files={"../escape.png": picture})
    assert not (tmp_path / "escape.png").exists() and (path / "images" / "p.png").is_file()  # the old one is kept


def test_push_offline_is_one_clear_error(tiny_model, tmp_path, monkeypatch):
    path = save_checkpoint(tiny_model, tmp_path / "ckpt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="offline"):
        push_to_hub(path, "someone/unimoe-tiny")


def test_push_uploads_the_folder(tiny_model, tmp_path, monkeypatch):
    """The upload itself cannot happen here: record the calls HfApi receives."""
    path = save_checkpoint(tiny_model, tmp_path / "ckpt")
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs["private"]))

        def upload_folder(self, folder_path, repo_id, repo_type):
            calls.append(("upload_folder", folder_path, repo_id, repo_type))
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    url = push_to_hub(path, "me/tiny", private=True)
    assert url == "https://hub/me/tiny/commit/1"
    assert calls[1] == ("create_repo", "me/tiny", True)
    assert calls[2] == ("upload_folder", str(path), "me/tiny", "model")


def test_weights_that_do_not_fit_the_config_are_one_clear_error(tiny_model, tokenizer, tmp_path):
    """A config whose shapes no longer match the saved tensors (an older checkpoint, a hand edit): CheckpointError
    naming the directory, not transformers' RuntimeError."""
    save_checkpoint(tiny_model, tmp_path / "ckpt", tokenizer=tokenizer)
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    config["generation"]["series"]["skip_experts"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weights do not fit the model its config.json describes"):
        load_model(tmp_path / "ckpt")


def test_reloaded_moe_blocks_rebuild_their_non_persistent_buffers(tmp_path):
    """``modality_target`` and ``_load_since_update`` are not in the checkpoint: transformers builds the model on the
    meta device, so a reload must recompute them (left as raw memory they sent the modality-routing loss toward
    random experts)."""
    from unimoe import build_model
    from unimoe.moe import SparseMoEBlock

    experts = {"text": [0], "image": [1], "audio": [2, 3]}
    model = build_model("tiny", seed=0, moe={"modality_loss_coef": 0.1, "modality_experts": experts})
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    blocks = [m for m in loaded.modules() if isinstance(m, SparseMoEBlock)]
    assert blocks
    modalities = list(loaded.config.modalities)
    want = torch.zeros(len(modalities), blocks[0].config.num_total_experts, dtype=torch.bool)
    for name, ids in experts.items():
        want[modalities.index(name), ids] = True
    for block in blocks:
        assert torch.equal(block.modality_target, want)
        assert torch.equal(block._load_since_update, torch.zeros_like(block._load_since_update))


def test_missing_local_paths_fail_at_once_hub_ids_go_to_the_hub(tmp_path, monkeypatch):
    from unimoe.hub import looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for local in ("runs/missing", "./x", "/abs/x", "a/b/c", "~/x"):
        assert looks_local(local), local
    for hub_id in ("Qwen/Qwen2.5-0.5B", "gpt2"):
        assert not looks_local(hub_id), hub_id
    with pytest.raises(CheckpointError, match="runs/missing does not exist"):
        load_model("runs/missing")


def test_a_cut_short_weights_file_is_one_clear_error(tiny_model, tokenizer, tmp_path):
    """An interrupted copy or download: CheckpointError naming the file, not safetensors' error deep inside
    from_pretrained."""
    save_checkpoint(tiny_model, tmp_path / "ckpt", tokenizer=tokenizer)
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file .*cut short"):
        check_checkpoint_dir(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path / "ckpt")


def test_hub_ids_fail_at_once_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    """No local folder and no Hub: one line within seconds instead of a minute of retries; a Hub id already in the
    local cache loads from it without asking the Hub."""
    import huggingface_hub

    import unimoe.hub as hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(CheckpointError, match="runs/nope: no such local directory, and the Hugging Face Hub"):
        load_model("runs/nope")  # no runs/ here: it reads as a Hub id
    assert hub.hub_access("./local") == {}  # local paths never ask the Hub
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    assert hub.hub_access("org/cached") == {"local_files_only": True}
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    assert hub.hub_access("org/anything") == {}


def test_hub_probe_times_out_instead_of_retrying(monkeypatch):
    import socket

    import unimoe.hub as hub

    calls = []

    def refuse(address, timeout):
        calls.append((address, timeout))
        raise OSError("unreachable")

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    hub.hub_reachable.cache_clear()
    try:
        assert hub.hub_reachable() is False
        assert calls == [(("huggingface.co", 443), hub.HUB_PROBE_TIMEOUT_S)]
        hub.hub_reachable.cache_clear()
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # through a proxy the probe says nothing
        assert hub.hub_reachable() is True and len(calls) == 1
    finally:
        hub.hub_reachable.cache_clear()
