"""The Gradio demo (``unimoe demo``): multimodal chat with streamed replies, generated media and a routing panel.

``build_app(model, processor)`` builds the app from an in-memory model; ``launch(MODEL)`` serves a checkpoint.
"""

import os

# gradio reads this at import time; the demo must start on machines without internet (its analytics call would
# otherwise wait for the network). An explicit setting in the environment still wins.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from .app import DEFAULT_CHECKPOINT, build_app, launch, main, resolve_checkpoint  # noqa: E402
from .engine import ChatEngine, GenerationSettings, Reply  # noqa: E402

__all__ = [
    "DEFAULT_CHECKPOINT",
    "ChatEngine",
    "GenerationSettings",
    "Reply",
    "build_app",
    "launch",
    "main",
    "resolve_checkpoint",
]
