import pytest
import torch

from unimoe import UniMoEForConditionalGeneration, build_model


def _batch(tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_forward_returns_named_losses(tiny_model, tokenizer):
    batch = _batch(tokenizer, ["What digit is this?", "seven"])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = tiny_model(**batch, labels=labels, output_router_stats=True)
    moe = tiny_model.config.moe_config
    expected = out.lm_loss + moe.aux_loss_coef * out.aux_loss + moe.z_loss_coef * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    assert out.logits.shape == (*batch["input_ids"].shape, tiny_model.config.text_config.vocab_size)
    assert len(out.router_stats) == len(tiny_model.config.moe_layer_indices()) == 4
    # every real token routes top-k slots; padding routes nothing
    real = int(batch["attention_mask"].sum())
    for stats in out.router_stats:
        assert stats.load.sum().item() == real * moe.top_k
        assert stats.num_tokens.item() == real


def test_backward_reaches_router_experts_and_embeddings(tiny_model, tokenizer):
    tiny_model.train()
    batch = _batch(tokenizer, ["one two three", "four"])
    out = tiny_model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    block = tiny_model.model.language_model.layers[0].mlp
    for p in (
        block.router.weight,
        block.experts.gate_up_proj,
        block.experts.down_proj,
        tiny_model.model.language_model.embed_tokens.weight,
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_inputs_embeds_equals_input_ids(tiny_model, tokenizer):
    batch = _batch(tokenizer, ["a shape of a box"])
    embeds = tiny_model.get_input_embeddings()(batch["input_ids"])
    a = tiny_model(input_ids=batch["input_ids"]).logits
    b = tiny_model(inputs_embeds=embeds).logits
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        tiny_model(input_ids=batch["input_ids"], inputs_embeds=embeds)


def test_an_input_longer_than_the_positions_is_refused(tiny_model):
    from unimoe.errors import InputError

    limit = tiny_model.config.text_config.max_position_embeddings
    tiny_model(input_ids=torch.ones(1, limit, dtype=torch.long))  # the limit itself is fine
    with pytest.raises(InputError, match=rf"the input has {limit + 1} tokens, more than the model's {limit}"):
        tiny_model(input_ids=torch.ones(1, limit + 1, dtype=torch.long))


def test_left_padding_does_not_change_predictions(tiny_model, tokenizer):
    texts = ["What digit is this? seven", "two"]
    single = [tiny_model(**_batch(tokenizer, [t])).logits[0, -1] for t in texts]
    batched = tiny_model(**_batch(tokenizer, texts)).logits[:, -1]
    for i in range(2):
        torch.testing.assert_close(batched[i], single[i], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_generate_with_and_without_cache(family, tokenizer):
    model = build_model("tiny", seed=1, text_config={"model_type": family}).eval()
    batch = _batch(tokenizer, ["What digit is", "Draw the digit seven please"])
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    cached = model.generate(**batch, use_cache=True, **kwargs)
    uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert cached.shape[1] == batch["input_ids"].shape[1] + 10
    assert torch.equal(cached, uncached)


def test_modality_ids_feed_per_modality_statistics(tiny_model):
    ids = torch.randint(10, 500, (1, 12))
    modality_ids = torch.zeros_like(ids)
    modality_ids[0, 2:7] = 1  # five "image" tokens
    out = tiny_model(input_ids=ids, modality_ids=modality_ids, output_router_stats=True)
    k = tiny_model.config.moe_config.top_k
    for stats in out.router_stats:
        per_mod = stats.load_per_modality.sum(-1)
        assert per_mod[0].item() == 7 * k and per_mod[1].item() == 5 * k and per_mod[2:].sum() == 0
    # generation passes modality ids on the first step only
    gen = tiny_model.generate(input_ids=ids, modality_ids=modality_ids, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == 15


def test_modality_routing_loss_pulls_toward_assigned_experts(tokenizer):
    model = build_model("tiny", seed=0, moe={"modality_loss_coef": 1.0, "modality_experts": {"image": [0]}})
    ids = torch.randint(10, 500, (2, 8))
    modality_ids = torch.ones_like(ids)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "router" in n], lr=0.5)
    losses = []
    for _ in range(15):
        out = model(input_ids=ids, modality_ids=modality_ids, labels=ids)
        out.modality_loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.modality_loss.item())
    assert losses[-1] < losses[0] * 0.5


def test_dense_layers_between_moe_layers():
    model = build_model("tiny", moe={"moe_layer_freq": 2})
    kinds = [layer.is_moe for layer in model.model.language_model.layers]
    assert kinds == [False, True, False, True]
    out = model(input_ids=torch.randint(0, 500, (1, 5)), output_router_stats=True)
    assert len(out.router_stats) == 2


def test_aux_loss_free_bias_updates_after_steps():
    model = build_model("tiny", seed=0, moe={"router_bias_update_rate": 0.01, "aux_loss_coef": 0.0}).train()
    ids = torch.randint(10, 500, (4, 16))
    model(input_ids=ids, labels=ids)
    block = model.model.language_model.layers[0].mlp
    load = block._load_since_update.clone()
    assert load.sum().item() == 4 * 16 * model.config.moe_config.top_k
    model.update_router_biases()
    torch.testing.assert_close(block.router_bias, 0.01 * torch.sign(load.mean() - load))
    assert block._load_since_update.sum() == 0
    # the bias changes which experts are selected, never the weights' source (the unbiased probabilities)
    model.eval()
    out = model(input_ids=ids, output_router_stats=True)
    assert out.router_stats[0].load.sum().item() == 4 * 16 * 2


def test_bias_updates_of_all_layers_go_through_one_reduce():
    """Under several processes the layers' loads are summed in one collective: ``reduce`` is called once with every
    layer's load, and each layer applies the update of its own slice (here the "other process" doubled the load)."""
    model = build_model("tiny", seed=0, moe={"router_bias_update_rate": 0.01, "aux_loss_coef": 0.0}).train()
    ids = torch.randint(10, 500, (4, 16))
    model(input_ids=ids, labels=ids)
    blocks = list(model.moe_blocks())
    loads = [b._load_since_update.clone() for b in blocks]
    calls = []

    def reduce(load):
        calls.append(load.clone())
        return 2 * load

    model.update_router_biases(reduce)
    assert len(calls) == 1 and torch.equal(calls[0], torch.cat(loads))
    for block, load in zip(blocks, loads):
        torch.testing.assert_close(block.router_bias, 0.01 * torch.sign(2 * load.mean() - 2 * load))
        assert block._load_since_update.sum() == 0


def test_lora_and_topp_and_null_variants_run(tokenizer):
    model = build_model(
        "tiny",
        seed=0,
        moe={
            "expert_type": "lora",
            "routing": "topp",
            "top_p": 0.6,
            "num_null_experts": 1,
            "top_k": 3,
            "num_shared_experts": 1,
            "shared_expert_gate": True,
            "capacity_factor": 1.5,
        },
    )
    batch = _batch(tokenizer, ["What is the answer", "seven"])
    out = model(**batch, labels=batch["input_ids"], output_router_stats=True)
    out.loss.backward()
    assert isinstance(model, UniMoEForConditionalGeneration)
    assert all(0 <= s.null_share.item() <= 1 for s in out.router_stats)


def test_fan_in_encoder_init_keeps_audio_content(tmp_path):
    """``init: fan_in`` gives LeCun-normal encoder weights that survive post_init (transformers' fixed std 0.02 made
    Whisper's first convolution shrink its input under the position embeddings: every clip encoded alike), leaves
    other encoders alone, and a saved model reloads its trained weights, not a fresh init."""
    torch.manual_seed(0)
    defaults = {m: {"init": "default"} for m in ("image", "audio", "video", "points", "series")}
    plain = build_model("tiny", seed=0, encoders=defaults)  # the tiny preset itself uses fan_in everywhere
    model = build_model("tiny", seed=0, encoders={**defaults, "audio": {"init": "fan_in"}})
    conv = model.model.encoders["audio"].whisper.conv1
    assert conv.weight.std().item() == pytest.approx(conv.weight[0].numel() ** -0.5, rel=0.05)
    assert plain.model.encoders["audio"].whisper.conv1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    torch.testing.assert_close(model.model.encoders["image"].vit.patch_embed.proj.weight,
                               plain.model.encoders["image"].vit.patch_embed.proj.weight)  # fmt: skip
    features = torch.randn(6, 80, 200)  # six different "clips"
    with torch.no_grad():  # how much the encoded clips differ from one another
        spread_plain = plain.model.encoders["audio"](features).std(0).mean().item()
        spread_fan_in = model.model.encoders["audio"](features).std(0).mean().item()
    assert spread_fan_in > 5 * spread_plain
    model.save_pretrained(tmp_path)
    loaded = UniMoEForConditionalGeneration.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.model.encoders["audio"].whisper.conv1.weight, conv.weight)


