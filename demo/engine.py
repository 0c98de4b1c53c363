"""The model side of the demo, free of gradio: turn a chat turn (text, uploaded files, history) into model messages,
stream the reply, record which experts each modality's tokens used, and save generated media.

:meth:`ChatEngine.stream` yields the reply text as it grows and finally one :class:`Reply`. Every error a user can
cause (a corrupt, unsupported or oversized file, a checkpoint without the decoder a prompt asks for) ends the stream
with a ``Reply`` whose ``error`` is one readable line instead of an exception, so the app keeps serving.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimoe.encoders import MediaError
from unimoe.errors import InputError, UniMoEError
from unimoe.generation.api import sampling_kwargs
from unimoe.processing_unimoe import SUFFIX_MODALITY, guess_modality

from .media import forecast_figure, load_media, save_figure, series_figure, write_point_cloud_preview

logger = logging.getLogger(__name__)

#: Suffixes the demo accepts; ``.npy`` is a point cloud when it is ``(N, 3|6|9)``, else a time series.
SUPPORTED_SUFFIXES = (*SUFFIX_MODALITY, ".npy")

#: Replies that are the demo's own notices (errors) start with this; they are not fed back to the model as history.
NOTICE = "⚠️ "


@dataclass
class GenerationSettings:
    """What the settings panel controls. ``None`` diffusion steps / guidance mean the checkpoint's defaults;
    ``seed=None`` samples from a fresh random state; ``output`` (``"image"``, ``"audio"``, ``"series"``) asks for
    that kind of reply instead of letting the model decide from the prompt."""

    temperature: float = 0.0
    max_new_tokens: int = 64
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = 0
    output: str | None = None


@dataclass(frozen=True)
class Attachment:
    """An uploaded file and the modality it is read as."""

    path: Path
    modality: str

    @property
    def name(self) -> str:
        """The name the user gave the file (gradio keeps it as the last path component of its upload cache)."""
        return self.path.name


@dataclass
class Forecast:
    """A generated forecast: the series it continues, the point forecast and quantile bands ``{level: (h,)}``, and
    its plot (a PNG under the reply's folder)."""

    context: np.ndarray
    point: np.ndarray
    quantiles: dict[float, np.ndarray] = field(default_factory=dict)
    plot: Path | None = None


@dataclass
class Reply:
    """Everything one turn produced; the app turns it into chat messages and the side panels."""

    prompt: str
    text: str = ""
    error: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    audio: list[Path] = field(default_factory=list)
    forecasts: list[Forecast] = field(default_factory=list)
    routing: dict[str, np.ndarray] = field(default_factory=dict)
    heatmap: Path | None = None
    points_preview: Path | None = None
    series_preview: Path | None = None  # a PNG plot of the turn's last series
    history_turns: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-able summary (what API clients read: text, generated files, per-modality routing shares)."""
        return {
            "prompt": self.prompt,
            "text": self.text,
            "error": self.error,
            "inputs": [{"name": a.name, "modality": a.modality} for a in self.attachments],
            "images": [str(p) for p in self.images],
            "audio": [str(p) for p in self.audio],
            "forecasts": [
                {
                    "point": f.point.tolist(),
                    "quantiles": {str(q): v.tolist() for q, v in f.quantiles.items()},
                    "context_length": len(f.context),
                    "plot": str(f.plot) if f.plot else None,
                }
                for f in self.forecasts
            ],
            "routing": {m: np.round(mat, 4).tolist() for m, mat in self.routing.items()},
            "heatmap": str(self.heatmap) if self.heatmap else None,
            "history_turns": self.history_turns,
            "seconds": round(self.seconds, 3),
        }


class ChatEngine:
    """Serves chat turns for one model + processor.

    One lock serializes generation: the expert-load collector hooks the model's MoE blocks, so two replies running
    at once would mix their routing statistics (and a CPU gains nothing from running them side by side)."""

    def __init__(
        self,
        model,
        processor,
        *,
        output_dir: str | Path | None = None,
        max_file_bytes: int | None = None,
        max_history_messages: int = 8,
    ):
        self.model = model.eval()
        self.processor = processor
        self.output_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="unimoe-demo-"))
        if not output_dir:  # our own scratch folder: removed when the engine goes away or the process exits
            weakref.finalize(self, shutil.rmtree, str(self.output_dir), ignore_errors=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        limit = getattr(processor, "max_file_bytes", None)
        self.max_file_bytes = max_file_bytes if max_file_bytes is not None else limit
        self.max_history_messages = max_history_messages
        self.modalities = list(getattr(model.config, "modalities", None) or ["text"])
        moe = getattr(model.config, "moe_config", None)
        self.num_experts = int(getattr(moe, "num_experts", 0) or 0)
        self.multimodal_output = hasattr(model, "generate_multimodal")
        self.output_modalities = list(getattr(model.config, "generation", None) or {}) if self.multimodal_output else []
        self._lock = threading.Lock()
        self._replies = itertools.count()

    @property
    def input_modalities(self) -> list[str]:
        """The media the checkpoint can read (the modalities it has encoders for)."""
        return list(getattr(self.processor, "modalities", []))

    # ------------------------------------------------------------------ inputs
    def attachments(self, files: Sequence[str | Path | dict]) -> list[Attachment]:
        """Check each upload before any decoding: a supported suffix, a modality this checkpoint reads, a size within
        the limit. Raises :class:`MediaError` naming the file and what is wrong."""
        out = []
        for item in files:
            path = Path(item["path"] if isinstance(item, dict) else item)
            suffix = path.suffix.lower()
            if suffix not in SUPPORTED_SUFFIXES:
                kinds = ", ".join(sorted(SUPPORTED_SUFFIXES))
                raise MediaError(path, f"unsupported file type {suffix or '(no suffix)'}; the demo reads {kinds}")
            if not path.is_file():
                raise MediaError(path, "the upload is missing (try attaching it again)")
            size = path.stat().st_size
            if size == 0:
                raise MediaError(path, "file is empty")
            if self.max_file_bytes is not None and size > self.max_file_bytes:
                raise MediaError(
                    path, f"file is {_megabytes(size)}, above the demo's limit of {_megabytes(self.max_file_bytes)}"
                )
            modality = guess_modality(path, self.input_modalities)
            if modality not in self.input_modalities:
                takes = ", ".join(self.input_modalities) or "text only"
                raise MediaError(path, f"this checkpoint has no {modality} encoder (it reads: {takes})")
            out.append(Attachment(path, modality))
        return out

    def messages(self, text: str, attachments: Sequence[Attachment], history: Sequence[Any]) -> list[dict]:
        """The conversation for the processor: the history's text turns (the most recent ``max_history_messages``)
        and this turn's media parts followed by its text."""
        content: list[dict[str, str]] = [{"type": a.modality, "path": str(a.path)} for a in attachments]
        if text.strip():
            content.append({"type": "text", "text": text})
        return [*history_messages(history, self.max_history_messages), {"role": "user", "content": content}]

    # ------------------------------------------------------------------ one turn
    def stream(
        self,
        text: str,
        files: Sequence[str | Path | dict],
        history: Sequence[Any] = (),
        settings: GenerationSettings | None = None,
    ) -> Iterator[str | Reply]:
        """Yield the reply text as it grows, then the finished :class:`Reply` (always last, errors included)."""
        settings = settings or GenerationSettings()
        started = time.perf_counter()
        reply = Reply(prompt=text)
        raw_paths = [Path(f["path"] if isinstance(f, dict) else f) for f in files]
        if not text.strip() and not files:
            reply.error = "Type a message or attach a file."
            yield reply
            return
        reply_dir = self.output_dir / f"reply-{next(self._replies):05d}"
        try:
            reply.attachments = self.attachments(files)
            self._previews(reply, reply_dir)
            messages = self.messages(text, reply.attachments, history)
            reply.history_turns = len(messages) - 1
        except UniMoEError as err:
            reply.error = readable(err, raw_paths)
            reply.seconds = time.perf_counter() - started
            yield reply
            return
        with self._lock:
            yield from self._generate(messages, settings, reply, reply_dir, raw_paths)
        reply.seconds = time.perf_counter() - started
        yield reply

    def _previews(self, reply: Reply, reply_dir: Path) -> None:
        """Decode the last point cloud and the last series of the turn for the preview panel (also the first check
        that those files are readable: a bad one fails here with the processor's own error)."""
        for a in reversed(reply.attachments):
            if a.modality == "points" and reply.points_preview is None:
                points = load_media(self.processor, "points", a.path)
                reply.points_preview = write_point_cloud_preview(points, reply_dir / f"{a.path.stem}.ply")
            elif a.modality == "series" and reply.series_preview is None:
                values = load_media(self.processor, "series", a.path)
                reply.series_preview = save_figure(
                    series_figure(values, title=a.name), reply_dir / f"{a.path.stem}_series.png"
                )

    def _generate(
        self, messages: list[dict], settings: GenerationSettings, reply: Reply, reply_dir: Path, raw_paths: list[Path]
    ) -> Iterator[str]:
        """Run generation in a thread and stream its text; the collector spans the whole call so the routing panel
        covers the prompt and every generated token."""
        from transformers import TextIteratorStreamer

        from unimoe.eval.runner import ExpertLoadCollector

        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                with torch.no_grad():
                    result["output"] = self._run_model(messages, settings, streamer, cancel)
            except BaseException as err:  # handed to the reading side; nothing may die silently in a thread
                result["error"] = err
            finally:
                # Always end the stream: a failed call never ends it, and a reply that is only an image or a
                # forecast may produce no text at all. A second end marker after generate's own is never read.
                streamer.on_finalized_text("", stream_end=True)

        collector = ExpertLoadCollector(self.model)
        with collector:
            thread = threading.Thread(target=work, name="unimoe-demo-generate", daemon=True)
            thread.start()
            text = ""
            try:
                for piece in streamer:
                    text += piece
                    if text.strip():
                        yield text.strip()
            except GeneratorExit:  # the client went away: stop generating instead of finishing an unread reply
                cancel.set()
                raise
            finally:
                thread.join()
        err = result.get("error")
        if err is not None:
            if isinstance(err, UniMoEError):
                reply.error = readable(err, raw_paths)
            else:
                logger.error("generation failed", exc_info=err)
                reply.error = f"the model failed: {type(err).__name__}: {_first_line(err)}"
            return
        reply.text = text.strip()
        output = result.get("output")
        if output is not None:
            reply.text = str(getattr(output, "text", reply.text) or "").strip()
            self._save_media(output, reply, reply_dir)
        reply.routing = collector.per_modality(self.modalities)
        if reply.routing:
            from unimoe.viz import routing_heatmap

            reply.heatmap = routing_heatmap(
                reply.routing,
                reply_dir / "routing.png",
                num_experts=self.num_experts or None,
                title="Expert load of the last reply",
            )

    def _run_model(self, messages: list[dict], settings: GenerationSettings, streamer, cancel: threading.Event):
        """One generation call. Checkpoints with generation heads go through ``generate_multimodal`` (text plus any
        images, speech and forecasts the prompt asks for); others through plain text ``generate`` as in
        :func:`unimoe.inference.chat`. Returns the multimodal output, or ``None`` for text-only generation."""
        if self.multimodal_output:
            # output_modality only when asked for: the default call is the documented generate_multimodal contract
            forced = {"output_modality": settings.output} if settings.output else {}
            return self.model.generate_multimodal(
                self.processor,
                messages,
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                seed=settings.seed,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                streamer=streamer,
                **forced,
            )
        if settings.output:
            raise InputError(f"this model generates text only, so it cannot reply with {settings.output}")
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        inputs = self.processor(messages, add_generation_prompt=True, return_labels=False).to(self.model.device)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        sampling = sampling_kwargs(settings.temperature)
        tokenizer = self.processor.tokenizer
        self.model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([Cancelled()]),
            **sampling,
        )
        return None

    def _save_media(self, output: Any, reply: Reply, reply_dir: Path) -> None:
        """Write generated images (PNG), speech (WAV) and forecast plots (PNG) under the reply's folder; forecasts
        keep their arrays too."""
        import soundfile as sf

        reply_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(getattr(output, "images", None) or []):
            path = reply_dir / f"image_{i}.png"
            image.save(path)
            reply.images.append(path)
        for i, clip in enumerate(getattr(output, "audio", None) or []):
            path = reply_dir / f"speech_{i}.wav"
            sf.write(path, np.asarray(clip.waveform, dtype=np.float32).reshape(-1), int(clip.sample_rate))
            reply.audio.append(path)
        for i, f in enumerate(getattr(output, "forecasts", None) or []):
            quantiles = {float(q): np.asarray(v, dtype=np.float32) for q, v in (f.quantiles or {}).items()}
            forecast = Forecast(np.asarray(f.context), np.asarray(f.point), quantiles)
            figure = forecast_figure(forecast.context, forecast.point, forecast.quantiles)
            forecast.plot = save_figure(figure, reply_dir / f"forecast_{i}.png")
            reply.forecasts.append(forecast)


