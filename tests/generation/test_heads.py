"""Generation heads: initialization, checkpoints (the two diffusers-in-transformers pitfalls), losses, sampling."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from unimoe.errors import ConfigError
from unimoe.generation.config import ForecastHeadConfig, ImageHeadConfig
from unimoe.generation.heads import DiffusionHead, ForecastHead, LinearForecasters


def test_post_init_keeps_the_decoders_own_initialization(tiny_model):
    """transformers' post_init would re-draw every Linear with std 0.02; diffusers' default init (kaiming-uniform,
    std ~ 1/sqrt(3 fan_in)) must survive. Compare each large weight's spread with a freshly built decoder's."""
    head = tiny_model.model.generation_heads["image"]
    fresh = dict(head.build_decoder().named_parameters())
    checked = 0
    for name, param in head.decoder.named_parameters():
        if param.dim() == 2 and param.numel() >= 512:
            expected = float(fresh[name].detach().std())
            assert abs(float(param.detach().std()) - expected) < 0.25 * expected, name
            checked += 1
    assert checked >= 10


def test_checkpoint_writes_decoders_as_diffusers_subfolders(gen_checkpoint):
    config = json.loads((gen_checkpoint / "config.json").read_text())
    for modality in ("image", "audio"):
        folder = gen_checkpoint / f"decoder_{modality}"
        expected = config["generation"][modality]["decoder"]["class"]
        assert json.loads((folder / "config.json").read_text())["_class_name"] == expected
        assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    with safe_open(str(gen_checkpoint / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if ".decoder." in k]  # decoders live only in their subfolders
    assert any(k.startswith("model.generation_heads.image.queries") for k in keys)
    assert not list(gen_checkpoint.rglob("*.bin"))


@pytest.mark.parametrize("which", ["gen_checkpoint", "pixart_checkpoint"])
def test_reloaded_decoder_has_valid_buffers_and_weights(which, request):
    """PixArt keeps its position embedding in a non-persistent buffer (the meta-device pitfall); SD3 saves it."""
    from unimoe.inference import load_pretrained

    checkpoint = request.getfixturevalue(which)
    model, _ = load_pretrained(checkpoint)
    decoder = model.model.generation_heads["image"].decoder
    reference = type(decoder).from_pretrained(str(checkpoint / "decoder_image"))
    buffer = decoder.pos_embed.pos_embed  # PixArt: NaN / garbage if built on the meta device and kept
    assert torch.isfinite(buffer).all()
    torch.testing.assert_close(buffer, reference.pos_embed.pos_embed)
    for (name, a), (_, b) in zip(decoder.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_saved_and_reloaded_model_generates_the_identical_image(tmp_path, gen_model):
    from unimoe.hub import save_checkpoint
    from unimoe.inference import load_pretrained

    model, processor = gen_model
    prompt = [{"role": "user", "content": "Draw the digit three."}]
    before = model.generate_multimodal(processor, prompt, output_modality="image", seed=7, num_inference_steps=4)
    save_checkpoint(model, tmp_path / "again", processor=processor)
    reloaded, processor2 = load_pretrained(tmp_path / "again")
    after = reloaded.generate_multimodal(processor2, prompt, output_modality="image", seed=7, num_inference_steps=4)
    assert np.array_equal(np.asarray(before.images[0]), np.asarray(after.images[0]))
    again = model.generate_multimodal(processor, prompt, output_modality="image", seed=8, num_inference_steps=4)
    assert not np.array_equal(np.asarray(before.images[0]), np.asarray(again.images[0]))  # the seed matters


def test_sampling_steps_and_guidance_are_configurable(gen_model):
    model, _ = gen_model
    head = model.model.generation_heads["image"]
    states = torch.randn(2, head.config.num_queries, model.config.text_config.hidden_size)

    def sample(**kwargs):
        return head.sample(states, generator=torch.Generator().manual_seed(0), **kwargs)

    base = sample(num_inference_steps=3, guidance_scale=1.0)
    assert base.shape == (2, *head.config.sample_shape) and base.abs().max() <= 1.0
    assert not torch.equal(base, sample(num_inference_steps=6, guidance_scale=1.0))
    assert not torch.equal(base, sample(num_inference_steps=3, guidance_scale=4.0))
    torch.testing.assert_close(base, sample(num_inference_steps=3, guidance_scale=1.0))
    from unimoe.errors import ConfigError

    with pytest.raises(ConfigError, match="steps must be >= 1"):
        sample(num_inference_steps=0)
    for guidance in (float("inf"), float("nan"), 0.5):  # inf drew a black image, nan ran without guidance
        with pytest.raises(ConfigError, match="guidance a finite number >= 1"):
            sample(num_inference_steps=3, guidance_scale=guidance)


def test_flow_matching_loss_trains_every_part():
    torch.manual_seed(0)
    head = DiffusionHead(ImageHeadConfig(noise_samples=2), hidden_size=32)
    states = torch.randn(3, 8, 32, requires_grad=True)
    loss = head.loss(states, torch.rand(3, 1, 16, 16) * 2 - 1)
    loss.backward()
    assert loss.item() > 0
    assert states.grad.abs().sum() > 0  # the condition reaches the LLM's query states
    for name in ("connector.1.weight", "decoder.proj_out.weight"):
        assert dict(head.named_parameters())[name].grad.abs().sum() > 0, name


def test_pinball_loss_against_hand_computed_values():
    head = ForecastHead(
        ForecastHeadConfig(quantiles=[0.1, 0.5, 0.9], max_horizon=2, default_horizon=2), hidden_size=4, context_length=8
    )
    prediction = torch.tensor([[[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]]])  # (1, H=2, Q=3)
    target = torch.tensor([[1.0, 5.0]])
    # step 1: errors (1, 0, -1) -> 0.1*1, 0, 0.1*1 -> mean 0.2/3; step 2 masked out
    loss = head.loss(prediction, target, torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(0.2 / 3)
    # both steps: step 2 errors (5, 5, 5) -> 0.5, 2.5, 4.5 -> mean 2.5
    loss = head.loss(prediction, target, torch.ones(1, 2))
    assert loss.item() == pytest.approx((0.2 / 3 + 2.5) / 2)


def test_forecast_naive_scaling_by_hand():
    """``scaling: naive``: loc = the last observed value, scale = the mean |one-step change| over observed pairs;
    padding and missing steps are skipped; a constant context falls back to the encoder's scale, then to 1."""
    head = ForecastHead(ForecastHeadConfig(), hidden_size=8, context_length=6)
    # rows: 2 steps of left padding (changes 2, 3, 4); a missing step 2 and a missing last step; a constant
    # context (no step size); nothing observed
    values = torch.tensor([[0.0, 0.0, 1.0, 3.0, 6.0, 10.0], [5.0, 7.0, 0.0, 4.0, 4.0, 0.0], [2.0] * 6, [0.0] * 6])
    observed = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0], [1] * 6, [0] * 6], dtype=torch.float32)
    encoder = (torch.zeros(4, 6), torch.zeros(4), torch.tensor([9.0, 9.0, 0.5, 0.0]))
    normalized, loc, scale = head.normalize(values, observed, encoder)
    torch.testing.assert_close(loc, torch.tensor([10.0, 4.0, 2.0, 0.0]))
    torch.testing.assert_close(scale, torch.tensor([3.0, 1.0, 0.5, 1.0]))  # row 2: |7-5| and |4-4| -> 1
    torch.testing.assert_close(normalized[0], torch.tensor([0.0, 0.0, -3.0, -7 / 3, -4 / 3, 0.0]))
    assert normalized[1, 2] == 0 and normalized[1, 5] == 0  # unobserved steps stay 0
    std = ForecastHead(ForecastHeadConfig(scaling="std"), hidden_size=8, context_length=6)
    assert std.normalize(values, observed, encoder) is encoder
    with pytest.raises(ConfigError, match="generation.series.scaling"):
        ForecastHeadConfig(scaling="minmax")


