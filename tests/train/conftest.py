import pytest

MOE = {"num_experts": 6, "modality_experts": {"text": [0], "image": [1], "video": [2], "audio": [3], "points": [4],
                                              "series": [5]}}  # fmt: skip


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    from unimoe.data.build import build_task

    root = tmp_path_factory.mktemp("data")
    for task in ("text_qa", "digits_cls"):
        build_task(task, root)
    return root


@pytest.fixture(scope="session")
def init_ckpt(tmp_path_factory):
    from unimoe.inference import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("init") / "tiny", {"moe": MOE})
