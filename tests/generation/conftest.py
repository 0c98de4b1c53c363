import pytest


@pytest.fixture(scope="module")
def gen_checkpoint(tmp_path_factory):
    """A randomly initialized tiny checkpoint with image, audio and forecasting heads."""
    from unimoe.inference import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("gen") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def gen_model(gen_checkpoint):
    from unimoe.inference import load_pretrained

    return load_pretrained(gen_checkpoint)


PIXART = {"class": "PixArtTransformer2DModel", "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2,
          "patch_size": 1}  # fmt: skip


@pytest.fixture(scope="module")
def pixart_checkpoint(tmp_path_factory):
    """The tiny checkpoint with a PixArt image decoder, whose position embedding is a non-persistent buffer."""
    from unimoe.inference import init_checkpoint

    overrides = {"generation": {"image": {"decoder": PIXART}}}
    return init_checkpoint("tiny", tmp_path_factory.mktemp("pixart") / "ckpt", overrides, seed=0)
