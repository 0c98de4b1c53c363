"""Connectors: map encoder tokens into the LLM's embedding space (``unimoe.connectors``)."""

from .connectors import CONNECTORS, MLPProjector, QueryResampler, build_connector, connector_tokens

__all__ = ["CONNECTORS", "MLPProjector", "QueryResampler", "build_connector", "connector_tokens"]