def test_linear_forecasters_start_naive_and_specialize():
    """The gated skip starts as "repeat the last value" for any gate input; its gate mixes per item, so the
    forecasters get different gradients (a uniform gate would keep them identical forever); K=1 has no gate."""
    torch.manual_seed(0)
    skip = LinearForecasters(window=6, horizon=3, num_experts=4, gate_dim=10)
    context, queries = torch.randn(5, 6), torch.randn(5, 10)
    out = skip(context, queries)
    torch.testing.assert_close(out, context[:, -1:].expand(5, 3))
    mix = skip.gate(queries).softmax(-1)
    assert not torch.allclose(mix[0], mix[1])
    (out - torch.randn(5, 3)).square().sum().backward()
    grads = skip.weight.grad.flatten(1)  # (K, window*horizon)
    assert not torch.allclose(grads[0], grads[1])
    assert skip.gate[1].weight.grad.abs().max() < 1e-5  # identical forecasters: the gate has nothing to choose yet
    single = LinearForecasters(window=6, horizon=3, num_experts=1, gate_dim=10)
    assert single.gate is None
    torch.testing.assert_close(single(context, queries), context[:, -1:].expand(5, 3))


def test_forecast_context_finds_each_rows_own_series(gen_model):
    """Two forecasting rows with different series (and an image row in between): each query run must be paired
    with the last series of its own row."""
    model, processor = gen_model
    rows = []
    for level in (10.0, 500.0):
        series = (np.arange(40, dtype=np.float32) % 7) + level
        rows.append([
            {"role": "user", "content": [{"type": "series", "array": series[:, None]},
                                         {"type": "text", "text": "Forecast the next 4 values."}]},
            {"role": "assistant", "content": [{"type": "series", "values": [level] * 4}]},
        ])  # fmt: skip
    drawing = {"role": "assistant", "content": [{"type": "image", "array": np.zeros((8, 8), np.uint8)}]}
    rows.insert(1, [{"role": "user", "content": "Draw a digit."}, drawing])
    batch = processor(rows, return_labels=True)
    assert batch["gen_series_values"].shape == (2, model.model.generation_heads["series"].config.max_horizon)
    assert batch["gen_series_mask"].sum(1).tolist() == [4.0, 4.0]
    assert batch["gen_image_values"].shape == (1, *model.model.generation_heads["image"].config.sample_shape)
    _, loc, scale, raw, observed = model.model.forecast_context(
        batch["input_ids"], batch["series_values"], batch["series_mask"]
    )
    # the head's naive scaling: loc = each row's own last value, scale = its mean absolute one-step change
    expected = [39 % 7 + level for level in (10.0, 500.0)]
    torch.testing.assert_close(loc, torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(scale, torch.full((2,), (34 * 1 + 5 * 6) / 39))
    assert observed.sum(1).tolist() == [40.0, 40.0]
    out = model(**batch)
    assert out.forecast_loss.item() > 0 and out.diffusion_loss.item() > 0 and torch.isfinite(out.loss)


def test_generation_tokens_are_labelled_and_query_slots_are_not(gen_model):
    model, processor = gen_model
    record = [{"role": "user", "content": "Draw the digit one."},
              {"role": "assistant", "content": [{"type": "image", "array": np.zeros((8, 8), np.uint8)}]}]  # fmt: skip
    batch = processor([record], return_labels=True)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    gen, query = processor.gen_token_ids["image"], processor.query_token_ids["image"]
    assert (labels == gen).sum() == 1 and (ids == gen).sum() == 1
    assert (ids == query).sum() == 8 and (labels[ids == query] == -100).all()
    assert (batch["modality_ids"][0][ids == query] == model.config.modalities.index("image")).all()


def test_forecast_head_starts_as_the_naive_forecast(tiny_model):
    """The context skip starts as "repeat the last value" (post_init must not re-draw it)."""
    head = tiny_model.model.generation_heads["series"]
    context = torch.randn(3, head.skip.window)
    states = torch.zeros(3, head.config.num_queries, tiny_model.config.text_config.hidden_size)
    with torch.no_grad():
        head.mlp[-1].weight.zero_()
        head.mlp[-1].bias.zero_()
        out = head(states, context)  # (3, H, Q)
    torch.testing.assert_close(out, context[:, -1:, None].expand_as(out))


TINY_VAE = {"config": {"in_channels": 1, "out_channels": 1, "latent_channels": 4, "block_out_channels": [8, 16],
                       "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
                       "layers_per_block": 1, "norm_num_groups": 4}}  # fmt: skip


def test_latent_space_head_with_a_vae_round_trips(tmp_path, tokenizer):
    from unimoe import build_model
    from unimoe.hub import save_checkpoint
    from unimoe.inference import load_pretrained
    from unimoe.processing_unimoe import UniMoEProcessor
    from unimoe.train.freeze import apply_trainable

    model = build_model("tiny", {"generation": {"image": {"size": 16, "vae": TINY_VAE}}}, seed=0).eval()
    head = model.model.generation_heads["image"]
    assert head.latent_shape == (4, 8, 8) and head.decoder.config.in_channels == 4
    loss = head.loss(torch.randn(2, 8, 64), torch.rand(2, 1, 16, 16) * 2 - 1)  # VAE-encoded targets
    assert torch.isfinite(loss)
    processor = UniMoEProcessor.from_model_config(tokenizer, model.config)
    prompt = [{"role": "user", "content": "Draw the digit three."}]
    before = model.generate_multimodal(processor, prompt, output_modality="image", seed=1, num_inference_steps=2)
    assert before.images[0].size == (32, 32)
    save_checkpoint(model, tmp_path / "ckpt", processor=processor)
    assert (tmp_path / "ckpt" / "vae_image" / "diffusion_pytorch_model.safetensors").is_file()
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if ".vae." in k]  # noqa: SIM118 (safe_open has no __iter__)
    reloaded, processor2 = load_pretrained(tmp_path / "ckpt")
    after = reloaded.generate_multimodal(processor2, prompt, output_modality="image", seed=1, num_inference_steps=2)
    assert np.array_equal(np.asarray(before.images[0]), np.asarray(after.images[0]))
    counts = apply_trainable(reloaded, {"generation": True})
    assert "generation_vae" not in counts and not any(p.requires_grad for p in head.vae.parameters())


