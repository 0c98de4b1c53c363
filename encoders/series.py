"""Time-series encoder: instance-normalized patches → transformer tokens (Chronos-Bolt / PatchTST style).

A series ``(L, C)`` (NaN = missing) becomes ``context_length // patch_size`` tokens:

1. **fit to the context**: left-padded with missing values, or truncated keeping the most recent
   ``context_length`` steps; channels beyond the series' own are padding (mask 0);
2. **instance normalization** per item and channel over the *observed* values only (``normalize`` returns the
   ``loc`` / ``scale`` a forecasting head needs to map predictions back); missing values become 0;
3. **patching with the mask** (as Chronos-Bolt): each patch carries its values and its 0/1 observation mask;
4. **channel mixing** — our choice for multivariate input: the patches of all ``num_channels`` channels at one time
   step are flattened into one patch vector (``num_channels * patch_size * 2`` numbers), so a unit always gives
   ``context_length // patch_size`` tokens whatever its channel count. PatchTST's channel independence would give
   ``C`` times as many LLM tokens; mixing lets the tokens see cross-channel structure at the cost of a fixed
   ``num_channels``;
5. a **residual-MLP patch embedding** (Chronos-Bolt's ``ResidualBlock``: ``Linear → act → Linear`` plus a linear
   skip), a learnable positional embedding, and a small pre-norm transformer. Patches with no observed value
   (e.g. left padding) are masked out as attention keys.

Because of step 2 the tokens are invariant to an affine change of each channel (``x * a + b``, ``a > 0``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unimoe.config_utils import check_positive_ints
from unimoe.errors import ConfigError

from .base import (
    ENCODERS,
    MediaEncoder,
    MediaError,
    check_conv_fields,
    check_float32_range,
    check_size,
    npy_problem,
)

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": None}
#: names of a leading *numeric* column that is a time axis, not a channel (compared lower-case)
TIME_COLUMN_NAMES = {"time", "timestamp", "date", "datetime", "ds", "t", "index", "step", "unnamed: 0"}


@dataclass
class TimeSeriesEncoderConfig:
    context_length: int = 512
    patch_size: int = 16
    num_channels: int = 1
    dim: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    eps: float = 1e-5

    def __post_init__(self) -> None:
        check_positive_ints(
            self, ("context_length", "patch_size", "num_channels", "dim", "depth", "num_heads"), "encoders.series"
        )
        if self.context_length % self.patch_size != 0:
            raise ConfigError(
                f"encoders.series.context_length: {self.context_length} is not a multiple of "
                f"patch_size={self.patch_size}"
            )
        if self.dim % self.num_heads != 0:
            raise ConfigError(f"encoders.series.num_heads: dim={self.dim} is not divisible by {self.num_heads}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"encoders.series.mlp_ratio: must be > 0, got {self.mlp_ratio}")
        if self.eps <= 0:
            raise ConfigError(f"encoders.series.eps: must be > 0, got {self.eps}")


@dataclass
class SeriesConvEncoderConfig:
    """A small 1D convolutional network over the normalized series, trained from scratch, with max-pooled tokens.

    ``widths`` are the channels of its blocks; each block is two convolutions of ``kernel_size`` along time and a
    max pool by 2; a last convolution projects to ``dim``. The feature sequence is then max-pooled to ``tokens``
    tokens, each the maximum over ``context_length / tokens`` consecutive steps."""

    context_length: int = 128
    num_channels: int = 1
    widths: list[int] = field(default_factory=lambda: [32, 64])
    kernel_size: int = 7
    dim: int = 64
    tokens: int = 8
    eps: float = 1e-5

    def __post_init__(self) -> None:
        check_conv_fields("encoders.series", self, "context_length", "num_channels", "kernel_size", "dim", "tokens")
        widths = self.widths
        if self.kernel_size % 2 == 0:
            raise ConfigError(
                f"encoders.series.kernel_size: must be odd (same-length convolutions): got {self.kernel_size}"
            )
        if self.context_length % 2 ** len(widths) != 0:
            raise ConfigError(
                f"encoders.series.context_length: {self.context_length} is not divisible by 2 ** {len(widths)} (one "
                f"pooling by 2 per width in widths)"
            )
        steps = self.context_length // 2 ** len(widths)
        if self.tokens > steps:
            raise ConfigError(
                f"encoders.series.tokens: {self.tokens} is more than the {steps} steps left after "
                f"{len(widths)} poolings of context_length {self.context_length}"
            )
        if self.eps <= 0:
            raise ConfigError(f"encoders.series.eps: must be > 0, got {self.eps}")


# ---------------------------------------------------------------------------------------------------------------------
# media side
# ---------------------------------------------------------------------------------------------------------------------


def _check_series(source: Any, array: np.ndarray, config: TimeSeriesEncoderConfig) -> np.ndarray:
    """``(L,)`` or ``(L, C)`` numbers → ``(L, C)`` float32 with NaN for missing values, or MediaError."""
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise MediaError(source, f"expected a numeric series, got dtype {array.dtype}")
    check_float32_range(source, array)
    array = array.astype(np.float32)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise MediaError(source, f"expected a series of shape (L,) or (L, C), got shape {array.shape}")
    if array.shape[0] == 0:
        raise MediaError(source, "the series has no rows")
    if array.shape[1] == 0:
        raise MediaError(source, "the series has no value columns")
    if array.shape[1] > config.num_channels:
        raise MediaError(
            source,
            f"the series has {array.shape[1]} channels, more than encoders.series.num_channels={config.num_channels}",
        )
    if np.isinf(array).any():
        raise MediaError(source, "the series contains infinite values")
    if np.isnan(array).all():
        raise MediaError(source, "all values of the series are missing")
    return np.ascontiguousarray(array)


def _looks_numeric(line: str, sep: str | None) -> bool:
    fields = [f for f in (line.split(sep) if sep else line.split()) if f.strip()]
    try:
        [float(f) for f in fields]
    except ValueError:
        return False
    return bool(fields)


def _read_table(source: Any, data: bytes, sep: str | None) -> np.ndarray:
    """A csv / tsv / whitespace table → ``(L, C)``: numeric columns are channels; a leading time column is dropped."""
    import pandas as pd

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise MediaError(source, "not a text table (not UTF-8)") from None
    first = next((line for line in text.splitlines() if line.strip()), "")
    if not first:
        raise MediaError(source, "the table has no rows")
    if sep != ";" and ";" in first:
        raise MediaError(
            source,
            f"the table seems to use ';' as its separator (first line {first.strip()[:60]!r}); write it with "
            f"{'tabs' if sep == chr(9) else 'commas' if sep else 'spaces'} between fields and '.' as decimal point",
        )
    _check_field_counts(source, text, sep)
    header = None if _looks_numeric(first, sep) else "infer"
    try:
        # index_col=False: rows with more fields than the header are an error (above), never an index
        frame = pd.read_csv(io.StringIO(text), sep=sep if sep else r"\s+", header=header, index_col=False)
    except pd.errors.EmptyDataError:
        raise MediaError(source, "the table has no rows") from None
    except (pd.errors.ParserError, ValueError) as err:
        raise MediaError(source, f"not a readable table ({err})") from None
    if len(frame) == 0:
        raise MediaError(source, "the table has no rows")
    columns = list(frame.columns)
    if columns and _is_time_column(frame[columns[0]], header is not None):
        columns = columns[1:]
    if not columns:
        raise MediaError(source, "the table has no value columns")
    values = []
    for name in columns:
        column = frame[name]
        numeric = pd.to_numeric(column, errors="coerce")
        bad = numeric.isna() & column.notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise MediaError(
                source,
                f"column {name!r} holds text ({column.iloc[row]!r} in row {row + 1}); value columns must be numbers",
            )
        values.append(numeric.to_numpy(dtype=np.float64))
    return np.stack(values, axis=1)


def _check_field_counts(source: Any, text: str, sep: str | None) -> None:
    """No row may have more fields than the first (the header): pandas would silently turn the extra leading fields
    into an index and shift every column (``value`` / ``10,20`` read as ``[20, ...]``). Rows with fewer fields are
    missing values (NaN), as pandas reads them."""
    import csv

    if sep:
        reader = csv.reader(io.StringIO(text), delimiter=sep)
        rows = ((reader.line_num, row) for row in reader if row)
    else:
        rows = ((n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip())
    try:
        first_line, first = next(rows)
        for line, row in rows:
            if len(row) > len(first):
                raise MediaError(
                    source,
                    f"line {line} has {len(row)} fields but the first line (line {first_line}) has {len(first)}; "
                    f"every row needs one value per column",
                )
    except csv.Error as err:
        raise MediaError(source, f"not a readable table ({err})") from None
    except StopIteration:
        return


def _is_time_column(column, named: bool) -> bool:
    """A leading column is a time axis when it is not numeric (dates, labels), or numeric with a time-like name."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(column) or not pd.api.types.is_numeric_dtype(column):
        return True
    return named and str(column.name).strip().lower() in TIME_COLUMN_NAMES


