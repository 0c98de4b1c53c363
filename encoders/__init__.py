"""Modality encoders (``unimoe.encoders``): one module per modality behind the ``ENCODERS`` registry.

Importing this package registers every encoder type; ``list_encoders()`` names them.
"""

from . import image  # noqa: F401  (registers "vit", "image_conv")
from .base import ENCODERS, MediaEncoder, MediaError, build_encoder, encoder_class

#: modality -> module name, for encoders contributed by other modules
_OPTIONAL = ("audio", "video", "points", "series")
for _name in _OPTIONAL:
    try:
        __import__(f"unimoe.encoders.{_name}")
    except ModuleNotFoundError as _err:  # a modality module not written yet
        if _err.name != f"unimoe.encoders.{_name}":
            raise


def list_encoders() -> list[str]:
    return ENCODERS.names()


__all__ = ["ENCODERS", "MediaEncoder", "MediaError", "build_encoder", "encoder_class", "list_encoders"]
