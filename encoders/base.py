"""What every modality encoder provides, and the registry they live in.

An encoder class owns its modality end to end — decoding a file (with a clear :class:`MediaError`), turning it into
feature tensors, and encoding those into tokens — so the processor and the model only dispatch by modality:

* ``Config``: a dataclass of its settings, validated on construction (``ConfigError`` naming the field);
* ``load(source, config)``: a path, bytes or array → the decoded media (raises :class:`MediaError`);
* ``preprocess(media, config)``: → ``{"values": (U, ...), "mask": ...}`` where ``U`` is the number of *units* of the
  item (1 for an image, a point cloud, a series or a video; the number of windows for long audio);
* ``tokens_per_unit(config)``: how many tokens ``forward`` returns per unit;
* ``forward(values, mask=None)``: ``(U_total, ...)`` → ``(U_total, tokens_per_unit, output_dim)``;
* ``output_dim``; ``load_pretrained(path)`` for local weights.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from unimoe.config_utils import check_positive_ints, config_from_dict
from unimoe.errors import ConfigError, UniMoEError
from unimoe.registry import Registry


class MediaError(UniMoEError, ValueError):
    """A media file or array that cannot be used. The message names the file and the problem."""

    def __init__(self, source: Any, problem: str):
        self.source = describe_source(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


def npy_problem(err: Exception) -> str:
    """What is wrong with a ``.npy`` that ``np.load(..., allow_pickle=False)`` refused. Without a NumPy header numpy
    says the file holds pickled data and suggests ``allow_pickle``, which is never the fix here."""
    text = str(err)
    if "Object arrays" in text:
        return "a .npy of Python objects (e.g. ragged lists), not a numeric array"
    if "pickled" in text or "allow_pickle" in text:
        return "not a .npy array (no NumPy array header; pickled or other data is never loaded)"
    if isinstance(err, EOFError):
        return "not a readable .npy array (the file ends before its header does)"
    return f"not a readable .npy array ({text})"


def check_float32_range(source: Any, array: Any) -> None:
    """A float64 array whose finite values float32 cannot hold: say so (the cast would report them as infinite)."""
    import numpy as np

    if array.dtype.kind != "f" or array.dtype.itemsize <= 4:
        return
    too_big = np.isfinite(array) & (np.abs(array) > np.finfo(np.float32).max)
    if too_big.any():
        row = int(np.argwhere(too_big)[0][0])
        raise MediaError(
            source,
            f"values too large for float32 ({array[too_big].flat[0]:g} in row {row + 1}; the limit is about 3.4e38)",
        )


def describe_source(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    shape = getattr(source, "shape", None)
    return f"<array {tuple(shape)}>" if shape is not None else f"<{type(source).__name__}>"


def check_size(source: Any, max_bytes: int | None) -> None:
    """Raise before decoding a file that is missing, empty or above the size limit."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise MediaError(source, "file does not exist")
        if path.is_file():
            size = path.stat().st_size
            if size == 0:
                raise MediaError(source, "file is empty")
            if max_bytes is not None and size > max_bytes:
                raise MediaError(
                    source, f"file is {size:,} bytes, above the limit of {max_bytes:,} (media.max_file_bytes)"
                )
    elif isinstance(source, (bytes, bytearray)):
        if not source:
            raise MediaError(source, "empty bytes")
        if max_bytes is not None and len(source) > max_bytes:
            raise MediaError(source, f"{len(source):,} bytes, above the limit of {max_bytes:,} (media.max_file_bytes)")


def check_conv_fields(where: str, config: Any, *int_fields: str) -> None:
    """The checks every convolutional encoder config shares: ``int_fields`` are integers >= 1 and ``widths`` is a
    non-empty list of positive channel counts. Errors name ``where.<field>``."""
    check_positive_ints(config, int_fields, where)
    check_channels(f"{where}.widths", config.widths)


def check_channels(field_name: str, value: Any) -> None:
    """``value`` is a non-empty list of positive channel counts; the error names ``field_name``."""
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in value)
    ):
        raise ConfigError(f"{field_name}: expected a list of positive channel counts, got {value!r}")


class MediaEncoder(nn.Module, abc.ABC):
    """Base class of the modality encoders (see the module docstring for the contract)."""

    modality: ClassVar[str] = ""
    Config: ClassVar[type] = object

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    # -- media side (classmethods: the processor calls them without building the network) --
    @classmethod
    @abc.abstractmethod
    def load(cls, source: Any, config: Any, *, max_bytes: int | None = None) -> Any:
        """Decode a path / bytes / array; raise :class:`MediaError` for anything unusable."""

    @classmethod
    @abc.abstractmethod
    def preprocess(cls, media: Any, config: Any) -> dict[str, torch.Tensor]:
        """Decoded media → ``{"values": (U, ...), ["mask": ...]}``."""

    @classmethod
    @abc.abstractmethod
    def tokens_per_unit(cls, config: Any) -> int:
        """Tokens ``forward`` returns per unit."""

    # -- network side --
    @property
    @abc.abstractmethod
    def output_dim(self) -> int:
        """Width of the tokens ``forward`` returns."""

    def load_pretrained(self, path: str | Path) -> None:
        """Load local weights (a ``.safetensors`` file or a directory holding ``model.safetensors``)."""
        from safetensors.torch import load_file

        path = Path(path)
        file = path / "model.safetensors" if path.is_dir() else path
        if not file.is_file() or file.suffix != ".safetensors":
            raise ConfigError(f"{self.modality} encoder pretrained: {path} is not a .safetensors file or directory")
        state = load_file(str(file))
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            detail = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise ConfigError(
                f"{self.modality} encoder pretrained: {file} does not match the encoder ({detail})"
            ) from None
        if missing or unexpected:
            raise ConfigError(
                f"{self.modality} encoder pretrained: {file} does not match the encoder "
                f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
            )


ENCODERS: Registry[type[MediaEncoder]] = Registry("encoder type")


def build_encoder(modality: str, spec: dict[str, Any]) -> MediaEncoder:
    """Build the encoder of ``spec["type"]`` and load ``spec["pretrained"]`` weights if given."""
    cls, config = encoder_class(spec, modality)
    encoder = cls(config)
    if spec.get("pretrained"):
        encoder.load_pretrained(spec["pretrained"])
    return encoder


def encoder_class(spec: dict[str, Any], modality: str) -> tuple[type[MediaEncoder], Any]:
    """The class and validated config of an encoder spec, without building the network."""
    spec = dict(spec)
    name = spec.pop("type", None)
    if name is None:
        raise ConfigError(f"encoders.{modality}.type is missing; choose one of: {', '.join(ENCODERS.names())}")
    cls = ENCODERS.get(name, field=f"encoders.{modality}.type")
    spec.pop("pretrained", None)
    return cls, config_from_dict(cls.Config, spec, where=f"encoders.{modality}")
