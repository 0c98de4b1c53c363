"""``UniMoEProcessor``: chat messages with media → model inputs.

For each conversation it renders the chat template (one placeholder token per media part), loads and preprocesses
every media part with its modality's encoder class (a clear :class:`MediaError` for bad files), expands each
placeholder into the number of tokens the connector will produce, puts labels on assistant turns only, and
batches with left padding. Media of every modality, several per message, mix freely in one batch.

A message part is ``{"type": "text", "text": ...}`` or ``{"type": <modality>, "path" | "bytes" | "array" |
<modality>: ...}`` (``"image": PIL image``, ``"audio": (waveform, rate)``, ...).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from unimoe.configuration_unimoe import strip_component_keys
from unimoe.connectors import connector_tokens
from unimoe.encoders import MediaError, encoder_class
from unimoe.encoders.base import check_size, npy_problem
from unimoe.errors import ConfigError, InputError

IGNORE_INDEX = -100
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
DEFAULT_FEATURE_CACHE_BYTES = 4 * 1024**3

#: File suffix → modality, for callers that only have a path (the CLI, the demo).
SUFFIX_MODALITY = {
    **dict.fromkeys([".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"], "image"),
    **dict.fromkeys([".wav", ".flac", ".ogg", ".mp3"], "audio"),
    **dict.fromkeys([".mp4", ".webm", ".avi", ".mov", ".mkv", ".gif"], "video"),
    **dict.fromkeys([".ply", ".obj", ".off", ".stl", ".xyz", ".pts"], "points"),
    **dict.fromkeys([".csv", ".tsv"], "series"),
}


#: An ``(N, 3|6|9)`` array is a point cloud or a multichannel series. A series' rows are ordered in time, so
#: consecutive rows lie closer together than random pairs of rows; a point cloud's row order means nothing (ratio ~1).
#: Measured on the suite's files: BasicMotions series 0.45-0.75, sampled shape surfaces 0.95-1.08.
ORDERED_ROWS_RATIO = 0.85


def rows_look_ordered(array: Any, max_rows: int = 4096) -> bool:
    """Whether consecutive rows of ``(N, C)`` (standardized per column) are closer than ``ORDERED_ROWS_RATIO`` times
    the distance between rows paired at random (fixed seed): a signal rather than a set of points."""
    import numpy as np

    rows = np.asarray(array[:max_rows], dtype=np.float64)
    if rows.shape[0] < 3:
        return True  # too short to tell; two 3-channel rows are no point cloud
    rows = (rows - rows.mean(0)) / (rows.std(0) + 1e-12)
    consecutive = np.linalg.norm(np.diff(rows, axis=0), axis=1).mean()
    shuffled = np.linalg.norm(rows[np.random.default_rng(0).permutation(len(rows))] - rows, axis=1).mean()
    return bool(consecutive < ORDERED_ROWS_RATIO * shuffled)


def guess_modality(path: str | Path, readable: Sequence[str] | None = None) -> str:
    """The modality of a file from its suffix (a directory of frames is a video). A ``.npy`` of shape ``(N, 3|6|9)``
    is a point cloud or a multichannel series: the one of the two in ``readable`` (the modalities the model reads)
    when it reads only one, else a series when its rows are ordered like a signal (:func:`rows_look_ordered`) and a
    point cloud when not. Any other ``.npy`` is a series."""
    path = Path(path)
    if path.is_dir():
        return "video"
    suffix = path.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        check_size(path, None)  # missing or empty: the encoders' own one-line errors
        try:
            array = np.load(path, allow_pickle=False, mmap_mode="r")
        except (OSError, ValueError, EOFError) as err:
            raise MediaError(path, npy_problem(err)) from None
        if not (array.ndim == 2 and array.shape[1] in (3, 6, 9)):
            return "series"
        candidates = {"points", "series"} & set(readable if readable is not None else ("points", "series"))
        if len(candidates) == 1:
            return candidates.pop()
        return "series" if rows_look_ordered(array) else "points"
    if suffix not in SUFFIX_MODALITY:
        raise MediaError(path, f"cannot tell the modality of a {suffix or 'suffix-less'} file; pass --modality")
    return SUFFIX_MODALITY[suffix]


class FeatureCache:
    """A least-recently-used map from keys to tensors (or dicts of tensors), bounded by their total bytes. The
    cached objects are shared: callers must not modify them in place (the collator copies them into batches)."""

    def __init__(self, max_bytes: int = DEFAULT_FEATURE_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def _size(value: Any) -> int:
        tensors = value.values() if isinstance(value, dict) else [value]
        return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))

    def get(self, key: tuple) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: tuple, value: Any) -> None:
        size = self._size(value)
        if size > self.max_bytes:
            return
        if key in self._items:
            self.nbytes -= self._items.pop(key)[1]
        self._items[key] = (value, size)
        self.nbytes += size
        self._evict()

    def resize(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._evict()

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self._items:
            _, (_, size) = self._items.popitem(last=False)
            self.nbytes -= size


#: The process-wide cache behind :meth:`UniMoEProcessor.enable_feature_cache`.
FEATURE_CACHE = FeatureCache()


class UniMoEProcessor(ProcessorMixin):
    """Args:
    tokenizer: a tokenizer with the media placeholder tokens and a chat template.
    media_config: ``{"encoders": {modality: spec}, "connectors": {modality: spec}, "media_tokens":
        {modality: token}, "modalities": [names in modality-id order], "max_file_bytes": int}`` — the encoder and
        connector specs of the model config (use :meth:`from_model_config`).
    """

    def __init__(self, tokenizer=None, media_config: dict | None = None, chat_template: str | None = None, **kwargs):
        self.media_config = dict(media_config or {})
        if chat_template is None and tokenizer is not None:
            chat_template = tokenizer.chat_template
        super().__init__(tokenizer, chat_template=chat_template)
        self._setup()

    @classmethod
    def from_model_config(cls, tokenizer, config, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        from unimoe.tokenizer import MEDIA_TOKENS

        media_tokens = {m: MEDIA_TOKENS[m] for m in config.encoders}
        generation_tokens = {
            m: {kind: tokenizer.convert_ids_to_tokens(int(i)) for kind, i in ids.items()}
            for m, ids in (getattr(config, "generation_token_ids", None) or {}).items()
        }
        return cls(
            tokenizer,
            media_config={
                "encoders": {m: strip_component_keys(s) for m, s in config.encoders.items()},
                "connectors": {m: strip_component_keys(s) for m, s in config.connectors.items()},
                "media_tokens": media_tokens,
                "generation": {
                    m: strip_component_keys(s) for m, s in (getattr(config, "generation", None) or {}).items()
                },
                "generation_tokens": generation_tokens,
                "modalities": list(config.modalities),
                "max_file_bytes": max_file_bytes,
            },
        )

    def _setup(self) -> None:
        cfg = self.media_config
        self.max_file_bytes = cfg.get("max_file_bytes", DEFAULT_MAX_FILE_BYTES)
        self._encoders: dict[str, tuple[type, Any]] = {}
        self._tokens_per_unit: dict[str, int] = {}
        for modality, spec in cfg.get("encoders", {}).items():
            cls, enc_cfg = encoder_class(spec, modality)
            self._encoders[modality] = (cls, enc_cfg)
            self._tokens_per_unit[modality] = connector_tokens(
                modality, cfg.get("connectors", {}).get(modality, {"type": "mlp"}), cls.tokens_per_unit(enc_cfg)
            )
        self.media_token_ids: dict[str, int] = {}
        self.gen_token_ids: dict[str, int] = {}
        self.query_token_ids: dict[str, int] = {}
        self._heads: dict[str, Any] = {}
        self._mel_codec = None
        if self.tokenizer is not None:
            for modality, token in cfg.get("media_tokens", {}).items():
                self.media_token_ids[modality] = self._token_id(token, f"media_tokens.{modality}")
            for modality, spec in cfg.get("generation", {}).items():
                from unimoe.generation.config import head_config

                self._heads[modality] = head_config(modality, spec)
                tokens = cfg.get("generation_tokens", {}).get(modality, {})
                if set(tokens) != {"gen", "query"}:
                    raise ConfigError(f"generation_tokens.{modality}: expected 'gen' and 'query' tokens, got {tokens}")
                self.gen_token_ids[modality] = self._token_id(tokens["gen"], f"generation_tokens.{modality}.gen")
                self.query_token_ids[modality] = self._token_id(tokens["query"], f"generation_tokens.{modality}.query")

    def _token_id(self, token: str, field: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ConfigError(f"{field}: token {token!r} is not in the tokenizer")
        return token_id

    @property
    def modalities(self) -> list[str]:
        return list(self._encoders)

    # ------------------------------------------------------------------ media
    def enable_feature_cache(self, max_bytes: int = DEFAULT_FEATURE_CACHE_BYTES) -> None:
        """Keep preprocessed media files (encoder inputs and generation targets) in memory, in one cache shared by
        every processor of this process: training samples the same files many times, and a recipe's stages each
        build their own processor. Entries are keyed by the file (path, size, mtime) and the encoder or head
        configuration that made them, so processors with other settings never share an entry. Measured on the
        tiny recipe's mix: loading a batch cost ~250 ms cold, about as much as the training step itself
        (point-cloud farthest-point sampling ~20 ms a cloud, video decoding, log-mel features)."""
        FEATURE_CACHE.resize(max_bytes)
        self._cache = FEATURE_CACHE

    @property
    def feature_cache_enabled(self) -> bool:
        return getattr(self, "_cache", None) is not None

    def _cache_key(self, kind: str, modality: str, config: Any, source: Any) -> tuple | None:
        if getattr(self, "_cache", None) is None or not isinstance(source, (str, Path)):
            return None
        try:
            stat = Path(source).stat()
        except OSError:  # not a file: loading it reports the problem
            return None
        return kind, modality, repr(config), str(Path(source).resolve()), stat.st_size, stat.st_mtime_ns

    def load_part(self, part: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Load and preprocess one media part → ``{"values": (U, ...), ["mask": (U, ...)]}``."""
        modality = part["type"]
        cls, enc_cfg = self._encoders[modality]
        source = _part_source(part)
        key = self._cache_key("input", modality, enc_cfg, source)
        if key is not None and (cached := self._cache.get(key)) is not None:
            return cached
        features = cls.preprocess(cls.load(source, enc_cfg, max_bytes=self.max_file_bytes), enc_cfg)
        if key is not None:
            self._cache.put(key, features)
        return features

    def load_target(self, part: dict[str, Any]) -> torch.Tensor:
        """A generation target (a media part of an assistant turn) → the tensor its head learns: ``(C, S, S)``
        pixels or ``(1, M, T)`` log-mel in [-1, 1], or ``(2, H_max)`` series values and mask."""
        from unimoe.generation import codecs

        modality = part["type"]
        config = self._heads[modality]
        source = _part_source(part, keys=("path", "bytes", "array", "values", modality))
        key = self._cache_key("target", modality, config, source)
        if key is not None and (cached := self._cache.get(key)) is not None:
            return cached
        if modality == "image":
            target = codecs.image_target(source, config, max_bytes=self.max_file_bytes)
        elif modality == "audio":
            if self._mel_codec is None:
                self._mel_codec = codecs.MelCodec(config)
            target = codecs.audio_target(source, config, self._mel_codec, max_bytes=self.max_file_bytes)
        else:
            target = _series_target(source, config.max_horizon)
        if key is not None:
            self._cache.put(key, target)
        return target

    def num_media_tokens(self, modality: str, features: dict[str, torch.Tensor]) -> int:
        return features["values"].shape[0] * self._tokens_per_unit[modality]

    # ------------------------------------------------------------------ text + media
    def __call__(
        self,
        conversations: Sequence[dict] | Sequence[Sequence[dict]],
        *,
        add_generation_prompt: bool = False,
        return_labels: bool = True,
        return_tensors: str = "pt",
        augment: Callable[[int, str, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """One conversation (a list of messages) or a batch of them → ``input_ids``, ``attention_mask``,
        ``modality_ids``, ``labels`` (assistant tokens only) and ``{modality}_values`` / ``{modality}_mask``.
        ``augment(conversation_index, modality, features)``, if given, returns the features a user media part is
        encoded from (training-time augmentation, ``unimoe.train.augment``); it must not modify its input."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        rows, media, targets = [], {}, {}
        for i, chat in enumerate(conversations):
            hook = None if augment is None else functools.partial(augment, i)
            ids, labels = self._encode_chat(
                list(chat), add_generation_prompt, media, targets if return_labels else None, hook
            )
            rows.append((ids, labels))
        return self._collate(rows, media, return_labels, targets)

    def _encode_chat(
        self,
        chat: list[dict],
        add_generation_prompt: bool,
        media: dict[str, list],
        targets: dict[str, list] | None,
        augment: Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ) -> tuple:
        """Token ids and labels of one conversation. User media parts fill their placeholders (``media``); assistant
        media parts are generation targets: the generation token (labelled) plus the head's query slots (not
        labelled), with the target appended to ``targets`` when labels are wanted."""
        parts, outputs = [], []
        for message in chat:
            if not isinstance(message.get("content"), list):
                continue
            media_parts = [p for p in message["content"] if p.get("type", "text") != "text"]
            (outputs if message.get("role") == "assistant" else parts).extend(media_parts)
        for part in parts:
            if part["type"] not in self._encoders:
                takes = ", ".join(self.modalities) or "text only"
                raise MediaError(_part_source(part), f"this model has no {part['type']!r} encoder (it takes: {takes})")
        for part in outputs:
            if part["type"] not in self._heads:
                makes = ", ".join(self._heads) or "text only"
                raise InputError(f"this model cannot generate {part['type']!r} (it generates: {makes})")
        enc = self.tokenizer.apply_chat_template(
            chat,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            add_generation_prompt=add_generation_prompt,
        )
        ids, assistant = enc["input_ids"], enc["assistant_masks"]
        id_to_modality = {v: k for k, v in self.media_token_ids.items()}
        placeholders = [i for i, t in enumerate(ids) if t in id_to_modality]
        if len(placeholders) != len(parts):
            raise InputError(
                f"the conversation has {len(parts)} media parts but {len(placeholders)} placeholder tokens "
                "(is a media placeholder token written literally in the text?)"
            )
        id_to_generated = {v: k for k, v in self.gen_token_ids.items()}
        if targets is not None and sum(t in id_to_generated for t in ids) != len(outputs):
            raise InputError(
                f"the conversation has {len(outputs)} generated media parts but "
                f"{sum(t in id_to_generated for t in ids)} generation tokens (is one written literally in the text?)"
            )
        out_ids, out_labels = [], []
        part_iter, output_iter = iter(parts), iter(outputs)
        for token, is_assistant in zip(ids, assistant):
            if token in id_to_generated:
                modality = id_to_generated[token]
                n_queries = self._heads[modality].num_queries
                out_ids += [token] + [self.query_token_ids[modality]] * n_queries
                out_labels += [token if is_assistant else IGNORE_INDEX] + [IGNORE_INDEX] * n_queries
                if targets is not None:
                    targets.setdefault(modality, []).append(self.load_target(next(output_iter)))
            elif token in id_to_modality:
                part = next(part_iter)
                modality = id_to_modality[token]
                if part["type"] != modality:
                    raise MediaError(_part_source(part), f"media part of type {part['type']!r} has no placeholder")
                features = self.load_part(part)
                if augment is not None:
                    features = augment(modality, features)
                media.setdefault(modality, []).append(features)
                n = self.num_media_tokens(modality, features)
                out_ids += [token] * n
                out_labels += [IGNORE_INDEX] * n
            else:
                out_ids.append(token)
                out_labels.append(token if is_assistant else IGNORE_INDEX)
        return out_ids, out_labels

    def _collate(
        self, rows: list[tuple], media: dict[str, list], return_labels: bool, targets: dict[str, list] | None = None
    ) -> BatchFeature:
        pad_id = self.tokenizer.pad_token_id
        length = max(len(ids) for ids, _ in rows)
        left = self.tokenizer.padding_side == "left"
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            span = slice(length - len(ids), length) if left else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
            labels[i, span] = torch.tensor(lab, dtype=torch.long)
            attention_mask[i, span] = 1
        modality_ids = torch.zeros_like(input_ids)
        for modality, token_id in [*self.media_token_ids.items(), *self.query_token_ids.items()]:
            modality_ids[input_ids == token_id] = self._modality_index(modality)
        data = {"input_ids": input_ids, "attention_mask": attention_mask, "modality_ids": modality_ids}
        if return_labels:
            data["labels"] = labels
        for modality, items in (targets or {}).items():
            stacked = torch.stack(items)
            if modality == "series":  # (n, 2, H_max): values and mask
                data["gen_series_values"], data["gen_series_mask"] = stacked[:, 0], stacked[:, 1]
            else:
                data[f"gen_{modality}_values"] = stacked
        for modality, items in media.items():
            data[f"{modality}_values"] = torch.cat([f["values"] for f in items])
            if "mask" in items[0]:
                data[f"{modality}_mask"] = torch.cat([f["mask"] for f in items])
        return BatchFeature(data=data)

    def _modality_index(self, modality: str) -> int:
        from unimoe.configuration_unimoe import DEFAULT_MODALITIES

        order = self.media_config.get("modalities", DEFAULT_MODALITIES)
        return order.index(modality)

    def model_input_names(self) -> list[str]:  # type: ignore[override]
        return ["input_ids", "attention_mask", "modality_ids"] + [f"{m}_values" for m in self.modalities]


def _part_source(part: dict[str, Any], keys: tuple[str, ...] = ("path", "bytes", "array")) -> Any:
    for key in (*keys, part.get("type", "")):
        if key and part.get(key) is not None:
            return part[key]
    raise MediaError(part.get("type", "media"), f"message part has none of {', '.join(repr(k) for k in keys)}")


def _series_target(source: Any, max_horizon: int) -> torch.Tensor:
    """Forecast target values (a list, an array, or a series file: its first channel) → ``(2, max_horizon)``
    values and mask (a longer target is cut: the head forecasts at most ``max_horizon`` steps)."""
    import numpy as np

    if isinstance(source, (str, Path, bytes)):
        from unimoe.encoders.series import TimeSeriesEncoderConfig, load_series

        array = load_series(source, TimeSeriesEncoderConfig())[:, 0]
    else:
        try:
            array = np.asarray(source, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise MediaError("series target", "forecast target values must be numbers") from None
    if array.size == 0 or not np.isfinite(array).all():
        raise MediaError("series target", "forecast target is empty or has NaN / infinite values")
    out = torch.zeros(2, max_horizon)
    n = min(array.size, max_horizon)
    out[0, :n] = torch.from_numpy(np.ascontiguousarray(array[:n], dtype=np.float32))
    out[1, :n] = 1.0
    return out


__all__ = ["IGNORE_INDEX", "SUFFIX_MODALITY", "UniMoEProcessor", "guess_modality"]
