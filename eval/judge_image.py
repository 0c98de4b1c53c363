"""A reference judge for generated digit images (the ``gen_image_digits`` task).

:class:`DigitImageJudge` is an RBF support-vector classifier trained on the REAL scikit-learn digits of the train
split the data suite uses (:func:`unimoe.data.tasks_vision.digit_splits`): a generated image counts as a "seven" when
the judge reads it as one. Images of any size (PIL images or arrays) are converted to greyscale, shrunk to 8×8 with
area averaging (the exact inverse of the suite's nearest ×4 upscaling) and scaled to sklearn's 0..16 ink range;
digits are white on black, as in the suite.

sklearn fits the SVC; prediction is our own numpy one-vs-one vote over the saved support vectors, so a judge
round-trips through a plain ``.npz`` of arrays (loaded with ``allow_pickle=False``) — no pickle anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "unimoe.digit_image_judge/1"


def image_features(images: Sequence[Any]) -> np.ndarray:
    """PIL images / ``(H, W[, C])`` arrays of any size → ``(N, 64)`` float features in sklearn's 0..16 range."""
    from PIL import Image

    from unimoe.encoders.image import load_image

    feats = []
    for image in images:
        grey = load_image(image).convert("L")
        small = grey.resize((8, 8), Image.Resampling.BOX) if grey.size != (8, 8) else grey
        feats.append(np.asarray(small, dtype=np.float64).reshape(64) * (16.0 / 255.0))
    return np.stack(feats) if feats else np.zeros((0, 64))


class DigitImageJudge:
    """``predict(images) -> list[int]``; ``accuracy(images, labels)``; ``fit`` / ``save`` / ``load``."""

    def __init__(
        self,
        *,
        support_vectors: np.ndarray,
        dual_coef: np.ndarray,
        intercept: np.ndarray,
        n_support: np.ndarray,
        gamma: float,
        classes: np.ndarray,
        meta: dict[str, Any] | None = None,
    ):
        self.support_vectors = np.asarray(support_vectors, dtype=np.float64)  # (n_SV, 64), features / 16
        self.dual_coef = np.asarray(dual_coef, dtype=np.float64)  # (n_classes - 1, n_SV)
        self.intercept = np.asarray(intercept, dtype=np.float64)  # (n_pairs,)
        self.n_support = np.asarray(n_support, dtype=np.int64)  # (n_classes,)
        self.gamma = float(gamma)
        self.classes = np.asarray(classes, dtype=np.int64)
        self.meta = dict(meta or {})
        n = len(self.classes)
        if self.n_support.sum() != len(self.support_vectors) or self.intercept.shape != (n * (n - 1) // 2,):
            raise ValueError("DigitImageJudge: inconsistent support-vector arrays")

    # ---------------------------------------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, seed: int = 0, *, C: float = 1.0) -> DigitImageJudge:
        """Train on the real digits of the suite's train split for ``seed`` (deterministic; well under a second)."""
        from sklearn.svm import SVC

        from unimoe.data.tasks_vision import digit_splits, load_digit_images

        images, labels = load_digit_images()
        train = digit_splits(labels, seed)["train"]
        x = images[train].reshape(len(train), 64).astype(np.float64) / 16.0
        svc = SVC(C=C, kernel="rbf", gamma="scale", decision_function_shape="ovo").fit(x, labels[train])
        return cls(
            support_vectors=svc.support_vectors_,
            dual_coef=svc.dual_coef_,
            intercept=svc.intercept_,
            n_support=svc.n_support_,
            gamma=svc._gamma,
            classes=svc.classes_,
            meta={"seed": seed, "C": C, "n_train": len(train), "source": "sklearn load_digits, suite train split"},
        )

    # ------------------------------------------------------------------------------------------- prediction
    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """One-vs-one decision values ``(N, n_pairs)`` on 0..16 features, in sklearn's pair order (0,1), (0,2), ...;
        positive favours the first class of the pair."""
        x = np.asarray(features, dtype=np.float64).reshape(-1, 64) / 16.0
        sv = self.support_vectors
        d2 = (x**2).sum(1)[:, None] + (sv**2).sum(1)[None, :] - 2.0 * x @ sv.T  # (N, n_SV)
        kernel = np.exp(-self.gamma * np.maximum(d2, 0.0))
        start = np.concatenate([[0], np.cumsum(self.n_support)])
        n = len(self.classes)
        out, pair = [], 0
        for i in range(n):
            si = slice(start[i], start[i + 1])
            for j in range(i + 1, n):
                sj = slice(start[j], start[j + 1])
                value = kernel[:, si] @ self.dual_coef[j - 1, si] + kernel[:, sj] @ self.dual_coef[i, sj]
                out.append(value + self.intercept[pair])
                pair += 1
        return np.stack(out, axis=1) if out else np.zeros((len(x), 0))

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """Majority vote over the one-vs-one pairs (ties → the lower class, as libsvm)."""
        dec = self.decision_function(features)
        n = len(self.classes)
        votes = np.zeros((dec.shape[0], n), dtype=np.int64)
        pair = 0
        for i in range(n):
            for j in range(i + 1, n):
                wins = dec[:, pair] > 0
                votes[:, i] += wins
                votes[:, j] += ~wins
                pair += 1
        return self.classes[votes.argmax(axis=1)]

    def predict(self, images: Sequence[Any]) -> list[int]:
        """The digit each image shows (PIL images or arrays of any size, white on black)."""
        if len(images) == 0:
            return []
        return [int(c) for c in self.predict_features(image_features(images))]

    def accuracy(self, images: Sequence[Any], labels: Sequence[int]) -> float:
        """Fraction of ``images`` read as their intended ``labels``."""
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            return 0.0
        return float(np.mean(np.asarray(self.predict(images)) == np.asarray(labels, dtype=np.int64)))

    # -------------------------------------------------------------------------------------------- save/load
    def save(self, path: str | Path) -> Path:
        """A plain ``.npz`` of arrays (no pickled objects)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez(
                f,
                format=np.array(FORMAT),
                support_vectors=self.support_vectors,
                dual_coef=self.dual_coef,
                intercept=self.intercept,
                n_support=self.n_support,
                gamma=np.array(self.gamma),
                classes=self.classes,
                meta=np.array(json.dumps(self.meta, sort_keys=True)),
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> DigitImageJudge:
        with np.load(Path(path), allow_pickle=False) as data:
            if "format" not in data.files or str(data["format"]) != FORMAT:
                raise ValueError(f"{path}: not a DigitImageJudge file (expected format {FORMAT!r})")
            return cls(
                support_vectors=data["support_vectors"],
                dual_coef=data["dual_coef"],
                intercept=data["intercept"],
                n_support=data["n_support"],
                gamma=float(data["gamma"]),
                classes=data["classes"],
                meta=json.loads(str(data["meta"])),
            )