def load_series(source: Any, config: TimeSeriesEncoderConfig, *, max_bytes: int | None = None) -> np.ndarray:
    """A path (``.csv/.tsv/.txt`` via pandas, ``.npy``), bytes (a ``.npy`` or a csv), a list or an array →
    ``(L, C)`` float32 with NaN for missing values; any problem raises :class:`MediaError` naming the source."""
    if isinstance(source, torch.Tensor):
        return _check_series(source, source.detach().cpu().numpy(), config)
    if isinstance(source, (np.ndarray, list, tuple)):
        try:
            array = np.asarray(source, dtype=np.float64) if isinstance(source, (list, tuple)) else source
        except (TypeError, ValueError) as err:
            raise MediaError(source, f"not a numeric series ({err})") from None
        return _check_series(source, np.asarray(array), config)
    if not isinstance(source, (str, Path, bytes, bytearray)):
        raise MediaError(
            source,
            f"a series must be a file path, bytes, a list of numbers or an (L,) / (L, C) array; got "
            f"{type(source).__name__}",
        )
    check_size(source, max_bytes)
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        suffix = ".npy" if data.startswith(b"\x93NUMPY") else ".csv"
    else:
        path = Path(source)
        if path.is_dir():
            raise MediaError(source, "is a directory, expected a series file")
        suffix = path.suffix.lower()
        if suffix not in (*TABLE_SUFFIXES, ".npy"):
            raise MediaError(
                source, f"unsupported series file type {suffix!r}; use one of {', '.join((*TABLE_SUFFIXES, '.npy'))}"
            )
        data = path.read_bytes()
    if suffix == ".npy":
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise MediaError(source, npy_problem(err)) from None
    else:
        array = _read_table(source, data, TABLE_SUFFIXES[suffix])
    return _check_series(source, array, config)