def test_fan_in_connector_init_passes_the_content_on():
    """``init: fan_in`` on a connector: LeCun-normal layers instead of std 0.02, whose two 64-wide layers scaled the
    input by ~0.03 (and the first layer's gradient with it), so a from-scratch video connector never learned."""
    defaults = {m: {"init": "default"} for m in ("image", "audio", "video", "points", "series")}
    plain = build_model("tiny", seed=0, connectors=defaults)
    model = build_model("tiny", seed=0, connectors={**defaults, "video": {"init": "fan_in"}})
    for name in ("linear_1", "linear_2"):
        layer = getattr(model.model.connectors["video"], name)
        assert layer.weight.std().item() == pytest.approx(layer.weight.shape[1] ** -0.5, rel=0.05)
        assert not layer.bias.any()
        assert getattr(plain.model.connectors["video"], name).weight.std().item() == pytest.approx(0.02, rel=0.05)
    torch.testing.assert_close(model.model.connectors["image"].linear_1.weight,
                               plain.model.connectors["image"].linear_1.weight)  # fmt: skip
    torch.testing.assert_close(model.model.encoders["video"].image_encoder.vit.patch_embed.proj.weight,
                               plain.model.encoders["video"].image_encoder.vit.patch_embed.proj.weight)  # fmt: skip
    tokens = torch.randn(3, 64, 64)
    for connector in (model.model.connectors["video"], plain.model.connectors["video"]):
        connector.norm = None  # the raw MLP output: how much of the input's scale gets through
    with torch.no_grad():
        gain_fan_in = model.model.connectors["video"](tokens).std().item() / tokens.mean(1).std().item()
        gain_plain = plain.model.connectors["video"](tokens).std().item() / tokens.mean(1).std().item()
    assert gain_fan_in > 10 * gain_plain


