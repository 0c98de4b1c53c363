import math

import pytest
import torch

from unimoe.contrastive import media_text_contrastive_loss


def test_media_text_contrastive_loss_by_hand():
    eye2, eye3 = torch.eye(2), torch.eye(3)
    # two pairs, distinct answers, temperature 1: each row's softmax puts e / (e + 1) on its own pair
    loss = media_text_contrastive_loss(eye2, eye2, ["a", "b"], temperature=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    # equal answers are positives of each other: rows 0 and 1 share target [1/2, 1/2, 0]
    # rows 0, 1: log(e + 2) - 1/2; row 2: log(e + 2) - 1; both directions alike
    loss = media_text_contrastive_loss(eye3, eye3, ["a", "a", "b"], temperature=1.0)
    assert loss.item() == pytest.approx(math.log(math.e + 2) - 2 / 3)
    # scale-free (cosine), temperature sharpens
    assert media_text_contrastive_loss(5 * eye2, eye2, ["a", "b"], 1.0).item() == pytest.approx(
        math.log(1 + math.exp(-1))
    )
    assert media_text_contrastive_loss(eye2, eye2, ["a", "b"], 0.1).item() < 1e-4
    # nothing to contrast: one row, or one answer for all
    assert media_text_contrastive_loss(eye2[:1], eye2[:1], ["a"], 1.0).item() == 0.0
    assert media_text_contrastive_loss(eye2, eye2, ["a", "a"], 1.0).item() == 0.0