@pytest.mark.parametrize("decoder", ["PixArtTransformer2DModel", "SanaTransformer2DModel", "SD3Transformer2DModel"])
def test_masked_condition_tokens_do_not_reach_the_decoder(decoder):
    """Every decoder adapter honours the conditioning mask: what sits in masked tokens (left padding before a short
    prompt) cannot change the prediction, while an attended token can."""
    torch.manual_seed(0)
    kwargs = {"class": decoder, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1, "patch_size": 2}
    head = DiffusionHead(ImageHeadConfig(decoder=kwargs, prompt_tokens=3), hidden_size=16).eval()
    assert head.null_condition.shape == (8 + 3, head.config.cond_dim)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([300.0, 700.0])
    cond = torch.randn(2, 11, head.config.cond_dim)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, 8:10] = 0  # the first row's two oldest prompt positions are padding
    other = cond.clone()
    other[0, 8:10] = torch.randn(2, head.config.cond_dim) * 10
    with torch.no_grad():
        torch.testing.assert_close(head.predict(x, cond, t, mask), head.predict(x, other, t, mask))
        other[0, 10] += 5.0  # an attended prompt token
        assert not torch.allclose(head.predict(x, cond, t, mask), head.predict(x, other, t, mask))


def test_condition_states_add_the_prompt_before_each_query_run(tokenizer):
    """``prompt_tokens = P``: each run's states are its N query states, then the P last-layer states before the run;
    positions before a row's start (left padding) are masked; the flow-matching loss and sampling take them."""
    from unimoe import build_model
    from unimoe.processing_unimoe import UniMoEProcessor

    model = build_model("tiny", {"generation": {"image": {"prompt_tokens": 24}}}, seed=0).eval()
    processor = UniMoEProcessor.from_model_config(tokenizer, model.config)
    drawing = {"role": "assistant", "content": [{"type": "image", "array": np.zeros((8, 8), np.uint8)}]}
    rows = [[{"role": "user", "content": "Draw the digit three, please, with a thick pen."}, drawing],
            [{"role": "user", "content": "Draw."}, drawing]]  # fmt: skip
    batch = processor(rows, return_labels=True)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    ids, hidden = batch["input_ids"], out.last_hidden_state
    states, mask = model.model.condition_states(ids, hidden, "image", batch["attention_mask"])
    n_queries = model.model.generation_heads["image"].config.num_queries
    assert states.shape == (2, n_queries + 24, hidden.shape[-1]) and mask.shape == (2, n_queries + 24)
    torch.testing.assert_close(states[:, :n_queries], model.model.query_states(ids, hidden, "image"))
    query = processor.query_token_ids["image"]
    for row in range(2):
        start = int((ids[row] == query).nonzero()[0])
        torch.testing.assert_close(states[row, n_queries:], hidden[row, start - 24 : start])
        expected = batch["attention_mask"][row, start - 24 : start]
        assert mask[row, n_queries:].tolist() == expected.tolist()
    assert mask[0].all() and mask[1, :n_queries].all() and not mask[1].all()  # the short row's window is padded
    assert out.diffusion_loss is not None and torch.isfinite(out.diffusion_loss)
    prompt = [{"role": "user", "content": "Draw the digit three."}]
    result = model.generate_multimodal(processor, prompt, output_modality="image", seed=0, num_inference_steps=2)
    assert result.images and result.images[0].size == (32, 32)


def test_query_embedding_gradient_is_reproducible(gen_model):
    """The query slots' gradient must not depend on thread timing: advanced indexing's backward accumulated it with
    parallel float atomics, so two identical runs drifted apart from the second training step."""
    model, _ = gen_model
    head = model.model.generation_heads["image"]
    query = model.config.generation_token_ids["image"]["query"]
    run = [query] * head.queries.shape[0] + [1, 2]
    ids = torch.tensor(run * 20).repeat(32, 1)  # (32, 200): 20 query runs a row
    embeds = torch.zeros(*ids.shape, head.queries.shape[1])
    upstream = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = set()
        for _ in range(8):
            head.queries.grad = None
            (model.model.embed_queries(ids, embeds) * upstream).sum().backward()
            grads.add(head.queries.grad.numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
        head.queries.grad = None
    assert len(grads) == 1