def fit_context(
    values: torch.Tensor, mask: torch.Tensor, context_length: int, num_channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, L, C)`` values + mask → ``(N, context_length, num_channels)``: left-padded with mask 0, or truncated to
    the most recent steps; extra channels padded with mask 0. Missing (NaN) values get mask 0 and value 0."""
    mask = mask.to(values.dtype) * torch.isfinite(values).to(values.dtype)
    values = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0) * mask
    n, length, channels = values.shape
    if channels > num_channels:
        raise ValueError(f"series encoder: {channels} channels, more than num_channels={num_channels}")
    if length >= context_length:
        values, mask = values[:, length - context_length :], mask[:, length - context_length :]
    pad_time = max(context_length - length, 0)
    pad = (0, num_channels - channels, pad_time, 0)  # last dim (channels) right, time dim left
    return nn.functional.pad(values, pad), nn.functional.pad(mask, pad)


def observed_mean_std(values: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over time of the observed entries: ``values (N, L, C)`` (finite), ``weight
    (N, L, C)`` 1 = observed, 0 = missing → ``(mean, std, count)``, each ``(N, 1, C)`` (0 where nothing is
    observed)."""
    count = weight.sum(dim=1, keepdim=True)
    loc = (values * weight).sum(dim=1, keepdim=True) / count.clamp_min(1)
    var = ((values - loc).square() * weight).sum(dim=1, keepdim=True) / count.clamp_min(1)
    return loc, var.sqrt(), count


