"""Generation heads (``unimoe.generation``): images and speech through diffusers decoders, forecasts for series.

``UniMoEForConditionalGeneration.generate_multimodal`` is the one entry point; see :mod:`unimoe.generation.api`.
"""

from .config import AudioHeadConfig, DiffusionHeadConfig, ForecastHeadConfig, ImageHeadConfig, head_config
from .outputs import Forecast, GeneratedAudio, MultimodalOutput

__all__ = [
    "AudioHeadConfig",
    "DiffusionHeadConfig",
    "Forecast",
    "ForecastHeadConfig",
    "GeneratedAudio",
    "ImageHeadConfig",
    "MultimodalOutput",
    "head_config",
]