def test_a_component_marked_not_trainable_is_built_frozen():
    model = build_model("tiny", {"encoders.image.trainable": False, "connectors.audio.trainable": False})
    assert model.config.frozen_components() == {"encoders.image", "connectors.audio"}
    assert build_model("tiny").config.frozen_components() == set()
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    default = {n for n, p in build_model("tiny").named_parameters() if p.requires_grad}
    frozen = {n for n in default if n.startswith(("model.encoders.image.", "model.connectors.audio."))}
    assert frozen and trains == default - frozen


def test_media_text_loss_in_the_model(tokenizer):
    """Rows with media and a text answer take part, text-only rows do not; the loss is added with its weight, reaches
    the encoder and connector, and leaves the word embeddings (its fixed text side) alone."""
    import numpy as np

    from unimoe.processing_unimoe import UniMoEProcessor

    def image_chat(answer, seed):
        image = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
        content = [{"type": "image", "array": image}, {"type": "text", "text": "What digit is this?"}]
        return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]

    torch.manual_seed(0)
    model = build_model("tiny", seed=0).train()
    processor = UniMoEProcessor.from_model_config(tokenizer, model.config)
    text_only = [{"role": "user", "content": "What is one plus one?"}, {"role": "assistant", "content": "two"}]
    batch = processor([image_chat("seven", seed=0), image_chat("three", seed=5), text_only], return_labels=True)
    plain = model(**batch)
    assert plain.media_text_loss is None
    out = model(**batch, media_text_loss_coef=0.5, media_text_temperature=0.1)
    assert out.media_text_loss > 0
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * out.media_text_loss)
    embed = model.get_input_embeddings().weight
    encoder = model.model.encoders["image"].vit.patch_embed.proj.weight
    connector = model.model.connectors["image"].linear_1.weight
    grads = torch.autograd.grad(out.media_text_loss, [embed, encoder, connector], allow_unused=True)
    assert grads[0] is None or grads[0].abs().sum() == 0
    assert grads[1].abs().sum() > 0 and grads[2].abs().sum() > 0
    # the text-only row changes nothing: the same loss from the two image rows alone
    alone = processor([image_chat("seven", seed=0), image_chat("three", seed=5)], return_labels=True)
    torch.testing.assert_close(
        model(**alone, media_text_loss_coef=0.5, media_text_temperature=0.1).media_text_loss, out.media_text_loss
    )
    # media_text_rows leaves rows out: with one image row left there is nothing to contrast
    three = processor([image_chat("seven", 0), image_chat("three", 5), image_chat("one", 7)], return_labels=True)
    kw = {"media_text_loss_coef": 0.5, "media_text_temperature": 0.1}
    pair = model(**three, media_text_rows=torch.tensor([True, True, False]), **kw).media_text_loss
    torch.testing.assert_close(pair, out.media_text_loss)
    assert model(**three, media_text_rows=torch.tensor([True, False, False]), **kw).media_text_loss.item() == 0.0
    assert model(**three, **kw).media_text_loss != pair


def test_lora_experts_start_alike_however_the_model_is_built():
    """A model built from a config and LoRAExperts.reset_lora (upcycling) give A the same range: U(+-1/sqrt(in))
    per expert, peft's default; the model's init used the whole (E, r, in) tensor's fan-in, 4x smaller here."""
    model = build_model("tiny", moe={"expert_type": "lora", "lora_rank": 4})
    experts = next(m for m in model.modules() if type(m).__name__ == "LoRAExperts")
    built = {n: getattr(experts, n).detach().clone() for n in ("lora_A_gate_up", "lora_A_down")}
    experts.reset_lora()
    for name, a in built.items():
        bound = 1 / a.shape[-1] ** 0.5
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound, name
        assert abs(a.abs().max() - getattr(experts, name).abs().max()) < 0.1 * bound, name
