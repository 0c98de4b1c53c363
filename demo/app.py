"""The Gradio app: a multimodal chat (images, audio from a file or the microphone, video, point clouds, time series),
streamed replies with any generated images, speech and forecast plots, generation settings, previews of the uploads,
and a routing panel that shows which experts each modality's tokens used in every MoE layer for the last reply.

``build_app(model, processor)`` builds the ``gr.Blocks`` from an in-memory model (tests, notebooks);
``launch(MODEL)`` loads a checkpoint and serves it; ``main(argv)`` is ``python -m unimoe.demo``.

Notes on gradio 6.31: ``ChatInterface(multimodal=True)`` calls ``fn(message={"text", "files"}, history,
*additional_inputs)``. The browser's event postprocesses the reply through the Chatbot, but the ``/chat`` API endpoint
returns its outputs *without* postprocessing: a component in the reply reaches a gradio_client caller as
``str(component)``, and a side panel's value as the raw Python value. What both paths handle is a FileData dict
(``{"path", "mime_type", "meta": {"_type": "gradio.FileData"}}``): the Chatbot shows it as an image or an audio player
by its type, and the API moves it to gradio's cache, so the client downloads it and gets a local path. So a reply with
media is one message dict, ``{"role": "assistant", "content": [text, file, ...]}`` (a bare file dict in a list
crashes ChatInterface, which reads it as a ``{"text", "files"}`` message); forecasts are sent as PNG plots; and the
files must lie in the temporary folder, the working directory or ``allowed_paths`` (``launch`` passes the output
folder). The side panels reach API clients as server-side paths; the JSON "details" output carries the routing and
the original files' server paths.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from unimoe.errors import CheckpointError

from .engine import NOTICE, ChatEngine, GenerationSettings, Reply
from .media import enlarged_for_display, routing_summary

#: The default recipe's checkpoint (``make quickstart`` / ``unimoe run tiny --out runs/tiny`` writes it).
DEFAULT_CHECKPOINT = Path("runs/tiny/final")

#: Number of side-panel outputs the chat function yields after the chat message (see ``_panel_outputs``).
_PANELS = 5


def build_app(
    model,
    processor,
    *,
    title: str = "UniMoE",
    model_name: str | None = None,
    settings: GenerationSettings | None = None,
    output_dir: str | Path | None = None,
    max_file_bytes: int | None = None,
    max_history_messages: int = 8,
) -> gr.Blocks:
    """The demo app for a loaded model and processor.

    Args:
        settings: initial values of the generation settings panel.
        output_dir: where generated images, speech, previews and heatmaps are written (default: a new temporary
            folder, which gradio serves without ``allowed_paths``).
        max_file_bytes: largest accepted upload (default: the processor's ``max_file_bytes``).
        max_history_messages: how many earlier text turns are sent back to the model.
    """
    engine = ChatEngine(
        model,
        processor,
        output_dir=output_dir,
        max_file_bytes=max_file_bytes,
        max_history_messages=max_history_messages,
    )
    defaults = settings or GenerationSettings()

    def respond(
        message: dict[str, Any],
        history: list[dict[str, Any]],
        reply_with: str,
        temperature: float,
        max_new_tokens: float,
        diffusion_steps: float,
        guidance_scale: float,
        seed: float | None,
    ) -> Iterator[tuple]:
        """One chat turn: streamed text first (panels untouched), then the full reply with its panels."""
        message = message if isinstance(message, dict) else {"text": str(message or ""), "files": []}
        turn = GenerationSettings(
            temperature=float(temperature or 0.0),
            max_new_tokens=max(1, int(max_new_tokens or defaults.max_new_tokens)),
            num_inference_steps=int(diffusion_steps) if diffusion_steps else None,
            guidance_scale=float(guidance_scale) if guidance_scale else None,
            seed=int(seed) if seed is not None and seed >= 0 else None,
            output=None if reply_with in (None, "", "auto") else reply_with,
        )
        text = message.get("text") or ""
        for update in engine.stream(text, message.get("files") or [], history, turn):
            if isinstance(update, str):
                yield (update, *[gr.skip()] * _PANELS)
            else:
                yield (_chat_message(update), *_panel_outputs(update, engine.num_experts))

    heatmap = gr.Image(
        label="Expert load per MoE layer (last reply)",
        show_label=False,
        type="filepath",
        render=False,
        interactive=False,
    )
    summary = gr.Markdown("Send a message to see which experts each modality used.", render=False)
    points_view = gr.Model3D(label="Point cloud", display_mode="point_cloud", render=False, interactive=False)
    series_view = gr.Image(label="Time series", type="filepath", render=False, interactive=False)
    details = gr.JSON(label="Last reply (JSON)", render=False)
    settings_inputs = _settings_inputs(defaults)
    textbox = gr.MultimodalTextbox(
        file_count="multiple",
        sources=["upload", "microphone"],
        placeholder="Ask something, attach images, audio, video, point clouds (.ply/.obj/.npy) or series (.csv)",
        render=False,
    )

    with gr.Blocks(title=f"{title} demo") as app:
        gr.Markdown(f"## {title}\n{_describe(model, engine, model_name)}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                reply_with = _reply_with(engine, defaults)  # rendered here, above the chat; the rest in an accordion
                gr.ChatInterface(
                    respond,
                    multimodal=True,
                    textbox=textbox,
                    chatbot=gr.Chatbot(label="Chat", height=520, render=False),
                    additional_inputs=[reply_with, *settings_inputs],
                    additional_inputs_accordion=gr.Accordion("Generation settings", open=False, render=False),
                    additional_outputs=[heatmap, summary, points_view, series_view, details],
                    api_name="chat",
                    fill_height=False,
                )
            with gr.Column(scale=2):
                with gr.Tab("Routing"):
                    heatmap.render()
                    summary.render()
                with gr.Tab("Input preview"):
                    points_view.render()
                    series_view.render()
                with gr.Tab("Details"):
                    details.render()

    app.unimoe_engine = engine  # for callers that want the output folder or the model behind an app
    return app


#: What a reply can be asked to contain, beyond letting the model decide (values are generate_multimodal's names).
REPLY_KINDS = [("the model decides", "auto"), ("an image", "image"), ("speech", "audio"), ("a forecast", "series")]
_KIND_LABELS = {value: label for label, value in REPLY_KINDS}


def _reply_with(engine: ChatEngine, defaults: GenerationSettings) -> gr.Radio:
    """The "reply with" choice. Every kind is offered, and the info line says which ones this checkpoint has heads
    for: asking a checkpoint for what it cannot make is answered with the library's one-line reason."""
    makes = ", ".join(_KIND_LABELS.get(m, m) for m in engine.output_modalities) or "text only"
    return gr.Radio(
        REPLY_KINDS,
        value=defaults.output or "auto",
        label="Reply with",
        info=f"This checkpoint can generate: {makes}. A forecast continues the series attached to the message.",
    )


def _settings_inputs(defaults: GenerationSettings) -> list[gr.components.Component]:
    """The generation settings panel. Diffusion steps and guidance at 0 leave the checkpoint's own defaults, so one
    panel suits checkpoints with and without generation heads."""
    steps, guidance = defaults.num_inference_steps or 0, defaults.guidance_scale or 0.0
    seed = -1 if defaults.seed is None else defaults.seed
    return [
        gr.Slider(0.0, 1.5, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)", render=False),
        gr.Slider(1, 512, value=defaults.max_new_tokens, step=1, label="Max new tokens", render=False),
        gr.Slider(0, 100, value=steps, step=1, label="Diffusion steps (0 = checkpoint default)", render=False),
        gr.Slider(0.0, 15.0, value=guidance, step=0.5, label="Guidance scale (0 = checkpoint default)", render=False),
        gr.Number(value=seed, precision=0, label="Seed (-1 = random)", render=False),
    ]


def _chat_message(reply: Reply) -> str | dict[str, Any]:
    """A reply as chat content: text alone as a string; with generated media, one assistant message whose content is
    the text followed by the files (images, speech, forecast plots) as FileData dicts, which the browser's chat shows
    inline and a ``/chat`` API client downloads (it gets the same message with local paths in place of the dicts)."""
    if reply.error:
        return f"{NOTICE}{reply.error}"
    files = [_file_part(enlarged_for_display(p), "image/png") for p in reply.images]
    files += [_file_part(p, "audio/wav") for p in reply.audio]
    files += [_file_part(f.plot, "image/png") for f in reply.forecasts if f.plot]
    if not files:
        return reply.text or "*(the model returned no text)*"
    return {"role": "assistant", "content": [reply.text, *files] if reply.text else files}


def _file_part(path: str | Path, mime_type: str) -> dict[str, Any]:
    """A file as gradio's FileData dict: its ``meta`` marker is what makes the ``/chat`` API serve and the client
    download it."""
    path = Path(path)
    return gr.FileData(path=str(path), mime_type=mime_type, orig_name=path.name).model_dump()


def _panel_outputs(reply: Reply, num_experts: int) -> tuple:
    """Values of the side panels after a reply: the heatmap, its table, the input previews, the JSON details.
    Previews change only when the turn brought a new point cloud or series."""
    if reply.error:
        heat, text = None, "The last message was not answered, so there is no routing to show."
    else:
        heat = str(reply.heatmap) if reply.heatmap else None
        text = routing_summary(reply.routing, num_experts=num_experts)
    points = str(reply.points_preview) if reply.points_preview else gr.skip()
    series = str(reply.series_preview) if reply.series_preview else gr.skip()
    return heat, text, points, series, reply.to_json()


def _describe(model, engine: ChatEngine, model_name: str | None) -> str:
    config = model.config
    moe = getattr(config, "moe_config", None)
    parts = [f"**{model_name}**" if model_name else None]
    if moe is not None:
        parts.append(f"{moe.num_experts} experts, {moe.routing} routing (k≤{moe.top_k})")
    reads = ", ".join(engine.input_modalities) or "text only"
    parts.append(f"reads text + {reads}")
    makes = [_KIND_LABELS.get(m, m).removeprefix("an ").removeprefix("a ") for m in engine.output_modalities]
    parts.append("writes text" + (f" + {', '.join(makes)}" if makes else ""))
    return " · ".join(p for p in parts if p) + (
        "\n\nThe **Routing** tab shows, for the last reply, the share of each modality's tokens that each expert took "
        "in every MoE layer."
    )


# ---------------------------------------------------------------------------------------------------------- serving
def resolve_checkpoint(model: str | Path | None) -> str:
    """The checkpoint to serve: MODEL as given (a local folder or a Hub id), or the default recipe's checkpoint,
    which must exist (its absence is a one-line error naming the command that makes it)."""
    if model is not None:
        return str(model)
    if not (DEFAULT_CHECKPOINT / "config.json").is_file():
        raise CheckpointError(
            f"no checkpoint at {DEFAULT_CHECKPOINT}: make one with `make quickstart` "
            "(or `unimoe run tiny --out runs/tiny`), or pass MODEL (a checkpoint folder or Hub id)"
        )
    return str(DEFAULT_CHECKPOINT)


def launch(
    model: str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    block: bool = True,
    device: str = "auto",
    **build_kwargs: Any,
) -> gr.Blocks:
    """Load a checkpoint and serve the demo (on the GPU if there is one, unless ``device`` says otherwise).
    ``block=False`` returns the running app (close it with ``.close()``)."""
    from unimoe.inference import load_pretrained

    path = resolve_checkpoint(model)
    loaded, processor = load_pretrained(path, device=device)
    build_kwargs.setdefault("model_name", path)
    app = build_app(loaded, processor, **build_kwargs)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        allowed_paths=[str(app.unimoe_engine.output_dir)],
    )
    return app


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unimoe.demo [MODEL] [--host H] [--port N] [--share]``: the same as ``unimoe demo`` (one parser,
    in :mod:`unimoe.cli`); errors print one line and return 2."""
    from unimoe.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])