# ---------------------------------------------------------------------------------------------------------------------
# network side
# ---------------------------------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """Chronos-Bolt's patch embedding: ``Linear → SiLU → Linear`` plus a linear skip connection."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.hidden = nn.Linear(in_dim, hidden)
        self.act = nn.SiLU()
        self.output = nn.Linear(hidden, out_dim)
        self.residual = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.act(self.hidden(x))) + self.residual(x)


class SeriesEncoderBase(MediaEncoder):
    """What every series encoder shares: loading, fitting to the context, and instance normalization (the forecasting
    head reads ``normalize`` and ``config.context_length`` / ``num_channels`` of whichever encoder is configured).
    Subclasses build the network and define ``tokens_per_unit`` and ``forward``."""

    modality = "series"

    @classmethod
    def load(cls, source: Any, config: Any, *, max_bytes: int | None = None) -> np.ndarray:
        return load_series(source, config, max_bytes=max_bytes)

    @classmethod
    def preprocess(cls, media: Any, config: Any) -> dict[str, torch.Tensor]:
        """``(L, C)`` series → ``{"values", "mask"}`` of shape ``(1, context_length, num_channels)``: values with
        missing entries set to 0, mask 1 where observed (left padding and unused channels are 0)."""
        if not isinstance(media, np.ndarray) or media.dtype != np.float32 or media.ndim != 2:
            media = load_series(media, config)
        values = torch.from_numpy(np.ascontiguousarray(media)).unsqueeze(0)  # (1, L, C)
        values, mask = fit_context(values, torch.ones_like(values), config.context_length, config.num_channels)
        return {"values": values.float(), "mask": mask.float()}

    def normalize(
        self, values: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Instance normalization over the observed values of each item and channel (Chronos-Bolt's InstanceNorm).

        ``values (N, L, C)`` (NaN = missing), ``mask (N, L, C)`` 1 = observed → ``(normalized (N, L, C) with 0 at
        missing values, loc (N, 1, C), scale (N, 1, C))`` so that ``values ≈ normalized * scale + loc``. A channel
        with no observed value gets loc 0, scale 1; a constant channel gets scale ``|loc| + eps``."""
        observed = torch.isfinite(values)
        if mask is not None:
            observed = observed & (mask > 0)
        weight = observed.to(values.dtype)
        x = torch.where(observed, values, torch.zeros_like(values))
        loc, scale, count = observed_mean_std(x, weight)
        scale = torch.where(scale == 0, loc.abs() + self.config.eps, scale)
        scale = torch.where(count == 0, torch.ones_like(scale), scale)
        normalized = (x - loc) / scale * weight
        return normalized, loc, scale

    def normalized_context(self, values: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``values (N, L, C)`` or ``(N, L)`` (+ mask) → normalized values and mask, ``(N, context_length,
        num_channels)`` each."""
        if values.ndim == 2:
            values = values.unsqueeze(-1)  # (N, L) univariate
            mask = mask.unsqueeze(-1) if mask is not None and mask.ndim == 2 else mask
        if values.ndim != 3:
            raise ValueError(f"series encoder: expected values of shape (N, L, C), got {tuple(values.shape)}")
        if mask is None:
            mask = torch.ones_like(values)
        cfg = self.config
        values, mask = fit_context(values, mask, cfg.context_length, cfg.num_channels)  # (N, L, C)
        normalized, _, _ = self.normalize(values, mask)
        return normalized, mask


@ENCODERS.register("patch_ts")
class TimeSeriesEncoder(SeriesEncoderBase):
    """Instance-normalized, masked, channel-mixed patches → ``(N, context_length // patch_size, dim)`` tokens."""

    Config = TimeSeriesEncoderConfig

    def __init__(self, config: TimeSeriesEncoderConfig):
        super().__init__(config)
        dim = config.dim
        patch_dim = config.num_channels * config.patch_size * 2  # values + mask of every channel
        self.patch_embed = ResidualBlock(patch_dim, int(dim * config.mlp_ratio), dim)
        self.pos_embed = nn.Parameter(torch.randn(self.num_patches, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            config.num_heads,
            dim_feedforward=int(dim * config.mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(
            layer, config.depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )

    @property
    def num_patches(self) -> int:
        return self.config.context_length // self.config.patch_size

    @property
    def output_dim(self) -> int:
        return self.config.dim

    @classmethod
    def tokens_per_unit(cls, config: TimeSeriesEncoderConfig) -> int:
        return config.context_length // config.patch_size

    def forward(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``values (N, L, C)`` (+ ``mask (N, L, C)``, 1 = observed; NaN values count as missing) →
        ``(N, context_length // patch_size, dim)``. Series of another length or fewer channels are fitted first."""
        cfg = self.config
        normalized, mask = self.normalized_context(values, mask)  # (N, L, C) each
        n, p = normalized.shape[0], cfg.patch_size
        # (N, L, C) -> (N, T, p, C) -> (N, T, C, p) -> (N, T, C*p)
        patches = normalized.reshape(n, self.num_patches, p, cfg.num_channels).transpose(2, 3).flatten(2)
        patch_mask = mask.reshape(n, self.num_patches, p, cfg.num_channels).transpose(2, 3).flatten(2)
        tokens = self.patch_embed(torch.cat([patches, patch_mask], dim=-1)) + self.pos_embed  # (N, T, D)
        padded = patch_mask.sum(-1) == 0  # (N, T) patches with no observed value
        padded = padded & ~padded.all(dim=1, keepdim=True)  # never mask every key of an item
        return self.transformer(tokens, src_key_padding_mask=padded)


@ENCODERS.register("series_conv")
class SeriesConvEncoder(SeriesEncoderBase):
    """Why a hand-written network: nothing pretrained can be loaded offline, and the offline classification sets
    have 20-50 training series per set. A series classifier that learns from so few examples needs the convolution's
    inductive bias — one detector at every time step and a maximum over steps, so a motif (GunPoint's dip before
    the draw) counts wherever it occurs — which fully convolutional networks bring to the UCR archive (Wang et al.
    2017). The patch transformer (``patch_ts``) fitted GunPoint's 45 training series exactly but read its test series
    at 0.85-0.91 (docs/results.md). The 1D counterpart of ``image_conv``; loading and normalization are shared with
    ``patch_ts`` (``SeriesEncoderBase``)."""

    Config = SeriesConvEncoderConfig

    def __init__(self, config: SeriesConvEncoderConfig):
        super().__init__(config)
        layers: list[nn.Module] = []
        channels, pad = 2 * config.num_channels, config.kernel_size // 2  # values + mask of every channel
        for width in config.widths:
            layers += [
                nn.Conv1d(channels, width, config.kernel_size, padding=pad),
                nn.GELU(),
                nn.Conv1d(width, width, config.kernel_size, padding=pad),
                nn.GELU(),
                nn.MaxPool1d(2),
            ]
            channels = width
        layers.append(nn.Conv1d(channels, config.dim, config.kernel_size, padding=pad))
        self.net = nn.Sequential(*layers)

    @property
    def output_dim(self) -> int:
        return self.config.dim

    @classmethod
    def tokens_per_unit(cls, config: SeriesConvEncoderConfig) -> int:
        return config.tokens

    def forward(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``values (N, L, C)`` (+ ``mask (N, L, C)``, 1 = observed; NaN values count as missing) →
        ``(N, tokens, dim)`` in time order. Series of another length or fewer channels are fitted first."""
        normalized, mask = self.normalized_context(values, mask)  # (N, L, C) each
        features = self.net(torch.cat([normalized, mask], dim=-1).transpose(1, 2))  # (N, 2C, L) -> (N, dim, L')
        pooled = nn.functional.adaptive_max_pool1d(features, self.config.tokens)  # (N, dim, tokens)
        return pooled.transpose(1, 2)  # (N, tokens, dim)