# ---------------------------------------------------------------------------------------------------------- helpers
def history_messages(history: Sequence[Any], limit: int) -> list[dict]:
    """Text turns of a gradio chat history as processor messages.

    gradio hands the history over in several shapes (normalized ``{"type": "text"}`` parts from the browser, raw
    strings, file dicts and components from API calls); only text is kept. The demo's own notices and the user
    turns they answered are dropped (the model never said them), consecutive turns of one role are merged, and the
    result starts with a user turn."""
    turns: list[dict] = []
    for item in history:
        role = item.get("role") if isinstance(item, dict) else getattr(item, "role", None)
        content = item.get("content") if isinstance(item, dict) else getattr(item, "content", None)
        text = _text_of(content).strip()
        if role not in ("user", "assistant") or not text:
            continue
        if role == "assistant" and text.startswith(NOTICE.strip()):
            if turns and turns[-1]["role"] == "user":
                turns.pop()
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["text"] += "\n" + text
        else:
            turns.append({"role": role, "text": text})
    turns = turns[-limit:] if limit > 0 else []
    while turns and turns[0]["role"] != "user":
        turns.pop(0)
    return [
        {"role": "user", "content": [{"type": "text", "text": t["text"]}]}
        if t["role"] == "user"
        else {"role": "assistant", "content": t["text"]}
        for t in turns
    ]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "\n".join(t for t in (_text_of(c) for c in content) if t)
    if isinstance(content, dict) and content.get("type", "text") == "text" and isinstance(content.get("text"), str):
        return content["text"]
    return ""  # files, components, media: not text


def readable(err: BaseException, paths: Sequence[Path]) -> str:
    """The error's one-line message with gradio's upload-cache paths shortened to the names the user gave."""
    message = _first_line(err)
    for path in sorted(paths, key=lambda p: len(str(p)), reverse=True):
        message = message.replace(str(path), path.name)
    return message


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size:,} bytes"
