"""UniMoE: unified multimodal Mixture-of-Experts LLMs.

``import unimoe`` registers the ``unimoe`` model type with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads UniMoE checkpoints with no path edits.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

from unimoe.configuration_unimoe import UniMoEConfig
from unimoe.errors import CheckpointError, ConfigError, HubError, UniMoEError
from unimoe.modeling_unimoe import (
    UniMoECausalLMOutput,
    UniMoEForConditionalGeneration,
    UniMoEModel,
    UniMoEPreTrainedModel,
)
from unimoe.moe import count_parameters
from unimoe.presets import build_config, build_model, list_presets
from unimoe.processing_unimoe import UniMoEProcessor

__version__ = "0.1.0"

AutoConfig.register("unimoe", UniMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(UniMoEConfig, UniMoEForConditionalGeneration, exist_ok=True)
AutoProcessor.register(UniMoEConfig, UniMoEProcessor, exist_ok=True)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "HubError",
    "UniMoECausalLMOutput",
    "UniMoEConfig",
    "UniMoEError",
    "UniMoEForConditionalGeneration",
    "UniMoEModel",
    "UniMoEPreTrainedModel",
    "UniMoEProcessor",
    "build_config",
    "build_model",
    "count_parameters",
    "list_presets",
]
