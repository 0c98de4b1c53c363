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
